"""The model as slicing steps: a torch.fx graph turned into (kind, parents, forward) in topological order.

Every node of the traced graph gets exactly one *kind*: the op rule (ops.py) whose op tables claim it, which says
how the step runs forward, what it records and how CONTRIB flows back through it. A node no rule covers is refused
up front, naming the op, before any data is touched. Each step runs its op forward through its rule (functionally,
never in place: an in-place ReLU would overwrite the tensor its parent's Δ is taken from), so profiling and forward
analysis execute exactly the ops the rules were chosen for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from . import ops
from .ops import OpRule, UnsupportedOp


@dataclass
class Step:
    name: str                  # the fx node name (unique in the graph)
    kind: str                  # which rule (a key of ops.RULES): conv, linear, bn, relu, maxpool, avgpool,
                               # adaptive_avgpool, add, cat, reshape, identity, input, const, meta, output
    parents: list[str]         # tensor-valued argument nodes, in argument order (a node may repeat: x + x)
    module: str | None = None  # qualified name for call_module, as model.named_modules() gives it
    key: str | None = None     # result key: the module name, "name#k" for its k-th extra call, None for functions
    op: nn.Module | None = None  # the module (or the module twin of a functional pool)
    node: fx.Node | None = field(default=None, repr=False)
    rule: OpRule | None = field(default=None, repr=False)  # ops.RULES[kind]


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
        if node.op in ops.NODES:
            rule, what = ops.NODES[node.op], node.op
        elif node.op == "call_module":
            mod = self.modules[node.target]
            rule, what = ops.MODULES.get(type(mod)), f"module {type(mod).__name__}"
        elif node.op == "call_function":
            rule, what = ops.FUNCTIONS.get(node.target), f"function {_qualname(node.target)}"
        else:
            rule, what = ops.METHODS.get(node.target), f"tensor method .{node.target}()"
        _refuse_if(rule is None or not rule.accepts(node, self.by_name), node, what)
        parents = [a.name for a in rule.operands(node)]
        if node.op == "call_module":
            return Step(node.name, rule.kind, parents, module=node.target, op=self.modules[node.target], node=node,
                        rule=rule)
        return Step(node.name, rule.kind, parents, op=rule.twin(node), node=node, rule=rule)

    def _check(self) -> None:
        calls: dict[str, int] = {}
        for s in self.steps:
            if s.module is not None:  # a module called twice (torchvision reuses one ReLU) keeps both outputs apart
                k = calls.get(s.module, 0)
                s.key, calls[s.module] = (s.module if k == 0 else f"{s.module}#{k}"), k + 1
            s.rule.check(s)  # each rule refuses the settings it does not cover (and the output a tuple or dict)

    @property
    def logits(self) -> str:
        return self.steps[-1].parents[0]

    def module_steps(self) -> list[Step]:
        return [s for s in self.steps if s.key is not None]


def _qualname(fn) -> str:
    mod = getattr(fn, "__module__", None) or ""
    return f"{mod}.{getattr(fn, '__name__', repr(fn))}".lstrip(".")


def _refuse_if(bad: bool, node: fx.Node, what: str) -> None:
    if bad:
        raise UnsupportedOp(f"no slicing rule for {what} (graph node {node.name!r}, {node.format_node()}); "
                            f"supported: {ops.supported()}")


# ---- forward execution ---------------------------------------------------------------------------------------

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
            val = s.rule.forward(s, args, kwargs)
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
