"""The loop reference: one sample, one neuron, one synapse at a time, straight from the rules. Slow on purpose.

It shares only the graph walk (which op is which) and the forward record (outputs and Δ) with the vectorised
path; each op rule's `loop` (ops.py, built from loops.py alone) recomputes every window, index, sign and θ cut with
plain Python loops, so the tests that demand exact agreement check the tensor algebra of the rules' `backward`
(algebra.py) against the definition.
"""
from __future__ import annotations

import numpy as np
import torch

from . import ops
from .graph import Plan
from .loops import Meter, OutOfTime, metered  # noqa: F401  (benchmarks meter the reference)
from .record import BATCH, sample_records
from .vectorized import Partial


def slice_loop(model: torch.nn.Module, profile_inputs: torch.Tensor, inputs: torch.Tensor, theta: float = 0.0,
               target: int | None = None, batch: int = BATCH) -> Partial:
    plan = Plan(model)
    out = Partial()
    for one in sample_records(plan, profile_inputs, inputs, batch):
        for key, c in _slice_one(plan, one, theta, target).items():
            out.add_map(key, torch.from_numpy(c[None]).double())
        out.inputs += 1
    return out


def walk_one(plan: Plan, rec: dict, theta: float, target: int | None, collect) -> dict:
    """The per-neuron backward walk of one sample (`rec`: {neuron: (y, Δ)}): CONTRIB 1 at the criterion, then each
    step's loop rule in reverse order. Before a step passes its CONTRIB on (when it is complete), `collect(step,
    CONTRIB)` may return what to keep for the step's key (None: nothing). Returns {key: kept}."""
    logits = rec[plan.logits][0]
    cls = int(np.argmax(logits)) if target is None else target
    contrib = {s.name: np.zeros(rec[s.name][0].shape, dtype=np.int64) for s in plan.steps if s.name in rec}
    contrib[plan.logits][cls] = 1
    result = {}
    for s in reversed(plan.steps):
        if s.name not in rec:
            continue
        if s.key is not None:
            kept = collect(s, contrib[s.name])
            if kept is not None:
                result[s.key] = kept
        s.rule.loop(s, rec, contrib, theta, plan)
    return result


def _slice_one(plan: Plan, rec: dict, theta: float, target: int | None) -> dict[str, np.ndarray]:
    return walk_one(plan, rec, theta, target, lambda s, c: c)


LOOPS = ops.RuleTable("loop")  # kind -> its rule's loop, as the old table was (the rules live in ops.py)
