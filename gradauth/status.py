"""`gradauth status DIR`: how far a sweep is (done / running / pending / failed) and the levels so far.

Reads only the project's own files: the rows (DIR/trials.d while a sweep runs or after it was killed, else
DIR/trials.parquet), DIR/progress.json for the live states, and config.yaml for the grid's size and the selection
settings. Never Ray's experiment state: nothing is unpickled, so a results folder from anyone can be looked at,
and it answers at once at any number of trials (no torch, no Ray imported).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .errors import GradauthError
from .rows import FINISHED, PARTS, TRIALS_SCHEMA, read_parts, read_progress


def _grid_size(cfg) -> int:
    ft = cfg.finetune
    n = len(cfg.importance) * len(cfg.lock.values)
    for v in (ft.epochs, ft.lr, ft.data_fraction, ft.scope, ft.seeds):
        n *= len(v)
    return n


def sweep_status(out: Path) -> dict:
    from .config import load_config
    from .select import load_trials
    if not (out / "config.yaml").is_file():
        raise GradauthError(f"{out} holds no config.yaml: is it an output dir of `gradauth run` / `gradauth sweep`?")
    cfg = load_config(out / "config.yaml")
    progress = read_progress(out)
    if (out / PARTS).is_dir():
        rows = read_parts(out)
    elif (out / "trials.parquet").is_file():
        rows = load_trials(out / "trials.parquet", TRIALS_SCHEMA.names)
    else:
        rows = pd.DataFrame(columns=TRIALS_SCHEMA.names)
    states = dict(progress["trials"]) if progress else {}
    if states:
        rows = rows[rows["trial_id"].isin(set(states))]  # rows of this sweep's grid only
    total = len(states) if states else _grid_size(cfg)
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
    ok = rows[rows["status"] != "error"]
    return {"experiment": cfg.name, "total": total, **counts, "by_status": by_status, "rows": ok,
            "updated": progress.get("updated") if progress else None, "select": cfg.select}


def print_status(out: Path) -> None:
    import time

    from .select import format_table, select_levels
    s = sweep_status(out)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(s["by_status"].items()))
    age = f", progress {time.time() - s['updated']:.0f} s old" if s["updated"] else ""
    print(f"{s['experiment']}: {s['done']}/{s['total']} trials done{f' ({kinds})' if kinds else ''}, "
          f"{s['running']} running, {s['pending']} pending, {s['failed']} failed{age}")
    if s["rows"].empty:
        return
    sel = s["select"]
    try:
        selection = select_levels(s["rows"], levels=sel.levels, min_gap=sel.min_gap,
                                  max_locked_acc=sel.max_locked_acc, targets=sel.targets)
        print(format_table(selection))
    except GradauthError as e:
        print(f"levels so far: none yet ({e})")
