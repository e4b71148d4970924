"""`gradauth bench gpu`: the GPU path of a sweep, measured on whatever GPU the machine has.

Three measurements, each a time-bounded loop after a warm-up, CUDA synchronised around every timing:

1. fine-tune: a CIFAR VGG-19 trial's fine-tune (the trial's own code path: `trial.locked_model` builds the locked
   model, `finetune.finetune` → `engine.fit` trains it with batch augmentation on the device and the lock held),
   images/s in fp32 against bf16 autocast + channels-last (`engine.fast_path`, what `precision: auto` picks on a
   bf16 GPU), interleaved, best of `repeats`; also with the lock masks handed over on the GPU (run_trial hands
   them over on the CPU, so `enforce_masks` copies each one to the GPU after every step), and both precisions at
   a larger batch (`large_batch_size`), which tells whether the config's batch leaves the GPU waiting on the host.
   A whole `run_trial` (evaluate, fine-tune, compact) runs first as the warm-up, so the full trial is known to
   work on the device.
2. memory cap: `processes` worker processes, each capped at `fraction` of the GPU's memory with
   `torch.cuda.set_per_process_memory_fraction` (as a 0.25-GPU sweep trial caps itself), each fine-tuning the
   same number of images: one alone, then all at once, started together (interleaved rounds); aggregate images/s
   = all images / (last end − first start), and each process's peak memory (the caching allocator's, and the
   driver's per-process figure from nvidia-smi, which includes the CUDA context the cap does not cover) against
   its cap.
3. slicing forward: the forward analysis the slicer runs before its backward pass (`slicing.record.forward_stats`,
   θ = 0: signs of every neuron's change from the profiled means, ReLU masks, max-pool arg-maxes) on a ResNet-10 at
   CIFAR resolution, on the GPU against the CPU (all cores): samples/s.

The data are synthetic (uniform random uint8 images 3×32×32, 10 random classes): the GPU machine has no dataset,
and throughput does not depend on the pixels; accuracies from this data mean nothing. The command imports neither
Ray, cryptography nor PyYAML, so it runs on a bare machine with torch ≥ 2.5 from a checkout:
`python3 -m gradauth bench gpu --out DIR` (about 2.5 minutes on an H200). Without CUDA it runs a tiny version of
the same code on the CPU (seconds on an idle machine) and writes the same JSON, the GPU figures marked
"not measured (no CUDA)": CI tests the code path that way.
The JSON is rewritten after each measurement, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from .fsutil import write_json

NOT_MEASURED = "not measured (no CUDA)"
DATA_NOTE = ("synthetic: uniform random uint8 images 3×32×32 and uniform random labels of 10 classes (no dataset on "
             "the GPU machine); throughput does not depend on the pixels, accuracies on this data mean nothing")

# The GPU run mirrors sweeps/cifar10-vgg19.yaml (model, fine-tune batch size, optimizer, sweep.resources.gpu); a
# test checks that it still does. Whole command ≈ 2.5 minutes on an H200.
GPU = {
    "arch": "vgg19", "width": 1.0, "num_classes": 10, "train_images": 50_000, "test_images": 1_000,
    "batch_size": 128, "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "lock_rate": 0.1,
    "large_batch_size": 512, "seconds": 5.0, "repeats": 2, "warmup_images": 2_560,
    "processes": 4, "fraction": 0.25, "cap_alone_seconds": 5.0, "cap_rounds": 2,
    "slicing_arch": "resnet10", "slicing_width": 1.0, "slicing_batches": [16, 256], "slicing_seconds": 4.0,
    "slicing_profile_samples": 256,
}
# Without CUDA: the same code, tiny, so the whole command takes seconds on two shared cores.
CPU = GPU | {
    "width": 0.0625, "train_images": 256, "test_images": 64, "batch_size": 32, "large_batch_size": 64,
    "seconds": 0.2, "warmup_images": 64,
    "processes": 2, "cap_alone_seconds": 0.3, "cap_rounds": 1,
    "slicing_width": 0.125, "slicing_batches": [16], "slicing_seconds": 0.3, "slicing_profile_samples": 32,
}


def _log(msg: str) -> None:
    print(f"[bench gpu] {msg}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the trial's pieces on synthetic data ----------------------------------------------------------------------

def synthetic_cifar(train: int, test: int, seed: int = 0):
    """CIFAR-shaped Dataset of random uint8 images; mean/std are those of uniform bytes."""
    from .data import Dataset, Split
    g = torch.Generator().manual_seed(seed)

    def split(n):
        return Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                     torch.randint(0, 10, (n,), generator=g))
    mean, std = 127.5 / 255, ((256 ** 2 - 1) / 12) ** 0.5 / 255
    return Dataset("synthetic-cifar10", split(train), split(0), split(test), 10, (mean,) * 3, (std,) * 3)


def trial_setup(s: dict, ds, precision: str):
    """(TrialContext, TrialSpec) of one lock × schedule trial, as a sweep builds them: a base model with seeded
    random γ (a sparsity-trained base has spread γ; a fresh one ties at 1), |γ| importance, lock rate `lock_rate`."""
    from .checkpoint import ModelSpec
    from .importance import bn_gamma
    from .models import bn_layers, build_model
    from .trial import TrialContext, TrialSpec
    torch.manual_seed(0)
    base = build_model(s["arch"], s["num_classes"], 3, s["width"])
    with torch.no_grad():
        for bn in bn_layers(base).values():
            bn.weight.uniform_(0.05, 1.0)
    spec = ModelSpec(s["arch"], s["num_classes"], 3, 32, s["width"], ds.mean, ds.std)
    ctx = TrialContext(base.state_dict(), spec, {"bn_gamma": bn_gamma(base)}, ds, base_acc=0.0, lock_bound=1.0,
                       batch_size=s["batch_size"], momentum=s["momentum"], weight_decay=s["weight_decay"],
                       precision=precision)
    t = TrialSpec("bn_gamma", "rate", s["lock_rate"], 1, s["lr"], 1.0, "all", 0)
    return ctx, t


def _schedule_for(t, images: int, n_train: int):
    """The trial's schedule resized to about `images` images: whole epochs over a data_fraction of the train split."""
    epochs = max(1, -(-images // n_train))
    frac = min(1.0, max(images / epochs, 1) / n_train)
    n = max(1, int(round(n_train * frac)))
    return dataclasses.replace(t.schedule, epochs=epochs, data_fraction=frac), epochs * n  # every other knob kept


def finetune_ips(ctx, t, ds, device: torch.device, precision: str, images: int, masks_on_device: bool = False):
    """Images/s of one fine-tune of about `images` images: a fresh locked model (`trial.locked_model`), moved to the
    device, fine-tuned by `finetune.finetune` with the lock held, as `run_trial` does. Returns (images/s, seconds,
    images). masks_on_device: hand finetune masks already on the device (run_trial passes them on the CPU)."""
    from .finetune import finetune
    from .trial import locked_model
    model, masks = locked_model(ctx, t)
    model.to(device)
    if masks_on_device:
        masks = {k: v.to(device) for k, v in masks.items()}
    sched, n = _schedule_for(t, images, len(ds.train))
    _sync(device)
    t0 = time.perf_counter()
    finetune(model, masks, ds, sched, batch_size=ctx.batch_size, momentum=ctx.momentum,
             weight_decay=ctx.weight_decay, precision=precision)
    _sync(device)
    dt = time.perf_counter() - t0
    return n / dt, dt, n


def warm_trial(ctx, t, ds, device: torch.device, images: int) -> dict:
    """One whole trial (evaluate, fine-tune, evaluate, compact) on the device, as the warm-up."""
    from .trial import run_trial
    sched, _ = _schedule_for(t, images, len(ds.train))
    t = dataclasses.replace(t, epochs=sched.epochs, data_fraction=sched.data_fraction)
    t0 = time.perf_counter()
    row, _, _ = run_trial(ctx, t, device, ds=ds)
    return {k: row[k] for k in ("status", "locked_channels", "total_channels", "prun_acc", "fine_acc", "params",
                                "flops")} | {"seconds": time.perf_counter() - t0}


# ---- 1. fp32 against bf16 + channels-last ------------------------------------------------------------------

def bench_precision(s: dict, device: torch.device) -> dict:
    from .engine import fast_path
    ds = synthetic_cifar(s["train_images"], s["test_images"]).to(device)
    ctx, t = trial_setup(s, ds, "auto")
    trial = warm_trial(ctx, t, ds, device, s["warmup_images"])
    big = dataclasses.replace(ctx, batch_size=s["large_batch_size"])
    modes = {"fp32": (ctx, "fp32", False), "bf16_channels_last": (ctx, "bf16", False),
             "bf16_channels_last_masks_on_device": (ctx, "bf16", True),
             f"fp32_batch{big.batch_size}": (big, "fp32", False),
             f"bf16_channels_last_batch{big.batch_size}": (big, "bf16", False)}
    images = {}
    for name, (c, prec, on_dev) in modes.items():  # warm-up (twice: the first call pays cuDNN's and the allocator's
        for _ in range(2):                         # start) and calibration: about `seconds` of work per timed run
            ips = finetune_ips(c, t, ds, device, prec, s["warmup_images"], on_dev)[0]
        images[name] = max(c.batch_size, int(ips * s["seconds"]))
    runs = {name: [] for name in modes}
    for _ in range(s["repeats"]):  # interleaved: drift in the machine hits every mode alike
        for name, (c, prec, on_dev) in modes.items():
            ips, dt, n = finetune_ips(c, t, ds, device, prec, images[name], on_dev)
            runs[name].append({"images_per_s": ips, "seconds": dt, "images": n})
    best = {k: max(r["images_per_s"] for r in v) for k, v in runs.items()}
    amp, cl = fast_path(device, "auto")
    out = {"device": str(device), "model": f"{s['arch']} ×{s['width']:g}", "batch_size": s["batch_size"],
           "lock": f"bn_gamma rate {s['lock_rate']:g} (random γ)", "warmup_trial": trial,
           "auto_precision_here": {"autocast": str(amp) if amp else None, "channels_last": cl},
           "modes": {"fp32": "precision fp32: no autocast, NCHW (TF32 convolutions if torch allows them: machine.tf32_conv)",
                     "bf16_channels_last": "precision bf16: what `auto` picks on a bf16 GPU; masks on the CPU, as "
                                           "run_trial hands them to finetune today",
                     "bf16_channels_last_masks_on_device": "the same with the lock masks moved to the GPU first "
                                                           "(enforce_masks then copies nothing per step)",
                     f"fp32_batch{big.batch_size}": "fp32 at a larger batch than the config's: is the step host-bound?",
                     f"bf16_channels_last_batch{big.batch_size}": "bf16 + channels-last at that batch"},
           "runs": runs, "best_images_per_s": best}
    for k in ("bf16_channels_last", "bf16_channels_last_masks_on_device"):
        out[f"speedup_{k}_vs_fp32"] = best[k] / best["fp32"] if device.type == "cuda" else NOT_MEASURED
    b = big.batch_size
    out[f"speedup_bf16_channels_last_vs_fp32_batch{b}"] = (
        best[f"bf16_channels_last_batch{b}"] / best[f"fp32_batch{b}"] if device.type == "cuda" else NOT_MEASURED)
    return out


# ---- 2. memory-capped worker processes ---------------------------------------------------------------------

def worker_main(args: dict) -> None:
    """A worker of bench_memory_cap: set up and warm up, answer `ready`; then `prep N` builds a fresh locked model
    for a fine-tune of N images (answer `prepped`), `go` times it (answer: one JSON line), `quit` ends."""
    s, device, prec = args["settings"], torch.device(args["device"]), args["precision"]
    cap = None
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.set_per_process_memory_fraction(s["fraction"], device)  # what sweep.cap_gpu_memory does
        cap = s["fraction"] * torch.cuda.get_device_properties(device).total_memory
    else:
        torch.set_num_threads(1)
    from .finetune import finetune
    from .trial import locked_model
    ds = synthetic_cifar(s["train_images"], s["test_images"], seed=1 + args["rank"]).to(device)
    ctx, t = trial_setup(s, ds, prec)
    try:
        if device.type == "cuda":  # the whole trial once per process on the GPU; the CPU fallback saves the time
            warm_trial(ctx, t, ds, device, s["warmup_images"])
        finetune_ips(ctx, t, ds, device, prec, s["warmup_images"])
    except torch.cuda.OutOfMemoryError as e:
        print(json.dumps({"ready": False, "error": f"out of memory under the cap in warm-up: {str(e)[:300]}"}),
              flush=True)
        return
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    model = masks = sched = None
    n = 0
    for line in sys.stdin:
        cmd = line.split()
        if cmd and cmd[0] == "prep":
            model, masks = locked_model(ctx, t)
            model.to(device)
            sched, n = _schedule_for(t, int(cmd[1]), len(ds.train))
            _sync(device)
            print(json.dumps({"prepped": True}), flush=True)
            continue
        if not cmd or cmd[0] != "go":
            break
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        res: dict = {}
        start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process on the machine
        try:
            finetune(model, masks, ds, sched, batch_size=ctx.batch_size, momentum=ctx.momentum,
                     weight_decay=ctx.weight_decay, precision=prec)
            _sync(device)
        except torch.cuda.OutOfMemoryError as e:
            res["error"] = f"out of memory under the cap: {str(e)[:300]}"
            n = 0
        end = time.monotonic()
        res |= {"rank": args["rank"], "pid": os.getpid(), "images": n, "start": start, "end": end,
                "images_per_s": n / (end - start)}
        if device.type == "cuda":
            res |= {"peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
                    "peak_reserved_bytes": torch.cuda.max_memory_reserved(device), "cap_bytes": cap}
            res["peak_reserved_within_cap"] = res["peak_reserved_bytes"] <= cap
        print(json.dumps(res), flush=True)


class _Workers:
    def __init__(self, s: dict, device: torch.device, precision: str, n: int, logdir: Path):
        root = str(Path(__file__).resolve().parents[1])  # this checkout, installed or not
        env = os.environ | {"PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        self.procs, self.logs = [], []
        for rank in range(n):
            args = {"settings": s, "device": str(device), "precision": precision, "rank": rank}
            log = open(logdir / f"worker-{rank}.log", "w+")
            self.logs.append(log)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "gradauth.benchgpu", "worker", json.dumps(args)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=root))
        try:
            self.ready = [self._answer(i) for i in range(n)]
        except BaseException:
            self.close()  # no worker outlives a failed start
            raise

    def _answer(self, i: int) -> dict:
        line = self.procs[i].stdout.readline()
        if not line:
            self.logs[i].seek(0)
            tail = self.logs[i].read()[-2000:]
            raise RuntimeError(f"worker {i} exited (code {self.procs[i].wait()}) without answering: {tail}")
        return json.loads(line)

    def _send(self, ranks: list[int], line: str) -> None:
        for i in ranks:
            self.procs[i].stdin.write(line + "\n")
            self.procs[i].stdin.flush()

    def run(self, ranks: list[int], images: int) -> list[dict]:
        """Each of `ranks` fine-tunes `images` images, all starting together (models are built before the go)."""
        self._send(ranks, f"prep {images}")
        for i in ranks:
            self._answer(i)
        self._send(ranks, "go")
        return [self._answer(i) for i in ranks]

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.write("quit\n")
                p.stdin.close()
            except (BrokenPipeError, ValueError):
                pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self.logs:
            log.close()


def _nvidia_smi_used(pids: list[int]) -> dict | str:
    """MiB the driver charges each of `pids` (CUDA context included, which the allocator cap does not cover)."""
    if not shutil.which("nvidia-smi"):
        return "nvidia-smi not installed"
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}"
    used = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids:
            used[parts[0]] = int(parts[1]) if parts[1].isdigit() else parts[1]
    return used or f"no rows for these pids (inside a container nvidia-smi may not see them): {out.strip()[:300]}"


