"""One sweep trial as a plain function: lock → prun_acc → fine-tune → fine_acc → compact → row.

Ray Tune wraps `run_trial` (sweep.py); the benchmark and the tests call it directly.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import MISSING, asdict, dataclass, field, make_dataclass
from typing import Callable

import torch
import torch.nn as nn

from .checkpoint import ModelSpec
from .compact import compact, count_flops, count_params
from .data import Dataset
from .engine import evaluate
from .finetune import finetune
from .knobs import LockSpec, Schedule, knobs, schedules, to_row, trial_id
from .prune import Masks, apply_masks, count_removed, empty_layers, is_synapse, lock_masks, synapse_masks


def _flat_fields() -> tuple[list, dict]:
    """TrialSpec's fields: LockSpec's under their column names (importance, lock_mode, lock_value), then Schedule's
    under their own names (epochs, lr, data_fraction, scope, seed, and any knob added to Schedule), then LockSpec's
    knobs added later (lock_granularity): last, so positional TrialSpec(...) calls keep their meaning."""
    out, where, later = [], {}, []
    for cls, flat in ((LockSpec, lambda f, m: m["column"]), (Schedule, lambda f, m: f.name)):
        for f, m in knobs(cls):
            name = flat(f, m)
            kw = {} if f.default is MISSING else {"default": f.default}
            (later if cls is LockSpec and not m["id_always"] else out).append((name, f.type, field(**kw)))
            where[name] = (cls, f.name)
    return out + later, where


_FIELDS, _WHERE = _flat_fields()


def _lock(self) -> LockSpec:
    return LockSpec(**{f: getattr(self, n) for n, (cls, f) in _WHERE.items() if cls is LockSpec})


def _schedule(self) -> Schedule:
    return Schedule(**{f: getattr(self, n) for n, (cls, f) in _WHERE.items() if cls is Schedule})


def _of(cls, lock: LockSpec, schedule: Schedule) -> "TrialSpec":
    """The trial of one lock and one schedule."""
    kw = {n: getattr(lock if c is LockSpec else schedule, f) for n, (c, f) in _WHERE.items()}
    return cls(**kw)


# One sweep trial: a LockSpec and a Schedule, flat (TrialSpec("bn_gamma", "rate", 0.1, 8, 0.005, 1.0, "all", 0),
# `asdict` gives the flat dict Tune's param_space carries and `TrialSpec(**d)` reads back), its fields generated from
# the two classes so a knob added to Schedule is a TrialSpec field too. `.lock`, `.schedule` give the objects;
# `trial_id` is derived from their fields (knobs.trial_id).
TrialSpec = make_dataclass(
    "TrialSpec", _FIELDS, frozen=True, namespace={
        "lock": property(_lock), "schedule": property(_schedule), "of": classmethod(_of),
        "trial_id": property(lambda self: trial_id(self.lock, self.schedule)),
        "__module__": __name__, "__doc__": "One sweep trial: a LockSpec and a Schedule, flat (see knobs.py)."})


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
    erase_head: bool = False        # release.erase_head: thief trials start from the public model as released


def locked_model(ctx: TrialContext, t: TrialSpec) -> tuple[nn.Module, Masks]:
    from .models import build_model
    model = build_model(ctx.spec.arch, ctx.spec.num_classes, ctx.spec.in_channels, ctx.spec.width)
    model.load_state_dict(ctx.base_state)
    lock = t.lock
    make = synapse_masks if lock.granularity == "synapse" else lock_masks  # synapse: ctx.scores are per weight
    masks = make(ctx.scores[lock.importance], lock.mode, lock.value)
    # Zero the locked channels but keep no gradient hook: `finetune` registers the masks once the model is on its
    # device; a hook from here would hold a CPU tensor and fail the first backward on a GPU (g * k across devices).
    for h in apply_masks(model, masks):
        h.remove()
    return model, masks


def base_row(ctx: TrialContext, t: TrialSpec) -> dict:
    ds = ctx.ds
    # the lock and schedule columns come from their fields (knobs.py), so a new knob is a new column by itself
    return {"trial_id": t.trial_id, "dataset": ds.name, "arch": ctx.spec.arch, "num_classes": ds.num_classes,
            **to_row(t.lock), **to_row(t.schedule), "base_acc": ctx.base_acc, **(ctx.provenance or {})}


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
    small = compact(model.cpu(), masks, ctx.spec.example())  # a synapse lock removes no channel: same shape
    # a synapse lock's locked/total count synapses; its params are the weights that may be nonzero
    params = count_params(small) - (locked if is_synapse(masks) else 0)
    row |= {"fine_acc": fine_acc, "fine_top3": fine_top3, "params": params,
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
    scheds = schedules(cfg.finetune)
    return [TrialSpec.of(LockSpec(imp.label, cfg.lock.mode, float(v), cfg.lock.granularity), s)
            for imp in cfg.importance for v in cfg.lock.values for s in scheds]


def spec_from_dict(d: dict) -> TrialSpec:
    return TrialSpec(**d)


def spec_to_dict(t: TrialSpec) -> dict:
    return asdict(t)
