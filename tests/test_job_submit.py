"""`ray job submit` end to end, as docs/cluster.md's "rehearse on one machine": a real head node started with
`ray start --head` on 127.0.0.1 with token authentication, the quickstart sweep (cut down to two trials) submitted
as a job with the repository as its working dir, followed with `ray job logs -f` until SUCCEEDED, then trials.parquet
and models/ checked and the node stopped.

The node is private to the test: every port it opens is picked free here (a fixed default such as the dashboard
agent's 52365 may belong to another Ray on the machine, and the job then fails with "No available agent to submit
job"), its --temp-dir is private, and teardown kills only its processes (`ray stop` would kill every Ray on the
machine, not just this one).
"""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from gradauth.config import load_config
from gradauth.schema import WRITTEN_COLUMNS

from conftest import with_base
from localcluster import free_ports, pids_of  # tests/ helpers: free loopback ports, a node's processes

pytestmark = [pytest.mark.ray, pytest.mark.subprocess, pytest.mark.xdist_group("cluster")]  # a Ray node and `ray job` CLIs as real processes

ROOT = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` CLI of this interpreter
PY = sys.executable  # the jobs' entrypoint interpreter: this one (the job runs on this machine)




def _free_range(n: int, avoid: set[int]) -> int:
    """The first port of n consecutive free ports (for the workers' --min/--max-worker-port)."""
    for _ in range(200):
        start = random.randrange(20000, 30000)
        ports = range(start, start + n)
        if avoid & set(ports):
            continue
        try:
            for p in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return start
        except OSError:
            continue
    raise RuntimeError("no free port range for Ray's workers")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(pred, timeout: float, what: str, head: subprocess.Popen):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        if head.poll() is not None:
            raise RuntimeError(f"the head node exited ({head.returncode}) while waiting for {what}: see head.log")
        time.sleep(0.2)
    raise TimeoutError(f"{what} not up after {timeout} s")


def _http_status(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _stop_node(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM to `ray start --block` stops its node's processes; then whatever is left of this node (found by its
    private temp dir on the command line, or in the head's process group) is killed."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    head.wait()
    left = pids_of(temp_dir)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    t0 = time.time()
    while pids_of(temp_dir) and time.time() - t0 < 10:
        time.sleep(0.2)


def test_quickstart_sweep_as_a_ray_job(half_base, tmp_path):
    token, sha = secrets.token_hex(32), "jobtest" + secrets.token_hex(3)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH", "PYTHONPATH")}
    # Token auth on the node and in every client below; the token is given in the environment, not ~/.ray.
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    # The node, its workers and the jobs' shells run this interpreter, not whatever `python` PATH finds first (pytest
    # run as venv/bin/python -m pytest without the venv on PATH): its folder first on PATH, and the jobs' entrypoints
    # name it (PY) instead of `python`.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), *filter(None, [env.get("PATH")])])

    (gcs, dash, agent, agent_grpc, metrics, rt_env, node_mgr, obj_mgr, client) = ports = free_ports(9)
    workers = _free_range(40, set(ports))
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Unix socket paths are limited to ~107 chars
    head = subprocess.Popen(
        [*RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(300 * 2**20),
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(rt_env),
         "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
         "--ray-client-server-port", str(client), "--min-worker-port", str(workers),
         "--max-worker-port", str(workers + 39), "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=env, stdout=(tmp_path / "head.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"

    def ray_cli(*args, timeout=120, check=True):
        r = subprocess.run([*RAY, *args], env=env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert r.returncode == 0, f"ray {' '.join(args)} → {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    t0 = time.time()

    def stamp(what):  # in the captured output of a failure: how far it got, and when
        print(f"[{time.time() - t0:5.1f} s] {what}", file=sys.stderr)

    try:
        # While the node boots: the quickstart config cut to two short trials, and its base model (the sweep's input).
        raw = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
        raw["model"]["width"] = 1.0
        raw["train"]["epochs"] = 12
        raw["lock"]["values"] = [0.3, 0.4]  # half-width, short training: the quickstart rates lock too little
        raw["finetune"] |= {"epochs": [2], "lr": [0.01], "seeds": [0]}
        cfg_path, out = tmp_path / "quickstart.yaml", tmp_path / "out"
        cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        with_base(half_base[1], out, load_config(cfg_path))  # the session's half-width base: the same config

        stamp("trained")
        _wait(lambda: _listening(dash) and _listening(agent), 120, "the dashboard and its agent", head)

        stamp("node up")
        # Token auth: the job API refuses a request without the token (401) and with a wrong one (403).
        jobs = f"{address}/api/jobs/"
        assert _http_status(jobs, None) == 401
        assert _http_status(jobs, "0" * 64) == 403
        assert _http_status(jobs, token) == 200

        # A driver that joins the cluster (RAY_ADDRESS, as under `ray job submit`) keeps a GPU request although
        # this node has no GPU: on a real cluster the autoscaler adds GPU workers for the waiting trials.
        probe = ("import json, ray; from gradauth.sweep import ensure_ray, trial_resources; s = ensure_ray(); "
                 "print(json.dumps([s, trial_resources({'cpu': 1, 'gpu': 0.25}, s, ray.cluster_resources())]))")
        r = subprocess.run([sys.executable, "-c", probe], env=env | {"RAY_ADDRESS": f"127.0.0.1:{gcs}",
                           "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads(r.stdout.strip().splitlines()[-1]) == [False, {"cpu": 1.0, "gpu": 0.25}]

        # Without RAY_ADDRESS (a laptop run that happens to share the machine with this node) the driver starts
        # a Ray of its own instead of joining the one that is running.
        probe = ("import json, ray; from gradauth.sweep import ensure_ray; s = ensure_ray(num_cpus=1); "
                 "print(json.dumps([s, ray.get_runtime_context().gcs_address]))")
        r = subprocess.run([sys.executable, "-c", probe], env=env | {"PYTHONPATH": str(ROOT)}, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        started, gcs_address = json.loads(r.stdout.strip().splitlines()[-1])
        assert started is True and gcs_address != f"127.0.0.1:{gcs}"

        stamp("probe done")
        # The documented submission: the repository as working dir (.rayignore keeps results/ and .git out), the
        # commit passed in the runtime env because the uploaded copy has no .git.
        runtime_env = json.dumps({"env_vars": {"GRADAUTH_GIT_SHA": sha}})
        submit = ["job", "submit", "--address", address, "--working-dir", str(ROOT), "--runtime-env-json", runtime_env]
        for attempt in range(10):  # the agent may take a moment to register with the dashboard after it listens
            r = ray_cli(*submit, "--submission-id", "gradauth-sweep", "--no-wait", "--",
                        PY, "-m", "gradauth", "sweep", str(cfg_path), "--out", str(out), check=False)
            if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr:
                break
            time.sleep(2)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

        stamp("submitted")
        logs = ray_cli("job", "logs", "-f", "--address", address, "gradauth-sweep", timeout=300)
        status = ray_cli("job", "status", "--address", address, "gradauth-sweep")
        assert "Job 'gradauth-sweep' succeeded" in status.stdout, logs.stdout[-4000:] + logs.stderr[-2000:]
        with urllib.request.urlopen(urllib.request.Request(
                f"{jobs}gradauth-sweep", headers={"Authorization": f"Bearer {token}"}), timeout=10) as resp:
            assert json.load(resp)["status"] == "SUCCEEDED"
        assert "trials →" in logs.stdout

        stamp("job done")
        df = pd.read_parquet(out / "trials.parquet")
        assert list(df.columns) == list(WRITTEN_COLUMNS) and len(df) == 2 and df["trial_id"].is_unique
        assert set(df["status"]) <= {"ok", "unlockable"} and (df["status"] == "ok").any()
        assert (df["git_sha"] == sha).all()  # the uploaded code read the sha from the runtime env
        ok = df[df["status"] == "ok"]
        assert sorted(p.stem for p in (out / "models").glob("*.pt")) == sorted(ok["trial_id"])

        stamp("checked")
        # `gradauth status` as a job on the head, where the output dir is (waits and prints the job's output).
        r = ray_cli(*submit, "--", PY, "-m", "gradauth", "status", str(out), timeout=180)
        assert "2/2 trials done" in r.stdout, r.stdout[-3000:]
    finally:
        _stop_node(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not pids_of(temp_dir)
