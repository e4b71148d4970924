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

import torch.nn as nn

from .graph import UnsupportedOp
from .slicer import check_args, slice_model, slice_partial  # noqa: F401 (the public functions live in slicer.py)
from .vectorized import Partial

__all__ = ["slice_model", "slice_partial", "channel_importance", "run_slice", "Partial",
           "UnsupportedOp"]


def channel_importance(model, ds, classes=None, theta: float = 0.0, samples: int = 256):
    from .stage import channel_importance as impl
    return impl(model, ds, classes, theta, samples)


def run_slice(cfg, out_dir: Path, base_model: nn.Module, ds, use_ray: bool | None = None) -> Path:
    """slices.parquet in out_dir. use_ray None: on Ray if a Ray is initialised in this process."""
    from .stage import run_slice as impl
    return impl(cfg, out_dir, base_model, ds, use_ray)
