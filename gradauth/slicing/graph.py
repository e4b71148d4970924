"""The model as slicing steps: a torch.fx graph turned into (kind, parents, forward) in topological order.

Every node of the traced graph gets exactly one *kind*, the name of the rule that says how CONTRIB flows back
through it. A node no rule covers is refused up front, naming the op, before any data is touched. Each step can also
run its op forward (functionally, never in place: an in-place ReLU would overwrite the tensor its parent's Δ is
taken from), so profiling and forward analysis execute exactly the ops the rules were chosen for.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import GradauthError


class UnsupportedOp(GradauthError):
    """The model holds an op the slicer has no contribution rule for."""


# ---- which op gets which rule ----------------------------------------------------------------------------------

MODULE_KINDS: list[tuple[type, str]] = [
    (nn.Conv2d, "conv"), (nn.Linear, "linear"), (nn.BatchNorm2d, "bn"), (nn.BatchNorm1d, "bn"), (nn.ReLU, "relu"),
    (nn.MaxPool2d, "maxpool"), (nn.AvgPool2d, "avgpool"), (nn.AdaptiveAvgPool2d, "adaptive_avgpool"),
    (nn.Flatten, "reshape"), (nn.Identity, "identity"), (nn.Dropout, "identity"),
]
FUNCTION_KINDS: dict[Any, str] = {
    operator.add: "add", operator.iadd: "add", torch.add: "add", torch.cat: "cat", torch.concat: "cat",
    torch.flatten: "reshape", torch.reshape: "reshape", F.relu: "relu", torch.relu: "relu",
    F.max_pool2d: "maxpool", F.avg_pool2d: "avgpool", F.adaptive_avg_pool2d: "adaptive_avgpool",
    F.dropout: "identity", getattr: "meta",
}
METHOD_KINDS = {"view": "reshape", "reshape": "reshape", "flatten": "reshape", "relu": "relu", "add": "add",
                "add_": "add", "relu_": "relu", "contiguous": "identity", "size": "meta", "dim": "meta"}
# Function forms of pools become their module twins, so one rule (and one set of window maths) serves both.
POOL_MODULES = {F.max_pool2d: nn.MaxPool2d, F.avg_pool2d: nn.AvgPool2d, F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d}


@dataclass
class Step:
    name: str                  # the fx node name (unique in the graph)
    kind: str                  # which rule: conv, linear, bn, relu, maxpool, avgpool, adaptive_avgpool, add, cat,
                               # reshape, identity, input, const, meta, output
    parents: list[str]         # tensor-valued argument nodes, in argument order (a node may repeat: x + x)
    module: str | None = None  # qualified name for call_module, as model.named_modules() gives it
    key: str | None = None     # result key: the module name, "name#k" for its k-th extra call, None for functions
    op: nn.Module | None = None  # the module (or the module twin of a functional pool)
    node: fx.Node | None = field(default=None, repr=False)


class Plan:
    """Steps of one traced model. `steps` is topological: every parent comes before its children."""

    def __init__(self, model: nn.Module):
        try:
            self.gm = fx.symbolic_trace(model)
        except Exception as e:  # fx raises many types; the user needs to know it is the trace that failed
            raise UnsupportedOp(f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}); "
                                "slicing needs a traceable model (no data-dependent control flow)") from e
        self.modules = dict(self.gm.named_modules())
        self.steps, self.by_name = [], {}
        for n in self.gm.graph.nodes:
            self.steps.append(self._step(n))
            self.by_name[n.name] = self.steps[-1]
        self._check()

    def _step(self, node: fx.Node) -> Step:
        parents = [a.name for a in _neuron_args(node)]
        if node.op == "placeholder":
            return Step(node.name, "input", [], node=node)
        if node.op == "get_attr":
            return Step(node.name, "const", [], node=node)
        if node.op == "output":
            return Step(node.name, "output", parents, node=node)
        if node.op == "call_module":
            mod = self.modules[node.target]
            kind = next((k for t, k in MODULE_KINDS if type(mod) is t), None)
            _refuse_if(kind is None, node, f"module {type(mod).__name__}")
            return Step(node.name, kind, parents, module=node.target, op=mod, node=node)
        if node.op == "call_function":
            kind = FUNCTION_KINDS.get(node.target)
            if node.target is operator.getitem:  # x.shape[0] is bookkeeping; x[:, :4] would need a rule
                meta = isinstance(node.args[0], fx.Node) and self.by_name[node.args[0].name].kind == "meta"
                kind = "meta" if meta else None
            _refuse_if(kind is None, node, f"function {_qualname(node.target)}")
            op = POOL_MODULES[node.target](*node.args[1:], **node.kwargs) if node.target in POOL_MODULES else None
            return Step(node.name, kind, parents, op=op, node=node)
        kind = METHOD_KINDS.get(node.target)
        _refuse_if(kind is None, node, f"tensor method .{node.target}()")
        return Step(node.name, kind, parents, node=node)

    def _check(self) -> None:
        calls: dict[str, int] = {}
        for s in self.steps:
            if s.module is not None:  # a module called twice (torchvision reuses one ReLU) keeps both outputs apart
                k = calls.get(s.module, 0)
                s.key, calls[s.module] = (s.module if k == 0 else f"{s.module}#{k}"), k + 1
            if s.kind == "bn" and not s.op.track_running_stats:
                raise UnsupportedOp(f"BatchNorm {s.module} has no running statistics: slicing needs an eval-mode BN")
            if s.kind == "add" and s.node.kwargs.get("alpha", 1) != 1:
                raise UnsupportedOp(f"add with alpha={s.node.kwargs['alpha']} (graph node {s.name!r}) scales an "
                                    "operand; only plain residual adds x + y are supported")
            if s.kind == "conv" and s.op.padding_mode != "zeros":
                raise UnsupportedOp(f"conv {s.module} pads with {s.op.padding_mode!r}; only zero padding is supported")
        out = self.steps[-1]
        if len(out.parents) != 1 or not isinstance(out.node.args[0], fx.Node):
            raise UnsupportedOp("the model must return one logits tensor to slice from (it returns a tuple or dict)")

    @property
    def logits(self) -> str:
        return self.steps[-1].parents[0]

    def module_steps(self) -> list[Step]:
        return [s for s in self.steps if s.key is not None]


def _neuron_args(node: fx.Node) -> list[fx.Node]:
    """The arguments that carry neurons: every tensor operand of add / cat, else the first argument only
    (the rest are sizes, dims, or constants; the step kind decides later whether a node holds tensors at all)."""
    if node.op == "output":
        return [node.args[0]] if isinstance(node.args[0], fx.Node) else []
    if node.target in (operator.add, operator.iadd, torch.add, "add", "add_"):
        return [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if node.target in (torch.cat, torch.concat):
        return [a for a in node.args[0] if isinstance(a, fx.Node)]
    return [node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else []


def _qualname(fn) -> str:
    mod = getattr(fn, "__module__", None) or ""
    return f"{mod}.{getattr(fn, '__name__', repr(fn))}".lstrip(".")


def _refuse_if(bad: bool, node: fx.Node, what: str) -> None:
    if bad:
        raise UnsupportedOp(f"no slicing rule for {what} (graph node {node.name!r}, {node.format_node()}); "
                            "supported: Conv2d, Linear, BatchNorm, ReLU, Max/Avg/AdaptiveAvg pooling, flatten/view/"
                            "reshape, add, cat, Dropout/Identity")


# ---- forward execution ---------------------------------------------------------------------------------------

def _forward(step: Step, args: tuple, kwargs: dict):
    """The op's output; ReLUs out of place, BN from running statistics, dropout off (slicing is inference)."""
    n = step.node
    if step.kind == "relu":
        return F.relu(args[0])
    if step.kind == "identity":
        return args[0]
    if step.kind == "bn":
        bn = step.op
        return F.batch_norm(args[0], bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    if step.kind == "add":
        return args[0] + args[1]  # in-place forms (+=, add_) too: the left operand's Δ must survive
    if step.op is not None:
        return step.op(args[0])
    if n.op == "call_method":
        if n.target == "view":  # a view needs the logical (NCHW) layout the model was written for
            return args[0].contiguous().view(*args[1:], **kwargs)
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    return n.target(*args, **kwargs)


@torch.no_grad()
def run(plan: Plan, x: torch.Tensor, visit: Callable[[Step, Any, tuple], None] | None = None):
    """Execute the plan on a batch; `visit(step, output, args)` sees every step while its inputs are alive.
    Outputs are freed once their last consumer has run, so memory stays at the model's live activations."""
    env: dict[str, Any] = {}
    remaining = {s.name: len(s.node.users) for s in plan.steps}
    for s in plan.steps:
        n, args = s.node, ()
        if s.kind == "output":
            return env[s.parents[0]]
        if s.kind == "input":
            # channels-last: oneDNN's direct convolutions run about twice as fast as on NCHW at CIFAR sizes, and
            # every map after the first conv keeps the layout (profile, forward stats and the record all run here)
            val = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        elif s.kind == "const":
            val = _get_attr(plan.gm, n.target)
        else:
            args = fx.node.map_arg(n.args, lambda a: env[a.name])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a.name])
            val = _forward(s, args, kwargs)
        if visit is not None:
            visit(s, val, args)
        env[s.name] = val
        for p in n.all_input_nodes:
            remaining[p.name] -= 1
            if remaining[p.name] == 0:
                del env[p.name]


def _get_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def is_neuron(value) -> bool:
    """Tensor-valued steps hold neurons; shapes and sizes (meta steps) do not."""
    return isinstance(value, torch.Tensor)
