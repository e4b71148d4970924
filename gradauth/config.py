"""Experiment config: one YAML per experiment in `sweeps/`, parsed into dataclasses.

Every field carries its rule as metadata (`Rule`: type, range, choices, extra check), and `parse_config` checks
every field against it before anything runs: unknown keys, wrong types (a boolean given as the string 'no', a
fractional epoch count, a number given as text), out-of-range values, NaN and infinity, and names outside their
choices. `load_config` also refuses duplicate YAML keys, files that are not UTF-8 text, directories and empty files.
Every problem is collected and raised once, in one `GradauthError`, so a user fixes a config in one pass. Choices
come from one place each: the tuples below, and for datasets, architectures and importance criteria the registries
(`gradauth/registry.py`), read when checking. Each importance criterion declares its own settings (a dataclass of
`setting(...)` fields) that the config checks and passes to it. The resolved config is written beside every output (`config.yaml`) and checkpoints
carry it too, so any result can be explained from its own folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .errors import GradauthError
from .rules import Rule, opt, setting  # noqa: F401 (the field rules live in rules.py; re-exported here)

SCOPES = ("all", "bn", "head")
PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULES = ("cosine", "step")
LOCK_MODES = ("rate", "threshold")
GRANULARITIES = ("channel", "synapse")  # lock.granularity: BN channels | conv/linear weights (NNSlicer's protection)
# What ranks synapses for a synapse lock: slice (per-weight contribution counts from the exact slicer, with the slice
# entry's settings), weight (|w|), random (seeded by the config's seed). weight and random rank synapses only: they
# are not channel criteria and are not in the importance registry (a plugin may register its own of those names).
SYNAPSE_IMPORTANCE = ("slice", "weight", "random")
INT_MAX = 2**31 - 1              # any count beyond this is a typo (and would overflow torch's int64 index arithmetic)
SEED_MAX = 2**32 - 1            # numpy's limit; trial generators multiply seeds, so keep them well inside int64


def _registered(kind: str) -> Callable[[], tuple]:
    def choices() -> tuple:
        from . import registry  # the built-ins' modules (torch) load only when a config is checked
        return registry.names(kind)
    return choices


def _arch_problem(arch: str) -> str | None:
    from .registry import arch_problem  # torch is imported only when a config names an arch
    return arch_problem(arch)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _name_problem(name: str) -> str | None:
    if not _NAME.fullmatch(name):
        return (f"{name!r} is not a plain name: it names the output folder results/<name>, so use letters, digits, "
                f"'.', '_' and '-' (not starting with '.' or '-'), at most 100")
    return None


FRACTION = dict(lo=0, hi=1)


@dataclass
class DataConfig:
    name: str = opt("digits", "str", choices=_registered("dataset"))  # digits (ships with scikit-learn) | cifar10 | cifar100 | imagefolder | any registered
    root: str | None = opt(None, "str", optional=True)  # dataset folder; default $GRADAUTH_DATA/<name>; digits needs none
    download: bool = opt(False, "bool")                 # let torchvision download CIFAR into root
    val_fraction: float = opt(0.1, "float", lo=0, hi=1, hi_open=True)  # held out of the train split (seeded), for monitoring
    test_fraction: float = opt(0.3, "float", lo=0, hi=1, lo_open=True, hi_open=True)  # digits only: it has no official test split
    train_subset: int | None = opt(None, "int", optional=True, lo=1)  # use only the first N (seeded shuffle) train images: CPU-sized runs
    test_subset: int | None = opt(None, "int", optional=True, lo=1)   # likewise for the test split
    image_size: int = opt(32, "int", lo=1)              # imagefolder only: images are resized to this square
    crop_pad: int = opt(4, "int", lo=0)                 # random-crop padding in pixels (0 = off)
    flip: bool = opt(True, "bool")                      # random horizontal flip (off for digits: a mirrored 3 is not a 3)


@dataclass
class ModelConfig:
    arch: str = opt("vgg_tiny", "str", check=_arch_problem)  # vgg_tiny | vgg11/16/19 | resnet20/56 | densenet40 | torchvision:<name> | any registered
    width: float = opt(1.0, "float", lo=0, lo_open=True)     # channel multiplier: 0.5 halves every layer (CPU-sized runs)


@dataclass
class TrainConfig:
    epochs: int = opt(30, "int", lo=1)
    lr: float = opt(0.1, "float", lo=0, lo_open=True)
    momentum: float = opt(0.9, "float", lo=0, hi=1, lo_open=True, hi_open=True)  # Nesterov SGD needs momentum > 0
    weight_decay: float = opt(1e-4, "float", lo=0)
    batch_size: int = opt(64, "int", lo=1)
    schedule: str = opt("cosine", "str", choices=lambda: SCHEDULES)  # cosine | step (÷10 at 50 % and 75 % of the epochs)
    sparsity: float = opt(1e-4, "float", lo=0)       # λ of network slimming: λ·sign(γ) added to every BN γ gradient
    gamma_max: float = opt(1.0, "float", lo=0, lo_open=True)  # clamp γ to [0, gamma_max] after each step ("a" in the paper)
    precision: str = opt("auto", "str", choices=lambda: PRECISIONS)  # auto (bf16 autocast + channels-last on a CUDA GPU with bf16, fp32 elsewhere) | fp32 | bf16


DEFAULT_IMPORTANCE = "bn_gamma"

# Before each criterion owned its settings, every importance entry carried slice's three, so a resolved bn_gamma entry
# reads {name: bn_gamma, classes: null, theta: 0.0, samples: 256}, and the hashes of committed results include those
# keys. bn_gamma keeps writing them, and accepts them back at exactly these values; nothing else uses this table.
FROZEN_KEYS = {"bn_gamma": {"classes": None, "theta": 0.0, "samples": 256}}


@dataclass(frozen=True)
class _SynapseOnly:
    """The entry of a synapse-only importance (weight, random): no settings, labelled by its name."""
    name: str
    fn: Any = None
    settings: Any = None
    label: Any = None
    check_data: Any = None


def importance_entry(name: str):
    """The registered criterion `name`, or the entry of a synapse-only importance (weight, random)."""
    from . import registry
    if name in SYNAPSE_IMPORTANCE and name not in registry.names("importance"):
        return _SynapseOnly(name)
    return registry.importance(name)


_importance_entry = importance_entry


def _default_settings(name: str):
    cls = _importance_entry(name).settings
    return cls() if cls is not None else None


@dataclass
class ImportanceConfig:
    """One importance source: a registered criterion's name and its settings (an instance of the settings dataclass
    the criterion registered, None if it has none). Settings read as attributes (`imp.samples`); assigning a new
    `name` gives that criterion's default settings, so the two always belong together."""
    name: str = opt(DEFAULT_IMPORTANCE, "str", choices=_registered("importance"))  # bn_gamma (|γ|) | slice (NNSlicer contributions) | any registered
    settings: Any = opt(None, "settings", optional=True)  # checked by the criterion's own rules (its dataclass)

    def __post_init__(self):
        cls = _importance_entry(self.name).settings
        if self.settings is None and cls is not None:
            object.__setattr__(self, "settings", cls())
        elif cls is None and self.settings is not None or cls is not None and not isinstance(self.settings, cls):
            raise GradauthError(f"importance {self.name}: settings must be "
                                f"{'None' if cls is None else cls.__name__}, got {self.settings!r}")

    def _setting_names(self) -> tuple:
        s = self.__dict__.get("settings")
        return tuple(f.name for f in fields(s)) if s is not None else ()

    def __getattr__(self, key):  # only for names that are not attributes: the criterion's settings
        if key in self._setting_names():
            return getattr(self.__dict__["settings"], key)
        raise AttributeError(f"importance {self.__dict__.get('name')!r} has no setting {key!r}")

    def __setattr__(self, key, value):
        if key == "name" and "settings" in self.__dict__:
            object.__setattr__(self, "name", value)
            object.__setattr__(self, "settings", _default_settings(value))
        elif key in ("name", "settings"):
            object.__setattr__(self, key, value)
        elif key in self._setting_names():
            setattr(self.__dict__["settings"], key, value)
        else:
            raise AttributeError(f"importance {self.__dict__.get('name')!r} has no setting {key!r}")

    @property
    def label(self) -> str:
        """How trial ids, tables and plots name this source (the criterion's `label`; default: its name)."""
        entry = _importance_entry(self.name)
        return entry.label(self.settings) if entry.label else self.name

    def to_dict(self) -> dict:
        own = dataclasses.asdict(self.settings) if self.settings is not None else {}
        return {"name": self.name, **FROZEN_KEYS.get(self.name, {}), **own}