def bench_memory_cap(s: dict, device: torch.device, precision: str, images: int, logdir: Path) -> dict:
    """Each worker fine-tunes the same `images` images per run (about cap_alone_seconds for one process alone):
    worker 0 alone, then all of them together; aggregate = all images / (last end - first start)."""
    import threading
    n = s["processes"]
    workers = _Workers(s, device, precision, n, logdir)
    try:
        bad = [r for r in workers.ready if not r.get("ready")]
        if bad:
            raise RuntimeError(f"a worker failed its warm-up: {bad[0].get('error')}")
        pids = [r["pid"] for r in workers.ready]
        rounds = []
        smi: list = []
        for _ in range(s["cap_rounds"]):  # alone, then all together, interleaved over rounds
            alone = workers.run([0], images)[0]
            timer = threading.Timer(alone["end"] - alone["start"], lambda: smi.append(_nvidia_smi_used(pids)))
            if device.type == "cuda":
                timer.start()
            together = workers.run(list(range(n)), images)
            timer.cancel()
            wall = max(r["end"] for r in together) - min(r["start"] for r in together)
            rounds.append({"alone": alone, "concurrent": together,
                           "concurrent_aggregate_images_per_s": sum(r["images"] for r in together) / wall,
                           "concurrent_sum_of_process_images_per_s": sum(r["images_per_s"] for r in together)})
    finally:
        workers.close()
    best_alone = max(r["alone"]["images_per_s"] for r in rounds)
    best_agg = max(r["concurrent_aggregate_images_per_s"] for r in rounds)
    out = {"device": str(device), "processes": n, "precision": precision, "images_per_process_per_run": images,
           "rounds": rounds,
           "best_alone_images_per_s": best_alone, "best_concurrent_aggregate_images_per_s": best_agg}
    if device.type == "cuda":
        every = [r["alone"] for r in rounds] + [p for r in rounds for p in r["concurrent"]]
        cap = every[0]["cap_bytes"]
        out |= {"fraction": s["fraction"], "cap_bytes": cap,
                "aggregate_vs_alone": best_agg / best_alone,
                "max_peak_reserved_bytes": max(p["peak_reserved_bytes"] for p in every),
                "max_peak_allocated_bytes": max(p["peak_allocated_bytes"] for p in every),
                "max_peak_reserved_over_cap": max(p["peak_reserved_bytes"] for p in every) / cap,
                "all_within_cap": all(p.get("peak_reserved_within_cap") and "error" not in p for p in every),
                "nvidia_smi_used_mib_mid_concurrent": smi}
    else:
        out |= {"fraction": s["fraction"], "cap_bytes": NOT_MEASURED, "aggregate_vs_alone": NOT_MEASURED,
                "max_peak_reserved_bytes": NOT_MEASURED, "max_peak_allocated_bytes": NOT_MEASURED,
                "max_peak_reserved_over_cap": NOT_MEASURED, "all_within_cap": NOT_MEASURED,
                "nvidia_smi_used_mib_mid_concurrent": NOT_MEASURED}
    return out


