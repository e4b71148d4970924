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
from .record import BATCH, forward_record, profile
from .vectorized import Partial


def slice_loop(model: torch.nn.Module, profile_inputs: torch.Tensor, inputs: torch.Tensor, theta: float = 0.0,
               target: int | None = None, batch: int = BATCH) -> Partial:
    plan = Plan(model)
    means = profile(plan, profile_inputs, batch)
    out = Partial()
    for i in range(0, len(inputs), batch):
        rec = {k: (y.double().numpy(), d.double().numpy()) for k, (y, d) in
               forward_record(plan, means, inputs[i:i + batch]).items()}
        for n in range(len(inputs[i:i + batch])):
            one = {k: (y[n], d[n]) for k, (y, d) in rec.items()}
            for key, c in _slice_one(plan, one, theta, target).items():
                out.add_map(key, torch.from_numpy(c[None]).double())
            out.inputs += 1
    return out


def _slice_one(plan: Plan, rec: dict, theta: float, target: int | None) -> dict[str, np.ndarray]:
    logits = rec[plan.logits][0]
    cls = int(np.argmax(logits)) if target is None else target
    contrib = {s.name: np.zeros(rec[s.name][0].shape, dtype=np.int64) for s in plan.steps if s.name in rec}
    contrib[plan.logits][cls] = 1
    result = {}
    for s in reversed(plan.steps):
        if s.name not in rec:
            continue
        if s.key is not None:
            result[s.key] = contrib[s.name]
        s.rule.loop(s, rec, contrib, theta, plan)
    return result


LOOPS = ops.RuleTable("loop")  # kind -> its rule's loop, as the old table was (the rules live in ops.py)
