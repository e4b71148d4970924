"""Shared fixtures: one tiny trained base and one tiny finished sweep per test session, and the marker guards.

Markers (registered in pyproject.toml): `ray` — the test starts a Ray instance (in this process or another);
`subprocess` — it starts other processes (the CLI as a real process, a Ray node, a compiler). The fast inner loop:

    python -m pytest -m "not ray and not subprocess"

A test that starts Ray or another process without its marker fails (`_markers_say_what_a_test_starts`), so
the inner loop stays fast.
"""
import copy
import json
import os
import shutil
import sys
from pathlib import Path

# Before torch loads OpenMP: idle threads sleep instead of spinning, so parallel test processes (Ray workers, the
# fault-tolerance subprocesses) on 2 cores do not starve each other (seen: 3 ms → 600 ms per step for a tiny model).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
import yaml

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]

# The quickstart config with a 15-epoch base: sparse enough that 20–40 % rate locks fall to chance; the tiny VGG at
# width 2 has 320 BN channels. Every test that needs a trained base uses this one (the `tiny_base` fixture), so it
# is trained once per session; its lock / fine-tune sections are test_pipeline's two-trial grid.
TINY = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
TINY["name"] = "tiny"
TINY["train"]["epochs"] = 15
TINY["lock"]["values"] = [0.02, 0.35]
TINY["finetune"] = {"epochs": [3], "lr": [0.01], "seeds": [0]}
# (lock rate, fine-tune epochs) of the three levels of the shared sweep, two seeds each; 3-epoch levels keep the
# attack's strong schedule (which scales with the best one) short.
LEVELS = [(0.2, 3), (0.3, 3), (0.4, 3)]
BASE_FILES = ("base.pt", "base.json")


def tiny_raw(**sections) -> dict:
    """TINY with whole top-level sections replaced (a deep copy): `tiny_raw(lock={...}, finetune={...})`."""
    raw = copy.deepcopy(TINY)
    raw.update(copy.deepcopy(sections))
    return raw


def with_base(base: Path, out: Path, cfg) -> Path:
    """`out` holding the shared base (copied, not trained) and `cfg` as its config.yaml. `cfg` must share the base's
    seed, data, model and train sections, so the base is the one `gradauth train` would have written for it."""
    from gradauth.pipeline import write_config
    info = json.loads((base / "base.json").read_text())
    assert cfg.base_hash() == info["base_hash"], "this config trains another base: keep the seed/data/model/train"
    out.mkdir(parents=True, exist_ok=True)
    for name in BASE_FILES:
        shutil.copy2(base / name, out / name)
    write_config(cfg, out)
    return out


def build_sweep(base: Path, out: Path, plan=LEVELS) -> Path:
    """A finished sweep without Ray: the shared base, `plan`'s levels × 2 seeds of trials with their models,
    trials.parquet and a levels.json with one level per plan entry."""
    from gradauth.checkpoint import save_model
    from gradauth.config import parse_config
    from gradauth.pipeline import trial_context
    from gradauth.sweep import write_trials
    from gradauth.trial import TrialSpec, run_trial
    raw = tiny_raw(name="quickstart", lock={"mode": "rate", "values": [v for v, _ in plan]},
                   finetune={"epochs": sorted({e for _, e in plan}), "lr": [0.01], "seeds": [0, 1]},
                   sweep=TINY["sweep"])
    cfg = parse_config(raw)
    with_base(base, out, cfg)
    ctx = trial_context(cfg, out)
    rows, levels = [], []
    for k, (rate, epochs) in enumerate(plan, 1):
        mine = []
        for seed in (0, 1):
            t = TrialSpec("bn_gamma", "rate", rate, epochs, 0.01, 1.0, "all", seed)
            row, model, masks = run_trial(ctx, t, torch.device("cpu"))
            assert row["status"] == "ok", row
            save_model(out / "models" / f"{t.trial_id}.pt", model.cpu(), ctx.spec, masks)
            mine.append(row)
        rows += mine
        accs = [r["fine_acc"] for r in mine]
        levels.append({"level": k, "lock_mode": "rate", "lock_value": rate, "importance": "bn_gamma",
                       "schedule": {"epochs": epochs, "lr": 0.01, "data_fraction": 1.0, "scope": "all"},
                       "fine_acc": round(sum(accs) / 2, 6), "fine_acc_std": round(abs(accs[0] - accs[1]) / 2 ** 0.5, 6),
                       "prun_acc": mine[0]["prun_acc"], "trial_ids": [r["trial_id"] for r in mine],
                       "locked_channels": mine[0]["locked_channels"]})
    write_trials(rows, out / "trials.parquet")
    (out / "levels.json").write_text(json.dumps({"experiment": "quickstart", "method": 1, "levels": levels,
                                                 "rejected": []}))
    return out


