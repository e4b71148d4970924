"""Benchmarks: `gradauth bench NAME` writes results/bench/NAME.json.

Every figure is a ratio against a baseline measured in the same process, minutes apart at most, because the
machines these run on are shared and noisy: absolute seconds are recorded but only ratios are claims.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import rundir
from .errors import GradauthError
from .fsutil import write_json
from .machine import machine

BENCHES = ("sweep", "slicing", "gpu", "search", "scale")


def _tensor_pipeline_ips(model, ds, batch_size: int, epochs: int = 1) -> float:
    from .engine import FitSpec, fit, make_optimizer
    spec = FitSpec(epochs, 0.01, batch_size)
    t0 = time.perf_counter()
    fit(model, ds, ds.train, spec, make_optimizer(model.parameters(), spec))
    return epochs * len(ds.train) / (time.perf_counter() - t0)


def _dataloader_pipeline_ips(model, ds, batch_size: int, epochs: int = 1) -> float:
    """The conventional pipeline: PIL images, torchvision transforms per image, a DataLoader (workers=0 and 2)."""
    import torch.nn.functional as F
    import torchvision.transforms as T
    from PIL import Image
    mode = "L" if ds.in_channels == 1 else "RGB"
    images = [Image.fromarray(x.permute(1, 2, 0).squeeze(-1).numpy(), mode) for x in ds.train.x]
    tf = T.Compose([T.RandomCrop(ds.image_size, padding=ds.crop_pad)] + ([T.RandomHorizontalFlip()] if ds.flip else [])
                   + [T.ToTensor(), T.Normalize(ds.mean, ds.std)])

    class _DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return tf(images[i]), int(ds.train.y[i])

    loader = torch.utils.data.DataLoader(_DS(), batch_size=batch_size, shuffle=True, num_workers=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return epochs * len(images) / (time.perf_counter() - t0)


def bench_pipeline(cfg, ds, repeats: int = 2) -> dict:
    """Fine-tune images/s: in-memory uint8 tensors + batch augmentation vs DataLoader + PIL transforms, same model."""
    from .models import build_model
    res = {"tensor": [], "dataloader_pil": []}
    for _ in range(repeats):  # interleaved so drift in machine load hits both alike
        torch.manual_seed(0)
        m = build_model(cfg.model.arch, ds.num_classes, ds.in_channels, cfg.model.width)
        res["tensor"].append(_tensor_pipeline_ips(m, ds, cfg.finetune.batch_size))
        torch.manual_seed(0)
        m = build_model(cfg.model.arch, ds.num_classes, ds.in_channels, cfg.model.width)
        res["dataloader_pil"].append(_dataloader_pipeline_ips(m, ds, cfg.finetune.batch_size))
    best = {k: max(v) for k, v in res.items()}
    return {"model": f"{cfg.model.arch} ×{cfg.model.width}", "dataset": ds.name, "images": len(ds.train),
            "images_per_s": best, "all_runs": res, "speedup": best["tensor"] / best["dataloader_pil"]}


def bench_sweep(out: Path, repeats: int = 2) -> dict:
    """Quickstart trials: Ray Tune vs back to back in one plain process; 1 vs 2 concurrent; data pipelines."""
    import ray

    from .config import load_config
    from .data import load_dataset
    from .pipeline import train_stage, trial_context
    from .sweep import run_sequential, run_sweep
    from .trial import grid
    cfg = load_config(Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml")
    ds = load_dataset(cfg.data, cfg.seed)
    result = {"bench": "sweep", "machine": machine(), "config": "sweeps/quickstart.yaml", "trials": len(grid(cfg))}
    if os.getloadavg()[0] > 1.5:
        print(f"[bench] warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: other work skews "
              "the figures (the ratios are interleaved, absolute seconds are not)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_stage(cfg, tmp, ds)
        ctx = trial_context(cfg, tmp, ds)
        specs = grid(cfg)
        cpus = os.cpu_count() or 2

        torch.set_num_threads(cpus)
        same = f"ray_1x{cpus}threads"
        modes = ((same, 1, cpus), ("ray_1_concurrent", 1, 1), ("ray_2_concurrent", 2, 1))
        runs: dict[str, list[float]] = {"plain_process": [], **{m[0]: [] for m in modes}}
        load = [os.getloadavg()]
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        try:
            for rep in range(repeats):  # interleaved: drift in the machine's load hits every mode alike
                t0 = time.perf_counter()
                run_sequential(ctx, specs, torch.device("cpu"))
                runs["plain_process"].append(time.perf_counter() - t0)
                for name, conc, cpu in modes:
                    cfg.sweep.max_concurrent, cfg.sweep.resources = conc, {"cpu": cpu, "gpu": 0}
                    t0 = time.perf_counter()
                    run_sweep(cfg, ctx, tmp / f"{name}-{rep}")
                    runs[name].append(time.perf_counter() - t0)
        finally:
            ray.shutdown()
        load.append(os.getloadavg())
    best = {k: min(v) for k, v in runs.items()}
    plain = best["plain_process"]
    result |= {
        "seconds": best, "all_runs": runs, "load_average_before_after": load,
        "ray_overhead_vs_plain": best[same] / plain - 1,
        "ray_default_packing_vs_plain": best["ray_2_concurrent"] / plain - 1,
        "scaling_2_vs_1_concurrent": best["ray_1_concurrent"] / best["ray_2_concurrent"],
        "trials_per_hour": {k: len(specs) * 3600 / v for k, v in best.items()},
        "notes": (f"Best of {repeats} interleaved runs per mode. plain_process: the trials back to back in this "
                  f"process, all cores as torch threads. {same}: the same schedule through Tune, one trial at a "
                  "time (pure per-trial overhead: Tune costs ~0.1 s per trial even for an empty one). "
                  "ray_N_concurrent: N one-thread trials at a time; ray_2_concurrent is how the quickstart runs, "
                  "so ray_default_packing_vs_plain is the sweep's wall against the plain process's."),
    }
    if not torch.cuda.is_available():
        result["gpu"] = ("not measured: no CUDA device here; the VGG-19 CIFAR-10 trials-per-hour figures at 1 and "
                         "0.25 GPU per trial need a GPU machine")
    result["pipeline"] = {"quickstart": bench_pipeline(cfg, ds)}
    cifar = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
    if (cifar / "cifar-10-batches-py").is_dir():  # CIFAR-sized images show the gap better than 8×8 digits
        c = load_config(Path(__file__).resolve().parents[1] / "sweeps" / "cifar10-cpu.yaml")
        c.data.root, c.data.train_subset = str(cifar), 4096
        result["pipeline"]["cifar10_resnet20_half"] = bench_pipeline(c, load_dataset(c.data, c.seed), repeats=1)
    return result


SCALE_N = (100, 1000)  # GRADAUTH_BENCH_SCALE_N="100,1000,5000" to change


def scale_config(n: int, base_epochs: int = 10):
    """Tiny trials (issue 14): the quickstart model at half width, 1 fine-tune epoch on 5 % of the data; n trials as
    10 lock rates (0.05 … 0.32, below the rates that empty a layer) × n/10 seeds. Every trial fine-tunes
    (lock_bound 0.9)."""
    import yaml

    from .config import parse_config
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml").read_text())
    if n % 10:
        raise GradauthError(f"bench scale: N={n} is not a multiple of 10 (10 lock rates × N/10 seeds)")
    raw["name"] = f"scale-{n}"
    raw["model"]["width"] = 1.0
    raw["train"]["epochs"] = base_epochs  # the base is shared by every N; its accuracy is no claim here
    raw["lock"]["values"] = [round(0.05 + 0.03 * i, 2) for i in range(10)]
    raw["finetune"] |= {"epochs": [1], "lr": [0.01], "data_fraction": [0.05], "seeds": list(range(n // 10))}
    raw["sweep"] |= {"lock_bound": 0.9}
    return parse_config(raw, f"bench scale N={n}")


def _proc_io() -> dict:
    """This process's I/O counters (/proc/self/io): write_bytes reached the block layer, wchar all write() calls."""
    try:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        return {k: int(fields[k]) for k in ("write_bytes", "wchar", "read_bytes")}
    except (OSError, KeyError, ValueError):
        return {"write_bytes": 0, "wchar": 0, "read_bytes": 0}


