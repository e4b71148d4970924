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
# row's prun_acc and fine_acc). The quickstart's swept locks all sit at chance (0.074 from 10 %), so its v50/w come
# from the real lock curve of its base below 10 % (test_lock_curve_... checks them).
QUICK = dict(base=0.992579, chance=0.074212, total=320, v50=0.027, w=0.012, a=0.14194, r0=151.55097, rs=43.00713,
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


# (run, level 1 below the base, the most level-finding trial-seconds allowed as a share of the committed grid's).
# Quickstart: a third, as issue 12 asks. CIFAR: the committed grid is 20 trials of which 8 are 5-second unlockable
# ones and it never reaches base − 3 points (its best is 0.717 < 0.722 − 0.01 on the oracle too); three levels at
# two seeds need ≥ 6 fine-tunes, 2 of them at 2 epochs: ~0.33 of that grid is the floor, the planner spends < 0.5.
SEARCHES = [("quickstart", 0.01, 1 / 3), ("cifar10-cpu", 0.03, 0.5)]


@pytest.mark.parametrize("name, below_base, share", SEARCHES)
def test_planner_reaches_every_target_for_a_fraction_of_the_grid(name, below_base, share):
    params, bound = RUNS[name]
    o = Oracle(**params)
    cfg = targeted(o.base, epochs=[1, 24], below_base=below_base)
    p = Planner(cfg, o.base, bound, 0.05)
    log = run_search(p, o)
    s = p.summary()
    assert s["all_hit"] and s["finished"] and s["spaced"], s
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
    for f in s["thief"].values():   # the oracle's public model gives a head start over scratch
        assert f["head_start"] == pytest.approx(max(a for k, a in f.items() if k.startswith("public")) - f["scratch"])
        assert f["head_start"] > 0
    assert all(lv["sellable"] == (lv["margin_over_thief"] >= 0.05) for lv in s["levels"])
    # extra seeds only on candidates that hit
    seeded = {(c["trial"]["lock_value"], c["trial"]["epochs"], c["trial"]["lr"]) for c in log
              if c["phase"] == "level" and c["trial"]["seed"] > 0}
    hits = {(lv["lock_value"], lv["schedule"][0], lv["schedule"][1]) for lv in s["levels"]}
    assert seeded <= hits | {k for k in seeded if abs(o.fine(*k) - min(p.targets, key=lambda t: abs(t - o.fine(*k))))
                             <= cfg.tolerance + 0.002}
    grid = grid_seconds(name, o, bound)
    finding = s["seconds_by_phase"]["curve"] + s["seconds_by_phase"]["level"]
    assert finding <= share * grid, (s["seconds_by_phase"], grid)
    if name == "quickstart":   # there the thief trials fit in the third too
        assert s["trial_seconds"] <= share * grid
    print(f"{name}: {s['trials']} trials, {s['seconds_by_phase']} trial-s vs grid {grid:.0f} s; "
          f"levels {[round(lv['fine_acc'], 3) for lv in s['levels']]} targets {p.targets}")


def test_a_target_past_the_epochs_range_is_missed_with_the_reason_and_the_rest_still_hit():
    o = Oracle(**CIFAR)   # the fitted ceiling at the weakest lockable lock is ~0.72: base − 1 point is out of reach
    p = Planner(targeted(o.base, epochs=[1, 24]), o.base, 0.2, 0.05)
    run_search(p, o)
    s = p.summary()
    assert not s["all_hit"]
    l1, l2, l3 = s["levels"]
    assert l1["status"] == "missed" and "search.epochs" in l1["why"] and "0.742" in l1["why"]
    assert l2["status"] == l3["status"] == "hit"
    # it gave up from the trend, not by running the 24-epoch schedule
    assert max(r["spec"]["epochs"] for r in p.obs.values() if r["phase"] == "level") <= 16


def test_a_spent_trial_budget_stops_the_search_and_names_the_unsettled_targets():
    o = Oracle(**QUICK)
    cfg = targeted(o.base, max_trials=18)
    p = Planner(cfg, o.base, 0.2, 0.05)
    run_search(p, o)
    s = p.summary()
    assert s["trials"] == 18
    missed = [lv for lv in s["levels"] if lv["status"] == "missed"]
    assert missed and all("budget spent" in lv["why"] for lv in missed)
    # the thief trials were reserved out of the budget, not starved by the level probes: per fraction one from
    # scratch and the public model as released and revived
    assert sum(1 for o in p.obs.values() if o["phase"] == "thief") == 9


def test_save_restore_continue_gives_the_same_proposals(tmp_path):
    o = Oracle(**QUICK)
    a = Planner(targeted(o.base), o.base, 0.2, 0.05)
    inflight = []
    for _ in range(9):   # part-way, with trials in flight
        inflight += a.propose(3 - len(inflight))
        cfg = inflight.pop(0)
        key = trial_name(cfg)
        if cfg["phase"] == "curve":
            a.observe_curve(key, *o.curve(cfg["curve"]["values"]))
        elif cfg["phase"] == "thief":
            a.observe(key, o.thief_row(cfg["trial"]))
        else:
            a.observe(key, o.row(cfg["trial"], 0.2))
    searcher = TargetedSearcher(a, max_concurrent=3)
    searcher.live = {f"tune{i}": trial_name(c) for i, c in enumerate(inflight)}
    searcher.save(str(tmp_path / "searcher.json"))
    text = (tmp_path / "searcher.json").read_text()
    json.loads(text)                              # JSON, not a pickle
    restored = TargetedSearcher()
    restored.restore(str(tmp_path / "searcher.json"))
    b = restored.planner
    assert restored.live == searcher.live and restored.max_concurrent == 3
    assert json.dumps(b.state(), sort_keys=True) == json.dumps(a.state(), sort_keys=True)
    # both finish the same in-flight trials and continue: identical proposals, identical outcome
    mid = a.summary()
    assert not mid["finished"] and {lv["status"] for lv in mid["levels"]} <= {"searching", "hit"}
    assert any(lv["status"] == "searching" and "in progress" in lv["why"] for lv in mid["levels"])
    la, lb = run_search_from(a, o, inflight), run_search_from(b, o, inflight)
    assert la == lb and len(la) > 5
    assert a.summary() == b.summary()


def run_search_from(planner, oracle, inflight):
    inflight = list(inflight)
    log = []
    for _ in range(500):
        inflight += planner.propose(3 - len(inflight))
        if not inflight:
            return log
        cfg = inflight.pop(0)
        log.append(cfg)
        key = trial_name(cfg)
        if cfg["phase"] == "curve":
            planner.observe_curve(key, *oracle.curve(cfg["curve"]["values"]))
        elif cfg["phase"] == "thief":
            planner.observe(key, oracle.thief_row(cfg["trial"]))
        else:
            planner.observe(key, oracle.row(cfg["trial"], 0.2))
    raise AssertionError("did not finish")


def test_restore_refuses_a_damaged_state(tmp_path):
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(GradauthError, match="not a readable search state"):
        TargetedSearcher().restore(str(tmp_path / "s.json"))
    (tmp_path / "s.json").write_text(json.dumps({"planner": {"version": 99}, "live": {}, "max_concurrent": 1}))
    with pytest.raises(GradauthError, match="version-1"):
        TargetedSearcher().restore(str(tmp_path / "s.json"))
    o = Oracle(**QUICK)
    good = Planner(targeted(o.base), o.base, 0.2, 0.05)
    good.propose(1)
    for damage in (lambda st: st.pop("obs"), lambda st: st.update(pending={"x": {"phase": "level", "spec": {"a": 1}}}),
                   lambda st: st["cfg"].update(tolerance=-1), lambda st: st.update(curve=[{"lock_value": "x"}])):
        st = json.loads(json.dumps(good.state()))
        damage(st)
        (tmp_path / "s.json").write_text(json.dumps({"planner": st, "live": {}, "max_concurrent": 1}))
        with pytest.raises(GradauthError, match="start the search afresh") as e:
            TargetedSearcher().restore(str(tmp_path / "s.json"))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("change, words", [
    (dict(targets=[0.999, 0.9, 0.8]), "above the base"),
    (dict(targets=[0.95, 0.9, 0.8]), "apart"),
    (dict(targets=[0.9, 0.8, 0.25]), "below lock bound"),
    (dict(max_trials=8), "cannot buy 3 levels"),
    (dict(targets=[0.9, 0.8]), "one target per level"),
    (dict(mode="grids"), "grid or targeted"),
    (dict(epochs=[4, 2]), "fewest ≤ most"),
    (dict(lock_range=[0.3, 0.1]), "lock_range"),
    (dict(scope=["everything"]), "scope"),
    (dict(thief={"fractions": [0]}), "thief.fractions"),
    (dict(thief={"public_locks": "some"}), "public_locks"),
    (dict(lock_step=0), "lock_step"),
])
def test_infeasible_intents_are_refused_up_front_in_one_line(change, words):
    cfg = targeted(0.99, **change)
    with pytest.raises(GradauthError) as e:
        cfg.validate(0.99, 0.2, 0.05)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and msg.startswith("search: ")


def test_threshold_locks_are_refused_by_the_targeted_search():
    with pytest.raises(GradauthError, match="rate locks only"):
        Planner(targeted(0.99), 0.99, 0.2, 0.05, lock_mode="threshold")


def test_config_refuses_unknown_keys_and_resolves_relative_targets():
    with pytest.raises(GradauthError, match="unknown key `search.levles`"):
        SearchConfig.from_dict({"levles": 3})
    with pytest.raises(GradauthError, match="must be a mapping"):
        SearchConfig.from_dict(["targeted"])
    with pytest.raises(GradauthError, match="unknown key `search.thief.budget`"):
        SearchConfig.from_dict({"thief": {"budget": 1}})
    cfg = SearchConfig.from_dict({"mode": "targeted", "levels": 3, "below_base": 0.01, "step": 0.08})
    assert cfg.validate(0.752, 0.2, 0.05) == [0.742, 0.662, 0.582]
    assert SearchConfig.from_dict({"mode": "targeted", "targets": [0.9, 0.8, 0.7]}).resolve_targets(0.99) == [0.9, 0.8, 0.7]
    assert SearchConfig().validate(0.5, 0.2, 0.05) == []   # grid mode: nothing to resolve
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()


def test_epoch_accuracies_of_a_cosine_run_are_not_those_of_shorter_schedules():
    accs = [0.5, 0.6, 0.7, 0.8]
    assert valid_epoch_points(4, accs, steps_per_epoch=10, lr=0.01) == [(4, 0.8)]
    assert valid_epoch_points(4, accs, steps_per_epoch=10, lr=0.01, schedule="step") == [(4, 0.8)]
    assert valid_epoch_points(1, [0.3], steps_per_epoch=10, lr=0.01) == [(1, 0.3)]


@pytest.fixture(scope="module")
def quick_ctx():
    """The committed quickstart base (read only), its |γ| scores and digits."""
    from gradauth.config import load_config
    from gradauth.pipeline import trial_context
    return trial_context(load_config(ROOT / "sweeps" / "quickstart.yaml"), ROOT / "results" / "quickstart")


def test_lock_curve_evaluates_many_locks_in_one_call_as_the_trials_do(quick_ctx):
    import torch
    from gradauth.trial import run_trial
    t = pd.read_parquet(ROOT / "results" / "quickstart" / "trials.parquet")
    pts = lock_curve(quick_ctx, "bn_gamma", "rate", [0.01, 0.05, 0.1, 0.15, 0.2], torch.device("cpu"))
    assert [p["locked_channels"] for p in pts] == [3, 16, 32, 48, 64]
    for p in pts[2:]:  # the committed sweep's locks: the same locked accuracy as its trials measured
        assert p["prun_acc"] == pytest.approx(t.loc[t["lock_value"] == p["lock_value"], "prun_acc"].iloc[0], abs=1e-9)
    assert pts[0]["prun_acc"] > 0.2 > pts[-1]["prun_acc"]    # 1 % does not lock, 20 % does
    row, _, _ = run_trial(quick_ctx, TrialSpec("bn_gamma", "rate", 0.05, 0, 0.01, 1.0, "all", 0), torch.device("cpu"))
    assert row["prun_acc"] == pytest.approx(pts[1]["prun_acc"], abs=1e-9)
    # the quickstart oracle's lock curve follows the real one below the swept locks
    vals = [k / 320 for k in range(1, 33, 2)]
    real = [p["prun_acc"] for p in lock_curve(quick_ctx, "bn_gamma", "rate", vals)]
    o = Oracle(**QUICK)
    assert np.abs(np.array([o.prun(v) for v in vals]) - real).mean() < 0.08
    first = lambda accs: next(i for i, a in enumerate(accs) if a <= 0.2)
    assert abs(first([o.prun(v) for v in vals]) - first(real)) <= 1    # the lockable edge within 2 channels


def test_search_trial_runs_each_phase_as_a_plain_function(quick_ctx):
    import torch
    from gradauth.search import search_trial
    from gradauth.select import TRIAL_COLUMNS
    res, model, masks = search_trial(quick_ctx, {"phase": "curve", "key": "curve-1", "curve": {
        "importance": "bn_gamma", "lock_mode": "rate", "values": [0.1, 0.2]}}, torch.device("cpu"))
    assert model is None and [p["locked_channels"] for p in res["curve"]] == [32, 64] and res["seconds"] > 0
    spec = TrialSpec("bn_gamma", "rate", 0.1, 1, 0.01, 1.0, "all", 0)
    row, model, masks = search_trial(quick_ctx, {"trial": asdict(spec), "phase": "level"}, torch.device("cpu"))
    assert row["phase"] == "level" and row["trial_id"] == spec.trial_id and row["status"] == "ok" and model is not None
    thief = TrialSpec("bn_gamma", "rate", 0.2, 1, 0.01, 0.05, "all", 0)
    row, model, _ = search_trial(quick_ctx, {"trial": asdict(thief), "phase": "thief", "thief": "public"})
    assert row["trial_id"] == "thief-" + thief.trial_id and row["locked_channels"] == 64 and model is None
    assert set(TRIAL_COLUMNS) <= set(row) and row["thief_init"] == "none"   # a full trials.parquet row (+ phase)
    # as released, and revived by the careful thief (γ 1 and fresh filters on the locked channels): other models
    strong = TrialSpec("bn_gamma", "rate", 0.1, 2, 0.05, 0.3, "all", 0)
    rel, rev = (search_trial(quick_ctx, {"trial": asdict(strong), "phase": "thief", "thief": "public",
                                         "thief_init": i})[0] for i in ("none", "revive"))
    assert rev["trial_id"] == "thief-" + strong.trial_id + "-revive" and rev["thief_init"] == "revive"
    assert rel["trial_id"] == "thief-" + strong.trial_id and rel["prun_acc"] == rev["prun_acc"]
    assert rev["fine_acc"] != rel["fine_acc"]
    with pytest.raises(GradauthError, match="thief_init"):
        search_trial(quick_ctx, {"trial": asdict(thief), "phase": "thief", "thief": "public", "thief_init": "x"})
    with pytest.raises(GradauthError, match="phase"):
        search_trial(quick_ctx, {"trial": asdict(spec), "phase": "grid?"})


def test_thief_trials_start_from_the_public_model_or_from_scratch(quick_ctx):
    import torch
    from gradauth.search import run_thief
    pub = run_thief(quick_ctx, TrialSpec("bn_gamma", "rate", 0.2, 1, 0.01, 0.1, "all", 0), torch.device("cpu"))
    assert pub["prun_acc"] == pytest.approx(0.074212, abs=1e-5)   # the public model is the locked one
    scr = run_thief(quick_ctx, TrialSpec(SCRATCH, "none", 0.0, 1, 0.01, 0.1, "all", 0), torch.device("cpu"))
    assert scr["prun_acc"] < 0.2 and 0 <= scr["fine_acc"] <= 1 and 0 <= pub["fine_acc"] <= 1
    assert pub["fine_acc"] != scr["fine_acc"]


class LockAwareThieves(Oracle):
    """The oracle, with thieves that recover less the stronger the public lock, and a revived thief that beats the
    released one at strong locks (as on CIFAR-10)."""
    def thief_row(self, spec: dict, init: str = "none") -> dict:
        row = super().thief_row(spec)
        if spec["importance"] != SCRATCH:
            v = spec["lock_value"]
            row["fine_acc"] -= (0.5 if init == "none" else 0.3) * v
        return row


def test_thief_forms_and_an_owner_list_of_public_locks_pick_the_lock_closest_to_scratch():
    o = LockAwareThieves(**QUICK)
    cfg = targeted(o.base, thief={"fractions": [0.05, 0.1], "epochs": 20, "public_locks": [0.3, 0.6, 0.9]})
    assert cfg.thief.forms == ["zeros", "revive"] and cfg.min_trials() == 2 + 6 + 2 * (1 + 3 * 2)
    p = Planner(cfg, o.base, 0.2, 0.05)
    inflight, thieves = [], []
    for _ in range(500):
        inflight += p.propose(4 - len(inflight))
        if not inflight:
            break
        c = inflight.pop(0)
        key = trial_name(c)
        if c["phase"] == "curve":
            p.observe_curve(key, *o.curve(c["curve"]["values"]))
        elif c["phase"] == "thief":
            thieves.append((key, c["trial"]["lock_value"], c.get("thief_init")))
            p.observe(key, o.thief_row(c["trial"], c["thief_init"]))
        else:
            p.observe(key, o.row(c["trial"], 0.2))
    assert p.finished() and len(thieves) == len({k for k, _, _ in thieves}) == 2 * (1 + 3 * 2)
    assert sorted({(round(v, 2), i) for _, v, i in thieves if v}) == [(v, i) for v in (0.3, 0.6, 0.9)
                                                                       for i in ("none", "revive")]
    assert all(k.endswith("-revive") == (i == "revive") for k, _, i in thieves)
    s = p.summary()
    # at every lock the revived thief is the better one; 0.9 gives the smallest head start over scratch
    assert s["public_lock"] == pytest.approx(0.9, abs=1 / QUICK["total"])
    for f, fig in s["thief"].items():
        assert fig["head_start"] == pytest.approx(fig[f"public {s['public_lock']:g} revive"] - fig["scratch"])
        assert fig["head_start"] < fig[f"public {0.3:g} revive"] - fig["scratch"]
    with pytest.raises(GradauthError, match="public_locks"):
        targeted(o.base, thief={"public_locks": [0.3, 1.5]}).validate(o.base, 0.2, 0.05)
    with pytest.raises(GradauthError, match="forms"):
        targeted(o.base, thief={"forms": ["zeros", "noise"]}).validate(o.base, 0.2, 0.05)


def _tune_trainable(config):
    """The Ray trials of the tests below: the oracle answers each phase as the sweep's trainable would report."""
    import time
    from ray import tune
    o = Oracle(**QUICK)
    if config["phase"] == "curve":
        points, secs = o.curve(config["curve"]["values"])
        tune.report({"curve": points, "seconds": secs})
    elif config["phase"] == "thief":
        tune.report(o.thief_row(config["trial"]) | {"row_complete": True})
    else:
        time.sleep(0.5)   # a kill then finds level trials in flight
        tune.report(o.row(config["trial"], 0.2) | {"row_complete": True})


def _small_search() -> Planner:
    o = Oracle(**QUICK)
    cfg = targeted(o.base, levels=2, seeds=1, thief={"fractions": [0.05], "epochs": 20}, max_concurrent=2)
    return Planner(cfg, o.base, 0.2, 0.05)


def _ray_init():
    import ray
    # the workers import this module (the oracle) from the tests folder
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT / 'tests'}:{ROOT}"}})


