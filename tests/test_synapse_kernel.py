"""The compiled θ kernel's synapse mode (kernel.conv_theta_synapses): per-weight counts at θ > 0 equal the
per-synapse loop reference and the torch filter exactly, on undecidable cuts and wide windows too."""
import pytest
import torch
import torch.nn as nn

from gradauth.slicing import kernel
from gradauth.slicing.synapse import _conv_theta, _conv_theta_compiled, synapse_loop, synapse_partial
from gradauth.slicing.vectorized import BLOCK
from tests.test_slicing import ConvZoo, ResCat, _random_case

from slicing_fixtures import count_kernel_calls, one_thread, torch_theta_path  # noqa: F401  (autouse)


@pytest.fixture
def compiled(monkeypatch):
    """The compiled kernel (a compiler runs on first use: marked subprocess); counts its synapse-mode calls."""
    return count_kernel_calls(monkeypatch, "conv_theta_synapses")


@pytest.mark.subprocess
@pytest.mark.parametrize("theta", [0.1, 0.3])
@pytest.mark.parametrize("net", [ConvZoo, ResCat])
def test_compiled_synapse_counts_equal_loop_reference(net, theta, compiled):
    model, prof, x = _random_case(net)
    fast, _ = synapse_partial(model, prof, x, theta, None, batch=2)
    assert compiled  # the kernel ran
    ref = synapse_loop(model, prof, x, theta, None)
    for k in ref.count:
        assert torch.equal(fast.count[k], ref.count[k]), k
        assert torch.equal(fast.signed[k], ref.signed[k]), k
    full, _ = synapse_partial(model, prof, x, 0.0, None, batch=2)
    cut, whole = (sum(int(v.sum()) for v in s.count.values()) for s in (fast, full))
    assert 0 < cut < whole  # θ cuts synapses, not all of them


def _case(conv, gen, wide: bool):
    if wide:
        nn.init.normal_(conv.weight, generator=gen)
        cin = conv.in_channels
        dx = torch.randn(2, cin, 6, 6, generator=gen) * torch.exp2(torch.randint(-6, 7, (2, cin, 6, 6), generator=gen))
        dx[torch.rand(dx.shape, generator=gen) < 0.1] = 0.0  # dead inputs, as after a ReLU
        out = conv(dx).detach()
        y = out * torch.exp2(torch.randint(-2, 3, out.shape, generator=gen))
    else:  # small integers: ties and running sums that hit θ·|y| exactly, which float64 margins cannot decide
        conv.weight.data = torch.randint(-2, 3, conv.weight.shape, generator=gen).float()
        dx = torch.randint(-3, 4, (2, conv.in_channels, 7, 7), generator=gen).float()
        out = conv(dx).detach()
        y = torch.randint(-12, 13, out.shape, generator=gen).float()
    g = torch.randint(-1, 2, out.shape, generator=gen).float()
    return g, dx, y


@pytest.mark.subprocess
def test_compiled_synapse_counts_hand_undecidable_neurons_to_exact_arithmetic(compiled):
    gen = torch.Generator().manual_seed(3)
    for conv in (nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)):
        g, dx, y = _case(conv, gen, wide=False)
        for theta in (0.25, 0.5):
            _, _, amb = kernel.conv_theta_synapses(conv, g, dx, y, theta)
            assert len(amb) > 0  # the case does reach the exact fallback
            want = _conv_theta(conv, g, dx, y, theta, BLOCK)
            got = _conv_theta_compiled(conv, g, dx, y, theta, BLOCK)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.subprocess
@pytest.mark.parametrize("theta", [0.1, 0.3])
def test_compiled_synapse_counts_on_wide_windows(theta, compiled):
    # windows of 576 inputs over dozens of bins; the float32 pass and the float64-only pass agree with torch
    gen = torch.Generator().manual_seed(5)
    for conv in (nn.Conv2d(64, 32, 3, padding=1), nn.Conv2d(64, 32, 3, stride=2, padding=2, dilation=2, groups=2)):
        g, dx, y = _case(conv, gen, wide=True)
        want_s, want_c = _conv_theta(conv, g, dx, y, theta, BLOCK)
        for float_pass in (True, False):
            signed, count, amb = kernel.conv_theta_synapses(conv, g, dx, y, theta, float_pass)
            assert len(amb) == 0
            assert torch.equal(signed.round().long().view(conv.weight.shape), want_s)
            assert torch.equal(count.round().long().view(conv.weight.shape), want_c)
        full = int(g.abs().sum()) * conv.weight[0].numel()
        assert 0 < int(want_c.sum()) < full  # θ cuts, but not everything
