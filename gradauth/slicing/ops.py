"""The slicer's op rules: one object per op, everything about that op in one place.

A rule (a registered `OpRule` subclass, one instance per kind) holds, for its op:

- how the graph recognises it: `modules` (exact types), `functions` (call_function targets), `methods`
  (call_method names), `nodes` (fx node ops taken whatever their target), `accepts` for a narrower match,
  `operands` (which arguments carry neurons), `twins` (function forms run as their module twin) and `check`
  (settings it refuses);
- how graph.run executes it (`forward`: functional, never in place, inference mode);
- which forward statistics it records (`records`: the `record.Stats` fields it fills besides sign(Δ); `record`
  fills them);
- its vectorised backward (`backward`: whole batches, tensor algebra from algebra.py);
- its loop reference (`loop`: one sample, one neuron, one synapse at a time, plain loops from loops.py);
- its documented semantics: the class docstring (the general ones are in the package docstring, __init__.py).

`RULES` maps each kind to its rule; `MODULES`, `FUNCTIONS`, `METHODS` and `NODES` are the op tables graph.py
looks ops up in, built from the rules at registration (an op claimed by two rules is refused at import).
tests/test_oprules.py checks that the registry is complete: every kind the graph emits has one rule with every
part, every table entry is exercised by a model whose vectorised slice equals the loop reference.

Rule signatures: `backward(s, c, st, theta, block, wanted)` yields (parent, CONTRIB map) for the step `s` whose
batch CONTRIB map is `c`, from the Stats `st`, for the parents in `wanted`; `loop(s, rec, contrib, theta, plan)`
adds one sample's integer CONTRIB of `s` into its parents' arrays in `contrib`.
"""
from __future__ import annotations

import itertools
import operator
from collections.abc import Mapping
from typing import Any, Iterator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from . import algebra as A
from . import kernel
from . import loops as L
from ..errors import GradauthError
from .theta import kept

Contribs = Iterator[tuple[str, torch.Tensor]]


class UnsupportedOp(GradauthError):
    """The model holds an op the slicer has no contribution rule for."""


