"""A private multi-node Ray cluster on 127.0.0.1 for the tests: a head and worker nodes as separate `ray start --block`
processes (each its own raylet, object store and agents), or a head whose autoscaler starts fake nodes.

Private to the test that starts it: every port is picked free (a fixed default such as the dashboard agent's 52365
or the GCS's 6379 may belong to another Ray on the machine), token auth with a fresh token (a node never joins,
and is never joined by, a Ray it does not know), and one temp dir of its own that every node of the cluster uses
(worker nodes inherit the head's). Each node runs in a session of its own, so `kill_node` can take a whole node
down at once, as a lost spot instance would, and `stop` ends every process of the cluster (by session, and by the
temp dir on the command line), even after a failure half way, and returns any still left.
"""
from __future__ import annotations

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
from pathlib import Path

RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` CLI of this interpreter

# For nodes whose GPUs are declared only: even on a machine with a real GPU, torch in a trial then sees none. Ray
# would point CUDA_VISIBLE_DEVICES at the GPU id it assigns; with NOSET it leaves the node's "-1" (no device) alone.
# ("" would be refused: a node may not declare more GPUs than CUDA_VISIBLE_DEVICES lists.)
NO_CUDA = {"CUDA_VISIBLE_DEVICES": "-1", "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    """n distinct ports free now, between Ray's worker ports (10002-19999) and the kernel's ephemeral range. A port
    from bind(0) is an ephemeral one, which any outgoing connection (a loaded cluster's many gRPC clients) can take
    before the node it was given to binds it; a node whose agent cannot bind its port dies with its raylet."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            top = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        top = 32768
    pool = list(range(20000, top)) if top - 20000 >= 100 else []
    random.shuffle(pool)
    socks = []
    try:
        for port in pool:
            if len(socks) == n:
                break
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        while len(socks) < n:  # no room below the ephemeral range on this machine
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cmdline(pid: int) -> bytes:
    """A process's command line as /proc has it (NUL-separated; a Ray worker's is its `ray::...` title), b"" if gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def pids_of(temp_dir: str) -> list[int]:
    """Processes of the cluster: their command line names its private temp dir (Linux /proc)."""
    return [int(d.name) for d in Path("/proc").iterdir()
            if d.name.isdigit() and int(d.name) != os.getpid() and temp_dir.encode() in cmdline(int(d.name))]


def session_of(pid: int) -> int | None:
    """The session a process belongs to: every node is started in a session of its own, and its raylet, agents and
    the workers the raylet starts (each in a process group of its own, under a `ray::...` title that no longer names
    the temp dir) stay in it."""
    try:
        return os.getsid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed process stays in /proc until its parent reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def session_pids(sid: int) -> list[int]:
    return [int(d.name) for d in Path("/proc").iterdir()
            if d.name.isdigit() and int(d.name) != os.getpid() and session_of(int(d.name)) == sid
            and running(int(d.name))]


class LocalCluster:
    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Unix socket paths are limited to ~107 chars
        self.token = secrets.token_hex(32)
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH", "PYTHONPATH")}
        self.env = env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0",
                          # a loaded 2-core machine: a raylet may need more than the default 10 s to register
                          "RAY_raylet_start_wait_time_s": "120"}
        self.gcs_port: int | None = None
        self.nodes: dict[str, subprocess.Popen] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def driver_env(self, **extra) -> dict:
        """Environment of a driver joining this cluster as `ray job submit` would make it (RAY_ADDRESS)."""
        return self.env | {"RAY_ADDRESS": self.address, "PYTHONPATH": str(ROOT)} | extra

    def _start(self, name: str, args: list[str], env: dict) -> subprocess.Popen:
        node_mgr, obj_mgr, agent, agent_grpc, metrics, rt_env = free_ports(6)
        cmd = [*RAY, "start", "--block", "--node-ip-address", "127.0.0.1", *args,
               "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
               "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
               "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(rt_env),
               "--object-store-memory", str(100 * 2**20), "--disable-usage-stats"]
        p = subprocess.Popen(cmd, env=env, stdout=(self.log_dir / f"{name}.log").open("w"), stderr=subprocess.STDOUT,
                             start_new_session=True)  # its own session: the node's raylet, agents, workers
        self.nodes[name] = p
        return p

    def start_head(self, num_cpus: float = 0, num_gpus: float = 0, autoscaling_config: Path | None = None,
                   env: dict | None = None, port: int | None = None) -> subprocess.Popen:
        """`port`: the GCS port, when it must be known before (an autoscaling config names it); else a free one."""
        gcs, dash, client = free_ports(3)
        while port in (dash, client):  # a port picked by the caller is not free here until the head binds it
            gcs, dash, client = free_ports(3)
        self.gcs_port = port or gcs
        args = ["--head", "--port", str(self.gcs_port), "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus),
                "--include-dashboard", "false", "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
                "--temp-dir", self.temp_dir]
        if autoscaling_config is not None:
            args.append(f"--autoscaling-config={autoscaling_config}")
        return self._start("head", args, self.env | (env or {}))

    def add_worker(self, name: str, num_cpus: float, num_gpus: float = 0, env: dict | None = None) -> subprocess.Popen:
        """Start a worker node; `wait_up` for it before adding the next. Nodes on one machine share the head's
        session dir and number their sockets and logs by the files already there (raylet.1, raylet.2, ...): two
        starting at once both pick the same name and the second raylet dies on `bind: Address already in use`."""
        return self._start(name, ["--address", self.address, "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus)],
                           self.env | (env or {}))

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def wait_up(self, name: str, timeout: float = 240) -> None:
        """Until `ray start` says the node is up (it prints this once the node is registered with the GCS)."""
        p, t0 = self.nodes[name], time.time()
        while time.time() - t0 < timeout:
            if "Ray runtime started" in self.log(name):
                return
            if p.poll() is not None:
                raise RuntimeError(f"node {name} exited ({p.returncode}) while starting:\n{self.log(name)[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"node {name} not up after {timeout} s:\n{self.log(name)[-3000:]}")

    def node_of(self, pid: int) -> str | None:
        """The name of the node a process runs on (None: not one of this cluster's nodes, or gone)."""
        sid = session_of(pid)
        return next((n for n, p in self.nodes.items() if p.pid == sid), None)

    def node_pids(self, name: str) -> list[int]:
        """The live processes of one node (raylet, agents, the workers the raylet started)."""
        return session_pids(self.nodes[name].pid)

    def kill_node(self, name: str) -> None:
        """SIGKILL the node, as the loss of a spot instance would: its raylet's process group (raylet, object store,
        agents) and, in the same instant, the workers the raylet had started (process groups of their own)."""
        p = self.nodes[name]
        os.killpg(p.pid, signal.SIGKILL)
        for pid in session_pids(p.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()

    def stop(self) -> list[int]:
        """End every process of the cluster; returns those still alive afterwards (none, unless something is wrong)."""
        for name, p in reversed(list(self.nodes.items())):
            if p.poll() is None:  # SIGTERM to `ray start --block` stops its node's processes gracefully
                p.send_signal(signal.SIGTERM)
        for name, p in self.nodes.items():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()
        sessions = [p.pid for p in self.nodes.values()]

        def alive():  # by session (workers) and by the temp dir (e.g. fake autoscaled nodes' processes)
            return sorted(set(pids_of(self.temp_dir)).union(*(session_pids(s) for s in sessions)))
        t0 = time.time()
        while time.time() - t0 < 15:
            left = alive()
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.3)
        left = alive()
        # The nodes' own logs (raylets, agents, GCS) beside the test's, for a failure's post-mortem: `ray start`
        # prints the tail of raylet.out, which is the head's raylet, whichever node died.
        for f in Path(self.temp_dir).glob("session_2*/logs/*"):  # not session_latest: the same folder again
            try:
                if f.is_file() and f.suffix in (".out", ".err", ".log") and f.stat().st_size < 8 * 2**20:
                    (self.log_dir / "ray-logs").mkdir(exist_ok=True)
                    shutil.copy2(f, self.log_dir / "ray-logs" / f.name)
            except OSError:  # a log is a help, never a reason to hide the test's own failure
                pass
        if not left:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left
