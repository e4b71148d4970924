"""Fine-tune a locked model under one schedule, with the lock held (masked channels stay exactly zero)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .data import Dataset
from .engine import FitSpec, fit, make_optimizer
from .knobs import Schedule  # the fine-tune knobs, one field each (knobs.py); re-exported here
from .models import bn_layers, head_layer
from .prune import Masks, apply_masks, enforce_masks


def scope_params(model: nn.Module, scope: str) -> list[nn.Parameter]:
    if scope == "all":
        return list(model.parameters())
    if scope == "bn":
        return [p for bn in bn_layers(model).values() for p in bn.parameters()]
    if scope == "head":
        return list(head_layer(model).parameters())
    raise ValueError(scope)


def finetune(model: nn.Module, masks: Masks, ds: Dataset, sched: Schedule, *, batch_size: int = 64,
             momentum: float = 0.9, weight_decay: float = 1e-4, precision: str = "fp32", state: dict | None = None,
             on_epoch: Callable[[int, torch.optim.Optimizer], None] | None = None, progress: str | None = None) -> nn.Module:
    """Fine-tune `model` (on ds's device) in place under every knob of `sched`; `state` = {"epoch", "model",
    "optimizer"} resumes a checkpoint. A knob added to `Schedule` is used here."""
    apply_masks(model, masks)
    params = scope_params(model, sched.scope)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    spec = FitSpec(sched.epochs, sched.lr, batch_size, momentum, weight_decay, "cosine", sched.seed, precision)
    opt = make_optimizer(params, spec)
    start = 0
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["epoch"] + 1
    n = max(1, int(round(len(ds.train) * sched.data_fraction)))
    train = ds.train.subset(n, sched.seed)
    fit(model, ds, train, spec, opt, start_epoch=start, after_step=lambda: enforce_masks(model, masks),
        on_epoch=(lambda e, loss: on_epoch(e, opt)) if on_epoch else None, progress=progress)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