def _snapshot(root: Path) -> dict:
    import hashlib
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _unchanged(root: Path):
    """Shared fixture folders are read only by contract (root ignores file modes): at the session's end a changed
    one is an error, so a test that writes into one is found instead of silently spoiling the others."""
    before = _snapshot(root)
    yield
    assert _snapshot(root) == before, f"a test changed the shared fixture folder {root}: copy it first (copy_of)"


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """(config, folder, train info): TINY's base trained once per session — config.yaml, base.pt, base.json. Read
    only (checked at the session's end): copy what you change (`with_tiny_base`, shutil.copytree)."""
    from gradauth.config import parse_config
    from gradauth.pipeline import train_stage
    cfg = parse_config(TINY)
    out = tmp_path_factory.mktemp("tiny-base")
    info = train_stage(cfg, out)
    guard = _unchanged(out)
    next(guard)
    yield cfg, out, info
    next(guard, None)


@pytest.fixture(scope="session")
def tiny_sweep(tiny_base, tmp_path_factory):
    """A finished sweep folder on the shared base (LEVELS × 2 seeds, models, trials.parquet, levels.json), built once
    per session without Ray. Read only: tests that write (release, attack) copy it first (`copy_of`)."""
    out = build_sweep(tiny_base[1], tmp_path_factory.mktemp("tiny-sweep") / "sweep")
    guard = _unchanged(out)
    next(guard)
    yield out
    next(guard, None)


def copy_of(src: Path, dst: Path) -> Path:
    """A writable copy of a shared fixture folder."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


# The quickstart config shrunk to seconds: digits, a half-width tiny VGG (160 BN channels), 12 base epochs. The Ray
# and subprocess tests that run whole sweeps use its base (`half_base`): their trials are cheaper on it than on TINY's.
HALF = {
    "name": "tiny", "data": {"name": "digits", "crop_pad": 1, "flip": False},
    "model": {"arch": "vgg_tiny", "width": 1.0},
    "train": {"epochs": 12, "lr": 0.05, "sparsity": 0.03},
    "lock": {"mode": "rate", "values": [0.1, 0.2]},
    "finetune": {"epochs": [2], "lr": [0.01], "seeds": [0]},
    "sweep": {"lock_bound": 0.2},
}


@pytest.fixture
def tiny_cfg():
    """HALF, parsed (nothing trained)."""
    from gradauth.config import parse_config
    return parse_config(copy.deepcopy(HALF))


@pytest.fixture(scope="session")
def half_base(tmp_path_factory):
    """(config, folder, train info): HALF's base trained once per session. Read only, like `tiny_base`."""
    from gradauth.config import parse_config
    from gradauth.pipeline import train_stage
    cfg = parse_config(copy.deepcopy(HALF))
    out = tmp_path_factory.mktemp("half-base")
    info = train_stage(cfg, out)
    guard = _unchanged(out)
    next(guard)
    yield cfg, out, info
    next(guard, None)


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


# Every way Python starts another process raises one of these audit events (subprocess, os.system, spawn, exec, fork).
_SPAWN_EVENTS = {"subprocess.Popen", "os.system", "os.posix_spawn", "os.spawn", "os.exec", "os.fork", "os.forkpty"}
# Quick helpers that are not what the marker is about: provenance (`git rev-parse`, gradauth.pipeline.git_sha).
_HELPERS = {"git"}
_spawned: list = []


def _audit(event, args):
    if event in _SPAWN_EVENTS:
        exe = args[0] if args else None
        if isinstance(exe, (str, bytes, os.PathLike)) and Path(os.fsdecode(exe)).name in _HELPERS:
            return
        _spawned.append((event, str(args)[:200]))


sys.addaudithook(_audit)


