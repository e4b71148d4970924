"""Slicing: exact agreement of the vectorised backward with the per-neuron loop reference, a hand-computed golden
MLP, the θ cut itself, unsupported ops, the project's models, Ray = single process, and the stage outputs."""
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn

from gradauth.errors import GradauthError
from gradauth.models import bn_layers, build_model
from gradauth.slicing import UnsupportedOp, channel_importance, slice_model, slice_partial
from gradauth.slicing.reference import slice_loop
from gradauth.slicing import kernel
from gradauth.slicing.theta import exact_keep, kept
from gradauth.slicing.vectorized import BLOCK, _conv_theta


from slicing_fixtures import count_kernel_calls, one_thread, torch_theta_path  # noqa: F401  (autouse)


def _randomise_bn(model, seed=0):
    """Trained-looking BN: some γ negative, one exactly 0 (a locked channel), running stats away from 0/1."""
    g = torch.Generator().manual_seed(seed)
    for bn in bn_layers(model).values():
        bn.weight.data = torch.randn(bn.num_features, generator=g)
        bn.weight.data[0] = 0.0
        bn.running_mean = torch.randn(bn.num_features, generator=g) * 0.1
        bn.running_var = torch.rand(bn.num_features, generator=g) + 0.5
    return model.eval()


def _centre_head(model, prof):
    """Set the last Linear's bias so the logits average 0 over the profiling set. θ compares with |y_n|, the
    logit itself: a random head whose bias dwarfs the inputs' change would drop every input at θ > 0, leaving
    nothing to compare; a trained head's logits are of the size of their change."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.bias -= model(prof).mean(0)
    return model


def total(part) -> int:
    return sum(int(v.sum()) for v in part.channels.values())


def assert_same(a, b):
    assert a.inputs == b.inputs
    assert a.neurons.keys() == b.neurons.keys()
    for k in a.neurons:
        assert torch.equal(a.neurons[k], b.neurons[k]), k
        assert torch.equal(a.channels[k], b.channels[k]), k


def nonzero_layers(part) -> int:
    return sum(int(v.abs().sum() > 0) for v in part.channels.values())


# ---- small random models, one per family of op rules ---------------------------------------------------------

class ConvZoo(nn.Module):
    """Conv stride/padding/dilation/groups/bias variants, BN, ReLU (module and function), max-pool (padded, ties
    from ReLU zeros), avg-pool (padded, ceil mode), adaptive avg-pool (uneven windows), flatten, linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.r1 = nn.ReLU(inplace=True)
        self.mp = nn.MaxPool2d(3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, bias=False)
        self.b2 = nn.BatchNorm2d(6)
        self.c3 = nn.Conv2d(6, 6, 2, padding=0, groups=2)
        self.ap = nn.AvgPool2d(2, stride=1, padding=1, ceil_mode=True)
        self.aap = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = self.mp(self.r1(self.b1(self.c1(x))))
        x = torch.relu(self.b2(self.c2(x)))
        x = self.aap(self.ap(self.c3(x)))
        return self.fc(torch.flatten(x, 1))