def _tuner(searcher, storage, callbacks=()):
    from ray import tune
    name = lambda trial: trial_name(trial.config)
    return tune.Tuner(
        tune.with_resources(_tune_trainable, {"cpu": 0.5}),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, trial_name_creator=name,
                                    trial_dirname_creator=name, reuse_actors=True),
        run_config=tune.RunConfig(name="search", storage_path=str(storage), verbose=0, callbacks=list(callbacks)))


def _newest_state(exp: Path) -> dict:
    files = sorted(exp.glob("searcher-state-*"))   # Ray's name; a session timestamp sorts them
    assert files
    return json.loads(files[-1].read_text())       # JSON despite Ray's .pkl suffix


@pytest.mark.ray
def test_ray_tune_drives_the_searcher_to_every_target(tmp_path):
    """Real Ray Tune, a trivial trainable (the oracle): the searcher proposes every trial, stays within its
    concurrency, finishes, and Tune saves its state as JSON in the experiment folder."""
    import ray

    class Counting(TargetedSearcher):
        most = 0

        def suggest(self, trial_id):
            cfg = super().suggest(trial_id)
            Counting.most = max(Counting.most, len(self.live))
            return cfg

    searcher = Counting(_small_search())
    _ray_init()
    try:
        results = _tuner(searcher, tmp_path).fit()
    finally:
        ray.shutdown()
    s = searcher.planner.summary()
    assert s["all_hit"], s
    assert all(abs(lv["fine_acc"] - t) <= 0.01 for lv, t in zip(s["levels"], searcher.planner.targets))
    assert len(results) == s["trials"] and not results.errors
    phases = [r.config["phase"] for r in results]
    assert phases.count("curve") == 2 and phases.count("thief") == 3 and "level" in phases
    assert all(set(r.config) >= {"trial", "phase"} for r in results if r.config["phase"] != "curve")
    assert 1 <= Counting.most <= 2     # 4 CPU slots for 0.5-CPU trials, yet never more than 2 in flight
    assert Planner.from_state(_newest_state(tmp_path / "search")["planner"]).summary()["all_hit"]