@pytest.fixture(autouse=True)
def _markers_say_what_a_test_starts(request):
    """A test that starts Ray in this process must carry the `ray` marker, and one that starts another process (Ray
    included) the `ray` or `subprocess` marker, so `-m "not ray and not subprocess"` really is the fast inner loop."""
    node = request.node
    is_ray, is_sub = (node.get_closest_marker(m) is not None for m in ("ray", "subprocess"))
    ray_before, n_before = _ray_running(), len(_spawned)
    yield
    if not is_ray and not ray_before and _ray_running():
        pytest.fail(f"{node.nodeid} started Ray: mark it @pytest.mark.ray", pytrace=False)
    if not (is_ray or is_sub) and len(_spawned) > n_before:
        event, args = _spawned[n_before]
        what = "@pytest.mark.ray" if "/ray/" in args else "@pytest.mark.subprocess"  # Ray's own binaries
        pytest.fail(f"{node.nodeid} started a process ({event} {args}): mark it {what}", pytrace=False)


# ------------------------------------------------------------------------------------------ two test workers
# The suite runs on two pytest-xdist workers (pyproject's addopts): most of its wall time is Ray starting and
# waiting. The tests that start Ray nodes as processes and kill them on a clock (xdist_group "cluster": node loss,
# autoscaler, killed workers and drivers, `ray job submit`) must not share the two cores with another test that
# starts Ray: they take an exclusive lock, every other Ray test a shared one. A cluster test waiting for it raises a
# flag first, so the other worker stops taking new shared locks and the exclusive one is not starved.
# Tests that start no Ray (no `ray` mark: the markers are enforced above, and a `subprocess` test's processes were
# seen to start none) run beside a cluster test: a cluster test waits on conditions with minutes of slack (a trial
# reaching a checkpoint, a node coming up), so one busy core slows it without breaking it, and the ~6 minutes the
# cluster tests spend mostly waiting (nodes booting, idle timeouts, killed processes) left the second core idle. On a
# 2-core Xeon: the tests that start nothing beside them, 12.5 → 11.5 min; the Ray-free process tests too (78 CPU-s:
# the compiler, CLI processes, killed trainings), with three cheaper cluster and Ray tests, 11.75 → 9.6 min. Dropping
# the lock gained nothing (9.8 min): the suite keeps both cores ~90 % busy, so the Ray tests beside the cluster tests
# only slowed both.
def pytest_collection_modifyitems(config, items):
    """The cluster tests first, then the tests that start no Ray, then the rest: xdist hands the "cluster" group to
    one worker as a whole, and the other works through the tests that may run beside it instead of waiting for the
    exclusive lock in a Ray test's setup (the order within each part is kept)."""
    def part(item):
        if any(m.args == ("cluster",) for m in item.iter_markers("xdist_group")):
            return 0
        return 2 if any(item.iter_markers("ray")) else 1
    items.sort(key=part)


@pytest.fixture(autouse=True)
def _cluster_tests_run_alone(request, tmp_path_factory):
    import fcntl
    import time
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    starts = any(request.node.iter_markers("ray"))
    alone = any(m.args == ("cluster",) for m in request.node.iter_markers("xdist_group"))
    if worker is None or not (starts or alone):  # one process (-n 0, or a single test), or a test that starts no Ray
        yield
        return
    if alone and "@" not in request.node.nodeid and request.config.getoption("dist", None) == "loadgroup":
        # xdist marks a grouped test's id "…@cluster" to send the group to one worker; without it the cluster tests
        # spread over both workers and wait on each other's lock (pytest 9.2 with xdist 3.8: pyproject pins < 9.2)
        pytest.fail("pytest-xdist's loadgroup is not grouping the cluster tests with this pytest "
                    f"({pytest.__version__}): pip install -e '.[test]' installs a pytest it works with", pytrace=False)
    shared = tmp_path_factory.getbasetemp().parent  # the same folder for every worker of this run
    lock, flag = shared / "cluster.lock", shared / "cluster.waiting"
    with open(lock, "a+") as fh:
        if alone:
            flag.touch()
            fcntl.flock(fh, fcntl.LOCK_EX)
            flag.unlink(missing_ok=True)
        else:
            while flag.exists():
                time.sleep(0.2)
            fcntl.flock(fh, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
