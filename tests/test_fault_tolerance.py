"""Real processes killed mid-sweep: a trial's worker (resumes from its checkpoint) and the driver (`--resume`)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from gradauth.config import load_config
from gradauth.pipeline import trial_context
from gradauth.rows import PARTS, read_parts
from gradauth.status import sweep_status
from gradauth.trial import degenerate_lock, grid, locked_model, run_trial

from conftest import with_base
from localcluster import cmdline, session_pids

# Real `gradauth sweep` processes, each starting its own Ray.
pytestmark = [pytest.mark.ray, pytest.mark.subprocess, pytest.mark.xdist_group("cluster")]

CFG = {
    "name": "ft", "data": {"name": "digits", "crop_pad": 1, "flip": False},
    "model": {"arch": "vgg_tiny", "width": 1.0}, "train": {"epochs": 12, "lr": 0.05, "sparsity": 0.03},
    "lock": {"mode": "rate", "values": [0.35]},
    # The kill is decided from the trial's own checkpoints, which its worker writes into the storage folder as it
    # goes, so it lands within an epoch or two of the third one; 24 epochs leave the rest for after the restore.
    # (Tune's result.json lags the trial by seconds: deciding from it, the kill came at epoch ~37 on an idle machine,
    # and the trial needed 200 epochs to be sure of outliving it.)
    "finetune": {"epochs": [24], "lr": [0.005], "seeds": [0]},
    "sweep": {"lock_bound": 0.3, "resources": {"cpu": 1, "gpu": 0}, "checkpoint_every": 1, "checkpoint_min_s": 0,
              "max_failures": 2},
}


def _env():
    # RAY_ADDRESS=local: the sweep starts its own Ray, never one that happens to be running here.
    return os.environ | {"RAY_ADDRESS": "local", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _sweep(cfg_path, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "gradauth", "sweep", str(cfg_path), "--out", str(out), *extra],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _results(out):
    for p in sorted((out / "ray" / "sweep").glob("*/result.json")):
        lines = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
        yield p.parent, lines


def _wait(pred, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        found = pred()
        if found:
            return found
        time.sleep(0.05)
    raise TimeoutError


@pytest.fixture(scope="module")
def setup(half_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    (d / "c.yaml").write_text(yaml.safe_dump(CFG))
    cfg = load_config(d / "c.yaml")
    with_base(half_base[1], d / "out", cfg)  # the session's half-width base: CFG trains the same one
    return d, cfg


def test_killed_trial_worker_resumes_from_its_checkpoint(setup):
    d, cfg = setup
    out = d / "out"
    proc = _sweep(d / "c.yaml", out)

    def checkpointed_worker():
        """The trial's worker process once it has written its third checkpoint: Tune has taken the first two by then
        (a function trainable's report waits for the driver), so it resumes from one of them."""
        for trial_dir in (out / "ray" / "sweep").glob("*/"):
            if max((int(c.name.rsplit("_", 1)[1]) for c in trial_dir.glob("checkpoint_*")), default=-1) >= 2:
                # the sweep runs in a session of its own; the trial's actor is titled ray::ImplicitFunc.train while
                # a train() call runs and ray::ImplicitFunc between calls (after each report, until the driver asks
                # for the next result)
                workers = [pid for pid in session_pids(proc.pid) if cmdline(pid).startswith(b"ray::ImplicitFunc")]
                assert len(workers) == 1, workers
                return workers[0]
    pid = _wait(checkpointed_worker)
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    df = pd.read_parquet(out / "trials.parquet")
    assert df["status"].tolist() == ["ok"]
    (trial_dir, lines), = list(_results(out))
    last = lines[-1]
    assert last["row_complete"] and last["iterations_since_restore"] < last["training_iteration"]  # resumed, not restarted
    # and the resumed trial equals an uninterrupted one exactly: batches and lr are pure functions of (seed, epoch, step)
    torch.set_num_threads(1)
    row, _, _ = run_trial(trial_context(cfg, out), grid(cfg)[0], torch.device("cpu"))
    torch.set_num_threads(2)
    assert df["fine_acc"].iloc[0] == pytest.approx(row["fine_acc"], abs=1e-9)


def test_killed_driver_keeps_its_rows_and_resume_reruns_none(setup, tmp_path):
    d, cfg = setup
    raw = CFG | {"lock": {"mode": "rate", "values": [0.3, 0.4, 0.99]},
                 "finetune": {"epochs": [6, 12], "lr": [0.005], "seeds": [0, 1]},
                 "sweep": CFG["sweep"] | {"checkpoint_min_s": 5}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    out.mkdir()
    for f in ("base.pt", "base.json"):
        (out / f).write_bytes((d / "out" / f).read_bytes())
    specs = grid(load_config(tmp_path / "c.yaml"))
    ctx = trial_context(cfg, d / "out")
    degenerate = [t for t in specs if t.lock_value == 0.99]
    model, masks = locked_model(ctx, degenerate[0])
    assert degenerate_lock(model, masks, ctx.spec.example())  # 99 % locked empties conv layers of this model
    proc = _sweep(tmp_path / "c.yaml", out)

    def some_rows():  # rows are on disk while the sweep runs, one part per finished trial
        if (out / PARTS).is_dir():
            return bool((read_parts(out)["status"] == "ok").sum() >= 3)
    _wait(some_rows, timeout=240)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, at once
    proc.wait()
    assert not (out / "trials.parquet").exists()
    before = read_parts(out).set_index("trial_id")  # everything on disk at the kill, read again after it
    assert (before["status"] == "ok").sum() >= 3
    models = {t: (out / "models" / f"{t}.pt").stat().st_mtime_ns for t in before.index[before.status == "ok"]}
    s = sweep_status(out)  # the killed folder, from its own files
    assert s["total"] == 12 and s["done"] + s["failed"] == len(before) and s["done"] + s["running"] + s["pending"] == 12
    proc = _sweep(tmp_path / "c.yaml", out, "--resume")
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert f"[sweep] --resume: {len(before)} of 12 grid points already finished" in err.decode()
    assert "[sweep] resuming" in err.decode()  # Tune's experiment restored: unfinished trials keep their checkpoints
    df = pd.read_parquet(out / "trials.parquet")
    assert sorted(df["trial_id"]) == sorted(t.trial_id for t in specs)
    assert not (out / PARTS).exists()
    # no finished trial trained again: its row (to the second it took) and its model file are exactly as before
    after = df.set_index("trial_id").loc[before.index]
    pd.testing.assert_frame_equal(after, before, check_like=True, check_dtype=False)
    assert {t: (out / "models" / f"{t}.pt").stat().st_mtime_ns for t in models} == models
    # degenerate locks: their own status, not fine-tuned, never retried (one report, no error, no recovery)
    deg = df[df["lock_value"] == 0.99]
    assert set(deg["status"]) == {"degenerate"} and deg["fine_acc"].isna().all()
    assert set(df.loc[df["lock_value"] != 0.99, "status"]) <= {"ok", "unlockable"}
    for trial_dir, lines in _results(out):
        if "rate0.99" in trial_dir.name:
            assert not (trial_dir / "error.txt").exists() and lines[-1]["status"] == "degenerate"
            assert [l for l in lines if l.get("row_complete")] == lines[-1:] and lines[-1]["iterations_since_restore"] == 1
    s = sweep_status(out)
    assert (s["done"], s["running"], s["pending"], s["failed"]) == (12, 0, 0, 0)
