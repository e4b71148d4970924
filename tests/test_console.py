"""The console while a run goes: one live line per stage, Tune's output in DIR/sweep.log, --verbose for all of it."""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import yaml

from gradauth.console import EpochProgress, Progress, SweepProgress, duration, to_log

REPO = Path(__file__).resolve().parents[1]


def test_plain_log_gets_a_line_per_tenth_not_per_update():
    out = io.StringIO()
    p = Progress("sweep", out, every_s=3600, tty=False)
    for i in range(1001):
        p.update(i, 1000, f"{i}/1000")
    p.close("done")
    lines = out.getvalue().splitlines()
    assert lines[0] == "[sweep] 0/1000" and lines[-2] == "[sweep] 1000/1000" and lines[-1] == "[sweep] done"
    assert len(lines) == 12  # 0 %, 10 %, …, 100 %, and the closing line
    assert "\r" not in out.getvalue()


def test_terminal_line_is_rewritten_in_place_and_ends_with_one_newline():
    out = io.StringIO()
    p = Progress("train", out, tty=True)
    p.update(1, 3, "epoch 1/3 loss 1.5000")
    p.update(2, 3, "epoch 2/3", force=True)  # shorter: padded over the longer one
    p.close("epoch 3/3 done")
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    frames = text.rstrip("\n").split("\r")[1:]
    assert frames[0] == "[train] epoch 1/3 loss 1.5000"
    assert frames[1].rstrip() == "[train] epoch 2/3" and len(frames[1]) == len(frames[0])
    assert frames[2].startswith("[train] epoch 3/3 done")


def test_epoch_line_has_loss_and_eta():
    out = io.StringIO()
    e = EpochProgress(4, stream=out)
    e.line.tty = False
    for ep, loss in enumerate([2.0, 1.0, 0.5, 0.25]):
        e.epoch(ep, loss)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[train] epoch 1/4 loss 2.0000 ETA ")
    assert lines[-1].startswith("[train] epoch 4/4 loss 0.2500 ETA 0 s")


class _Log:  # what SweepProgress reads of rows.SweepLog: its states and rows, the counts and best it keeps
    def __init__(self, state, rows):
        self.state, self.rows = state, rows

    @property
    def counts(self):
        from collections import Counter
        return Counter(self.state.values())

    @property
    def best_ok(self):
        accs = [r["fine_acc"] for r in self.rows.values() if r["status"] == "ok" and r["fine_acc"] == r["fine_acc"]]
        return max(accs) if accs else None


def test_sweep_line_counts_states_and_best_so_far():
    state = {"a": "ok", "b": "degenerate", "c": "failed", "d": "running", "e": "pending", "f": "pending"}
    rows = {"a": {"status": "ok", "fine_acc": 0.91}, "b": {"status": "degenerate", "fine_acc": float("nan")}}
    out = io.StringIO()
    sp = SweepProgress(_Log(dict(state), rows), stream=out)
    assert sp.text().startswith("3/6 done (1 ok, 1 degenerate, 1 failed), 1 running, 2 pending, 0.0 trials/min, ETA ?")
    sp.log.state |= {"d": "ok", "e": "running"}
    rows["d"] = {"status": "ok", "fine_acc": 0.95}
    t = sp.text()
    assert t.startswith("4/6 done (2 ok, 1 degenerate, 1 failed), 1 running, 1 pending") and t.endswith("best fine-tuned 0.950")
    assert "ETA ?" not in t  # one trial finished since the start: a rate and an ETA


def test_durations():
    assert [duration(s) for s in (None, 5, 65, 7260)] == ["?", "5 s", "1m05s", "2h01m"]


def test_to_log_sends_prints_to_the_file(tmp_path):
    with to_log(tmp_path / "sweep.log"):
        print("a Tune table")
        print("a warning", file=sys.stderr)
    assert (tmp_path / "sweep.log").read_text() == "a Tune table\na warning\n"


@pytest.mark.ray
@pytest.mark.subprocess
def test_quickstart_like_run_fits_on_two_screens(tmp_path):
    """The whole pipeline through the CLI (one Ray run): the console holds one line per stage's progress, the
    level table and the keys, under 100 lines; Tune's tables are in DIR/sweep.log."""
    cfg = {"name": "console", "data": {"name": "digits", "crop_pad": 1, "flip": False},
           "model": {"arch": "vgg_tiny", "width": 1.0}, "train": {"epochs": 12, "lr": 0.05, "sparsity": 0.03},
           "lock": {"mode": "rate", "values": [0.2, 0.3, 0.35]},
           "finetune": {"epochs": [1, 2], "lr": [0.01], "seeds": [0, 1]},
           "sweep": {"lock_bound": 0.9, "resources": {"cpu": 1, "gpu": 0}, "max_concurrent": 2},
           "select": {"levels": 2, "min_gap": 0.01}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    env = os.environ | {"RAY_ADDRESS": "local", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("GRADAUTH_VERBOSE", None)
    r = subprocess.run([sys.executable, "-m", "gradauth", "run", str(tmp_path / "c.yaml"), "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    console = (r.stdout + r.stderr).splitlines()
    assert r.returncode == 0, "\n".join(console[-30:])
    assert len(console) < 100, "\n".join(console)
    assert sum(line.startswith("[train] epoch") for line in console) <= 12  # a line per tenth of the epochs
    sweep = [line for line in console if line.startswith("[sweep] ") and " done (" in line]
    assert sweep and sweep[-1].startswith("[sweep] 12/12 done (")
    assert not any("Trial status" in line or "╭" in line for line in console)  # no Tune table on the console
    log = (out / "sweep.log").read_text()
    assert "Trial status" in log
    # The flat driver: no full experiment snapshot forced per trial checkpoint (Ray 2.60 warns when it is)
    assert "snapshotting has been triggered" not in log
    assert any(line.startswith("level ") for line in console)  # the release's levels
    assert console[-1].startswith("[run] done")


def test_snapshot_period_grows_with_the_sweep_and_the_owner_setting_wins(monkeypatch):
    from gradauth.sweep import _state_period
    monkeypatch.delenv("TUNE_GLOBAL_CHECKPOINT_S", raising=False)
    seen = []
    for n in (36, 100, 1000, 10_000):
        with _state_period(n):
            seen.append(float(os.environ["TUNE_GLOBAL_CHECKPOINT_S"]))
    assert seen == [10.0, 10.0, 100.0, 1000.0] and "TUNE_GLOBAL_CHECKPOINT_S" not in os.environ
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "5")
    with _state_period(10_000):
        assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "5"
