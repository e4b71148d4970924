"""The one training loop (base training and every fine-tune use it) and evaluation.

Data is a `Split` of uint8 tensors already on the device; batches are shuffled with a generator seeded per epoch, so
a run resumed from an epoch checkpoint sees exactly the batches an uninterrupted run would have seen. The learning
rate is a pure function of the step, for the same reason.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import Dataset, Split, augment, normalize


def pick_device(prefer: str | None = None) -> torch.device:
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lr_at(step: int, total: int, base_lr: float, schedule: str) -> float:
    if total <= 0:
        return base_lr
    frac = step / total
    if schedule == "step":
        return base_lr * (0.1 ** ((frac >= 0.5) + (frac >= 0.75)))
    return 0.5 * base_lr * (1 + math.cos(math.pi * frac))


def fast_path(device: torch.device, precision: str = "auto") -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, channels-last?) for training on `device`.

    `auto`: bf16 autocast and channels-last on a CUDA GPU that has bf16 (tensor cores take NHWC bf16 convolutions;
    fp32 master weights and optimizer state, so no loss scaling), plain fp32 elsewhere: on a CPU neither helps.
    `bf16` forces both (also on a CPU, for testing); `fp32` neither. Evaluation always runs in fp32."""
    if precision == "fp32" or (precision == "auto" and not (device.type == "cuda" and torch.cuda.is_bf16_supported())):
        return None, False
    return torch.bfloat16, True


@dataclass
class FitSpec:
    epochs: int
    lr: float
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    seed: int = 0
    precision: str = "fp32"         # see fast_path


def make_optimizer(params: Iterable[nn.Parameter], spec: FitSpec) -> torch.optim.Optimizer:
    return torch.optim.SGD(list(params), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, nesterov=True)


def fit(model: nn.Module, ds: Dataset, train: Split, spec: FitSpec, optimizer: torch.optim.Optimizer, *,
        start_epoch: int = 0, after_backward: Callable[[], None] | None = None,
        after_step: Callable[[], None] | None = None, on_epoch: Callable[[int, float], None] | None = None,
        progress: str | None = None) -> None:
    """Train in place for epochs [start_epoch, spec.epochs). `train` lives on the model's device."""
    device = train.x.device
    steps_per_epoch = math.ceil(len(train) / spec.batch_size)
    total = steps_per_epoch * spec.epochs
    amp, channels_last = fast_path(device, spec.precision)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    try:
        _epochs(model, ds, train, spec, optimizer, start_epoch, steps_per_epoch, total, amp, fmt,
                after_backward, after_step, on_epoch, progress)
    finally:
        model.to(memory_format=torch.contiguous_format)  # what compaction and saving expect


def _epochs(model, ds, train, spec, optimizer, start_epoch, steps_per_epoch, total, amp, fmt,
            after_backward, after_step, on_epoch, progress) -> None:
    device = train.x.device
    for epoch in range(start_epoch, spec.epochs):
        model.train()
        gen = torch.Generator(device=device).manual_seed(spec.seed * 100_003 + epoch)
        perm = torch.randperm(len(train), generator=gen, device=device)
        t0, loss_sum = time.perf_counter(), torch.zeros((), device=device)
        for i in range(steps_per_epoch):
            idx = perm[i * spec.batch_size:(i + 1) * spec.batch_size]
            x, y = augment(train.x[idx], ds, gen).contiguous(memory_format=fmt), train.y[idx]
            for g in optimizer.param_groups:
                g["lr"] = lr_at(epoch * steps_per_epoch + i, total, spec.lr, spec.schedule)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = F.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward:
                after_backward()
            optimizer.step()
            if after_step:
                after_step()
            loss_sum += loss.detach()
        mean_loss = loss_sum.item() / steps_per_epoch
        if progress:
            print(f"[{progress}] epoch {epoch + 1}/{spec.epochs} loss {mean_loss:.4f} "
                  f"({len(train) / (time.perf_counter() - t0):.0f} img/s)", file=sys.stderr, flush=True)
        if on_epoch:
            on_epoch(epoch, mean_loss)


@torch.no_grad()
def predict(model: nn.Module, ds: Dataset, split: Split, batch_size: int = 512) -> torch.Tensor:
    """Logits for a whole split (eval mode, normalised, no augmentation)."""
    model.eval()
    out = [model(normalize(split.x[i:i + batch_size], ds.mean, ds.std)) for i in range(0, len(split), batch_size)]
    return torch.cat(out)


def accuracy(logits: torch.Tensor, y: torch.Tensor, k: int = 1) -> float:
    k = min(k, logits.shape[1])
    return (logits.topk(k, 1).indices == y[:, None]).any(1).float().mean().item()


def evaluate(model: nn.Module, ds: Dataset, split: Split) -> tuple[float, float]:
    """(top-1, top-3) accuracy as fractions."""
    logits = predict(model, ds, split)
    return accuracy(logits, split.y, 1), accuracy(logits, split.y, 3)
