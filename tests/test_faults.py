"""Faults, with real processes and real filesystems: two runs on one folder, a read-only or full target, a base
training killed with SIGKILL and resumed bit for bit, a killed sweep driver whose Ray must not outlive it."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from gradauth.checkpoint import load_model_file
from gradauth.cli import main
from gradauth.config import load_config, parse_config
from gradauth.runlock import LOCK_NAME, run_lock
from gradauth.train import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
CFG = {
    "name": "faults", "data": {"name": "digits", "crop_pad": 1, "flip": False},
    "model": {"arch": "vgg_tiny", "width": 1.0}, "train": {"epochs": 20, "lr": 0.05, "sparsity": 0.03},
    "lock": {"mode": "rate", "values": [0.35]},
    "finetune": {"epochs": [60], "lr": [0.005], "seeds": [0]},
    "sweep": {"lock_bound": 0.9, "resources": {"cpu": 1, "gpu": 0}, "checkpoint_every": 1, "checkpoint_min_s": 0},
}


def _env():
    # One thread: the same arithmetic in every process (bit-exact comparisons), and kind to a shared 2-core box.
    return os.environ | {"RAY_ADDRESS": "local", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _gradauth(*argv, **kw):
    return subprocess.Popen([sys.executable, "-m", "gradauth", *map(str, argv)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _config(path: Path, **train) -> Path:
    raw = yaml.safe_load(yaml.safe_dump(CFG))
    raw["train"] |= train
    path.write_text(yaml.safe_dump(raw))
    return path


def _wait(pred, timeout=180):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        found = pred()
        if found:
            return found
        time.sleep(0.05)
    raise TimeoutError


def _lines_until(proc, needle: str) -> list[str]:
    """Read the process's stderr line by line until one contains `needle` (or it ends)."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} never appeared:\n{''.join(seen)[-2000:]}")


def _mount_tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    return r.returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) → a fresh tmpfs under tmp_path (a real read-only or tiny filesystem), unmounted afterwards."""
    mounted = []

    def mount(options: str) -> Path:
        path = tmp_path / f"fs{len(mounted)}"
        if not _mount_tmpfs(path, options):
            pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
        mounted.append(path)
        return path
    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# -- one run per output folder -----------------------------------------------------------------------------------

@pytest.mark.subprocess
def test_second_run_on_the_same_folder_is_refused_and_a_killed_holder_frees_it(tmp_path, capsys):
    cfg = _config(tmp_path / "c.yaml", epochs=400)  # long enough to still be training when the second one starts
    out = tmp_path / "out"
    first = _gradauth("run", cfg, "--out", out)
    try:
        holder = _wait(lambda: (out / LOCK_NAME).is_file() and (out / LOCK_NAME).read_text().startswith("pid ")
                       and (out / LOCK_NAME).read_text())
        assert holder.startswith(f"pid {first.pid}, `gradauth run`")
        second = _gradauth("run", cfg, "--out", out)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert f"{out} is in use by pid {first.pid}, `gradauth run`" in err and "since 20" in err, err
        # Every command that writes into the folder takes the same lock (here in this process: another open file).
        assert main(["select", str(out)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"is in use by pid {first.pid}" in err, err
        assert first.poll() is None  # the refused runs did not disturb it
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    with run_lock(out, "test") as path:  # the kernel released the dead holder's lock: nothing to clean up
        assert f"pid {os.getpid()}" in path.read_text()
    assert not (out / LOCK_NAME).exists()  # the holder removes it when done


def test_commands_on_a_missing_results_folder_do_not_create_it(tmp_path, capsys):
    for command in ("select", "report", "release", "attack"):
        assert main([command, str(tmp_path / "typo")]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
        assert not (tmp_path / "typo").exists(), command


def test_lock_is_reentrant_within_a_process_and_exclusive_across_open_files(tmp_path):
    import fcntl
    from gradauth.errors import GradauthError
    with run_lock(tmp_path, "run"):
        with run_lock(tmp_path, "train"):  # `gradauth run` holds it, its stages take it again
            pass
        assert f"pid {os.getpid()}, `gradauth run`" in (tmp_path / LOCK_NAME).read_text()
    assert not (tmp_path / LOCK_NAME).exists()
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # someone else holds it, before writing its name
        with pytest.raises(GradauthError, match="in use by another process"):
            with run_lock(tmp_path, "select"):
                pass
    finally:
        os.close(fd)


# -- read-only or full targets ------------------------------------------------------------------------------------

@pytest.mark.subprocess
def test_read_only_target_is_refused_before_training(tmp_path, tmpfs):
    out = tmpfs("ro,size=1m")
    proc = _gradauth("run", _config(tmp_path / "c.yaml"), "--out", out / "results")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "Read-only file system" in err and "read-only: pass --out on a writable disk" in err, err
    assert not any(out.iterdir())


@pytest.mark.subprocess
def test_full_disk_is_found_before_training(tmp_path, tmpfs):
    out = tmpfs("size=2m")
    proc = _gradauth("run", _config(tmp_path / "c.yaml"), "--out", out)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "free but this run needs about" in err and "MiB" in err, err
    assert not any(out.iterdir())  # no probe, no config, no checkpoint, and the lock file is gone with its holder


@pytest.mark.subprocess
def test_disk_full_while_writing_is_one_line_and_no_partial_file(tmp_path, tmpfs, capsys):
    out = tmpfs("size=1m")
    for name in ("config.yaml", "trials.parquet"):
        shutil.copy(REPO / "results" / "quickstart" / name, out / name)
    (out / LOCK_NAME).write_text("x" * 200)  # its page is reused by the holder's own line
    with open(out / "filler", "wb") as f:
        with pytest.raises(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    code = main(["select", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "No space left on device" in err and "the disk is full" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "filler", "trials.parquet"]  # no levels.json, no temp


# -- base training: checkpoint per epoch, --resume bit for bit -----------------------------------------------------

# session, not module: conftest runs the tests that start nothing before the Ray / process ones, which splits
# this module in two, and a module fixture would be built again for the second part
@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """An uninterrupted base training, here with one thread like the subprocesses (also the sweep test's base)."""
    from gradauth.pipeline import train_stage
    d = tmp_path_factory.mktemp("ref")
    cfg = _config(d / "c.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_stage(load_config(cfg), d / "out")
    finally:
        torch.set_num_threads(threads)
    assert not (d / "out" / "base.ckpt").exists()  # removed once base.pt is written
    return d


@pytest.mark.subprocess
def test_killed_base_training_resumes_bit_exactly(tmp_path, reference):
    cfg = _config(tmp_path / "c.yaml")
    out = tmp_path / "out"
    proc = _gradauth("train", cfg, "--out", out)
    _lines_until(proc, "[train] epoch 4/20")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "base.pt").exists()
    ckpt = out / "base.ckpt"
    state = read_checkpoint(ckpt, load_config(cfg))
    assert 3 <= state["epochs_done"] < 20

    # A checkpoint belongs to one config: another learning rate does not continue it.
    other = load_config(_config(tmp_path / "other.yaml", lr=0.04))
    assert read_checkpoint(ckpt, other) is None

    proc = _gradauth("train", cfg, "--out", out, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert f"resuming from {ckpt}: {state['epochs_done']} of 20 epochs done" in err
    assert f"epoch {state['epochs_done']}/20" not in err and f"epoch {state['epochs_done'] + 1}/20" in err
    assert not ckpt.exists()
    got = load_model_file(out / "base.pt")["state_dict"]
    want = load_model_file(reference / "out" / "base.pt")["state_dict"]
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_checkpoint_of_another_config_is_not_used(tmp_path, capsys):
    from gradauth.data import load_dataset
    from gradauth.engine import pick_device
    from gradauth.train import save_checkpoint, train_base
    cfg = parse_config(CFG | {"train": CFG["train"] | {"epochs": 2}})
    other = parse_config(CFG | {"train": CFG["train"] | {"epochs": 2, "lr": 0.04}})
    ds = load_dataset(cfg.data, cfg.seed)
    device = pick_device("cpu")
    model, _ = train_base(other, ds, device, progress=False, checkpoint=tmp_path / "base.ckpt")
    assert read_checkpoint(tmp_path / "base.ckpt", other)["epochs_done"] == 2
    resumed, _ = train_base(cfg, ds, device, progress=False, checkpoint=tmp_path / "base.ckpt", resume=True)
    err = capsys.readouterr().err
    assert "belongs to another config" in err and "training from epoch 0" in err
    fresh, _ = train_base(cfg, ds, device, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), fresh.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), model.state_dict().values()))


