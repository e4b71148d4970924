"""The file contracts between stages: trials.parquet and levels.json, with the validating readers every stage uses.

Results folders travel between machines and people, so a reader trusts nothing it opens: `read_trials` and
`read_levels` refuse a missing, unreadable, mistyped or inconsistent file with one `GradauthError` line that names
the file and the command that rewrites it. Derived files record the sha256 of what they were derived from
(`file_sha256`): levels.json of its trials.parquet (`trials_sha256`), the attack of its levels.json and release
manifest, so a reader can tell a current file from a stale one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import GradauthError
from .knobs import LockSpec, Schedule, knobs

_ARROW = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}


def knob_columns(cls) -> dict:
    """Column → Arrow type of a LockSpec / Schedule class, from its fields' metadata (knobs.py)."""
    return {m["column"]: _ARROW[m["kind"]] for _, m in knobs(cls)}


# The trials.parquet contract, column → Arrow type (`pa.schema(TRIAL_COLUMNS)` is the file's schema). The lock
# columns (importance, lock_mode, lock_value) and the schedule columns (ft_epochs, ft_lr, ft_data_fraction, ft_scope,
# seed, then any knob added to Schedule) come from the fields of LockSpec and Schedule.
TRIAL_COLUMNS = {
    "trial_id": pa.string(), "dataset": pa.string(), "arch": pa.string(), "num_classes": pa.int64(),
    **knob_columns(LockSpec), "locked_channels": pa.int64(), "total_channels": pa.int64(), **knob_columns(Schedule),
    "base_acc": pa.float64(), "prun_acc": pa.float64(), "fine_acc": pa.float64(),
    "fine_top3": pa.float64(), "params": pa.int64(), "flops": pa.int64(), "status": pa.string(),
    "seconds": pa.float64(), "git_sha": pa.string(), "config_hash": pa.string(),
}
# Written by the sweep after the columns above, but optional for readers: a trials.parquet written before it existed
# (or by hand) lacks it, and a missing phase means grid. `phase` says what a trial was for: a grid point
# (`search.mode: grid`), or a targeted search's level candidate or thief attack (search.py). Only grid and level
# rows are level candidates; thief rows are what a level must beat.
# `thief_init` (thief rows only): how the thief started from the public model: none = as released, revive = the
# careful thief who resets the visibly locked channels first (release.revive); null on every other row.
OPTIONAL_COLUMNS = {"phase": pa.string(), "thief_init": pa.string()}
THIEF_INITS = ("none", "revive")
OPTIONAL = tuple(OPTIONAL_COLUMNS)
WRITTEN_COLUMNS = TRIAL_COLUMNS | OPTIONAL_COLUMNS  # what `gradauth sweep` writes, in this order
PHASES = ("grid", "level", "thief")
# ok: fine-tuned; unlockable: locked accuracy above the bound, not fine-tuned; error: the trial failed;
# degenerate: a lock that empties the network or a layer compaction would have to cut out; found before
# fine-tuning, never fine-tuned or retried (trial.run_trial).
STATUSES = ("ok", "unlockable", "error", "degenerate")
ACCURACIES = ("base_acc", "prun_acc", "fine_acc", "fine_top3")
# A grid point: the columns that, with the seed, make one trial. Two rows of one grid point would count a seed twice.
GRID = (*knob_columns(LockSpec), *knob_columns(Schedule))
# Of those, the ones every trials.parquet has (a knob added later may be absent from an older file: its default).
GRID_REQUIRED = tuple(m["column"] for cls in (LockSpec, Schedule) for _, m in knobs(cls) if m["id_always"])
# What a finished (ok) trial must carry, finite.
OK_REQUIRED = ("prun_acc", "fine_acc")
REWRITE_TRIALS = "re-run `gradauth sweep CONFIG` (or `--resume`) to rewrite it"
# Thief trials (search.py's `thief` phase): trial_id `thief-…`, importance `scratch` (lock_mode `none`) for a model
# trained from scratch, else the public model's lock; their schedule is in the ft_* columns. Optional `phase` column:
# grid | level | thief (absent in sweeps written before the targeted search).
THIEF_PREFIX = "thief-"
SCRATCH = "scratch"
PHASES = ("grid", "level", "thief")


