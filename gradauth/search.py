"""Targeted level search (issue 12's core): go straight at the owner's target accuracies instead of a grid.

Three phases, all proposed by one pure-Python `Planner` over plain rows (no Ray), wrapped for Ray Tune by
`TargetedSearcher`:

- `curve`: cheap lock-only evaluations (`lock_curve`: many lock values in one task, no fine-tuning) find the lockable
  range [v_lo, v_hi] of lock values whose locked accuracy is ≤ the lock bound; a second curve task refines the
  boundary (the weakest lockable lock is where level 1 lives).
- `level`: per target, 1-D bracketing/interpolation on lines where fine_acc is roughly monotone:
  1. the lock line at the cheapest schedule S0 (fewest epochs, largest lr, most data, first scope): fine_acc falls as
     the lock grows;
  2. if even the weakest lockable lock is below the target at S0 (level 1 near the base): the epoch line at that lock
     (fine_acc rises with epochs); also used when the lock line has a gap around the target;
  3. if even the strongest lockable lock is above the target at S0 (a low level): lock lines at weaker schedules
     (smaller lr, less data, narrower scope).
  Observations are shared between targets (a point on a line serves every target on it). Extra seeds are spent only
  on a candidate whose mean is within `tolerance` of its target.
- `thief`: the owner's thief budget (data fractions × a schedule) from scratch and from the public model (the
  strongest lockable lock, also each hit level's lock, or the owner's list of public-lock candidates; as released
  and revived by the thief, `thief.forms`), as trials of the same sweep.

The search stops when every target is hit (with its seeds) and the thief trials ran, or the budget is spent; then
`Planner.summary()` names each missed target and why.

Per-epoch accuracies: fine-tuning uses a cosine learning rate over the *whole* schedule (engine.lr_at(step, total)),
so after epoch k of an E-epoch run the model is NOT what a k-epoch schedule would give (that one has annealed to lr 0
by step k). `valid_epoch_points` checks this with the real lr function: a prefix is only used when its learning rates
equal the shorter schedule's step for step; with today's cosine (and step) schedules that is the final epoch only,
so reported epoch accuracies are accepted but add no observations.

Wiring (not done here; config.py, sweep.py and select.py belong to other work):
- config: a `search:` section parsed by `SearchConfig.from_dict` (unknown keys refused); `search.mode: grid` (default)
  keeps today's sweep. With `targeted`, call `cfg.validate(base_acc, lock_bound, select.min_gap, lock.mode)` once the
  base accuracy is known (before Ray starts) so an infeasible intent exits 2 with one line.
- sweep: `Planner(search_cfg, ctx.base_acc, ctx.lock_bound, select.min_gap, importance_label, lock.mode)` →
  `TargetedSearcher(planner)` as `TuneConfig(search_alg=..., num_samples=-1)` instead of the grid's param_space;
  `trial_name(config)` for trial_name_creator / trial_dirname_creator; the trainable calls
  `search_trial(ctx, config, device, ds)` when the config has `phase` and reports the curve result as is, or the
  row with `row_complete: True` (a level trial also its model, as today). Rows of level and thief trials go to
  trials.parquet with a new `phase` column (grid trials: `grid`); curve points are not trials (no schedule): keep
  them in the searcher state (or a lock_curve.json). `Tuner.restore` restores the searcher (Tune calls `restore`).
- select: candidates are the rows with phase level (or grid); thief rows (trial_id `thief-…`, importance `scratch`
  or the lock's) give the best thief accuracy a level must beat by min_gap. `Planner.summary()` has the same
  figures for `gradauth status`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

from .config import SearchConfig, ThiefBudget  # noqa: F401 (re-exported)
from .errors import GradauthError
from .knobs import to_row
from .trial import TrialSpec

PHASES = ("curve", "level", "thief")
THIEF_INITS = ("none", "revive")   # trials.parquet's thief_init column
FORM_INIT = {"zeros": "none", "revive": "revive"}   # search.thief.forms → thief_init
SCRATCH = "scratch"          # importance label of a from-scratch thief trial (lock_mode "none", lock_value 0)
_EPS = 1e-9


_ROW_KEYS = ("trial_id", "dataset", "arch", "num_classes", "base_acc", "prun_acc", "fine_acc", "fine_top3", "status",
             "seconds", "locked_channels", "total_channels", "params", "flops", "git_sha", "config_hash")


def _plain(v):
    """A JSON-safe scalar: numpy numbers to Python, NaN to None."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)


# The owner's intent (`search:` config section) lives in config.py, so `gradauth status` reads it without torch.


# ------------------------------------------------------------------------------------------------- lock curve
def lock_curve(ctx, importance: str, mode: str, values, device=None) -> list[dict]:
    """Locked accuracy of MANY lock values in one call (no fine-tuning): [{lock_value, locked_channels,
    total_channels, prun_acc, prun_top3}], in the order of `values`. The dataset moves to `device` once."""
    import torch
    from .engine import evaluate
    from .prune import count_removed
    from .trial import locked_model
    device = device or torch.device("cpu")
    ds = ctx.ds.to(device)
    out = []
    for v in values:
        model, masks = locked_model(ctx, TrialSpec(importance, mode, float(v), 0, 0.0, 1.0, "all", 0))
        acc, top3 = evaluate(model.to(device), ds, ds.test)
        locked, total = count_removed(masks)
        out.append({"lock_value": float(v), "locked_channels": locked, "total_channels": total,
                    "prun_acc": acc, "prun_top3": top3})
    return out


