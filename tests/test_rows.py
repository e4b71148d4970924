"""Rows written as trials finish (rows.SweepLog), `gradauth status` from those files only, degenerate locks.

The real Ray sweep killed mid-run and resumed is in tests/test_fault_tolerance.py; these tests run without Ray."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from gradauth.checkpoint import load_model_file, rebuild
from gradauth.cli import main
from gradauth.data import load_dataset
from gradauth.importance import bn_gamma
from gradauth.models import bn_layers, build_model
from gradauth.prune import lock_masks
from gradauth.rows import PARTS, PROGRESS, SweepLog, read_parts, read_progress
from gradauth.schema import thief_rows
from gradauth.status import sweep_status
from gradauth.trial import TrialContext, TrialSpec, degenerate_lock, run_trial

ROOT = Path(__file__).resolve().parents[1]


def _row(tid, status="ok", fine=0.5, seed=0, lock=0.1):
    return {"trial_id": tid, "dataset": "digits", "arch": "vgg_tiny", "num_classes": 10, "importance": "bn_gamma",
            "lock_mode": "rate", "lock_value": lock, "locked_channels": 3, "total_channels": 40, "ft_epochs": 1,
            "ft_lr": 0.01, "ft_data_fraction": 1.0, "ft_scope": "all", "seed": seed, "base_acc": 0.9,
            "prun_acc": 0.1, "fine_acc": fine if status == "ok" else None, "fine_top3": None, "params": 10,
            "flops": 100, "status": status, "seconds": 1.0, "git_sha": "x", "config_hash": "y"}


# --- degenerate locks ------------------------------------------------------------------------------------------

def test_a_lock_that_empties_a_conv_layer_is_degenerate_before_fine_tuning(tiny_cfg):
    from gradauth.checkpoint import ModelSpec
    ds = load_dataset(tiny_cfg.data, 0)
    torch.manual_seed(0)
    model = build_model("vgg_tiny", ds.num_classes, ds.in_channels, 1.0)
    bns = bn_layers(model)
    first = next(iter(bns))
    # scores that rank every channel of the first layer above all others: a rate equal to its share empties it
    scores = {n: (torch.full((b.num_features,), 10.0) if n == first else torch.rand(b.num_features))
              for n, b in bns.items()}
    total = sum(b.num_features for b in bns.values())
    rate = bns[first].num_features / total
    spec = ModelSpec("vgg_tiny", ds.num_classes, ds.in_channels, ds.image_size, 1.0, (0.0,), (1.0,))
    ctx = TrialContext(model.state_dict(), spec, {"bn_gamma": scores}, ds, 0.9, lock_bound=1.0)
    t = TrialSpec("bn_gamma", "rate", rate, 50, 0.01, 1.0, "all", 0)  # 50 epochs: would take minutes if it ran
    epochs = []
    row, model_out, masks = run_trial(ctx, t, torch.device("cpu"), on_epoch=lambda e, *_: epochs.append(e))
    assert epochs == [] and model_out is None  # not one epoch of fine-tuning
    assert row["status"] == "degenerate" and row["fine_acc"] is None
    assert row["locked_channels"] == bns[first].num_features and not masks[first].any()
    assert "every channel of " + first in degenerate_lock(model, masks, spec.example())
    # the whole network locked is degenerate too; one channel fewer in that layer is not
    everything = {n: torch.zeros_like(m) for n, m in masks.items()}
    assert "removes all" in degenerate_lock(model, everything, spec.example())
    masks[first][0] = True
    assert degenerate_lock(model, masks, spec.example()) is None


def test_an_emptied_layer_in_a_residual_stream_is_not_degenerate():
    model = build_model("resnet20", 10, 3, 0.5)
    masks = {n: torch.ones(b.num_features, dtype=torch.bool) for n, b in bn_layers(model).items()}
    masks["layers.0.bn2"][:] = False  # feeds the residual add: compact keeps it, masked
    assert degenerate_lock(model, masks, torch.zeros(2, 3, 32, 32)) is None
    masks["layers.0.bn1"][:] = False  # feeds only conv2: cannot be cut out
    assert "layers.0.bn1" in degenerate_lock(model, masks, torch.zeros(2, 3, 32, 32))


@pytest.mark.parametrize("name", ["quickstart", "quickstart-criteria", "cifar10-cpu", "cifar10-cpu-criteria",
                                  "cifar10-cpu-targeted"])
def test_no_committed_ok_row_becomes_degenerate(name):
    """The committed reference sweeps must reproduce: every ok |γ| row's lock is an ordinary one."""
    out = ROOT / "results" / name
    trials = pd.read_parquet(out / "trials.parquet")
    ok = trials[(trials.status == "ok") & (trials.importance == "bn_gamma")]
    ok = ok[~thief_rows(ok)]   # a thief attacks the public model, which may lock far more than a level can
    assert len(ok) > 0
    model, spec, _ = rebuild(load_model_file(out / "base.pt"))
    scores = bn_gamma(model)
    for r in ok.drop_duplicates(["lock_mode", "lock_value"]).itertuples():
        masks = lock_masks(scores, r.lock_mode, r.lock_value)
        assert int(sum((~m).sum() for m in masks.values())) == r.locked_channels
        assert degenerate_lock(model, masks, spec.example()) is None, r.trial_id