def thief_rows(df: pd.DataFrame) -> pd.Series:
    """Boolean mask of the thief trials of a trials table (by `phase` when the column says so, else by trial id or
    the `scratch` importance). A thief trial is an attack measurement, never a level candidate."""
    mask = pd.Series(False, index=df.index)
    if "trial_id" in df:
        mask |= df["trial_id"].astype(str).str.startswith(THIEF_PREFIX)
    if "importance" in df:
        mask |= df["importance"].astype(str) == SCRATCH
    if "phase" in df:
        mask |= df["phase"].astype(str) == "thief"
    return mask


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- trials.parquet --------------------------------------------------------------------------------------------

def _kind(t: pa.DataType) -> str:
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    return str(t)


def _fits(want: pa.DataType, got: pa.DataType) -> bool:
    k, g = _kind(want), _kind(got)
    return g == "null" or g == k or (k == "float" and g == "int")


def read_trials(path: str | os.PathLike, needed=()) -> pd.DataFrame:
    """trials.parquet as a DataFrame, validated: refuses (one line naming the file and the fix) a missing or
    unreadable file, missing `needed` columns, a contract column of the wrong type (text in a numeric column), no
    rows, missing or duplicated trial ids, two rows of one grid point and seed, an unknown status, accuracies
    outside [0, 1] or NaN where a finished trial needs a number. Columns beyond the contract are kept as they are."""
    path = Path(path)
    if not path.is_file():
        raise GradauthError(f"{path} not found: run `gradauth sweep CONFIG` first (it writes trials.parquet)")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file; all mean the same to the user
        raise GradauthError(f"{path} is not a readable Parquet file ({type(e).__name__}): {REWRITE_TRIALS}") from None
    bad = lambda what: GradauthError(f"{path}: {what}: {REWRITE_TRIALS}")
    names = table.schema.names
    if len(set(names)) != len(names):
        raise bad("duplicated column names")
    later = {m["column"] for cls in (LockSpec, Schedule) for _, m in knobs(cls) if not m["id_always"]}
    missing = [c for c in needed if c not in names and c not in later]   # a later knob's column: its default
    if missing:
        raise GradauthError(f"{path} lacks column(s) {', '.join(missing)}: it was not written by `gradauth sweep`; "
                            f"{REWRITE_TRIALS}")
    mistyped = [f"{c} ({table.schema.field(c).type}, {WRITTEN_COLUMNS[c]} expected)" for c in names
                if c in WRITTEN_COLUMNS and not _fits(WRITTEN_COLUMNS[c], table.schema.field(c).type)]
    if mistyped:
        raise bad(f"column(s) of the wrong type: {', '.join(mistyped)}")
    if table.num_rows == 0:
        raise bad("no rows (an empty sweep)")
    try:
        df = table.to_pandas()
    except Exception as e:
        raise bad(f"unreadable values ({type(e).__name__})") from None
    df = _later_knob_defaults(df)
    _check_rows(df, bad)
    return df


def _later_knob_defaults(df: pd.DataFrame) -> pd.DataFrame:
    """A knob added later (not `id_always`, e.g. lock_granularity) is its default where its cell is empty: rows
    written before it existed, or by hand, mean the default."""
    for cls in (LockSpec, Schedule):
        for f, m in knobs(cls):
            c = m["column"]
            if not m["id_always"] and c not in df:   # a file written before the knob existed
                df[c] = f.default
            elif not m["id_always"] and df[c].isna().any():
                df[c] = df[c].astype(object).where(df[c].notna(), f.default)
    return df


