"""Slicing on Ray: forward actors (one per GPU, or one CPU actor) feed backward-analysis tasks on the CPUs.

Forward passes are batched and return only `Stats` (int8 signs, and Δ at weighted-sum inputs for θ > 0), never
full activations. Each batch's stats go straight to a CPU task that slices it and returns a `Partial` (per-neuron
and per-channel integer sums); the driver adds them up. At most `max_in_flight` batches are between forward and
sum at any time, which bounds the object store. Batches and profile sums follow record.batches exactly, so on the
same kind of device the result equals the single-process `slice_partial` to the last integer.
"""
from __future__ import annotations

import contextlib
import hashlib
import os

import ray
import torch

from .graph import Plan
from .record import BATCH, Stats, batches, combine_means, forward_stats, profile_sums
from .vectorized import BLOCK, Partial, backward

_PLANS: dict[str, tuple] = {}  # per worker process: model token → (model, plan), traced once per process
_REFS: dict[str, object] = {}  # driver: model token → its ObjectRef, so repeated calls ship the model once
_ACTORS: dict[str, list] = {}  # driver: model token → its forward actors (a new actor is a new process: ~2 s)


def _token(model: torch.nn.Module) -> str:
    """Fingerprint of the weights: the same model (and only it) maps to the same cached object and plan."""
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def _model_ref(model: torch.nn.Module) -> tuple[str, object]:
    token = _token(model)
    if token not in _REFS:
        _REFS.clear()  # one model at a time: do not pin old ones in the object store
        _REFS[token] = ray.put(model)
    return token, _REFS[token]


def _plan(token: str, model_ref) -> Plan:
    if token not in _PLANS:
        model = ray.get(model_ref)
        _PLANS.clear()
        _PLANS[token] = (model, Plan(model))
    return _PLANS[token][1]


def _to(st: Stats, device) -> Stats:
    move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return Stats(st.n, st.pred.to(device), move(st.sd), move(st.dx), move(st.pos), move(st.idx),
                 move(st.y))


@ray.remote
class ForwardWorker:
    """Holds the model on its device; profiles batches and turns batches into Stats."""

    def __init__(self, model_refs: list, device: str):
        self.device = torch.device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # it shares the cores with the backward tasks: more threads only spin
        self.model = ray.get(model_refs[0]).to(self.device).eval()
        self.plan = Plan(self.model)
        self.means = None

    def profile(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in profile_sums(self.plan, x.to(self.device)).items()}

    def set_means(self, means: dict[str, torch.Tensor]) -> None:
        self.means = {k: v.to(self.device) for k, v in means.items()}

    def stats(self, x: torch.Tensor, theta: float) -> Stats:
        return _to(forward_stats(self.plan, self.means, x.to(self.device), theta).compact(), "cpu")


@ray.remote(num_cpus=1)
def backward_task(token: str, model_refs: list, st: Stats, theta: float, target, block: int) -> Partial:
    # The ref is wrapped in a list so Ray hands it over unresolved and each worker fetches the model only once.
    return backward(_plan(token, model_refs[0]), st, theta, target, block)


def _workers(token: str, model_ref) -> list:
    if token in _ACTORS:
        return _ACTORS[token]
    release_workers()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        actors = [ForwardWorker.options(num_gpus=1, num_cpus=1).remote([model_ref], "cuda") for _ in range(gpus)]
    else:
        # No GPU: one forward actor that reserves no CPU. Forward passes are a third of the work at θ = 0 and a
        # rounding error at θ > 0, so every CPU stays free for backward tasks and the OS shares the cores.
        actors = [ForwardWorker.options(num_cpus=0).remote([model_ref], "cpu")]
    _ACTORS[token] = actors
    return actors


def release_workers() -> None:
    """Stop the forward actors kept for the last model (they are reused while the same model is sliced)."""
    for actors in _ACTORS.values():
        for a in actors:
            ray.kill(a)
    _ACTORS.clear()


def slice_ray(model: torch.nn.Module, profile_inputs: torch.Tensor | None, inputs: torch.Tensor, theta: float = 0.0,
              target=None, batch: int = BATCH, block: int = BLOCK, max_in_flight: int | None = None,
              means: dict | None = None) -> Partial:
    """The distributed twin of `slice_partial` (same arguments, same result; `means` skips profiling)."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False)
    Plan(model)  # refuse an unsupported model here, not inside an actor
    token, model_ref = _model_ref(model.cpu().eval())
    actors = _workers(token, model_ref)
    if means is None:
        parts = ray.get([actors[i % len(actors)].profile.remote(b)
                         for i, b in enumerate(batches(profile_inputs, batch))])
        means = combine_means(parts, len(profile_inputs))
    means_ref = ray.put(means)
    ray.get([a.set_means.remote(means_ref) for a in actors])
    limit = max_in_flight or 2 * int(ray.cluster_resources().get("CPU", 2))
    out, pending = Partial(), []
    for i, xb in enumerate(batches(inputs, batch)):
        if len(pending) >= limit:
            done, pending = ray.wait(pending, num_returns=1)
            out.merge(ray.get(done[0]))
        tb = target[i * batch:(i + 1) * batch] if isinstance(target, torch.Tensor) else target
        st = actors[i % len(actors)].stats.remote(xb, theta)
        pending.append(backward_task.remote(token, [model_ref], st, theta, tb, block))
    for part in ray.get(pending):
        out.merge(part)
    return out


@contextlib.contextmanager
def local_cluster(num_cpus: int):
    """A private local Ray for the duration (benchmarks, tests); one already running is used as is."""
    if ray.is_initialized():
        yield
        return
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        _ACTORS.clear()
        _REFS.clear()
        ray.shutdown()
