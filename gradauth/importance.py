"""Importance criteria: registered functions `fn(model, ds, **settings) -> {bn_name: score per channel}`.

Higher score = more important. The lock removes the highest-scoring channels, ranked globally across layers.
`bn_gamma` is |γ| (network slimming); `slice` sums NNSlicer contributions of each BN channel over inputs. Both are
registered below exactly as a user's own criterion would be (`gradauth.register_importance`, see registry.py):
a criterion's settings are a dataclass of `setting(...)` fields that the config checks and passes to it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .config import ImportanceConfig, setting
from .data import Dataset
from .errors import GradauthError
from .models import bn_layers
from .registry import importance as _entry
from .registry import register_importance

Scores = dict[str, torch.Tensor]
Importance = Callable[[nn.Module, Dataset], Scores]


@register_importance("bn_gamma", _builtin=True)
def bn_gamma(model: nn.Module, ds: Dataset | None = None) -> Scores:
    return {name: bn.weight.detach().abs().cpu().clone() for name, bn in bn_layers(model).items()}


@dataclass
class SliceSettings:
    classes: list[int] | None = setting(None, "int", many=True, optional=True, lo=0, unique=True,
                                        empty="list class numbers, or leave `classes` out to slice each input's "
                                              "predicted class")  # slice from these classes (None: each input's predicted class)
    theta: float = setting(0.0, "float", lo=0)             # θ granularity filter
    samples: int = setting(256, "int", lo=1)               # inputs sliced


def _slice_label(s: SliceSettings) -> str:
    return "slice[" + ",".join(map(str, s.classes)) + "]" if s.classes else "slice"


def _slice_classes_problem(s: SliceSettings, ds: Dataset) -> str | None:
    bad = [c for c in s.classes or [] if c >= ds.num_classes]
    if bad:
        return f"names classes {bad}, but {ds.name} has classes 0…{ds.num_classes - 1}: use those"
    return None


@register_importance("slice", settings=SliceSettings, label=_slice_label, check_data=_slice_classes_problem,
                     _builtin=True)
def slice_scores(model: nn.Module, ds: Dataset, classes=None, theta: float = 0.0, samples: int = 256) -> Scores:
    from .slicing import channel_importance  # torch.fx machinery, loaded only when asked for
    return channel_importance(model, ds, classes=classes, theta=theta, samples=samples)


def get_importance(cfg: ImportanceConfig) -> Importance:
    """The registered criterion of `cfg`, with its settings bound: `score(model, ds) -> Scores`."""
    entry = _entry(cfg.name)
    kwargs = {f.name: getattr(cfg.settings, f.name) for f in dataclasses.fields(cfg.settings)} \
        if cfg.settings is not None else {}

    def score(model: nn.Module, ds: Dataset) -> Scores:
        return _checked(cfg.label, entry.fn(model, ds, **kwargs), model)
    return score


def _checked(label: str, scores, model: nn.Module) -> Scores:
    """A criterion's answer, refused in one line unless it is one finite score per channel of every BatchNorm."""
    bns = bn_layers(model)
    fix = f"importance {label} must return {{bn name: 1-d tensor, one finite score per channel}} for every BatchNorm"
    if not isinstance(scores, dict) or set(scores) != set(bns):
        got = sorted(map(str, scores))[:4] if isinstance(scores, dict) else type(scores).__name__
        raise GradauthError(f"{fix}: expected {len(bns)} layers ({', '.join(list(bns)[:4])}, …), got {got}")
    for name, bn in bns.items():
        s = scores[name]
        if not isinstance(s, torch.Tensor) or s.shape != (bn.num_features,) or not torch.isfinite(s).all():
            what = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise GradauthError(f"{fix}: {name} has {bn.num_features} channels, got {what}"
                                f"{' with NaN/inf' if isinstance(s, torch.Tensor) and s.shape == (bn.num_features,) else ''}")
    return {name: scores[name] for name in bns}
