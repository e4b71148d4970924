"""Profiling and forward analysis: profiled means, and the compact per-batch statistics the backward pass reads.

Inputs are always cut into batches of the same size at the same boundaries (`batches`), and profile sums are
float64 per batch, added in batch order. So the single-process and the distributed paths run identical kernels
on identical batches and get identical means and Δ, bit for bit (on the same kind of device).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .algebra import mean_like
from .graph import Plan, Step, run

BATCH = 32  # samples per forward batch: bounds activation memory (≈ batch × the model's activations)


def batches(x: torch.Tensor, size: int = BATCH) -> list[torch.Tensor]:
    return [x[i:i + size] for i in range(0, len(x), size)]


def _neuron_steps(plan: Plan) -> set[str]:
    return {s.name for s in plan.steps if s.rule.neurons}


@torch.no_grad()
def profile_sums(plan: Plan, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ over the batch of every neuron's output, in float64 (one batch: partial sums, combined in order)."""
    want = _neuron_steps(plan)
    sums: dict[str, torch.Tensor] = {}

    def visit(s: Step, val, args):
        if s.name in want and isinstance(val, torch.Tensor):
            sums[s.name] = val.double().sum(0)
    run(plan, x, visit)
    return sums


def combine_means(parts: list[dict[str, torch.Tensor]], count: int) -> dict[str, torch.Tensor]:
    total = dict(parts[0])
    for part in parts[1:]:
        for k, v in part.items():
            total[k] = total[k] + v
    return {k: _channels_last_order((v / count).float()) for k, v in total.items()}


def _channels_last_order(mean: torch.Tensor) -> torch.Tensor:
    """A (C, H, W) mean stored channel-fastest, so that subtracting it from a channels-last batch (graph.run
    feeds every 4-d input channels-last) broadcasts as a view: no copy per batch. Same values."""
    return mean.permute(1, 2, 0).contiguous().permute(2, 0, 1) if mean.dim() == 3 else mean


def profile(plan: Plan, x: torch.Tensor, batch: int = BATCH) -> dict[str, torch.Tensor]:
    """Mean output of every neuron over the profiling set."""
    return combine_means([profile_sums(plan, b) for b in batches(x, batch)], len(x))


@dataclass
class Stats:
    """What backward analysis needs for one batch, and nothing more (this is what crosses the wire on Ray).

    sd: sign(Δ) of every neuron (float32 in process, int8 once `compact`); pred: predicted class. The other maps
    are filled by the op rules that declare them in `records` (ops.py): with θ > 0 dx: Δ of every weighted-sum
    input and y: the output of every weighted sum (float32; the θ filter compares with |y|); pos: y > 0 of ReLUs;
    idx: arg-max positions of max-pools.
    """
    n: int
    pred: torch.Tensor
    sd: dict[str, torch.Tensor] = field(default_factory=dict)
    dx: dict[str, torch.Tensor] = field(default_factory=dict)
    pos: dict[str, torch.Tensor] = field(default_factory=dict)
    idx: dict[str, torch.Tensor] = field(default_factory=dict)
    y: dict[str, torch.Tensor] = field(default_factory=dict)
    sdf: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # backward's float32 copies of sd/pos

    def compact(self) -> "Stats":
        """The same statistics with the signs as int8, for the wire (in process they stay float32: backward
        multiplies them with float maps, and float×float runs several times faster than float×int8)."""
        return Stats(self.n, self.pred, {k: v.to(torch.int8) for k, v in self.sd.items()}, self.dx, self.pos,
                     self.idx, self.y)

    def nbytes(self) -> int:
        maps = (self.sd, self.dx, self.pos, self.idx, self.y)
        return sum(t.numel() * t.element_size() for m in maps for t in m.values())


@torch.no_grad()
def forward_stats(plan: Plan, means: dict[str, torch.Tensor], x: torch.Tensor, theta: float) -> Stats:
    st = Stats(len(x), torch.empty(0, dtype=torch.int64))

    def visit(s: Step, val, args):
        if s.name not in means or not isinstance(val, torch.Tensor):
            return
        st.sd[s.name] = torch.sub(val, mean_like(means[s.name], val)).sign_()
        s.rule.record(st, s, val, args, means, theta)
        if s.name == plan.logits:
            st.pred = val.argmax(1)  # first maximum on ties
    run(plan, x, visit)
    return st


@torch.no_grad()
def forward_record(plan: Plan, means: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, tuple]:
    """(y, Δ) of every neuron, full precision: what the loop reference reads."""
    rec: dict[str, tuple] = {}

    def visit(s: Step, val, args):
        if s.name in means and isinstance(val, torch.Tensor):
            rec[s.name] = (val.clone(), val - means[s.name])
    run(plan, x, visit)
    return rec


def sample_records(plan: Plan, profile_inputs: torch.Tensor, inputs: torch.Tensor, batch: int = BATCH):
    """Per input, in order: {neuron: (y, Δ)} as float64 numpy arrays of that one sample (profiled on
    `profile_inputs`): what the loop references walk, one sample at a time."""
    means = profile(plan, profile_inputs, batch)
    for i in range(0, len(inputs), batch):
        rec = {k: (y.double().numpy(), d.double().numpy()) for k, (y, d) in
               forward_record(plan, means, inputs[i:i + batch]).items()}
        for n in range(len(inputs[i:i + batch])):
            yield {k: (y[n], d[n]) for k, (y, d) in rec.items()}
