"""The sweep on Ray Tune: one trial per importance × lock spec × schedule × seed, every row to trials.parquet.

Ray only wraps the plain `trial.run_trial`: the shared context (base weights, importance scores, the dataset as uint8
tensors) goes once into the object store via `tune.with_parameters`; a reused actor keeps the dataset on its device
between trials, so a short trial costs little more than its own compute. Trials checkpoint every
`sweep.checkpoint_every` epochs and resume from there if their worker dies; `resume=True` finishes a killed sweep
with `Tuner.restore`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from . import rundir
from . import registry
from .checkpoint import to_bytes
from .config import Config
from .engine import pick_device
from .errors import GradauthError
from .fsutil import write_json
from .packing import PACK_FILE, PROBE_TIMED, make_packs, pack_name, pack_size, point_seconds, warm_points
from .rows import TRIALS_SCHEMA, SweepLog, read_parts, write_trials  # noqa: F401 (write_trials re-exported)
from .trial import TrialContext, TrialSpec, grid, run_trial

_DEVICE_DATA: dict = {}  # per worker process: the dataset already on this actor's device, reused across trials


def _device_data(ctx: TrialContext, device: torch.device):
    key = (id(ctx.ds), str(device))
    if key not in _DEVICE_DATA:
        _DEVICE_DATA.clear()
        _DEVICE_DATA[key] = ctx.ds.to(device)
    return _DEVICE_DATA[key]


def _report(metrics: dict, state: dict | None = None, model_bytes: bytes | None = None) -> None:
    from ray import tune
    if state is None and model_bytes is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        if state is not None:
            torch.save(state, Path(d) / "state.pt")
        if model_bytes is not None:
            (Path(d) / "model.pt").write_bytes(model_bytes)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def cap_gpu_memory(device: torch.device, fraction: float) -> float | None:
    """Hold this process to `fraction` of its GPU's memory (a 0.25-GPU trial to a quarter), so four packed trials
    cannot starve each other: one that outgrows its share fails alone with an out-of-memory error instead of taking
    its neighbours down. Returns the cap set, or None (CPU, or a whole GPU)."""
    if device.type != "cuda" or not 0 < fraction < 1:
        return None
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def tune_trainable(config: dict, ctx: TrialContext, threads: int = 1, checkpoint_every: int = 1,
                   checkpoint_min_s: float = 0.0, gpu_fraction: float = 0.0, finished: dict | None = None,
                   plugins=None, points: dict | None = None) -> None:
    """The Ray Tune function trainable: restore, run the plain trial, report the row (and the model) at the end.

    `finished` holds the rows the driver already has on disk (a `--resume`): a trial among them (Tune's last
    snapshot missed its end) re-reports its row at once instead of training again. `plugins`: the driver's
    registered models/datasets/criteria (registry.py), loaded once per worker before anything is built. `points`:
    {trial_id: grid point} of a packed sweep, whose Tune configs name their points by id only."""
    from ray import tune
    registry.restore(plugins)
    if "phase" in config:
        return _search_trainable(config, ctx, threads, gpu_fraction, finished)
    if "pack" in config:
        return _pack_trainable(config, ctx, threads, checkpoint_every, checkpoint_min_s, gpu_fraction, finished,
                               points or {})
    t = TrialSpec(**config["trial"])
    if finished and t.trial_id in finished:
        tune.report(dict(finished[t.trial_id]) | {"epoch": t.epochs, "row_complete": True, "rereported": True})
        return
    torch.set_num_threads(threads)
    device = pick_device()
    cap_gpu_memory(device, gpu_fraction)
    state = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            if (Path(d) / "state.pt").exists():
                state = torch.load(Path(d) / "state.pt", map_location=device, weights_only=True)

    last = [time.monotonic()]

    def on_epoch(epoch, model, opt, masks):
        # Each checkpoint costs a copy to storage and an experiment-state snapshot: throttle by time too.
        due = (epoch + 1) % checkpoint_every == 0 and time.monotonic() - last[0] >= checkpoint_min_s
        if due and epoch + 1 < t.epochs:
            _report({"epoch": epoch + 1}, {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict()})
            last[0] = time.monotonic()

    row, model, masks = run_trial(ctx, t, device, ds=_device_data(ctx, device), state=state, on_epoch=on_epoch)
    data = to_bytes(model.cpu(), ctx.spec, masks) if model is not None else None
    first = {k: row[k] for k in ("prun_acc", "fine_acc", "locked_channels")}  # Tune's table shows the first metrics
    # Where it ran, for result.json / `ray job logs` (not trials.parquet): the GPU ids Ray assigned to this trial and
    # the torch device used (cpu where Ray declared a GPU that CUDA cannot see).
    import ray
    where = {"device": str(device), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
    _report(first | row | where | {"epoch": t.epochs, "row_complete": True}, model_bytes=data)


# A pack reports its finished points at most this often. Tune's function API reports synchronously: the pack waits
# for the driver to take each report (an actor round trip, Tune's result handling, the rows and models written) before
# it goes on, ~10-30 ms on a busy 2-core machine: every 0.5 s that idled each slot 2-6 %, every 2 s under 1.5 %.
# A driver killed between reports makes the pack redo at most this much work (its points have no row yet).
PACK_REPORT_S = 2.0


def run_point(ctx: TrialContext, t: TrialSpec, device: torch.device, ds, state: dict | None = None,
              on_epoch=None) -> tuple[dict, bytes | None]:
    """One grid point of a pack: (row, model file bytes or None). A point that raises becomes its own `error` row
    (what it raised, printed), so the pack's other points still run."""
    t0 = time.perf_counter()
    try:
        row, model, masks = run_trial(ctx, t, device, ds=ds, state=state, on_epoch=on_epoch)
    except Exception as e:  # noqa: BLE001: one point's failure is its row, not the pack's
        why = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        print(f"[sweep] grid point {t.trial_id} failed: {type(e).__name__}: {why}", file=sys.stderr)
        from .trial import base_row
        return base_row(ctx, t) | {"status": "error", "seconds": time.perf_counter() - t0}, None
    return row, (to_bytes(model.cpu(), ctx.spec, masks) if model is not None else None)


