"""Level selection: trials.parquet → levels.json.

A candidate level is one (importance, lock, schedule) averaged over its seeds. Levels must be worth selling apart:
their mean top-1 falls by at least `min_gap` and by more than twice the larger seed std (so seed noise cannot swap
two tiers), and the public locked model must be useless (mean locked accuracy ≤ `max_locked_acc`). Feasibility only
links consecutive levels, so the candidates form a DAG ordered by accuracy, and both objectives are exact searches
over it: without targets the lexicographic maximum (level 1 as high as possible, then level 2, …), with targets the
chain nearest them. A plain greedy pick of the best next level can walk into a dead end; these cannot.

Sellable levels: thief trials (rows of trials.parquet with trial_id `thief-…`: a thief fine-tuning the public
model, or training from scratch, importance `scratch`, on the owner's thief budget; search.py makes them) are never
candidates. The best of them (highest mean fine_acc over seeds among the thief (lock, schedule) groups, public or
scratch) is what any buyer could get without a key, so a level must beat it by `min_gap` too; each level's
`thief_margin` (its fine_acc minus the best thief's) and the thief figures (per data fraction: best public,
best scratch, head start) go to levels.json's `thief`. Without thief rows the selection is exactly as before and
levels.json carries neither key.

Stds are sample stds over seeds (ddof=1): with two or three seeds ddof=0 understates the spread and would let noise
pass the 2 × std rule. One seed gives std 0.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import rundir
from .errors import GradauthError
from .fsutil import write_json
from .knobs import LockSpec, Schedule, column_kinds, columns, fill_defaults, from_row, lock_label, schedule_dict
from .knobs import schedule_label  # noqa: F401  (re-exported: report and others import the labels from here)
from .schema import GRID_REQUIRED, SCRATCH, TRIAL_COLUMNS, file_sha256, read_trials, thief_rows

# TRIAL_COLUMNS (the trials.parquet contract) lives in schema.py; re-exported here for compatibility.
# A candidate is one lock and one schedule: its seeds differ only in the knobs outside GROUP (the seed). Both come
# from the fields of LockSpec and Schedule (knobs.py), so a knob added to Schedule is a grouping key by itself.
GROUP = [*columns(LockSpec), *columns(Schedule, group_only=True)]
SELECT_COLUMNS = ["trial_id", "num_classes", *[c for c in GROUP if c in GRID_REQUIRED], "locked_channels", "prun_acc",
                  "fine_acc", "fine_top3", "status"]
_KINDS = column_kinds(LockSpec) | column_kinds(Schedule)
_NUMERIC = ["num_classes", *[c for c in GROUP if _KINDS[c] != "str"], "locked_channels", "prun_acc", "fine_acc",
            "fine_top3"]
_EPS = 1e-9  # accuracies are ratios of counts: a gap of exactly min_gap must not fail on float rounding


@dataclass
class Selection:
    """The chosen levels (level 1 = best), why every other trial was left out, and the settings used."""
    levels: list[dict]
    rejected: list[dict]
    method: int  # 2: every level shares one locked model (same importance and lock), 1: each level has its own lock
    settings: dict = field(default_factory=dict)
    thief: dict | None = None  # thief_summary() when trials.parquet has thief rows

    def to_json(self, experiment: str) -> dict:
        """The levels.json object (docs/design.md, "levels.json"), `settings` included so a report shows what was asked."""
        doc = {"experiment": experiment, "method": self.method, "levels": self.levels,
               "rejected": self.rejected, "settings": self.settings}
        return doc if self.thief is None else doc | {"thief": self.thief}


def missing_columns(df: pd.DataFrame, needed: list[str], source: str) -> None:
    """Refuse a table without the columns a stage reads, naming them all at once."""
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise GradauthError(f"{source} lacks column(s) {', '.join(missing)}: it was not written by `gradauth sweep`; "
                            f"re-run `gradauth sweep CONFIG` to rewrite it")


def load_trials(path: str | os.PathLike, needed: list[str] = SELECT_COLUMNS) -> pd.DataFrame:
    """Read trials.parquet through the validating reader of schema.py, requiring the `needed` columns."""
    return read_trials(path, needed)


def select_levels(trials: pd.DataFrame, levels: int = 3, min_gap: float = 0.05, max_locked_acc: float | None = None,
                  targets: list[float] | None = None) -> Selection:
    """Choose `levels` tiers from the trial rows (see the module docstring for the rules)."""
    missing_columns(trials, SELECT_COLUMNS, "the trials table")
    df = fill_defaults(fill_defaults(trials.copy(), LockSpec), Schedule)  # a knob newer than the file: its default
    df[_NUMERIC] = df[_NUMERIC].apply(pd.to_numeric)
    max_locked_acc = _check_settings(df, levels, min_gap, max_locked_acc, targets)
    settings = {"levels": int(levels), "min_gap": float(min_gap), "max_locked_acc": max_locked_acc,
                "targets": None if targets is None else [float(t) for t in targets]}  # JSON-ready
    thief = thief_rows(df)
    summary = thief_summary(df[thief]) if thief.any() else None
    thief_reasons = _reject(sorted(df.loc[thief, "trial_id"]), "thief_trial",
                            "a thief trial (an attack measurement), never a level") if thief.any() else []
    df = df[~thief]
    if df.empty:
        raise GradauthError("the trials table has only thief trials: run the sweep's level trials first")
    usable = (df["status"] == "ok") & df["fine_acc"].notna()
    groups = _groups(df[usable])
    lockable = groups["prun_acc"] <= max_locked_acc + _EPS
    # A tier is worth selling only if it beats what the public model could be: the lock bound, by min_gap.
    worth = groups["fine_acc"] >= max_locked_acc + min_gap - _EPS
    # ... and what the best thief gets without a key, by min_gap.
    best_thief = None if summary is None or summary["best_acc"] is None else summary["best_acc"]
    sellable = (groups["fine_acc"] >= best_thief + min_gap - _EPS) if best_thief is not None else pd.Series(True, index=groups.index)
    cands = groups[lockable & worth & sellable].reset_index(drop=True)
    C = _separated_matrix(cands, min_gap)
    L = _longest_chains(C)
    if L.max(initial=0) < levels:
        msg = _infeasible(df, groups, cands, L, settings)
        if best_thief is not None and (lockable & worth & ~sellable).any():
            msg = (f"{msg.split(':')[0]} once levels within min_gap {min_gap:g} of the best thief "
                   f"({best_thief:.3f}, {summary['best']['label']}) are refused: a buyer would not pay for what a "
                   f"thief gets without a key; sweep longer schedules or smaller locks for higher levels, or ask "
                   f"for fewer levels (--levels)")
        raise GradauthError(msg)
    chain = _lexmax(C, L, levels) if targets is None else _nearest(C, cands["fine_acc"].to_numpy(), targets)
    chosen = cands.loc[chain]
    reasons = _row_reasons(df[~usable]) + _locked_reasons(groups[~lockable], max_locked_acc)
    reasons += _worthless_reasons(groups[lockable & ~worth], max_locked_acc, min_gap)
    if best_thief is not None:
        reasons += _thief_reasons(groups[lockable & worth & ~sellable], summary, min_gap)
    reasons += _candidate_reasons(cands, chain, C, L, settings)
    rejected = sorted(reasons + thief_reasons, key=lambda r: r["trial_id"])
    locks = chosen[["importance", "lock_mode", "lock_value"]].drop_duplicates()
    out = [_level_dict(k + 1, row) for k, (_, row) in enumerate(chosen.iterrows())]
    if best_thief is not None:
        for lv in out:
            lv["thief_margin"] = round(lv["fine_acc"] - best_thief, 6)
    return Selection(out, rejected, 2 if len(locks) == 1 else 1, settings, summary)


# ---- thief trials ------------------------------------------------------------------------------------------------

THIEF_GROUP = ["importance", "lock_mode", "lock_value", "thief_init", "ft_epochs", "ft_lr", "ft_data_fraction",
               "ft_scope"]


def thief_table(thieves: pd.DataFrame) -> pd.DataFrame:
    """One row per thief (start, schedule), ok rows only, mean over seeds: kind (public | scratch), importance,
    lock_mode, lock_value, ft_* (fraction = ft_data_fraction), fine_acc, fine_acc_std, prun_acc, locked_channels,
    seeds, trial_ids. Sorted by fraction, kind, lock."""
    cols = ["kind", *THIEF_GROUP, "fine_acc", "fine_acc_std", "prun_acc", "locked_channels", "seeds", "trial_ids"]
    t = thieves[(thieves["status"] == "ok") & thieves["fine_acc"].notna()].copy()
    if t.empty:
        return pd.DataFrame(columns=cols)
    # a file written before thief_init existed has as-released thieves only
    t["thief_init"] = t["thief_init"].fillna("none") if "thief_init" in t else "none"
    for c in ("lock_value", "ft_epochs", "ft_lr", "ft_data_fraction", "fine_acc", "prun_acc", "locked_channels"):
        t[c] = pd.to_numeric(t[c])
    g = t.groupby(THIEF_GROUP, dropna=False).agg(
        fine_acc=("fine_acc", "mean"), fine_acc_std=("fine_acc", "std"), prun_acc=("prun_acc", "mean"),
        locked_channels=("locked_channels", "max"), seeds=("trial_id", "size"),
        trial_ids=("trial_id", sorted)).reset_index()
    g["fine_acc_std"] = g["fine_acc_std"].fillna(0.0)
    g.insert(0, "kind", np.where(g["importance"] == SCRATCH, "scratch", "public"))
    return g.sort_values(["ft_data_fraction", "kind", "importance", "lock_mode", "lock_value", "thief_init",
                          "ft_epochs", "ft_lr"],
                         kind="stable").reset_index(drop=True)[cols]


def thief_label(r) -> str:
    start = "from scratch" if r["kind"] == "scratch" else \
        f"public {r['importance']} {lock_label(r['lock_mode'], float(r['lock_value']))}" + (
            ", revived" if r.get("thief_init", "none") == "revive" else "")
    return f"{start}, {100 * float(r['ft_data_fraction']):g}% data, {int(r['ft_epochs'])} ep"


def head_start(table: pd.DataFrame, lock: tuple | None = None) -> list[dict]:
    """Per thief data fraction: the best public thief (at `lock` = (importance, mode, value), or any lock), the best
    scratch thief, and the head start public − scratch (None where either is missing). Best = highest mean over
    seeds among the schedules tried at that fraction."""
    out = []
    for f, at in table.groupby("ft_data_fraction", sort=True):
        pub = at[at["kind"] == "public"]
        if lock is not None:
            pub = pub[(pub["importance"] == lock[0]) & (pub["lock_mode"] == lock[1])
                      & ((pub["lock_value"] - lock[2]).abs() < 1e-12)]
        scr = at[at["kind"] == "scratch"]
        p = None if pub.empty else float(pub["fine_acc"].max())
        s = None if scr.empty else float(scr["fine_acc"].max())
        r6 = lambda x: None if x is None else round(x, 6)
        out.append({"fraction": float(f), "public": r6(p), "scratch": r6(s),
                    "head_start": None if p is None or s is None else round(p - s, 6)})
    return out


def thief_summary(thieves: pd.DataFrame) -> dict:
    """What levels.json records of the thief trials: the best thief (accuracy, who, trial ids), per fraction the
    best public / scratch / head start, and every thief group."""
    t = thief_table(thieves)
    r6 = lambda x: round(float(x), 6)
    groups = [{"kind": r["kind"], "importance": r["importance"], "lock_mode": r["lock_mode"],
               "lock_value": float(r["lock_value"]), "locked_channels": int(r["locked_channels"]),
               "thief_init": str(r["thief_init"]),
               "schedule": {"epochs": int(r["ft_epochs"]), "lr": float(r["ft_lr"]),
                            "data_fraction": float(r["ft_data_fraction"]), "scope": r["ft_scope"]},
               "prun_acc": None if pd.isna(r["prun_acc"]) else r6(r["prun_acc"]), "fine_acc": r6(r["fine_acc"]),
               "fine_acc_std": r6(r["fine_acc_std"]), "seeds": int(r["seeds"]), "trial_ids": list(r["trial_ids"])}
              for _, r in t.iterrows()]
    best = None
    if not t.empty:
        r = t.loc[t["fine_acc"].idxmax()]
        best = {"label": thief_label(r), "kind": r["kind"], "fraction": float(r["ft_data_fraction"]),
                "trial_ids": list(r["trial_ids"])}
    return {"best_acc": None if best is None else r6(t["fine_acc"].max()), "best": best,
            "by_fraction": head_start(t) if not t.empty else [], "groups": groups,
            "failed": sorted(thieves.loc[thieves["status"] != "ok", "trial_id"].astype(str))}


def _check_settings(df, levels, min_gap, max_locked_acc, targets) -> float:
    """Validate the knobs; return max_locked_acc with its default (chance + 0.1) filled in."""
    if df.empty:
        raise GradauthError("the trials table has no rows: run `gradauth sweep CONFIG` first")
    if not isinstance(levels, (int, np.integer)) or levels < 1:
        raise GradauthError(f"levels must be a whole number ≥ 1, got {levels!r}: pass e.g. --levels 3")
    if not 0 <= min_gap < 1:
        raise GradauthError(f"min_gap must be in [0, 1), got {min_gap!r}: pass e.g. --min-gap 0.05")
    if targets is not None and (len(targets) != levels or not all(0 <= t <= 1 for t in targets)):
        raise GradauthError(f"targets {list(targets)} must be {levels} accuracies in [0, 1], one per level: "
                            f"pass --targets with {levels} values or --levels {len(targets)}")
    if max_locked_acc is None:
        classes = df["num_classes"].dropna().unique()
        if len(classes) != 1:
            raise GradauthError(f"the trials mix num_classes {sorted(classes)}: select from one experiment's "
                                f"trials.parquet, or pass --max-locked-acc")
        max_locked_acc = rundir.chance_bound(classes[0])
    if not 0 <= max_locked_acc <= 1:
        raise GradauthError(f"max_locked_acc must be in [0, 1], got {max_locked_acc!r}: pass e.g. --max-locked-acc 0.2")
    return float(max_locked_acc)


def _groups(ok: pd.DataFrame) -> pd.DataFrame:
    """One row per candidate, ranked: best fine_acc first; ties go to lower std, stronger lock, cheaper schedule."""
    g = ok.groupby(GROUP, dropna=False).agg(
        fine_acc=("fine_acc", "mean"), fine_acc_std=("fine_acc", "std"), fine_top3=("fine_top3", "mean"),
        fine_top3_std=("fine_top3", "std"), prun_acc=("prun_acc", "mean"), locked_channels=("locked_channels", "max"),
        seeds=("trial_id", "size"), trial_ids=("trial_id", sorted)).reset_index()
    g[["fine_acc_std", "fine_top3_std"]] = g[["fine_acc_std", "fine_top3_std"]].fillna(0.0)
    g["cost"] = g["ft_epochs"] * g["ft_data_fraction"]
    order = ["fine_acc", "fine_acc_std", "prun_acc", "cost", *GROUP]
    return g.sort_values(order, ascending=[False] + [True] * (len(order) - 1), kind="stable").reset_index(drop=True)


def _separated(gap, std_a, std_b, min_gap):
    """Can two candidates `gap` apart (higher minus lower) be consecutive levels? Works on scalars and arrays."""
    return (gap > 0) & (gap >= min_gap - _EPS) & (gap > 2 * np.maximum(std_a, std_b))


def _separated_matrix(c: pd.DataFrame, min_gap: float) -> np.ndarray:
    """C[i, j]: candidate j may directly follow candidate i as the next level down (only i < j by rank)."""
    f, s = c["fine_acc"].to_numpy(), c["fine_acc_std"].to_numpy()
    return _separated(f[:, None] - f[None, :], s[:, None], s[None, :], min_gap)


def _longest_chains(C: np.ndarray) -> np.ndarray:
    """L[i]: the most levels a feasible chain starting at candidate i can have (i itself included)."""
    L = np.zeros(len(C), dtype=int)
    for i in range(len(C) - 1, -1, -1):  # successors always rank after i
        L[i] = 1 + L[C[i]].max(initial=0)
    return L


def _lexmax(C: np.ndarray, L: np.ndarray, n: int) -> list[int]:
    """Best-ranked next level that still leaves room for the rest: exact for the lexicographic maximum."""
    chain: list[int] = []
    for k in range(n):
        ok = L >= n - k
        if chain:
            ok &= C[chain[-1]]
        chain.append(int(np.flatnonzero(ok)[0]))
    return chain


def _nearest(C: np.ndarray, f: np.ndarray, targets: list[float]) -> list[int]:
    """Feasible chain minimising Σ|fine_acc − target|; ties go to the better-ranked candidate."""
    n = len(targets)
    cost = np.full((n, len(f)), np.inf)
    cost[-1] = np.abs(f - targets[-1])
    for k in range(n - 2, -1, -1):  # cost[k, i]: best total for levels k.. with candidate i as level k
        cost[k] = np.abs(f - targets[k]) + np.where(C, cost[k + 1][None, :], np.inf).min(axis=1)
    chain: list[int] = []
    for k in range(n):
        row = cost[k] if not chain else np.where(C[chain[-1]], cost[k], np.inf)
        chain.append(int(np.argmin(np.round(row, 12))))
    return chain


def _level_dict(level: int, c: pd.Series) -> dict:
    r = lambda x: round(float(x), 6)  # means of test-set ratios: 6 digits is exact enough and reads cleanly
    return {"level": level, "lock_mode": c["lock_mode"], "lock_value": float(c["lock_value"]),
            "schedule": schedule_dict(from_row(Schedule, c)),
            "fine_acc": r(c["fine_acc"]), "fine_acc_std": r(c["fine_acc_std"]), "prun_acc": r(c["prun_acc"]),
            "trial_ids": list(c["trial_ids"]), "importance": c["importance"],
            "locked_channels": int(c["locked_channels"]), "fine_top3": r(c["fine_top3"]),
            "fine_top3_std": r(c["fine_top3_std"]), "seeds": int(c["seeds"]),
            # a synapse lock says so; a channel level stays as levels.json always wrote it
            **({"lock_granularity": str(c["lock_granularity"])}
               if str(c.get("lock_granularity", "channel")) != "channel" else {})}


def _reject(trial_ids, kind: str, why: str) -> list[dict]:
    return [{"trial_id": t, "kind": kind, "why": why} for t in trial_ids]


def _row_reasons(rows: pd.DataFrame) -> list[dict]:
    """Trials that never reached a fine_acc: unlockable, failed, or (damaged file) ok without a fine_acc."""
    out = []
    for _, t in rows.iterrows():
        if t["status"] == "unlockable":
            acc = "" if pd.isna(t["prun_acc"]) else f"locked accuracy {t['prun_acc']:.3f} "
            out += _reject([t["trial_id"]], "unlockable", f"status unlockable ({acc}above lock_bound)")
        elif t["status"] == "error":
            out += _reject([t["trial_id"]], "error", "status error: the trial failed "
                                                     "(`gradauth sweep CONFIG --resume` retries it)")
        elif t["status"] == "degenerate":
            out += _reject([t["trial_id"]], "status", "status degenerate: fine-tuning gave a model of no use")
        else:
            out += _reject([t["trial_id"]], "status", f"status {t['status']} without a fine_acc")
    return out


def _group_reasons(groups: pd.DataFrame, kind: str, why) -> list[dict]:
    """Every trial of each candidate group rejected with `kind` and the group's reason `why(group)`."""
    return [r for _, g in groups.iterrows() for r in _reject(g["trial_ids"], kind, why(g))]