def _rss_mb() -> dict:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM") if k in fields}


def _tree(path: Path) -> tuple[int, int]:
    """(bytes, files) under path."""
    size = files = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                size += os.lstat(os.path.join(root, n)).st_size
                files += 1
            except OSError:
                pass
    return size, files


def _plain_worker(args) -> tuple[float, float]:
    """One plain-loop process of the baseline: its share of the sample back to back, one torch thread, no Ray, and
    what a sweep must leave behind, as a sweep without Ray would write it: each fine-tuned point's model file
    (checkpoint.save_model, the bytes the sweep's models/ get) and the rows as one Parquet file. Returns (seconds
    of the loop, seconds of those writes within it); the process is started and warmed up beforehand."""
    ctx, specs, out = args
    from .checkpoint import save_model
    from .rows import TRIALS_SCHEMA, write_trials
    from .trial import run_trial
    torch.set_num_threads(1)
    device = torch.device("cpu")
    out = Path(out) / f"plain-{os.getpid()}"
    t0, writes = time.perf_counter(), 0.0
    ds, rows = ctx.ds.to(device), []
    for t in specs:
        row, model, masks = run_trial(ctx, t, device, ds=ds)
        w0 = time.perf_counter()
        if model is not None:
            save_model(out / f"{t.trial_id}.pt", model.cpu(), ctx.spec, masks)
        rows.append({k: row.get(k) for k in TRIALS_SCHEMA.names} | {"phase": "grid"})
        writes += time.perf_counter() - w0
    w0 = time.perf_counter()
    write_trials(rows, out / "trials.parquet")
    total = time.perf_counter() - t0
    return total, writes + time.perf_counter() - w0


