"""`gradauth simplify CONFIG`: NNSlicer's class-targeted simplification (FSE'20, §5.2), on the config's base model.

For each class subset S (a seeded sample of the k-class subsets, or the config's explicit ones) and each removal
rate r, every method prunes a copy of the base model, fine-tunes it, and measures it on S:

1. Scores per synapse (one weight of a Conv2d or Linear, the logits layer included):
   - `slice`: NNSlicer's. Up to `samples` training inputs of the classes in S are sliced, each with the criterion
     (input, its label); the per-synapse contribution counts of the exact slicer (slicing/synapse.py, `count`: how
     many (input, output neuron) pairs the weight carried a nonzero contribution for) are summed over them. Ties
     (frequent at θ = 0, where a count does not see the weight's size) are broken by |w|.
   - `weight` (the paper's "Weight"): |w|.
   - `channel` (the paper's "Channel"): the mean |w| of each output channel; whole channels go. The logits layer
     is left whole (its output channels are the classes: removing one would remove a class, so the baseline would
     lose target classes outright); its `kept` fraction is therefore a little above 1 − r.
2. Removal, per layer: the round(r · n) synapses with the lowest scores (`channel`: the round(r · channels) output
   channels with the lowest means, each with all its synapses, in every layer but the logits layer). A channel whose synapses are all gone goes too:
   the BatchNorm that reads only that conv has the channel's γ and β zeroed (and a bias of that output, if any).
3. Fine-tune: `epochs` (the paper: one) over at most `finetune` training inputs of the classes in S, with the
   removed synapses held at zero after every step (SGD, Nesterov momentum 0.9, cosine schedule, augmentation as in
   training).
4. Accuracy on the test inputs of the classes in S, classification restricted to S (the argmax over the logits of
   S only: the simplified model answers "which of these k classes", as in the paper), before and after the
   fine-tune; `acc_after_all` is the argmax over all classes, for reference.

Output: `simplify.parquet` (one row per subset × method × r), `simplify.md` (means over subsets per method × r) and
`plots/simplify.png` (target-class accuracy vs r, one line per method) in the run's output folder, next to
`base.pt`, which must exist (`gradauth train CONFIG`). Every setting is checked (config.SimplifyConfig's rules, and
the classes against the dataset) before anything is computed or written. Slicing runs in this process
(`synapse_partial`; the synapse-level counts have no Ray path yet).
"""
from __future__ import annotations

import copy
import itertools
import math
import random
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn as nn

from . import rundir
from .config import SimplifyConfig, parse_classes
from .data import Dataset, Split, normalize
from .engine import FitSpec, fit, make_optimizer, predict
from .errors import GradauthError
from .fsutil import atomic_path, write_text

Settings = SimplifyConfig  # the `simplify:` config section (config.py declares its fields and their rules)

SCHEMA = pa.schema([
    ("subset", pa.string()), ("method", pa.string()), ("rate", pa.float64()), ("kept", pa.float64()),
    ("dead_channels", pa.int64()), ("base_acc", pa.float64()), ("acc_before", pa.float64()),
    ("acc_after", pa.float64()), ("acc_after_all", pa.float64()), ("sliced", pa.int64()),
    ("finetune_inputs", pa.int64()), ("test_inputs", pa.int64()), ("slice_seconds", pa.float64()),
    ("seconds", pa.float64()), ("theta", pa.float64()), ("seed", pa.int64())])

Masks = dict[str, torch.Tensor]  # weighted module name -> bool keep-mask shaped like its weight


# ---- class subsets ------------------------------------------------------------------------------------------------

