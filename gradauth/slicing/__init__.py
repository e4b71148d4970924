"""NNSlicer (Zhang et al., FSE 2020): which neurons and channels carry a model's decision on a set of inputs.

Semantics (settled here and, per op, in ops.py; the loop reference is their executable form):

- Neurons are the elements of every traced op's output. Profiling: mean output of each neuron over a profiling set.
  Forward analysis: Δ = output − profiled mean, per input of interest (float32, as the model computes it).
- The slicing criterion (the logit of the predicted class — first maximum on ties — or of a given class) has
  CONTRIB 1. Going back in reverse topological order, each neuron n with CONTRIB_n ≠ 0 gives each input neuron i
  the local contribution CONTRIB_n·Δy_n·w_i·Δx_i; i's CONTRIB is the sum of the SIGNS of the local contributions
  it received from all its consumers (an integer). sign(0) = 0, and the sign of a product is the product of the
  signs (so no float underflow can turn a nonzero contribution into 0).
- Δx_i is always the input neuron's own Δ (its output minus its profiled mean).
- Each op's own rule (which inputs it passes CONTRIB to, with which w_i; Conv2d / Linear's θ filter, theta.py)
  is the docstring of its rule object in ops.py, next to its vectorised and loop implementations:
  Conv2d, Linear, BatchNorm, ReLU, MaxPool, AvgPool, AdaptiveAvgPool, add, cat, flatten / view / reshape,
  Identity / Dropout. In short: weighted sums and elementwise ops pass sign(CONTRIB·Δy·w·Δx) (the bias and zero
  padding are no inputs; BN's w is γ's sign; a ReLU passes only where its output is > 0; a max-pool only to its
  arg-max), re-indexing ops and cat pass CONTRIB unchanged. The image (graph input) gets no CONTRIB. An op
  without a rule is refused with an UnsupportedOp error naming it.
- Many inputs: the slice of a set is the sum of per-input CONTRIB. Per channel: Σ |CONTRIB| over positions and
  inputs (|·| per input, before summing).
- Results are keyed by leaf-module name (model.named_modules()); a module called k > 1 times (torchvision's
  reused ReLU) has its later calls under "name#1", "name#2", …

Modules: ops (the op rules, one object per op, and the op tables) ← graph (trace → steps) ← record (profile,
forward statistics) ← vectorized (batch backward walk) / reference (loop walk) ← distributed / stage / bench;
algebra.py and loops.py hold the helpers the vectorised and the loop rules use, theta.py and kernel.py the θ cut.

Paths: `slice_model` (single process, vectorised), `reference.slice_loop` (per-neuron loops), and
`distributed.slice_ray` (forward actors + backward tasks on Ray); all three give identical integers.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..errors import GradauthError
from .graph import Plan, UnsupportedOp
from .record import BATCH, batches, forward_stats, profile
from .vectorized import BLOCK, Partial, backward

__all__ = ["slice_model", "slice_partial", "channel_importance", "run_slice", "bench_slicing", "Partial",
           "UnsupportedOp"]


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


def channel_importance(model, ds, classes=None, theta: float = 0.0, samples: int = 256):
    from .stage import channel_importance as impl
    return impl(model, ds, classes, theta, samples)


def run_slice(cfg, out_dir: Path, base_model: nn.Module, ds, use_ray: bool | None = None) -> Path:
    """slices.parquet in out_dir. use_ray None: on Ray if a Ray is initialised in this process."""
    from .stage import run_slice as impl
    return impl(cfg, out_dir, base_model, ds, use_ray)


def bench_slicing(out_path: Path) -> dict:
    from .bench import bench_slicing as impl
    return impl(out_path)