@dataclass
class LockConfig:
    mode: str = opt("rate", "str", choices=lambda: LOCK_MODES)  # rate: fraction of all BN channels | threshold: score above t
    values: list[float] = opt([0.1], "float", many=True, unique=True,
                              empty="give at least one lock rate or threshold")
    granularity: str = opt("channel", "str", choices=lambda: GRANULARITIES)  # channel | synapse: hide the top `rate` of every conv/linear layer's weights by importance slice, weight or random


GRID = "the search space needs at least one value"


@dataclass
class FinetuneConfig:
    epochs: list[int] = opt([3], "int", many=True, lo=0, unique=True, empty=GRID)
    lr: list[float] = opt([0.01], "float", many=True, lo=0, lo_open=True, unique=True, empty=GRID)
    data_fraction: list[float] = opt([1.0], "float", many=True, lo=0, hi=1, lo_open=True, unique=True, empty=GRID)
    scope: list[str] = opt(["all"], "str", many=True, choices=lambda: SCOPES, unique=True, empty=GRID)
    seeds: list[int] = opt([0], "int", many=True, lo=0, hi=SEED_MAX, unique=True, empty=GRID)
    batch_size: int = opt(64, "int", lo=1)
    momentum: float = opt(0.9, "float", lo=0, hi=1, lo_open=True, hi_open=True)
    weight_decay: float = opt(1e-4, "float", lo=0)
    precision: str = opt("auto", "str", choices=lambda: PRECISIONS)  # as train.precision, for every fine-tune trial


def _with_knob_lists(base):
    """`base` plus one list field per Schedule knob (knobs.py) whose `config` list `base` does not declare itself, its
    values checked by the knob's `rule` (a knob's default is its list's default), so a knob added to Schedule is a
    swept `finetune.<config>` list with no edit here. The knobs declared above keep their own fields and comments."""
    from .knobs import Schedule, knobs
    have = {f.name: f for f in fields(base)}
    for f, m in knobs(Schedule):
        if m["config"] in have and not have[m["config"]].metadata["rule"].many:
            raise TypeError(f"Schedule.{f.name}: finetune.{m['config']} is not a list; name its config list otherwise")
    extra = [(m["config"], list, opt([f.default], m["kind"], many=True, unique=True, empty=GRID, **m["rule"]))
             for f, m in knobs(Schedule) if m["config"] and m["config"] not in have]
    return dataclasses.make_dataclass(base.__name__, extra, bases=(base,), namespace={"__module__": __name__}) \
        if extra else base


FinetuneConfig = _with_knob_lists(FinetuneConfig)


@dataclass
class SweepConfig:
    resources: dict = opt({"cpu": 1, "gpu": 0}, "resources")  # per trial; gpu may be fractional
    lock_bound: float | None = opt(None, "float", optional=True, **FRACTION)  # locked accuracy above this: status unlockable (default chance + 0.1)
    max_concurrent: int | None = opt(None, "int", optional=True, lo=1)  # None: as many as resources allow
    storage: str | None = opt(None, "str", optional=True)  # Tune storage_path (local, NFS, s3://, gs://); default <out>/ray
    max_failures: int = opt(2, "int", lo=-1)           # retries of a trial whose worker died (resumes from its last checkpoint); -1: forever
    checkpoint_every: int = opt(1, "int", lo=1)        # epochs between trial checkpoints (resume points if a worker dies) ...
    checkpoint_min_s: float = opt(20.0, "float", lo=0)  # ... but at most one per this many seconds: short epochs aren't worth a save
    pack: Any = opt(1, "pack")  # grid points per Tune trial: 1 (off) | N | auto (sized so a trial runs ~pack_seconds): for trials shorter than ~5 s (Tune costs ~0.5 s each)
    pack_seconds: float = opt(30.0, "float", lo=0, lo_open=True)  # pack: auto aims each Tune trial at this many seconds (Tune's ~0.5 s per trial: < 2 %)


@dataclass
class SelectConfig:
    levels: int = opt(3, "int", lo=1)
    min_gap: float = opt(0.05, "float", lo=0, hi=1, hi_open=True)
    targets: list[float] | None = opt(None, "float", many=True, optional=True, **FRACTION)
    max_locked_acc: float | None = opt(None, "float", optional=True, **FRACTION)  # default chance + 0.1


@dataclass
class ReleaseConfig:
    noise_init: bool = opt(False, "bool")  # public model: pruned channels re-initialised with noise instead of zeros
    # public model: the classifier head (every nn.Linear) redrawn at random. The trained head maps the base's features
    # to classes; a thief who revives the locked channels keeps it for free (release.erase_head).
    erase_head: bool = opt(False, "bool")


# ---- detect: `gradauth detect` (detect.py), NNSlicer's adversarial-input detection -----------------------------
# The attack names are plain text, checked here (no torch, no Foolbox): detect.py runs them.
ATTACK_NAMES = ("FGSM", "PGD", "DeepFool-L2", "DeepFool-Linf", "CW-L2", "Boundary", "Spatial", "PointWise",
                "GaussianBlur")
NOT_IN_FOOLBOX = ("JSMA", "ADef", "SinglePixel", "LocalSearch")
DEFAULT_ATTACKS = "FGSM:0.0078,0.0157,0.0314;PGD:0.0078,0.0157,0.0314;DeepFool-L2;DeepFool-Linf;CW-L2;Boundary;" \
                  "Spatial;PointWise;GaussianBlur"  # the paper's 13 that Foolbox 3 has, ε 2/4/8 of 255
