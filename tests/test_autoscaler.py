"""The autoscaler, rehearsed on one machine with cluster/fake-autoscaler.yaml (cluster.yaml's node types behind Ray's
fake multi-node provider): a sweep's pending fractional-GPU trials make the autoscaler add GPU workers up to the pool's
max_workers (and spill the rest to the 4-GPU type, as on AWS when the g5.2xlarge pool is full), no CPU-only slicing
worker is started for them, and once the sweep is over the idle workers go away after the idle timeout, down to the
pool's min_workers, without a trial failing on the way.

The first test checks offline that the rehearsal file keeps cluster.yaml's node types, so the rehearsal cannot drift
from the cluster it stands for.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from ray.autoscaler._private.util import validate_config

from gradauth.config import load_config
from gradauth.pipeline import train_stage
from gradauth.trial import grid

from localcluster import ROOT, LocalCluster, free_ports

REHEARSAL, AWS = ROOT / "cluster" / "fake-autoscaler.yaml", ROOT / "cluster.yaml"


def _workers(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def test_rehearsal_mirrors_cluster_yaml():
    fake, aws = yaml.safe_load(REHEARSAL.read_text()), yaml.safe_load(AWS.read_text())
    validate_config(copy.deepcopy(fake))  # Ray's schema and cross-field checks, as `ray start --autoscaling-config`
    assert fake["provider"]["type"] == "fake_multinode"
    assert set(_workers(fake)) == set(_workers(aws))
    for name, node in _workers(fake).items():
        real = _workers(aws)[name]
        declared = {k: v for k, v in node["resources"].items() if k != "object_store_memory"}
        assert declared == real["resources"], name  # what the autoscaler packs trials by
        assert node["min_workers"] == real["min_workers"], name
        assert 1 <= node["max_workers"] <= real["max_workers"], name
    head = fake["available_node_types"][fake["head_node_type"]]
    assert head["resources"] == aws["available_node_types"][aws["head_node_type"]]["resources"] == {"CPU": 0}
    assert fake["max_workers"] == sum(n["max_workers"] for n in _workers(fake).values())


# A watcher that joins the cluster and writes every alive node's CPU/GPU resources twice a second (JSON lines).
WATCH = """
import json, sys, time, ray
ray.init(logging_level="ERROR")
with open(sys.argv[1], "a") as f:
    while True:
        nodes = [[n["NodeID"], n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0)]
                 for n in ray.nodes() if n["Alive"]]
        f.write(json.dumps([time.time(), nodes]) + "\\n")
        f.flush()
        time.sleep(0.5)
