"""Experiment config: one YAML per experiment in `sweeps/`, parsed into dataclasses.

Every field has a docstring-style comment; `load_config` refuses unknown keys and collects *every* problem before
raising once, so a user fixes a config in one pass. The resolved config is written beside every output
(`config.yaml`) and checkpoints carry it too, so any result can be explained from its own folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import GradauthError

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
SCOPES = ("all", "bn", "head")
IMPORTANCES = ("bn_gamma", "slice")


@dataclass
class DataConfig:
    name: str = "digits"            # digits (ships with scikit-learn) | cifar10 | cifar100 | imagefolder
    root: str | None = None         # dataset folder; default $GRADAUTH_DATA/<name>; digits needs none
    download: bool = False          # let torchvision download CIFAR into root
    val_fraction: float = 0.1       # held out of the train split (seeded), for monitoring
    test_fraction: float = 0.3      # digits only: it has no official test split
    train_subset: int | None = None  # use only the first N (seeded shuffle) train images: CPU-sized runs
    test_subset: int | None = None   # likewise for the test split
    image_size: int = 32            # imagefolder only: images are resized to this square
    crop_pad: int = 4               # random-crop padding in pixels (0 = off)
    flip: bool = True               # random horizontal flip (off for digits: a mirrored 3 is not a 3)


@dataclass
class ModelConfig:
    arch: str = "vgg_tiny"          # vgg_tiny | vgg11/16/19 | resnet20/56 | densenet40 | torchvision:<name>
    width: float = 1.0              # channel multiplier: 0.5 halves every layer (CPU-sized runs)


@dataclass
class TrainConfig:
    epochs: int = 30
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 64
    schedule: str = "cosine"        # cosine | step (÷10 at 50 % and 75 % of the epochs)
    sparsity: float = 1e-4          # λ of network slimming: λ·sign(γ) added to every BN γ gradient
    gamma_max: float = 1.0          # clamp γ to [0, gamma_max] after each step ("a" in the paper)
    precision: str = "auto"         # auto (bf16 autocast + channels-last on a CUDA GPU with bf16, fp32 elsewhere) | fp32 | bf16


@dataclass
class ImportanceConfig:
    name: str = "bn_gamma"          # bn_gamma (|γ|) | slice (NNSlicer contributions)
    classes: list[int] | None = None  # slice only: slice from these classes (None: each input's predicted class)
    theta: float = 0.0              # slice only: θ granularity filter
    samples: int = 256              # slice only: inputs sliced

    @property
    def label(self) -> str:
        if self.name == "slice" and self.classes:
            return "slice[" + ",".join(map(str, self.classes)) + "]"
        return self.name


@dataclass
class LockConfig:
    mode: str = "rate"              # rate: fraction of all BN channels | threshold: score above t
    values: list[float] = field(default_factory=lambda: [0.1])


@dataclass
class FinetuneConfig:
    epochs: list[int] = field(default_factory=lambda: [3])
    lr: list[float] = field(default_factory=lambda: [0.01])
    data_fraction: list[float] = field(default_factory=lambda: [1.0])
    scope: list[str] = field(default_factory=lambda: ["all"])
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 1e-4
    precision: str = "auto"         # as train.precision, for every fine-tune trial


@dataclass
class SweepConfig:
    resources: dict = field(default_factory=lambda: {"cpu": 1, "gpu": 0})  # per trial; gpu may be fractional
    lock_bound: float | None = None  # locked accuracy above this: status unlockable (default chance + 0.1)
    max_concurrent: int | None = None  # None: as many as resources allow
    storage: str | None = None      # Tune storage_path (local, NFS, s3://, gs://); default <out>/ray
    max_failures: int = 2           # retries of a trial whose worker died (resumes from its last checkpoint)
    checkpoint_every: int = 1       # epochs between trial checkpoints (resume points if a worker dies) ...
    checkpoint_min_s: float = 20.0  # ... but at most one per this many seconds: short epochs aren't worth a save


@dataclass
class SelectConfig:
    levels: int = 3
    min_gap: float = 0.05
    targets: list[float] | None = None
    max_locked_acc: float | None = None  # default chance + 0.1


@dataclass
class ReleaseConfig:
    noise_init: bool = False        # public model: pruned channels re-initialised with noise instead of zeros


@dataclass
class Config:
    name: str = "experiment"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    importance: list[ImportanceConfig] = field(default_factory=lambda: [ImportanceConfig()])
    lock: LockConfig = field(default_factory=LockConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["importance"] = [dataclasses.asdict(i) for i in self.importance]
        return d

    def hash(self) -> str:
        return _digest(self.to_dict())

    def base_hash(self) -> str:
        """What the base model depends on (seed, data, model, train), so a changed lock, importance or schedule grid
        does not retrain it. Where the data lives (`root`, `download`) is not part of what it is."""
        d = self.to_dict()
        data = {k: v for k, v in d["data"].items() if k not in ("root", "download")}
        return _digest({"seed": d["seed"], "data": data, "model": d["model"], "train": d["train"]})


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _build(cls, raw: Any, where: str, problems: list[str]):
    """Dataclass from a mapping; unknown keys and wrong types are recorded in `problems`."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        problems.append(f"`{where}` must be a mapping, got {type(raw).__name__}")
        return cls()
    names = {f.name for f in fields(cls)}
    for k in raw:
        if k not in names:
            problems.append(f"unknown key `{where}.{k}` (known: {', '.join(sorted(names))})")
    obj = cls(**{k: v for k, v in raw.items() if k in names})
    for f in fields(cls):
        v = getattr(obj, f.name)
        if isinstance(f.default, (int, float)) and not isinstance(f.default, bool) and v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                problems.append(f"`{where}.{f.name}` must be a number, got {v!r}")
    return obj