def _pack_trainable(config: dict, ctx: TrialContext, threads: int, checkpoint_every: int, checkpoint_min_s: float,
                    gpu_fraction: float, finished: dict | None, points: dict) -> None:
    """A pack: several grid points back to back in one Tune trial (`sweep.pack`), so Tune's per-trial cost (~0.5 s)
    is paid once per pack. Every report carries the points finished since the last one (rows in pack.json, models
    as models/<trial_id>.pt) in a checkpoint, at most every PACK_REPORT_S: the driver's callback writes each row as
    it arrives. The checkpoint also names (ids only) every point of the pack done so far, so a pack restarted from
    it (a worker died, or `--resume`) skips them, and so does one whose points the driver already has (`finished`).
    A checkpoint carries only its own batch's rows and models (every checkpoint is kept: `num_to_keep=None`), so a
    report costs the same at the pack's first point and at its thousandth."""
    from ray import tune
    # the config names its points by id (Tune's experiment state stays small); an older experiment's, by value
    specs = [TrialSpec(**(points[p] if isinstance(p, str) else p)) for p in config["pack"]]
    torch.set_num_threads(threads)
    device = pick_device()
    cap_gpu_memory(device, gpu_fraction)
    done: dict[str, None] = {}  # the points done, in order (their rows went with earlier reports)
    state, state_point = None, None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            if (Path(d) / PACK_FILE).is_file():
                saved = json.loads((Path(d) / PACK_FILE).read_text())
                done, state_point = dict.fromkeys(saved["done"]), saved.get("state_point")
            if state_point and (Path(d) / "state.pt").exists():
                state = torch.load(Path(d) / "state.pt", map_location=device, weights_only=True)
    skip = set(done) | set(finished or ())
    batch: list[tuple[dict, bytes | None]] = []
    ds = _device_data(ctx, device)
    budget = config.get("budget_s")  # a first pack of `pack: auto` (PackSearcher): it times points, then hands back
    ran: list[dict] = []             # status and seconds of the points this run ran, in order (the timing)

    def report(final: bool, next_point: str | None, point_state: dict | None = None, point: str | None = None,
               extra: dict | None = None):
        # batch_points: which points this report brings (result.json keeps every report: a record of what ran)
        metrics = {"points_done": len(done), "pack_size": len(specs), "pack_complete": final,
                   "batch_points": " ".join(r["trial_id"] for r, _ in batch)} | (extra or {})
        if not batch and point_state is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "models").mkdir()
            for row, data in batch:
                if data is not None:
                    (Path(d) / "models" / f"{row['trial_id']}.pt").write_bytes(data)
            if point_state is not None:
                torch.save(point_state, Path(d) / "state.pt")
            # digests: the driver checks each model file against the sha256 of the bytes written here (~0.3 ms)
            # instead of loading it (~10 ms of the driver's CPU per point); every reader of models/ loads and checks it
            (Path(d) / PACK_FILE).write_text(json.dumps({
                "done": list(done), "rows": {r["trial_id"]: r for r, _ in batch},
                "digests": {r["trial_id"]: hashlib.sha256(data).hexdigest() for r, data in batch if data is not None},
                "batch": [r["trial_id"] for r, _ in batch], "next": next_point, "state_point": point}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        batch.clear()

    todo = [t for t in specs if t.trial_id not in skip]
    last, start = [time.monotonic()], time.monotonic()
    for i, t in enumerate(todo):
        ckpt_last = [time.monotonic()]

        def on_epoch(epoch, model, opt, masks, t=t, ckpt_last=ckpt_last):
            due = (epoch + 1) % checkpoint_every == 0 and time.monotonic() - ckpt_last[0] >= checkpoint_min_s
            if due and epoch + 1 < t.epochs:
                report(False, t.trial_id, {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict()},
                       t.trial_id)
                ckpt_last[0] = last[0] = time.monotonic()

        row, data = run_point(ctx, t, device, ds, state if t.trial_id == state_point else None, on_epoch)
        done[t.trial_id] = None
        batch.append((row, data))
        ran.append({"status": row.get("status"), "seconds": row.get("seconds")})
        # a timing pack stops once a point ran warm and its budget is spent; the points it did not run go back
        timed = budget is not None and len(ran) - warm_points(ran) >= PROBE_TIMED and \
            time.monotonic() - start >= budget
        nxt = todo[i + 1].trial_id if i + 1 < len(todo) and not timed else None
        if nxt is None:
            extra = {"timing_json": json.dumps(ran), "returned": " ".join(u.trial_id for u in todo[i + 1:])} \
                if budget is not None else None
            report(True, None, extra=extra)
            break
        if time.monotonic() - last[0] >= PACK_REPORT_S:
            report(False, nxt)
            last[0] = time.monotonic()
    if not todo:
        report(True, None, extra={"timing_json": "[]", "returned": ""} if budget is not None else None)


def _search_trainable(config: dict, ctx: TrialContext, threads: int, gpu_fraction: float,
                      finished: dict | None) -> None:
    """A targeted search's trial (search.search_trial): a curve task reports its points; a level or thief trial its
    row (a level trial also its model). One that already has its row on disk (a --resume) re-reports it."""
    from ray import tune

    from .search import search_trial, trial_name
    name = trial_name(config)
    if finished and name in finished:
        tune.report(dict(finished[name]) | {"row_complete": True, "rereported": True})
        return
    torch.set_num_threads(threads)
    device = pick_device()
    cap_gpu_memory(device, gpu_fraction)
    result, model, masks = search_trial(ctx, config, device, ds=_device_data(ctx, device))
    if config["phase"] == "curve":  # as text: Tune's loggers take scalars (a list makes a warning per task)
        tune.report({"curve_json": json.dumps(result["curve"]), "seconds": result["seconds"]})
        return
    data = to_bytes(model.cpu(), ctx.spec, masks) if model is not None else None
    _report(result | {"trial_id": name, "row_complete": True}, model_bytes=data)


def _trial_name(trial) -> str:
    if "pack" in trial.config:
        from .tune_rows import pack_ids
        return pack_name(pack_ids(trial.config))
    if "phase" in trial.config:
        from .search import trial_name
        return trial_name(trial.config)
    return TrialSpec(**trial.config["trial"]).trial_id


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Join the cluster in RAY_ADDRESS (as `ray job submit` sets it), else start a private local instance.

    Never `ray.init(address=None)`: with RAY_ADDRESS unset that silently joins whatever Ray happens to run on the
    machine (someone else's). Returns whether this process started the instance it is connected to: only then does
    the sweep know the cluster's resources are all there will ever be."""
    import ray
    if ray.is_initialized():
        return started_local_ray()
    address = os.environ.get("RAY_ADDRESS") or "local"
    local = address == "local"
    from .console import verbose
    # Workers' prints (Tune's per-trial lines) reach the console only with --verbose; they stay in Ray's logs.
    temp = tempfile.mkdtemp(prefix="gradauth-ray-") if local else None
    ray.init(address=address, num_cpus=num_cpus if local else None, include_dashboard=False if local else None,
             log_to_driver=verbose(), _temp_dir=temp)
    if local:
        _clean_session_files(temp)
        _watch_local_ray(temp)
    return local


def _clean_session_files(temp: str) -> None:
    """A private instance keeps its session files (logs, sockets, spilled objects) in its own temp folder, removed
    when this process shuts Ray down at exit, or by the watchdog (raywatch.py) if this process is killed: nothing
    piles up under /tmp/ray."""
    import atexit

    import ray

    def clean():
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    atexit.register(clean)  # runs before Ray's own atexit shutdown (registered earlier, atexit is LIFO)


_WATCHDOG: list = []  # the watchdog of the local instance this process started (kept referenced)


def _watch_local_ray(session_dir: str | None = None) -> None:
    """Own the private instance's lifetime: a watchdog kills what this process's Ray leaves behind if it is killed
    (raywatch.py). Only the processes this `ray.init` started are ever watched."""
    from . import raywatch
    try:
        from ray._private import worker  # private, but Ray is pinned exactly (pyproject.toml)
        procs = worker._global_node.all_processes
        roots = [info.process.pid for infos in procs.values() for info in infos if info.process is not None]
    except Exception as e:  # an upgrade moved it: run without, and say so
        print(f"[sweep] cannot watch the local Ray's processes ({type(e).__name__}): if this driver is killed, "
              "stop them with `ray stop`", file=sys.stderr)
        return
    watchdog = raywatch.spawn(roots, session_dir)
    if watchdog is not None:
        _WATCHDOG.append(watchdog)


def started_local_ray() -> bool:
    """Whether the Ray this process is connected to was started by this process (`ray.init(address="local")` or a
    bare `ray.init()` that found none), rather than joined (`ray job submit`, RAY_ADDRESS, `ray.init("auto")`)."""
    try:
        from ray._private import worker  # private, but Ray is pinned exactly (pyproject.toml)
        node = worker._global_node
        return bool(node is not None and node.head)
    except Exception:  # an upgrade moved it: assume a cluster, where GPU requests are kept as asked
        return False


def trial_resources(requested: dict, started_here: bool, cluster: dict) -> dict:
    """Per-trial {cpu, gpu}: as the config asks, except that a local Ray this process started with no GPU runs the
    trials on CPU (a laptop). A joined cluster keeps the GPU request even while it has no GPU: its autoscaler adds
    GPU workers for pending trials (cluster.yaml's min_workers may be 0, or the spot node is being replaced)."""
    cpu, gpu = float(requested.get("cpu", 1)), float(requested.get("gpu", 0))
    if gpu and not cluster.get("GPU"):
        if started_here:
            print(f"[sweep] no GPU in this local Ray: running trials on CPU (sweep.resources.gpu={gpu} ignored)",
                  file=sys.stderr)
            gpu = 0.0
        else:
            print(f"[sweep] the cluster has no GPU yet: trials wait for the autoscaler to add GPU workers "
                  f"(sweep.resources.gpu={gpu})", file=sys.stderr)
    return {"cpu": cpu, "gpu": gpu}


def _done_rows(out_dir: Path, specs: list[TrialSpec]) -> dict[str, dict]:
    """Rows that `--resume` keeps: grid points already finished, from trials.parquet and from the row parts a
    killed driver left in trials.d (newer): an `ok` one with its model file, an `unlockable` or `degenerate` one."""
    rows = []
    path = out_dir / rundir.TRIALS
    if path.is_file():
        rows += pd.read_parquet(path).to_dict("records")
    rows += read_parts(out_dir).to_dict("records")
    ids = {s.trial_id for s in specs}
    keep = {}
    for row in rows:
        tid, status = row.get("trial_id"), row.get("status")
        if tid in ids and (status in ("unlockable", "degenerate") or
                           (status == "ok" and rundir.model_path(out_dir, tid).is_file())):
            keep[tid] = row
        elif tid in ids:
            keep.pop(tid, None)  # a newer row of the point that is not finished (an error): run it again
    return keep


def check_trusted_storage(exp_path: str) -> None:
    """`--resume` restores Tune's experiment, which unpickles the state kept in the storage: that storage is
    trusted (only the owner can write it). What can be checked from here is refused: a local experiment folder,
    its parent or its files writable by group or others, owned by another user, or links."""
    if "://" in exp_path:
        return  # s3://, gs://: trusted by its bucket policy, nothing to check from here
    exp = Path(exp_path)
    if not exp.exists():
        return
    uid = os.getuid()
    for p in [exp.parent, exp, *sorted(q for q in exp.iterdir() if not q.is_dir() or q.is_symlink())]:
        st = p.lstat()
        why = ("owned by another user" if st.st_uid != uid else "writable by group or others" if st.st_mode & 0o022
               else "a symbolic link" if p.is_symlink() else None)
        if why:
            raise GradauthError(f"{p} is {why}: --resume would unpickle Tune's state from it; resume only from storage "
                                f"that you alone can write (chmod go-w), or run without --resume to start afresh")


def _storage_file(storage: str, name: str):
    """(pyarrow filesystem, path) of a file directly under the sweep storage: a local path, NFS, s3:// or gs://."""
    import pyarrow.fs as pafs
    if "://" not in storage:
        return pafs.LocalFileSystem(), str(Path(storage).resolve() / name)
    fs, path = pafs.FileSystem.from_uri(storage.rstrip("/"))
    return fs, f"{path}/{name}"


def _read_points(storage: str) -> list | None:
    import pyarrow.fs as pafs
    fs, path = _storage_file(storage, "sweep-points.json")
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def _write_points(storage: str, points: list[str]) -> None:
    fs, path = _storage_file(storage, "sweep-points.json")
    if "://" not in storage:
        write_json(Path(path), points)  # atomic
        return
    with fs.open_output_stream(path) as f:  # one object PUT: all or nothing
        f.write(json.dumps(points).encode())


def concurrent_slots(cfg: Config, resources: dict, cluster: dict) -> int:
    """How many trials the cluster runs at once now: its CPUs (and GPUs) over one trial's, within max_concurrent."""
    fits = [cluster.get(k, 0) / resources[r] for k, r in (("CPU", "cpu"), ("GPU", "gpu")) if resources[r]]
    n = max(1, int(min(fits) + 1e-9)) if fits else 1
    return min(n, cfg.sweep.max_concurrent) if cfg.sweep.max_concurrent else n


def run_sweep(cfg: Config, ctx: TrialContext, out_dir: Path, resume: bool = False) -> pd.DataFrame:
    """Run every grid point as a Tune trial; write out_dir/trials.parquet and out_dir/models/<trial_id>.pt.

    Each trial's row (and model file) is written as the trial finishes, to out_dir/trials.d (rows.py), and live
    states to out_dir/progress.json; at the end the rows are compacted into trials.parquet. `resume=True` keeps the
    grid points already finished, in trials.parquet or in trials.d (so a sweep grown by new lock values or
    schedules runs only those, and a killed driver loses no finished row), and restores Tune's experiment when it
    was started for a superset of the points still missing: in-flight trials continue from their checkpoints, and a
    trial whose end Tune's last snapshot missed re-reports its row on disk instead of training again."""
    from ray import tune

    from .tune_rows import RowWriter, activate, pack_rows_from_result, row_from_result
    if cfg.search.mode == "targeted":
        return run_targeted(cfg, ctx, out_dir, resume)
    specs = grid(cfg)
    if not specs:
        raise GradauthError("the search space is empty: give lock.values and every finetune list at least one value")
    done = _done_rows(out_dir, specs) if resume else {}
    pending = [s for s in specs if s.trial_id not in done]
    if done:
        print(f"[sweep] --resume: {len(done)} of {len(specs)} grid points already finished, "
              f"{len(pending)} to run", file=sys.stderr)
    if not pending:
        return SweepLog(out_dir, cfg.name, [s.trial_id for s in specs], done, fresh=not resume).compact()
    storage = rundir.tune_storage(cfg, out_dir)
    exp_path = rundir.experiment_path(storage)
    # Which grid points the experiment in exp_path was started for: restoring it is right only if they include
    # every point still missing and the others are finished (same config, killed driver); after the grid changed,
    # a fresh experiment runs the new points. The marker lives in the storage next to the experiment, so a new
    # head (output dir lost) can still restore it.
    points = sorted(s.trial_id for s in pending)
    started_for = set(_read_points(storage) or [])
    restore = resume and started_for >= set(points) and started_for - set(points) <= set(done)
    if restore:
        check_trusted_storage(exp_path)  # before Tune unpickles anything there
        restore = tune.Tuner.can_restore(exp_path)
    log = SweepLog(out_dir, cfg.name, [s.trial_id for s in specs], done, fresh=not resume)
    started_here = ensure_ray()
    import ray
    resources = trial_resources(cfg.sweep.resources, started_here, ray.cluster_resources())
    cpu = resources["cpu"]
    packs = searcher = None
    if cfg.sweep.pack != 1 and not restore:
        slots = concurrent_slots(cfg, resources, ray.cluster_resources())
        seconds = point_seconds(list(done.values()))
        if cfg.sweep.pack == "auto" and len(pending) > slots:
            # packs handed out as slots free up (PackSearcher): the first ones time a few points across the grid
            # in the trials' own workers, so no separate probe pays its own workers' start before Tune's
            from .tune_rows import PackSearcher
            searcher = PackSearcher([s.trial_id for s in pending], slots, cfg.sweep.pack_seconds, seconds)
            print(f"[sweep] pack: auto: {len(pending)} grid points handed out in packs as trials start, "
                  + (f"{searcher.size} a pack (~{seconds:.2f} s a point, {slots} at a time)" if seconds else
                     f"sized by the first {sum(map(len, searcher.probes))} points' timing (in sweep.log)"),
                  file=sys.stderr)
        else:
            size = pack_size(cfg.sweep.pack, cfg.sweep.pack_seconds, seconds, len(pending), slots)
            packs = make_packs(pending, size)
            print(f"[sweep] pack: {len(pending)} grid points in {len(packs)} Tune trials of up to {size}"
                  + (f" (~{seconds:.2f} s a point, {slots} at a time)" if seconds else ""), file=sys.stderr)
    trainable = tune.with_resources(
        tune.with_parameters(tune_trainable, ctx=ctx, threads=max(1, int(cpu)), checkpoint_every=cfg.sweep.checkpoint_every,
                             checkpoint_min_s=cfg.sweep.checkpoint_min_s, gpu_fraction=resources["gpu"],
                             finished={t: done[t] for t in started_for & set(done)} if restore else None,
                             plugins=registry.snapshot(),
                             points={s.trial_id: asdict(s) for s in specs} if cfg.sweep.pack != 1 or restore
                             else None),
        resources)
    if restore:
        print(f"[sweep] resuming {exp_path}", file=sys.stderr)
        tuner = tune.Tuner.restore(exp_path, trainable, resume_errored=True)
    else:
        if not cfg.sweep.storage and Path(exp_path).exists():
            shutil.rmtree(exp_path)  # a fresh experiment must not mix with an old one's trials
        _write_points(storage, points)
        space = (None if searcher is not None else
                 {"pack": tune.grid_search([[s.trial_id for s in pk] for pk in packs])} if packs is not None else
                 {"trial": tune.grid_search([asdict(s) for s in pending])})
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.sweep.max_concurrent, reuse_actors=True,
                                        search_alg=searcher, num_samples=-1 if searcher is not None else 1,
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(
                name=rundir.EXPERIMENT, storage_path=storage, callbacks=[RowWriter()],
                failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None), verbose=1))
    from .console import SweepProgress, to_log
    progress = SweepProgress(log)
    activate(log, ctx, tick=progress.tick, specs={s.trial_id: s for s in specs})
    try:
        with to_log(out_dir / rundir.SWEEP_LOG), _state_period(len(pending)):
            results = tuner.fit()
    finally:
        activate(None, None)
        log.flush(force=True)
        progress.close()
    # Grid points the callback did not see finish: a restored experiment had finished them before (a new head node
    # whose output folder was lost restores everything from sweep.storage).
    missing = {s.trial_id for s in pending} - set(log.rows)
    extra = []
    for r in results:
        if "pack" in r.config:
            extra += pack_rows_from_result(r, ctx, out_dir / rundir.MODELS, missing, {s.trial_id: s for s in specs})
        elif TrialSpec(**r.config["trial"]).trial_id in missing:
            extra.append(row_from_result(r, ctx, out_dir / rundir.MODELS))
    return log.compact(extra)


@contextlib.contextmanager
def _state_period(n: int):
    """How often Tune snapshots its experiment state (TUNE_GLOBAL_CHECKPOINT_S, read when `fit` builds its
    controller): every max(10 s, n / 10 s); an owner's own TUNE_GLOBAL_CHECKPOINT_S wins.

    A snapshot holds every trial (~24 KB each), so a period that grows with the sweep keeps the bytes written per
    second, and per trial, the same at any size (~24 KB × 10 s / trials per second); Tune's own "auto" period (10 s,
    or 19 × the time a snapshot took) makes them grow ∝ N. `CheckpointConfig(num_to_keep=None)` goes with it: in
    Ray 2.60 a `num_to_keep` forces a full snapshot whenever a trial saved that many checkpoints since the last one
    (with num_to_keep=1, one per trial: issue 14); without it each trial keeps its checkpoints (few: at most one per
    `sweep.checkpoint_min_s`), so any checkpoint an older snapshot names still exists.

    What a killed driver can lose is bounded by the period: nothing finished (rows are on disk as trials finish,
    rows.py, and a trial a snapshot still shows running re-reports its row on --resume instead of training again);
    running trials restart from the checkpoint the last snapshot knew, or from their start if they began after it."""
    key = "TUNE_GLOBAL_CHECKPOINT_S"
    old = os.environ.get(key)
    if old is None:
        os.environ[key] = str(max(10.0, n / 10))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)