@pytest.mark.subprocess
def test_full_sweep_storage_is_found_before_the_sweep(reference, tmpfs, capsys):
    storage = tmpfs("size=2m")
    raw = yaml.safe_load((reference / "c.yaml").read_text())
    raw["sweep"]["storage"] = str(storage)
    cfg = reference / "storage.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(cfg), "--out", str(reference / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the sweep's Ray storage needs about" in err, err
    assert "set sweep.storage on another disk" in err and "[sweep] importance" not in err
    assert not any(storage.iterdir()) and not (reference / "out" / "trials.parquet").exists()


# -- a killed sweep driver leaves no Ray behind --------------------------------------------------------------------

def _proc_table():
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                text = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            f = text[text.rindex(")") + 2:].split()
            if f[0] not in "ZX":
                table[int(name)] = (int(f[1]), int(f[19]), text[text.index("(") + 1:text.rindex(")")])
    return table


def _tree(root: int) -> dict[tuple[int, int], str]:
    """(pid, start time) → name of every live descendant of `root`."""
    table = _proc_table()
    kids = {}
    for pid, (ppid, _, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    found, stack = {}, list(kids.get(root, []))
    while stack:
        pid = stack.pop()
        found[(pid, table[pid][1])] = table[pid][2]
        stack.extend(kids.get(pid, []))
    return found


def _still_alive(procs) -> dict:
    table = _proc_table()
    return {k: v for k, v in procs.items() if k[0] in table and table[k[0]][1] == k[1]}


@pytest.mark.ray
@pytest.mark.subprocess
def test_killed_sweep_driver_leaves_no_ray_process(reference):
    out = reference / "out"
    proc = _gradauth("sweep", reference / "c.yaml", "--out", out)
    procs = {}
    try:
        # A trial is running (it has checkpointed), so the instance has its agents and a worker.
        _wait(lambda: list((out / "ray" / "sweep").glob("*/checkpoint_*")), timeout=240)
        procs = _tree(proc.pid)
        names = set(procs.values())
        assert {"raylet", "gcs_server", "ray::DashboardA", "ray::RuntimeEnv"} <= names, names
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t0 = time.monotonic()
        while _still_alive(procs) and time.monotonic() - t0 < 5:
            time.sleep(0.1)
        assert not _still_alive(procs), f"still alive 5 s after the driver was killed: {_still_alive(procs)}"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        for pid, _ in _still_alive(procs):  # only what this test started, each checked by its start time
            os.kill(pid, signal.SIGKILL)
