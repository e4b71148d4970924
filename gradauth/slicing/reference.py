"""The loop reference: one sample, one neuron, one synapse at a time, straight from the rules. Slow on purpose.

It shares only the graph walk (which op is which) and the forward record (outputs and Δ) with the vectorised
path; every window, index, sign and θ cut is recomputed here with plain Python loops, so the tests that demand
exact agreement check the tensor algebra of vectorized.py against the definition.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.modules.utils import _pair

from .graph import Plan, Step
from .record import BATCH, forward_record, profile
from .theta import exact_keep
from .vectorized import Partial


class OutOfTime(Exception):
    """A metered run hit its deadline (benchmarks time the reference on part of a sample)."""


@dataclass
class Meter:
    budget: float = float("inf")  # seconds of backward analysis, from the first weighted sum visited
    started: float | None = None
    synapses: int = 0  # (neuron, input) pairs visited by weighted sums, as Partial.synapses counts them

    def tick(self, n: int) -> None:
        now = time.perf_counter()
        if self.started is None:
            self.started = now  # profiling and the forward record are not the loops being timed
        self.synapses += n
        if now - self.started > self.budget:
            raise OutOfTime

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started if self.started is not None else 0.0


_METER = Meter()


@contextlib.contextmanager
def metered(seconds: float):
    """Count the reference's work and stop it (OutOfTime) `seconds` after its first weighted sum."""
    global _METER
    old, _METER = _METER, Meter(seconds)
    try:
        yield _METER
    finally:
        _METER = old


def _sign(v: float) -> int:
    return int(v > 0) - int(v < 0)


def slice_loop(model: torch.nn.Module, profile_inputs: torch.Tensor, inputs: torch.Tensor, theta: float = 0.0,
               target: int | None = None, batch: int = BATCH) -> Partial:
    plan = Plan(model)
    means = profile(plan, profile_inputs, batch)
    out = Partial()
    for i in range(0, len(inputs), batch):
        rec = {k: (y.double().numpy(), d.double().numpy()) for k, (y, d) in
               forward_record(plan, means, inputs[i:i + batch]).items()}
        for n in range(len(inputs[i:i + batch])):
            one = {k: (y[n], d[n]) for k, (y, d) in rec.items()}
            for key, c in _slice_one(plan, one, theta, target).items():
                out.add_map(key, torch.from_numpy(c[None]).double())
            out.inputs += 1
    return out


def _slice_one(plan: Plan, rec: dict, theta: float, target: int | None) -> dict[str, np.ndarray]:
    logits = rec[plan.logits][0]
    cls = int(np.argmax(logits)) if target is None else target
    contrib = {s.name: np.zeros(rec[s.name][0].shape, dtype=np.int64) for s in plan.steps if s.name in rec}
    contrib[plan.logits][cls] = 1
    result = {}
    for s in reversed(plan.steps):
        if s.name not in rec:
            continue
        if s.key is not None:
            result[s.key] = contrib[s.name]
        if s.kind in LOOPS:
            LOOPS[s.kind](s, rec, contrib, theta, plan)
    return result


def _wanted(plan: Plan, p: str, rec: dict) -> bool:
    """The image needs no CONTRIB; constants and sizes are not neurons."""
    return p in rec and plan.by_name[p].kind != "input"


def _elementwise(s: Step, rec, contrib, plan, weight=lambda idx: 1.0, gate=lambda idx: True):
    c, dy = contrib[s.name], rec[s.name][1]
    for p in s.parents:
        if not _wanted(plan, p, rec):
            continue
        dx = rec[p][1]
        for idx in itertools.product(*map(range, c.shape)):
            if c[idx] and gate(idx):
                contrib[p][idx] += _sign(c[idx]) * _sign(dy[idx]) * _sign(weight(idx)) * _sign(dx[idx])


def _bn(s, rec, contrib, theta, plan):
    gamma = s.op.weight.detach().double().tolist() if s.op.affine else None
    _elementwise(s, rec, contrib, plan, weight=lambda idx: gamma[idx[0]] if gamma else 1.0)


def _relu(s, rec, contrib, theta, plan):
    y = rec[s.name][0]
    _elementwise(s, rec, contrib, plan, gate=lambda idx: y[idx] > 0)


def _add(s, rec, contrib, theta, plan):
    _elementwise(s, rec, contrib, plan)


def _reindex(s, rec, contrib, theta, plan):
    p = s.parents[0]
    if _wanted(plan, p, rec):
        contrib[p] += contrib[s.name].reshape(contrib[p].shape)