def class_subsets(s: Settings, num_classes: int) -> list[tuple[int, ...]]:
    """The subsets to run: the explicit `classes`, else `subsets` distinct k-class subsets (seeded; every one when
    there are no more than that). A class the dataset does not have, or k above its classes: one line."""
    if s.classes:
        out = [parse_classes(c) for c in s.classes]
        for sub in out:
            bad = [c for c in sub if c >= num_classes]
            if bad:
                raise GradauthError(f"simplify.classes {','.join(map(str, sub))!r} names class "
                                    f"{', '.join(map(str, bad))}, which the dataset does not have (classes 0…"
                                    f"{num_classes - 1})")
        return out
    if s.k > num_classes:
        raise GradauthError(f"simplify.k = {s.k} is more than the dataset's {num_classes} classes: choose k in "
                            f"2…{num_classes}")
    total = math.comb(num_classes, s.k)
    if total <= s.subsets:
        return list(itertools.combinations(range(num_classes), s.k))
    rng = random.Random(s.seed)
    if total <= 100_000:
        return sorted(rng.sample(list(itertools.combinations(range(num_classes), s.k)), s.subsets))
    seen: set = set()
    while len(seen) < s.subsets:
        seen.add(tuple(sorted(rng.sample(range(num_classes), s.k))))
    return sorted(seen)


def of_classes(split: Split, classes, n: int | None, seed: int) -> Split:
    pick = torch.isin(split.y, torch.tensor(classes))
    return Split(split.x[pick], split.y[pick]).subset(n, seed)


# ---- scores and masks --------------------------------------------------------------------------------------------

def weighted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d and Linear by qualified name: the layers whose synapses are ranked and removed."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def logits_layer(model: nn.Module) -> str | None:
    """The weighted layer that computes the logits (None if the logits come from another op)."""
    from .slicing.graph import Plan
    plan = Plan(model)
    step = plan.by_name[plan.logits]
    return step.module if step.kind in ("conv", "linear") else None


def bn_after(model: nn.Module) -> dict[str, str]:
    """Conv name -> the BatchNorm that reads its output and nothing else does (so a dead channel can go there)."""
    from .slicing.graph import Plan
    plan = Plan(model)
    users: dict[str, list] = {}
    for s in plan.steps:
        for p in s.parents:
            users.setdefault(p, []).append(s)
    out = {}
    for s in plan.steps:
        if s.kind == "conv" and s.module:
            u = users.get(s.name, [])
            if len(u) == 1 and u[0].kind == "bn" and u[0].module:
                out[s.module] = u[0].module
    return out


def slice_scores(model: nn.Module, ds: Dataset, classes, s: Settings) -> tuple[dict[str, torch.Tensor], int, float]:
    """(per-synapse contribution counts summed over up to `samples` training inputs of `classes`, each sliced from
    its label's logit; inputs sliced; seconds)."""
    from .slicing.stage import profile_inputs
    from .slicing.synapse import synapse_partial
    t0 = time.perf_counter()
    part = of_classes(ds.train, classes, s.samples, s.seed)
    x = normalize(part.x.cpu(), ds.mean, ds.std)
    syn, _ = synapse_partial(copy.deepcopy(model).cpu().eval(), profile_inputs(ds), x, s.theta, part.y.cpu())
    return dict(syn.count), len(part), time.perf_counter() - t0


def masks_for(model: nn.Module, method: str, rate: float, counts: dict[str, torch.Tensor] | None = None) -> Masks:
    """Keep-masks removing the lowest `rate` of every weighted layer's synapses under `method` (per layer:
    exactly round(rate · n) synapses, or round(rate · channels) whole output channels for `channel`, which leaves
    the logits layer whole: its output channels are the classes)."""
    masks = {}
    head = logits_layer(model) if method == "channel" else None
    for name, m in weighted_layers(model).items():
        w = m.weight.detach().cpu().double()
        if name == head:  # its output channels are the classes: removing one removes a class, not a feature
            masks[name] = torch.ones(w.shape, dtype=torch.bool)
            continue
        if method == "channel":
            per = w.abs().reshape(w.shape[0], -1).mean(1)
            k = int(round(rate * w.shape[0]))
            gone = torch.argsort(per, stable=True)[:k]
            keep = torch.ones(w.shape[0], dtype=torch.bool)
            keep[gone] = False
            masks[name] = keep.view(-1, *[1] * (w.dim() - 1)).expand(w.shape).clone()
            continue
        if method == "slice":
            if counts is None or name not in counts:
                raise GradauthError(f"no synapse slice for layer {name}: the slicer did not reach it")
            top = float(w.abs().max()) or 1.0
            score = counts[name].double() + w.abs() / (2 * top)  # counts are whole numbers: |w| only breaks ties
        elif method == "weight":
            score = w.abs()
        else:
            raise GradauthError(f"unknown simplify method {method!r}")
        flat = score.flatten()
        k = int(round(rate * flat.numel()))
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        keep[torch.argsort(flat, stable=True)[:k]] = False
        masks[name] = keep.view(w.shape)
    return masks