def _where(df: pd.DataFrame, mask, limit: int = 3) -> str:
    ids = df.loc[mask, "trial_id"].astype(str).tolist() if "trial_id" in df else [str(i) for i in df.index[mask]]
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _check_rows(df: pd.DataFrame, bad) -> None:
    if "trial_id" in df:
        ids = df["trial_id"]
        if ids.isna().any() or (ids.astype(str).str.strip() == "").any():
            raise bad(f"{int(ids.isna().sum() + (ids.astype(str).str.strip() == '').sum())} row(s) without a trial_id")
        dup = ids.duplicated(keep=False)
        if dup.any():
            raise bad(f"duplicated trial_id(s) {', '.join(sorted(set(ids[dup])))[:200]} (each seed would count twice)")
    if "phase" in df:
        unknown = sorted({str(p) for p in df["phase"] if p is not None and not (isinstance(p, float) and math.isnan(p))
                          and p not in PHASES})
        if unknown:
            raise bad(f"unknown phase {', '.join(unknown)[:100]} (expected one of {', '.join(PHASES)})")
    if "status" in df:
        unknown = sorted({str(s) for s in df["status"] if s not in STATUSES})
        if unknown:
            raise bad(f"unknown status {', '.join(unknown)[:100]} (expected one of {', '.join(STATUSES)})")
    for c in df.columns:
        if c in TRIAL_COLUMNS and _kind(TRIAL_COLUMNS[c]) in ("int", "float"):
            v = pd.to_numeric(df[c], errors="coerce")
            inf = np.isinf(v.to_numpy(dtype=float, na_value=np.nan))
            if inf.any():
                raise bad(f"{c} is infinite in trial(s) {_where(df, inf)}")
    for c in ACCURACIES:
        if c in df:
            v = pd.to_numeric(df[c], errors="coerce")
            out = v.notna() & ~v.between(0, 1)
            if out.any():
                raise bad(f"{c} outside [0, 1] in trial(s) {_where(df, out)}")
    if "status" in df:
        ok = df["status"] == "ok"
        for c in OK_REQUIRED:
            if c in df:
                nan = ok & pd.to_numeric(df[c], errors="coerce").isna()
                if nan.any():
                    raise bad(f"{c} is NaN/missing in finished (status ok) trial(s) {_where(df, nan)}")
    _check_thief_rows(df, bad)
    grid = [c for c in GRID if c in df]
    for c in grid:
        nan = df[c].isna()
        if nan.any():
            raise bad(f"{c} is missing in trial(s) {_where(df, nan)}")
    if "num_classes" in df:
        n = pd.to_numeric(df["num_classes"], errors="coerce")
        few = n.notna() & (n < 2)
        if few.any():
            raise bad(f"num_classes below 2 in trial(s) {_where(df, few)}")
    if set(GRID_REQUIRED) <= set(grid):
        # A thief trial may share a level trial's grid point (same lock and schedule, another meaning): duplicates
        # are counted within each kind.
        init = df["thief_init"].fillna("none") if "thief_init" in df else "none"   # zeros and revived: two thieves
        twice = df.assign(_thief=thief_rows(df), _init=init).duplicated([*grid, "_thief", "_init"], keep=False)
        if twice.any():
            raise bad(f"trials {_where(df, twice)} are the same grid point and seed (a seed would count twice)")