def _seeds_note(g) -> str:
    return f" (mean of {g['seeds']} seeds)" if g["seeds"] > 1 else ""


def _locked_reasons(groups: pd.DataFrame, max_locked_acc: float) -> list[dict]:
    return _group_reasons(groups, "locked_acc", lambda g: f"locked accuracy {g['prun_acc']:.3f}{_seeds_note(g)} above "
                                                          f"max_locked_acc {max_locked_acc:.3f}")


def _worthless_reasons(groups: pd.DataFrame, max_locked_acc: float, min_gap: float) -> list[dict]:
    return _group_reasons(groups, "worthless", lambda g: f"fine_acc {g['fine_acc']:.3f} not min_gap {min_gap:g} above "
                                                         f"max_locked_acc {max_locked_acc:.3f}: no better than a "
                                                         f"locked model")


def _thief_reasons(groups: pd.DataFrame, summary: dict, min_gap: float) -> list[dict]:
    return _group_reasons(groups, "thief", lambda g: f"fine_acc {g['fine_acc']:.3f} not min_gap {min_gap:g} above the "
                                                     f"best thief {summary['best_acc']:.3f} "
                                                     f"({summary['best']['label']}): a thief gets this close without "
                                                     f"a key, so it does not sell")


def _conflict(c: pd.Series, lv: pd.Series, k: int, min_gap: float) -> tuple[str, str] | None:
    """Why candidate `c` cannot sit next to level `k` (1-based), or None if it could."""
    hi, lo = (lv, c) if lv["fine_acc"] >= c["fine_acc"] else (c, lv)
    gap = hi["fine_acc"] - lo["fine_acc"]
    if _separated(gap, hi["fine_acc_std"], lo["fine_acc_std"], min_gap):
        return None
    if gap <= 0 or gap < min_gap - _EPS:
        return "min_gap", (f"fine_acc {c['fine_acc']:.3f} within min_gap {min_gap:g} of level {k} "
                           f"({lv['fine_acc']:.3f})")
    noise = 2 * max(c["fine_acc_std"], lv["fine_acc_std"])
    return "noise", (f"fine_acc {c['fine_acc']:.3f} ± {c['fine_acc_std']:.3f} too close to level {k} "
                     f"({lv['fine_acc']:.3f} ± {lv['fine_acc_std']:.3f}): gap {gap:.3f} not above "
                     f"2 × std {noise:.3f}")