def run_thief(ctx, spec: TrialSpec, device=None, ds=None, thief_init: str = "none") -> dict:
    """One thief trial as a plain function: the public model (base, `spec`'s lock, locked filters erased as
    `gradauth release` writes it; with thief_init `revive` the careful thief first resets the visibly locked channels,
    release.revive) or a fresh model (importance `scratch`), fine-tuned with every weight free on
    `spec.data_fraction` of the training split. Returns {prun_acc, fine_acc, fine_top3, seconds}."""
    import torch
    from .engine import evaluate
    from .finetune import finetune
    from .models import build_model
    from .release import locked_copy
    t0 = time.perf_counter()
    device = device or torch.device("cpu")
    ds = ds or ctx.ds.to(device)
    if spec.importance == SCRATCH:
        torch.manual_seed(spec.seed)
        s = ctx.spec
        model = build_model(s.arch, s.num_classes, s.in_channels, s.width)
    else:
        from .release import HEAD_SEED, revive
        from .trial import locked_model
        base, masks = locked_model(ctx, spec)
        model = locked_copy(base, masks, head_seed=HEAD_SEED if ctx.erase_head else None)
        if thief_init == "revive":
            revive(model, seed=spec.seed)
    model.to(device)
    prun_acc, _ = evaluate(model, ds, ds.test)
    finetune(model, {}, ds, spec.schedule, batch_size=ctx.batch_size, momentum=ctx.momentum,
             weight_decay=ctx.weight_decay, precision=ctx.precision)
    fine_acc, top3 = evaluate(model, ds, ds.test)
    return {"prun_acc": prun_acc, "fine_acc": fine_acc, "fine_top3": top3, "status": "ok",
            "seconds": time.perf_counter() - t0}


def search_trial(ctx, config: dict, device=None, ds=None):
    """Run one searcher config as a plain function: what the sweep's trainable calls when a config has `phase`.
    Returns (result to report, fine-tuned model or None, masks or None):
    curve → ({"curve": [points], "seconds"}, None, None); level → trial.run_trial's (row, model, masks) with
    `phase`; thief → (row with trial_id `thief-…`, None, None)."""
    import torch
    from .trial import base_row, run_trial
    device = device or torch.device("cpu")
    phase = config.get("phase")
    if phase == "curve":
        c = config["curve"]
        t0 = time.perf_counter()
        pts = lock_curve(ctx, c["importance"], c["lock_mode"], c["values"], device)
        return {"curve": pts, "seconds": time.perf_counter() - t0}, None, None
    if phase not in ("level", "thief"):
        raise GradauthError(f"searcher config has phase {phase!r}: expected curve, level or thief")
    spec = TrialSpec(**config["trial"])
    if phase == "level":
        row, model, masks = run_trial(ctx, spec, device, ds=ds)
        return row | {"phase": "level"}, model, masks
    init = config.get("thief_init", "none")
    if init not in THIEF_INITS:
        raise GradauthError(f"searcher config has thief_init {init!r}: expected one of {', '.join(THIEF_INITS)}")
    out = run_thief(ctx, spec, device, ds, init)
    locked = {"locked_channels": 0, "total_channels": None}
    if spec.importance != SCRATCH:
        from .prune import count_removed, lock_masks
        n, total = count_removed(lock_masks(ctx.scores[spec.importance], spec.lock_mode, spec.lock_value))
        locked = {"locked_channels": n, "total_channels": total}
    row = base_row(ctx, spec) | locked | out | {"trial_id": _key("thief", spec, init), "phase": "thief",
                                                "thief_init": init, "params": None, "flops": None}
    return row, None, None


def valid_epoch_points(epochs: int, epoch_accs: list[float], steps_per_epoch: int, lr: float,
                       schedule: str = "cosine") -> list[tuple[int, float]]:
    """(k, acc) for each epoch k of an `epochs`-epoch run whose accuracy equals what a k-epoch schedule gives: the
    batches of epoch e depend only on (seed, e), so the prefix is the same run iff every step's learning rate is
    (engine.lr_at with the shorter total). Cosine and step schedules anneal over the whole run: final epoch only."""
    from .engine import lr_at
    out = []
    for k, acc in enumerate(epoch_accs[:epochs], start=1):
        n, total = k * steps_per_epoch, epochs * steps_per_epoch
        if all(math.isclose(lr_at(s, total, lr, schedule), lr_at(s, n, lr, schedule), rel_tol=1e-12, abs_tol=0)
               for s in range(n)):
            out.append((k, float(acc)))
    return out


# --------------------------------------------------------------------------------------------------- planner
def _key(phase: str, spec: TrialSpec, thief_init: str = "none") -> str:
    if phase == "level":
        return spec.trial_id
    return f"{phase}-{spec.trial_id}" + ("" if thief_init == "none" else f"-{thief_init}")


def trial_name(config: dict) -> str:
    """Tune trial name / trials.parquet trial_id of a searcher config (level trials keep today's ids; a revived
    thief's id ends in `-revive`)."""
    if config.get("phase") == "curve":
        return config["key"]
    return _key(config.get("phase", "level"), TrialSpec(**config["trial"]), config.get("thief_init", "none"))


