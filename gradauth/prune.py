"""The lock: zero the MOST important BN channels and keep them at zero.

A lock is a set of boolean keep-masks, one per BN layer. Applying it zeroes the channel's γ and β (so the BN output
is exactly 0 there) and masks their gradients, so fine-tuning can never revive the channel. `compact` (in
compact.py) later removes the dead channels physically.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .errors import GradauthError
from .models import bn_layers

Masks = dict[str, torch.Tensor]  # bn name -> bool keep-mask


def lock_masks(scores: dict[str, torch.Tensor], mode: str, value: float) -> Masks:
    """Keep-masks that remove the top `value` fraction of channels (rate) or every channel scoring above `value`.

    Ranking is global across layers; ties are broken by position so the same scores always give the same lock.
    """
    names = list(scores)
    flat = torch.cat([scores[n].flatten().float() for n in names])
    if mode == "rate":
        if not 0 < value < 1:
            raise GradauthError(f"lock rate {value} is outside (0, 1): use a fraction of all BN channels, e.g. 0.02")
        k = int(round(value * flat.numel()))
        order = torch.argsort(flat, descending=True, stable=True)
        removed = torch.zeros_like(flat, dtype=torch.bool)
        removed[order[:k]] = True
    elif mode == "threshold":
        removed = flat > value
    else:
        raise GradauthError(f"lock.mode must be `rate` or `threshold`, got {mode!r}")
    masks, i = {}, 0
    for n in names:
        c = scores[n].numel()
        masks[n] = ~removed[i:i + c]
        i += c
    return masks


def count_removed(masks: Masks) -> tuple[int, int]:
    """(locked channels, total channels)."""
    total = sum(m.numel() for m in masks.values())
    return total - sum(int(m.sum()) for m in masks.values()), total


def empty_layers(masks: Masks) -> list[str]:
    """BN layers the lock leaves without a single channel."""
    return [n for n, m in masks.items() if m.numel() and not bool(m.any())]


@torch.no_grad()
def enforce_masks(model: nn.Module, masks: Masks) -> None:
    """Zero γ and β of every removed channel (call after each optimizer step)."""
    bns = bn_layers(model)
    for name, keep in masks.items():
        bn = bns[name]
        k = keep.to(bn.weight.device, bn.weight.dtype)
        bn.weight.mul_(k)
        bn.bias.mul_(k)


def apply_masks(model: nn.Module, masks: Masks) -> list:
    """Zero the removed channels now and mask their gradients from here on. Returns the hook handles."""
    bns = bn_layers(model)
    unknown = set(masks) - set(bns)
    if unknown:
        raise GradauthError(f"lock names BN layers the model does not have: {sorted(unknown)[:3]}")
    enforce_masks(model, masks)
    handles = []
    for name, keep in masks.items():
        bn = bns[name]
        k = keep.to(bn.weight.device, bn.weight.dtype)
        handles += [p.register_hook(lambda g, k=k: g * k) for p in (bn.weight, bn.bias)]
    return handles


def masks_from_model(model: nn.Module) -> Masks:
    """Recover the lock from a model's weights: a channel is locked when its γ and β are both exactly zero."""
    return {n: (bn.weight.detach() != 0) | (bn.bias.detach() != 0) for n, bn in bn_layers(model).items()}