FEATURES = ("channel", "neuron")


def parse_attacks(text: str) -> list[tuple[str, float | None]]:
    """"FGSM:0.03,0.06;DeepFool-L2" -> [("FGSM", 0.03), ("FGSM", 0.06), ("DeepFool-L2", None)]."""
    known = {n.lower(): n for n in ATTACK_NAMES}
    out = []
    if not isinstance(text, str) or not text.strip():
        raise GradauthError(f"detect attacks {text!r}: give NAME[:ε,ε…] separated by ';', e.g. 'FGSM:0.03;CW-L2'")
    for part in text.split(";"):
        if not part.strip():
            continue
        name, _, eps = part.partition(":")
        name = name.strip()
        if name.lower() not in known:
            extra = f" ({name} is not in Foolbox 3.3.4)" if name.lower() in {n.lower() for n in NOT_IN_FOOLBOX} else ""
            raise GradauthError(f"unknown attack {name!r}{extra}: choose from {', '.join(ATTACK_NAMES)}")
        name = known[name.lower()]
        fixed = name in ("FGSM", "PGD")
        if not eps.strip():
            if fixed:
                raise GradauthError(f"attack {name} needs ε, e.g. '{name}:0.03' (ε in [0, 1] pixel units)")
            out.append((name, None))
            continue
        if not fixed:
            raise GradauthError(f"attack {name} is a minimisation attack and takes no ε: write just '{name}'")
        for e in eps.split(","):
            try:
                v = float(e)
            except ValueError:
                raise GradauthError(f"attack {name}: ε {e.strip()!r} is not a number (ε in (0, 1] pixel units)")
            if not (0 < v <= 1) or math.isnan(v):
                raise GradauthError(f"attack {name}: ε {v:g} is outside the data's range: pixels are in [0, 1], so "
                                    "ε must be in (0, 1] (the paper's 2/255 is 0.0078)")
            out.append((name, v))
    if not out:
        raise GradauthError("detect attacks: none given; e.g. 'FGSM:0.03;CW-L2'")
    return out


def _problem_of(parse):
    """A field check (`opt(check=…)`) from a parser that raises GradauthError: its one line, or None."""
    def problem(text: str) -> str | None:
        try:
            parse(text)
        except GradauthError as e:
            return str(e)
        return None
    return problem


@dataclass
class DetectConfig:
    """`gradauth detect` only (detect.py): its settings (`detect.Settings` is this class)."""
    normal: int = opt(1000, "int", lo=2)     # normal training inputs the classifiers learn from (≥ 2: more than one class)
    clean: int = opt(200, "int", lo=1)       # correctly classified test inputs for the false-positive rate
    attacks: str = opt(DEFAULT_ATTACKS, "str", check=_problem_of(parse_attacks))  # "NAME[:ε,ε…];NAME…" (ε in [0, 1] pixel units, fixed-size attacks only)
    samples: int = opt(100, "int", lo=1)     # per attack (and ε): at most this many inputs attacked
    seconds: float = opt(120.0, "float", lo=0, lo_open=True)  # per attack (and ε): no new batch after this
    features: str = opt("channel", "str", choices=lambda: FEATURES)  # channel: Σ|CONTRIB| per channel | neuron: every neuron's CONTRIB
    theta: float = opt(0.3, "float", lo=0)   # NNSlicer's θ; at θ = 0 the slice gives the criterion class away (see detect.md)
    seed: int = opt(0, "int", lo=0, hi=SEED_MAX)
    batch: int = opt(32, "int", lo=1)
    trees: int = opt(100, "int", lo=1)       # forest size


# ---- simplify: `gradauth simplify` (simplify.py), NNSlicer's class-targeted simplification ------------------------
SIMPLIFY_METHODS = ("slice", "weight", "channel")