def _as_list(v):
    return v if isinstance(v, list) else [v]


def _importances(raw: Any, problems: list[str]) -> list[ImportanceConfig]:
    out = []
    for item in _as_list(raw if raw is not None else "bn_gamma"):
        imp = ImportanceConfig(name=item) if isinstance(item, str) else _build(ImportanceConfig, item, "importance", problems)
        if imp.name not in IMPORTANCES:
            problems.append(f"`importance` {imp.name!r} is not one of {', '.join(IMPORTANCES)}")
        out.append(imp)
    return out


def _validate(c: Config, problems: list[str]) -> None:
    if c.data.name not in DATASETS:
        problems.append(f"`data.name` {c.data.name!r} is not one of {', '.join(DATASETS)}")
    if not 0 <= c.data.val_fraction < 1:
        problems.append("`data.val_fraction` must be in [0, 1)")
    if c.model.width <= 0:
        problems.append("`model.width` must be > 0")
    if c.lock.mode not in ("rate", "threshold"):
        problems.append(f"`lock.mode` must be `rate` or `threshold`, got {c.lock.mode!r}")
    c.lock.values = _as_list(c.lock.values)
    if not c.lock.values:
        problems.append("`lock.values` is empty: give at least one lock rate or threshold")
    for v in c.lock.values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            problems.append(f"`lock.values` entry {v!r} is not a number")
        elif c.lock.mode == "rate" and not 0 < v < 1:
            problems.append(f"lock rate {v} is outside (0, 1): rates are fractions of all BN channels, e.g. 0.02 for 2 %")
    ft = c.finetune
    for name in ("epochs", "lr", "data_fraction", "scope", "seeds"):
        setattr(ft, name, _as_list(getattr(ft, name)))
        if not getattr(ft, name):
            problems.append(f"`finetune.{name}` is empty: the search space needs at least one value")
    problems += [f"`finetune.data_fraction` {f} is outside (0, 1]" for f in ft.data_fraction if not 0 < f <= 1]
    problems += [f"`finetune.scope` {s!r} is not one of {', '.join(SCOPES)}" for s in ft.scope if s not in SCOPES]
    problems += [f"`finetune.epochs` {e!r} must be a whole number ≥ 0" for e in ft.epochs if not isinstance(e, int) or e < 0]
    for where, p in (("train", c.train.precision), ("finetune", c.finetune.precision)):
        if p not in PRECISIONS:
            problems.append(f"`{where}.precision` {p!r} is not one of {', '.join(PRECISIONS)}")
    res = c.sweep.resources
    if not isinstance(res, dict) or set(res) - {"cpu", "gpu"}:
        problems.append("`sweep.resources` must be a mapping with keys cpu and gpu, e.g. {cpu: 1, gpu: 0.25}")
    if c.select.targets is not None and len(c.select.targets) != c.select.levels:
        problems.append(f"`select.targets` has {len(c.select.targets)} values but `select.levels` is {c.select.levels}")


PRECISIONS = ("auto", "fp32", "bf16")
TOP_LEVEL = {"name", "seed", "data", "model", "train", "importance", "lock", "finetune", "sweep", "select", "release"}


def parse_config(raw: Any, source: str = "config") -> Config:
    """Config from a parsed YAML mapping; raises one GradauthError listing every problem."""
    if not isinstance(raw, dict):
        raise GradauthError(f"{source}: the config must be a YAML mapping with keys {', '.join(sorted(TOP_LEVEL))}")
    problems = [f"unknown key `{k}` (known: {', '.join(sorted(TOP_LEVEL))})" for k in raw if k not in TOP_LEVEL]
    sections = {
        "data": DataConfig, "model": ModelConfig, "train": TrainConfig, "lock": LockConfig,
        "finetune": FinetuneConfig, "sweep": SweepConfig, "select": SelectConfig, "release": ReleaseConfig,
    }
    kwargs = {k: _build(cls, raw.get(k), k, problems) for k, cls in sections.items()}
    cfg = Config(name=str(raw.get("name", "experiment")), seed=int(raw.get("seed", 0)),
                 importance=_importances(raw.get("importance"), problems), **kwargs)
    if not problems:
        _validate(cfg, problems)
    if problems:
        raise GradauthError(f"{source}: " + "; ".join(problems))
    return cfg


def load_config(path: str | Path) -> Config:
    import yaml  # here, not at the top: `gradauth bench gpu` imports this module on machines without PyYAML
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise GradauthError(f"config file {path} not found: pass a YAML from sweeps/, e.g. sweeps/quickstart.yaml")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise GradauthError(f"{path}: not valid YAML{at}: fix the syntax")
    return parse_config(raw, str(path))


def dump_config(cfg: Config) -> str:
    import yaml
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
