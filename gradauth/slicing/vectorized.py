"""Backward analysis on whole batches: every rule is a few tensor ops over a whole layer.

CONTRIB maps are float32 tensors holding integers (every sum below is of integers far under 2^24, so float32 is
exact). With g = sign(CONTRIB_n)·sign(Δy_n), the contribution an input i receives from a weighted sum is
sign(Δx_i)·Σ_n g_n·sign(w_ni)·keep_ni: at θ = 0 (keep ≡ 1) that is one transposed convolution (or matmul) with
sign(W); at θ > 0 it is computed per block of output neurons with CONTRIB ≠ 0 (unfold, θ filter, fold), or for
convolutions by the compiled kernel of kernel.py where a C++ compiler is at hand (same result, 10-50× faster per
layer on the ResNet-10 bench).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from . import kernel
from .graph import Plan, Step
from .record import Stats
from .theta import kept

BLOCK = 1 << 17  # θ > 0: neurons × inputs per block of the filter: its ~30 B each stay in cache (2× faster than 2^21)

Contribs = Iterator[tuple[str, torch.Tensor]]


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
             count: bool = False) -> Partial:
    """Slice one batch: CONTRIB of every neuron, reduced to a Partial (per-input maps are dropped as we go).
    count: also count the synapses a per-neuron loop would visit (benchmarks extrapolate the reference by it)."""
    out = Partial(inputs=st.n)
    logits = st.sd[plan.logits]
    contrib = {plan.logits: F.one_hot(targets(st, target), logits.shape[1]).float()}
    wanted = {s.name for s in plan.steps if s.kind not in ("input", "const", "meta", "output")}
    for s in reversed(plan.steps):
        c = contrib.pop(s.name, None)
        if c is None and s.key is not None and s.name in st.sd:
            c = torch.zeros(st.sd[s.name].shape)  # nothing reached it: a slice of zeros, not a missing layer
        if c is None:
            continue
        # a map of zeros sends nothing back (a function step's map is not checked: its rule just passes zeros)
        if s.key is None or out.add_map(s.key, c):
            if count and s.kind in ("conv", "linear") and s.parents[0] in wanted:
                out.synapses += synapse_count(s, (c != 0) & (_sd(st, s.name) != 0), st.sd[s.parents[0]].shape)
            for parent, pc in RULES[s.kind](s, c, st, theta, block, wanted):
                pc = _layout(pc, st.sd[parent])
                contrib[parent] = contrib[parent] + pc if parent in contrib else pc
        st.sdf.pop(s.name, None)  # its children are done: nothing reads this step's signs again
        st.sdf.pop("relu>0:" + s.name, None)
    st.sdf.clear()
    return out


def synapse_count(s: Step, active: torch.Tensor, in_shape: torch.Size) -> int:
    """In-bounds inputs summed over the active output neurons (padding is no input)."""
    m = s.op
    if s.kind == "linear":
        return int(active.sum()) * m.in_features
    # a conv of ones over a map of ones counts each output position's in-bounds taps (zero padding adds 0)
    taps = F.conv2d(torch.ones(1, 1, *in_shape[-2:]), torch.ones(1, 1, *m.kernel_size), None, m.stride, m.padding,
                    m.dilation)[0, 0]
    return int((active.sum((0, 1)) * taps).sum()) * (m.in_channels // m.groups)


def _layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t in like's memory layout: an elementwise op on a channels-last and an NCHW map is ~10× slower."""
    if t.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last) and \
            not t.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _g(s: Step, c: torch.Tensor, st: Stats) -> torch.Tensor:
    """sign(CONTRIB)·sign(Δy), computed in c's own storage: a rule calls it once, after add_map has read c, and
    nothing reads a step's map after its rule (in place saves the page faults of a fresh map per op)."""
    return c.sign_().mul_(_sd(st, s.name))


def _sd(st: Stats, name: str) -> torch.Tensor:
    """sign(Δ) as float32, converted once per batch: float×float ops run several times faster than the mixed
    int8×float ones, and backward drops each map once its own step is done (children come first)."""
    f = st.sdf.get(name)
    if f is None:
        f = st.sdf[name] = st.sd[name].float()
    return f


def _pos(st: Stats, name: str) -> torch.Tensor:
    key = "relu>0:" + name
    f = st.sdf.get(key)
    if f is None:
        f = st.sdf[key] = st.pos[name].float()
    return f


