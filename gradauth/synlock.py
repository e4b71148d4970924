"""Synapse locks (`lock.granularity: synapse`): NNSlicer's model protection as a lock option.

The lock hides, in every Conv2d / Linear layer, the `rate` fraction of its weights (synapses) that rank highest by
one of three importances (`config.SYNAPSE_IMPORTANCE`):

- `slice`: per-weight contribution counts from the exact slicer (slicing/synapse.py, `count`: how many (input,
  output neuron) pairs the weight carried a nonzero contribution for), over the inputs the `slice` importance entry
  names (its classes, θ and samples; profiled on the same train images as the channel `slice`). Counts are
  integers and tie often; ties are broken by |w| (the count plus |w| / (2 max |w| of the layer), which never
  reorders two different counts), then by position;
- `weight`: |w| (NNSlicer's "Weight" baseline);
- `random`: uniform scores from a generator seeded by the config's seed (the "Random" baseline).

`prune.synapse_masks` turns the scores into masks (per layer: exactly round(rate × n) of each layer's n weights);
`prune.apply_masks` / `enforce_masks` hold the hidden weights at zero during fine-tuning. The public model of a
synapse-lock release has them at zero (`erase` has nothing more to remove: a weight is its own detector), or with
`release.noise_init` redrawn from the same layer's kept weights (`noise_fill`), so nothing marks them.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .errors import GradauthError
from .prune import Masks, synapse_params

Scores = dict[str, torch.Tensor]


def synapse_scores(imp, model: nn.Module, ds, seed: int = 0) -> Scores:
    """{weight parameter name: one score per weight} of `model` under importance `imp` (an ImportanceConfig)."""
    params = {n: w.detach().cpu() for n, w in synapse_params(model).items()}
    if imp.name == "weight":
        return {n: w.abs().double() for n, w in params.items()}
    if imp.name == "random":
        gen = torch.Generator().manual_seed(int(seed))
        return {n: torch.rand(w.shape, generator=gen, dtype=torch.float64) for n, w in params.items()}
    if imp.name == "slice":
        return slice_synapse_scores(model, ds, imp.classes, imp.theta, imp.samples)
    from .config import SYNAPSE_IMPORTANCE
    raise GradauthError(f"importance {imp.name} does not rank synapses: a synapse lock takes "
                        f"{', '.join(SYNAPSE_IMPORTANCE)}")


def slice_synapse_scores(model: nn.Module, ds, classes=None, theta: float = 0.0, samples: int = 256) -> Scores:
    """Per-weight contribution counts (slicing/synapse.py) over the `slice` importance's inputs, ties broken by |w|."""
    import copy

    from .slicing.stage import profile_inputs, sliced_inputs
    from .slicing.synapse import synapse_partial
    model = copy.deepcopy(model).cpu().eval()
    x, y = sliced_inputs(ds, samples, classes)
    syn, _ = synapse_partial(model, profile_inputs(ds), x, theta, y if classes else None)
    out = {}
    for n, w in synapse_params(model).items():
        module = n[:-len(".weight")] if n.endswith(".weight") else ""
        count = syn.count.get(module)
        count = torch.zeros(w.shape, dtype=torch.float64) if count is None else count.double()
        a = w.detach().abs().double()
        out[n] = count + a / (2 * a.max()) if a.max() > 0 else count
    return out


@torch.no_grad()
def noise_fill_synapses(model: nn.Module, masks: Masks, gen: torch.Generator) -> None:
    """Give every hidden weight a value drawn from the same layer's kept weights, so zeros do not mark the lock."""
    params = synapse_params(model)
    for name, keep in masks.items():
        w, hidden = params[name], ~keep.to(params[name].device)
        pool = w[~hidden]
        if not hidden.any() or not len(pool):
            continue
        w[hidden] = pool[torch.randint(len(pool), (int(hidden.sum()),), generator=gen).to(pool.device)]


@torch.no_grad()
def revive_synapses(model: nn.Module, seed: int = 0) -> int:
    """What a thief does first with a zeros release of a synapse lock: every conv/linear weight that is exactly 0
    (the hidden ones, visible as zeros) gets a fresh value drawn like the layer's own init (uniform ±1/√fan_in).
    Returns the number of weights redrawn."""
    import math
    gen, n = torch.Generator().manual_seed(seed), 0
    for w in synapse_params(model).values():
        dead = w == 0
        k = int(dead.sum())
        if k:
            bound = 1.0 / math.sqrt(w[0].numel())
            w[dead] = ((torch.rand(k, generator=gen) * 2 - 1) * bound).to(w)
            n += k
    return n


def hidden_fraction(masks: Masks) -> dict[str, float]:
    """Per weight: the fraction of it the lock hides."""
    return {n: 1.0 - float(k.float().mean()) for n, k in masks.items()}