def parse_classes(text: str) -> tuple[int, ...]:
    """"0,3,5,8" -> (0, 3, 5, 8): one class subset, class numbers (0…classes−1), each once, at least two."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        classes = tuple(int(p) for p in parts)
    except ValueError:
        raise GradauthError(f"class subset {text!r} is not a list of class numbers: write e.g. '0,3,5,8'")
    if any(c < 0 for c in classes):
        raise GradauthError(f"class subset {text!r} names a negative class: classes are numbered from 0")
    if len(set(classes)) != len(classes):
        raise GradauthError(f"class subset {text!r} names a class more than once: give each class once")
    if len(classes) < 2:
        raise GradauthError(f"class subset {text!r} has {len(classes)} class: classification needs at least 2")
    return classes


@dataclass
class SimplifyConfig:
    """`gradauth simplify` only (simplify.py): class subsets, removal rates and the fine-tune."""
    k: int = opt(4, "int", lo=2)                # classes per subset (the paper: 4 of CIFAR-10's 10)
    subsets: int = opt(10, "int", lo=1)         # seeded sample of the k-class subsets (all of them when fewer exist)
    classes: list[str] | None = opt(None, "str", many=True, optional=True, unique=True, check=_problem_of(parse_classes))  # explicit subsets, e.g. ['0,1,2,3', '3,5,7,9'], instead of k and subsets
    rates: list[float] = opt([0.5, 0.7, 0.9], "float", many=True, lo=0, hi=1, lo_open=True, hi_open=True,
                             unique=True, empty="give at least one removal rate in (0, 1)")  # fraction r of synapses removed per layer
    methods: list[str] = opt(list(SIMPLIFY_METHODS), "str", many=True, choices=lambda: SIMPLIFY_METHODS, unique=True,
                             empty="give at least one method")  # slice (NNSlicer) | weight (lowest |w|) | channel (lowest mean |w| per channel)
    samples: int = opt(200, "int", lo=1)        # target-class training inputs sliced per subset
    theta: float = opt(0.3, "float", lo=0)      # NNSlicer's θ for the slices (at 0 a count does not see a weight's size)
    finetune: int = opt(1000, "int", lo=0)      # at most this many target-class training inputs for the fine-tune (0: none)
    epochs: int = opt(1, "int", lo=0)           # fine-tune epochs over them (the paper: 1)
    lr: float = opt(0.001, "float", lo=0, lo_open=True)  # 0.01 wrecks even the unpruned quickstart model on 4 classes
    batch: int = opt(64, "int", lo=1)
    seed: int = opt(0, "int", lo=0, hi=SEED_MAX)


_SEARCH_EPS = 1e-9


# ---- search: the owner's intent for a targeted search (gradauth/search.py) ----------------------------------
THIEF_FORMS = ("zeros", "revive")   # search.thief.forms → the thief_init column: zeros → none, revive → revive
@dataclass
class ThiefBudget:
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1])  # of the labelled training split
    epochs: int = 30               # the thief's schedule on every fraction
    lr: float | None = None        # None: the search's largest lr
    seeds: int = 1
    # The public-lock candidates the thief is run on (release picks one of them): strongest = the strongest lockable
    # lock of the curve | levels = that and every hit level's lock | a list of lock values (e.g. [0.3, 0.5, 0.7]:
    # the public model's lock is chosen for protection alone, so it may lock far more than any level).
    public_locks: str | list = "strongest"
    # How the thief starts from the public model: zeros = as `gradauth release` writes it (locked γ/β zero, filters
    # erased); revive = the careful thief who resets the visible zeros (attack.py's `revive`). Each is a thief trial.
    forms: list = field(default_factory=lambda: ["zeros", "revive"])

    def trials(self) -> int:
        """The fewest thief trials: per fraction and seed, one from scratch and one per public lock and form."""
        pub = len(self.public_locks) if isinstance(self.public_locks, list) else 1
        return len(self.fractions) * self.seeds * (1 + pub * len(self.forms))


@dataclass
class SearchConfig:
    """The owner's intent: the `search:` config section (search.py runs it)."""
    mode: str = "grid"             # grid: today's sweep | targeted: this module
    levels: int = 3
    targets: list[float] | None = None   # absolute accuracies, level 1 first; None: relative to the base:
    below_base: float = 0.01       # level 1 = base_acc − below_base ...
    step: float = 0.08             # ... and each next level `step` lower
    tolerance: float = 0.01        # a level hits its target when |mean fine_acc − target| ≤ tolerance
    seeds: int = 2                 # seeds per level (spent only on candidates within tolerance)
    max_trials: int | None = None  # trial budget (curve tasks and thief trials count)
    max_trial_seconds: float | None = None  # summed trial seconds; in-flight trials still finish
    max_concurrent: int = 4        # trials in flight at once
    lock_range: list[float] = field(default_factory=lambda: [0.01, 0.3])  # [lowest, highest] lock value
    lock_points: int = 12          # lock values per curve task
    lock_step: float | None = None  # threshold mode: resolution of lock values (rate mode: one channel)
    epochs: list[int] = field(default_factory=lambda: [1, 16])  # [fewest, most] fine-tune epochs
    lr: list[float] = field(default_factory=lambda: [0.01])
    data_fraction: list[float] = field(default_factory=lambda: [1.0])
    scope: list[str] = field(default_factory=lambda: ["all"])
    thief: ThiefBudget = field(default_factory=ThiefBudget)

    @classmethod
    def from_dict(cls, raw: dict | None) -> "SearchConfig":
        if raw is not None and not isinstance(raw, dict):
            raise GradauthError(f"`search` must be a mapping, got {type(raw).__name__}: e.g. {{mode: targeted, levels: 3}}")
        raw = dict(raw or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise GradauthError(f"unknown key `search.{unknown[0]}` (known: {', '.join(sorted(names))})")
        thief = raw.pop("thief", None)
        if thief is not None and not isinstance(thief, (dict, ThiefBudget)):
            raise GradauthError("`search.thief` must be a mapping, e.g. {fractions: [0.01, 0.05, 0.1], epochs: 30}")
        if isinstance(thief, dict):
            tn = {f.name for f in fields(ThiefBudget)}
            bad = sorted(set(thief) - tn)
            if bad:
                raise GradauthError(f"unknown key `search.thief.{bad[0]}` (known: {', '.join(sorted(tn))})")
            thief = ThiefBudget(**thief)
        return cls(**raw, thief=thief or ThiefBudget())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------------------------------------- validation
    def resolve_targets(self, base_acc: float) -> list[float]:
        if self.targets is not None:
            return [float(t) for t in self.targets]
        return [round(base_acc - self.below_base - k * self.step, 6) for k in range(self.levels)]

    def min_trials(self) -> int:
        """The fewest trials any successful search needs: two curve tasks, one probe and the seeds of each level,
        the thief trials (scratch and public at each fraction)."""
        th = self.thief
        return 2 + self.levels * self.seeds + th.trials()

    def validate(self, base_acc: float, lock_bound: float, min_gap: float, lock_mode: str = "rate") -> list[float]:
        """Refuse an infeasible intent up front with one GradauthError line; returns the absolute targets."""
        def no(msg):
            raise GradauthError(f"search: {msg}")
        if self.mode not in ("grid", "targeted"):
            no(f"`search.mode` must be grid or targeted, got {self.mode!r}")
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 1:
            no(f"`search.levels` must be a whole number ≥ 1, got {self.levels!r}")
        if not 0 < self.tolerance < 0.5:
            no(f"`search.tolerance` {self.tolerance!r} must be in (0, 0.5), e.g. 0.01 for ±1 point")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            no(f"`search.seeds` must be a whole number ≥ 1, got {self.seeds!r}")
        if self.targets is not None and len(self.targets) != self.levels:
            no(f"`search.targets` has {len(self.targets)} values but `search.levels` is {self.levels}: give one "
               f"target per level")
        lo, hi = (self.lock_range + [None, None])[:2] if isinstance(self.lock_range, list) else (None, None)
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo < hi) or len(self.lock_range) != 2:
            no(f"`search.lock_range` must be [lowest, highest] lock value, got {self.lock_range!r}")
        if lock_mode == "rate" and not (0 < lo and hi < 1):
            no(f"`search.lock_range` {self.lock_range} must lie in (0, 1) for rate locks (fractions of all channels)")
        if self.lock_step is not None and not (isinstance(self.lock_step, (int, float)) and 0 < self.lock_step < hi - lo):
            no(f"`search.lock_step` {self.lock_step!r} must be > 0 and smaller than the lock range")
        if not isinstance(self.lock_points, int) or self.lock_points < 2:
            no(f"`search.lock_points` must be a whole number ≥ 2, got {self.lock_points!r}")
        e = self.epochs
        if (not isinstance(e, list) or len(e) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in e)
                or not 1 <= e[0] <= e[1]):
            no(f"`search.epochs` must be [fewest, most] whole epochs with 1 ≤ fewest ≤ most, got {e!r}")
        for name in ("lr", "data_fraction", "scope"):
            if not isinstance(getattr(self, name), list) or not getattr(self, name):
                no(f"`search.{name}` must be a non-empty list")
        if not all(isinstance(x, (int, float)) and x > 0 for x in self.lr):
            no(f"`search.lr` {self.lr} must hold positive learning rates")
        if not all(isinstance(x, (int, float)) and 0 < x <= 1 for x in self.data_fraction):
            no(f"`search.data_fraction` {self.data_fraction} must hold fractions in (0, 1]")
        if not all(s in ("all", "bn", "head") for s in self.scope):
            no(f"`search.scope` {self.scope} may only hold all, bn, head")
        th = self.thief
        if not th.fractions or not all(isinstance(x, (int, float)) and 0 < x <= 1 for x in th.fractions):
            no(f"`search.thief.fractions` {th.fractions} must be fractions in (0, 1], e.g. [0.01, 0.05, 0.1]")
        pl = th.public_locks
        if isinstance(pl, list):
            if (not pl or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < 1 for x in pl)
                    or len(set(pl)) != len(pl)):
                no(f"`search.thief.public_locks` {pl!r} must be strongest, levels, or a list of distinct lock rates "
                   f"in (0, 1), e.g. [0.3, 0.5, 0.7]")
            if lock_mode != "rate":
                no("`search.thief.public_locks` as a list of lock values needs rate locks (lock.mode: rate)")
        elif pl not in ("strongest", "levels"):
            no(f"`search.thief.public_locks` must be strongest, levels or a list of lock rates, got {pl!r}")
        if (not isinstance(th.forms, list) or not th.forms or len(set(map(str, th.forms))) != len(th.forms)
                or not set(th.forms) <= set(THIEF_FORMS)):
            no(f"`search.thief.forms` {th.forms!r} must be a non-empty list of distinct forms from "
               f"{', '.join(THIEF_FORMS)}")
        if not isinstance(th.epochs, int) or th.epochs < 1 or not isinstance(th.seeds, int) or th.seeds < 1:
            no(f"`search.thief.epochs` and `.seeds` must be whole numbers ≥ 1, got {th.epochs!r}, {th.seeds!r}")
        if self.mode == "grid":
            return []
        targets = self.resolve_targets(base_acc)
        if any(not 0 <= t <= 1 for t in targets):
            no(f"targets {targets} must be accuracies in [0, 1]")
        if any(b > a for a, b in zip(targets, targets[1:])):
            no(f"targets {targets} must fall from level 1 down")
        if targets[0] > base_acc + _SEARCH_EPS:
            no(f"level 1's target {targets[0]:.3f} is above the base model's accuracy {base_acc:.3f}: no lock and "
               f"fine-tune beats the model it starts from; lower `search.targets` or use `search.below_base`")
        need = min_gap + 2 * self.tolerance
        for k, (a, b) in enumerate(zip(targets, targets[1:]), start=1):
            if a - b < need - _SEARCH_EPS:
                no(f"targets of levels {k} and {k + 1} ({a:.3f}, {b:.3f}) are {a - b:.3f} apart: two levels each "
                   f"within tolerance {self.tolerance:g} of them could be closer than min_gap {min_gap:g}; space "
                   f"targets ≥ {need:.3f} apart (min_gap + 2 × tolerance) or lower the tolerance")
        floor = lock_bound + min_gap
        if targets[-1] - self.tolerance < floor - _SEARCH_EPS:
            no(f"level {len(targets)}'s target {targets[-1]:.3f} is below lock bound {lock_bound:.3f} + min_gap "
               f"{min_gap:g}: a level must beat the public model by min_gap; raise it to ≥ {floor + self.tolerance:.3f} "
               f"or ask for fewer levels")
        if self.max_trials is not None and self.max_trials < self.min_trials():
            no(f"`search.max_trials` {self.max_trials} cannot buy {self.levels} levels × {self.seeds} seeds plus "
               f"2 curve tasks and {th.trials()} thief trials (at least {self.min_trials()}): "
               f"raise it or ask for fewer levels or seeds")
        if self.max_trial_seconds is not None and not self.max_trial_seconds > 0:
            no(f"`search.max_trial_seconds` must be > 0, got {self.max_trial_seconds!r}")
        return targets