# ---- 3. the slicer's forward analysis, GPU against CPU -------------------------------------------------------

def _forward_sps(plan, means, x: torch.Tensor, batch: int, seconds: float, device: torch.device) -> dict:
    from .slicing.record import forward_stats
    forward_stats(plan, means, x[:batch], 0.0)  # warm-up
    _sync(device)
    starts = range(0, len(x) - batch + 1, batch)
    done, i, t0 = 0, 0, time.perf_counter()
    while done == 0 or time.perf_counter() - t0 < seconds:
        for _ in range(8 if device.type == "cuda" else 1):  # a few batches between clock reads (and syncs)
            j = starts[i % len(starts)]
            forward_stats(plan, means, x[j:j + batch], 0.0)
            done, i = done + batch, i + 1
        _sync(device)
    dt = time.perf_counter() - t0
    return {"samples_per_s": done / dt, "samples": done, "seconds": dt}


def bench_slicing_forward(s: dict, device: torch.device) -> dict:
    from .models import build_model
    from .slicing.graph import Plan
    from .slicing.record import forward_stats, profile
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    prof = torch.randn(s["slicing_profile_samples"], 3, 32, 32, generator=g)
    x = torch.randn(max(s["slicing_batches"]) * 4, 3, 32, 32, generator=g)
    model = build_model(s["slicing_arch"], 10, 3, s["slicing_width"]).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    res: dict = {"model": f"{s['slicing_arch']} ×{s['slicing_width']:g} (seeded random weights)", "theta": 0.0,
                 "inputs": "seeded Gaussian noise", "cpu_threads": torch.get_num_threads(),
                 "profile_samples": len(prof), "by_batch": {}}
    try:
        cpu_plan = Plan(model)
        cpu_means = profile(cpu_plan, prof)
        if device.type == "cuda":
            gpu_model = build_model(s["slicing_arch"], 10, 3, s["slicing_width"]).eval()
            gpu_model.load_state_dict(model.state_dict())
            gpu_plan = Plan(gpu_model.to(device))
            t0 = time.perf_counter()
            gpu_means = profile(gpu_plan, prof.to(device))
            _sync(device)
            res["gpu_profile_seconds"] = time.perf_counter() - t0
            xg = x.to(device)
            a = forward_stats(cpu_plan, cpu_means, x[:16], 0.0)
            b = forward_stats(gpu_plan, gpu_means, xg[:16], 0.0)
            same = sum(int((a.sd[k] == b.sd[k].cpu()).sum()) for k in a.sd)
            res["gpu_vs_cpu_sign_agreement"] = same / sum(v.numel() for v in a.sd.values())
            res["gpu_vs_cpu_same_predictions"] = bool(torch.equal(a.pred, b.pred.cpu()))
        for batch in s["slicing_batches"]:
            row = {"cpu": _forward_sps(cpu_plan, cpu_means, x, batch, s["slicing_seconds"], torch.device("cpu"))}
            if device.type == "cuda":
                row["gpu"] = _forward_sps(gpu_plan, gpu_means, xg, batch, s["slicing_seconds"], device)
                row["gpu_vs_cpu"] = row["gpu"]["samples_per_s"] / row["cpu"]["samples_per_s"]
            else:
                row["gpu"], row["gpu_vs_cpu"] = NOT_MEASURED, NOT_MEASURED
            res["by_batch"][str(batch)] = row
    finally:
        torch.set_num_threads(threads)
    if device.type != "cuda":
        res["gpu_profile_seconds"] = res["gpu_vs_cpu_sign_agreement"] = NOT_MEASURED
        res["gpu_vs_cpu_same_predictions"] = NOT_MEASURED
    return res