# --- rows and progress -----------------------------------------------------------------------------------------

def test_sweep_log_writes_each_row_and_its_model_at_once_and_compacts(tmp_path):
    ids = ["a", "b", "c"]
    log = SweepLog(tmp_path, "x", ids, kept={}, fresh=True, min_interval_s=0)
    assert read_progress(tmp_path)["trials"] == {"a": "pending", "b": "pending", "c": "pending"}
    log.started("a")
    log.started("b")
    assert log.finished(_row("a"), b"model-a")
    assert (tmp_path / "models" / "a.pt").read_bytes() == b"model-a"
    assert read_parts(tmp_path)["trial_id"].tolist() == ["a"]       # durable before the sweep ends
    assert read_progress(tmp_path)["trials"] == {"a": "ok", "b": "running", "c": "pending"}
    assert not log.finished(_row("a", fine=0.1), b"other")            # a re-reported trial changes nothing
    assert (tmp_path / "models" / "a.pt").read_bytes() == b"model-a"
    log.finished(_row("b", "degenerate"))
    df = log.compact([_row("c", "error")])
    assert df["status"].tolist() == ["ok", "degenerate", "error"]
    assert pd.read_parquet(tmp_path / "trials.parquet")["fine_acc"].tolist()[0] == 0.5
    assert not (tmp_path / PARTS).exists()
    assert read_progress(tmp_path)["trials"] == {"a": "ok", "b": "degenerate", "c": "failed"}


def test_progress_writes_are_throttled(tmp_path):
    log = SweepLog(tmp_path, "x", [f"t{i}" for i in range(100)], kept={}, fresh=True, min_interval_s=3600)
    before = (tmp_path / PROGRESS).read_bytes()
    for i in range(100):
        log.started(f"t{i}")
    assert (tmp_path / PROGRESS).read_bytes() == before              # nothing rewritten within the interval
    log.flush(force=True)
    assert set(read_progress(tmp_path)["trials"].values()) == {"running"}