class Planner:
    """The targeted search as a state machine over plain rows. Deterministic: the same observations give the same
    proposals, and `state()`/`from_state()` round-trip through JSON."""

    def __init__(self, cfg: SearchConfig, base_acc: float, lock_bound: float, min_gap: float,
                 importance: str = "bn_gamma", lock_mode: str = "rate"):
        self.cfg, self.base_acc, self.lock_bound, self.min_gap = cfg, float(base_acc), float(lock_bound), float(min_gap)
        self.importance, self.lock_mode = importance, lock_mode
        self.targets = cfg.validate(base_acc, lock_bound, min_gap, lock_mode)
        if cfg.mode != "targeted":
            raise GradauthError("search: the planner runs only with `search.mode: targeted`")
        if lock_mode != "rate":
            # a threshold grows weaker as it grows (fewer channels above it): the lines here assume the opposite
            raise GradauthError(f"search: the targeted search takes rate locks only, got lock.mode {lock_mode!r}: "
                                f"use lock.mode: rate, or search.mode: grid for threshold locks")
        self.curve: dict[float, dict] = {}     # lock value -> curve point
        self.total_channels: int | None = None
        self.obs: dict[str, dict] = {}         # key -> {phase, spec, row}  (finished trials)
        self.pending: dict[str, dict] = {}     # key -> {phase, spec|values}
        self.failed: dict[str, dict] = {}      # key -> {phase, spec, why}
        self.curve_tasks = 0
        self.seconds = 0.0
        self.trials = 0                        # finished + failed trials (curve tasks included)

    # -------------------------------------------------------------------------------------------- state as JSON
    def state(self) -> dict:
        return {"version": 1, "cfg": self.cfg.to_dict(), "base_acc": self.base_acc, "lock_bound": self.lock_bound,
                "min_gap": self.min_gap, "importance": self.importance, "lock_mode": self.lock_mode,
                "curve": [self.curve[v] for v in sorted(self.curve)], "total_channels": self.total_channels,
                "obs": self.obs, "pending": self.pending, "failed": self.failed, "curve_tasks": self.curve_tasks,
                "seconds": self.seconds, "trials": self.trials}

    @classmethod
    def from_state(cls, s: dict) -> "Planner":
        """A planner from `state()`'s JSON; a damaged or foreign state is refused with one line (it may come from
        another machine's storage bucket)."""
        if not isinstance(s, dict) or s.get("version") != 1:
            raise GradauthError("search state is not a version-1 planner state: start the search afresh "
                                "(without --resume)")
        try:
            return cls._from_state(s)
        except GradauthError as e:
            raise GradauthError(f"search state holds a config that is refused now ({e}): start the search afresh "
                                f"(without --resume)") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise GradauthError(f"search state is damaged ({type(e).__name__}: {e}): start the search afresh "
                                f"(without --resume)") from None

    @classmethod
    def _from_state(cls, s: dict) -> "Planner":
        p = cls(SearchConfig.from_dict(s["cfg"]), s["base_acc"], s["lock_bound"], s["min_gap"], s["importance"],
                s["lock_mode"])
        p.curve = {float(c["lock_value"]): c for c in s["curve"]}
        p.total_channels, p.obs, p.pending, p.failed = s["total_channels"], s["obs"], s["pending"], s["failed"]
        p.curve_tasks, p.seconds, p.trials = int(s["curve_tasks"]), float(s["seconds"]), int(s["trials"])
        for name in ("obs", "pending", "failed"):
            d = getattr(p, name)
            if not isinstance(d, dict) or not all(isinstance(v, dict) and v.get("phase") in PHASES for v in d.values()):
                raise ValueError(f"`{name}` is not a mapping of trials")
            for v in d.values():
                if v["phase"] != "curve":
                    TrialSpec(**v["spec"])   # every spec must be one
        return p

    # ---------------------------------------------------------------------------------------------- observations
    def observe_curve(self, key: str, points: list[dict], seconds: float = 0.0) -> None:
        self.pending.pop(key, None)
        self.trials += 1
        self.seconds += float(seconds)
        for pt in points:
            self.total_channels = int(pt["total_channels"])
        for pt in points:  # keyed by the lock actually applied (rate: whole channels), as level trials are
            v = self._q(float(pt["lock_value"]))
            self.curve[v] = {"lock_value": v, "locked_channels": int(pt["locked_channels"]),
                             "total_channels": int(pt["total_channels"]), "prun_acc": float(pt["prun_acc"])}

    def observe(self, key: str, row: dict) -> None:
        """A finished level or thief trial; `row` is its trials.parquet row (prun_acc, fine_acc, status, seconds,
        locked_channels, total_channels; optional epoch_accs)."""
        p = self.pending.pop(key, None)
        if p is None:
            return  # not ours, or already observed (a restored searcher may hear a trial twice)
        self.trials += 1
        self.seconds += float(row.get("seconds") or 0.0)
        keep = {k: _plain(v) for k, v in row.items() if k in _ROW_KEYS}
        self.obs[key] = {"phase": p["phase"], "spec": p["spec"], "row": keep} | (
            {"target": p["target"]} if "target" in p else {}) | (   # the target it was proposed for (status counts)
            {"thief_init": p["thief_init"]} if "thief_init" in p else {})   # a thief's start: as released or revived
        if p["phase"] == "level" and row.get("total_channels"):
            self.total_channels = int(row["total_channels"])

    def fail(self, key: str, why: str = "failed") -> None:
        p = self.pending.pop(key, None)
        if p is not None:
            self.trials += 1
            self.failed[key] = p | {"why": why}

    # ----------------------------------------------------------------------------------------------- geometry
    def _q(self, v: float) -> float:
        """A lock value on the search's resolution: one channel (rate), lock_step or 1/1000 of the range."""
        if self.lock_mode == "rate" and self.total_channels:
            k = max(1, round(v * self.total_channels))
            return round(k / self.total_channels, 10)
        lo, hi = self.cfg.lock_range
        step = self.cfg.lock_step or (hi - lo) / 1000
        return round(lo + round((v - lo) / step) * step, 10)

    def _res(self) -> float:
        if self.lock_mode == "rate" and self.total_channels:
            return 1 / self.total_channels
        lo, hi = self.cfg.lock_range
        return self.cfg.lock_step or (hi - lo) / 1000

    def _prun(self) -> dict[float, float]:
        """Locked accuracy per lock value: the curve, plus every level trial's own measurement."""
        out = {v: c["prun_acc"] for v, c in self.curve.items()}
        for o in self.obs.values():
            if o["phase"] == "level" and o["row"].get("prun_acc") is not None:
                out[float(o["spec"]["lock_value"])] = float(o["row"]["prun_acc"])
        return out

    def lockable_range(self) -> tuple[float, float] | None:
        """(v_lo, v_hi): the weakest lock from which every larger measured lock is ≤ the lock bound, and the largest
        measured lockable lock. None before the curve or if nothing locks."""
        pr = self._prun()
        vs = sorted(pr)
        if not vs or pr[vs[-1]] > self.lock_bound + _EPS:
            return None
        i = len(vs) - 1
        while i > 0 and pr[vs[i - 1]] <= self.lock_bound + _EPS:
            i -= 1
        return vs[i], vs[-1]

    def _last_unlockable(self) -> float | None:
        rng = self.lockable_range()
        below = [v for v in self._prun() if rng and v < rng[0]]
        return max(below) if below else None

    def _s0(self) -> tuple:
        c = self.cfg
        return (c.epochs[0], max(c.lr), max(c.data_fraction), c.scope[0])

    def _weaker(self) -> list[tuple]:
        """Schedules at the fewest epochs other than S0, strongest first (lr × data fraction, then scope order)."""
        c = self.cfg
        out = [(c.epochs[0], lr, f, s) for s in c.scope for lr in c.lr for f in c.data_fraction]
        out = [s for s in out if s != self._s0()]
        return sorted(out, key=lambda s: (c.scope.index(s[3]), -s[1] * s[2], -s[1]))

    def _spec(self, v: float, sched: tuple, seed: int) -> TrialSpec:
        e, lr, f, scope = sched
        return TrialSpec(self.importance, self.lock_mode, float(v), int(e), float(lr), float(f), scope, int(seed))

    def _cand(self, v: float, sched: tuple) -> str:
        return self._spec(v, sched, 0).trial_id.rsplit("-s", 1)[0]

    def _level_stats(self) -> dict[str, dict]:
        """Candidate (lock, schedule) → {v, sched, accs{seed: acc}, prun, pending_seeds, failed}."""
        out: dict[str, dict] = {}

        def slot(spec):
            sched = (spec["epochs"], spec["lr"], spec["data_fraction"], spec["scope"])
            k = self._cand(spec["lock_value"], sched)
            return out.setdefault(k, {"v": float(spec["lock_value"]), "sched": tuple(sched), "accs": {},
                                      "prun": None, "pending": set(), "failed": set(), "unlockable": False})
        for o in self.obs.values():
            if o["phase"] != "level":
                continue
            s, r = slot(o["spec"]), o["row"]
            s["prun"] = r.get("prun_acc")
            if r.get("status") == "ok" and r.get("fine_acc") is not None:
                s["accs"][int(o["spec"]["seed"])] = float(r["fine_acc"])
            elif r.get("status") == "unlockable":
                s["unlockable"] = True
        for key, p in self.pending.items():
            if p["phase"] == "level":
                slot(p["spec"])["pending"].add(int(p["spec"]["seed"]))
        for key, f in self.failed.items():
            if f.get("phase") == "level":
                slot(f["spec"])["failed"].add(int(f["spec"]["seed"]))
        return out

    @staticmethod
    def _mean(s: dict) -> float | None:
        return sum(s["accs"].values()) / len(s["accs"]) if s["accs"] else None

    @staticmethod
    def _std(s: dict) -> float:
        a = list(s["accs"].values())
        if len(a) < 2:
            return 0.0
        m = sum(a) / len(a)
        return math.sqrt(sum((x - m) ** 2 for x in a) / (len(a) - 1))

    # ------------------------------------------------------------------------------------------ per-target logic
    def decide(self, k: int, stats: dict | None = None) -> dict:
        """What target k needs next: {"do": "probe"|"seed"|"wait"|"hit"|"miss", ...}. A pure function of the
        observations (and what is pending)."""
        stats = self._level_stats() if stats is None else stats
        T, tol = self.targets[k], self.cfg.tolerance
        rng = self.lockable_range()
        if any(f.get("phase") == "curve" for f in self.failed.values()):
            return {"do": "miss", "why": "the lock-curve task failed: see the sweep's log, then --resume"}
        if rng is None:
            if self.curve_tasks >= 1 and not self._curve_pending():
                return {"do": "miss", "why": f"no lock value in search.lock_range {self.cfg.lock_range} takes the "
                                             f"model to ≤ lock bound {self.lock_bound:.3f}: widen the range"}
            return {"do": "wait"}
        if self._curve_pending() or self.curve_tasks < self._curve_rounds_needed():
            return {"do": "wait"}
        # 1. a candidate within tolerance: confirm it with seeds.
        close = [s for s in stats.values() if not s["unlockable"] and self._mean(s) is not None
                 and abs(self._mean(s) - T) <= tol + _EPS]
        if close:
            c = min(close, key=lambda s: (abs(self._mean(s) - T), s["sched"][0] * s["sched"][2], s["v"]))
            have = set(c["accs"]) | c["pending"] | c["failed"]
            missing = [sd for sd in range(self.cfg.seeds) if sd not in have]
            if missing:
                return {"do": "seed", "v": c["v"], "sched": c["sched"], "seeds": missing}
            if c["pending"]:
                return {"do": "wait"}
            return {"do": "hit", "v": c["v"], "sched": c["sched"], "mean": self._mean(c), "std": self._std(c),
                    "seeds": len(c["accs"])}
        v_lo, v_hi = rng
        s0 = self._s0()
        # 2. a staircase of 1-D lines. Lock lines at the fewest epochs (S0 first, then weaker schedules); where a
        # lock line cannot land on T (its weakest lock is short of T, or fine_acc jumps over T between two
        # neighbouring locks) the epoch line at that lock; where the epoch line jumps over T between e and e + 1
        # epochs, the lock line at e + 1 epochs from that lock on (a stronger lock brings it down onto T).
        reasons: list[str] = []
        queue = [("lock", tuple(sc), v_lo) for sc in [s0, *self._weaker()]]
        seen = set()
        while queue:
            kind, sched, x0 = queue.pop(0)
            if (kind, sched, x0) in seen:
                continue
            seen.add((kind, sched, x0))
            label = f"{sched[0]} ep lr {sched[1]:g} data {sched[2]:g} {sched[3]}"
            if kind == "lock":
                r = self._line(stats, T, "lock", sched, x0, v_hi)
                if r["do"] in ("probe", "wait"):
                    return r
                if r["do"] == "broken":
                    reasons.append(f"{label}: {r['why']}")
                elif r["do"] == "over_at_hi":
                    reasons.append(f"{label}: even lock {v_hi:g} gives {r['acc']:.3f}")
                elif r["do"] == "short_at_lo":
                    queue.insert(0, ("epochs", sched, x0))
                    reasons.append(f"{label}: lock {x0:g} gives {r['acc']:.3f}")
                else:  # gap
                    queue.insert(0, ("epochs", sched, r["b"]))
                    reasons.append(f"{label}: fine_acc jumps from {r['acc_a']:.3f} to {r['acc_b']:.3f} between "
                                   f"locks {r['a']:g} and {r['b']:g}")
            else:
                e = self._line(stats, T, "epochs", sched, x0, None)
                if e["do"] in ("probe", "wait"):
                    return e
                if e["do"] == "short_at_hi":
                    miss = self._epoch_outcome(e, T, x0)
                    if sched == tuple(s0) and x0 == v_lo:
                        return miss  # the strongest schedule at the weakest lock falls short: nothing reaches higher
                    reasons.append(f"epochs at lock {x0:g}: {miss['why']}")
                elif e["do"] == "gap":
                    queue.insert(0, ("lock", (int(e["b"]), *sched[1:]), x0))
                    reasons.append(f"epochs at lock {x0:g}: {e['why']}")
                else:
                    reasons.append(f"epochs at lock {x0:g}: {e.get('why', e['do'])}")
        return {"do": "miss", "why": "no lock × schedule in the search ranges lands within "
                                     f"{tol:g} of {T:.3f}: " + "; ".join(reasons[-6:]) + ": widen search.lr, "
                                     "search.data_fraction or search.epochs, or move the target"}

    def _epoch_outcome(self, e: dict, T: float, v: float) -> dict:
        if e["do"] in ("probe", "wait"):
            return e
        if e["do"] == "broken":
            return {"do": "miss", "why": e["why"]}
        if e["do"] == "short_at_hi" and "extrapolated" in e:
            return {"do": "miss", "why": f"the weakest lockable lock {v:g} recovers {e['acc']:.3f} at the most "
                                         f"epochs tried, and the trend needs ≥ {e['extrapolated']:g} epochs for "
                                         f"target {T:.3f} (search.epochs ends at {self.cfg.epochs[1]}): raise "
                                         f"search.epochs' upper end, or lower the target"}
        if e["do"] == "short_at_hi":
            return {"do": "miss", "why": f"the weakest lockable lock {v:g} recovers at most {e['acc']:.3f} with "
                                         f"{self.cfg.epochs[1]} epochs (target {T:.3f}): raise search.epochs' "
                                         f"upper end, or lower the target"}
        return {"do": "miss", "why": f"at lock {v:g} no whole number of epochs lands within "
                                     f"{self.cfg.tolerance:g} of {T:.3f} ({e.get('why', e['do'])})"}

    def _line(self, stats, T, kind, sched, v, v_hi) -> dict:
        """Bracket target T on one line. kind lock: x = lock value in [v, v_hi] at `sched`, fine_acc falls with x;
        kind epochs: x = epochs in [e_min, e_max] at lock v (sched's lr, fraction, scope), rises with x.
        Returns probe/wait, or why the line cannot give T: short_at_lo / over_at_hi (lock) / short_at_hi (epochs) /
        gap (no grid point left between two bracketing points)."""
        tol = self.cfg.tolerance
        if kind == "lock":
            lo, hi, sign = v, v_hi, -1.0
            pts = {s["v"]: s for s in stats.values() if s["sched"] == tuple(sched) and lo - _EPS <= s["v"] <= hi + _EPS}
            at = lambda x: (self._q(x), tuple(sched))
            grid_next = lambda a, b: self._between_locks(a, b)
        else:
            lo, hi, sign = self.cfg.epochs[0], self.cfg.epochs[1], 1.0
            rest = tuple(sched[1:])
            pts = {s["sched"][0]: s for s in stats.values() if abs(s["v"] - v) < _EPS and tuple(s["sched"][1:]) == rest}
            at = lambda x: (v, (int(x), *rest))
            grid_next = lambda a, b: list(range(int(a) + 1, int(b)))
        # the probe must carry the spec it stands for
        def probe(x):
            pv, ps = at(x)
            return {"do": "probe", "v": pv, "sched": ps}
        vals, waiting = {}, False
        for x, s in pts.items():
            if s["unlockable"] or s["failed"] and not s["accs"]:
                continue
            m = self._mean(s)
            if m is None:
                waiting |= bool(s["pending"])
                continue
            vals[x] = sign * (m - T)   # g(x): increasing in x, 0 at the target
        if waiting:
            if kind == "lock" and lo in pts and lo not in vals and hi not in pts:
                return probe(hi)       # the line's two ends are independent: keep a second worker busy
            return {"do": "wait"}
        if lo not in vals:
            if lo in pts:              # the start point failed or does not lock: nothing to bracket from
                return {"do": "broken", "why": f"the trial at {lo:g} failed or did not lock"}
            return probe(lo)
        acc = lambda x: T + sign * vals[x]
        if vals[lo] > tol:             # already past the target at the start of the line
            return {"do": "short_at_lo" if kind == "lock" else "over_at_lo", "acc": acc(lo)}
        above = sorted(x for x in vals if vals[x] > tol)
        if above:                      # a bracket [a, b]: interpolate, keep to untried grid points inside
            b = min(above)
            a = max(x for x in vals if x < b)
            ga, gb = vals[a], vals[b]
            x = a + (0 - ga) * (b - a) / (gb - ga) if gb > ga else (a + b) / 2
            cands = [c for c in grid_next(a, b) if c not in pts]
            if not cands:
                return {"do": "gap", "a": a, "b": b, "acc_a": acc(a), "acc_b": acc(b),
                        "why": f"no untried value between {a:g} ({acc(a):.3f}) and {b:g} ({acc(b):.3f})"}
            return probe(min(cands, key=lambda c: (abs(c - x), c)))
        xs = sorted(vals)              # every point short of the target: go further along the line
        xmax = xs[-1]
        end = "over_at_hi" if kind == "lock" else "short_at_hi"
        if xmax >= hi - _EPS:
            return {"do": end, "acc": acc(xmax)}
        if len(xs) >= 2 and vals[xs[-1]] > vals[xs[-2]] + 1e-12:
            x1, x2 = xs[-2], xs[-1]
            guess = x2 + (0 - vals[x2]) * (x2 - x1) / (vals[x2] - vals[x1])
            if kind == "epochs" and guess > 2 * hi:
                # recovery saturates with epochs, so a straight line through the last two points underestimates
                # the epochs needed: beyond twice the range's end, the range cannot reach the target
                return {"do": end, "acc": acc(xmax), "extrapolated": round(guess, 1)}
        else:
            guess = hi if kind == "lock" else 2 * xmax
        if kind == "epochs":           # at most double the epochs per step: a long schedule is the costly probe
            guess = min(hi, max(xmax + 1, min(math.ceil(guess), 2 * xmax)))
        cands = [c for c in grid_next(xmax, hi) if c not in pts] + ([hi] if hi not in pts else [])
        if not cands:
            return {"do": end, "acc": acc(xmax)}
        return probe(min(cands, key=lambda c: (abs(c - guess), c)))

    def _between_locks(self, a: float, b: float) -> list[float]:
        """Lock values on the resolution strictly between a and b (at most 64, evenly picked)."""
        res = self._res()
        n = int(math.floor((b - a) / res + 1e-9))
        xs = sorted({self._q(a + i * res) for i in range(1, n + 1)} - {self._q(a), self._q(b)})
        xs = [x for x in xs if a + _EPS < x < b - _EPS]
        if len(xs) > 64:
            xs = [xs[round(i * (len(xs) - 1) / 63)] for i in range(64)]
        return xs

    # -------------------------------------------------------------------------------------------------- curve
    def _curve_pending(self) -> bool:
        return any(p["phase"] == "curve" for p in self.pending.values())

    def _curve_rounds_needed(self) -> int:
        """Round 1 spans the lock range; round 2 refines the boundary below v_lo when there is room."""
        if self.curve_tasks == 0:
            return 1
        rng, gap = self.lockable_range(), self._last_unlockable()
        if self.curve_tasks == 1 and rng and gap is not None and self._between_locks(gap, rng[0]):
            return 2
        return self.curve_tasks

    def _curve_values(self) -> list[float]:
        lo, hi = self.cfg.lock_range
        n = self.cfg.lock_points
        if self.curve_tasks == 0:
            vals = [lo + i * (hi - lo) / (n - 1) for i in range(n)]
        else:
            rng, gap = self.lockable_range(), self._last_unlockable()
            xs = self._between_locks(gap, rng[0])
            m = min(n, len(xs))
            vals = [xs[round(i * (len(xs) - 1) / max(1, m - 1))] for i in range(m)]
        return sorted({round(self._q(v), 10) for v in vals})

    # ---------------------------------------------------------------------------------------------- proposing
    def budget_left(self) -> int | None:
        if self.cfg.max_trials is None:
            return None
        return self.cfg.max_trials - self.trials - len(self.pending)

    def seconds_spent(self) -> bool:
        return self.cfg.max_trial_seconds is not None and self.seconds >= self.cfg.max_trial_seconds

    def _thief_specs(self) -> list[tuple[TrialSpec, str]]:
        """Thief trials as (spec, thief_init): from scratch, and from the public model in each of `thief.forms` at
        the public-lock candidates (the strongest lockable lock, each hit level's lock, or the owner's list): the
        locks the release may choose its public lock from."""
        rng = self.lockable_range()
        if rng is None:
            return []
        th = self.cfg.thief
        lr = th.lr if th.lr is not None else max(self.cfg.lr)
        if isinstance(th.public_locks, list):
            locks = sorted({self._q(float(v)) for v in th.public_locks})
        else:
            locks = [rng[1]]
            stats = self._level_stats()
            for k in (range(len(self.targets)) if th.public_locks == "levels" else ()):
                d = self.decide(k, stats)
                if d["do"] == "hit" and d["v"] not in locks:
                    locks.append(d["v"])
        inits = [FORM_INIT[f] for f in th.forms]
        out = []
        for f in th.fractions:
            for seed in range(th.seeds):
                out.append((TrialSpec(SCRATCH, "none", 0.0, th.epochs, float(lr), float(f), "all", seed), "none"))
                out += [(TrialSpec(self.importance, self.lock_mode, float(v), th.epochs, float(lr), float(f), "all",
                                   seed), init) for v in locks for init in inits]
        return out

    def _thief_reserve(self) -> int:
        th = self.cfg.thief
        done = sum(1 for o in self.obs.values() if o["phase"] == "thief")
        pend = sum(1 for p in self.pending.values() if p["phase"] == "thief")
        return max(0, th.trials() - done - pend)

    def propose(self, n: int = 1) -> list[dict]:
        """Up to n new trial configs ({"trial", "phase", "key", ...}), registered as pending. Empty when nothing
        can start now (waiting on results, or the budget is spent)."""
        out: list[dict] = []
        while len(out) < n:
            nxt = self._next()
            if nxt is None:
                break
            self.pending[nxt["key"]] = {k: nxt[k] for k in ("phase", "spec", "values", "target", "thief_init")
                                        if k in nxt}
            out.append(self._config(nxt))
        return out

    def _config(self, p: dict) -> dict:
        if p["phase"] == "curve":
            return {"phase": "curve", "key": p["key"],
                    "curve": {"importance": self.importance, "lock_mode": self.lock_mode, "values": p["values"]}}
        c = {"trial": p["spec"], "phase": p["phase"]}
        if "target" in p:
            c["target"] = p["target"]
        if p["phase"] == "thief":
            c["thief"] = SCRATCH if p["spec"]["importance"] == SCRATCH else "public"
            c["thief_init"] = p.get("thief_init", "none")
        return c

    def _next(self) -> dict | None:
        left = self.budget_left()
        if (left is not None and left <= 0) or self.seconds_spent():
            return None
        if self.curve_tasks < self._curve_rounds_needed() and not self._curve_pending():
            values = self._curve_values()
            self.curve_tasks += 1
            return {"phase": "curve", "key": f"curve-{self.curve_tasks}", "values": values}
        if self._curve_pending() or self.lockable_range() is None:
            return None
        stats = self._level_stats()
        decisions = [self.decide(k, stats) for k in range(len(self.targets))]
        reserve = self._thief_reserve()
        # seeds first (they finish hits), then probes, then thief trials
        fresh = lambda p: p if p["key"] not in self.obs and p["key"] not in self.pending else None
        for k, d in enumerate(decisions):
            if d["do"] == "seed" and fresh(self._level(d["v"], d["sched"], d["seeds"][0], k)):
                return self._level(d["v"], d["sched"], d["seeds"][0], k)
        if left is None or left - reserve > 0:
            for k, d in enumerate(decisions):
                if d["do"] == "probe" and fresh(self._level(d["v"], d["sched"], 0, k)):
                    return self._level(d["v"], d["sched"], 0, k)
        for spec, init in self._thief_specs():
            key = _key("thief", spec, init)
            if key not in self.obs and key not in self.pending and key not in self.failed:
                return {"phase": "thief", "key": key, "spec": asdict(spec), "thief_init": init}
        return None

    def _level(self, v, sched, seed, k) -> dict:
        spec = self._spec(v, sched, seed)
        return {"phase": "level", "key": _key("level", spec), "spec": asdict(spec), "target": k}

    def finished(self) -> bool:
        """Nothing in flight and nothing left to propose (every target settled, or the budget spent)."""
        if self.pending:
            return False
        left = self.budget_left()
        if (left is not None and left <= 0) or self.seconds_spent():
            return True
        snapshot = json.dumps(self.state(), sort_keys=True)
        probe = Planner.from_state(json.loads(snapshot))
        return not probe.propose(1)

    # ---------------------------------------------------------------------------------------------- outcome
    def summary(self) -> dict:
        """Per target: hit, searching (in progress, for `gradauth status`) or missed (and why), with the candidate;
        whether the hit levels keep the selector's spacing rules; the spend; the thief figures."""
        stats = self._level_stats()
        done = self.finished()
        rows = []
        spent = [0] * len(self.targets)   # level trials proposed for each target (finished, failed, in flight)
        for o in (*self.obs.values(), *self.failed.values(), *self.pending.values()):
            if isinstance(o.get("target"), int) and 0 <= o["target"] < len(spent):
                spent[o["target"]] += 1
        for k, T in enumerate(self.targets):
            d = self.decide(k, stats)
            r = {"level": k + 1, "target": T, "trials": spent[k]}
            if d["do"] == "hit":
                r |= {"status": "hit", "lock_value": d["v"], "schedule": list(d["sched"]), "fine_acc": d["mean"],
                      "fine_acc_std": d["std"], "seeds": d["seeds"]}
            elif d["do"] == "miss":
                r |= {"status": "missed", "why": d["why"]}
            else:
                best = min((s for s in stats.values() if self._mean(s) is not None),
                           key=lambda s: abs(self._mean(s) - T), default=None)
                near = (f"; nearest so far {self._mean(best):.3f} (lock {best['v']:g}, schedule {best['sched']})"
                        if best else "")
                if not done:
                    r |= {"status": "searching", "why": f"in progress{near}"}
                    rows.append(r)
                    continue
                r |= {"status": "missed", "why": f"trial budget spent before this target was settled "
                                                 f"({self.trials} trials, {self.seconds:.0f} s){near}"}
            rows.append(r)
        thief, pub = {}, {}   # fraction → {thief: best acc}; public lock → fraction → best acc over its forms
        for o in self.obs.values():
            if o["phase"] != "thief" or o["row"].get("fine_acc") is None:
                continue
            s, acc = o["spec"], float(o["row"]["fine_acc"])
            kind = SCRATCH if s["importance"] == SCRATCH else f"public {s['lock_value']:g}" + (
                "" if o.get("thief_init", "none") == "none" else f" {o['thief_init']}")
            f = thief.setdefault(str(s["data_fraction"]), {})
            f[kind] = max(f.get(kind, 0.0), acc)
            if s["importance"] != SCRATCH:
                at = pub.setdefault(float(s["lock_value"]), {})
                at[str(s["data_fraction"])] = max(at.get(str(s["data_fraction"]), 0.0), acc)
        # every measured thief counts against a level (the selector's rule), not only the public lock chosen
        best_thief = max((a for f in thief.values() for a in f.values()), default=None)
        for r in rows:
            if r["status"] == "hit" and best_thief is not None:
                r["margin_over_thief"] = r["fine_acc"] - best_thief
                r["sellable"] = r["margin_over_thief"] >= self.min_gap - _EPS
        # the public lock release would choose: the smallest worst head start over the fractions (release.choose_public)
        worst = {v: max(a[fr] - thief[fr][SCRATCH] for fr in a) for v, a in pub.items()
                 if all(SCRATCH in thief[fr] for fr in a) and set(a) == set(thief)}
        public_lock = min(worst, key=lambda v: (worst[v], -v)) if worst else None
        if public_lock is not None:
            for fr, f in thief.items():   # what the public model gives a thief over scratch
                f["head_start"] = pub[public_lock][fr] - f[SCRATCH]
        hits = [r for r in rows if r["status"] == "hit"]
        spaced = all(a["fine_acc"] - b["fine_acc"] >= self.min_gap - _EPS
                     and a["fine_acc"] - b["fine_acc"] > 2 * max(a["fine_acc_std"], b["fine_acc_std"])
                     for a, b in zip(hits, hits[1:]))
        by_phase = {ph: 0.0 for ph in PHASES}
        by_phase["curve"] = self.seconds - sum(float(o["row"].get("seconds") or 0.0) for o in self.obs.values())
        for o in self.obs.values():
            by_phase[o["phase"]] += float(o["row"].get("seconds") or 0.0)
        return {"targets": self.targets, "levels": rows, "trials": self.trials, "trial_seconds": self.seconds,
                "seconds_by_phase": by_phase, "finished": done, "spaced": spaced,
                "thief": thief, "public_lock": public_lock, "all_hit": all(r["status"] == "hit" for r in rows)}

    def level_rows(self) -> list[dict]:
        """The finished level trials as (partial) trials.parquet rows, for the selector."""
        out = []
        for key, o in self.obs.items():
            if o["phase"] == "level":
                t = TrialSpec(**o["spec"])  # its lock and schedule columns come from their fields (knobs.py)
                out.append({**o["row"], "trial_id": key, **to_row(t.lock), **to_row(t.schedule)})
        return out