# ---- the command -----------------------------------------------------------------------------------------------

def _git() -> str:
    """The checkout's commit, "+dirty" if tracked files differ from it (rundir.git_sha's answer, without
    importing the pipeline and whatever it may come to import)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def machine(device: torch.device) -> dict:
    m = {"git": _git(), "python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
         "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "hostname": platform.node()}
    try:
        import torchvision
        m["torchvision"] = torchvision.__version__
    except ImportError:
        m["torchvision"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        m |= {"gpu": p.name, "gpu_count": torch.cuda.device_count(), "gpu_memory_bytes": p.total_memory,
              "compute_capability": f"{p.major}.{p.minor}", "bf16_supported": torch.cuda.is_bf16_supported(),
              "cudnn": torch.backends.cudnn.version(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
              "tf32_conv": torch.backends.cudnn.allow_tf32, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
        try:
            m["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            m["driver"] = None
    else:
        for k in ("gpu", "gpu_count", "gpu_memory_bytes", "compute_capability", "bf16_supported", "cudnn",
                  "cudnn_benchmark", "tf32_conv", "tf32_matmul", "driver"):
            m[k] = NOT_MEASURED
    return m


def bench_gpu(out: Path) -> dict:
    """Run the three measurements (the GPU ones, or the tiny CPU fallback) and write `out` after each."""
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    s = dict(GPU if cuda else CPU)
    if not cuda:
        torch.set_num_threads(1)
    result = {"bench": "gpu", "mode": "cuda" if cuda else "cpu-fallback", "data": DATA_NOTE,
              "machine": machine(device), "settings": s, "load_average_start": os.getloadavg(),
              "notes": __doc__.strip()}
    if not cuda:
        result["cpu_fallback"] = ("no CUDA device: a tiny version of every measurement ran on the CPU to test the "
                                  "code path; its figures are not GPU figures, and every GPU figure reads "
                                  f"{NOT_MEASURED!r}")
    errors: dict[str, str] = {}
    _log(f"{result['mode']} on {result['machine']['gpu'] if cuda else 'CPU'}, torch {torch.__version__}, "
         f"writing {out}")

    def step(name: str, fn):
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:  # one failed measurement must not lose the others: the run may be a one-off
            result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
        result.setdefault("seconds", {})[name] = time.perf_counter() - t0
        result["load_average_now"] = os.getloadavg()
        write_json(out, result)
        return result[name]

    r = step("finetune_precision", lambda: bench_precision(s, device))
    if "error" in r:
        _log(f"1/3 fine-tune fp32 vs bf16: FAILED {errors['finetune_precision']}")
    else:
        b, big = r["best_images_per_s"], s["large_batch_size"]
        _log(f"1/3 fine-tune {r['model']} batch {s['batch_size']}: fp32 {b['fp32']:.0f} img/s, bf16+channels-last "
             f"{b['bf16_channels_last']:.0f} img/s ({_ratio(r['speedup_bf16_channels_last_vs_fp32'])}), with the "
             f"masks on the GPU {b['bf16_channels_last_masks_on_device']:.0f} img/s; batch {big}: fp32 "
             f"{b['fp32_batch%d' % big]:.0f}, bf16+channels-last {b['bf16_channels_last_batch%d' % big]:.0f} img/s "
             f"[{result['seconds']['finetune_precision']:.0f} s]")
    # each worker's run: about cap_alone_seconds of work for one process alone, from measurement 1
    precision = "auto"
    est = r.get("best_images_per_s", {}).get("bf16_channels_last" if cuda else "fp32", 0) if "error" not in r else 0
    images = max(s["batch_size"], int((est or 1000) * s["cap_alone_seconds"]))
    logdir = out.parent / f".{out.stem}-workers"
    logdir.mkdir(parents=True, exist_ok=True)
    r = step("memory_cap", lambda: bench_memory_cap(s, device, precision, images, logdir))
    if "error" in r:
        _log(f"2/3 {s['processes']} capped processes vs 1: FAILED {errors['memory_cap']} (worker logs: {logdir})")
    else:
        shutil.rmtree(logdir, ignore_errors=True)
        within = r["all_within_cap"]
        _log(f"2/3 {r['processes']} processes at {s['fraction']:g} of the GPU: aggregate "
             f"{r['best_concurrent_aggregate_images_per_s']:.0f} img/s vs {r['best_alone_images_per_s']:.0f} alone "
             f"({_ratio(r['aggregate_vs_alone'])}), peak reserved "
             f"{_frac(r['max_peak_reserved_over_cap'])} of the cap, within cap: {within} "
             f"[{result['seconds']['memory_cap']:.0f} s]")
    r = step("slicing_forward", lambda: bench_slicing_forward(s, device))
    if "error" in r:
        _log(f"3/3 slicing forward GPU vs CPU: FAILED {errors['slicing_forward']}")
    else:
        parts = [f"batch {b}: GPU {_sps(v['gpu'])} vs CPU {v['cpu']['samples_per_s']:.0f} samples/s "
                 f"({_ratio(v['gpu_vs_cpu'])})" for b, v in r["by_batch"].items()]
        _log(f"3/3 slicing forward {r['model'].split(' (')[0]} θ=0: " + "; ".join(parts)
             + f" [{result['seconds']['slicing_forward']:.0f} s]")
    result["errors"] = errors
    result["total_seconds"] = time.perf_counter() - t_start
    write_json(out, result)
    _log(f"done in {result['total_seconds']:.0f} s: {out}" + (f"; {len(errors)} measurement(s) FAILED: "
                                                                + ", ".join(errors) if errors else ""))
    return result


def _ratio(v) -> str:
    return f"{v:.2f}×" if isinstance(v, float) else v


def _frac(v) -> str:
    return f"{v:.0%}" if isinstance(v, float) else v


def _sps(v) -> str:
    return f"{v['samples_per_s']:.0f}" if isinstance(v, dict) else v


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        worker_main(json.loads(sys.argv[2]))
    else:
        bench_gpu(Path(sys.argv[1] if len(sys.argv) > 1 else "results/bench/gpu.json"))
