"""Slicing as a pipeline stage: channel scores for the lock (`importance: slice`) and `slices.parquet`.

Both read the dataset the same way: a seeded subset of the train split profiles the model, and up to `samples`
inputs of the validation split (train if there is none) are sliced. With classes, only inputs of those classes
are sliced, each from its own label's logit, so a level can be made to lose exactly those classes.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn as nn

from .. import rundir
from ..config import Config, ImportanceConfig
from ..data import Dataset, Split, normalize
from ..errors import GradauthError
from ..fsutil import atomic_path
from ..models import bn_layers
from .slicer import slice_partial
from .graph import Plan
from .vectorized import Partial

PROFILE_SAMPLES = 512  # train images whose mean activations define Δ; more changes the means by < 1 %
SEED = 0

SCHEMA = pa.schema([("layer", pa.string()), ("channel", pa.int64()), ("class", pa.int64()),
                    ("contribution", pa.float64()), ("inputs", pa.int64())])


def _cpu_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).cpu().eval()


def profile_inputs(ds: Dataset, n: int = PROFILE_SAMPLES) -> torch.Tensor:
    return normalize(ds.train.subset(n, SEED).x.cpu(), ds.mean, ds.std)


def sliced_inputs(ds: Dataset, samples: int, classes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised inputs, labels): up to `samples` of them, restricted to `classes` when given."""
    split: Split = ds.val if len(ds.val) else ds.train
    x, y = split.x.cpu(), split.y.cpu()
    if classes:
        bad = [c for c in classes if not 0 <= c < ds.num_classes]
        if bad:
            raise GradauthError(f"importance classes {bad} are not classes of {ds.name} (0…{ds.num_classes - 1})")
        pick = torch.isin(y, torch.tensor(classes))
        x, y = x[pick], y[pick]
    if not len(y):
        raise GradauthError(f"no {ds.name} inputs of classes {classes} to slice: choose classes present in the data")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SEED))[:samples]
    return normalize(x[order], ds.mean, ds.std), y[order]


def channel_importance(model: nn.Module, ds: Dataset, classes=None, theta: float = 0.0,
                       samples: int = 256) -> dict[str, torch.Tensor]:
    """Σ |CONTRIB| per channel of every BN output: the `slice` importance source (higher = more important)."""
    model = _cpu_copy(model)
    x, y = sliced_inputs(ds, samples, classes)
    part = slice_partial(model, profile_inputs(ds), x, theta, y if classes else None)
    return {name: part.channels[name].double() for name in bn_layers(model)}


def _present(ds: Dataset, classes: list[int]) -> list[int]:
    """The configured classes that have inputs to slice (a class absent from the split gets no rows)."""
    split = ds.val if len(ds.val) else ds.train
    sliced_inputs(ds, 1, classes)  # validates the class numbers
    return [c for c in classes if bool((split.y == c).any())]


def _slice_config(cfg: Config) -> ImportanceConfig:
    return next((i for i in cfg.importance if i.name == "slice"), ImportanceConfig(name="slice"))


def ray_running() -> bool:
    ray = sys.modules.get("ray")  # never import ray just to ask: a plain run should not pay for it
    return bool(ray is not None and ray.is_initialized())


def rows(part: Partial, cls: int) -> dict[str, list]:
    out: dict[str, list] = {k: [] for k in SCHEMA.names}
    for layer, ch in part.channels.items():
        out["layer"] += [layer] * len(ch)
        out["channel"] += list(range(len(ch)))
        out["class"] += [cls] * len(ch)
        out["contribution"] += ch.double().tolist()
        out["inputs"] += [part.inputs] * len(ch)
    return out


def run_slice(cfg: Config, out_dir: Path, base_model: nn.Module, ds: Dataset, use_ray: bool | None = None) -> Path:
    """slices.parquet: Σ |CONTRIB| per channel of every leaf module, per class (or class -1: predicted)."""
    imp = _slice_config(cfg)
    model = _cpu_copy(base_model)
    plan = Plan(model)  # refuse an unsupported model before touching data
    prof = profile_inputs(ds)
    use_ray = ray_running() if use_ray is None else use_ray
    if use_ray:
        from .distributed import slice_ray

        def run(x, target):
            return slice_ray(model, prof, x, imp.theta, target)
    else:
        def run(x, target):
            return slice_partial(model, prof, x, imp.theta, target, plan=plan)
    table: dict[str, list] = {k: [] for k in SCHEMA.names}
    for cls in _present(ds, imp.classes) if imp.classes else [None]:
        x, y = sliced_inputs(ds, imp.samples, [cls] if cls is not None else None)
        for k, v in rows(run(x, cls), -1 if cls is None else cls).items():
            table[k] += v
    path = Path(out_dir) / rundir.SLICES
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(table, schema=SCHEMA), tmp)
    return path