def _cat(s, rec, contrib, theta, plan):
    dim = s.node.kwargs.get("dim", s.node.args[1] if len(s.node.args) > 1 else 0)
    dim = (dim if dim >= 0 else dim + contrib[s.name].ndim + 1) - 1  # the record has no batch dimension
    at = 0
    for p in s.parents:
        size = rec[p][0].shape[dim]
        if _wanted(plan, p, rec):
            contrib[p] += np.take(contrib[s.name], range(at, at + size), axis=dim)
        at += size


def _windowed(s, rec, contrib, plan, window):
    """Each output neuron (c, i, j) with CONTRIB ≠ 0 passes its sign to the inputs `window` chooses."""
    p = s.parents[0]
    if not _wanted(plan, p, rec):
        return
    c, dy, (x, dx) = contrib[s.name], rec[s.name][1], rec[p]
    for ch, i, j in itertools.product(*map(range, c.shape)):
        if c[ch, i, j]:
            for a, b in window(x[ch], i, j):
                contrib[p][ch, a, b] += _sign(c[ch, i, j]) * _sign(dy[ch, i, j]) * _sign(dx[ch, a, b])


def _span(o: int, k: int, s: int, pad: int, dil: int, size: int) -> list[int]:
    return [o * s - pad + t * dil for t in range(k) if 0 <= o * s - pad + t * dil < size]


def _maxpool(s, rec, contrib, theta, plan):
    m = s.op
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(m.kernel_size), _pair(m.stride or m.kernel_size),
                                              _pair(m.padding), _pair(m.dilation))

    def argmax(x, i, j):
        best = None
        for a in _span(i, kh, sh, ph, dh, x.shape[0]):  # row-major scan; the first maximum wins
            for b in _span(j, kw, sw, pw, dw, x.shape[1]):
                if best is None or x[a, b] > x[best]:
                    best = (a, b)
        return [best]
    _windowed(s, rec, contrib, plan, argmax)


def _avgpool(s, rec, contrib, theta, plan):
    m = s.op
    (kh, kw), (sh, sw), (ph, pw) = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding)
    _windowed(s, rec, contrib, plan, lambda x, i, j: itertools.product(
        _span(i, kh, sh, ph, 1, x.shape[0]), _span(j, kw, sw, pw, 1, x.shape[1])))


def _adaptive(s, rec, contrib, theta, plan):
    ho, wo = rec[s.name][0].shape[1:]

    def window(x, i, j):
        h, w = x.shape
        return itertools.product(range(i * h // ho, -(-(i + 1) * h // ho)), range(j * w // wo, -(-(j + 1) * w // wo)))
    _windowed(s, rec, contrib, plan, window)


def _weighted(s, rec, contrib, theta, plan, synapses):
    """synapses(out_index) -> [(input index, weight)] in input-index order; then the θ filter, then signs."""
    p = s.parents[0]
    if not _wanted(plan, p, rec):
        return
    c, (y, dy), dx = contrib[s.name], rec[s.name], rec[p][1]
    for idx in itertools.product(*map(range, c.shape)):
        g = _sign(c[idx]) * _sign(dy[idx])
        if not g:
            continue
        syn = synapses(idx)
        keep = exact_keep([w * float(dx[i]) for i, w in syn], theta, float(y[idx])) if theta else [True] * len(syn)
        for (i, w), k in zip(syn, keep):
            if k:
                contrib[p][i] += g * _sign(w) * _sign(dx[i])
        _METER.tick(len(syn))


def _linear(s, rec, contrib, theta, plan):
    w = s.op.weight.detach().double().numpy()
    _weighted(s, rec, contrib, theta, plan,
              lambda idx: [(idx[:-1] + (i,), float(w[idx[-1], i])) for i in range(w.shape[1])])


def _conv(s, rec, contrib, theta, plan):
    m = s.op
    w = m.weight.detach().double().numpy()
    h, wd = rec[s.parents[0]][0].shape[1:]
    per_group_in, per_group_out = m.in_channels // m.groups, m.out_channels // m.groups
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation

    def synapses(idx):
        co, i, j = idx
        first = (co // per_group_out) * per_group_in
        return [((first + ci, i * sh - ph + a * dh, j * sw - pw + b * dw), float(w[co, ci, a, b]))
                for ci in range(per_group_in) for a in range(kh) for b in range(kw)
                if 0 <= i * sh - ph + a * dh < h and 0 <= j * sw - pw + b * dw < wd]  # padding is not an input
    _weighted(s, rec, contrib, theta, plan, synapses)


LOOPS = {"conv": _conv, "linear": _linear, "bn": _bn, "relu": _relu, "add": _add, "maxpool": _maxpool,
         "avgpool": _avgpool, "adaptive_avgpool": _adaptive, "reshape": _reindex, "identity": _reindex, "cat": _cat}
