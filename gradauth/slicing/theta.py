"""The θ filter of weighted sums, decided exactly.

For one output neuron n with inputs i: p_i = w_i·Δx_i. Sort the inputs by |p_i| ascending (ties: lower input
index first) and drop the longest prefix whose running sums S_j = p_(1) + … + p_(j) all satisfy |S_j| < θ·|y_n|;
every input after it is kept. y_n is the neuron's OUTPUT value as the model computed it (float32, bias included),
as the slicing issue's contract says: θ is the share of the neuron's value that its dropped inputs may carry.
With y_n = 0 nothing is below 0, so every input is kept ("keep all when |y_n| is ~0": as |y_n| shrinks the
threshold shrinks with it, down to keeping all). When even the whole sum stays below θ·|y_n| (a neuron whose
value is mostly its profiled mean or bias, not its inputs' change) every input is dropped.

"Exactly" means over the reals: p_i is a product of two float32 values, which a float64 holds without rounding,
θ·|y_n| is the exact product of the Python float θ and the float32 y_n, and S_j are exact sums. So the result
does not depend on summation order, which is what lets a vectorised version, the per-neuron loop reference and
chunked or distributed runs agree bit for bit.

`exact_keep` does it with Python integers (all values are dyadic rationals). `kept` does whole blocks of neurons
with tensor ops and never sorts a whole row: |p| is binned by the bits of its float32 value (a monotone key, up to
K bins per row over 12 octaves), per-bin sums bound the running sum at every bin boundary, and only the elements
of the few bins where the cut can lie are sorted, by their exact float64 value. Float64
sums and the float64 product θ·|y_n| carry a rigorous error margin; a row the margin cannot decide (|S_j| within
rounding of θ·|y_n|) is handed to `exact_keep`, so the fast path is exact, not approximately so.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Sequence

import torch

OCTAVES = 12          # bins span this many octaves below the row's largest |p|; everything smaller shares bin 0
EPS = 2.0 ** -52      # twice float64's unit roundoff: the margins below are 2× the textbook bounds


def exact_keep(p: Sequence[float], theta: float, y: float) -> list[bool]:
    """keep[i] for one neuron with products p and output y, in exact arithmetic (floats are dyadic rationals)."""
    ratios = [float(v).as_integer_ratio() for v in p]
    den = max([d for _, d in ratios], default=1)  # all powers of two: the largest is a common multiple
    ints = [n * (den // d) for n, d in ratios]
    bound = Fraction(theta) * abs(Fraction(float(y))) * den  # |S_j| < θ·|y|, everything scaled by den
    if bound == 0:
        return [True] * len(p)
    order = sorted(range(len(p)), key=lambda i: (abs(ints[i]), i))
    s, cut = 0, len(order)
    for j, i in enumerate(order):
        s += ints[i]
        if abs(s) >= bound:
            cut = j
            break
    keep = [True] * len(p)
    for i in order[:cut]:
        keep[i] = False
    return keep


def kept(x: torch.Tensor, w: torch.Tensor, theta: float, y: torch.Tensor) -> torch.Tensor:
    """keep mask (R×K bool) for R neurons, from their inputs `x` (Δx), weights `w` (R×K float32) and outputs
    `y` (R, float32)."""
    keep = torch.ones(x.shape, dtype=torch.bool)
    if theta <= 0 or not x.numel():
        return keep
    # All products 0: every contribution is 0 and keep is moot. y = 0: nothing is below 0, all are kept.
    live = ((x != 0) & (w != 0)).any(1) & (y != 0)
    if bool(live.all()):
        return _kept_live(x, w, theta, y)
    rows = torch.nonzero(live).flatten()
    if len(rows):
        keep[rows] = _kept_live(x[rows], w[rows], theta, y[rows])
    return keep


def _bins(a: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Monotone bin of each |p| (float32, ≥ 0: its bit pattern orders like the number; rounding is monotone).

    As many bins per octave as keeps the histogram at most K bins per row: finer bins hold less mass, so fewer
    of them can hide the cut and fewer elements need sorting."""
    k = a.shape[1]
    sub = min(20, max(0, int(k // OCTAVES).bit_length() - 1))  # 2^sub bins per octave
    if k <= 64:
        return torch.zeros(a.shape, dtype=torch.int64), 1
    nb = OCTAVES << sub
    key = a.view(torch.int32) >> (23 - sub)
    return (key - key.amax(1, keepdim=True) + (nb - 1)).clamp_(min=0).long(), nb


def _kept_live(x: torch.Tensor, w: torch.Tensor, theta: float, y: torch.Tensor) -> torch.Tensor:
    r, k = x.shape
    p = x * w  # float32, rounded: only bins and bounds use it; every value that is compared is exact
    a = p.abs()
    b, nb = _bins(a)
    # Per-bin sums of positive and negative parts in one scatter; running sums at every bin boundary.
    h = torch.zeros(r, 2 * nb, dtype=torch.float64).scatter_add_(1, b + nb * (p < 0), a.double())
    pos, neg = h[:, :nb], h[:, nb:]
    tot, mag = pos - neg, pos + neg
    end = torch.cumsum(tot, 1)
    start = end - tot
    # Error of any sum below: each float32 product is within 2^-24 of exact (plus underflow, < 2^-149 each), and
    # float64 sums of ≤ 2K + B terms add (2K + B)·u·Σ|p|; t = θ·|y| is one float64 product, within u·t.
    t = theta * y.double().abs()
    margin = ((2 * k + nb + 8) * EPS + 2.0 ** -23) * mag.sum(1) + k * 2.0 ** -148 + EPS * t
    # The cut lies between the first bin that is not surely dropped whole and the first bin by whose end the
    # running sum has surely reached t: only the elements of those bins are sorted.
    # Inside bin b the running sum stays within [S_b - neg_b, S_b + pos_b], whatever the order.
    dropped_whole = torch.maximum((start + pos).abs(), (start - neg).abs()) < (t - margin)[:, None]
    reached = end.abs() >= (t + margin)[:, None]
    lo = (~dropped_whole).int().argmax(1)
    hi = torch.where(reached.any(1), reached.int().argmax(1), torch.full((r,), nb - 1))
    inrange = (b >= lo[:, None]) & (b <= hi[:, None])
    drop_r, drop_c, found, amb = _scan(x, w, inrange, start.gather(1, lo[:, None])[:, 0], t, margin)
    # No cut found: every prefix stays below t (possible for θ > 1), so every input is dropped.
    keep = ((b > hi[:, None]) | inrange) & found[:, None]
    keep[drop_r, drop_c] = False
    amb |= t <= margin  # a threshold this close to 0 is for exact arithmetic to compare
    for i in torch.nonzero(amb).flatten().tolist():
        keep[i] = torch.tensor(exact_keep((x[i].double() * w[i].double()).tolist(), theta, float(y[i])))
    return keep


def _scan(x, w, inrange, s0, t, margin):
    """Sort each row's candidates by exact |p| and find where |running sum| first surely reaches t.

    Returns (rows, cols) of the dropped candidates, found (the cut was found) and ambiguous (rounding cannot
    decide a comparison before it) per row. Two flat stable sorts (by |p|, then by row) order the candidates by
    (row, |p|, input index) without padding every row to the longest."""
    r = x.shape[0]
    ri, ci = torch.nonzero(inrange, as_tuple=True)
    pe = x[ri, ci].double() * w[ri, ci].double()  # exact
    o1 = torch.sort(pe.abs(), stable=True).indices
    order = o1[torch.sort(ri[o1], stable=True).indices]
    rs, cs = ri[order], ci[order]
    counts = torch.bincount(ri, minlength=r)
    slot = torch.arange(len(rs)) - (torch.cumsum(counts, 0) - counts)[rs]
    width = int(counts.max()) if r else 0
    sp = torch.zeros((r, width), dtype=torch.float64)
    sp[rs, slot] = pe[order]
    run = s0[:, None] + torch.cumsum(sp, 1)        # padding adds 0 and is never looked at
    valid = torch.arange(width)[None, :] < counts[:, None]
    reached = valid & (run.abs() - margin[:, None] >= t[:, None])
    found = reached.any(1)
    j = torch.where(found, reached.int().argmax(1), counts)
    dropped = slot < j[rs]
    below = run[rs, slot].abs() + margin[rs] < t[rs]
    amb = torch.zeros(r, dtype=torch.bool)
    amb[rs[dropped & ~below]] = True
    return rs[dropped], cs[dropped], found, amb
