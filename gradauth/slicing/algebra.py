"""The tensor algebra the vectorised rules (ops.py, `backward`) and the forward record share: signs as float32,
sign(W) cached per module, memory layouts, window matrices and the torch θ filter for convolutions.

Nothing here knows which op it serves; the loop reference (loops.py) shares none of it, so the tests that demand
exact agreement check this algebra against the definition.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .theta import kept


def layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t in like's memory layout: an elementwise op on a channels-last and an NCHW map is ~10× slower."""
    if t.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last) and \
            not t.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    return t


def mean_like(mean: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """The mean in the memory layout of the batch it is subtracted from (a channels-last map minus an NCHW mean
    is a strided loop, several times slower). Same values, same float subtraction. Means from `profile` already
    are (record.combine_means), so this is a view; it copies only a mean made elsewhere."""
    if val.dim() == 4 and val.is_contiguous(memory_format=torch.channels_last):
        return mean[None].contiguous(memory_format=torch.channels_last)
    return mean


def g(s, c: torch.Tensor, st) -> torch.Tensor:
    """sign(CONTRIB)·sign(Δy), computed in c's own storage: a rule calls it once, after add_map has read c, and
    nothing reads a step's map after its rule (in place saves the page faults of a fresh map per op)."""
    return c.sign_().mul_(sd(st, s.name))


def sd(st, name: str) -> torch.Tensor:
    """sign(Δ) as float32, converted once per batch: float×float ops run several times faster than the mixed
    int8×float ones, and backward drops each map once its own step is done (children come first)."""
    f = st.sdf.get(name)
    if f is None:
        f = st.sdf[name] = st.sd[name].float()
    return f


def pos(st, name: str) -> torch.Tensor:
    key = "relu>0:" + name
    f = st.sdf.get(key)
    if f is None:
        f = st.sdf[key] = st.pos[name].float()
    return f


_SIGN_W: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def sign_weight(m: torch.nn.Module, flip: bool) -> torch.Tensor:
    """sign(W), or for a stride-1 conv the sign of its transposed-and-flipped kernel (the conv2d that equals the
    transposed conv), cached per module while the weight is unchanged (the same tensor at the same version)."""
    w = m.weight
    key = (w.data_ptr(), w._version)
    cached = _SIGN_W.get(m, {}).get(flip)
    hit = cached[1] if cached is not None and cached[0] == key else None
    if hit is None:
        sw = w.detach().sign()
        if flip:
            gr = m.groups
            sw = sw.reshape(gr, sw.shape[0] // gr, *sw.shape[1:]).transpose(1, 2).reshape(
                sw.shape[1] * gr, sw.shape[0] // gr, *sw.shape[2:]).flip(2, 3).contiguous()
        hit = sw.contiguous(memory_format=torch.channels_last) if sw.dim() == 4 else sw
        _SIGN_W.setdefault(m, {})[flip] = (key, hit)  # one entry per form: a changed weight replaces it
    return hit


def crop(t: torch.Tensor, ph: int, pw: int, h: int, w: int) -> torch.Tensor:
    t = t[..., ph:ph + h, pw:pw + w]
    return F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]))


def adaptive_windows(n_in: int, n_out: int) -> torch.Tensor:
    """n_out × n_in 0/1 matrix of PyTorch's adaptive pooling windows: [⌊o·n/m⌋, ⌈(o+1)·n/m⌉)."""
    o = torch.arange(n_out)
    lo, hi = (o * n_in) // n_out, -((-(o + 1) * n_in) // n_out)
    i = torch.arange(n_in)
    return ((i[None, :] >= lo[:, None]) & (i[None, :] < hi[:, None])).float()


def argmax(m, x: torch.Tensor) -> torch.Tensor:
    """Arg-max positions of max-pool module `m` over x (PyTorch's own choice: the first maximum)."""
    _, idx = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True)
    return idx


def blocks(gm: torch.Tensor, k: int, block: int):
    """Index tuples of gm's nonzero entries, in blocks of about `block` / k neurons."""
    nz = torch.nonzero(gm)
    step = max(1, block // max(k, 1))
    for i in range(0, len(nz), step):
        yield nz[i:i + step].unbind(1)


def conv_theta(m, g: torch.Tensor, dx: torch.Tensor, y: torch.Tensor, theta: float, block: int) -> torch.Tensor:
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
        for b, o, r_, c_ in blocks(gi, kg, block):
            row = (b * lo + r_ * g.shape[3] + c_) * groups + o // (cout // groups)
            keep = kept(xs[row], wm[o], theta, yi[b, o, r_, c_])
            acc.index_add_(0, row, gi[b, o, r_, c_, None] * wm[o].sign() * keep)
        back = acc.view(ns, lo, groups * kg).permute(0, 2, 1)
        out.append(F.fold(back, (h, w_), m.kernel_size, m.dilation, m.padding, m.stride).round())
    return torch.cat(out)
