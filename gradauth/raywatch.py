"""A watchdog that owns the lifetime of the private local Ray instance a driver starts.

Ray ties its GCS and raylet to the driver (the kernel kills them when it dies), but the agents and workers the
raylet starts (DashboardAgent, RuntimeEnvAgent, idle workers) are re-parented to init when the driver is killed
with SIGKILL and linger for minutes (measured: DashboardAgent and RuntimeEnvAgent still alive 60 s after `kill -9` of
a `gradauth sweep` driver; with this watchdog, nothing after 1 s), with their command lines and environments overwritten ("ray::IDLE"), so
nothing names them afterwards. This process, started by `sweep.ensure_ray` right after `ray.init(address="local")`
in a session of its own, therefore remembers them while they can still be found: every SCAN_S it records the
process tree under the instance's own processes (the pids `ray.init` started, passed on the command line), and in
between it sleeps on a pidfd of the driver (woken the moment it dies; polled every POLL_S where pidfds are missing).
When the driver disappears it SIGKILLs every recorded process that is still the same process (pid and start time), then
exits; when the instance's processes are all gone (a normal `ray.shutdown()`), it kills what survived them and exits.
It never looks at other processes, so a joined cluster (RAY_ADDRESS) or anyone else's Ray is never touched; it is
not started for those at all.

    python -m gradauth.raywatch DRIVER_PID:START ROOT_PID:START [ROOT_PID:START ...]

START is the process's start time in clock ticks since boot (field 22 of /proc/PID/stat), so a recycled pid is
never mistaken for the process it replaced.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.2  # driver liveness, where there is no pidfd to wait on
SCAN_S = 2.0  # a scan of /proc costs ~20 ms on a loaded 2-core machine: not every POLL_S
GRACE_S = 2.0  # after a normal shutdown, how long the instance's own teardown gets before stragglers are killed


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def start_time(pid: int) -> int | None:
    st = _stat(pid)
    return st[1] if st else None


def _table() -> dict[int, tuple[int, int]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st:
                out[int(name)] = st
    return out


def _alive(pid: int, start: int) -> bool:
    return start_time(pid) == start


def _descendants(roots: set[tuple[int, int]], table: dict[int, tuple[int, int]]) -> set[tuple[int, int]]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [pid for pid, start in roots if table.get(pid, (0, None))[1] == start]
    while stack:
        pid = stack.pop()
        key = (pid, table[pid][1])
        if key in found:
            continue
        found.add(key)
        stack.extend(children.get(pid, []))
    return found


def _kill(procs: set[tuple[int, int]]) -> None:
    for pid, start in procs:
        if pid != os.getpid() and _alive(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _wait_for_driver(driver: tuple[int, int], pidfd: int | None, timeout: float) -> None:
    """Return when the driver has died or after `timeout` seconds, whichever comes first."""
    if pidfd is not None:
        select.select([pidfd], [], [], timeout)
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end and _alive(*driver):
        time.sleep(POLL_S)


def watch(driver: tuple[int, int], roots: set[tuple[int, int]]) -> None:
    known: set[tuple[int, int]] = set(roots)
    gone_since = None
    try:
        pidfd = os.pidfd_open(driver[0])
    except (AttributeError, OSError):
        pidfd = None
    while True:
        table = _table()
        if table.get(driver[0], (0, None))[1] != driver[1]:
            # The driver died: the kernel is killing the roots; kill everything recorded under them, including
            # children of the roots found only now (their parents may still be alive for a moment).
            known |= _descendants(known, table)
            _kill(known)
            return
        known |= _descendants(known, table)
        known = {p for p in known if table.get(p[0], (0, None))[1] == p[1]}
        if not any(table.get(pid, (0, None))[1] == start for pid, start in roots):
            gone_since = gone_since or time.monotonic()  # a normal ray.shutdown(): its own teardown goes first
            if not known or time.monotonic() - gone_since > GRACE_S:
                _kill(known)
                return
        _wait_for_driver(driver, pidfd, SCAN_S)


def spawn(roots: list[int], session_dir: str | None = None) -> subprocess.Popen | None:
    """Start the watchdog for this process (the driver) and the instance processes `roots`; None off Linux.
    `session_dir`: the instance's private temp folder (sweep.ensure_ray), removed once its processes are gone."""
    me = start_time(os.getpid())
    keys = [f"{pid}:{start_time(pid)}" for pid in roots if start_time(pid) is not None]
    if me is None or not keys:
        return None
    return subprocess.Popen([sys.executable, "-m", "gradauth.raywatch", f"{os.getpid()}:{me}", *keys],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True,
                            env=os.environ | ({TEMP_ENV: session_dir} if session_dir else {}))


TEMP_ENV = "GRADAUTH_RAYWATCH_SESSION_DIR"


def _remove_session_dir(path: str | None) -> None:
    """Only a folder that `sweep.ensure_ray` made (tempfile.mkdtemp(prefix="gradauth-ray-")) is ever removed."""
    import shutil
    import tempfile
    if path and Path(path).name.startswith("gradauth-ray-") and Path(path).parent == Path(tempfile.gettempdir()):
        shutil.rmtree(path, ignore_errors=True)


def _parse(arg: str) -> tuple[int, int]:
    pid, start = arg.split(":")
    return int(pid), int(start)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver is the driver's business
    watch(_parse(sys.argv[1]), {_parse(a) for a in sys.argv[2:]})
    _remove_session_dir(os.environ.get(TEMP_ENV))  # a killed driver's atexit never ran
