"""The single-process slicer: `slice_partial` / `slice_model` (semantics in the package docstring, __init__.py).
stage.py and bench.py import these from here, not from the package, so the package can re-export them and
dispatch to stage without a cycle."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import GradauthError
from .graph import Plan
from .record import BATCH, batches, forward_stats, profile
from .vectorized import BLOCK, Partial, backward


def check_args(theta: float, target, num_classes: int | None = None) -> None:
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta >= 0:
        raise GradauthError(f"slicing theta {theta!r} must be a number ≥ 0 (0 keeps every synapse; 0.3 is typical)")
    if target is not None and not isinstance(target, int) and not isinstance(target, torch.Tensor):
        raise GradauthError(f"slicing target {target!r} must be None (predicted class) or a class index")
    if isinstance(target, int) and num_classes is not None and not 0 <= target < num_classes:
        raise GradauthError(f"slicing target {target} is not a class of this {num_classes}-class model")


def slice_partial(model: nn.Module, profile_inputs: torch.Tensor | None, inputs: torch.Tensor, theta: float = 0.0,
                  target=None, batch: int = BATCH, block: int = BLOCK, plan: Plan | None = None,
                  means: dict | None = None, count: bool = False) -> Partial:
    """Per-neuron and per-channel sums over `inputs`. `target`: None, a class, or one class per input.
    `means` (from record.profile) skips profiling; `count` also counts the synapses examined."""
    plan = plan or Plan(model)
    means = means if means is not None else profile(plan, profile_inputs, batch)
    check_args(theta, target, means[plan.logits].shape[0])
    out = Partial()
    for i, xb in enumerate(batches(inputs, batch)):
        tb = target[i * batch:(i + 1) * batch] if isinstance(target, torch.Tensor) else target
        out.merge(backward(plan, forward_stats(plan, means, xb, theta), theta, tb, block, count))
    return out


def slice_model(model: nn.Module, profile_inputs: torch.Tensor, inputs: torch.Tensor, theta: float = 0.0,
                target: int | None = None) -> dict[str, torch.Tensor]:
    """Integer CONTRIB of every leaf module's output, summed over `inputs` (shaped like one output)."""
    return slice_partial(model, profile_inputs, inputs, theta, target).neurons