def _candidate_reasons(cands: pd.DataFrame, chain: list[int], C, L, settings: dict) -> list[dict]:
    """Say, for each unchosen candidate, the rule that kept it out (mirrors the search that chose the chain)."""
    reason = _lexmax_reason if settings["targets"] is None else _target_reason
    out = []
    for r in range(len(cands)):
        if r not in chain:
            out += _reject(cands.loc[r, "trial_ids"], *reason(cands, r, chain, C, L, settings))
    return out


def _lexmax_reason(cands, r, chain, C, L, settings) -> tuple[str, str]:
    """The lexmax search passed over r at the first level it outranks: r either clashes with the level above that
    slot or leaves too few levels below it. Ranked below every level, it is simply not needed."""
    c, n = cands.loc[r], len(chain)
    k = next((k for k, j in enumerate(chain) if r < j), None)
    if k is None:
        clash = _conflict(c, cands.loc[chain[-1]], n, settings["min_gap"])
        return clash or ("not_needed", f"not needed: fine_acc {c['fine_acc']:.3f} is below level {n} "
                                       f"({cands.loc[chain[-1], 'fine_acc']:.3f}) and {n} levels were asked for")
    if k > 0 and not C[chain[k - 1], r]:
        return _conflict(c, cands.loc[chain[k - 1]], k, settings["min_gap"])
    return "no_chain", (f"fine_acc {c['fine_acc']:.3f} cannot be level {k + 1}: with it at most {k + L[r]} "
                        f"of {n} levels fit the min_gap and 2 × std rules")