@dataclass
class Config:
    name: str = opt("experiment", "str", check=_name_problem)
    seed: int = opt(0, "int", lo=0, hi=SEED_MAX)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    importance: list[ImportanceConfig] = field(default_factory=lambda: [ImportanceConfig()])
    lock: LockConfig = field(default_factory=LockConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    simplify: SimplifyConfig = field(default_factory=SimplifyConfig)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["importance"] = [i.to_dict() for i in self.importance]
        # lock.granularity came later: at its default (channel) it is left out, so existing hashes stay.
        if d["lock"].get("granularity") == "channel":
            d["lock"].pop("granularity")
        # A default search section (a grid sweep, as every config before it) is left out: config.yaml and
        # Config.hash() of existing configs stay what they were.
        if self.search == SearchConfig():
            d.pop("search")
        if not self.release.erase_head:   # likewise a release key added later, at its default
            d["release"].pop("erase_head")
        for k in ANALYSES:  # likewise the analyses' sections at their defaults
            if getattr(self, k) == SECTIONS[k]():
                d.pop(k)
        # Packing changes how the grid is scheduled, never a row: off (the default) it is left out too.
        if self.sweep.pack == 1 and self.sweep.pack_seconds == SweepConfig().pack_seconds:
            d["sweep"].pop("pack")
            d["sweep"].pop("pack_seconds")
        return d

    def hash(self) -> str:
        """What the trials depend on: the resolved config less the analyses' sections (`detect`, `simplify`), which
        only configure commands that read the base model, so adding one never makes a folder's trials stale, and
        less the sweep's packing (how the grid is scheduled, not what it computes: rows are the same)."""
        d = self.to_dict()
        for k in ANALYSES:
            d.pop(k, None)
        for k in ("pack", "pack_seconds"):
            d["sweep"].pop(k, None)
        return _digest(d)

    def base_hash(self) -> str:
        """What the base model depends on (seed, data, model, train), so a changed lock, importance or schedule grid
        does not retrain it. Where the data lives (`root`, `download`) is not part of what it is."""
        d = self.to_dict()
        data = {k: v for k, v in d["data"].items() if k not in ("root", "download")}
        return _digest({"seed": d["seed"], "data": data, "model": d["model"], "train": d["train"]})


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# ---- checking ------------------------------------------------------------------------------------------------

_TYPE_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range_text(r: Rule) -> str:
    if r.lo is not None and r.hi is not None:
        return f"in {'(' if r.lo_open else '['}{_fmt(r.lo)}, {_fmt(r.hi)}{')' if r.hi_open else ']'}"
    if r.lo is not None:
        return f"{'>' if r.lo_open else '≥'} {_fmt(r.lo)}"
    return f"{'<' if r.hi_open else '≤'} {_fmt(r.hi)}"


def _show(v: Any) -> str:
    """A value as the message shows it: its repr, cut short (a whole pasted file must not become the line)."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_problem(v: Any, kind: str) -> str | None:
    """Why `v` is not of `kind` (with the fix), or None. Booleans are not numbers and text is not a boolean."""
    want = _TYPE_WORDS[kind]
    if kind == "bool":
        if isinstance(v, bool):
            return None
        if isinstance(v, str) and v.strip().lower() in ("yes", "no", "true", "false", "on", "off", "y", "n"):
            return f"must be {want}, got the text {_show(v)}: write true or false without quotes"
        return f"must be {want}, got {_show(v)}"
    if kind == "str":
        if isinstance(v, str):
            return None if v.strip() else "is empty text: give a value or leave the key out"
        return f"must be {want}, got {_show(v)}: put it in quotes if it is meant as text"
    if isinstance(v, bool):
        return f"must be {want}, got {_show(v)}"
    if isinstance(v, str):
        try:
            float(v)
            return f"must be {want}, got the text {_show(v)}: remove the quotes"
        except ValueError:
            return f"must be {want}, got {_show(v)}"
    if kind == "int":
        if isinstance(v, int):
            return None
        if isinstance(v, float) and math.isfinite(v) and v == int(v):
            return f"must be {want}, got {_show(v)}: write {int(v)}"
        return f"must be {want}, got {_show(v)}"
    if not isinstance(v, (int, float)):
        return f"must be {want}, got {_show(v)}"
    if not math.isfinite(v):
        return f"must be a finite number, got {_show(v)}"
    return None


def _value_problem(v: Any, r: Rule) -> str | None:
    """What is wrong with one value under rule `r` (type, then range, choices, check), or None."""
    problem = _type_problem(v, r.kind)
    if problem:
        return problem
    if r.kind in ("int", "float"):
        below = r.lo is not None and (v <= r.lo if r.lo_open else v < r.lo)
        above = r.hi is not None and (v >= r.hi if r.hi_open else v > r.hi)
        if below or above:
            return f"must be {_range_text(r)}, got {v!r}"
        if r.kind == "int" and r.hi is None and v > INT_MAX:
            return f"must be ≤ {INT_MAX}, got {v!r}"
    if r.choices is not None and v not in r.choice_list():
        return f"{v!r} is not one of {', '.join(r.choice_list())}"
    return r.check(v) if r.check else None


def _resources_problems(v: Any, where: str) -> list[str]:
    example = "e.g. {cpu: 1, gpu: 0.25}"
    if not isinstance(v, dict) or set(v) - {"cpu", "gpu"}:
        return [f"`{where}` must be a mapping with keys cpu and gpu, {example}"]
    problems = []
    for k, n in v.items():
        p = _value_problem(n, Rule("float", lo=0))
        if p:
            problems.append(f"`{where}.{k}` {p}")
        elif k == "gpu" and n > 1 and n != int(n):
            problems.append(f"`{where}.gpu` {n!r}: more than one GPU per trial must be a whole number")
    if not problems and not (v.get("cpu", 1) or v.get("gpu", 0)):  # a missing key means cpu 1, gpu 0 (sweep.py)
        problems.append(f"`{where}` asks for no cpu and no gpu: a trial needs some, {example}")
    return problems


def check_field(value: Any, r: Rule, where: str, problems: list[str]) -> Any:
    """`value` if it satisfies `r` (a bare value of a list field comes back as a one-item list), else None with every
    problem recorded in `problems` as "`where` ..."."""
    if value is None:
        if r.optional:
            return None
        problems.append(f"`{where}` must not be null: give a value or leave the key out")
        return None
    if r.kind == "pack":
        ok = value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= INT_MAX)
        if not ok:
            problems.append(f"`{where}` must be auto or a whole number of grid points per Tune trial (1: no "
                            f"packing), got {_show(value)}")
        return value if ok else None
    if r.kind == "resources":
        found = _resources_problems(value, where)
        problems += found
        return None if found else value
    if not r.many:
        p = _value_problem(value, r)
        if p:
            problems.append(f"`{where}` {p}")
            return None
        return value
    values = value if isinstance(value, list) else [value]
    if isinstance(value, dict):
        problems.append(f"`{where}` must be a list, got a mapping")
        return None
    if not values and r.empty:
        problems.append(f"`{where}` is empty: {r.empty}")
        return None
    before = len(problems)
    for v in values:
        p = _value_problem(v, r)
        if p:
            problems.append(f"`{where}` entry {p}")
    if r.unique and len(problems) == before:
        twice = sorted({repr(v) for i, v in enumerate(values) if v in values[:i]})
        if twice:
            problems.append(f"`{where}` lists {', '.join(twice)} more than once: give each value once")
    return values if len(problems) == before else None


def _build(cls, raw: Any, where: str, problems: list[str], bad: set[str]):
    """Dataclass from a mapping, every field checked against its rule. Unknown keys and bad values are recorded in
    `problems` (bad fields keep their defaults, listed in `bad`, so later checks can skip them)."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        problems.append(f"`{where}` must be a mapping of settings, got {type(raw).__name__}")
        bad.add(where)
        return cls()
    known = {f.name: f for f in fields(cls)}
    for k in raw:
        if k not in known:
            problems.append(f"unknown key `{where}.{k}` (known: {', '.join(sorted(known))})")
    kwargs = {}
    for k, v in raw.items():
        if k in known:
            before = len(problems)
            checked = check_field(v, known[k].metadata["rule"], f"{where}.{k}", problems)
            if len(problems) == before:
                kwargs[k] = checked
            else:
                bad.add(f"{where}.{k}")
    return cls(**kwargs)


NAME_RULE = next(f for f in fields(ImportanceConfig) if f.name == "name").metadata["rule"]


_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._,=+\[\]-]{0,99}")


