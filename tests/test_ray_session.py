"""A private local Ray keeps its session files in its own temp folder, gone when the driver ends, killed or not."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DRIVER = ("import sys, time\n"
          "from gradauth.sweep import ensure_ray\n"
          "ensure_ray(1)\n"
          "from ray._private import worker\n"
          "print(worker._global_node.get_session_dir_path(), flush=True)\n"
          "if sys.argv[1] == 'wait': time.sleep(600)\n")


def _driver(mode):
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.Popen([sys.executable, "-c", DRIVER, mode], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    session = Path(p.stdout.readline().strip())
    assert session.is_dir() and session.parent.name.startswith("gradauth-ray-"), session
    return p, session.parent


def _gone(path, timeout=120):
    t0 = time.monotonic()
    while path.exists() and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
    return not path.exists()


@pytest.mark.ray
@pytest.mark.subprocess
def test_session_folder_removed_at_exit_and_after_a_kill():
    p, temp = _driver("exit")
    assert p.wait(timeout=120) == 0
    assert not temp.exists()  # removed by the driver's own exit (atexit), before it returned
    p, temp = _driver("wait")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert _gone(temp)  # the watchdog removed it once it had killed what the instance left