class ResCat(nn.Module):
    """Residual add (identity and projection), torch.cat, .view, F.relu, a 1-d BN and a wide linear (K > 64: the
    binned θ filter, not only the plain sort)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(4)
        self.proj = nn.Conv2d(4, 4, 1, stride=2, bias=False)
        self.c3 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(8 * 16, 80)
        self.b3 = nn.BatchNorm1d(80)
        self.fc2 = nn.Linear(80, 3)

    def forward(self, x):
        x = torch.nn.functional.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(x)) + x)
        z = torch.cat([self.c3(y), self.proj(y)], 1)
        z = torch.relu(self.b3(self.fc1(z.view(z.shape[0], -1))))
        return self.fc2(z)


def _random_case(net):
    """A seeded random `net` with randomised BN and a centred head, 24 profiling inputs and 3 inputs to slice."""
    torch.manual_seed(0)
    model = _randomise_bn(net())
    prof, x = torch.randn(24, 3, 8, 8), torch.randn(3, 3, 8, 8)
    _centre_head(model, prof)
    return model, prof, x


@pytest.mark.parametrize("theta", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("target", [None, 1])
@pytest.mark.parametrize("net", [ConvZoo, ResCat])
def test_vectorised_equals_loop_reference(net, theta, target):
    model, prof, x = _random_case(net)
    fast = slice_partial(model, prof, x, theta, target, batch=2)  # batches of 2: batch sums are merged too
    ref = slice_loop(model, prof, x, theta, target)
    assert_same(fast, ref)
    assert nonzero_layers(fast) >= len(fast.channels) - 2  # the agreement is not between two empty slices
    if theta:  # and θ really cuts: fewer contributions than θ = 0, but not none
        assert 0 < total(fast) < total(slice_partial(model, prof, x, 0.0, target, batch=2))


def _outputs(p: torch.Tensor, g: torch.Generator, integer: bool) -> torch.Tensor:
    """Outputs y for rows of products p: the change Σp scaled by 1/4…4 (the profiled mean adds or cancels),
    negated on some rows, exactly 0 on some, and on integer rows small integers so cuts can be exactly tight."""
    r = p.shape[0]
    if integer:
        y = torch.randint(-12, 13, (r,), generator=g).float()
    else:
        y = (p.sum(1) * torch.exp2(torch.randint(-2, 3, (r,), generator=g)) *
             torch.where(torch.rand(r, generator=g) < 0.3, -1.0, 1.0)).float()
    y[torch.rand(r, generator=g) < 0.1] = 0.0
    return y


@pytest.fixture
def compiled(monkeypatch):
    """The compiled θ kernel (built by torch's cpp_extension: ninja and a compiler run, so its tests are marked
    subprocess)."""
    return count_kernel_calls(monkeypatch, "conv_theta")


@pytest.mark.subprocess
@pytest.mark.parametrize("theta", [0.1, 0.3])
@pytest.mark.parametrize("net", [ConvZoo, ResCat])
def test_compiled_theta_kernel_equals_loop_reference(net, theta, compiled):
    model, prof, x = _random_case(net)
    fast = slice_partial(model, prof, x, theta, None, batch=2)
    assert compiled  # the kernel ran
    assert_same(fast, slice_loop(model, prof, x, theta, None))
    assert 0 < total(fast) < total(slice_partial(model, prof, x, 0.0, None, batch=2))


@pytest.mark.subprocess
def test_compiled_theta_kernel_hands_undecidable_neurons_to_exact_arithmetic(compiled):
    # small integers: equal |w·Δx| everywhere and running sums that hit θ·|y| exactly, which float64 margins
    # cannot decide; the kernel must report those neurons and leave them out, and the torch path decides them
    g = torch.Generator().manual_seed(3)
    for conv in (nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)):
        conv.weight.data = torch.randint(-2, 3, conv.weight.shape, generator=g).float()
        dx = torch.randint(-3, 4, (2, 4, 7, 7), generator=g).float()
        out = conv(dx)
        gs = torch.randint(-1, 2, out.shape, generator=g).float()
        y = torch.randint(-12, 13, out.shape, generator=g).float()
        for theta in (0.25, 0.5):
            back, amb = kernel.conv_theta(conv, gs, dx, y, theta)
            assert len(amb) > 0
            ga = torch.zeros(gs.numel())
            ga[amb] = gs.view(-1)[amb]
            back += _conv_theta(conv, ga.view(gs.shape), dx, y, theta, BLOCK)
            # × sign(Δx), as the conv rule applies it (the kernel skips inputs with Δx = 0: they get 0 either way)
            assert torch.equal(back * dx.sign(), _conv_theta(conv, gs, dx, y, theta, BLOCK) * dx.sign())


@pytest.mark.subprocess
@pytest.mark.parametrize("theta", [0.1, 0.3])
def test_compiled_theta_kernel_on_wide_windows(theta, compiled):
    # Windows of 576 inputs spread over dozens of bins: the walk skips whole blocks, brackets the cut across
    # several bins and packs candidates in 8-lane steps (the small nets above have windows of at most 72 inputs).
    # The float32 pass and the float64-only pass must both agree with the torch path on every neuron.
    g = torch.Generator().manual_seed(5)
    for conv in (nn.Conv2d(64, 32, 3, padding=1), nn.Conv2d(64, 32, 3, stride=2, padding=2, dilation=2, groups=2)):
        nn.init.normal_(conv.weight, generator=g)
        dx = torch.randn(2, 64, 6, 6, generator=g) * torch.exp2(torch.randint(-6, 7, (2, 64, 6, 6), generator=g))
        dx[torch.rand(dx.shape, generator=g) < 0.1] = 0.0  # dead inputs, as after a ReLU
        out = conv(dx).detach()
        gs = torch.randint(-1, 2, out.shape, generator=g).float()
        y = out * torch.exp2(torch.randint(-2, 3, out.shape, generator=g))  # |y| of the size of the change
        want = _conv_theta(conv, gs, dx, y, theta, BLOCK) * dx.sign()
        for float_pass in (True, False):
            back, amb = kernel.conv_theta(conv, gs, dx, y, theta, float_pass)
            assert len(amb) == 0
            assert torch.equal(back * dx.sign(), want)
        assert 0 < want.abs().sum() < (gs.abs().sum() * conv.weight[0].numel())  # θ cuts, but not everything


def test_theta_kernel_falls_back_without_a_compiler(monkeypatch):
    import torch.utils.cpp_extension as ext
    monkeypatch.setenv("GRADAUTH_SLICING_KERNEL", "1")
    monkeypatch.setattr(kernel, "_TRIED", False)
    monkeypatch.setattr(kernel, "_MODULE", None)
    monkeypatch.setattr(ext, "load_inline", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no g++")))
    assert not kernel.available()
    model = _mlp()
    assert slice_model(model, torch.zeros(1, 2), torch.tensor([[1.0, 2.0]]), 0.5)["4"].tolist() == [0, 1]
    monkeypatch.setenv("GRADAUTH_SLICING_KERNEL", "0")
    assert not kernel.available()


def test_theta_filter_matches_exact_arithmetic_on_hard_rows():
    g = torch.Generator().manual_seed(1)
    for k in (5, 100, 600):
        x = torch.randn(64, k, generator=g)
        w = torch.randn(64, k, generator=g)
        ties_x = torch.randint(-3, 4, (64, k), generator=g).float()  # equal |w·Δx| and exactly tight cuts
        ties_w = torch.randint(-2, 3, (64, k), generator=g).float()
        wide = x * torch.exp(torch.randn(64, k, generator=g) * 8)   # 20+ octaves of dynamic range
        for xs, ws, integer in ((x, w, False), (ties_x, ties_w, True), (wide, w, False)):
            p = xs.double() * ws.double()
            y = _outputs(p, g, integer)
            for theta in (0.1, 0.3, 1.0):
                expect = torch.tensor([exact_keep(r.tolist(), theta, float(v)) for r, v in zip(p, y)])
                got = kept(xs, ws, theta, y)
                assert torch.equal(got, expect)
                assert (~got).any() and got.any()  # cuts inside rows, not only all-or-nothing


def test_theta_cut_by_hand():
    # p = 0.5, -1, 2, 4 (Δy = 5.5). Running sums in |p| order: 0.5, -0.5, 1.5, 5.5. t = θ·|y|, y the output.
    assert exact_keep([0.5, -1.0, 2.0, 4.0], 0.3, 5.5) == [False, False, False, True]   # t = 1.65
    assert exact_keep([0.5, -1.0, 2.0, 4.0], 0.25, 5.5) == [False, False, True, True]   # t = 1.375 ≤ 1.5
    # y is the output (bias and mean included), not Δy: y = 4 gives t = 1.2 ≤ 1.5, so input 2 is kept too…
    assert exact_keep([0.5, -1.0, 2.0, 4.0], 0.3, 4.0) == [False, False, True, True]
    assert exact_keep([0.5, -1.0, 2.0, 4.0], 0.3, -4.0) == [False, False, True, True]   # …whatever y's sign
    # …and y = 20 gives t = 6 > 5.5: no prefix reaches it, every input is dropped.
    assert exact_keep([0.5, -1.0, 2.0, 4.0], 0.3, 20.0) == [False, False, False, False]
    assert exact_keep([1.0, 1.0, 2.0], 0.5, 4.0) == [False, True, True]  # t = 2 = S_2: reaching t exactly keeps
    assert exact_keep([2.0, -2.0, 1.0], 0.0, 1.0) == [True, True, True]
    assert exact_keep([1.0, -1.0], 0.5, 0.0) == [True, True]              # y = 0: nothing is below 0
    assert exact_keep([1.0, 2.0], 0.5, 1e-30) == [True, True]             # y ≈ 0: t ≈ 0, all kept
    assert exact_keep([3.0, 3.0], 0.6, 6.0) == [False, True]              # ties: the lower input index goes first
    x, w = torch.tensor([[0.5, -1.0, 2.0, 4.0]] * 3), torch.ones(3, 4)
    assert kept(x, w, 0.3, torch.tensor([4.0, 20.0, 0.0])).tolist() == [
        [False, False, True, True], [False] * 4, [True] * 4]


# ---- golden: a 3-layer MLP by hand -----------------------------------------------------------------------------

def _mlp():
    m = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False), nn.ReLU(),
                      nn.Linear(2, 2, bias=False))
    for lin, w in zip((m[0], m[2], m[4]), ([[1, -1], [2, 1]], [[1, 1], [-1, 2]], [[1, -1], [1, 1]])):
        lin.weight.data = torch.tensor(w, dtype=torch.float32)
    return m.eval()


@pytest.mark.parametrize("theta,target,expect", [
    # x = (1, 2), profile = (0, 0) so Δ = output: fc1 (-1, 4), relu (0, 4), fc2 (4, 8), relu (4, 8), fc3 (-4, 12).
    # Predicted class 1: fc3 gives both relu2 inputs sign(1·12·1·4), sign(1·12·1·8) = +1; relu2 passes +1 to fc2;
    # fc2 gives relu1's input 0 nothing (Δx = 0) and input 1 sign(4·1·4) + sign(8·2·4) = 2; relu1 passes only
    # its positive unit: sign(2·4·4) = 1.
    (0.0, None, {"4": [0, 1], "3": [1, 1], "2": [1, 1], "1": [0, 2], "0": [0, 1]}),
    # Class 0 (Δy = -4): relu2 gets sign(-4·1·4) = -1 and sign(-4·-1·8) = +1, so fc2 gets (-1, +1), and relu1's
    # unit 1 gets sign(-1·4·1·4) + sign(1·8·2·4) = 0.
    (0.0, 0, {"4": [1, 0], "3": [-1, 1], "2": [-1, 1], "1": [0, 0], "0": [0, 0]}),
    # θ = 0.5 at class 1 (no biases, profile 0: y = Δy): fc3's p = (4, 8), t = 6: 4 is dropped (|S| = 4 < 6), 8 kept; fc2 unit 1: p = (0, 8),
    # t = 4: the 0 is dropped. Only the path through unit 1 survives.
    (0.5, None, {"4": [0, 1], "3": [0, 1], "2": [0, 1], "1": [0, 1], "0": [0, 1]}),
])
def test_golden_mlp(theta, target, expect):
    x, prof = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)
    for impl in (slice_partial, slice_loop):
        got = impl(_mlp(), prof, x, theta, target)
        assert {k: v.tolist() for k, v in got.neurons.items()} == expect
        assert {k: v.tolist() for k, v in got.channels.items()} == {k: [abs(i) for i in v] for k, v in expect.items()}


# ---- refusals ---------------------------------------------------------------------------------------------

class Sigmoidal(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.sigmoid(x))


def test_unsupported_op_is_named():
    with pytest.raises(UnsupportedOp, match="sigmoid"):
        slice_model(Sigmoidal(), torch.randn(4, 4), torch.randn(2, 4))
    with pytest.raises(UnsupportedOp, match="GELU"):
        slice_model(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)), torch.randn(4, 4), torch.randn(2, 4))
    assert issubclass(UnsupportedOp, GradauthError)  # the CLI prints it as one line, exit 2


def test_bad_theta_and_target_are_refused():
    with pytest.raises(GradauthError, match="theta"):
        slice_model(_mlp(), torch.zeros(1, 2), torch.ones(1, 2), theta=-0.1)
    with pytest.raises(GradauthError, match="not a class"):
        slice_model(_mlp(), torch.zeros(1, 2), torch.ones(1, 2), target=7)


# ---- the project's models and torchvision's --------------------------------------------------------------

@pytest.mark.parametrize("arch,width,in_ch,size,loop", [
    ("vgg_tiny", 0.25, 1, 8, True), ("resnet20", 0.25, 3, 8, True), ("densenet40", 0.25, 3, 8, False),
    ("torchvision:resnet18", 1.0, 3, 32, False),
])
def test_project_models(arch, width, in_ch, size, loop):
    torch.manual_seed(0)
    model = _randomise_bn(build_model(arch, 10, in_ch, width))
    prof, x = torch.randn(16, in_ch, size, size), torch.randn(2, in_ch, size, size)
    _centre_head(model, prof)
    s0 = slice_partial(model, prof, x, 0.0)
    s3 = slice_partial(model, prof, x, 0.3)
    outputs = {}
    def record(name):
        def hook(mod, inp, out):
            outputs.setdefault(name, out.shape[1:])  # a hook that returned this would replace the output
        return hook
    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules()
             if not list(m.children()) and not isinstance(m, nn.Sequential)]  # an empty Sequential is no op
    model(x)
    for h in hooks:
        h.remove()
    assert {k.split("#")[0] for k in s0.neurons} == set(outputs)  # every leaf module that ran is in the slice
    for k, v in s0.neurons.items():
        assert v.shape == outputs[k.split("#")[0]] and v.dtype == torch.int64
    head = [k for k in s0.neurons if k in ("fc", "classifier")][0]
    assert int(s0.neurons[head].sum()) == 2                      # the criterion: one logit per input
    assert nonzero_layers(s0) > 0.9 * len(s0.channels)
    assert 0 < total(s3) < total(s0)
    if arch == "torchvision:resnet18":
        assert "layer1.0.relu#1" in s0.neurons  # BasicBlock's ReLU runs twice; both outputs are kept apart
    if loop:
        assert_same(s3, slice_loop(model, prof, x, 0.3))


# ---- Ray ----------------------------------------------------------------------------------------------------

@pytest.mark.ray
def test_ray_equals_single_process():
    ray = pytest.importorskip("ray")
    from gradauth.slicing.distributed import slice_ray
    torch.manual_seed(0)
    model = _randomise_bn(build_model("resnet20", 10, 3, 0.25))
    prof, x = torch.randn(20, 3, 16, 16), torch.randn(10, 3, 16, 16)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for theta, target in ((0.0, None), (0.3, 4)):
            single = slice_partial(model, prof, x, theta, target, batch=4)
            assert_same(slice_ray(model, prof, x, theta, target, batch=4, max_in_flight=2), single)
    finally:
        ray.shutdown()


# ---- stage ----------------------------------------------------------------------------------------------------

def test_channel_importance_and_slices_parquet(tiny_cfg, tmp_path):
    from gradauth.data import load_dataset
    from gradauth.slicing import run_slice
    ds = load_dataset(tiny_cfg.data, tiny_cfg.seed)
    torch.manual_seed(0)
    model = _randomise_bn(build_model("vgg_tiny", 10, 1, 0.5))
    scores = channel_importance(model, ds, samples=32)
    bns = bn_layers(model)
    assert list(scores) == list(bns)
    assert all(scores[n].shape == (bns[n].num_features,) and scores[n].dtype == torch.float64 for n in bns)
    assert all(scores[n][0] == 0 for n in bns)  # γ = 0 (a locked channel) carries no contribution
    per_class = channel_importance(model, ds, classes=[1, 3], samples=32)
    assert any(not torch.equal(scores[n], per_class[n]) for n in bns)

    tiny_cfg.importance[0].name, tiny_cfg.importance[0].classes, tiny_cfg.importance[0].samples = "slice", [1, 3], 8
    table = pq.read_table(run_slice(tiny_cfg, tmp_path, model, ds, use_ray=False)).to_pandas()
    assert list(table.columns) == ["layer", "channel", "class", "contribution", "inputs"]
    assert sorted(table["class"].unique()) == [1, 3] and set(table["inputs"]) == {8}
    one = table[(table["class"] == 1) & (table["layer"] == "features.1")]
    expect = channel_importance(model, ds, classes=[1], samples=8)["features.1"]
    assert one.sort_values("channel")["contribution"].tolist() == expect.tolist()
    assert not list(tmp_path.glob(".slices.parquet.*"))  # written atomically: no temporary left behind
