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


def _results(out: Path):
    """{trial_id: [result lines]} from Tune's result.json files (what each trial reported, and from which pid)."""
    found = {}
    for p in sorted((out / "ray" / "sweep").glob("*/result.json")):
        lines = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
        if lines:
            found[TrialSpec(**lines[0]["config"]["trial"]).trial_id] = lines
    return found


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
        def observe():
            """Which node each process that reported a result runs on, looked up while it is alive."""
            res = _results(out)
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
            unfinished = {tid for tid, lines in res.items() if not lines[-1].get("row_complete")}
            # Kill a worker once trials have run on both (seen so far: result.json lags the trials by seconds, more
            # on a loaded machine, so "both busy at this instant" can be missed) and one of its trials is a few
            # checkpointed epochs in and has half of its epochs left: it must resume from there on the other.
            # (The window was epochs 3-33, ~8 s at the ~0.27 s/epoch four trials run at on two cores; half the
            # epochs leave as much again for result.json's lag after the kill's decision.)
            for tid in unfinished:
                last = res[tid][-1]
                node = cluster.node_of(last["pid"])
                if (set(node_by_pid.values()) == {"a", "b"} and node in ("a", "b")
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
    res = _results(out)
    ran_on = {tid: [node_by_pid.get(l["pid"]) for l in lines] for tid, lines in res.items()}
    # the sweep used both workers (None: a result line the driver wrote after its process was gone, e.g. the lost
    # node's last report, so its node could not be looked up)
    assert {n for nodes in ran_on.values() for n in nodes} - {None} == {"a", "b"}
    assert victim_trials and all([n for n in ran_on[tid] if n][-1] == survivor for tid in victim_trials)
    # The joined cluster declares GPUs, so the trials kept their half GPU (trial_resources) and Ray gave each one
    # a GPU id; torch finds no CUDA device behind it, so pick_device ran them on the CPU.
    for tid, lines in res.items():
        assert len(lines[-1]["gpu_ids"]) == 1 and lines[-1]["device"] == "cpu"
    for tid in victim_trials:
        # Resumed on the survivor from a checkpoint the trial had reached on the lost node: the lines since the
        # restore came from the survivor, the one at the restore point from the victim, and it is not epoch 0.
        last = res[tid][-1]
        since = last["iterations_since_restore"]
        assert last["row_complete"] and 1 <= since < last["training_iteration"], last
        restored_at = last["training_iteration"] - since
        assert set(ran_on[tid][-since:]) - {None} == {survivor}, ran_on[tid]
        # the checkpoint it resumed from was reached on the lost node (where result.json still has that line)
        assert all(n in (victim, None) for l, n in zip(res[tid], ran_on[tid]) if l["training_iteration"] == restored_at)

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