def _check_thief_rows(df: pd.DataFrame, bad) -> None:
    """Thief rows must say the same thing in every column that marks them, and a scratch model has no lock."""
    if "phase" in df:
        phase = df["phase"]
        unknown = sorted({str(p) for p in phase if p is not None and not (isinstance(p, float) and math.isnan(p))
                          and p not in PHASES})
        if unknown:
            raise bad(f"unknown phase {', '.join(unknown)[:100]} (expected one of {', '.join(PHASES)})")
        said = phase.notna()
        by_id = df["trial_id"].astype(str).str.startswith(THIEF_PREFIX) if "trial_id" in df else False
        mixed = said & ((phase == "thief") != by_id)
        if mixed.any():
            raise bad(f"trial(s) {_where(df, mixed)} have phase and trial_id that disagree on being a thief trial")
    if "thief_init" in df:
        init = df["thief_init"]
        said = init.notna()
        unknown = sorted({str(v) for v in init[said] if v not in THIEF_INITS})
        if unknown:
            raise bad(f"unknown thief_init {', '.join(unknown)[:100]} (expected one of {', '.join(THIEF_INITS)})")
        if "trial_id" in df:
            odd = said & ~df["trial_id"].astype(str).str.startswith(THIEF_PREFIX)
            if odd.any():
                raise bad(f"trial(s) {_where(df, odd)} have a thief_init but are not thief trials (trial_id thief-…)")
    if "importance" in df and "trial_id" in df:
        scratch = df["importance"].astype(str) == SCRATCH
        odd = scratch & ~df["trial_id"].astype(str).str.startswith(THIEF_PREFIX)
        if odd.any():
            raise bad(f"trial(s) {_where(df, odd)} have importance scratch but are not thief trials (trial_id thief-…)")
        if "lock_mode" in df:
            locked = scratch & (df["lock_mode"].astype(str) != "none")
            if locked.any():
                raise bad(f"from-scratch thief trial(s) {_where(df, locked)} carry a lock (lock_mode must be none)")


# ---- levels.json -----------------------------------------------------------------------------------------------

def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _acc(x) -> bool:
    return _num(x) and 0 <= x <= 1


_KIND_OK = {"int": _int, "float": _num, "str": lambda v: isinstance(v, str)}
# levels.json's `schedule`: Schedule's grouping knobs by field name (knobs.schedule_dict); the original ones must be
# there, a knob added later may be absent (an older file: its default), and each present one has its field's type.
_SCHEDULE_KNOBS = [(f.name, m) for f, m in knobs(Schedule) if m["group"]]
_SCHEDULE_KEYS = [name for name, m in _SCHEDULE_KNOBS if m["id_always"]]


def _schedule_ok(v) -> bool:
    return isinstance(v, dict) and all(k in v for k in _SCHEDULE_KEYS) and all(
        _KIND_OK[m["kind"]](v[name]) for name, m in _SCHEDULE_KNOBS if name in v)


# key → (check, what it must be); required keys of every level, then optional ones checked when present
LEVEL_REQUIRED = {
    "level": (_int, "a whole number"), "fine_acc": (_acc, "an accuracy in [0, 1]"),
    "trial_ids": (lambda v: isinstance(v, list) and v and all(isinstance(t, str) and t for t in v),
                  "a non-empty list of trial ids"),
    "lock_mode": (lambda v: isinstance(v, str) and v, "a lock mode"), "lock_value": (_num, "a number"),
    "fine_acc_std": (lambda v: _num(v) and v >= 0, "a std ≥ 0"),
    "prun_acc": (lambda v: v is None or _acc(v), "an accuracy in [0, 1]"),
    "schedule": (lambda v: _schedule_ok(v), "{" + ", ".join(_SCHEDULE_KEYS) + "}"),
}
LEVEL_OPTIONAL = {
    "importance": (lambda v: isinstance(v, str) and v, "an importance name"),
    "locked_channels": (lambda v: _int(v) and v >= 0, "a whole number ≥ 0"),
    "fine_top3": (_acc, "an accuracy in [0, 1]"), "fine_top3_std": (lambda v: _num(v) and v >= 0, "a std ≥ 0"),
    "seeds": (lambda v: _int(v) and v >= 1, "a whole number ≥ 1"),
    "thief_margin": (_num, "a number (fine_acc minus the best thief's)"),
}