def _target_reason(cands, r, chain, C, L, settings) -> tuple[str, str]:
    """A clash with a chosen level if there is one (nearest first), else the chain is simply nearer the targets."""
    c = cands.loc[r]
    near = sorted(range(len(chain)), key=lambda k: abs(cands.loc[chain[k], "fine_acc"] - c["fine_acc"]))
    for k in near:
        clash = _conflict(c, cands.loc[chain[k]], k + 1, settings["min_gap"])
        if clash:
            return clash
    f = cands.loc[chain, "fine_acc"].to_numpy()
    dist = np.abs(f - np.asarray(settings["targets"])).sum()
    return "not_needed", (f"not needed: levels {'/'.join(f'{x:.3f}' for x in f)} are the feasible chain nearest "
                          f"the targets {'/'.join(f'{t:g}' for t in settings['targets'])} (total distance {dist:.3f})")


def _infeasible(df, groups, cands, L, settings) -> str:
    """One line: how many levels are possible, and which knobs would actually give the asked number."""
    n, best = settings["levels"], int(L.max(initial=0))
    if groups.empty:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(df["status"].value_counts().items()))
        return (f"no trial finished fine-tuning ({counts}), so 0 of {n} levels are possible: sweep larger lock values "
                f"(so locked accuracy falls below sweep.lock_bound) or fix the failing trials")
    if cands.empty and (groups["prun_acc"] <= settings["max_locked_acc"] + _EPS).any():
        return (f"0 of {n} levels possible: every (lock, schedule) pair that locks to ≤ max_locked_acc "
                f"{settings['max_locked_acc']:.3f} recovers less than {settings['max_locked_acc'] + settings['min_gap']:.3f} "
                f"(max_locked_acc + min_gap): sweep longer fine-tune schedules or smaller lock values")
    if cands.empty:
        return (f"0 of {n} levels possible: no (lock, schedule) pair has locked accuracy ≤ max_locked_acc "
                f"{settings['max_locked_acc']:.3f} (lowest {groups['prun_acc'].min():.3f}): use a larger "
                f"--max-locked-acc or sweep larger lock values")
    fixes = [f"--levels {best}"]
    if _longest_chains(_separated_matrix(cands, 0.0)).max(initial=0) >= n:
        fixes.append("a smaller --min-gap")
    if _longest_chains(_separated_matrix(groups, settings["min_gap"])).max(initial=0) >= n:
        fixes.append("a larger --max-locked-acc")
    fixes.append("more lock values or fine-tune schedules in the sweep")
    return (f"only {best} of {n} levels possible: {len(cands)} of {len(groups)} candidate (lock, schedule) pairs "
            f"have locked accuracy ≤ max_locked_acc {settings['max_locked_acc']:.3f}, and they do not give {n} "
            f"fine_acc values each ≥ min_gap {settings['min_gap']:g} and > 2 × std apart: use "
            f"{', '.join(fixes[:-1])} or {fixes[-1]}")


