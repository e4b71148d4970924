"""`gradauth status DIR`: how far a sweep is (done / running / pending / failed) and the levels so far.

Reads only the project's own files: the rows (DIR/trials.d while a sweep runs or after it was killed, else
DIR/trials.parquet), DIR/progress.json for the live states, and config.yaml for the grid's size and the selection
settings. Never Ray's experiment state: nothing is unpickled, so a results folder from anyone can be looked at,
and it answers at once at any number of trials (no torch, no Ray imported).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import rundir
from .errors import GradauthError
from .schema import OPTIONAL
from .rows import FINISHED, PARTS, TRIALS_SCHEMA, read_parts, read_progress


def _grid_size(cfg) -> int:
    from .knobs import schedules  # the grid's schedule axes come from Schedule's fields (no torch imported)
    return cfg.importances * len(cfg.lock.values) * len(schedules(cfg.finetune))


def sweep_status(out: Path) -> dict:
    from .config import load_progress_view
    from .select import load_trials
    if not (out / rundir.CONFIG).is_file():
        raise GradauthError(f"{out} holds no config.yaml: is it an output dir of `gradauth run` / `gradauth sweep`?")
    cfg = load_progress_view(out / rundir.CONFIG)  # no registries: no torch, and no plugins needed to look
    progress = read_progress(out)
    if (out / PARTS).is_dir():
        rows = read_parts(out)
    elif (out / rundir.TRIALS).is_file():
        rows = load_trials(out / rundir.TRIALS, [c for c in TRIALS_SCHEMA.names if c not in OPTIONAL])
    else:
        rows = pd.DataFrame(columns=TRIALS_SCHEMA.names)
    states = dict(progress["trials"]) if progress else {}
    if states:
        rows = rows[rows["trial_id"].isin(set(states))]  # rows of this sweep's grid only
    # without progress.json (a folder copied without it): the grid's size, or for a targeted search, whose trials
    # are proposed as it goes, the rows there are
    total = len(states) if states else (len(rows) if cfg.search.mode == "targeted" else _grid_size(cfg))
    counts = {"done": 0, "running": 0, "pending": 0, "failed": 0}
    by_status: dict[str, int] = {}
    for status, n in rows["status"].value_counts().items():
        state = FINISHED.get(status, "failed")
        counts["failed" if state == "failed" else "done"] += int(n)
        if state != "failed":
            by_status[status] = int(n)
    have = set(rows["trial_id"])
    live = [s for t, s in states.items() if t not in have]
    counts["running"] = sum(s == "running" for s in live)
    counts["failed"] += sum(s == "failed" for s in live)  # a failure whose row had not been written yet
    counts["pending"] = max(0, total - len(have) - counts["running"] - sum(s == "failed" for s in live))
    ok = rows[rows["status"] != "error"]   # thief rows stay: the selector never takes one, and a level must beat them
    return {"experiment": cfg.name, "total": total, **counts, "by_status": by_status, "rows": ok,
            "updated": progress.get("updated") if progress else None, "cfg": cfg}


SEARCH_FILE = rundir.SEARCH


def read_search(out: Path) -> dict | None:
    """DIR/search.json (a targeted search's progress), checked: None if absent; a damaged or foreign file is
    refused with one line (results folders travel)."""
    import json
    import math
    path = out / SEARCH_FILE
    if not path.is_file():
        return None
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    try:
        obj = json.loads(path.read_bytes())
        s = obj["summary"]
        ok = (obj.get("version") == 1 and isinstance(s["levels"], list) and num(s["trials"])
              and num(s["trial_seconds"]) and isinstance(s["finished"], bool)
              and all(isinstance(lv, dict) and num(lv.get("level")) and num(lv.get("target"))
                      and lv.get("status") in ("hit", "missed", "searching")
                      and (lv["status"] != "hit" or (num(lv.get("fine_acc")) and num(lv.get("seeds"))))
                      for lv in s["levels"]))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        ok = False
    if not ok:
        raise GradauthError(f"{path} is not a gradauth search progress file: delete it (`gradauth sweep CONFIG "
                            f"--resume` rewrites it)")
    return obj


def search_lines(obj: dict) -> list[str]:
    """One line per target: target, best so far, trials, hit / missed / searching (and why)."""
    s = obj["summary"]
    state = "finished" if s["finished"] else "searching"
    out = [f"targeted search ({state}): {int(s['trials'])} trials, {s['trial_seconds']:.0f} trial-seconds"]
    for lv in s["levels"]:
        t = lv.get("trials")
        n = f"  {int(t)} trials" if isinstance(t, int) and not isinstance(t, bool) else ""
        if lv["status"] == "hit":
            best = f"{lv['fine_acc']:.3f} over {int(lv['seeds'])} seed(s), lock {lv.get('lock_value')}"
            extra = ""
            if "sellable" in lv:
                extra = f", {'sellable' if lv['sellable'] else 'NOT sellable'} ({lv['margin_over_thief']:+.3f} over the thief)"
            out.append(f"  level {int(lv['level'])}: target {lv['target']:.3f}  best {best}{n}  hit{extra}")
        else:
            out.append(f"  level {int(lv['level'])}: target {lv['target']:.3f}{n}  {lv['status']}: {lv.get('why', '')}")
    return out


def print_status(out: Path) -> None:
    import time

    from .select import config_defaults, format_table, select_levels
    s = sweep_status(out)
    search = read_search(out)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(s["by_status"].items()))
    age = f", progress {time.time() - s['updated']:.0f} s old" if s["updated"] else ""
    print(f"{s['experiment']}: {s['done']}/{s['total']} trials done{f' ({kinds})' if kinds else ''}, "
          f"{s['running']} running, {s['pending']} pending, {s['failed']} failed{age}")
    if search is not None:
        print("\n".join(search_lines(search)))
    if s["rows"].empty:
        return
    d = config_defaults(s["cfg"], out)   # what `gradauth select DIR` would select with
    try:
        selection = select_levels(s["rows"], levels=d.get("levels", 3), min_gap=d.get("min_gap", 0.05),
                                  max_locked_acc=d.get("max_locked_acc"), targets=d.get("targets"))
        print(format_table(selection))
    except GradauthError as e:
        print(f"levels so far: none yet ({e})")