def read_levels(path: str | os.PathLike, trials: pd.DataFrame | None = None, required: bool = True) -> dict | None:
    """levels.json, validated: an object with `levels` numbered 1..N in order, each with the keys and types
    `gradauth select` writes, `method` 1 or 2, `rejected` a list of {trial_id, why}; with `trials`, every trial id
    it names must be a row of trials.parquet. Missing file: refused if `required`, else None."""
    path = Path(path)
    fix = f"re-run `gradauth select {path.parent}` to rewrite it"
    if not path.is_file():
        if required:
            raise GradauthError(f"{path} not found: run `gradauth select {path.parent}` first")
        return None
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise GradauthError(f"{path} is not valid UTF-8 JSON: {fix}") from None
    bad = lambda what: GradauthError(f"{path}: {what}: {fix}")
    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    levels = doc.get("levels")
    if not isinstance(levels, list) or not levels or not all(isinstance(lv, dict) for lv in levels):
        raise bad("`levels` is not a non-empty list of level objects")
    numbers = [lv.get("level") for lv in levels]
    if not all(_int(n) for n in numbers) or numbers != list(range(1, len(levels) + 1)):
        raise bad(f"levels 1..N expected, in order (got {json.dumps(numbers)[:60]})")
    for lv in levels:
        name = f"level {lv['level']}"
        missing = [k for k in LEVEL_REQUIRED if k not in lv]
        if missing:
            raise bad(f"{name} lacks {', '.join(missing)}")
        for table in (LEVEL_REQUIRED, LEVEL_OPTIONAL):
            for k, (check, what) in table.items():
                if k in lv and not check(lv[k]):
                    raise bad(f"{name}: {k} must be {what}, got {json.dumps(lv[k])[:60]}")
    if "method" in doc and doc["method"] not in (1, 2) or isinstance(doc.get("method"), bool):
        raise bad(f"method must be 1 or 2, got {json.dumps(doc.get('method'))[:40]}")
    if "experiment" in doc and not isinstance(doc["experiment"], str):
        raise bad("experiment must be a string")
    rejected = doc.get("rejected", [])
    if not isinstance(rejected, list) or not all(
            isinstance(r, dict) and isinstance(r.get("trial_id"), str) and isinstance(r.get("why"), str)
            and isinstance(r.get("kind", ""), str) for r in rejected):
        raise bad("`rejected` is not a list of {trial_id, why} objects")
    settings = doc.get("settings", {})
    if not isinstance(settings, dict) or not all(
            settings.get(k) is None or check(settings[k]) for k, check in
            {"levels": _int, "min_gap": _num, "max_locked_acc": _acc,
             "targets": lambda v: isinstance(v, list) and all(_acc(t) for t in v)}.items()):
        raise bad("`settings` is not an object of levels, min_gap, max_locked_acc, targets")
    thief = doc.get("thief")
    if thief is not None and not (isinstance(thief, dict) and _acc(thief.get("best_acc"))
                                  and isinstance(thief.get("by_fraction", []), list)):
        raise bad("`thief` is not an object with best_acc (an accuracy) and by_fraction (a list)")
    if "trials_sha256" in doc and not isinstance(doc["trials_sha256"], str):
        raise bad("trials_sha256 must be a string")
    if trials is not None:
        known = set(trials["trial_id"].astype(str))
        unknown = sorted({t for lv in levels for t in lv["trial_ids"]} - known)
        if unknown:
            raise bad(f"trial id(s) {', '.join(unknown[:3])}{' …' if len(unknown) > 3 else ''} are not in "
                      f"trials.parquet (a levels.json from another sweep)")
    return doc


def levels_current(doc: dict, trials_path: str | os.PathLike) -> bool | None:
    """Was this levels.json selected from this trials.parquet? None when it does not say (an older file)."""
    want = doc.get("trials_sha256")
    return None if want is None else want == file_sha256(trials_path)


def check_levels_current(doc: dict, levels_path: Path, trials_path: Path) -> None:
    """Refuse a levels.json selected from another version of trials.parquet (the sweep was resumed or re-run)."""
    if levels_current(doc, trials_path) is False:
        raise GradauthError(f"{levels_path} was selected from another version of {trials_path.name} (its "
                            f"trials_sha256 differs): re-run `gradauth select {levels_path.parent}` first")


__all__ = ["TRIAL_COLUMNS", "OPTIONAL_COLUMNS", "WRITTEN_COLUMNS", "PHASES", "STATUSES", "thief_rows", "THIEF_PREFIX",
           "SCRATCH", "read_trials", "read_levels", "file_sha256", "levels_current",
           "check_levels_current"]
