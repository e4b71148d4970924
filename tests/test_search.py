"""Targeted level search (gradauth/search.py): config validation, the lock curve, the planner on a synthetic oracle
fitted to the committed results, JSON save/restore, and one small real Ray Tune run of the searcher."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradauth.errors import GradauthError
from gradauth.search import (SCRATCH, Planner, SearchConfig, TargetedSearcher, lock_curve, trial_name,
                             valid_epoch_points)
from gradauth.select import select_levels
from gradauth.trial import TrialSpec

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ the oracle
class Oracle:
    """A deterministic stand-in for a sweep: locked accuracy a sigmoid in the lock rate, fine_acc recovering towards
    a ceiling at a rate that grows with epochs × lr and falls with the lock, ±0.002 seed noise; seconds linear in
    epochs × data. Parameters are least-squares fits to the committed trials.parquet of each run (checked below)."""

    def __init__(self, base, chance, total, v50, w, a, r0, rs, q, sec_epoch, sec_fixed, sec_eval):
        self.base, self.chance, self.total = base, chance, total
        self.v50, self.w, self.a, self.r0, self.rs, self.q = v50, w, a, r0, rs, q
        self.sec_epoch, self.sec_fixed, self.sec_eval = sec_epoch, sec_fixed, sec_eval

    def eff(self, v):           # the lock a rate really applies: round(v × channels) channels
        return round(v * self.total) / self.total

    def prun(self, v):
        v = self.eff(v)
        return self.chance + (self.base - self.chance) / (1 + math.exp((v - self.v50) / self.w))

    def fine(self, v, e, lr, f=1.0, scope="all", seed=0):
        p, v = self.prun(v), self.eff(v)
        cap = self.base - self.a * v
        rate = self.r0 * math.exp(-self.rs * v) * (e * lr * f / 0.01) ** self.q * (1.0 if scope == "all" else 0.3)
        noise = (int(hashlib.sha256(f"{v:.6f}|{e}|{lr}|{f}|{scope}|{seed}".encode()).hexdigest()[:8], 16)
                 / 0xFFFFFFFF - 0.5) * 0.004
        return p + (cap - p) * (1 - math.exp(-rate)) + noise

    def row(self, spec: dict, lock_bound: float) -> dict:
        v = spec["lock_value"]
        p = self.prun(v)
        base = {"prun_acc": p, "locked_channels": round(v * self.total), "total_channels": self.total,
                "num_classes": 10, "trial_id": TrialSpec(**spec).trial_id}
        if p > lock_bound:
            return base | {"status": "unlockable", "fine_acc": None, "fine_top3": None, "seconds": self.sec_eval}
        acc = self.fine(v, spec["epochs"], spec["lr"], spec["data_fraction"], spec["scope"], spec["seed"])
        secs = self.sec_fixed + self.sec_epoch * spec["epochs"] * spec["data_fraction"]
        return base | {"status": "ok", "fine_acc": acc, "fine_top3": min(1.0, acc + 0.2), "seconds": secs}

    def thief_row(self, spec: dict) -> dict:
        f = spec["data_fraction"]
        if spec["importance"] == SCRATCH:
            acc = self.chance + (self.base - self.chance) * 0.5 * f ** 0.25
        else:
            acc = self.chance + (self.base - self.chance) * 0.7 * f ** 0.2
        secs = self.sec_fixed + self.sec_epoch * spec["epochs"] * f
        return {"prun_acc": self.chance, "fine_acc": acc, "status": "ok", "seconds": secs}

    def curve(self, values):
        return [{"lock_value": v, "locked_channels": round(v * self.total), "total_channels": self.total,
                 "prun_acc": self.prun(v)} for v in values], self.sec_fixed + self.sec_eval * len(values) / 4


# Fits of the oracle's form to results/{quickstart,cifar10-cpu}/trials.parquet (scipy least_squares over every
# row's prun_acc and fine_acc). The quickstart's locks all sit at chance (0.074 from 10 %), so its v50/w only
# place the lockable edge below 10 % (the README: |γ| reaches the bound with 24 of 320 channels, 7.5 %).
QUICK = dict(base=0.992579, chance=0.074212, total=320, v50=0.06, w=0.006, a=0.14194, r0=151.55097, rs=43.00713,
             q=1.44362, sec_epoch=0.6, sec_fixed=0.6, sec_eval=0.2)
CIFAR = dict(base=0.752, chance=0.09, total=392, v50=0.04757, w=0.00634, a=0.54983, r0=7.59366, rs=12.07185,
             q=0.57071, sec_epoch=58.0, sec_fixed=5.0, sec_eval=4.7)
RUNS = {"quickstart": (QUICK, 0.2), "cifar10-cpu": (CIFAR, 0.2)}


def run_search(planner: Planner, oracle: Oracle, concurrency: int = 4, limit: int = 500) -> list[dict]:
    """Drive the planner like a cluster: keep `concurrency` trials in flight, finish the oldest first."""
    inflight, log = [], []
    for _ in range(limit):
        inflight += planner.propose(concurrency - len(inflight))
        if not inflight:
            break
        cfg = inflight.pop(0)
        log.append(cfg)
        key = trial_name(cfg)
        if cfg["phase"] == "curve":
            points, secs = oracle.curve(cfg["curve"]["values"])
            planner.observe_curve(key, points, secs)
        elif cfg["phase"] == "thief":
            planner.observe(key, oracle.thief_row(cfg["trial"]))
        else:
            planner.observe(key, oracle.row(cfg["trial"], planner.lock_bound))
    assert not inflight and planner.finished()
    return log


def grid_seconds(name: str, oracle: Oracle, lock_bound: float) -> float:
    """The committed config's grid, priced by the same oracle."""
    from gradauth.config import load_config
    from gradauth.trial import grid
    cfg = load_config(ROOT / "sweeps" / f"{name}.yaml")
    return sum(oracle.row(asdict(s), lock_bound)["seconds"] for s in grid(cfg))