"""

CFG = {
    "name": "as", "data": {"name": "digits", "crop_pad": 1, "flip": False},
    "model": {"arch": "vgg_tiny", "width": 1.0}, "train": {"epochs": 6, "lr": 0.05, "sparsity": 0.03},
    "lock": {"mode": "rate", "values": [0.3]},
    "finetune": {"epochs": [1], "lr": [0.005], "data_fraction": [0.5], "seeds": list(range(9))},
    # The VGG-19 sweep's trial shape, {cpu: 2, gpu: 0.25}: a ray.worker.gpu node (8 CPUs, 1 GPU) holds four. Of 9
    # trials the min_workers node takes 4; for the 5 pending ones the autoscaler adds the pool's second node (its
    # max_workers) and, the pool being full, a ray.worker.gpu4 for the last one. lock_bound 1: every trial
    # fine-tunes (none ends at once as unlockable).
    "sweep": {"lock_bound": 1.0, "resources": {"cpu": 2, "gpu": 0.25}, "checkpoint_min_s": 60},
}


@pytest.mark.ray
@pytest.mark.xdist_group("cluster")
def test_pending_gpu_trials_scale_gpu_workers_up_then_idle_ones_down(tmp_path):
    rehearsal = yaml.safe_load(REHEARSAL.read_text())
    types = {name: (node["resources"].get("CPU", 0), node["resources"].get("GPU", 0))
             for name, node in _workers(rehearsal).items()}
    assert len(set(types.values())) == len(types)  # each type known by its resources
    kind = {v: k for k, v in types.items()}

    cluster = LocalCluster(tmp_path)
    t0 = time.time()

    def stamp(what):  # in a failure's captured output: how far it got, and when
        print(f"[{time.time() - t0:5.1f} s] {what}", file=sys.stderr)

    watch_log = tmp_path / "nodes.jsonl"

    def counts(line) -> dict[str, int]:
        found: dict[str, int] = {}
        for _, cpu, gpu in line[1]:
            k = kind.get((cpu, gpu), "head" if (cpu, gpu) == (0, 0) else f"unknown {cpu}/{gpu}")
            found[k] = found.get(k, 0) + 1
        return found

    def history() -> list:
        return [json.loads(l) for l in watch_log.read_text().splitlines() if l.strip()] if watch_log.exists() else []

    def wait_for(pred, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = history()
            if h and pred(counts(h[-1])):
                return h
            assert cluster.nodes["head"].poll() is None, cluster.log("head")[-3000:]
            assert watcher.poll() is None, (tmp_path / "watch.log").read_text()[-3000:]
            time.sleep(0.5)
        raise TimeoutError(f"{what} not seen in {timeout} s; last: {counts(history()[-1]) if history() else None}")

    watcher = driver = None
    try:
        port = free_ports(1)[0]  # the fake nodes join the head's GCS at the address the config names
        rehearsal["provider"]["gcs_address"] = f"127.0.0.1:{port}"
        (tmp_path / "autoscaler.yaml").write_text(yaml.safe_dump(rehearsal))
        cluster.start_head(num_cpus=0, num_gpus=0, autoscaling_config=tmp_path / "autoscaler.yaml", port=port,
                           env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(CFG))
        cfg = load_config(tmp_path / "c.yaml")
        out = tmp_path / "out"
        train_stage(cfg, out)  # while the head boots
        stamp("trained")
        cluster.wait_up("head")
        watcher = subprocess.Popen([sys.executable, "-c", WATCH, str(watch_log)], env=cluster.driver_env(),
                                   stdout=subprocess.DEVNULL, stderr=(tmp_path / "watch.log").open("w"),
                                   start_new_session=True)
        # min_workers: the autoscaler starts the pool's one GPU worker by itself, as `ray up` would.
        wait_for(lambda c: c == {"head": 1, "ray.worker.gpu": 1}, 180, "the min_workers GPU worker")
        stamp("min_workers up")

        driver = subprocess.Popen([sys.executable, "-m", "gradauth", "sweep", str(tmp_path / "c.yaml"), "--out", str(out)],
                                  env=cluster.driver_env(), stdout=subprocess.DEVNULL,
                                  stderr=(tmp_path / "driver.log").open("w"), start_new_session=True)
        assert driver.wait(timeout=400) == 0, (tmp_path / "driver.log").read_text()[-3000:]
        t_end = time.time()
        stamp("sweep done")
        during = [counts(l) for l in history()]
        # No trial failed on the way (e.g. placed on a node the autoscaler took for idle as it came up).
        assert "Trial task failed" not in (tmp_path / "driver.log").read_text()
        # Idle workers go, down to min_workers (the timeout is 30 s; a node's drain and the next update add a few).
        wait_for(lambda c: c == {"head": 1, "ray.worker.gpu": 1}, 120, "the scale-down to min_workers")
        stamp(f"scaled down {time.time() - t_end:.1f} s after the sweep")
    finally:
        for p in (driver, watcher):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        left = cluster.stop()
    assert not left, f"processes of the test cluster still alive: {left}"

    peak = {k: max(c.get(k, 0) for c in during) for k in types}
    # The GPU pool grew to its max_workers and no further; the rest of the demand went to the 4-GPU type; the
    # CPU-only slicing workers were never started for GPU trials.
    assert peak == {"ray.worker.gpu": 2, "ray.worker.gpu4": 1, "ray.worker.cpu": 0}, peak
    assert not any(k.startswith("unknown") for c in during for k in c)
    df = pd.read_parquet(out / "trials.parquet")
    assert sorted(df["trial_id"]) == sorted(t.trial_id for t in grid(cfg)) and (df["status"] == "ok").all()


def _nodes_added(cfg: dict, existing: dict, pending: int, shape: dict) -> dict:
    """What Ray's autoscaler (v1, its own bin packing and node-type scorer) adds for `pending` trials of `shape`."""
    from functools import partial

    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for
    types = {k: {"resources": dict(v["resources"]), "max_workers": v.get("max_workers", 0)}
             for k, v in cfg["available_node_types"].items()}
    add, _ = get_nodes_for(types, existing, cfg["head_node_type"], 100, [shape] * pending,
                           partial(_default_utilization_scorer, node_availability_summary=None))
    return dict(add)


def test_which_gpu_workers_the_autoscaler_adds():
    """The autoscaler's choice, computed offline by its own code, for the rehearsal (what the live test above sees)
    and for cluster.yaml. Which type it adds depends on how many trials wait: it scores each type by how full one
    node of it would be, weighting each resource by its amount, so a big pending queue fills a g5.12xlarge
    (ray.worker.gpu4) better than a g5.2xlarge and gets it first."""
    vgg = {"CPU": 2, "GPU": 0.25}  # sweeps/cifar10-vgg19.yaml's trial
    fake, aws = yaml.safe_load(REHEARSAL.read_text()), yaml.safe_load(AWS.read_text())
    # The live test: 9 trials, 4 on the min_workers node, 5 waiting.
    assert _nodes_added(fake, {"ray.head.default": 1, "ray.worker.gpu": 1}, 5, vgg) == \
        {"ray.worker.gpu": 1, "ray.worker.gpu4": 1}
    running = {"ray.head.cpu": 1, "ray.worker.gpu": 1}  # cluster.yaml's min_workers, 4 trials on it
    assert _nodes_added(aws, running, 8, vgg) == {"ray.worker.gpu": 2}
    assert _nodes_added(aws, running, 16, vgg) == {"ray.worker.gpu4": 1}  # not four more g5.2xlarge
    assert _nodes_added(aws, running, 92, vgg) == {"ray.worker.gpu4": 2, "ray.worker.gpu": 7}  # the whole sweep