class OpRule:
    """One op's rule. Subclasses set the class attributes and override what differs; `backward` and `loop` have
    no default: each rule states both, even when nothing flows back (inputs, constants, sizes, the output)."""
    kind: str = ""
    label: str = ""                      # how refusals name it among the supported ops ("": not listed)
    modules: tuple[type, ...] = ()       # call_module: these exact types (not subclasses)
    functions: tuple[Any, ...] = ()      # call_function targets
    methods: tuple[str, ...] = ()        # call_method names
    nodes: tuple[str, ...] = ()          # fx node ops taken whatever the target (placeholder, get_attr, output)
    twins: dict[Any, type] = {}          # function form -> module twin, so one window maths serves both forms
    records: tuple[str, ...] = ()        # Stats fields filled besides sd (sd is recorded for every neuron)
    neurons: bool = True                 # the output holds neurons: profiled, Δ recorded, in the slice
    receives: bool = True                # gets CONTRIB from its consumers (the image does not)
    weighted: bool = False               # a weighted sum: θ filters its inputs; `synapses` counts them

    # ---- recognition ----
    def accepts(self, node: fx.Node, by_name: dict) -> bool:
        """Whether this node really is the op (a table match can be narrowed); by_name: the steps so far."""
        return True

    def operands(self, node: fx.Node) -> list[fx.Node]:
        """The arguments that carry neurons: the first one (the rest are sizes, dims or constants)."""
        return [node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else []

    def twin(self, node: fx.Node) -> nn.Module | None:
        t = self.twins.get(node.target) if node.op == "call_function" else None
        return t(*node.args[1:], **node.kwargs) if t is not None else None

    def check(self, step) -> None:
        """Refuse (UnsupportedOp) settings the rule does not cover."""

    # ---- forward ----
    def forward(self, step, args: tuple, kwargs: dict):
        if step.op is not None:
            return step.op(args[0])
        n = step.node
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        return n.target(*args, **kwargs)

    def record(self, st, step, val: torch.Tensor, args: tuple, means: dict, theta: float) -> None:
        """Fill this op's `records` fields of the Stats `st` from its output `val` and inputs `args`."""

    # ---- backward ----
    def backward(self, s, c, st, theta, block, wanted) -> Contribs:
        raise NotImplementedError(f"op rule {self.kind!r} states no vectorised backward")

    def loop(self, s, rec, contrib, theta, plan) -> None:
        raise NotImplementedError(f"op rule {self.kind!r} states no loop reference")


RULES: dict[str, OpRule] = {}
MODULES: dict[type, OpRule] = {}
FUNCTIONS: dict[Any, OpRule] = {}
METHODS: dict[str, OpRule] = {}
NODES: dict[str, OpRule] = {}


def register(cls: type[OpRule]) -> type[OpRule]:
    """Add a rule to the registry and its ops to the tables. An op (or kind) claimed twice, or a rule without a
    kind, an op, a docstring, a backward or a loop, is a programming error: ValueError, nothing registered."""
    rule = cls()
    tables = ((RULES, (rule.kind,)), (MODULES, rule.modules), (FUNCTIONS, rule.functions),
              (METHODS, rule.methods), (NODES, rule.nodes))
    for table, keys in tables:
        taken = [k for k in keys if k in table]
        if taken:
            raise ValueError(f"op rule {cls.__name__}: {taken} already have a rule ({table[taken[0]].kind})")
    missing = [part for part, bad in (
        ("kind", not rule.kind), ("op", not (rule.modules or rule.functions or rule.methods or rule.nodes)),
        ("docstring", not (cls.__doc__ or "").strip()), ("backward", cls.backward is OpRule.backward),
        ("loop", cls.loop is OpRule.loop)) if bad]
    if missing:
        raise ValueError(f"op rule {cls.__name__} states no {', '.join(missing)}")
    for table, keys in tables:
        for k in keys:
            table[k] = rule
    return cls


class RuleTable(Mapping):
    """A live, read-only view kind -> one part of every registered rule (`vectorized.RULES` is the backwards,
    `reference.LOOPS` the loops): the tables those modules had, now derived, so they cannot drift apart."""

    def __init__(self, part: str):
        self.part = part

    def __getitem__(self, kind: str):
        return getattr(RULES[kind], self.part)

    def __iter__(self):
        return iter(RULES)

    def __len__(self) -> int:
        return len(RULES)


def supported() -> str:
    return ", ".join(r.label for r in RULES.values() if r.label)


def _nothing(*_) -> Contribs:
    return iter(())


# ---- steps without neurons, and the image ----------------------------------------------------------------

@register
class Input(OpRule):
    """The graph input (the image): profiled and given Δ like any neuron, but it gets no CONTRIB. graph.run feeds
    it the batch (channels-last when 4-d)."""
    kind, nodes, receives = "input", ("placeholder",), False
    backward = staticmethod(_nothing)

    def loop(self, s, rec, contrib, theta, plan) -> None:
        pass


@register
class Const(OpRule):
    """A get_attr node (a parameter or buffer read in forward, graph.run looks it up): no neurons, nothing flows;
    as an operand of an add it simply gets no CONTRIB."""
    kind, nodes, neurons, receives = "const", ("get_attr",), False, False
    backward = staticmethod(_nothing)

    def loop(self, s, rec, contrib, theta, plan) -> None:
        pass


@register
class Meta(OpRule):
    """Shape bookkeeping (x.shape, x.size(0), x.dim(), x.shape[0]): no neurons, nothing flows. Indexing is meta
    only on a meta value; x[:, :4] on a tensor would need a rule of its own and is refused."""
    kind, neurons, receives = "meta", False, False
    functions, methods = (getattr, operator.getitem), ("size", "dim")
    backward = staticmethod(_nothing)

    def accepts(self, node, by_name) -> bool:
        if node.target is not operator.getitem:
            return True
        return isinstance(node.args[0], fx.Node) and by_name[node.args[0].name].kind == "meta"

    def loop(self, s, rec, contrib, theta, plan) -> None:
        pass


@register
class Output(OpRule):
    """The graph output: it must be one logits tensor, whose predicted (or given) class is the criterion."""
    kind, nodes, neurons, receives = "output", ("output",), False, False
    backward = staticmethod(_nothing)

    def operands(self, node):
        return [node.args[0]] if isinstance(node.args[0], fx.Node) else []

    def check(self, step) -> None:
        if len(step.parents) != 1 or not isinstance(step.node.args[0], fx.Node):
            raise UnsupportedOp("the model must return one logits tensor to slice from (it returns a tuple or dict)")

    def loop(self, s, rec, contrib, theta, plan) -> None:
        pass


# ---- weighted sums ------------------------------------------------------------------------------------------

class _Weighted(OpRule):
    """Weighted sums (Conv2d, Linear): input i gets the local contribution sign(CONTRIB_n·Δy_n·w_ni·Δx_i) from each
    output neuron n it feeds, if the θ filter (theta.py) keeps it: sort n's inputs by |w_i·Δx_i| ascending, ties by
    input index, and drop the longest prefix whose running sums all have |S_j| < θ·|y_n|, with y_n the output
    (float32 as the model computes it, bias included); sums are exact. θ = 0, or y_n = 0, keeps every input; a
    neuron whose whole change stays below θ·|y_n| drops every input. w_i is the weight; the bias is not an input.
    With θ > 0 the forward record keeps y and the input's Δ (dx, keyed by the input step)."""
    records, weighted = ("y", "dx"), True

    def synapses(self, s, active: torch.Tensor, in_shape: torch.Size) -> int:
        """In-bounds inputs summed over the active output neurons (what the loop reference visits)."""
        raise NotImplementedError

    def record(self, st, step, val, args, means, theta) -> None:
        if theta > 0:
            st.y[step.name] = val
            p = step.parents[0]
            if p in means and p not in st.dx:
                st.dx[p] = args[0] - A.mean_like(means[p], args[0])


@register
class Conv(_Weighted):
    """Conv2d (any stride, padding, dilation, groups; zero padding only; other padding modes are refused): a
    weighted sum over each output neuron's window; zero padding is not an input (it contributes nothing). θ > 0
    runs the compiled kernel (kernel.py) where a C++ compiler is at hand, the torch filter otherwise; both exact."""
    kind, label, modules = "conv", "Conv2d", (nn.Conv2d,)

    def synapses(self, s, active, in_shape) -> int:
        m = s.op  # a conv of ones over a map of ones counts each output position's in-bounds taps (padding adds 0)
        taps = F.conv2d(torch.ones(1, 1, *in_shape[-2:]), torch.ones(1, 1, *m.kernel_size), None, m.stride,
                        m.padding, m.dilation)[0, 0]
        return int((active.sum((0, 1)) * taps).sum()) * (m.in_channels // m.groups)

    def check(self, step) -> None:
        if step.op.padding_mode != "zeros":
            raise UnsupportedOp(f"conv {step.module} pads with {step.op.padding_mode!r}; only zero padding is "
                                "supported")

    def backward(self, s, c, st, theta, block, wanted) -> Contribs:
        p = s.parents[0]
        if p not in wanted:
            return
        m, g, sd = s.op, A.g(s, c, st), A.sd(st, p)
        if theta == 0:
            # ±1/0 times ±1/0, summed: integers far under 2^24, exact in float32 whatever the summation order.
            g = g.contiguous(memory_format=torch.channels_last)
            flip = [d * (k - 1) - pd for k, pd, d in zip(m.kernel_size, m.padding, m.dilation)]
            if tuple(m.stride) == (1, 1) and min(flip) >= 0:
                # stride 1: the transposed conv is a plain conv with the flipped, transposed kernel (oneDNN's path)
                back = F.conv2d(g, A.sign_weight(m, True), None, 1, flip, m.dilation, m.groups)
            else:
                base = [(o - 1) * st_ - 2 * pd + dl * (k - 1) + 1 for o, st_, pd, dl, k in
                        zip(g.shape[2:], m.stride, m.padding, m.dilation, m.kernel_size)]
                opad = [h - b for h, b in zip(sd.shape[2:], base)]
                back = F.conv_transpose2d(g, A.sign_weight(m, False), None, m.stride, m.padding, opad, m.groups,
                                          m.dilation)
            yield p, back.round_().mul_(sd)
            return
        dx, y = st.dx[p], st.y[s.name]
        if kernel.available():
            back, amb = kernel.conv_theta(m, g, dx, y, theta)
            if len(amb):  # neurons whose cut float64 margins could not decide: the torch path decides them exactly
                ga = torch.zeros(g.numel())
                ga[amb] = g.contiguous().view(-1)[amb]
                back += A.conv_theta(m, ga.view(g.shape), dx, y, theta, block)
            yield p, A.layout(back, sd).mul_(sd)
            return
        yield p, A.conv_theta(m, g, dx, y, theta, block) * sd

    def loop(self, s, rec, contrib, theta, plan) -> None:
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
        L.weighted(s, rec, contrib, theta, plan, synapses)


@register
class Linear(_Weighted):
    """Linear: a weighted sum over every input feature (of the last dimension)."""
    kind, label, modules = "linear", "Linear", (nn.Linear,)

    def synapses(self, s, active, in_shape) -> int:
        return int(active.sum()) * s.op.in_features

    def backward(self, s, c, st, theta, block, wanted) -> Contribs:
        p = s.parents[0]
        if p not in wanted:
            return
        w = s.op.weight.detach()
        g = A.g(s, c, st)
        if theta == 0:
            yield p, (g @ A.sign_weight(s.op, False)).round_().mul_(A.sd(st, p))
            return
        x = st.dx[p].reshape(-1, w.shape[1])
        g = g.reshape(-1, w.shape[0])
        y = st.y[s.name].reshape(-1, w.shape[0])
        acc = torch.zeros_like(x)
        for r, o in A.blocks(g, w.shape[1], block):
            keep = kept(x[r], w[o], theta, y[r, o])
            acc.index_add_(0, r, g[r, o, None] * w[o].sign() * keep)
        yield p, acc.reshape(st.dx[p].shape) * A.sd(st, p)

    def loop(self, s, rec, contrib, theta, plan) -> None:
        w = s.op.weight.detach().double().numpy()
        L.weighted(s, rec, contrib, theta, plan,
                   lambda idx: [(idx[:-1] + (i,), float(w[idx[-1], i])) for i in range(w.shape[1])])


# ---- elementwise: the parent gets sign(CONTRIB·Δy·w·Δx) ---------------------------------------------------

@register
class BatchNorm(OpRule):
    """BatchNorm (eval, y = a·x + b with a = γ/√(var+ε)): w = a, so the parent gets sign(CONTRIB·Δy·γ·Δx_in):
    the scale's sign is part of the weight (a negative γ flips nothing in effect, since Δy ≈ a·Δx; γ = 0 — a
    locked channel — passes nothing). Runs from its running statistics; a BN without them is refused."""
    kind, label, modules = "bn", "BatchNorm", (nn.BatchNorm2d, nn.BatchNorm1d)

    def check(self, step) -> None:
        if not step.op.track_running_stats:
            raise UnsupportedOp(f"BatchNorm {step.module} has no running statistics: slicing needs an eval-mode BN")

    def forward(self, step, args, kwargs):
        bn = step.op
        return F.batch_norm(args[0], bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    def backward(self, s, c, st, theta, block, wanted) -> Contribs:
        p = s.parents[0]
        if p in wanted:
            w = s.op.weight.detach().sign() if s.op.affine else torch.ones(s.op.num_features)
            shape = [1, -1] + [1] * (c.dim() - 2)
            yield p, A.g(s, c, st).mul_(w.view(shape)).mul_(A.sd(st, p))

    def loop(self, s, rec, contrib, theta, plan) -> None:
        gamma = s.op.weight.detach().double().tolist() if s.op.affine else None
        L.elementwise(s, rec, contrib, plan, weight=lambda idx: gamma[idx[0]] if gamma else 1.0)


@register
class Relu(OpRule):
    """ReLU (module, function or method, in place or not; always run out of place, so the parent's Δ survives):
    the parent gets sign(CONTRIB·Δy·Δx) (w = 1), only where the output is > 0."""
    kind, label, records = "relu", "ReLU", ("pos",)
    modules, functions, methods = (nn.ReLU,), (F.relu, torch.relu), ("relu", "relu_")

    def forward(self, step, args, kwargs):
        return F.relu(args[0])

    def record(self, st, step, val, args, means, theta) -> None:
        st.pos[step.name] = val > 0

    def backward(self, s, c, st, theta, block, wanted) -> Contribs:
        p = s.parents[0]
        if p in wanted:
            yield p, A.g(s, c, st).mul_(A.sd(st, p)).mul_(A.pos(st, s.name))

    def loop(self, s, rec, contrib, theta, plan) -> None:
        y = rec[s.name][0]
        L.elementwise(s, rec, contrib, plan, gate=lambda idx: y[idx] > 0)


@register
class Add(OpRule):
    """Residual add x + y (also +=, add_, torch.add; run out of place): each operand p gets sign(CONTRIB·Δy·Δx_p)
    (w = 1). An alpha ≠ 1 scales an operand and is refused."""
    kind, label = "add", "add"
    functions, methods = (operator.add, operator.iadd, torch.add), ("add", "add_")

    def operands(self, node):
        return [a for a in node.args[:2] if isinstance(a, fx.Node)]

    def check(self, step) -> None:
        if step.node.kwargs.get("alpha", 1) != 1:
            raise UnsupportedOp(f"add with alpha={step.node.kwargs['alpha']} (graph node {step.name!r}) scales an "
                                "operand; only plain residual adds x + y are supported")

    def forward(self, step, args, kwargs):
        return args[0] + args[1]  # in-place forms (+=, add_) too: the left operand's Δ must survive

    def backward(self, s, c, st, theta, block, wanted) -> Contribs:
        g = A.g(s, c, st)
        for p in s.parents:
            if p in wanted:
                sd = A.sd(st, p)
                yield p, (g * sd).sum_to_size(sd.shape) if sd.shape != g.shape else g * sd

    def loop(self, s, rec, contrib, theta, plan) -> None:
        L.elementwise(s, rec, contrib, plan)


# ---- pooling windows -------------------------------------------------------------------------------------------

@register
class MaxPool(OpRule):
    """MaxPool (module or F.max_pool2d): only the arg-max input gets sign(CONTRIB·Δy·Δx) — the first maximum in
    row-major window order, as PyTorch picks it."""
    kind, label, records = "maxpool", "MaxPool", ("idx",)
    modules, functions, twins = (nn.MaxPool2d,), (F.max_pool2d,), {F.max_pool2d: nn.MaxPool2d}

    def record(self, st, step, val, args, means, theta) -> None:
        st.idx[step.name] = A.argmax(step.op, args[0])

    def backward(self, s, c, st, theta, block, wanted) -> Contribs:
        p = s.parents[0]
        if p not in wanted:
            return
        sd = A.sd(st, p)
        idx = st.idx[s.name].flatten(2)
        val = A.g(s, c, st).flatten(2) * sd.flatten(2).gather(2, idx)
        yield p, torch.zeros_like(sd).flatten(2).scatter_add_(2, idx, val).view_as(sd)

    def loop(self, s, rec, contrib, theta, plan) -> None:
        m = s.op
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(m.kernel_size), _pair(m.stride or m.kernel_size),
                                                  _pair(m.padding), _pair(m.dilation))

        def argmax(x, i, j):
            best = None
            for a in L.span(i, kh, sh, ph, dh, x.shape[0]):  # row-major scan; the first maximum wins
                for b in L.span(j, kw, sw, pw, dw, x.shape[1]):
                    if best is None or x[a, b] > x[best]:
                        best = (a, b)
            return [best]
        L.windowed(s, rec, contrib, plan, argmax)


@register
class AvgPool(OpRule):
    """AvgPool (module or F.avg_pool2d): every in-bounds input of the window gets sign(CONTRIB·Δy·Δx) (w > 0;
    padding is no input)."""
    kind, label = "avgpool", "AvgPool"
    modules, functions, twins = (nn.AvgPool2d,), (F.avg_pool2d,), {F.avg_pool2d: nn.AvgPool2d}

    def backward(self, s, c, st, theta, block, wanted) -> Contribs:
        p = s.parents[0]
        if p not in wanted:
            return
        sd = A.sd(st, p)
        m = s.op
        (kh, kw), (sh, sw), (ph, pw) = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding)
        g = A.g(s, c, st)
        n, ch, ho, wo = g.shape
        # Every window member gets the window's sign: a transposed conv with a ones kernel, then drop the padding.
        full = F.conv_transpose2d(g.reshape(n * ch, 1, ho, wo), torch.ones(1, 1, kh, kw), stride=(sh, sw))
        yield p, A.crop(full, ph, pw, sd.shape[2], sd.shape[3]).reshape(sd.shape) * sd

    def loop(self, s, rec, contrib, theta, plan) -> None:
        m = s.op
        (kh, kw), (sh, sw), (ph, pw) = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding)
        L.windowed(s, rec, contrib, plan, lambda x, i, j: itertools.product(
            L.span(i, kh, sh, ph, 1, x.shape[0]), L.span(j, kw, sw, pw, 1, x.shape[1])))


