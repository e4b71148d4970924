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
from gradauth.pipeline import train_stage, trial_context
from gradauth.trial import TrialSpec, grid, run_trial

CFG = {
    "name": "ft", "data": {"name": "digits", "crop_pad": 1, "flip": False},
    "model": {"arch": "vgg_tiny", "width": 1.0}, "train": {"epochs": 12, "lr": 0.05, "sparsity": 0.03},
    "lock": {"mode": "rate", "values": [0.35]},
    "finetune": {"epochs": [15], "lr": [0.005], "seeds": [0]},
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
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    (d / "c.yaml").write_text(yaml.safe_dump(CFG))
    cfg = load_config(d / "c.yaml")
    train_stage(cfg, d / "out")
    return d, cfg


def test_killed_trial_worker_resumes_from_its_checkpoint(setup):
    d, cfg = setup
    out = d / "out"
    proc = _sweep(d / "c.yaml", out)

    def checkpointed_worker():
        for trial_dir, lines in _results(out):
            if any(l.get("epoch", 0) >= 3 for l in lines) and list(trial_dir.glob("checkpoint_*")):
                return lines[-1]["pid"]
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


def test_killed_driver_is_finished_by_resume(setup, tmp_path):
    d, _ = setup
    raw = CFG | {"lock": {"mode": "rate", "values": [0.3, 0.4]},
                 "finetune": {"epochs": [6, 12], "lr": [0.005], "seeds": [0, 1]},
                 "sweep": CFG["sweep"] | {"checkpoint_min_s": 5}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    out.mkdir()
    for f in ("base.pt", "base.json"):
        (out / f).write_bytes((d / "out" / f).read_bytes())
    proc = _sweep(tmp_path / "c.yaml", out)

    def some_done():
        done = [ls[-1] for _, ls in _results(out) if ls and ls[-1].get("row_complete")]
        return done if len(done) >= 3 else None
    before = {TrialSpec(**r["config"]["trial"]).trial_id: r for r in _wait(some_done)}
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    proc.wait()
    assert not (out / "trials.parquet").exists()
    proc = _sweep(tmp_path / "c.yaml", out, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    df = pd.read_parquet(out / "trials.parquet")
    assert len(df) == 8 and df["trial_id"].is_unique
    assert sorted(df["trial_id"]) == sorted(t.trial_id for t in grid(load_config(tmp_path / "c.yaml")))
    for tid, r in before.items():  # finished trials keep exactly their results
        got = df.set_index("trial_id").loc[tid]
        assert got["status"] == r["status"] and (r["fine_acc"] is None or got["fine_acc"] == r["fine_acc"])