SEARCH_FILE = rundir.SEARCH


def write_search(out_dir: Path, planner) -> dict:
    """DIR/search.json (atomic): the planner's progress toward each target (`Planner.summary()`) and the lock curve
    measured so far, for `gradauth status` and the owner. Plain JSON, rewritten as the search goes."""
    summary = planner.summary()
    obj = {"version": 1, "updated": time.time(), "summary": summary,
           "curve": [planner.curve[v] for v in sorted(planner.curve)], "lock_bound": planner.lock_bound,
           "base_acc": planner.base_acc}
    write_json(out_dir / SEARCH_FILE, obj)
    return summary


def _saved_planner(exp_path: str):
    """The planner in the newest searcher state Tune saved in a local experiment folder (JSON, never unpickled), or
    None."""
    from .search import Planner
    if "://" in exp_path:
        return None
    files = sorted(Path(exp_path).glob("searcher-state-*"))  # Ray's names; the session timestamp sorts them
    try:
        return Planner.from_state(json.loads(files[-1].read_text())["planner"]) if files else None
    except (OSError, ValueError, KeyError, TypeError, GradauthError):
        return None


def _targeted_done(out_dir: Path) -> dict[str, dict]:
    """Rows a targeted `--resume` keeps: level rows `ok` with their model file, thief rows `ok`, and `unlockable` or
    `degenerate` level rows (from trials.parquet and the parts a killed driver left)."""
    rows = []
    path = out_dir / rundir.TRIALS
    if path.is_file():
        rows += pd.read_parquet(path).to_dict("records")
    rows += read_parts(out_dir).to_dict("records")
    keep = {}
    for row in rows:
        tid, status, phase = row.get("trial_id"), row.get("status"), row.get("phase")
        if phase not in ("level", "thief"):
            continue
        if status in ("unlockable", "degenerate") or (status == "ok" and (
                phase == "thief" or rundir.model_path(out_dir, tid).is_file())):
            keep[tid] = row
        else:
            keep.pop(tid, None)
    return keep