@register
class AdaptiveAvgPool(OpRule):
    """AdaptiveAvgPool (module or F.adaptive_avg_pool2d): every input of PyTorch's window [⌊o·n/m⌋, ⌈(o+1)·n/m⌉)
    gets sign(CONTRIB·Δy·Δx) (w > 0)."""
    kind, label = "adaptive_avgpool", "AdaptiveAvgPool"
    modules, functions = (nn.AdaptiveAvgPool2d,), (F.adaptive_avg_pool2d,)
    twins = {F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d}

    def backward(self, s, c, st, theta, block, wanted) -> Contribs:
        p = s.parents[0]
        if p in wanted:
            sd = A.sd(st, p)
            mh, mw = A.adaptive_windows(sd.shape[2], c.shape[2]), A.adaptive_windows(sd.shape[3], c.shape[3])
            yield p, torch.einsum("ncij,ih,jw->nchw", A.g(s, c, st), mh, mw) * sd

    def loop(self, s, rec, contrib, theta, plan) -> None:
        ho, wo = rec[s.name][0].shape[1:]

        def window(x, i, j):
            h, w = x.shape
            return itertools.product(range(i * h // ho, -(-(i + 1) * h // ho)),
                                     range(j * w // wo, -(-(j + 1) * w // wo)))
        L.windowed(s, rec, contrib, plan, window)


# ---- re-indexing: the parent gets CONTRIB unchanged ----------------------------------------------------------

class _Reindex(OpRule):
    def backward(self, s, c, st, theta, block, wanted) -> Contribs:
        p = s.parents[0]
        if p in wanted:
            yield p, c.reshape(st.sd[p].shape)

    def loop(self, s, rec, contrib, theta, plan) -> None:
        p = s.parents[0]
        if L.wanted(plan, p, rec):
            contrib[p] += contrib[s.name].reshape(contrib[p].shape)


@register
class Reshape(_Reindex):
    """flatten / view / reshape re-index: the parent gets CONTRIB unchanged (reshaped back)."""
    kind, label = "reshape", "flatten/view/reshape"
    modules, functions = (nn.Flatten,), (torch.flatten, torch.reshape)
    methods = ("view", "reshape", "flatten")

    def forward(self, step, args, kwargs):
        n = step.node
        if n.op == "call_method" and n.target == "view":  # a view needs the logical (NCHW) layout it was written for
            return args[0].contiguous().view(*args[1:], **kwargs)
        return super().forward(step, args, kwargs)


@register
class Identity(_Reindex):
    """Identity, Dropout (eval: off) and .contiguous() pass their input through: the parent gets CONTRIB
    unchanged."""
    kind, label = "identity", "Dropout/Identity"
    modules, functions, methods = (nn.Identity, nn.Dropout), (F.dropout,), ("contiguous",)

    def forward(self, step, args, kwargs):
        return args[0]


@register
class Cat(OpRule):
    """torch.cat routes to each parent its own slice of CONTRIB, unchanged."""
    kind, label, functions = "cat", "cat", (torch.cat, torch.concat)

    def operands(self, node):
        return [a for a in node.args[0] if isinstance(a, fx.Node)]

    def backward(self, s, c, st, theta, block, wanted) -> Contribs:
        dim = s.node.kwargs.get("dim", s.node.args[1] if len(s.node.args) > 1 else 0)
        sizes = [st.sd[p].shape[dim] for p in s.parents]
        for p, part in zip(s.parents, torch.split(c, sizes, dim)):
            if p in wanted:
                yield p, part

    def loop(self, s, rec, contrib, theta, plan) -> None:
        dim = s.node.kwargs.get("dim", s.node.args[1] if len(s.node.args) > 1 else 0)
        dim = (dim if dim >= 0 else dim + contrib[s.name].ndim + 1) - 1  # the record has no batch dimension
        at = 0
        for p in s.parents:
            size = rec[p][0].shape[dim]
            if L.wanted(plan, p, rec):
                contrib[p] += np.take(contrib[s.name], range(at, at + size), axis=dim)
            at += size
