"""`gradauth detect CONFIG`: NNSlicer's adversarial-input detection (FSE'20, §5.1), on the config's base model.

1. Slice N normal training inputs, each with the criterion (input, predicted class): the per-input slice is a vector
   of contributions (features `channel`: Σ|CONTRIB| per channel of every leaf module; `neuron`: every neuron's
   CONTRIB). The logits layer is left out: its CONTRIB is the one-hot criterion, the prediction itself.
2. Fit a classifier that predicts the model's class from the slice: a decision tree (the paper's) and a random
   forest (the variant), both scikit-learn, seeded.
3. An input whose slice-predicted class differs from the model's prediction is flagged. Clean inputs: correctly
   classified test inputs, sliced the same way; their flagged share is the false-positive rate (FPR).
4. Attacks (Foolbox 3.3.4, the library the paper used; `ATTACKS` below: 13 of the paper's 17 — JSMA, ADef,
   SinglePixel and LocalSearch are not in Foolbox 3) on correctly classified test inputs in [0, 1] pixel units
   (the model sees them normalised, as in training). Each attack runs within a budget: at most `samples` inputs,
   and no new batch is started after `seconds`. An adversarial input counts when it succeeded (prediction ≠ label);
   recall = flagged share of the successful ones; precision is that of a 1:1 mix of successful adversarial and
   clean inputs, recall / (recall + FPR).
5. The FeatureMap baseline: the same classifiers on the same layers' activations (per-channel means, or every
   neuron), fitted on the same inputs.

Slices go through the exact slicer (`vectorized.backward`, whose visit hook hands over each layer's per-input CONTRIB
map); with a Ray already initialised in the process, batches are sliced by Ray tasks (distributed.py's forward
actor, one backward task per batch).

Settings: the config's `detect:` section (config.DetectConfig, checked by its rules like every section; at its
defaults it is left out of config.yaml, and it is never part of the config hash), CLI flags override it. Output: `detect.parquet`, `detect.md`, `plots/detect.png` in the
run's output folder (`runs/<name>/` or --out), next to `base.pt`, which must exist (`gradauth train CONFIG`).
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn as nn

from . import rundir
from .config import ATTACK_NAMES, DEFAULT_ATTACKS, FEATURES, NOT_IN_FOOLBOX, DetectConfig, parse_attacks  # noqa: F401
from .errors import GradauthError
from .fsutil import atomic_path, write_text

# name -> (constructor of the Foolbox attack, takes ε (fixed-size) or not (minimisation), default ε list)
PAPER_EPS = [2 / 255, 4 / 255, 8 / 255]


def _attacks():
    import foolbox.attacks as A
    return {
        "FGSM": (lambda: A.FGSM(), True),
        "PGD": (lambda: A.LinfPGD(steps=20, rel_stepsize=0.1), True),
        "DeepFool-L2": (lambda: A.L2DeepFoolAttack(steps=50), False),
        "DeepFool-Linf": (lambda: A.LinfDeepFoolAttack(steps=50), False),
        "CW-L2": (lambda: A.L2CarliniWagnerAttack(steps=50, binary_search_steps=3), False),
        "Boundary": (lambda: A.BoundaryAttack(steps=200), False),
        "Spatial": (lambda: A.SpatialAttack(), False),
        "PointWise": (lambda: A.PointwiseAttack(), False),
        "GaussianBlur": (lambda: A.GaussianBlurAttack(steps=20), False),
    }


SCHEMA = pa.schema([
    ("detector", pa.string()), ("classifier", pa.string()), ("attack", pa.string()), ("epsilon", pa.float64()),
    ("attempted", pa.int64()), ("succeeded", pa.int64()), ("success_rate", pa.float64()),
    ("flagged", pa.int64()), ("recall", pa.float64()), ("precision", pa.float64()), ("fpr", pa.float64()),
    ("clean", pa.int64()), ("attack_seconds", pa.float64()), ("budget_samples", pa.int64()),
    ("budget_seconds", pa.float64())])


Settings = DetectConfig  # the `detect:` config section (config.py declares its fields and their rules)


# ---- features ---------------------------------------------------------------------------------------------------

class Normalised(nn.Module):
    """[0, 1] pixels in, the model's logits out (the attacks work in pixel units)."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


def _reduce(c: torch.Tensor, features: str) -> torch.Tensor:
    if features == "neuron":
        return c.reshape(len(c), -1).float()
    return c.abs().reshape(c.shape[0], c.shape[1], -1).sum(2).float() if c.dim() > 2 else c.abs().float()


