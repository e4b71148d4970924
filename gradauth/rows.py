"""The sweep's rows on disk while it runs: one Parquet part per finished trial and a small progress file.

Rows are the source of truth. The driver writes each finished trial's row as `DIR/trials.d/<trial_id>.parquet`
(atomic, the trials.parquet schema) the moment Tune reports it finished, so a driver killed at any point loses no
finished row; at the end of the sweep (and of `--resume`) the parts are compacted into `DIR/trials.parquet` and
the folder is removed. `DIR/progress.json` holds every grid point's live state (pending, running, ok, unlockable,
degenerate, failed), rewritten atomically at most every few seconds.

Everything here reads only Parquet and JSON (never a pickle, never Ray's experiment state) and imports neither
torch nor Ray, so `gradauth status` answers at once.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import rundir
from .errors import GradauthError
from .fsutil import atomic_path, write_text
from .schema import WRITTEN_COLUMNS

TRIALS_SCHEMA = pa.schema(list(WRITTEN_COLUMNS.items()))  # the contract (schema.py) and the sweep's `phase` column
PARTS = rundir.PARTS
KEPT = "kept.parquet"        # in PARTS: the rows a `--resume` started with (from trials.parquet and earlier parts)
PROGRESS = rundir.PROGRESS
CHUNK = 100  # every CHUNK row parts become one chunk file: a reader opens at most N / CHUNK + CHUNK files
STATES = ("pending", "running", "ok", "unlockable", "degenerate", "failed")
FINISHED = {"ok": "ok", "unlockable": "unlockable", "degenerate": "degenerate", "error": "failed"}  # row status → state


def write_trials(rows: list[dict], path: Path) -> pd.DataFrame:
    """Rows → Parquet with the contract schema (docs/design.md, "trials.parquet"), atomically."""
    df = pd.DataFrame(rows, columns=TRIALS_SCHEMA.names).sort_values("trial_id", kind="stable").reset_index(drop=True)
    df["phase"] = df["phase"].where(df["phase"].notna(), "grid")  # a row without a phase is a grid point
    table = pa.Table.from_pandas(df, schema=TRIALS_SCHEMA, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    # the frame a reader of the file gets, every column's dtype included (an optional column such as thief_init is
    # pandas' str with NaN, whether its rows came from Tune's dicts or from a kept Parquet file)
    return table.to_pandas()


def part_path(out: Path, trial_id: str) -> Path:
    if not trial_id or "/" in trial_id or trial_id.startswith(".") or trial_id == KEPT[:-8] or trial_id.startswith("chunk-"):
        raise GradauthError(f"trial id {trial_id!r} cannot name a file: check importance labels in the config")
    return out / PARTS / f"{trial_id}.parquet"


def read_parts(out: Path) -> pd.DataFrame:
    """Every row in DIR/trials.d (kept rows first, then one part per trial; a later row of a trial wins)."""
    folder = out / PARTS
    if not folder.is_dir():
        return pd.DataFrame(columns=TRIALS_SCHEMA.names)
    names = sorted(e.name for e in os.scandir(folder) if e.name.endswith(".parquet") and not e.name.startswith(".")
                   and e.is_file(follow_symlinks=False))
    names.sort(key=lambda n: (n != KEPT, not n.startswith("chunk-")))  # kept, chunks, parts: later rows win
    if not names:
        return pd.DataFrame(columns=TRIALS_SCHEMA.names)
    try:
        table = pa.concat_tables([pq.read_table(folder / n, schema=TRIALS_SCHEMA) for n in names])
    except (pa.ArrowException, OSError, ValueError) as e:
        raise GradauthError(f"{folder} holds a damaged row file ({type(e).__name__}: {str(e).splitlines()[0][:100]}): "
                            f"delete it and run `gradauth sweep CONFIG --resume` to redo that trial") from None
    df = table.to_pandas()
    return df.drop_duplicates("trial_id", keep="last").reset_index(drop=True)


def read_progress(out: Path) -> dict | None:
    """progress.json as {"experiment", "total", "updated", "trials": {trial_id: state}}, or None if absent."""
    path = out / PROGRESS
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_bytes())
        ok = (isinstance(obj, dict) and isinstance(obj.get("trials"), dict) and isinstance(obj.get("total"), int)
              and all(isinstance(k, str) and v in STATES for k, v in obj["trials"].items()))
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise GradauthError(f"{path} is not a gradauth progress file: delete it (the sweep rewrites it while it runs)")
    return obj


class SweepLog:
    """What the sweep driver records as trials start and finish: a plain object (Tune's callback only forwards to
    it), so it is tested without Ray. `finished` writes the model file first, then the row, both atomically: a row
    on disk always has its model."""

    def __init__(self, out: Path, experiment: str, trial_ids: list[str], kept: dict[str, dict], fresh: bool,
                 min_interval_s: float | None = None):
        self.out, self.experiment = out, experiment
        self.rows: dict[str, dict] = dict(kept)
        self.state = {t: "pending" for t in trial_ids} | {t: FINISHED.get(r["status"], "failed") for t, r in kept.items()}
        # kept as states change, so the console's progress line costs the same at 100 trials and at 10,000
        self.counts: dict[str, int] = {}
        for v in self.state.values():
            self.counts[v] = self.counts.get(v, 0) + 1
        self.best_ok: float | None = None  # the best fine_acc of an `ok` row so far
        for r in kept.values():
            self._best(r)
        # A 10,000-trial progress file is ~0.5 MB: rewrite it less often as the sweep grows.
        self.min_interval_s = min_interval_s if min_interval_s is not None else max(2.0, len(self.state) / 2000)
        self._last, self._dirty = 0.0, True
        self._loose: list[tuple[Path, list[str]]] = []  # part files not yet in a chunk, and their rows' ids
        self._chunks = 0
        if fresh:
            shutil.rmtree(out / PARTS, ignore_errors=True)  # a fresh sweep's rows must not mix with an old one's
        (out / PARTS).mkdir(parents=True, exist_ok=True)
        old = [e.path for e in os.scandir(out / PARTS) if e.name != KEPT]
        if kept:  # a --resume: the finished rows (read from trials.parquet and the old parts) start the folder
            write_trials(list(kept.values()), out / PARTS / KEPT)
        else:
            (out / PARTS / KEPT).unlink(missing_ok=True)
        for p in old:  # only once the kept rows are on disk; what is dropped was not finished (error rows)
            Path(p).unlink(missing_ok=True)
        self.flush(force=True)

    def started(self, trial_id: str) -> None:
        if trial_id not in self.rows:
            self._set(trial_id, "running")

    def retrying(self, trial_id: str) -> None:
        if trial_id not in self.rows:
            self._set(trial_id, "pending")

    def finished(self, row: dict, model_bytes: bytes | None = None) -> bool:
        """Record a finished trial's row (and its model); False if it already has one (a re-reported trial)."""
        return self.finished_many([(row, model_bytes)]) == 1

    def finished_many(self, items: list[tuple[dict, bytes | None]]) -> int:
        """Record several finished grid points at once (a pack's report): each model file, then ONE part file with
        all their rows (named after the first), so the driver's cost per row stays small. Returns how many were
        new (a row the log already has is skipped)."""
        new, seen = [], set()
        for row, data in items:
            tid = row["trial_id"]
            if tid in self.rows or tid in seen:
                continue
            part_path(self.out, tid)  # refuses a trial id that cannot name a file, before anything is written
            seen.add(tid)
            new.append((row, data))
        if not new:
            return 0
        for row, data in new:
            if data is not None:
                with atomic_path(rundir.model_path(self.out, row["trial_id"])) as tmp:
                    tmp.write_bytes(data)
        part = part_path(self.out, new[0][0]["trial_id"])
        write_trials([r for r, _ in new], part)
        for row, _ in new:
            self.rows[row["trial_id"]] = row
            self._best(row)
        self._loose.append((part, [r["trial_id"] for r, _ in new]))
        if sum(len(ids) for _, ids in self._loose) >= CHUNK:
            self._chunk()
        for row, _ in new:
            self._set(row["trial_id"], FINISHED.get(row["status"], "failed"))
        return len(new)

    def _chunk(self) -> None:
        """The loose parts → one chunk file (atomic), then the parts go (a crash in between leaves duplicates of
        identical rows, which readers drop)."""
        self._chunks += 1
        write_trials([self.rows[t] for _, ids in self._loose for t in ids],
                     self.out / PARTS / f"chunk-{self._chunks:06d}.parquet")
        for part, _ in self._loose:
            part.unlink(missing_ok=True)
        self._loose = []

    def _best(self, row: dict) -> None:
        acc = row.get("fine_acc")
        if row.get("status") == "ok" and isinstance(acc, float) and acc == acc and (
                self.best_ok is None or acc > self.best_ok):
            self.best_ok = acc

    def _put(self, trial_id: str, state: str) -> bool:
        old = self.state.get(trial_id)
        if old == state:
            return False
        if old is not None:
            self.counts[old] -= 1
        self.counts[state] = self.counts.get(state, 0) + 1
        self.state[trial_id] = state
        return True

    def _set(self, trial_id: str, state: str) -> None:
        if self._put(trial_id, state):
            self._dirty = True
        self.flush()

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._dirty or (not force and now - self._last < self.min_interval_s):
            return
        obj = {"experiment": self.experiment, "total": len(self.state), "updated": time.time(), "trials": self.state}
        write_text(self.out / PROGRESS, json.dumps(obj, separators=(",", ":")) + "\n")
        self._last, self._dirty = now, False

    def compact(self, extra: list[dict] = ()) -> pd.DataFrame:
        """All rows → DIR/trials.parquet (atomic), then the parts go: the folder is gone only once the table is."""
        for r in extra:
            self.rows.setdefault(r["trial_id"], r)
            self._best(self.rows[r["trial_id"]])
            self._put(r["trial_id"], FINISHED.get(r["status"], "failed"))
        df = write_trials(list(self.rows.values()), self.out / rundir.TRIALS)
        self._dirty = True
        self.flush(force=True)
        shutil.rmtree(self.out / PARTS, ignore_errors=True)
        return df