def format_table(selection: Selection) -> str:
    """The chosen levels as a fixed-width table for the terminal."""
    head = ["level", "lock", "schedule", "prun_acc", "fine_acc ± std", "top-3", "seeds"]
    rows = [[str(lv["level"]), f"{lv['importance']} "
             f"{lock_label(lv['lock_mode'], lv['lock_value'], lv.get('lock_granularity', 'channel'))}",
             schedule_label(lv["schedule"]), f"{lv['prun_acc']:.3f}",
             f"{lv['fine_acc']:.3f} ± {lv['fine_acc_std']:.3f}", f"{lv['fine_top3']:.3f}", str(lv["seeds"])]
            for lv in selection.levels]
    if selection.thief is not None and selection.thief["best_acc"] is not None:
        head.append("over best thief")
        for r, lv in zip(rows, selection.levels):
            r.append(f"{lv['thief_margin']:+.3f}")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()
    title = f"levels (method {selection.method}; {len(selection.rejected)} trials rejected)"
    lines = [title, line(head), line(["-" * w for w in widths]), *map(line, rows)]
    if selection.thief is not None and selection.thief["best_acc"] is not None:
        lines.append(f"best thief without a key: {selection.thief['best_acc']:.3f} ({selection.thief['best']['label']})")
    return "\n".join(lines)