def _frozen_ok(name: str, key: str, value: Any) -> bool:
    """A key of FROZEN_KEYS at exactly its written value (a resolved config.yaml read back)."""
    frozen = FROZEN_KEYS.get(name, {})
    if key not in frozen or isinstance(value, bool):
        return False
    return value is None if frozen[key] is None else (value is not None and value == frozen[key])


def _importance(item: dict, where: str, problems: list[str], bad: set[str],
                synapse: bool = False) -> ImportanceConfig | None:
    """One mapping entry: its name by the `name` rule, every other key by the named criterion's settings rules."""
    from . import registry
    name = item.get("name", DEFAULT_IMPORTANCE)
    if "name" in item and not (synapse and name in SYNAPSE_IMPORTANCE) \
            and check_field(name, NAME_RULE, f"{where}.name", problems) is None:
        bad.add("importance")
        return None
    entry = _importance_entry(name) if synapse else registry.importance(name)
    own = {f.name: f for f in fields(entry.settings)} if entry.settings is not None else {}
    kwargs, before = {}, len(problems)
    for k, v in item.items():
        if k == "name" or (k not in own and _frozen_ok(name, k, v)):
            continue
        if k in own:
            n = len(problems)
            checked = check_field(v, own[k].metadata["rule"], f"{where}.{k}", problems)
            if len(problems) == n:
                kwargs[k] = checked
            continue
        owners = [e.name for e in registry.table("importance").values()
                  if e.settings is not None and k in {f.name for f in fields(e.settings)}]
        if owners:
            problems.append(f"`{where}.{k}` applies to {', '.join(owners)} only, not {name}: remove it")
        else:
            known = ", ".join(["name", *own])
            problems.append(f"unknown key `{where}.{k}` ({name} takes {known})")
    if len(problems) > before:
        bad.add("importance")
        return None
    try:
        settings = entry.settings(**kwargs) if entry.settings is not None else None
    except (TypeError, ValueError, GradauthError) as e:  # the criterion's own __post_init__ refused the combination
        problems.append(f"`{where}` {name}: {e}")
        bad.add("importance")
        return None
    return ImportanceConfig(name, settings)


