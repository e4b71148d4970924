"""rundir: the output folder's names, its config reader/writer and the derived defaults, in one place."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gradauth import rundir
from gradauth.errors import GradauthError


def test_config_round_trips_and_a_folder_without_one_is_refused(tmp_path, tiny_cfg):
    with pytest.raises(GradauthError, match="holds no config.yaml"):
        rundir.read_config(tmp_path)
    rundir.write_config(tiny_cfg, tmp_path)
    assert (tmp_path / "config.yaml").is_file()
    assert rundir.read_config(tmp_path).to_dict() == tiny_cfg.to_dict()


def test_lock_bound_defaults_to_chance_plus_a_tenth(tiny_cfg):
    assert rundir.chance_bound(10) == 1 / 10 + 0.1 == 0.2
    assert rundir.lock_bound(tiny_cfg, 4) == 0.2  # the tiny config sets sweep.lock_bound
    cfg = dataclasses.replace(tiny_cfg, sweep=dataclasses.replace(tiny_cfg.sweep, lock_bound=None))
    assert rundir.lock_bound(cfg, 4) == 0.35


def test_tune_storage_is_the_folder_unless_the_config_names_one(tmp_path, tiny_cfg):
    assert rundir.tune_storage(tiny_cfg, tmp_path) == str((tmp_path / "ray").resolve())
    cfg = dataclasses.replace(tiny_cfg, sweep=dataclasses.replace(tiny_cfg.sweep, storage="s3://bucket/x/"))
    assert rundir.tune_storage(cfg, tmp_path) == "s3://bucket/x/"
    assert rundir.experiment_path("s3://bucket/x/") == "s3://bucket/x/sweep"
    assert rundir.model_path(tmp_path, "t1") == tmp_path / "models" / "t1.pt"
    assert rundir.out_dir_for(tiny_cfg, None) == Path("runs") / tiny_cfg.name
    assert rundir.out_dir_for(tiny_cfg, "elsewhere") == Path("elsewhere")
