"""The loop reference's building blocks: one sample, one neuron, one synapse at a time, with plain Python loops
over NumPy arrays of one sample's record (`rec[name] = (y, Δ)`, float64, no batch dimension) and integer CONTRIB
arrays. Slow on purpose. The per-op loops in ops.py are written with these only: every window, index, sign and θ
cut is recomputed here, nothing is shared with the tensor algebra of the vectorised rules (algebra.py).

`metered` counts the synapses the weighted sums visit and stops a run at a deadline (benchmarks time the
reference on part of a sample).
"""
from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass

from .theta import exact_keep


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


def sign(v: float) -> int:
    return int(v > 0) - int(v < 0)


def wanted(plan, p: str, rec: dict) -> bool:
    """The image needs no CONTRIB; constants and sizes are not neurons."""
    return p in rec and plan.by_name[p].rule.receives


def elementwise(s, rec, contrib, plan, weight=lambda idx: 1.0, gate=lambda idx: True):
    """Every parent gets sign(CONTRIB·Δy·w·Δx) at the same index, where `gate` allows it."""
    c, dy = contrib[s.name], rec[s.name][1]
    for p in s.parents:
        if not wanted(plan, p, rec):
            continue
        dx = rec[p][1]
        for idx in itertools.product(*map(range, c.shape)):
            if c[idx] and gate(idx):
                contrib[p][idx] += sign(c[idx]) * sign(dy[idx]) * sign(weight(idx)) * sign(dx[idx])


def windowed(s, rec, contrib, plan, window):
    """Each output neuron (c, i, j) with CONTRIB ≠ 0 passes its sign to the inputs `window` chooses."""
    p = s.parents[0]
    if not wanted(plan, p, rec):
        return
    c, dy, (x, dx) = contrib[s.name], rec[s.name][1], rec[p]
    for ch, i, j in itertools.product(*map(range, c.shape)):
        if c[ch, i, j]:
            for a, b in window(x[ch], i, j):
                contrib[p][ch, a, b] += sign(c[ch, i, j]) * sign(dy[ch, i, j]) * sign(dx[ch, a, b])


def span(o: int, k: int, s: int, pad: int, dil: int, size: int) -> list[int]:
    """In-bounds input positions of output position o along one axis (padding is not an input)."""
    return [o * s - pad + t * dil for t in range(k) if 0 <= o * s - pad + t * dil < size]


def weighted(s, rec, contrib, theta, plan, synapses):
    """synapses(out_index) -> [(input index, weight)] in input-index order; then the θ filter, then signs."""
    p = s.parents[0]
    if not wanted(plan, p, rec):
        return
    c, (y, dy), dx = contrib[s.name], rec[s.name], rec[p][1]
    for idx in itertools.product(*map(range, c.shape)):
        g = sign(c[idx]) * sign(dy[idx])
        if not g:
            continue
        syn = synapses(idx)
        keep = exact_keep([w * float(dx[i]) for i, w in syn], theta, float(y[idx])) if theta else [True] * len(syn)
        for (i, w), k in zip(syn, keep):
            if k:
                contrib[p][i] += g * sign(w) * sign(dx[i])
        _METER.tick(len(syn))