def _slice_batch(plan, st, theta: float, features: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    from .slicing.vectorized import backward
    parts: dict[str, torch.Tensor] = {}

    def visit(s, c, st_):
        if s.name != plan.logits:
            parts[s.key] = _reduce(c, features)
    backward(plan, st, theta, None, block, visit=visit)
    return torch.cat([parts[k] for k in sorted(parts)], 1), st.pred


def slice_features(model: nn.Module, prof: torch.Tensor, x: torch.Tensor, theta: float = 0.0,
                   features: str = "channel", batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(per-input slice vectors, predicted classes) of normalised inputs x; on Ray when one is initialised."""
    from .slicing.graph import Plan
    from .slicing.record import batches, forward_stats, profile
    from .slicing.stage import ray_running
    from .slicing.vectorized import BLOCK
    plan = Plan(model)
    if ray_running():
        return _slice_features_ray(model, prof, x, theta, features, batch)
    means = profile(plan, prof, batch)
    out = [_slice_batch(plan, forward_stats(plan, means, xb, theta), theta, features, BLOCK)
           for xb in batches(x, batch)]
    return torch.cat([f for f, _ in out]).numpy(), torch.cat([p for _, p in out]).numpy()


def _slice_features_ray(model, prof, x, theta, features, batch):
    import ray
    from .slicing import distributed as D
    from .slicing.record import batches, combine_means
    from .slicing.vectorized import BLOCK
    token, model_ref = D._model_ref(model.cpu().eval())
    actors = D._workers(token, model_ref)
    parts = ray.get([actors[i % len(actors)].profile.remote(b) for i, b in enumerate(batches(prof, batch))])
    means_ref = ray.put(combine_means(parts, len(prof)))
    ray.get([a.set_means.remote(means_ref) for a in actors])
    refs = [_features_task.remote(token, [model_ref], actors[i % len(actors)].stats.remote(xb, theta), theta,
                                  features, BLOCK) for i, xb in enumerate(batches(x, batch))]
    out = ray.get(refs)
    return torch.cat([f for f, _ in out]).numpy(), torch.cat([p for _, p in out]).numpy()


def _remote(fn):
    import ray
    return ray.remote(num_cpus=1)(fn)


class _Lazy:
    """A Ray task made on first use, so importing this module never imports Ray."""

    def __init__(self, fn):
        self.fn, self.task = fn, None

    def remote(self, *a):
        if self.task is None:
            self.task = _remote(self.fn)
        return self.task.remote(*a)


def _features_task_fn(token, model_refs, st, theta, features, block):
    from .slicing import distributed as D
    plan = D._plan(token, model_refs[0])
    return _slice_batch(plan, st, theta, features, block)


_features_task = _Lazy(_features_task_fn)


@torch.no_grad()
def featuremap_features(model: nn.Module, x: torch.Tensor, features: str = "channel",
                        batch: int = 32) -> np.ndarray:
    """The same layers' activations (per-channel means, or every neuron): the FeatureMap baseline."""
    from .slicing.graph import Plan, run
    plan = Plan(model)
    keyed = {s.name: s.key for s in plan.steps if s.key is not None and s.name != plan.logits}
    rows = []
    for i in range(0, len(x), batch):
        parts = {}

        def visit(s, val, args):
            if s.name in keyed and isinstance(val, torch.Tensor):
                v = val.reshape(len(val), -1) if features == "neuron" else \
                    (val.reshape(val.shape[0], val.shape[1], -1).mean(2) if val.dim() > 2 else val)
                parts[keyed[s.name]] = v.float()
        run(plan, x[i:i + batch], visit)
        rows.append(torch.cat([parts[k] for k in sorted(parts)], 1))
    return torch.cat(rows).numpy()


# ---- the detector -------------------------------------------------------------------------------------------------

def classifiers(seed: int, trees: int) -> dict:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.tree import DecisionTreeClassifier
    return {"tree": DecisionTreeClassifier(random_state=seed),
            "forest": RandomForestClassifier(n_estimators=trees, random_state=seed, n_jobs=1)}


@dataclass
class Detector:
    """Classifiers from slice (and feature-map) vectors of normal inputs to the model's predicted class."""
    model: nn.Module
    prof: torch.Tensor
    mean: tuple
    std: tuple
    settings: Settings
    fitted: dict = field(default_factory=dict)  # (detector, classifier) -> fitted model

    def features(self, x01: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{detector: (features, model prediction)} of [0, 1] inputs."""
        s = self.settings
        x = (x01 - torch.tensor(self.mean).view(1, -1, 1, 1)) / torch.tensor(self.std).view(1, -1, 1, 1)
        f, pred = slice_features(self.model, self.prof, x, s.theta, s.features, s.batch)
        return {"slice": (f, pred), "featuremap": (featuremap_features(self.model, x, s.features, s.batch), pred)}

    def fit(self, x01: torch.Tensor) -> "Detector":
        for det, (f, pred) in self.features(x01).items():
            if len(np.unique(pred)) < 2:
                raise GradauthError("the model predicts one class for every normal input: nothing to detect with")
            for name, clf in classifiers(self.settings.seed, self.settings.trees).items():
                self.fitted[det, name] = clf.fit(f, pred)
        return self

    def flags(self, x01: torch.Tensor) -> dict[tuple[str, str], np.ndarray]:
        """{(detector, classifier): flagged per input}: the slice-predicted class differs from the model's."""
        out = {}
        for det, (f, pred) in self.features(x01).items():
            for name in ("tree", "forest"):
                out[det, name] = self.fitted[det, name].predict(f) != pred
        return out


@torch.no_grad()
def _predict(net: nn.Module, x01: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([net(x01[i:i + batch]).argmax(1) for i in range(0, len(x01), batch)])


def run_attack(net: nn.Module, name: str, eps: float | None, x01: torch.Tensor, y: torch.Tensor,
               samples: int, seconds: float, batch: int) -> tuple[torch.Tensor, int, float]:
    """(successful adversarial inputs, inputs attacked, seconds) within the budget."""
    import foolbox as fb
    make, _ = _attacks()[name]
    fmodel = fb.PyTorchModel(net, bounds=(0, 1))
    attack = make()
    advs, tried, t0 = [], 0, time.perf_counter()
    for i in range(0, min(samples, len(y)), batch):
        if time.perf_counter() - t0 > seconds:
            break
        xb, yb = x01[i:min(i + batch, samples)], y[i:min(i + batch, samples)]
        with warnings.catch_warnings():  # Foolbox's Spatial calls torch.meshgrid without `indexing`: not the user's
            warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
            _, clipped, _ = attack(fmodel, xb, yb, epsilons=eps)
        adv = clipped.detach()
        ok = _predict(net, adv) != yb  # success as we measure it: the model's answer changed from the label
        advs.append(adv[ok])
        tried += len(yb)
    return (torch.cat(advs) if advs else x01[:0]), tried, time.perf_counter() - t0


def detect(cfg, out: Path, settings: Settings, ds=None, model: nn.Module | None = None) -> Path:
    """The whole experiment → out/detect.parquet, out/detect.md, out/plots/detect.png."""
    from .slicing.stage import profile_inputs
    attacks = parse_attacks(settings.attacks)  # refuse bad input before any work
    try:
        import foolbox  # noqa: F401
    except ImportError:
        raise GradauthError("foolbox is not installed: pip install -e . (pyproject pins foolbox==3.3.4)")
    from .checkpoint import base_for
    model, ds = base_for(cfg, out, "detect", ds, model)
    torch.manual_seed(settings.seed)
    net = Normalised(model, ds.mean, ds.std).eval()
    normal = ds.train.subset(settings.normal, settings.seed)
    det = Detector(model, profile_inputs(ds), ds.mean, ds.std, settings)
    t0 = time.perf_counter()
    det.fit(normal.x.float() / 255)
    fit_s = time.perf_counter() - t0
    test = ds.test.subset(None, settings.seed)
    x01, y = test.x.float() / 255, test.y
    right = _predict(net, x01) == y
    x01, y = x01[right], y[right]
    clean = det.flags(x01[:settings.clean])
    n_clean = min(settings.clean, len(y))
    rows = []
    pool_x, pool_y = x01[n_clean:], y[n_clean:]  # attacked inputs: other correctly classified test inputs
    if not len(pool_y):
        pool_x, pool_y = x01, y
    for name, eps in attacks:
        adv, tried, secs = run_attack(net, name, eps, pool_x, pool_y, settings.samples, settings.seconds,
                                      settings.batch)
        flags = det.flags(adv) if len(adv) else {}
        print(f"[detect] {name}{'' if eps is None else f' ε={eps:g}'}: {len(adv)}/{tried} succeeded in "
              f"{secs:.0f} s", file=sys.stderr, flush=True)
        for key, cf in clean.items():
            fpr = float(cf.mean()) if len(cf) else float("nan")
            fl = int(flags[key].sum()) if flags else 0
            recall = fl / len(adv) if len(adv) else float("nan")
            prec = recall / (recall + fpr) if len(adv) and recall + fpr > 0 else float("nan")
            rows.append({"detector": key[0], "classifier": key[1], "attack": name,
                         "epsilon": float("nan") if eps is None else eps, "attempted": tried,
                         "succeeded": len(adv), "success_rate": len(adv) / tried if tried else float("nan"),
                         "flagged": fl, "recall": recall, "precision": prec, "fpr": fpr, "clean": n_clean,
                         "attack_seconds": secs, "budget_samples": settings.samples,
                         "budget_seconds": settings.seconds})
    path = out / "detect.parquet"
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    _report(out, table.to_pandas(), settings, len(normal), fit_s)
    return path


def _label(r) -> str:
    return r["attack"] if math.isnan(r["epsilon"]) else f"{r['attack']} ε={r['epsilon'] * 255:.3g}/255"


def _report(out: Path, df, s: Settings, n_normal: int, fit_s: float) -> None:
    from matplotlib.figure import Figure
    plots = out / rundir.PLOTS
    plots.mkdir(exist_ok=True)
    fig = Figure(figsize=(10, 4.5))
    ax = fig.subplots()
    labels = list(dict.fromkeys(_label(r) for _, r in df.iterrows()))
    width = 0.2
    for i, (det, clf) in enumerate([("slice", "tree"), ("slice", "forest"), ("featuremap", "tree"),
                                    ("featuremap", "forest")]):
        sub = df[(df.detector == det) & (df.classifier == clf)]
        vals = [sub[[_label(r) == lab for _, r in sub.iterrows()]].recall.fillna(0).mean() for lab in labels]
        ax.bar(np.arange(len(labels)) + (i - 1.5) * width, vals, width, label=f"{det} / {clf}")
    ax.set_xticks(np.arange(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("recall (flagged share of successful adversarial inputs)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("NNSlicer adversarial-input detection: slice vs FeatureMap")
    fig.tight_layout()
    with atomic_path(plots / "detect.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    lines = ["# Adversarial-input detection (NNSlicer §5.1)", "",
             f"Classifiers fitted on the slices of {n_normal} normal training inputs (criterion: predicted class; "
             f"features: {s.features}, θ = {s.theta:g}); clean FPR on {int(df.clean.max()) if len(df) else 0} "
             f"correctly classified test inputs. Budget per attack: {s.samples} inputs, {s.seconds:g} s "
             f"(fitting took {fit_s:.0f} s). Precision is for a 1:1 mix of successful adversarial and clean inputs. "
             "The paper (CIFAR-10, ResNet10, decision tree): mean recall 100 %, precision 83 %.", "",
             "| attack | attacked | succeeded | slice tree R / P | slice forest R / P | FeatureMap tree R / P | "
             "FeatureMap forest R / P |", "|---|---|---|---|---|---|---|"]

    def rp(sub):
        if not len(sub) or math.isnan(sub.recall.iloc[0]):
            return "–"
        return f"{sub.recall.iloc[0]:.2f} / {sub.precision.iloc[0]:.2f}"
    for lab in labels:
        sub = df[[_label(r) == lab for _, r in df.iterrows()]]
        cells = [rp(sub[(sub.detector == d) & (sub.classifier == c)]) for d, c in
                 [("slice", "tree"), ("slice", "forest"), ("featuremap", "tree"), ("featuremap", "forest")]]
        lines.append(f"| {lab} | {int(sub.attempted.iloc[0])} | {int(sub.succeeded.iloc[0])} | " + " | ".join(cells)
                     + " |")
    fprs = df.groupby(["detector", "classifier"]).fpr.first()
    lines += ["", "Clean false-positive rate: " + ", ".join(f"{d} {c} {v:.3f}" for (d, c), v in fprs.items()),
              "", "Not in Foolbox 3.3.4 (so not run): " + ", ".join(NOT_IN_FOOLBOX) + ".", "",
              "![detection recall](plots/detect.png)", ""]
    write_text(out / "detect.md", "\n".join(lines))