def print_search_outcome(summary: dict) -> None:
    for lv in summary["levels"]:
        if lv["status"] == "hit":
            sell = ("" if "sellable" not in lv else
                    f", {'sellable' if lv['sellable'] else 'NOT sellable'} ({lv['margin_over_thief']:+.3f} over the "
                    f"best thief)")
            print(f"[search] level {lv['level']}: target {lv['target']:.3f} hit: {lv['fine_acc']:.3f} ± "
                  f"{lv['fine_acc_std']:.3f} over {lv['seeds']} seed(s), lock {lv['lock_value']:g}, schedule "
                  f"{lv['schedule']}{sell}", file=sys.stderr)
        else:
            print(f"[search] level {lv['level']}: target {lv['target']:.3f} {lv['status']}: {lv.get('why', '')}",
                  file=sys.stderr)
    print(f"[search] {summary['trials']} trials, {summary['trial_seconds']:.0f} trial-seconds"
          f"{'' if summary['all_hit'] else ' — not every target was hit: see above'}", file=sys.stderr)


def run_targeted(cfg: Config, ctx: TrialContext, out_dir: Path, resume: bool = False) -> pd.DataFrame:
    """`search.mode: targeted`: the TargetedSearcher (search.py) proposes every trial (lock-curve tasks, level
    candidates, thief attacks) through Tune; rows land in trials.d / trials.parquet with their `phase` as trials
    finish, the search's progress in DIR/search.json. An infeasible intent is refused here, before Ray starts.
    `resume=True` restores the killed driver's experiment (and with it the searcher's JSON state); where it cannot
    be restored, a fresh search runs and every trial whose row is on disk re-reports it instead of training."""
    from ray import tune

    from .search import Planner
    from .tune_rows import DriverSearcher, RowWriter, activate, row_from_result, trial_ident
    planner = Planner(cfg.search, ctx.base_acc, ctx.lock_bound, cfg.select.min_gap, cfg.importance[0].label,
                      cfg.lock.mode)  # validates the intent against the base: one line, exit 2, before Ray
    print(f"[search] targets {', '.join(f'{t:.3f}' for t in planner.targets)} (base {ctx.base_acc:.3f}, lock bound "
          f"{ctx.lock_bound:.3f}, tolerance {cfg.search.tolerance:g})", file=sys.stderr)
    done = _targeted_done(out_dir) if resume else {}
    storage = rundir.tune_storage(cfg, out_dir)
    exp_path = rundir.experiment_path(storage)
    marker = [f"targeted:{cfg.hash()}:{ctx.base_acc!r}"]  # the experiment in exp_path is this search's
    restore = resume and _read_points(storage) == marker
    if restore:
        check_trusted_storage(exp_path)  # before Tune unpickles anything there
        restore = tune.Tuner.can_restore(exp_path)
    if done:
        print(f"[sweep] --resume: {len(done)} trials of the search already have their rows", file=sys.stderr)
    log = SweepLog(out_dir, cfg.name, list(done), done, fresh=not resume)
    started_here = ensure_ray()
    import ray
    resources = trial_resources(cfg.sweep.resources, started_here, ray.cluster_resources())
    trainable = tune.with_resources(
        tune.with_parameters(tune_trainable, ctx=ctx, threads=max(1, int(resources["cpu"])),
                             checkpoint_every=cfg.sweep.checkpoint_every, checkpoint_min_s=cfg.sweep.checkpoint_min_s,
                             gpu_fraction=resources["gpu"], finished=done or None, plugins=registry.snapshot()),
        resources)
    last = {"planner": planner}
    from .console import SearchProgress
    progress = SearchProgress(log)

    def on_search(p):
        last["planner"] = p
        progress.update(write_search(out_dir, p))

    if restore:
        print(f"[sweep] resuming {exp_path} (the searcher's state is restored with it)", file=sys.stderr)
        tuner = tune.Tuner.restore(exp_path, trainable, resume_errored=True)
        last["planner"] = _saved_planner(exp_path) or planner  # search.json's figures if no trial is left to run
    else:
        if not cfg.sweep.storage and Path(exp_path).exists():
            shutil.rmtree(exp_path)  # a fresh experiment must not mix with an old one's trials
        _write_points(storage, marker)
        searcher = DriverSearcher(planner, cfg.search.max_concurrent)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, reuse_actors=True,
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(
                name=rundir.EXPERIMENT, storage_path=storage, callbacks=[RowWriter()],
                failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1))
    progress.update(write_search(out_dir, planner) if not restore else last["planner"].summary())
    activate(log, ctx, on_search, tick=progress.tick)
    from .console import to_log
    try:
        # Tune's tables go to sweep.log as in a grid sweep; the outcome per target is printed below. A targeted sweep
        # keeps num_to_keep=1 (a snapshot per checkpoint): its searcher's state rides on the snapshots, and its
        # trials are few (search.max_trials), so the cost that made the grid drop it does not arise.
        with to_log(out_dir / rundir.SWEEP_LOG):
            results = tuner.fit()
    finally:
        activate(None, None)
        log.flush(force=True)
        progress.close()
    extra = []
    for r in results:
        ident = trial_ident(r.config)
        if ident is not None and ident[0] not in log.rows:
            extra.append(row_from_result(r, ctx, out_dir / rundir.MODELS))
    summary = write_search(out_dir, last["planner"])
    print_search_outcome(summary)
    return log.compact(extra)


def run_sequential(ctx: TrialContext, specs: list[TrialSpec], device: torch.device) -> list[dict]:
    """The same trials back to back in this process, no Ray (the benchmark's baseline)."""
    ds = ctx.ds.to(device)
    return [run_trial(ctx, t, device, ds=ds)[0] for t in specs]