def dead_channels(masks: Masks) -> dict[str, torch.Tensor]:
    """Weighted layer -> bool per output channel: True where every synapse of that channel is gone."""
    return {n: ~k.reshape(k.shape[0], -1).any(1) for n, k in masks.items()}


class Pruned:
    """A model with synapse masks held: zeroed now and after every optimizer step, with their dead channels."""

    def __init__(self, model: nn.Module, masks: Masks):
        self.model, self.masks = model, masks
        self.layers = weighted_layers(model)
        dead = dead_channels(masks)
        bns = dict(model.named_modules())
        self.bn_keep = {}
        for conv, bn in bn_after(model).items():
            if conv in dead and bool(dead[conv].any()):
                self.bn_keep[bns[bn]] = ~dead[conv]
        self.bias_keep = {n: ~dead[n] for n, m in self.layers.items() if getattr(m, "bias", None) is not None}
        self.dead = int(sum(int(d.sum()) for d in dead.values()))
        self.enforce()

    @torch.no_grad()
    def enforce(self) -> None:
        for n, m in self.layers.items():
            m.weight.mul_(self.masks[n].to(m.weight.device, m.weight.dtype))
            if n in self.bias_keep:
                m.bias.mul_(self.bias_keep[n].to(m.bias.device, m.bias.dtype))
        for bn, keep in self.bn_keep.items():
            k = keep.to(bn.weight.device, bn.weight.dtype)
            bn.weight.mul_(k)
            bn.bias.mul_(k)

    def kept(self) -> float:
        total = sum(k.numel() for k in self.masks.values())
        return sum(int(k.sum()) for k in self.masks.values()) / total


# ---- the experiment ----------------------------------------------------------------------------------------------

@torch.no_grad()
def target_accuracy(model: nn.Module, ds: Dataset, test: Split, classes) -> tuple[float, float]:
    """(accuracy with the argmax over the logits of `classes` only, accuracy with the argmax over all)."""
    if not len(test):
        return float("nan"), float("nan")
    logits = predict(model, ds, test)
    cls = torch.tensor(classes, device=logits.device)
    restricted = cls[logits[:, cls].argmax(1)]
    return float((restricted == test.y).float().mean()), float((logits.argmax(1) == test.y).float().mean())


def finetune_pruned(pruned: Pruned, ds: Dataset, train: Split, s: Settings) -> None:
    if not s.epochs or not len(train):
        return
    spec = FitSpec(s.epochs, s.lr, s.batch, 0.9, 1e-4, "cosine", s.seed, "fp32")
    fit(pruned.model, ds, train, spec, make_optimizer(pruned.model.parameters(), spec), after_step=pruned.enforce)
    pruned.model.eval()


