"""Synapse-level slices: how much each WEIGHT of a Conv2d / Linear carried the decision, from the exact slicer.

A synapse is one weight w[o, i, …] of a weighted sum. For one input, every output neuron n it feeds (each output
position of a conv shares the weight) sends the local contribution sign(CONTRIB_n·Δy_n·w·Δx_i) to its input i
through it, when the θ filter keeps that input (package docstring, ops.Conv / ops.Linear). The synapse's slice
over a set of inputs is, per weight (int64, shaped like the module's weight):

- `signed`: Σ of those local contributions over inputs and output positions;
- `count`:  Σ of their absolute values: how many (input, output neuron) pairs the synapse carried a nonzero
  contribution for (the contribution count NNSlicer ranks synapses by).

These are exactly what the per-neuron walk already computes, kept per weight instead of summed per input neuron.
The first layer's synapses are included (their input, the image, has a Δ even though it gets no CONTRIB).

Vectorised: at θ = 0 each layer is one weight-gradient convolution (or one matmul) of sign(CONTRIB·Δy) with the
input's sign(Δ); at θ > 0 a convolution goes through the compiled θ kernel (kernel.conv_theta_synapses: the
neuron-level kernel's cut, its kept signs summed per weight) where a C++ compiler is at hand, else, like a Linear,
blocks of active output neurons go through theta.kept (the same exact filter), as in algebra.conv_theta. `synapse_loop` is the reference: the loop walk of reference.py, with each weighted step's
synapses recomputed one output neuron and one synapse at a time (loops.py's windows and exact_keep), sharing no
tensor algebra with the vectorised path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import algebra as A
from . import kernel
from .graph import Plan
from .loops import sign
from .record import BATCH, batches, forward_stats, profile, sample_records
from .reference import walk_one
from .theta import exact_keep, kept
from .vectorized import BLOCK, Partial, backward

EXACT_F32 = 2.0 ** 24  # float32 sums of integers are exact below this


@dataclass
class Synapses:
    """Per-weight slice of a set of inputs, keyed by the weighted sum's leaf-module name."""
    inputs: int = 0
    signed: dict[str, torch.Tensor] = field(default_factory=dict)
    count: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, key: str, signed: torch.Tensor, count: torch.Tensor) -> None:
        self.signed[key] = self.signed[key] + signed if key in self.signed else signed
        self.count[key] = self.count[key] + count if key in self.count else count

    def merge(self, other: "Synapses") -> "Synapses":
        self.inputs += other.inputs
        for k in other.signed:
            self.add(k, other.signed[k], other.count[k])
        return self


def _exact(t: torch.Tensor) -> torch.Tensor:
    return t.round().long()