def _importances(raw: Any, problems: list[str], bad: set[str], synapse: bool = False) -> list[ImportanceConfig]:
    """The `importance` entries; with `synapse` (lock.granularity: synapse) the synapse-only names (weight, random)
    are accepted too."""
    if raw is None:
        return [ImportanceConfig()]
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        problems.append(f"`importance` is empty: give at least one, e.g. {DEFAULT_IMPORTANCE}")
        return [ImportanceConfig()]
    out = []
    for i, item in enumerate(items):
        where = "importance" if len(items) == 1 else f"importance[{i}]"
        if isinstance(item, str) and synapse and item in SYNAPSE_IMPORTANCE:
            out.append(ImportanceConfig(name=item))
            continue
        name = item.get("name") if isinstance(item, dict) else item
        if not synapse and name in SYNAPSE_IMPORTANCE and isinstance(_importance_entry(name), _SynapseOnly):
            problems.append(f"`{where}` {name!r} is not one of {', '.join(NAME_RULE.choice_list())} ({name} ranks "
                            f"synapses: use it with lock.granularity: synapse)")
            bad.add("importance")
            continue
        if isinstance(item, str):  # a bare name: checked by the `name` field's own rule
            before = len(problems)
            check_field(item, NAME_RULE, where, problems)
            if len(problems) > before:
                bad.add("importance")
                continue
            out.append(ImportanceConfig(name=item))
            continue
        if not isinstance(item, dict):
            problems.append(f"`{where}` must be a name ({', '.join(NAME_RULE.choice_list())}) or a mapping such as "
                            f"{{name: slice, samples: 256}}, got {_show(item)}")
            bad.add("importance")
            continue
        imp = _importance(item, where, problems, bad, synapse)
        if imp is not None:
            out.append(imp)
    labels = []
    for imp in out:
        label = imp.label
        if not isinstance(label, str) or not _LABEL.fullmatch(label):
            problems.append(f"importance {imp.name}: its label {_show(label)} cannot name trials and files (letters, "
                            f"digits and . _ , = + [ ] -, at most 100): fix the criterion's label function")
            bad.add("importance")
        labels.append(label)
    twice = sorted({lb for j, lb in enumerate(labels) if lb in labels[:j]}, key=str)
    if twice:
        problems.append(f"`importance` lists {', '.join(map(str, twice))} more than once: give each importance "
                        f"source once")
    return out or [ImportanceConfig()]


def _validate(c: Config, problems: list[str], bad: set[str]) -> None:
    """Checks that involve more than one field (each field on its own has passed its rule, or is in `bad`)."""
    if c.lock.granularity == "synapse" and "lock.granularity" not in bad:
        _validate_synapse(c, problems, bad)
    elif c.lock.mode == "rate" and not {"lock.mode", "lock.values"} & bad:
        for v in c.lock.values:
            if not 0 < v < 1:
                problems.append(f"lock rate {v} is outside (0, 1): rates are fractions of all BN channels, "
                                f"e.g. 0.02 for 2 %")
    if c.select.targets is not None and not {"select.targets", "select.levels"} & bad \
            and len(c.select.targets) != c.select.levels:
        problems.append(f"`select.targets` has {len(c.select.targets)} values but `select.levels` is {c.select.levels}")


def _validate_synapse(c: Config, problems: list[str], bad: set[str]) -> None:
    """A synapse lock: rate mode, rates in (0, 1), importance slice / weight / random, a grid search."""
    if c.lock.mode != "rate" and "lock.mode" not in bad:
        problems.append(f"lock.granularity synapse takes lock.mode rate (the fraction of each layer's weights to "
                        f"hide), not {c.lock.mode}: use lock.mode: rate")
    elif "lock.values" not in bad:
        for v in c.lock.values:
            if not 0 < v < 1:
                problems.append(f"lock rate {v} is outside (0, 1): a synapse lock hides that fraction of each "
                                f"conv/linear layer's weights, e.g. 0.5 for NNSlicer's 50 %")
    if "importance" not in bad:
        other = [i.name for i in c.importance if i.name not in SYNAPSE_IMPORTANCE]
        if other:
            problems.append(f"lock.granularity synapse ranks synapses by importance {', '.join(SYNAPSE_IMPORTANCE)}; "
                            f"{', '.join(other)} ranks channels: list only those, or use lock.granularity: channel")
    if c.search.mode == "targeted":
        problems.append("`search.mode: targeted` locks channels only: use search.mode: grid with "
                        "lock.granularity: synapse")


TOP_LEVEL = {"name", "seed", "data", "model", "train", "importance", "lock", "finetune", "sweep", "select", "release",
             "search", "detect", "simplify"}
SECTIONS = {
    "data": DataConfig, "model": ModelConfig, "train": TrainConfig, "lock": LockConfig,
    "finetune": FinetuneConfig, "sweep": SweepConfig, "select": SelectConfig, "release": ReleaseConfig,
    "detect": DetectConfig, "simplify": SimplifyConfig,
}
ANALYSES = ("detect", "simplify")  # sections of commands that only read the base model: not in Config.hash()


