"""A spot node lost mid-sweep, rehearsed on one machine: a head and two worker nodes on 127.0.0.1 (separate raylets,
`ray start --address` as on a real cluster), each worker declaring one GPU, and the sweep's driver joining the head
through RAY_ADDRESS as `ray job submit` would. Trials ask for half a GPU each: torch sees no CUDA here, so they run
on the CPU, but Ray schedules them by the GPUs the nodes declare, so two trials fill a worker and four spread over
both. One worker node is SIGKILLed (its raylet's process group and the trial workers it started) while its trials
are half way through fine-tuning; they must finish on the other worker from their last checkpoints, every grid point exactly once in trials.parquet, with the same
numbers and weights as the same trials run undisturbed.
"""
from __future__ import annotations

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

from gradauth.checkpoint import from_bytes, rebuild, to_bytes
from gradauth.config import load_config
from gradauth.pipeline import train_stage, trial_context
from gradauth.trial import TrialSpec, grid, run_trial

from localcluster import NO_CUDA, LocalCluster

pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("cluster")]  # no other Ray test beside it: conftest.py

EPOCHS = 100  # long enough that trials still run on both workers when the kill comes, on an idle machine too
CFG = {
    "name": "mn", "data": {"name": "digits", "crop_pad": 1, "flip": False},
    "model": {"arch": "vgg_tiny", "width": 1.0}, "train": {"epochs": 12, "lr": 0.05, "sparsity": 0.03},
    "lock": {"mode": "rate", "values": [0.35]},
    "finetune": {"epochs": [EPOCHS], "lr": [0.005], "data_fraction": [0.5], "seeds": [0, 1, 2, 3]},
    # {cpu: 1, gpu: 0.5}: a worker of {CPU: 2, GPU: 1} holds two trials, so four running trials use both workers.
    "sweep": {"lock_bound": 0.3, "resources": {"cpu": 1, "gpu": 0.5}, "checkpoint_every": 1,
              "checkpoint_min_s": 0, "max_failures": 2},
}
COMPARED = ["status", "locked_channels", "total_channels", "prun_acc", "fine_acc", "fine_top3", "params", "flops",
            "base_acc"]


class Reports:
    """Every result line each trial reported, and from which pid, read live from the driver's own copies of Tune's
    result.json files (its staging dir in the head's session folder, appended as each result arrives).

    Not the copies in the storage folder: the driver syncs those only now and then, so they lag the trials by
    seconds. A decision taken from them can come after the trials ended, and a line that shows up there late can
    name a process already gone, whose node can no longer be looked up. Restoring a trial copies the storage copy
    back over the staging one (Tune's `_restore_from_remote`), which can drop lines not yet synced: a file that
    shrank is read again from the start, and lines seen once are kept here whatever happens to the file.
    """

    def __init__(self, session_root: str):
        self.root = Path(session_root)
        self.lines: dict[str, list[dict]] = {}  # trial id -> lines in the order first seen, one per (pid, iteration)
        self._keys: set[tuple] = set()
        self._read_to: dict[Path, int] = {}  # bytes of each file already read: only what is appended is parsed

    def read(self) -> dict[str, list[dict]]:
        # session_2*: not session_latest, a link to the same folder
        for p in sorted(self.root.glob("session_2*/artifacts/*/*/driver_artifacts/*/result.json")):
            try:
                with p.open("rb") as f:
                    start = self._read_to.get(p, 0)
                    if os.fstat(f.fileno()).st_size < start:  # rewritten from the storage copy: a trial restored
                        start = 0
                    f.seek(start)
                    data = f.read()
            except OSError:  # replaced or removed while read
                continue
            whole = data.rfind(b"\n") + 1  # whole lines only: the driver may be writing the next one
            self._read_to[p] = start + whole
            for raw in data[:whole].splitlines():
                line = json.loads(raw)
                tid = TrialSpec(**line["config"]["trial"]).trial_id
                key = (tid, line["pid"], line["training_iteration"])
                if key not in self._keys:
                    self._keys.add(key)
                    self.lines.setdefault(tid, []).append(line)
        return self.lines


