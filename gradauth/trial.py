"""One sweep trial as a plain function: lock → prun_acc → fine-tune → fine_acc → compact → row.

Ray Tune wraps `run_trial` (sweep.py); the benchmark and the tests call it directly.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn

from .checkpoint import ModelSpec
from .compact import compact, count_flops, count_params
from .data import Dataset
from .engine import evaluate
from .finetune import Schedule, finetune
from .prune import Masks, apply_masks, count_removed, empty_layers, lock_masks


@dataclass(frozen=True)
class TrialSpec:
    importance: str   # label of the importance source, e.g. bn_gamma, slice, slice[3,5]
    lock_mode: str
    lock_value: float
    epochs: int
    lr: float
    data_fraction: float
    scope: str
    seed: int

    @property
    def trial_id(self) -> str:
        return (f"{self.importance}-{self.lock_mode}{self.lock_value:g}-e{self.epochs}-lr{self.lr:g}"
                f"-f{self.data_fraction:g}-{self.scope}-s{self.seed}")

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.epochs, self.lr, self.data_fraction, self.scope, self.seed)


@dataclass
class TrialContext:
    """What every trial of a sweep shares (sent once through Ray's object store)."""
    base_state: dict
    spec: ModelSpec
    scores: dict            # importance label -> {bn name: scores}
    ds: Dataset             # on the CPU; each trial moves it to its device once
    base_acc: float
    lock_bound: float
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 1e-4
    provenance: dict | None = None  # git_sha, config_hash
    precision: str = "auto"         # finetune.precision (engine.fast_path)


def locked_model(ctx: TrialContext, t: TrialSpec) -> tuple[nn.Module, Masks]:
    from .models import build_model
    model = build_model(ctx.spec.arch, ctx.spec.num_classes, ctx.spec.in_channels, ctx.spec.width)
    model.load_state_dict(ctx.base_state)
    masks = lock_masks(ctx.scores[t.importance], t.lock_mode, t.lock_value)
    # Zero the locked channels but keep no gradient hook: `finetune` registers the masks once the model is on its
    # device; a hook from here would hold a CPU tensor and fail the first backward on a GPU (g * k across devices).
    for h in apply_masks(model, masks):
        h.remove()
    return model, masks


def base_row(ctx: TrialContext, t: TrialSpec) -> dict:
    ds = ctx.ds
    return {"trial_id": t.trial_id, "dataset": ds.name, "arch": ctx.spec.arch, "num_classes": ds.num_classes,
            "importance": t.importance, "lock_mode": t.lock_mode, "lock_value": float(t.lock_value),
            "ft_epochs": t.epochs, "ft_lr": float(t.lr), "ft_data_fraction": float(t.data_fraction),
            "ft_scope": t.scope, "seed": t.seed, "base_acc": ctx.base_acc, **(ctx.provenance or {})}


def run_trial(ctx: TrialContext, t: TrialSpec, device: torch.device, *, ds: Dataset | None = None,
              state: dict | None = None, on_epoch: Callable[[int, nn.Module, torch.optim.Optimizer, Masks], None] | None = None,
              progress: str | None = None) -> tuple[dict, nn.Module | None, Masks]:
    """Run one trial; returns (row, fine-tuned masked model or None if unlockable or degenerate, masks).

    Statuses: `unlockable` (locked accuracy above lock_bound, not fine-tuned), `degenerate` (the lock empties the
    network or a layer that cannot be cut out: `degenerate_lock`; not fine-tuned, and not an error, so Tune never
    retries it), `ok`.

    `ds` is the dataset already on `device` (a reused actor keeps it there); `state` resumes from a checkpoint.
    """
    t0 = time.perf_counter()
    ds = ds or ctx.ds.to(device)
    model, masks = locked_model(ctx, t)
    model.to(device)
    locked, total = count_removed(masks)
    prun_acc, _ = evaluate(model, ds, ds.test)
    row = base_row(ctx, t) | {"locked_channels": locked, "total_channels": total, "prun_acc": prun_acc,
                              "fine_acc": None, "fine_top3": None, "params": None, "flops": None}
    if prun_acc > ctx.lock_bound:
        return row | {"status": "unlockable", "seconds": time.perf_counter() - t0}, None, masks
    if degenerate_lock(model, masks, ctx.spec.example()):  # before fine-tuning: it would only fail in `compact`
        return row | {"status": "degenerate", "seconds": time.perf_counter() - t0}, None, masks
    finetune(model, masks, ds, t.schedule, batch_size=ctx.batch_size, momentum=ctx.momentum,
             weight_decay=ctx.weight_decay, precision=ctx.precision, state=state,
             on_epoch=(lambda e, opt: on_epoch(e, model, opt, masks)) if on_epoch else None, progress=progress)
    fine_acc, fine_top3 = evaluate(model, ds, ds.test)
    small = compact(model.cpu(), masks, ctx.spec.example())
    row |= {"fine_acc": fine_acc, "fine_top3": fine_top3, "params": count_params(small),
            "flops": count_flops(small, ctx.spec.example()), "status": "ok", "seconds": time.perf_counter() - t0}
    return row, model, masks


def degenerate_lock(model: nn.Module, masks: Masks, example: torch.Tensor) -> str | None:
    """Why this lock cannot give a working smaller network, or None: it removes every channel, or every channel of
    a layer whose output `compact` would have to cut out entirely (a conv with no output channel). A layer emptied
    inside a shared stream (a residual add) stays, masked, and is not degenerate. `compact` is tried only when some
    layer is empty, so ordinary locks cost nothing here."""
    locked, total = count_removed(masks)
    if locked == total:
        return f"the lock removes all {total} channels"
    empty = empty_layers(masks)
    if not empty:
        return None
    try:
        with warnings.catch_warnings():  # the zero-channel conv it builds warns before it fails
            warnings.simplefilter("ignore", UserWarning)
            with torch.no_grad():
                compact(model, masks, example).eval()(example)  # builds, then fails on the empty conv
    except (RuntimeError, ValueError) as e:
        return (f"the lock removes every channel of {', '.join(empty[:3])}{' …' if len(empty) > 3 else ''}, "
                f"which cannot be compacted ({str(e).splitlines()[0][:80]})")
    return None


def grid(cfg) -> list[TrialSpec]:
    """Every (importance × lock value × schedule × seed) of the config, in a stable order."""
    ft = cfg.finetune
    return [TrialSpec(imp.label, cfg.lock.mode, float(v), int(e), float(lr), float(f), s, int(seed))
            for imp in cfg.importance for v in cfg.lock.values for e in ft.epochs for lr in ft.lr
            for f in ft.data_fraction for s in ft.scope for seed in ft.seeds]


def spec_from_dict(d: dict) -> TrialSpec:
    return TrialSpec(**d)


def spec_to_dict(t: TrialSpec) -> dict:
    return asdict(t)