# ------------------------------------------------------------------------------------------------ Ray Tune
def _searcher_base():
    from ray.tune.search import Searcher
    return Searcher


class TargetedSearcher(_searcher_base()):
    """Ray Tune searcher around a Planner. Configs are {"trial": asdict(TrialSpec), "phase", ...} (curve tasks:
    {"phase": "curve", "key", "curve": {importance, lock_mode, values}}); at most `max_concurrent` in flight.
    save/restore write the planner's state as JSON (never pickle), so `--resume` continues the search.

    The trainable reports, at its end, `row_complete: True` and the row (level/thief), or `curve: [points]` and
    `seconds` (curve)."""

    def __init__(self, planner: Planner | None = None, max_concurrent: int | None = None):
        super().__init__()  # no metric: the planner reads whole rows, and curve tasks report no fine_acc
        self.planner = planner
        self.max_concurrent = max_concurrent or (planner.cfg.max_concurrent if planner else 1)
        self.live: dict[str, str] = {}   # Tune trial id -> planner key

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the planner defines the space; Tune's metric/mode are not used

    def suggest(self, trial_id: str):
        if len(self.live) >= self.max_concurrent:
            return None
        props = self.planner.propose(1)
        if props:
            cfg = props[0]
            self.live[trial_id] = trial_name(cfg)
            return cfg
        if not self.live and self.planner.finished():
            return self.FINISHED
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass  # intermediate epoch results: see valid_epoch_points (cosine schedules give none that count)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        key = self.live.pop(trial_id, None)
        if key is None and result and isinstance(result.get("config"), dict) and "phase" in result["config"]:
            key = trial_name(result["config"])   # a trial this searcher's state did not know under that id
        if key is None or key not in self.planner.pending:
            return
        if error or not result:
            self.planner.fail(key, "error")
        elif "curve" in result or "curve_json" in result:
            pts = result["curve"] if "curve" in result else json.loads(result["curve_json"])
            self.planner.observe_curve(key, pts, result.get("seconds", 0.0))
        elif result.get("row_complete"):
            self.planner.observe(key, result)
        else:
            self.planner.fail(key, "did not finish")

    def get_state(self) -> dict:
        return {"planner": self.planner.state(), "live": self.live, "max_concurrent": self.max_concurrent}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or not {"planner", "live", "max_concurrent"} <= set(state):
            raise GradauthError("search state lacks planner, live or max_concurrent: start the search afresh "
                                "(without --resume)")
        self.planner = Planner.from_state(state["planner"])
        live = state["live"]
        if not isinstance(live, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in live.items()):
            raise GradauthError("search state's live trials are damaged: start the search afresh (without --resume)")
        self.live = dict(live)
        self.max_concurrent = int(state["max_concurrent"])

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self.get_state()))

    def restore(self, checkpoint_path: str) -> None:
        try:
            state = json.loads(Path(checkpoint_path).read_text())
        except (OSError, ValueError):
            raise GradauthError(f"{checkpoint_path}: not a readable search state: start the search afresh "
                                f"(without --resume)") from None
        self.set_state(state)


__all__ = ["SearchConfig", "ThiefBudget", "Planner", "TargetedSearcher", "lock_curve", "run_thief", "search_trial",
           "valid_epoch_points", "trial_name", "PHASES", "SCRATCH"]