_SIGN_W: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _sign_weight(m: torch.nn.Module, flip: bool) -> torch.Tensor:
    """sign(W), or for a stride-1 conv the sign of its transposed-and-flipped kernel (the conv2d that equals the
    transposed conv), cached per module while the weight is unchanged (the same tensor at the same version)."""
    w = m.weight
    key = (w.data_ptr(), w._version)
    cached = _SIGN_W.get(m, {}).get(flip)
    hit = cached[1] if cached is not None and cached[0] == key else None
    if hit is None:
        sw = w.detach().sign()
        if flip:
            g = m.groups
            sw = sw.reshape(g, sw.shape[0] // g, *sw.shape[1:]).transpose(1, 2).reshape(
                sw.shape[1] * g, sw.shape[0] // g, *sw.shape[2:]).flip(2, 3).contiguous()
        hit = sw.contiguous(memory_format=torch.channels_last) if sw.dim() == 4 else sw
        _SIGN_W.setdefault(m, {})[flip] = (key, hit)  # one entry per form: a changed weight replaces it
    return hit


# ---- elementwise rules: the parent gets sign(CONTRIB·Δy·w·Δx) -------------------------------------------------

def bn(s, c, st, theta, block, wanted) -> Contribs:
    p = s.parents[0]
    if p in wanted:
        w = s.op.weight.detach().sign() if s.op.affine else torch.ones(s.op.num_features)
        shape = [1, -1] + [1] * (c.dim() - 2)
        yield p, _g(s, c, st).mul_(w.view(shape)).mul_(_sd(st, p))


def relu(s, c, st, theta, block, wanted) -> Contribs:
    p = s.parents[0]
    if p in wanted:
        yield p, _g(s, c, st).mul_(_sd(st, p)).mul_(_pos(st, s.name))


def add(s, c, st, theta, block, wanted) -> Contribs:
    g = _g(s, c, st)
    for p in s.parents:
        if p in wanted:
            sd = _sd(st, p)
            yield p, (g * sd).sum_to_size(sd.shape) if sd.shape != g.shape else g * sd


def reindex(s, c, st, theta, block, wanted) -> Contribs:
    p = s.parents[0]
    if p in wanted:
        yield p, c.reshape(st.sd[p].shape)


def cat(s, c, st, theta, block, wanted) -> Contribs:
    dim = s.node.kwargs.get("dim", s.node.args[1] if len(s.node.args) > 1 else 0)
    sizes = [st.sd[p].shape[dim] for p in s.parents]
    for p, part in zip(s.parents, torch.split(c, sizes, dim)):
        if p in wanted:
            yield p, part


def maxpool(s, c, st, theta, block, wanted) -> Contribs:
    p = s.parents[0]
    if p not in wanted:
        return
    sd = _sd(st, p)
    idx = st.idx[s.name].flatten(2)
    val = _g(s, c, st).flatten(2) * sd.flatten(2).gather(2, idx)
    yield p, torch.zeros_like(sd).flatten(2).scatter_add_(2, idx, val).view_as(sd)


def avgpool(s, c, st, theta, block, wanted) -> Contribs:
    p = s.parents[0]
    if p not in wanted:
        return
    sd = _sd(st, p)
    m = s.op
    (kh, kw), (sh, sw), (ph, pw) = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding)
    g = _g(s, c, st)
    n, ch, ho, wo = g.shape
    # Every window member gets the window's sign: a transposed conv with a ones kernel, then drop the padding.
    full = F.conv_transpose2d(g.reshape(n * ch, 1, ho, wo), torch.ones(1, 1, kh, kw), stride=(sh, sw))
    yield p, _crop(full, ph, pw, sd.shape[2], sd.shape[3]).reshape(sd.shape) * sd


def _crop(t: torch.Tensor, ph: int, pw: int, h: int, w: int) -> torch.Tensor:
    t = t[..., ph:ph + h, pw:pw + w]
    return F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]))


def adaptive_windows(n_in: int, n_out: int) -> torch.Tensor:
    """n_out × n_in 0/1 matrix of PyTorch's adaptive pooling windows: [⌊o·n/m⌋, ⌈(o+1)·n/m⌉)."""
    o = torch.arange(n_out)
    lo, hi = (o * n_in) // n_out, -((-(o + 1) * n_in) // n_out)
    i = torch.arange(n_in)
    return ((i[None, :] >= lo[:, None]) & (i[None, :] < hi[:, None])).float()


def adaptive_avgpool(s, c, st, theta, block, wanted) -> Contribs:
    p = s.parents[0]
    if p in wanted:
        sd = _sd(st, p)
        mh, mw = adaptive_windows(sd.shape[2], c.shape[2]), adaptive_windows(sd.shape[3], c.shape[3])
        yield p, torch.einsum("ncij,ih,jw->nchw", _g(s, c, st), mh, mw) * sd


# ---- weighted sums ------------------------------------------------------------------------------------------

