"""Base training, a trial and the stages, without Ray."""
import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from gradauth.checkpoint import load_model_file, rebuild
from gradauth.data import load_dataset
from gradauth.engine import evaluate
from gradauth.pipeline import train_stage, trial_context
from gradauth.sweep import TRIALS_SCHEMA, run_sequential, write_trials
from gradauth.trial import TrialSpec, grid, run_trial


@pytest.fixture(scope="module")
def trained(tiny_base):
    """The session's tiny base (conftest.py: TINY, 15 epochs, 320 BN channels; grid: rates 0.02 and 0.35, 3 epochs)."""
    return tiny_base


def test_base_training_reaches_accuracy_and_sparsity(trained):
    cfg, out, info = trained
    assert info["base_acc"] > 0.93
    assert info["gamma_quantiles"][0.5] < 0.05 < info["gamma_quantiles"][0.99]  # slimming: most γ near 0, a few large
    model, spec, masks = rebuild(load_model_file(out / "base.pt"))
    ds = load_dataset(cfg.data, cfg.seed)
    assert evaluate(model, ds, ds.test)[0] == pytest.approx(info["base_acc"])
    assert (out / "config.yaml").is_file() and json.loads((out / "base.json").read_text())["config_hash"] == cfg.hash()


def test_trial_locks_to_chance_and_recovers(trained):
    cfg, out, info = trained
    ctx = trial_context(cfg, out)
    weak, strong = grid(cfg)
    row, model, _ = run_trial(ctx, weak, torch.device("cpu"))
    assert row["status"] == "unlockable" and row["prun_acc"] > 0.2 and row["fine_acc"] is None and model is None
    row, model, masks = run_trial(ctx, strong, torch.device("cpu"))
    assert row["status"] == "ok" and row["locked_channels"] == round(0.35 * 320) and row["total_channels"] == 320
    assert row["prun_acc"] <= 0.2 and row["fine_acc"] > row["prun_acc"] + 0.3
    assert 0 < row["params"] < sum(p.numel() for p in model.parameters())


def test_trials_parquet_has_the_contract_schema(trained, tmp_path):
    cfg, out, info = trained
    rows = run_sequential(trial_context(cfg, out), grid(cfg), torch.device("cpu"))
    df = write_trials(rows, tmp_path / "trials.parquet")
    schema = pq.read_schema(tmp_path / "trials.parquet")
    assert [(f.name, str(f.type)) for f in schema] == [(f.name, str(f.type)) for f in TRIALS_SCHEMA]
    back = pd.read_parquet(tmp_path / "trials.parquet")
    assert list(back["status"]) == ["unlockable", "ok"] and back["fine_acc"].isna().tolist() == [True, False]
    assert back["trial_id"].tolist() == sorted(t.trial_id for t in grid(cfg))


def test_resume_keeps_the_base_unless_what_it_depends_on_changed(trained, tmp_path, capsys):
    cfg, out, info = trained
    import dataclasses
    import shutil
    for f in ("base.pt", "base.json", "config.yaml"):
        shutil.copy(out / f, tmp_path / f)
    before = (tmp_path / "base.pt").read_bytes()
    other_grid = dataclasses.replace(cfg, lock=dataclasses.replace(cfg.lock, values=[0.5]),
                                     data=dataclasses.replace(cfg.data, root="/elsewhere"))
    assert other_grid.hash() != cfg.hash() and other_grid.base_hash() == cfg.base_hash()
    assert train_stage(other_grid, tmp_path, resume=True) == json.loads((tmp_path / "base.json").read_text())
    assert "is up to date" in capsys.readouterr().err and (tmp_path / "base.pt").read_bytes() == before
    shorter = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1))
    again = train_stage(shorter, tmp_path, resume=True)
    assert again["epochs"] == 1 and again["base_hash"] == shorter.base_hash() != cfg.base_hash()


def test_git_sha_comes_from_the_environment_first(monkeypatch):
    """A `ray job submit` working dir has no .git: the submitter passes the commit as GRADAUTH_GIT_SHA."""
    from gradauth.pipeline import git_sha
    monkeypatch.setenv("GRADAUTH_GIT_SHA", "0123456789ab")
    assert git_sha() == "0123456789ab"
    monkeypatch.delenv("GRADAUTH_GIT_SHA")
    assert git_sha() != "0123456789ab"
