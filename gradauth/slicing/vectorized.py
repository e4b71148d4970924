"""Backward analysis on whole batches: every op rule's `backward` (ops.py) is a few tensor ops over a whole layer.

CONTRIB maps are float32 tensors holding integers (every sum below is of integers far under 2^24, so float32 is
exact). With g = sign(CONTRIB_n)·sign(Δy_n), the contribution an input i receives from a weighted sum is
sign(Δx_i)·Σ_n g_n·sign(w_ni)·keep_ni: at θ = 0 (keep ≡ 1) that is one transposed convolution (or matmul) with
sign(W); at θ > 0 it is computed per block of output neurons with CONTRIB ≠ 0 (unfold, θ filter, fold), or for
convolutions by the compiled kernel of kernel.py where a C++ compiler is at hand (same result, 10-50× faster per
layer on the ResNet-10 bench). The walk below visits the steps in reverse topological order and hands each
step's CONTRIB map to its rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import ops
from .algebra import conv_theta as _conv_theta  # noqa: F401  (tests check the compiled kernel against it)
from .algebra import layout, sd
from .graph import Plan, Step
from .record import Stats

BLOCK = 1 << 17  # θ > 0: neurons × inputs per block of the filter: its ~30 B each stay in cache (2× faster than 2^21)


@dataclass
class Partial:
    """Slice of a set of inputs: Σ CONTRIB per neuron and Σ |CONTRIB| per channel, for every leaf module output."""
    inputs: int = 0
    synapses: int = 0  # (neuron, input) pairs weighted sums examined: the loop reference's work (when counted)
    neurons: dict[str, torch.Tensor] = field(default_factory=dict)   # int64, shaped like the output sans batch
    channels: dict[str, torch.Tensor] = field(default_factory=dict)  # int64, one per channel (dim 1)

    def add_map(self, key: str, c: torch.Tensor) -> bool:
        """Add one batch's CONTRIB map; returns whether it has any nonzero entry."""
        # Float32 sums of integers are exact while every partial sum stays under 2^24. |c| summed per channel is a
        # sum of non-negative terms and rounding is monotone, so a float32 total under 2^24 proves that no partial
        # sum reached it (none rounded), and it bounds every per-neuron signed sum too. Otherwise: float64.
        # Channels-last maps are summed through their channels-innermost view (a batch sum over NCHW indexing of
        # a channels-last tensor is a strided loop, many times slower).
        cl = c.dim() == 4 and c.is_contiguous(memory_format=torch.channels_last)
        v = c.permute(0, 2, 3, 1) if cl else c            # channels last, logically
        a = v.abs()
        ch = a.reshape(-1, c.shape[1]).sum(0) if cl else a.sum([d for d in range(c.dim()) if d != 1])
        top = float(ch.max()) if ch.numel() else 0.0
        if top < 2.0 ** 24:
            n = v.sum(0).long()
            ch = ch.long()
        else:
            n = v.sum(0, dtype=torch.float64).round().long()
            ch = a.reshape(-1, c.shape[1]).sum(0, dtype=torch.float64) if cl else \
                a.transpose(0, 1).reshape(c.shape[1], -1).sum(1, dtype=torch.float64)
            ch = ch.round().long()
        if cl:
            n = n.permute(2, 0, 1).contiguous()
        self.neurons[key] = self.neurons[key] + n if key in self.neurons else n
        self.channels[key] = self.channels[key] + ch if key in self.channels else ch
        return top > 0

    def merge(self, other: "Partial") -> "Partial":
        self.inputs += other.inputs
        self.synapses += other.synapses
        for k in other.neurons:
            self.add_sums(k, other.neurons[k], other.channels[k])
        return self

    def add_sums(self, key: str, n: torch.Tensor, ch: torch.Tensor) -> None:
        self.neurons[key] = self.neurons[key] + n if key in self.neurons else n.clone()
        self.channels[key] = self.channels[key] + ch if key in self.channels else ch.clone()


def targets(st: Stats, target: int | torch.Tensor | None) -> torch.Tensor:
    if target is None:
        return st.pred
    if isinstance(target, int):
        return torch.full((st.n,), target, dtype=torch.int64)
    return target.long()


def backward(plan: Plan, st: Stats, theta: float = 0.0, target=None, block: int = BLOCK,
             count: bool = False, visit=None) -> Partial:
    """Slice one batch: CONTRIB of every neuron, reduced to a Partial (per-input maps are dropped as we go).
    count: also count the synapses a per-neuron loop would visit (benchmarks extrapolate the reference by it).
    visit(step, c, st): called with each keyed step's complete batch CONTRIB map before its rule consumes it
    (synapse.py derives per-weight counts and per-input slices from it; it must not modify c)."""
    out = Partial(inputs=st.n)
    logits = st.sd[plan.logits]
    contrib = {plan.logits: F.one_hot(targets(st, target), logits.shape[1]).float()}
    wanted = {s.name for s in plan.steps if s.rule.receives}
    for s in reversed(plan.steps):
        c = contrib.pop(s.name, None)
        if c is None and s.key is not None and s.name in st.sd:
            c = torch.zeros(st.sd[s.name].shape)  # nothing reached it: a slice of zeros, not a missing layer
        if c is None:
            continue
        # a map of zeros sends nothing back (a function step's map is not checked: its rule just passes zeros)
        if visit is not None and s.key is not None:
            visit(s, c, st)
        if s.key is None or out.add_map(s.key, c):
            if count and s.rule.weighted and s.parents[0] in wanted:
                out.synapses += synapse_count(s, (c != 0) & (sd(st, s.name) != 0), st.sd[s.parents[0]].shape)
            for parent, pc in s.rule.backward(s, c, st, theta, block, wanted):
                pc = layout(pc, st.sd[parent])
                contrib[parent] = contrib[parent] + pc if parent in contrib else pc
        st.sdf.pop(s.name, None)  # its children are done: nothing reads this step's signs again
        st.sdf.pop("relu>0:" + s.name, None)
    st.sdf.clear()
    return out


def synapse_count(s: Step, active: torch.Tensor, in_shape: torch.Size) -> int:
    """In-bounds inputs summed over the active output neurons of weighted sum `s` (padding is no input)."""
    return s.rule.synapses(s, active, in_shape)


RULES = ops.RuleTable("backward")  # kind -> its rule's backward, as the old table was (the rules live in ops.py)