@pytest.mark.ray
@pytest.mark.subprocess
def test_a_killed_driver_is_finished_by_tuner_restore_with_the_searcher_state(tmp_path):
    """Real processes: a driver killed (os._exit) after 4 finished trials; a new one restores the Tune experiment,
    and with it the searcher's JSON state, and finishes the search without losing or repeating a trial."""
    import subprocess
    import sys
    env = {**__import__("os").environ, "PYTHONPATH": f"{ROOT / 'tests'}:{ROOT}"}
    cmd = [sys.executable, __file__, str(tmp_path)]
    first = subprocess.run(cmd + ["start"], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 9, first.stderr[-2000:]
    killed = Planner.from_state(_newest_state(tmp_path / "search")["planner"])
    assert not killed.summary()["all_hit"]
    # the callback travels in Tune's tuner.pkl: the restored driver gets it too, told not to kill
    second = subprocess.run(cmd + ["resume"], env=env | {"SEARCH_TEST_NO_KILL": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    p = Planner.from_state(_newest_state(tmp_path / "search")["planner"])
    s = p.summary()
    assert s["all_hit"] and s["finished"] and not p.pending and not p.failed
    dirs = {d.name for d in (tmp_path / "search").iterdir() if d.is_dir()}
    assert dirs == set(p.obs) | {f"curve-{i}" for i in (1, 2)}   # every trial once, each observed
    assert p.trials == len(dirs)
    assert killed.trials < p.trials


def _driver(storage: str, mode: str) -> None:
    """`python tests/test_search.py DIR start|resume`: the driver the kill test runs in its own process."""
    import os
    import ray
    from ray import tune

    class Kill(tune.Callback):
        seen = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            Kill.seen += 1
            if Kill.seen >= 4 and os.environ.get("SEARCH_TEST_NO_KILL") is None:
                os._exit(9)   # the driver dies here: no cleanup, no final save

    _ray_init()
    if mode == "start":
        _tuner(TargetedSearcher(_small_search()), storage, [Kill()]).fit()
    else:
        tune.Tuner.restore(str(Path(storage) / "search"), tune.with_resources(_tune_trainable, {"cpu": 0.5})).fit()
    ray.shutdown()


if __name__ == "__main__":
    import sys
    _driver(sys.argv[1], sys.argv[2])