def config_defaults(cfg, out: str | os.PathLike) -> dict:
    """What `gradauth select DIR` (and `gradauth status DIR`) select with when DIR holds a config: its select
    section and name, and for a targeted search without explicit select.targets the search's targets (resolved
    against DIR/base.json), so the selector picks the level set nearest them, as the search hit them, not the
    lexicographic maximum, which may take another candidate a tolerance away."""
    defaults = {k: v for k, v in vars(cfg.select).items() if v is not None} | {"experiment": cfg.name}
    if cfg.search.mode == "targeted" and cfg.select.targets is None and (Path(out) / rundir.BASE_METRICS).is_file():
        base_acc = float(rundir.read_base_info(Path(out))["base_acc"])
        defaults |= {"targets": cfg.search.resolve_targets(base_acc), "levels": cfg.search.levels}
    return defaults


def select_dir(out_dir: str | os.PathLike, levels: int | None = None, min_gap: float | None = None,
               max_locked_acc: float | None = None, targets: list[float] | None = None,
               defaults: dict | None = None) -> Selection:
    """`gradauth select DIR`: explicit arguments win over `defaults` (the config's select section, plus
    `experiment`), which win over the built-ins. Writes DIR/levels.json atomically and prints the table."""
    out_dir, d = Path(out_dir), defaults or {}
    path = out_dir / rundir.TRIALS
    trials = load_trials(path)
    digest = file_sha256(path)
    if levels is None:  # explicit targets say how many levels they want
        levels = len(targets) if targets is not None else d.get("levels", 3)
    targets = targets if targets is not None else d.get("targets")
    min_gap = min_gap if min_gap is not None else d.get("min_gap", 0.05)
    max_locked_acc = max_locked_acc if max_locked_acc is not None else d.get("max_locked_acc")
    selection = select_levels(trials, levels, min_gap, max_locked_acc, targets)
    doc = selection.to_json(d.get("experiment") or out_dir.resolve().name) | {"trials_sha256": digest}
    write_json(out_dir / rundir.LEVELS, doc)
    print(format_table(selection))
    return selection


__all__ = ["TRIAL_COLUMNS", "Selection", "load_trials", "select_levels", "format_table", "select_dir", "config_defaults",
           "lock_label", "schedule_label", "thief_table", "thief_summary", "thief_label", "head_start"]
