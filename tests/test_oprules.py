"""The slicer's op rules (gradauth/slicing/ops.py): one complete rule per op, one rule per op-table entry, every
entry sliced exactly (vectorised == loop reference), the recorded statistics as each rule declares them, and a new
op added as one class."""
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gradauth.models import build_model
from gradauth.slicing import UnsupportedOp, slice_model, slice_partial
from gradauth.slicing import algebra, loops, ops, reference, vectorized
from gradauth.slicing.graph import Plan
from gradauth.slicing.record import Stats, forward_stats, profile
from gradauth.slicing.reference import slice_loop


from slicing_fixtures import one_thread, torch_theta_path  # noqa: F401  (autouse)


class EveryOp(nn.Module):
    """Every module type, function and tensor method of the op tables, each on a path to the logits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.mp = nn.MaxPool2d(2)
        self.ap = nn.AvgPool2d(3, stride=1, padding=1)
        self.aap = nn.AdaptiveAvgPool2d(2)
        self.ident = nn.Identity()
        self.drop = nn.Dropout(0.5)
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(96, 20)
        self.bn1 = nn.BatchNorm1d(20)
        self.fc2 = nn.Linear(20, 3)
        self.shift = nn.Parameter(torch.randn(8, 1, 1))  # read in forward: a get_attr node, added like an operand

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))                              # 4×8×8
        a, b = F.max_pool2d(x, 2), self.mp(x)                             # 4×4×4 each
        y = torch.cat([a, b], 1)                                          # 8×4×4
        z = torch.concat([F.avg_pool2d(a, 3, 1, 1), self.ap(b)], dim=1)   # 8×4×4
        s = y + z
        s = torch.add(s, self.ident(y))
        s += torch.relu(z)                                                # traced as operator.add (see below)
        s = s + self.shift
        s = s.add(self.drop(y)).relu()
        s = s.add_(z).relu_()
        t = self.aap(F.adaptive_avg_pool2d(s, 3).contiguous())            # 8×3×3, then uneven windows: 8×2×2
        t.dim()                                                           # a size nobody reads is still traced
        h = t.view(t.size(0), -1) + torch.flatten(t, 1)
        h2 = t.reshape(t.shape[0], -1) + torch.reshape(t, (-1, 32))
        u = torch.cat([h, h2, self.flat(t) + t.flatten(1)], 1)            # 96
        u = F.dropout(u, 0.5, training=False)
        return self.fc2(F.relu(self.bn1(self.fc1(u))))


def _entries(plan: Plan) -> set:
    out = set()
    for s in plan.steps:
        n = s.node
        if n.op == "call_module":
            out.add(("module", type(plan.modules[n.target])))
        elif n.op in ("call_function", "call_method"):
            out.add((n.op, n.target))
        else:
            out.add(("node", n.op))
    return out


# symbolic_trace records `a += b` as operator.add (an fx Proxy has no __iadd__), so no traced model holds iadd;
# the add rule claims it for graphs that do. test_iadd_is_traced_as_add notices if fx starts emitting it.
UNTRACEABLE = {("call_function", operator.iadd)}


def _all_entries() -> set:
    return ({("module", t) for t in ops.MODULES} | {("call_function", f) for f in ops.FUNCTIONS} |
            {("call_method", m) for m in ops.METHODS} | {("node", n) for n in ops.NODES})


def _case(net=EveryOp):
    torch.manual_seed(0)
    model = net().eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.weight.data = torch.randn(m.num_features, generator=g)
            m.weight.data[0] = 0.0  # a locked channel
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.1
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
    prof, x = torch.randn(24, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    with torch.no_grad():  # logits of the size of their change, so θ > 0 cuts inside neurons (test_slicing)
        model.fc2.bias -= model(prof).mean(0)
    return model, prof, x


def test_every_op_table_entry_is_traced_and_sliced_exactly():
    model, prof, x = _case()
    plan = Plan(model)
    assert _entries(plan) == _all_entries() - UNTRACEABLE  # a new table entry needs a use in EveryOp
    assert {s.kind for s in plan.steps} == set(ops.RULES)  # so every rule runs below
    totals = []
    for theta in (0.0, 0.2):
        fast = slice_partial(model, prof, x, theta, batch=2)
        ref = slice_loop(model, prof, x, theta)
        assert fast.neurons.keys() == ref.neurons.keys()
        for k in fast.neurons:
            assert torch.equal(fast.neurons[k], ref.neurons[k]), (theta, k)
            assert torch.equal(fast.channels[k], ref.channels[k]), (theta, k)
        assert all(int(v.abs().sum()) > 0 for v in fast.channels.values())  # CONTRIB reached every module
        totals.append(sum(int(v.sum()) for v in fast.channels.values()))
    assert totals[1] < totals[0]  # and θ cut some of it


def test_iadd_is_traced_as_add():
    class IAdd(nn.Module):
        def forward(self, x):
            x += 1.0
            return x

    assert [n.target for n in torch.fx.symbolic_trace(IAdd()).graph.nodes if n.op == "call_function"] == [
        operator.add]


def test_each_kind_has_one_complete_rule():
    stats_fields = set(Stats.__dataclass_fields__) - {"n", "pred", "sd", "sdf"}
    for kind, rule in ops.RULES.items():
        cls = type(rule)
        assert rule.kind == kind and ops.RULES[kind] is rule
        assert cls.__doc__ and cls.__doc__.strip(), kind                       # its documented semantics
        assert cls.backward is not ops.OpRule.backward, kind                   # its vectorised backward
        assert cls.loop is not ops.OpRule.loop, kind                           # its loop reference
        assert set(rule.records) <= stats_fields, kind                         # fields Stats really has
        assert rule.modules or rule.functions or rule.methods or rule.nodes, kind  # how the graph finds it
        if rule.neurons and rule.receives:
            assert rule.label, kind  # named among the supported ops in refusals
    # the old per-file tables are views of the registry: same kinds, the rules' own functions
    assert set(vectorized.RULES) == set(reference.LOOPS) == set(ops.RULES)
    for kind, rule in ops.RULES.items():
        assert vectorized.RULES[kind] == rule.backward and reference.LOOPS[kind] == rule.loop


@pytest.mark.parametrize("arch,in_ch,width", [("vgg_tiny", 1, 0.25), ("resnet20", 3, 0.25), ("densenet40", 3, 0.25),
                                              ("torchvision:resnet18", 3, 1.0)])
def test_project_models_emit_only_registered_kinds(arch, in_ch, width):
    plan = Plan(build_model(arch, 10, in_ch, width).eval())
    for s in plan.steps:
        assert s.rule is ops.RULES[s.kind]
    assert _entries(plan) <= _all_entries()


def test_forward_stats_hold_what_each_rule_records():
    model, prof, x = _case()
    plan = Plan(model)
    means = profile(plan, prof)
    for theta in (0.0, 0.3):
        st = forward_stats(plan, means, x, theta)
        for f in ("pos", "idx", "y"):
            want = {s.name for s in plan.steps if f in s.rule.records and (f != "y" or theta > 0)}
            assert set(getattr(st, f)) == want, (f, theta)
            assert want or (f == "y" and theta == 0)  # ReLUs and max-pools record at any θ
        dx = {s.parents[0] for s in plan.steps if "dx" in s.rule.records and theta > 0}
        assert set(st.dx) == dx
        assert set(st.sd) == {s.name for s in plan.steps if s.rule.neurons}


def test_a_claimed_op_cannot_be_claimed_again(monkeypatch):
    for name in ("RULES", "MODULES", "FUNCTIONS", "METHODS", "NODES"):
        monkeypatch.setattr(ops, name, dict(getattr(ops, name)))
    before = {k: dict(v) for k, v in ((n, getattr(ops, n)) for n in ("RULES", "MODULES", "FUNCTIONS"))}

    class Conv3(ops.OpRule):
        """claims Conv2d, which Conv already has"""
        kind, modules = "conv3", (nn.Conv2d,)
    with pytest.raises(ValueError, match="Conv2d"):
        ops.register(Conv3)

    class Again(ops.OpRule):
        """a second rule of kind relu"""
        kind, functions = "relu", (torch.tanh,)
    with pytest.raises(ValueError, match="relu"):
        ops.register(Again)

    class NoLoop(ops.OpRule):
        """tanh without a loop reference"""
        kind, functions = "tanh", (torch.tanh,)

        def backward(self, s, c, st, theta, block, wanted):
            return iter(())
    with pytest.raises(ValueError, match="states no loop"):
        ops.register(NoLoop)
    assert {n: getattr(ops, n) for n in before} == before  # a refused rule leaves every table as it was


def test_a_new_op_is_one_class(monkeypatch):
    """Tanh, added from outside the package as one rule: it is monotone increasing, so like ReLU without the gate
    the parent gets sign(CONTRIB·Δy·Δx). Before, the slicer refuses it; after, vectorised == loop reference."""
    for name in ("RULES", "MODULES", "FUNCTIONS", "METHODS", "NODES"):
        monkeypatch.setattr(ops, name, dict(getattr(ops, name)))
    net = lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))  # noqa: E731
    torch.manual_seed(0)
    model, prof, x = net().eval(), torch.randn(16, 4), torch.randn(3, 4)
    with pytest.raises(UnsupportedOp, match="Tanh"):
        slice_model(model, prof, x)

    @ops.register
    class Tanh(ops.OpRule):
        """tanh: w > 0 everywhere, so the parent gets sign(CONTRIB·Δy·Δx)."""
        kind, label, modules = "tanh", "Tanh", (nn.Tanh,)

        def forward(self, step, args, kwargs):
            return torch.tanh(args[0])

        def backward(self, s, c, st, theta, block, wanted):
            p = s.parents[0]
            if p in wanted:
                yield p, algebra.g(s, c, st).mul_(algebra.sd(st, p))

        def loop(self, s, rec, contrib, theta, plan):
            loops.elementwise(s, rec, contrib, plan)

    for theta in (0.0, 0.3):
        fast, ref = slice_partial(model, prof, x, theta), slice_loop(model, prof, x, theta)
        assert all(torch.equal(fast.neurons[k], ref.neurons[k]) for k in ref.neurons)
        assert int(fast.channels["1"].sum()) > 0  # CONTRIB went through the tanh
    assert "Tanh" in ops.supported()
    assert vectorized.RULES["tanh"] == Tanh.backward.__get__(ops.RULES["tanh"]) and "tanh" in reference.LOOPS


def test_refusals_name_the_op_and_list_the_registry():
    class Slices(nn.Module):
        def forward(self, x):
            return x[:, :2] * 1.0  # indexing a tensor (not a size) has no rule

    with pytest.raises(UnsupportedOp, match=r"getitem.*supported: Conv2d, Linear, BatchNorm, ReLU, .*AdaptiveAvgPool"):
        Plan(Slices())
    with pytest.raises(UnsupportedOp, match="tensor method .sigmoid"):
        Plan(_Sigmoid())
    with pytest.raises(UnsupportedOp, match="one logits tensor"):
        Plan(_Pair())


class _Sigmoid(nn.Module):
    def forward(self, x):
        return x.sigmoid()


class _Pair(nn.Module):
    def forward(self, x):
        return x, x
