"""The lock: zero the MOST important BN channels (or synapses) and keep them at zero.

A channel lock is a set of boolean keep-masks, one per BN layer (1-d). Applying it zeroes the channel's γ and β (so
the BN output is exactly 0 there) and masks their gradients, so fine-tuning can never revive the channel. `compact`
(in compact.py) later removes the dead channels physically.

A synapse lock (`lock.granularity: synapse`, NNSlicer's model protection) is one keep-mask per Conv2d / Linear
weight, shaped like it and keyed by the parameter's name (`features.0.weight`): the hidden weights are zero and
their gradients masked. Every function below takes either kind; `is_synapse` tells them apart (a channel mask is
1-d, a weight mask is not). `count_removed` then counts synapses, not channels.
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


def synapse_masks(scores: dict[str, torch.Tensor], mode: str, value: float) -> Masks:
    """Keep-masks that hide, in EVERY layer, the top `value` fraction of its synapses (round(value × n) of its n
    weights; ties broken by position). Per layer, as NNSlicer ranks synapses: a global ranking would be decided by
    how a layer's scale compares with the others' (contribution counts grow with a conv's output positions, |w| is
    larger in small layers) and could empty a layer. `scores` maps a weight's parameter name to one score per
    weight (its shape); rate mode only."""
    if mode != "rate":
        raise GradauthError(f"a synapse lock takes lock.mode rate (a fraction of each layer's weights), got {mode!r}")
    if not 0 < value < 1:
        raise GradauthError(f"lock rate {value} is outside (0, 1): use a fraction of each layer's weights, e.g. 0.5")
    masks = {}
    for name, s in scores.items():
        flat = s.detach().flatten().double()
        k = int(round(value * flat.numel()))
        removed = torch.zeros(flat.numel(), dtype=torch.bool)
        removed[torch.argsort(flat, descending=True, stable=True)[:k]] = True
        masks[name] = (~removed).view(s.shape)
    return masks


def is_synapse(masks: Masks) -> bool:
    """Whether `masks` is a synapse lock (weight-shaped masks) rather than a channel lock (1-d per BN)."""
    return any(m.dim() > 1 for m in masks.values())


def synapse_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The synapses a synapse lock may hide: the weight of every Conv2d / Linear, by parameter name."""
    return {f"{n}.weight" if n else "weight": m.weight for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def _synapse_targets(model: nn.Module, masks: Masks) -> dict[str, nn.Parameter]:
    params = synapse_params(model)
    bad = sorted(n for n in masks if n not in params or params[n].shape != masks[n].shape)
    if bad:
        raise GradauthError(f"synapse lock names weights the model does not have (or of another shape): {bad[:3]}")
    return {n: params[n] for n in masks}


def count_removed(masks: Masks) -> tuple[int, int]:
    """(locked channels, total channels)."""
    total = sum(m.numel() for m in masks.values())
    return total - sum(int(m.sum()) for m in masks.values()), total


def empty_layers(masks: Masks) -> list[str]:
    """BN layers the lock leaves without a single channel."""
    return [n for n, m in masks.items() if m.numel() and not bool(m.any())]


@torch.no_grad()
def enforce_masks(model: nn.Module, masks: Masks) -> None:
    """Zero γ and β of every removed channel, or every hidden synapse (call after each optimizer step)."""
    if is_synapse(masks):
        for name, w in _synapse_targets(model, masks).items():
            w.mul_(masks[name].to(w.device, w.dtype))
        return
    bns = bn_layers(model)
    for name, keep in masks.items():
        bn = bns[name]
        k = keep.to(bn.weight.device, bn.weight.dtype)
        bn.weight.mul_(k)
        bn.bias.mul_(k)


def apply_masks(model: nn.Module, masks: Masks) -> list:
    """Zero the removed channels (or synapses) now and mask their gradients from here on. Returns the hook handles."""
    if is_synapse(masks):
        targets = _synapse_targets(model, masks)
        enforce_masks(model, masks)
        return [w.register_hook(lambda g, k=masks[n].to(w.device, w.dtype): g * k) for n, w in targets.items()]
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