def _status_dir(tmp_path, tiny_cfg, n):
    from gradauth.config import dump_config
    (tmp_path / "config.yaml").write_text(dump_config(tiny_cfg))
    ids = [f"t{i:05d}" for i in range(n)]
    log = SweepLog(tmp_path, "tiny", ids, kept={}, fresh=True, min_interval_s=3600)
    for i, t in enumerate(ids[: n // 2]):
        log.started(t)
        log.finished(_row(t, "error" if i % 10 == 0 else "ok", fine=0.9 - 0.1 * (i % 5), seed=i // 5,
                          lock=0.1 * (i % 5)))
    for t in ids[n // 2: n // 2 + 7]:
        log.started(t)
    log.flush(force=True)
    return ids


def test_status_counts_from_rows_and_progress_and_never_unpickles(tmp_path, tiny_cfg, capsys):
    ids = _status_dir(tmp_path, tiny_cfg, 40)
    # A results folder from someone else: Tune's experiment state and tuner.pkl planted with pickles that would
    # create a marker file if anything unpickled them.
    marker = tmp_path / "PWNED"
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    exp = tmp_path / "ray" / "sweep"
    exp.mkdir(parents=True)
    payload = pickle.dumps(Evil())
    (exp / "tuner.pkl").write_bytes(payload)
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(
        json.dumps({"trial_data": [[payload.hex(), payload.hex()]], "runner_data": payload.hex()}))
    s = sweep_status(tmp_path)
    assert (s["total"], s["done"], s["failed"], s["running"], s["pending"]) == (40, 18, 2, 7, 13)
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0].startswith("tiny: 18/40 trials done (18 ok), 7 running, 13 pending, 2 failed")
    assert out.err == ""
    # select and report read trials.parquet only: compacted, the folder still runs nothing
    import shutil
    from gradauth.rows import write_trials
    write_trials(read_parts(tmp_path).to_dict("records"), tmp_path / "trials.parquet")
    shutil.rmtree(tmp_path / PARTS)
    assert sweep_status(tmp_path)["done"] == 18
    main(["select", str(tmp_path)])
    main(["report", str(tmp_path)])
    assert not marker.exists()


@pytest.mark.subprocess
def test_status_at_thousands_of_trials_is_quick(tmp_path, tiny_cfg):
    _status_dir(tmp_path, tiny_cfg, 3000)  # 1,500 row parts
    code = "import sys; from gradauth.cli import main; main(['status', sys.argv[1]])"
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                       env=os.environ | {"PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("tiny: 1350/3000 trials done (1350 ok), 7 running, 1493 pending, 150 failed")
    assert len(r.stdout.splitlines()) < 20
    # what makes it quick: 1,500 rows in 15 chunk files, not 1,500 parts; and neither torch nor Ray is imported
    assert len(list((tmp_path / PARTS).iterdir())) == 15
    code = "import sys; from gradauth.status import sweep_status; sweep_status(__import__('pathlib').Path(sys.argv[1]));" \
           "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                       env=os.environ | {"PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.stdout.strip() == "[]", r.stderr


def test_select_treats_degenerate_rows_like_other_unfinished_rows(tmp_path):
    from gradauth.rows import write_trials
    from gradauth.select import select_dir
    rows = [_row(f"ok{i}", fine=0.9 - 0.2 * i, seed=0, lock=0.1 * (i + 1)) for i in range(3)]
    rows += [_row("deg", "degenerate", lock=0.9)]
    write_trials(rows, tmp_path / "trials.parquet")
    sel = select_dir(tmp_path, defaults={"levels": 2, "min_gap": 0.05, "max_locked_acc": 0.2, "experiment": "x"})
    assert "deg" not in {t for lv in sel.levels for t in lv["trial_ids"]}
    why = {r["trial_id"]: r for r in sel.rejected}["deg"]
    assert why["kind"] == "status" and "degenerate" in why["why"]


@pytest.mark.parametrize("how", ["group-writable", "symlink"])
def test_resume_refuses_an_experiment_others_could_have_written(tmp_path, tiny_cfg, how):
    import dataclasses

    import ray

    from gradauth.errors import GradauthError
    from gradauth.sweep import _write_points, check_trusted_storage, run_sweep
    from gradauth.trial import grid
    storage = tmp_path / "shared"
    cfg = dataclasses.replace(tiny_cfg, sweep=dataclasses.replace(tiny_cfg.sweep, storage=str(storage)))
    exp = storage / "sweep"
    exp.mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(b"not read")
    _write_points(str(storage), sorted(t.trial_id for t in grid(cfg)))
    check_trusted_storage(str(exp))  # the owner's own 0755/0644 storage passes
    if how == "group-writable":
        os.chmod(exp / "tuner.pkl", 0o664)
    else:
        (exp / "experiment_state-x.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(GradauthError, match=r"--resume would unpickle Tune's state from it"):
        run_sweep(cfg, None, tmp_path / "out", resume=True)  # refused before Ray starts or anything is written
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["part", "progress"])
def test_status_refuses_a_damaged_row_or_progress_file_in_one_line(tmp_path, tiny_cfg, capsys, damage):
    _status_dir(tmp_path, tiny_cfg, 6)
    if damage == "part":
        (tmp_path / PARTS / "t00000.parquet").write_bytes(b"PAR1 not really")
    else:
        (tmp_path / PROGRESS).write_text(json.dumps({"total": 6, "trials": {"t00000": "exploded"}}))
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and ("damaged row file" if damage == "part" else "not a gradauth progress") in err


@pytest.mark.parametrize("name", ["quickstart", "cifar10-cpu", "cifar10-cpu-targeted", "quickstart-synapse",
                                  "cifar10-cpu-nnapps"])
def test_status_reads_every_committed_reference(name, capsys):
    """A committed folder (no progress.json, rows written before a later knob such as lock_granularity existed):
    `status` answers with every row counted once, the knob read as its default."""
    out = ROOT / "results" / name
    n = len(pd.read_parquet(out / "trials.parquet"))
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{name}: {n}/{n} trials done" in text
    # its level table is the committed levels.json (a targeted run: the set nearest the search's targets, thieves
    # beaten), not another selection
    for lv in json.loads((out / "levels.json").read_text())["levels"]:
        assert f"{lv['fine_acc']:.3f} ± {lv['fine_acc_std']:.3f}" in text