def simplify(cfg, out: Path, settings: Settings, ds: Dataset | None = None, model: nn.Module | None = None) -> Path:
    """The whole experiment → out/simplify.parquet, out/simplify.md, out/plots/simplify.png."""
    from .checkpoint import base_for
    model, ds = base_for(cfg, out, "simplify", ds, model)
    s = settings
    subsets = class_subsets(s, ds.num_classes)  # refuse bad classes before any work
    bn_after(model)  # and a model the slicer cannot trace
    rows, t_all = [], time.perf_counter()
    for si, classes in enumerate(subsets, 1):
        name = ",".join(map(str, classes))
        test = of_classes(ds.test, classes, None, s.seed)
        train = of_classes(ds.train, classes, s.finetune, s.seed)
        base_acc, _ = target_accuracy(model, ds, test, classes)
        counts, sliced, slice_s = (None, 0, 0.0)
        if "slice" in s.methods:
            counts, sliced, slice_s = slice_scores(model, ds, classes, s)
        for method in s.methods:
            for rate in s.rates:
                t0 = time.perf_counter()
                torch.manual_seed(s.seed)
                pruned = Pruned(copy.deepcopy(model), masks_for(model, method, rate, counts))
                before, _ = target_accuracy(pruned.model, ds, test, classes)
                finetune_pruned(pruned, ds, train, s)
                after, after_all = target_accuracy(pruned.model, ds, test, classes)
                rows.append({"subset": name, "method": method, "rate": rate, "kept": pruned.kept(),
                             "dead_channels": pruned.dead, "base_acc": base_acc, "acc_before": before,
                             "acc_after": after, "acc_after_all": after_all,
                             "sliced": sliced if method == "slice" else 0, "finetune_inputs": len(train),
                             "test_inputs": len(test), "slice_seconds": slice_s if method == "slice" else 0.0,
                             "seconds": time.perf_counter() - t0, "theta": s.theta, "seed": s.seed})
        line = "  ".join(f"{m} {sum(r['acc_after'] for r in rows[-len(s.methods) * len(s.rates):] if r['method'] == m) / len(s.rates):.3f}"
                         for m in s.methods)
        print(f"[simplify] subset {si}/{len(subsets)} ({name}): base {base_acc:.3f}; mean over r after fine-tune: "
              f"{line} ({time.perf_counter() - t_all:.0f} s)", file=sys.stderr, flush=True)
    path = out / "simplify.parquet"
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    _report(out, table.to_pandas(), s, len(subsets), time.perf_counter() - t_all)
    return path


def _report(out: Path, df, s: Settings, n_subsets: int, seconds: float) -> None:
    from matplotlib.figure import Figure
    means = df.groupby(["method", "rate"]).agg(kept=("kept", "mean"), before=("acc_before", "mean"),
                                                after=("acc_after", "mean"), after_std=("acc_after", "std"),
                                                after_all=("acc_after_all", "mean"), n=("subset", "count"))
    plots = out / rundir.PLOTS
    plots.mkdir(exist_ok=True)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for method in s.methods:
        if method in means.index.get_level_values(0):
            m = means.loc[method]
            ax.errorbar(m.index, m.after, yerr=m.after_std.fillna(0), marker="o", capsize=3, label=method)
    base = float(df.base_acc.groupby(df.subset).first().mean())
    ax.axhline(base, color="grey", linestyle=":", label=f"unpruned ({base:.3f})")
    ax.set_xlabel("fraction r of synapses removed per layer")
    ax.set_ylabel("target-class accuracy after fine-tune")
    ax.set_title(f"Class-targeted simplification ({n_subsets} subsets)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(plots / "simplify.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    k = sorted({len(x.split(",")) for x in df.subset})
    lines = ["# Class-targeted simplification (NNSlicer §5.2)", "",
             f"{n_subsets} class subsets of {', '.join(map(str, k))} classes; per layer (every Conv2d and Linear) the "
             f"fraction r of synapses with the lowest score is removed, then {s.epochs} fine-tune epoch(s) on at most "
             f"{s.finetune} target-class training inputs (lr {s.lr:g}). Accuracy: target-class test inputs, the "
             f"argmax restricted to the subset's classes (as in the paper). `slice`: contribution counts of "
             f"{s.samples} target-class training inputs per subset (criterion: the label; θ = {s.theta:g}); "
             f"`weight`: |w|; `channel`: whole output channels by mean |w| (the logits layer left whole). Unpruned: {base:.3f}. "
             f"Took {seconds:.0f} s.", "",
             "| method | r | kept | acc before fine-tune | acc after | ± (std over subsets) | acc after, all classes |",
             "|---|---|---|---|---|---|---|"]
    for (method, rate), r in means.iterrows():
        std = "–" if math.isnan(r.after_std) else f"{r.after_std:.3f}"
        lines.append(f"| {method} | {rate:g} | {r.kept:.3f} | {r.before:.3f} | {r.after:.3f} | {std} | "
                     f"{r.after_all:.3f} |")
    lines += ["", "The paper (CIFAR-10, 210 four-class subsets): slice-based removal keeps target-class accuracy above "
              "Weight and Channel at the same r.", "", "![simplification](plots/simplify.png)", ""]
    write_text(out / "simplify.md", "\n".join(lines))
