"""Synapse-level slices: per-weight contribution counts from the vectorised walk equal the per-neuron loop
reference exactly (θ = 0 and θ > 0, predicted and given class), and tie back to the per-neuron slice."""
import pytest
import torch

from gradauth.slicing import slice_partial
from gradauth.slicing.synapse import synapse_loop, synapse_partial
from tests.test_slicing import ConvZoo, ResCat, _random_case


from slicing_fixtures import one_thread, torch_theta_path  # noqa: F401  (autouse)


def _weighted(model):
    return {k for k, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


@pytest.mark.parametrize("theta", [0.0, 0.2])
@pytest.mark.parametrize("target", [None, 1])
@pytest.mark.parametrize("net", [ConvZoo, ResCat])
def test_synapse_counts_equal_loop_reference(net, theta, target):
    model, prof, x = _random_case(net)
    fast, part = synapse_partial(model, prof, x, theta, target, batch=2)  # batches of 2: merged sums too
    ref = synapse_loop(model, prof, x, theta, target)
    assert fast.inputs == ref.inputs == 3
    assert set(fast.count) == set(ref.count) == _weighted(model)  # every Conv2d / Linear, the first one too
    for k in fast.count:
        assert fast.count[k].shape == dict(model.named_modules())[k].weight.shape
        assert fast.count[k].dtype == torch.int64
        assert torch.equal(fast.count[k], ref.count[k]), k
        assert torch.equal(fast.signed[k], ref.signed[k]), k
        assert bool((fast.count[k] >= fast.signed[k].abs()).all())
    live = sum(int(v.sum() > 0) for v in fast.count.values())
    assert live >= len(fast.count) - 1  # not an agreement between two empty slices
    # the walk itself is untouched: the Partial that comes with it is the ordinary slice
    plain = slice_partial(model, prof, x, theta, target, batch=2)
    for k in plain.neurons:
        assert torch.equal(part.neurons[k], plain.neurons[k]), k


def test_only_the_criterion_row_of_the_head_is_sliced_and_theta_cuts_synapses():
    """One input: the head's only neuron with CONTRIB ≠ 0 is the criterion, so one row of its weights carries
    contributions, each ±1 (count = number of nonzero signed entries). θ > 0 drops some synapses, not all."""
    model, prof, x = _random_case(ResCat)
    syn, part = synapse_partial(model, prof, x[:1], 0.0, None)
    head = syn.signed["fc2"]
    assert int((head != 0).any(1).sum()) == 1
    assert int(syn.count["fc2"].sum()) == int((head != 0).sum())
    theta_cut, _ = synapse_partial(model, prof, x, 0.3, None)
    full, _ = synapse_partial(model, prof, x, 0.0, None)
    assert 0 < sum(int(v.sum()) for v in theta_cut.count.values()) < sum(int(v.sum()) for v in full.count.values())