def _conv_theta0(m, g: torch.Tensor, sdp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over samples and positions of g_out·sd_in per weight tap: the weight gradient of the conv."""
    big = g.shape[0] * g.shape[2] * g.shape[3] >= EXACT_F32
    dt = torch.float64 if big else torch.float32
    gg, ss = g.to(dt).contiguous(), sdp.to(dt).contiguous()
    wsh = m.weight.shape

    def corr(a, b):
        return torch.nn.grad.conv2d_weight(b, wsh, a, m.stride, m.padding, m.dilation, m.groups)
    sw = m.weight.detach().sign().to(dt)
    return _exact(corr(gg, ss) * sw), _exact(corr(gg.abs(), ss.abs()) * sw.abs())


def _conv_theta(m, g: torch.Tensor, dx: torch.Tensor, y: torch.Tensor, theta: float, block: int):
    """θ > 0: per block of active output neurons, the θ filter's keep mask × signs, added per weight."""
    n, cin, h, w_ = dx.shape
    cout, groups = m.out_channels, m.groups
    kg = m.weight[0].numel()
    wm = m.weight.detach().reshape(cout, kg)
    sw = wm.sign().double()
    lo = g.shape[2] * g.shape[3]
    signed = torch.zeros(cout, kg, dtype=torch.float64)
    count = torch.zeros(cout, kg, dtype=torch.float64)
    per = max(1, block // (lo * cin * m.kernel_size[0] * m.kernel_size[1]))
    for i in range(0, n, per):
        cols = F.unfold(dx[i:i + per].contiguous(), m.kernel_size, m.dilation, m.padding, m.stride)
        ns = cols.shape[0]
        xs = cols.view(ns, groups, kg, lo).permute(0, 3, 1, 2).reshape(-1, kg)   # (N·L·G) × kg
        gi, yi = g[i:i + per], y[i:i + per]
        for b, o, r_, c_ in A.blocks(gi, kg, block):
            row = (b * lo + r_ * g.shape[3] + c_) * groups + o // (cout // groups)
            keep = kept(xs[row], wm[o], theta, yi[b, o, r_, c_])
            t = keep.double() * xs[row].sign().double()
            gv = gi[b, o, r_, c_].double()[:, None]
            signed.index_add_(0, o, gv * sw[o] * t)
            count.index_add_(0, o, gv.abs() * sw[o].abs() * t.abs())
    return _exact(signed).view(m.weight.shape), _exact(count).view(m.weight.shape)


def _conv_theta_compiled(m, g: torch.Tensor, dx: torch.Tensor, y: torch.Tensor, theta: float, block: int):
    """θ > 0 through the compiled kernel (kernel.py): the same cut per neuron, the kept signs summed per weight in
    C++; the neurons whose cut its float64 margins cannot decide are decided here by the torch path (exact)."""
    signed, count, amb = kernel.conv_theta_synapses(m, g, dx, y, theta)
    signed, count = _exact(signed).view(m.weight.shape), _exact(count).view(m.weight.shape)
    if len(amb):
        ga = torch.zeros(g.numel())
        ga[amb] = g.reshape(-1)[amb].float()
        s2, c2 = _conv_theta(m, ga.view(g.shape), dx, y, theta, block)
        signed, count = signed + s2, count + c2
    return signed, count


def _linear(m, g: torch.Tensor, sdp: torch.Tensor, st, p: str, name: str, theta: float, block: int):
    w = m.weight.detach()
    g2 = g.reshape(-1, w.shape[0]).double()
    if theta == 0:
        s2 = sdp.reshape(-1, w.shape[1]).double()
        sw = w.sign().double()
        return _exact((g2.T @ s2) * sw), _exact((g2.abs().T @ s2.abs()) * sw.abs())
    x = st.dx[p].reshape(-1, w.shape[1])
    y = st.y[name].reshape(-1, w.shape[0])
    signed = torch.zeros(w.shape, dtype=torch.float64)
    count = torch.zeros(w.shape, dtype=torch.float64)
    sw = w.sign().double()
    for r, o in A.blocks(g2, w.shape[1], block):
        keep = kept(x[r], w[o], theta, y[r, o])
        t = keep.double() * x[r].sign().double()
        gv = g2[r, o, None]
        signed.index_add_(0, o, gv * sw[o] * t)
        count.index_add_(0, o, gv.abs() * sw[o].abs() * t.abs())
    return _exact(signed), _exact(count)


def weight_contribs(s, c: torch.Tensor, st, theta: float, block: int = BLOCK):
    """(signed, count) per weight of weighted step `s`, for one batch whose CONTRIB map at `s` is `c`."""
    p = s.parents[0]
    g = c.sign() * A.sd(st, s.name)         # sign(CONTRIB_n)·sign(Δy_n), not in place: c belongs to the walk
    sdp = A.sd(st, p)
    if s.rule.kind == "conv":
        if theta == 0:
            return _conv_theta0(s.op, g, sdp)
        dx, y = st.dx[p].contiguous(), st.y[s.name].contiguous()
        if kernel.available():
            return _conv_theta_compiled(s.op, g.contiguous(), dx, y, theta, block)
        return _conv_theta(s.op, g.contiguous(), dx, y, theta, block)
    return _linear(s.op, g, sdp, st, p, s.name, theta, block)


def synapse_partial(model: torch.nn.Module, profile_inputs: torch.Tensor | None, inputs: torch.Tensor,
                    theta: float = 0.0, target=None, batch: int = BATCH, block: int = BLOCK,
                    plan: Plan | None = None, means: dict | None = None) -> tuple[Synapses, Partial]:
    """Per-weight slices of every Conv2d / Linear over `inputs` (and the usual per-neuron Partial with them).
    `target`: None (predicted class), a class, or one class per input; `means` skips profiling."""
    from .slicer import check_args
    plan = plan or Plan(model)
    means = means if means is not None else profile(plan, profile_inputs, batch)
    check_args(theta, target, means[plan.logits].shape[0])
    syn, part = Synapses(), Partial()
    for i, xb in enumerate(batches(inputs, batch)):
        tb = target[i * batch:(i + 1) * batch] if isinstance(target, torch.Tensor) else target
        part.merge(backward_synapses(plan, forward_stats(plan, means, xb, theta), theta, tb, block, syn))
    return syn, part


def backward_synapses(plan: Plan, st, theta: float, target, block: int, syn: Synapses) -> Partial:
    """One batch: the ordinary backward walk, with each weighted step's per-weight counts added into `syn`."""
    def visit(s, c, st_):
        if s.rule.weighted:
            syn.add(s.key, *weight_contribs(s, c, st_, theta, block))
    syn.inputs += st.n
    return backward(plan, st, theta, target, block, visit=visit)


# ---- the loop reference ---------------------------------------------------------------------------------------

def synapse_loop(model: torch.nn.Module, profile_inputs: torch.Tensor, inputs: torch.Tensor, theta: float = 0.0,
                 target: int | None = None, batch: int = BATCH) -> Synapses:
    """Per-weight slices, one sample, one output neuron and one synapse at a time (slow on purpose)."""
    plan = Plan(model)
    out = Synapses()
    for one in sample_records(plan, profile_inputs, inputs, batch):
        for key, (sg, ct) in _one(plan, one, theta, target).items():
            out.add(key, torch.from_numpy(sg), torch.from_numpy(ct))
        out.inputs += 1
    return out


def _one(plan: Plan, rec: dict, theta: float, target: int | None) -> dict:
    return walk_one(plan, rec, theta, target, lambda s, c: _loop_synapses(s, rec, c, theta) if s.rule.weighted
                    else None)  # CONTRIB of s is complete when collected


def _loop_synapses(s, rec, c, theta):
    """For each output neuron with CONTRIB ≠ 0, each of its synapses (weight index, input index), in input-index
    order; the θ cut by exact_keep; then sign(CONTRIB·Δy·w·Δx) into the weight's two counters."""
    m = s.op
    w = m.weight.detach().double().numpy()
    y, dy = rec[s.name]
    dx = rec[s.parents[0]][1]
    signed = np.zeros(w.shape, dtype=np.int64)
    count = np.zeros(w.shape, dtype=np.int64)
    if s.rule.kind == "conv":
        h, wd = dx.shape[1:]
        gin, gout = m.in_channels // m.groups, m.out_channels // m.groups
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation

        def synapses(idx):
            co, i, j = idx
            first = (co // gout) * gin
            return [((co, ci, a, b), (first + ci, i * sh - ph + a * dh, j * sw - pw + b * dw))
                    for ci in range(gin) for a in range(kh) for b in range(kw)
                    if 0 <= i * sh - ph + a * dh < h and 0 <= j * sw - pw + b * dw < wd]
    else:
        def synapses(idx):
            return [((idx[-1], i), idx[:-1] + (i,)) for i in range(w.shape[1])]
    import itertools
    for idx in itertools.product(*map(range, c.shape)):
        gsign = sign(c[idx]) * sign(dy[idx])
        if not gsign:
            continue
        syn = synapses(idx)
        keep = exact_keep([w[wi] * float(dx[xi]) for wi, xi in syn], theta, float(y[idx])) if theta \
            else [True] * len(syn)
        for (wi, xi), k in zip(syn, keep):
            if k:
                v = gsign * sign(w[wi]) * sign(dx[xi])
                signed[wi] += v
                count[wi] += abs(v)
    return signed, count