def test_node_loss_on_a_two_worker_cluster(tmp_path):
    cluster = LocalCluster(tmp_path)
    t0 = time.time()

    def stamp(what):  # in a failure's captured output: how far it got, and when
        print(f"[{time.time() - t0:5.1f} s] {what}", file=sys.stderr)

    driver, victim, node_by_pid = None, None, {}
    try:
        # A driver-only head, as cluster.yaml's (no CPU: no trial lands there), then two GPU workers.
        cluster.start_head(num_cpus=0, num_gpus=0)
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(CFG))
        cfg = load_config(tmp_path / "c.yaml")
        out = tmp_path / "out"
        train_stage(cfg, out)  # while the head boots
        stamp("trained")
        cluster.wait_up("head")
        for name in ("a", "b"):  # one after the other: see LocalCluster.add_worker
            cluster.add_worker(name, num_cpus=2, num_gpus=1, env=NO_CUDA)  # CPU trials, comparable bit for bit
            cluster.wait_up(name)
        stamp("cluster up")

        driver = subprocess.Popen([sys.executable, "-m", "gradauth", "sweep", str(tmp_path / "c.yaml"), "--out", str(out)],
                                  env=cluster.driver_env(), stdout=subprocess.DEVNULL,
                                  stderr=(tmp_path / "driver.log").open("w"), start_new_session=True)
        reports = Reports(cluster.temp_dir)

        def observe():
            """Every line reported so far, and which node each reporting process runs on, looked up while it is
            alive (a trial's worker lives as long as the trial, so every pid is seen alive at least once)."""
            res = reports.read()
            for tid, lines in res.items():
                for pid in {l["pid"] for l in lines} - set(node_by_pid):
                    node = cluster.node_of(pid)
                    if node in ("a", "b"):
                        node_by_pid[pid] = node
            return res

        deadline = time.time() + 300
        while victim is None:
            assert time.time() < deadline, "no trial reached a checkpoint on both workers in time"
            res = observe()
            gone = {n: cluster.nodes[n].poll() for n in ("a", "b") if cluster.nodes[n].poll() is not None}
            assert not gone, (f"worker node(s) ended by themselves before the kill (exit codes {gone}): their raylet "
                              f"and agent logs are in {tmp_path / 'ray-logs'}")
            assert driver.poll() is None, (
                (tmp_path / "driver.log").read_text()[-2000:] + "\nseen: " + "; ".join(
                    f"{tid[-6:]} epoch {ls[-1].get('epoch')} on {node_by_pid.get(ls[-1]['pid'])} "
                    f"complete {ls[-1].get('row_complete')} lines {len(ls)}" for tid, ls in res.items()))
            # Kill a worker once trials have run on both and one of its trials is a few checkpointed epochs in with
            # at least half of its epochs left: it must resume from there on the other. (At the ~0.27 s/epoch four
            # trials run at on two cores, the window of epochs 3-50 is ~13 s.)
            for tid, lines in res.items():
                last = lines[-1]
                node = cluster.node_of(last["pid"])
                if (set(node_by_pid.values()) == {"a", "b"} and node in ("a", "b") and not last.get("row_complete")
                        and 3 <= last.get("epoch", 0) <= EPOCHS // 2
                        and list((out / "ray" / "sweep" / tid).glob("checkpoint_*"))):
                    victim = node
                    break
            time.sleep(0.1)
        survivor = ({"a", "b"} - {victim}).pop()
        res = observe()  # every pid reported so far is known before the node and its pids go
        victim_trials = {tid for tid, lines in res.items()
                         if not lines[-1].get("row_complete") and node_by_pid.get(lines[-1]["pid"]) == victim}
        cluster.kill_node(victim)
        stamp(f"killed node {victim} with {sorted(victim_trials)} on it")
        t_kill = time.time()
        while cluster.node_pids(victim) and time.time() - t_kill < 5:
            time.sleep(0.05)
        assert not cluster.node_pids(victim)  # the whole node is gone: raylet, agents, trial workers
        while driver.poll() is None:
            observe()
            time.sleep(0.1)
        res = observe()
        assert driver.returncode == 0, (tmp_path / "driver.log").read_text()[-3000:]
        stamp("sweep done")
    finally:
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        left = cluster.stop()
    assert not left, f"processes of the test cluster still alive: {left}"

    df = pd.read_parquet(out / "trials.parquet")
    specs = grid(cfg)
    assert sorted(df["trial_id"]) == sorted(t.trial_id for t in specs) and df["trial_id"].is_unique
    assert (df["status"] == "ok").all()
    assert sorted(res) == sorted(df["trial_id"])
    ran_on = {tid: [node_by_pid.get(l["pid"]) for l in lines] for tid, lines in res.items()}
    # the sweep used both workers (None: a line whose process was gone before it was seen, so its node could not
    # be looked up)
    assert {n for nodes in ran_on.values() for n in nodes} - {None} == {"a", "b"}
    # The joined cluster declares GPUs, so the trials kept their half GPU (trial_resources) and Ray gave each one
    # a GPU id; torch finds no CUDA device behind it, so pick_device ran them on the CPU.
    for tid, lines in res.items():
        assert lines[-1]["row_complete"], (tid, lines[-1])
        assert len(lines[-1]["gpu_ids"]) == 1 and lines[-1]["device"] == "cpu"
    assert victim_trials
    for tid in victim_trials:
        # Resumed on the survivor from a checkpoint the trial had reached on the lost node: the lines since the
        # restore came from the survivor, the one at the restore point from the victim, and it is not epoch 0.
        last = res[tid][-1]
        since = last["iterations_since_restore"]
        assert 1 <= since < last["training_iteration"], last
        restored_at = last["training_iteration"] - since
        resumed = [n for l, n in zip(res[tid], ran_on[tid]) if l["pid"] == last["pid"]]
        assert len(resumed) == since and set(resumed) == {survivor}, ran_on[tid]
        assert [n for l, n in zip(res[tid], ran_on[tid]) if l["training_iteration"] == restored_at] == [victim], \
            ran_on[tid]

    # The resumed trials are identical to the same trials run undisturbed, one after the other in this process, on
    # one thread as the trials were: every number of the row and every weight of the saved model. (The trials that
    # never moved ran undisturbed already; re-running them too cost ~10 s of CPU and compared like with like.)
    ctx = trial_context(cfg, out)
    torch.set_num_threads(1)
    try:
        for t in (t for t in specs if t.trial_id in victim_trials):
            row, model, masks = run_trial(ctx, t, torch.device("cpu"))
            got = df.set_index("trial_id").loc[t.trial_id]
            for c in COMPARED:
                assert got[c] == row[c], (t.trial_id, c, got[c], row[c])
            saved, _, _ = rebuild(from_bytes((out / "models" / f"{t.trial_id}.pt").read_bytes()))
            ref, _, _ = rebuild(from_bytes(to_bytes(model.cpu(), ctx.spec, masks)))
            for (k, a), (k2, b) in zip(saved.state_dict().items(), ref.state_dict().items(), strict=True):
                assert k == k2 and torch.equal(a, b), (t.trial_id, k)
    finally:
        torch.set_num_threads(2)