def targeted(base, **kw) -> SearchConfig:
    d = dict(mode="targeted", levels=3, below_base=0.01, step=0.08, tolerance=0.01, seeds=2,
             lock_range=[0.02, 0.3], epochs=[1, 16], lr=[0.005, 0.01], thief={"fractions": [0.01, 0.05, 0.1],
                                                                             "epochs": 20})
    return SearchConfig.from_dict(d | kw)


@pytest.mark.parametrize("name", ["quickstart", "cifar10-cpu"])
def test_oracle_mimics_the_committed_trials(name):
    params, _ = RUNS[name]
    o = Oracle(**params)
    t = pd.read_parquet(ROOT / "results" / name / "trials.parquet")
    prun = np.array([o.prun(v) for v in t["lock_value"]])
    ok = t[t["status"] == "ok"]
    fine = np.array([o.fine(r.lock_value, r.ft_epochs, r.ft_lr) for r in ok.itertuples()])
    assert np.abs(prun - t["prun_acc"]).mean() < 0.03
    assert np.abs(fine - ok["fine_acc"]).mean() < 0.03
    assert np.abs(fine - ok["fine_acc"]).max() < 0.1
    # and it says what the committed run says about what locks
    assert ((prun <= 0.2) == (t["status"] == "ok")).all()


@pytest.mark.parametrize("name", ["quickstart", "cifar10-cpu"])
def test_planner_reaches_every_target_for_a_third_of_the_grid(name):
    params, bound = RUNS[name]
    o = Oracle(**params)
    cfg = targeted(o.base, epochs=[1, 24] if name == "cifar10-cpu" else [1, 16])
    p = Planner(cfg, o.base, bound, 0.05)
    log = run_search(p, o)
    s = p.summary()
    assert s["all_hit"], s
    for lv, target in zip(s["levels"], p.targets):
        assert abs(lv["fine_acc"] - target) <= cfg.tolerance
        assert lv["seeds"] == 2
        assert o.prun(lv["lock_value"]) <= bound
    # the selector, given only the level trials, picks a level set within tolerance of every target
    rows = pd.DataFrame(p.level_rows())
    for c in ("dataset", "arch", "base_acc"):
        rows[c] = None
    sel = select_levels(rows, 3, 0.05, bound, p.targets)
    got = [lv["fine_acc"] for lv in sel.levels]
    assert all(abs(g - t) <= cfg.tolerance for g, t in zip(got, p.targets)), (got, p.targets)
    # thief trials ran as their own phase: scratch and public at every fraction
    thief = [c for c in log if c["phase"] == "thief"]
    assert {c["thief"] for c in thief} == {"scratch", "public"}
    assert {c["trial"]["data_fraction"] for c in thief} == {0.01, 0.05, 0.1}
    assert set(s["thief"]) == {"0.01", "0.05", "0.1"}
    # extra seeds only on candidates that hit
    seeded = {(c["trial"]["lock_value"], c["trial"]["epochs"], c["trial"]["lr"]) for c in log
              if c["phase"] == "level" and c["trial"]["seed"] > 0}
    hits = {(lv["lock_value"], lv["schedule"][0], lv["schedule"][1]) for lv in s["levels"]}
    assert seeded <= hits | {k for k in seeded if abs(o.fine(*k) - min(p.targets, key=lambda t: abs(t - o.fine(*k))))
                             <= cfg.tolerance + 0.002}
    grid = grid_seconds(name, o, bound)
    assert s["trial_seconds"] * 3 <= grid, (s["trial_seconds"], grid)
    print(f"{name}: {s['trials']} trials, {s['trial_seconds']:.0f} trial-s vs grid {grid:.0f} s; "
          f"levels {[round(lv['fine_acc'], 3) for lv in s['levels']]} targets {p.targets}")
