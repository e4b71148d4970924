"""Autouse fixtures the slicing test files share (imported by name into each; pytest activates them there)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def torch_theta_path(monkeypatch):
    """The θ > 0 tests run the torch filter; the compiled one is checked against it in test_slicing's own tests
    (so only they pay its first build)."""
    monkeypatch.setenv("GRADAUTH_SLICING_KERNEL", "0")


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors here are small: one thread is as fast, and does not stall when a neighbour holds the other core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def count_kernel_calls(monkeypatch, name: str) -> list:
    """Turn the compiled θ kernel on (skip without a C++ compiler) and count the calls of its function `name`."""
    from gradauth.slicing import kernel
    monkeypatch.setenv("GRADAUTH_SLICING_KERNEL", "1")
    if not kernel.available():
        pytest.skip("no C++ compiler for the θ kernel (the torch path is used then)")
    calls = []
    real = getattr(kernel, name)
    monkeypatch.setattr(kernel, name, lambda *a: calls.append(1) or real(*a))
    return calls