def _plain_parallel(pool, ctx, specs, slots: int, out: Path) -> tuple[float, float]:
    """(seconds per trial, share of them spent writing models and rows) of `specs` run by `slots` plain processes
    at once (the sweep's parallelism, no Ray): the slowest process's loop over the sample's size."""
    shares = [specs[i::slots] for i in range(slots)]
    got = pool.map(_plain_worker, [(ctx, sh, str(out)) for sh in shares])
    slowest = max(got)
    return slowest[0] / len(specs), slowest[1] / slowest[0]


def _plain_cold(ctx, specs, slots: int, out: Path) -> float:
    """Wall seconds of `specs` run by `slots` plain processes started for them (spawned, as a plain multi-process loop
    starts: the imports, torch's lazy ones and the first fine-tune's warm-up included), no Ray."""
    import multiprocessing
    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(slots) as pool:
        _plain_parallel(pool, ctx, specs, slots, out)
    return time.perf_counter() - t0


def bench_scale(ns: tuple[int, ...] = SCALE_N, sample: int = 200, pack=None) -> dict:
    """The driver as the sweep grows: per trial, its CPU seconds, the bytes it writes (/proc/self/io) and what lands
    in Ray's storage, its memory, `gradauth status` and `--resume` times, and Ray's overhead against the same trials
    in plain processes at the same parallelism (no Ray), measured just before and just after each sweep on a sample
    of its grid points (every N/sample-th). The sweep packs grid points into Tune trials as `pack` says (default
    auto; $GRADAUTH_BENCH_SCALE_PACK=1 measures it unpacked). Only per-trial ratios between N are claims."""
    import multiprocessing

    from .data import load_dataset
    from .pipeline import train_stage, trial_context
    from .status import sweep_status
    from .sweep import ensure_ray, run_sweep
    from .trial import grid
    pack = pack or "auto"
    cpus = os.cpu_count() or 2
    result = {"bench": "scale", "machine": machine(), "trials": "quickstart ×1.0 width, 1 epoch, 5 % data",
              "pack": pack, "load_average_start": os.getloadavg(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg0 = scale_config(ns[0])
        ds = load_dataset(cfg0.data, cfg0.seed)
        train_stage(cfg0, tmp / "base", ds)
        ctx = trial_context(cfg0, tmp / "base", ds)
        torch.set_num_threads(1)
        ensure_ray(num_cpus=cpus)
        import ray
        slots = int(ray.cluster_resources().get("CPU", 1))
        # the baseline's processes: started (spawned: never a fork of a Ray driver) and warmed up before any timing
        pool = multiprocessing.get_context("spawn").Pool(slots)
        _plain_parallel(pool, ctx, grid(cfg0)[:2 * slots], slots, tmp / "warm")
        for n in ns:
            cfg = scale_config(n)
            cfg.sweep.max_concurrent = slots
            cfg.sweep.pack = pack
            specs = grid(cfg)
            picked = specs[::max(1, n // sample)][:sample]
            out = tmp / f"n{n}"
            out.mkdir()
            plain_before, writes_before = _plain_parallel(pool, ctx, picked, slots, tmp / f"plain{n}-before")
            cold_wall = _plain_cold(ctx, picked, slots, tmp / f"plain{n}-cold")
            logs0 = _tree(_ray_logs())[0]
            io0, cpu0, t0, load0 = _proc_io(), time.process_time(), time.perf_counter(), os.getloadavg()
            df = run_sweep(cfg, ctx, out)
            wall, cpu, io1 = time.perf_counter() - t0, time.process_time() - cpu0, _proc_io()
            load1 = os.getloadavg()
            plain_after, writes_after = _plain_parallel(pool, ctx, picked, slots, tmp / f"plain{n}-after")
            plain = (plain_before + plain_after) / 2
            cold_start = max(0.0, cold_wall - len(picked) * plain)  # what a plain loop's fresh processes add, once
            writes = (writes_before + writes_after) / 2
            storage, storage_files = _tree(out / rundir.RAY)
            ray_logs = _tree(_ray_logs())[0] - logs0
            state = sum(p.stat().st_size for p in (out / rundir.RAY / rundir.EXPERIMENT).glob("experiment_state*.json"))
            packs = sum(1 for p in (out / rundir.RAY / rundir.EXPERIMENT).iterdir() if p.is_dir())
            out_bytes, out_files = _tree(out)
            (out / rundir.CONFIG).write_text(yaml_dump(cfg))
            status_s = min(_timed(lambda: sweep_status(out)) for _ in range(3))
            counts = sweep_status(out)
            resume_s = _timed(lambda: run_sweep(cfg, ctx, out, resume=True))
            result["runs"][str(n)] = {
                "trials": n, "tune_trials": packs, "ok": int((df["status"] == "ok").sum()), "wall_s": wall,
                "wall_s_per_trial": wall / n, "driver_cpu_s_per_trial": cpu / n,
                "driver_write_bytes_per_trial": (io1["write_bytes"] - io0["write_bytes"]) / n,
                "driver_wchar_per_trial": (io1["wchar"] - io0["wchar"]) / n,
                "ray_storage_bytes_per_trial": storage / n, "ray_storage_files_per_trial": storage_files / n,
                "output_bytes_per_trial": out_bytes / n, "output_files_per_trial": out_files / n,
                "ray_session_logs_bytes_per_trial": ray_logs / n, "experiment_state_bytes_per_trial": state / n,
                "driver_rss_mb": _rss_mb(), "status_s": status_s,
                "status_counts": {k: counts[k] for k in ("done", "running", "pending", "failed")},
                "resume_s_all_done": resume_s,
                "plain_s_per_trial_before_after": [plain_before, plain_after], "plain_sample": len(picked),
                "plain_writes_share": writes,
                "ray_overhead_vs_plain": wall / n / plain - 1,
                "plain_cold_wall_s": cold_wall, "plain_cold_start_s": cold_start,
                "ray_overhead_vs_cold_plain": wall / (cold_start + n * plain) - 1,
                "ray_overhead_vs_plain_compute_only": wall / n / (plain * (1 - writes)) - 1,
                "load_average_before_after": [load0, load1]}
            print(f"[bench] N={n}: {json.dumps(result['runs'][str(n)])}", file=sys.stderr)
        pool.close()
        pool.join()
        ray.shutdown()
    runs = list(result["runs"].values())
    if len(runs) > 1:
        a, b = runs[0], runs[-1]
        result["growth_first_to_last"] = {k: b[k] / a[k] - 1 if a[k] else None for k in (
            "driver_cpu_s_per_trial", "driver_write_bytes_per_trial", "driver_wchar_per_trial", "wall_s_per_trial",
            "ray_storage_bytes_per_trial")}
        # what one more trial costs, the fixed start (Ray's workers, Tune's setup, timing the first points) left out
        plain_b = sum(b["plain_s_per_trial_before_after"]) / 2
        result["marginal_ray_overhead_vs_plain"] = ((b["wall_s"] - a["wall_s"]) / (b["trials"] - a["trials"])
                                                    / plain_b - 1)
    result["load_average_end"] = os.getloadavg()
    result["notes"] = (
        f"{slots} trials at a time, one torch thread each; the sweep packs grid points into Tune trials (sweep.pack "
        f"= {pack}). plain: every (N/{sample})-th grid point, {slots} plain processes at once (no Ray, one thread "
        "each), timed just before and just after each sweep; like the sweep, each plain process writes every "
        "fine-tuned point's model file and its rows (Parquet): plain_writes_share is that part of its time. "
        "ray_overhead_vs_plain = the sweep's wall per trial "
        "(Ray's start excluded; Tune's setup, its workers' start and warm-up and the packs' timing included) / the "
        "warm plain processes' − 1; ray_overhead_vs_cold_plain: the same against a plain loop that starts its own "
        "processes (plain_cold_start_s: the sample run by freshly spawned processes, less its warm time: imports, "
        "torch's lazy imports, the first fine-tune) and then runs all N trials warm; "
        "ray_overhead_vs_plain_compute_only: against the plain loop less its writes (trials that leave nothing); "
        "marginal_ray_overhead_vs_plain: the same for the trials between the first and the last N (the fixed start "
        "cancels). On a shared, loaded machine both sides include everyone else's load: see load_average_*. "
        "driver_write_bytes: what reached the disk from the driver process (rows, models, Tune's experiment "
        "state); Ray's storage dir also gets the workers' checkpoints. resume_s_all_done: `--resume` of the "
        "finished sweep (reads rows, starts no trial).")
    return result


def _ray_logs() -> Path:
    """The Ray session's log folder (the driver's own core-worker log is written by this process)."""
    try:
        from ray._private import worker  # private, but Ray is pinned exactly (pyproject.toml)
        return Path(worker._global_node.get_session_dir_path()) / "logs"
    except Exception:
        return Path("/nonexistent")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def yaml_dump(cfg) -> str:
    from .config import dump_config
    return dump_config(cfg)




SEARCH_PAIRS = (("quickstart", "quickstart.yaml", "quickstart-targeted.yaml"),
                ("cifar10-cpu", "cifar10-cpu.yaml", "cifar10-cpu-targeted.yaml"))


def _seed_base(src: Path, dest: Path, cfg) -> None:
    """Start `dest` from the committed base model in `src` when it is this config's (same base_hash): both sides of
    the comparison fine-tune the same base, and nobody waits for it to be trained again."""
    dest.mkdir(parents=True, exist_ok=True)
    info = src / rundir.BASE_METRICS
    if info.is_file() and (src / rundir.BASE).is_file() and json.loads(info.read_text()).get("base_hash") == cfg.base_hash():
        for f in (rundir.BASE, rundir.BASE_METRICS):
            (dest / f).write_bytes((src / f).read_bytes())


def _reached(levels: list[float], targets: list[float], tolerance: float) -> list[dict]:
    return [{"target": t, "level": g, "within_tolerance": g is not None and abs(g - t) <= tolerance + 1e-9}
            for t, g in zip(targets, list(levels) + [None] * (len(targets) - len(levels)))]


def bench_search_pair(name: str, grid_cfg, targeted_cfg, work: Path, base_from: Path | None = None,
                      dirs: tuple[Path, Path] | None = None) -> dict:
    """One config, grid vs targeted, on the same base: trials, trial-seconds (the sum of the trials' own seconds:
    what a cluster bills), wall time, and the levels each reaches against the targeted config's targets.

    With `dirs` = (grid run, targeted run): two finished output folders of `gradauth sweep` on the same base.pt are
    measured instead of run, read only (nothing in them is written); their wall times are not known here."""
    from .pipeline import sweep_stage, train_stage
    from .schema import file_sha256
    from .select import select_levels
    from .status import read_search
    from .trial import grid
    out: dict = {"grid_config": grid_cfg.name, "targeted_config": targeted_cfg.name}
    if dirs is not None:
        g_dir, t_dir = dirs
        shas = {file_sha256(d / rundir.BASE) if (d / rundir.BASE).is_file() else None for d in dirs}
        if len(shas) != 1 or None in shas:
            raise GradauthError(f"bench search: {g_dir} and {t_dir} must hold the same base.pt (one base, two sweeps)")
        info = rundir.read_base_info(g_dir)
        out["measured_from"] = {"grid": str(g_dir), "targeted": str(t_dir), "base_git_sha": info.get("git_sha"),
                                "grid_git_sha": _rows_sha(g_dir), "targeted_git_sha": _rows_sha(t_dir)}
    else:
        g_dir, t_dir = work / "grid", work / "targeted"
        if base_from is not None:
            _seed_base(base_from, g_dir, grid_cfg)
        info = train_stage(grid_cfg, g_dir, resume=True)
        t_dir.mkdir(parents=True, exist_ok=True)
        for f in (rundir.BASE, rundir.BASE_METRICS):
            (t_dir / f).write_bytes((g_dir / f).read_bytes())
    base_acc = float(info["base_acc"])
    sc = targeted_cfg.search
    targets = sc.resolve_targets(base_acc)
    tol = sc.tolerance
    sel = targeted_cfg.select
    runs = {}
    for side, cfg, d in (("grid", grid_cfg, g_dir), ("targeted", targeted_cfg, t_dir)):
        t0 = time.perf_counter()
        df = _finished_rows(cfg, d, side) if dirs is not None else sweep_stage(cfg, d)
        wall = None if dirs is not None else time.perf_counter() - t0
        entry = {"trials": int(len(df)), "trial_seconds": float(df["seconds"].fillna(0).sum()), "wall_s": wall,
                 "statuses": {str(k): int(v) for k, v in df["status"].value_counts().items()}}
        if side == "grid":
            entry["grid_points"] = len(grid(cfg))
            try:
                chosen = select_levels(df, levels=len(targets), min_gap=sel.min_gap,
                                       max_locked_acc=sel.max_locked_acc, targets=targets)
                got = [lv["fine_acc"] for lv in chosen.levels]
            except Exception as e:  # the grid may not offer a level set for these targets at all
                got, entry["selection"] = [], f"no level set: {e}"
        else:
            summary = read_search(d)["summary"]
            # curve tasks are trials too (they are billed): not rows of trials.parquet, counted from the search
            entry["trials"], entry["trial_seconds"] = int(summary["trials"]), float(summary["trial_seconds"])
            entry["seconds_by_phase"] = summary["seconds_by_phase"]
            entry["thief"] = summary["thief"]
            entry["public_lock"] = summary.get("public_lock")   # the lock release would choose for the public model
            got = [lv.get("fine_acc") if lv["status"] == "hit" else None for lv in summary["levels"]]
            entry["missed"] = {str(lv["level"]): lv.get("why") for lv in summary["levels"] if lv["status"] != "hit"}
            entry["sellable"] = [lv.get("sellable") for lv in summary["levels"]]
            entry["hit_trial_seconds"] = _hit_seconds(df, summary["levels"])
        entry["levels"] = _reached(got, targets, tol)
        entry["all_within_tolerance"] = all(r["within_tolerance"] for r in entry["levels"])
        runs[side] = entry
    gsec = max(runs["grid"]["trial_seconds"], 1e-9)
    out |= {"base_acc": base_acc, "targets": targets, "tolerance": tol, **runs,
            "trial_seconds_ratio": runs["targeted"]["trial_seconds"] / gsec,
            # what even a search that guessed every level's lock and schedule at once would pay: the hit levels'
            # own seed trials (a floor for the ratio above on this base)
            "hit_trial_seconds_ratio": runs["targeted"]["hit_trial_seconds"] / gsec,
            "wall_ratio": None if dirs is not None else runs["targeted"]["wall_s"] / max(runs["grid"]["wall_s"], 1e-9)}
    return out


def _finished_rows(cfg, d: Path, side: str):
    """The rows of a finished sweep of `cfg` in folder `d`, read without writing anything there: its config must be
    `cfg` (same hash), a grid must hold a row per grid point and seed, a targeted search must say it finished."""
    from .schema import read_trials
    from .status import read_search
    from .trial import grid
    fix = f"run `gradauth sweep {cfg.name}.yaml --out {d}` to the end first (or `--resume` it)"
    try:
        same = rundir.read_config(d).hash() == cfg.hash()
    except GradauthError:
        same = False
    if not same:
        raise GradauthError(f"bench search: {d} is not a sweep of sweeps/{cfg.name}.yaml as it is now "
                            f"(its config.yaml differs or is missing): {fix}")
    df = read_trials(d / rundir.TRIALS)
    if side == "grid":
        missing = len(grid(cfg)) - len(df)
        if missing > 0:
            raise GradauthError(f"bench search: {d} holds {len(df)} of the grid's {len(grid(cfg))} trials: {fix}")
    else:
        s = read_search(d)
        if s is None or not s["summary"]["finished"]:
            raise GradauthError(f"bench search: the targeted search in {d} has not finished: {fix}")
    return df


def _hit_seconds(df, levels: list[dict]) -> float:
    """Trial-seconds of the rows that make the search's hit levels: each level's lock and schedule, every seed."""
    import numpy as np
    lv_rows = df[df["phase"] == "level"] if "phase" in df else df
    total = 0.0
    for lv in levels:
        if lv.get("status") != "hit":
            continue
        e, lr, f, scope = lv["schedule"]
        m = (np.isclose(lv_rows["lock_value"], lv["lock_value"]) & (lv_rows["ft_epochs"] == e)
             & np.isclose(lv_rows["ft_lr"], lr) & np.isclose(lv_rows["ft_data_fraction"], f)
             & (lv_rows["ft_scope"] == scope))
        total += float(lv_rows.loc[m, "seconds"].fillna(0).sum())
    return total


def _rows_sha(d: Path) -> str | None:
    """The git sha the rows of a finished sweep were made with (one, or a comma-joined list)."""
    import pandas as pd
    shas = sorted(set(pd.read_parquet(d / rundir.TRIALS, columns=["git_sha"])["git_sha"].dropna().astype(str)))
    return ",".join(shas) or None


def _search_dirs(only: list[str] | None) -> dict[str, tuple[Path, Path]]:
    """$GRADAUTH_BENCH_SEARCH_GRID and $GRADAUTH_BENCH_SEARCH_TARGETED (two finished output folders, any path): the
    one pair $GRADAUTH_BENCH_ONLY names, measured from those runs instead of run."""
    if os.environ.get("GRADAUTH_BENCH_SEARCH_DIRS"):
        raise GradauthError("GRADAUTH_BENCH_SEARCH_DIRS is gone (a path could not hold ',' or ':'): set "
                            "GRADAUTH_BENCH_SEARCH_GRID=DIR, GRADAUTH_BENCH_SEARCH_TARGETED=DIR and "
                            "GRADAUTH_BENCH_ONLY=NAME instead")
    g, t = (os.environ.get(f"GRADAUTH_BENCH_SEARCH_{k}", "") for k in ("GRID", "TARGETED"))
    if not (g or t):
        return {}
    if not (g and t and only and len(only) == 1):
        raise GradauthError("measuring a search pair from finished runs takes GRADAUTH_BENCH_SEARCH_GRID=DIR, "
                            "GRADAUTH_BENCH_SEARCH_TARGETED=DIR and GRADAUTH_BENCH_ONLY=NAME (one pair), all three")
    for d in (g, t):
        if not Path(d).is_dir():
            raise GradauthError(f"bench search: {d} is not a folder: give the --out folder of a finished sweep")
    return {only[0]: (Path(g), Path(t))}


def bench_search(out: Path, only: list[str] | None = None) -> dict:
    """`gradauth bench search`: grid vs targeted on the quickstart and the CIFAR-10 CPU config, side by side.
    $GRADAUTH_BENCH_ONLY=quickstart runs only the named pairs (the CIFAR pair takes long on a CPU);
    $GRADAUTH_BENCH_SEARCH_GRID=DIR and $GRADAUTH_BENCH_SEARCH_TARGETED=DIR (with GRADAUTH_BENCH_ONLY naming the one
    pair) measure it from two finished sweeps on one base (`gradauth sweep CONFIG --out DIR` each), read only."""
    from .config import load_config
    root = Path(__file__).resolve().parents[1]
    only = only or [n.strip() for n in os.environ.get("GRADAUTH_BENCH_ONLY", "").split(",") if n.strip()] or None
    if only and (unknown := [n for n in only if n not in {p[0] for p in SEARCH_PAIRS}]):
        raise GradauthError(f"GRADAUTH_BENCH_ONLY: unknown pair(s) {', '.join(unknown)}: choose from "
                            f"{', '.join(p[0] for p in SEARCH_PAIRS)}")
    dirs = _search_dirs(only)   # before minutes of measuring
    result = {"bench": "search", "machine": machine(), "load_average_before": os.getloadavg(), "runs": {}}
    if only and out.is_file():
        # a partial run ($GRADAUTH_BENCH_ONLY) keeps the other pairs' entries of the file, each with its own commit,
        # machine and load averages (a pair is only ever compared within itself)
        try:
            kept = json.loads(out.read_text()).get("runs", {})
        except (OSError, ValueError, AttributeError):
            kept = {}
        result["runs"] = {k: v for k, v in kept.items() if isinstance(v, dict) and k not in only}
    for name, g, t in SEARCH_PAIRS:
        if only and name not in only:
            continue
        gc, tc = load_config(root / "sweeps" / g), load_config(root / "sweeps" / t)
        load0 = os.getloadavg()
        with tempfile.TemporaryDirectory() as tmp:
            run = bench_search_pair(name, gc, tc, Path(tmp), root / "results" / name, dirs.get(name))
        result["runs"][name] = run | {"git_sha": rundir.git_sha(), "machine": machine(), "load_average_before": load0,
                                      "load_average_after": os.getloadavg()}
        write_json(out, result)  # what was measured so far survives a later pair's failure
    result["load_average_after"] = os.getloadavg()
    result["notes"] = ("trial_seconds: the sum of every trial's own seconds (lock-curve tasks and thief attacks "
                       "included on the targeted side), what a cluster bills; levels: the grid's selection for the "
                       "targeted config's targets vs the targeted search's hit levels, each within tolerance or not.")
    return result


def run_bench(name: str, out: Path | None = None) -> Path:
    if name not in BENCHES:
        raise GradauthError(f"unknown benchmark {name!r}: choose one of {', '.join(BENCHES)}")
    out = out or Path("results/bench") / f"{name}.json"
    if out.is_dir() or out.suffix != ".json":  # `--out DIR`: DIR/NAME.json
        out = out / f"{name}.json"
    try:  # before minutes of measuring, not after
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GradauthError(f"--out {out}: cannot create its folder ({e.strerror or e}): give a writable path")
    if not os.access(out.parent, os.W_OK) or out.is_dir():
        raise GradauthError(f"--out {out}: cannot write there: give a writable file path or folder")
    if name == "gpu":
        from .benchgpu import bench_gpu
        if bench_gpu(out)["errors"]:
            raise SystemExit(1)  # the figures that were measured are in `out`; the progress lines say what failed
        return out
    if name == "sweep":
        result = bench_sweep(out)
    elif name == "search":
        result = bench_search(out)
    elif name == "scale":
        try:
            ns = tuple(int(v) for v in os.environ.get("GRADAUTH_BENCH_SCALE_N", "").split(",") if v.strip()) or SCALE_N
        except ValueError:
            raise GradauthError("GRADAUTH_BENCH_SCALE_N: give trial counts like 100,1000") from None
        pack = os.environ.get("GRADAUTH_BENCH_SCALE_PACK", "auto").strip()
        if pack != "auto" and not (pack.isdigit() and int(pack) >= 1):
            raise GradauthError(f"GRADAUTH_BENCH_SCALE_PACK={pack!r}: give auto or a number of grid points (1: unpacked)")
        result = bench_scale(ns, pack=pack if pack == "auto" else int(pack))
    else:
        from .slicing.bench import bench_slicing
        return bench_slicing(out)
    result.setdefault("git_sha", rundir.git_sha())  # the commit the figures came from ("+dirty": not a clean one)
    write_json(out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2), file=sys.stderr)
    return out