def with_overrides(section: Any, where: str, overrides: dict) -> Any:
    """`section` (a SECTIONS dataclass) with command-line values (None = not given) put in, every value checked by
    the section's rules as in a config file; every problem in one GradauthError line."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return section
    problems: list[str] = []
    out = _build(type(section), {**dataclasses.asdict(section), **given}, where, problems, set())
    if problems:
        raise GradauthError("; ".join(problems))
    return out


def _search(raw: Any, lock: Any, problems: list[str]) -> SearchConfig:
    """The `search` section: every check that needs no base model here (with the other sections' problems); the
    targets themselves are checked against the base accuracy once it is known (SearchConfig.validate)."""
    try:
        sc = SearchConfig.from_dict(raw)
    except (GradauthError, TypeError) as e:
        problems.append(str(e))
        return SearchConfig()
    mode = lock.get("mode", "rate") if isinstance(lock, dict) else "rate"
    try:
        if sc.mode not in ("grid", "targeted"):
            raise GradauthError(f"search: `search.mode` must be grid or targeted, got {sc.mode!r}")
        if sc.mode == "targeted" and mode != "rate":
            raise GradauthError(f"search: the targeted search takes rate locks only, got lock.mode {mode!r}: use "
                                f"lock.mode: rate, or search.mode: grid")
        for name in ("max_trials", "max_concurrent"):
            v = getattr(sc, name)
            if (v is not None or name == "max_concurrent") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise GradauthError(f"search: `search.{name}` must be a whole number ≥ 1, got {v!r}")
        if sc.max_trial_seconds is not None and (isinstance(sc.max_trial_seconds, bool) or not
                                                 isinstance(sc.max_trial_seconds, (int, float)) or not sc.max_trial_seconds > 0):
            raise GradauthError(f"search: `search.max_trial_seconds` must be > 0, got {sc.max_trial_seconds!r}")
        dataclasses.replace(sc, mode="grid").validate(0.5, 0.0, 0.0, mode)  # every check but the targets'
    except GradauthError as e:
        problems.append(str(e))
    except TypeError as e:  # a value of a type no check expected (e.g. text where a number goes)
        problems.append(f"search: a value has the wrong type ({e}): see SearchConfig in gradauth/config.py")
    return sc


def _parse(raw: Any, source: str, problems: list[str]) -> Config:
    if not isinstance(raw, dict):
        raise GradauthError(f"{source}: the config must be a YAML mapping with keys {', '.join(sorted(TOP_LEVEL))}"
                            + (f"; {'; '.join(problems)}" if problems else ""))
    problems += [f"unknown key `{k}` (known: {', '.join(sorted(TOP_LEVEL))})" for k in raw if k not in TOP_LEVEL]
    bad: set[str] = set()
    kwargs = {k: _build(cls, raw.get(k), k, problems, bad) for k, cls in SECTIONS.items()}
    top = {f.name: f for f in fields(Config)}
    for k in ("name", "seed"):
        if k in raw:
            before = len(problems)
            v = check_field(raw[k], top[k].metadata["rule"], k, problems)
            if len(problems) == before:
                kwargs[k] = v
    kwargs["search"] = _search(raw.get("search"), raw.get("lock"), problems)
    synapse = "lock.granularity" not in bad and kwargs["lock"].granularity == "synapse"
    cfg = Config(importance=_importances(raw.get("importance"), problems, bad, synapse), **kwargs)
    _validate(cfg, problems, bad)
    if cfg.search.mode == "targeted" and len(cfg.importance) != 1 and "importance" not in bad:
        problems.append(f"`search.mode: targeted` searches one importance source, got {len(cfg.importance)} "
                        f"({', '.join(i.label for i in cfg.importance)}): keep one, or use `search.mode: grid`")
    if problems:
        raise GradauthError(f"{source}: " + "; ".join(problems))
    return cfg


@dataclass
class ProgressView:
    """What `gradauth status` needs of a results folder's config.yaml: the sections that size the sweep and select
    the levels so far, each checked by its own rules. It leaves out what the registries check (dataset, model,
    importance names and settings): their built-ins import torch, and a folder swept with someone's plugins must
    still show its progress where those plugins are not installed."""
    name: str
    importances: int
    lock: LockConfig
    finetune: FinetuneConfig
    select: SelectConfig
    search: SearchConfig


def load_progress_view(path: str | Path) -> ProgressView:
    path = Path(path)
    raw, problems = read_yaml(path)
    if not isinstance(raw, dict):
        raise GradauthError(f"{path}: the config must be a YAML mapping with keys {', '.join(sorted(TOP_LEVEL))}")
    problems = list(problems)
    bad: set[str] = set()
    built = {k: _build(SECTIONS[k], raw.get(k), k, problems, bad) for k in ("lock", "finetune", "select")}
    search = _search(raw.get("search"), raw.get("lock"), problems)
    name = raw.get("name", "experiment")
    check_field(name, {f.name: f for f in fields(Config)}["name"].metadata["rule"], "name", problems)
    imps = raw.get("importance")
    count = 1 if imps is None else len(imps) if isinstance(imps, list) else 1
    if problems:
        raise GradauthError(f"{path}: " + "; ".join(problems))
    return ProgressView(str(name), max(1, count), search=search, **built)


def parse_config(raw: Any, source: str = "config") -> Config:
    """Config from a parsed YAML mapping; raises one GradauthError listing every problem."""
    return _parse(raw, source, [])


# ---- reading YAML --------------------------------------------------------------------------------------------

_LOADER = None


def strict_loader():
    """The YAML loader class, built on first use: `import yaml` stays out of module import, since `gradauth bench gpu`
    imports this module on machines without PyYAML."""
    global _LOADER
    if _LOADER is None:
        import yaml

        class StrictLoader(yaml.SafeLoader):
            """PyYAML's SafeLoader (no Python objects) that also records every duplicate key (the last one
            would silently win) and reads `1e-4` as the number it looks like (YAML 1.1 needs a dot: `1.0e-4`)."""

            def __init__(self, stream):
                super().__init__(stream)
                self.duplicates: list[str] = []

            def construct_mapping(self, node, deep=False):
                if isinstance(node, yaml.MappingNode):
                    seen: dict = {}
                    for key_node, _ in node.value:
                        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                            continue
                        key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                        if key in seen:
                            self.duplicates.append(f"duplicate key `{key}` at line {line} (first at line {seen[key]}): "
                                                   f"keep one of them")
                        else:
                            seen[key] = line
                return super().construct_mapping(node, deep=deep)

        StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"),
                                           list("-+0123456789"))

        _LOADER = StrictLoader
    return _LOADER


MAX_CONFIG_BYTES = 1 << 20


def read_yaml(path: Path, what: str = "config") -> tuple[Any, list[str]]:
    """(parsed YAML, duplicate-key problems) of a small UTF-8 text file; anything else is one GradauthError."""
    fix = "pass a YAML file, e.g. sweeps/quickstart.yaml"
    try:
        st = path.stat()
    except FileNotFoundError:
        raise GradauthError(f"{what} file {path} not found: pass a YAML from sweeps/, e.g. sweeps/quickstart.yaml")
    except OSError as e:
        raise GradauthError(f"{what} path {path} cannot be read ({e.strerror or e}): {fix}")
    if stat.S_ISDIR(st.st_mode):
        raise GradauthError(f"{what} path {path} is a directory: {fix}")
    if not stat.S_ISREG(st.st_mode):
        raise GradauthError(f"{what} path {path} is not a regular file (a device, pipe or socket): {fix}")
    if st.st_size > MAX_CONFIG_BYTES:
        raise GradauthError(f"{what} file {path} is {st.st_size} bytes, more than any config ({MAX_CONFIG_BYTES}): "
                            f"is it the right file? {fix}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GradauthError(f"{what} file {path} cannot be read ({e.strerror or e}): check its permissions")
    if b"\0" in data:
        raise GradauthError(f"{what} file {path} is a binary file, not YAML text: {fix}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise GradauthError(f"{what} file {path} is not UTF-8 text (byte {e.start} is {data[e.start]:#04x}): "
                            f"save it as UTF-8")
    if not text.strip():
        raise GradauthError(f"{what} file {path} is empty: write the settings, e.g. copy sweeps/quickstart.yaml")
    import yaml
    loader = strict_loader()(text)
    try:
        raw = loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        why = f" ({e.problem})" if getattr(e, "problem", None) else ""
        raise GradauthError(f"{path}: not valid YAML{at}{why}: fix the syntax")
    except RecursionError:
        raise GradauthError(f"{path}: YAML nested too deeply to be a config: fix the file")
    finally:
        loader.dispose()
    if raw is None:
        raise GradauthError(f"{what} file {path} holds no settings (only comments): write them, e.g. copy "
                            f"sweeps/quickstart.yaml")
    return raw, loader.duplicates


def load_config(path: str | Path) -> Config:
    path = Path(path)
    raw, duplicates = read_yaml(path)
    return _parse(raw, str(path), list(duplicates))


def dump_config(cfg: Config) -> str:
    import yaml
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