def linear(s, c, st, theta, block, wanted) -> Contribs:
    p = s.parents[0]
    if p not in wanted:
        return
    w = s.op.weight.detach()
    g = _g(s, c, st)
    if theta == 0:
        yield p, (g @ _sign_weight(s.op, False)).round_().mul_(_sd(st, p))
        return
    x = st.dx[p].reshape(-1, w.shape[1])
    g = g.reshape(-1, w.shape[0])
    y = st.y[s.name].reshape(-1, w.shape[0])
    acc = torch.zeros_like(x)
    for r, o in _blocks(g, w.shape[1], block):
        keep = kept(x[r], w[o], theta, y[r, o])
        acc.index_add_(0, r, g[r, o, None] * w[o].sign() * keep)
    yield p, acc.reshape(st.dx[p].shape) * _sd(st, p)


def _blocks(g: torch.Tensor, k: int, block: int):
    """Index tuples of g's nonzero entries, in blocks of about `block` / k neurons."""
    nz = torch.nonzero(g)
    step = max(1, block // max(k, 1))
    for i in range(0, len(nz), step):
        yield nz[i:i + step].unbind(1)


def conv(s, c, st, theta, block, wanted) -> Contribs:
    p = s.parents[0]
    if p not in wanted:
        return
    m, g, sd = s.op, _g(s, c, st), _sd(st, p)
    if theta == 0:
        # ±1/0 times ±1/0, summed: integers far under 2^24, exact in float32 whatever the summation order.
        g = g.contiguous(memory_format=torch.channels_last)
        flip = [d * (k - 1) - pd for k, pd, d in zip(m.kernel_size, m.padding, m.dilation)]
        if tuple(m.stride) == (1, 1) and min(flip) >= 0:
            # stride 1: the transposed conv is a plain conv with the flipped, transposed kernel (oneDNN's fast path)
            back = F.conv2d(g, _sign_weight(m, True), None, 1, flip, m.dilation, m.groups)
        else:
            base = [(o - 1) * st_ - 2 * pd + dl * (k - 1) + 1 for o, st_, pd, dl, k in
                    zip(g.shape[2:], m.stride, m.padding, m.dilation, m.kernel_size)]
            opad = [h - b for h, b in zip(sd.shape[2:], base)]
            back = F.conv_transpose2d(g, _sign_weight(m, False), None, m.stride, m.padding, opad, m.groups,
                                      m.dilation)
        yield p, back.round_().mul_(sd)
        return
    dx, y = st.dx[p], st.y[s.name]
    if kernel.available():
        back, amb = kernel.conv_theta(m, g, dx, y, theta)
        if len(amb):  # neurons whose cut float64 margins could not decide: the torch path decides them exactly
            ga = torch.zeros(g.numel())
            ga[amb] = g.contiguous().view(-1)[amb]
            back += _conv_theta(m, ga.view(g.shape), dx, y, theta, block)
        yield p, _layout(back, sd).mul_(sd)
        return
    yield p, _conv_theta(m, g, dx, y, theta, block) * sd


def _conv_theta(m, g: torch.Tensor, dx: torch.Tensor, y: torch.Tensor, theta: float, block: int) -> torch.Tensor:
    """Σ_n g_n·sign(w)·keep over each input, for a conv at θ > 0; samples in groups so the unfold stays ≤ block."""
    n, cin, h, w_ = dx.shape
    cout, groups = m.out_channels, m.groups
    kg = m.weight[0].numel()
    wm = m.weight.detach().reshape(cout, kg)
    lo = g.shape[2] * g.shape[3]
    per = max(1, block // (lo * cin * m.kernel_size[0] * m.kernel_size[1]))
    out = []
    for i in range(0, n, per):
        cols = F.unfold(dx[i:i + per], m.kernel_size, m.dilation, m.padding, m.stride)     # N, G·kg, L
        ns = cols.shape[0]
        xs = cols.view(ns, groups, kg, lo).permute(0, 3, 1, 2).reshape(-1, kg)          # (N·L·G) × kg
        acc = torch.zeros_like(xs)
        gi, yi = g[i:i + per], y[i:i + per]
        for b, o, r_, c_ in _blocks(gi, kg, block):
            row = (b * lo + r_ * g.shape[3] + c_) * groups + o // (cout // groups)
            keep = kept(xs[row], wm[o], theta, yi[b, o, r_, c_])
            acc.index_add_(0, row, gi[b, o, r_, c_, None] * wm[o].sign() * keep)
        back = acc.view(ns, lo, groups * kg).permute(0, 2, 1)
        out.append(F.fold(back, (h, w_), m.kernel_size, m.dilation, m.padding, m.stride).round())
    return torch.cat(out)


RULES: dict[str, Callable] = {
    "conv": conv, "linear": linear, "bn": bn, "relu": relu, "add": add, "maxpool": maxpool, "avgpool": avgpool,
    "adaptive_avgpool": adaptive_avgpool, "reshape": reindex, "identity": reindex, "cat": cat,
    "input": lambda *a: iter(()), "const": lambda *a: iter(()), "meta": lambda *a: iter(()),
}
