"""The Tune callback that records each trial's row in the driver as the trial finishes (rows.SweepLog).

Tune pickles its run config, callbacks included, into the experiment's tuner.pkl and restores them on `--resume`;
so the callback carries no state: it forwards to the `SweepLog` the running driver set with `activate`, and a
restored copy of it therefore writes to the current driver's log, never to a stale one. The targeted search's
`DriverSearcher` does the same with the driver's search-progress writer (DIR/search.json).
"""
from __future__ import annotations

import sys
from pathlib import Path

from ray import tune

from .checkpoint import from_bytes
from .errors import GradauthError
from .fsutil import atomic_path
from .rows import TRIALS_SCHEMA, SweepLog
from .search import TargetedSearcher
from .trial import TrialContext, TrialSpec, base_row

_ACTIVE: dict = {}


def activate(log: SweepLog | None, ctx: TrialContext | None, on_search=None, tick=None, specs=None) -> None:
    """`on_search(planner)`: called by the DriverSearcher whenever the search's state changed; `tick(force=False)`:
    after every controller step (the console's progress line); `specs`: {trial_id: TrialSpec} of the grid points
    a packed sweep's Tune configs name by id."""
    _ACTIVE.clear()
    if log is not None:
        _ACTIVE.update(log=log, ctx=ctx, on_search=on_search, tick=tick or (lambda force=False: None),
                       specs=specs or {})


def trial_ident(config: dict) -> tuple[str, str] | None:
    """(trial_id, phase) of a Tune trial's config (grid point or searcher config); None for a lock-curve task,
    which is no trial row (its points go to DIR/search.json)."""
    if "phase" in config:
        from .search import trial_name
        return None if config["phase"] == "curve" else (trial_name(config), config["phase"])
    if "pack" in config:
        return None  # a pack: its grid points have the rows (RowWriter's pack methods)
    return TrialSpec(**config["trial"]).trial_id, "grid"


def failed_row(ctx: TrialContext, t: TrialSpec, error, ident: tuple[str, str] | None = None) -> dict:
    tid, phase = ident or (t.trial_id, "grid")
    why = str(error).strip().splitlines()[-1][:200] if error else "did not finish"
    print(f"[sweep] trial {tid} failed: {why}", file=sys.stderr)
    return base_row(ctx, t) | {"status": "error", "trial_id": tid, "phase": phase}


def finished_row(t: TrialSpec, metrics: dict, checkpoint,
                  ident: tuple[str, str] | None = None) -> tuple[dict, bytes | None]:
    """(row, model file bytes) of a trial that reported its row; the model comes from its final checkpoint and is
    refused unless it is a plain gradauth model file (a thief trial keeps no model)."""
    tid, phase = ident or (t.trial_id, "grid")
    # Tune fills in its own `trial_id` metric: ours is derived from the grid point, which also keeps it stable.
    row = {k: metrics.get(k) for k in TRIALS_SCHEMA.names} | {"trial_id": tid, "phase": phase}
    data = None
    if row["status"] == "ok" and phase != "thief":
        if checkpoint is None:
            raise GradauthError(f"trial {tid} finished without its model checkpoint")
        with checkpoint.as_directory() as d:
            data = (Path(d) / "model.pt").read_bytes()
        from_bytes(data, f"checkpoint of {tid}")  # refuse anything that is not a plain model file
    return row, data


def point_row(row: dict) -> dict:
    """A packed grid point's row (as run_trial returns it) with exactly the trials.parquet columns."""
    return {k: row.get(k) for k in TRIALS_SCHEMA.names} | {"phase": "grid"}


PACK_FILE = "pack.json"  # sweep.PACK_FILE (not imported: sweep imports torch)


def read_pack_checkpoint(checkpoint, only: set[str] | None = None) -> tuple[dict, list[tuple[dict, bytes | None]]]:
    """(pack.json, [(row, model bytes)] of the points it brings, or of those among them in `only`) from a pack's
    checkpoint; a model is refused unless it is a plain gradauth model file."""
    import hashlib
    import json
    with checkpoint.as_directory() as d:
        d = Path(d)
        if not (d / PACK_FILE).is_file():
            return {}, []
        pack = json.loads((d / PACK_FILE).read_text())
        # "rows": this report's points; an older pack's checkpoint held every done point's row under "done"
        rows = pack["rows"] if isinstance(pack.get("rows"), dict) else pack.get("done") or {}
        ids = [t for t in (pack.get("batch") or []) if t in rows] if only is None else [t for t in rows if t in only]
        out = []
        digests = pack.get("digests") if isinstance(pack.get("digests"), dict) else {}
        for tid in ids:
            row, data = point_row(rows[tid]), None
            if row["status"] == "ok":
                f = d / "models" / f"{tid}.pt"
                if not f.is_file():
                    continue  # its model is in another of the pack's checkpoints
                data = f.read_bytes()
                if tid in digests:  # the bytes the worker wrote (its to_bytes): checked, not loaded
                    if hashlib.sha256(data).hexdigest() != digests[tid]:
                        raise GradauthError(f"checkpoint of {tid}: its model file is not the one its pack wrote "
                                            "(sha256 differs): --resume runs that grid point again")
                else:
                    from_bytes(data, f"checkpoint of {tid}")
            out.append((row, data))
    return pack, out


def pack_rows_from_result(result, ctx: TrialContext, models_dir: Path, missing: set[str],
                          specs: dict) -> list[dict]:
    """Rows of a pack's points in `missing` (the callback did not see them: a restored experiment had finished
    them), from every checkpoint the pack kept; a point found in none gets an error row (`--resume` runs it)."""
    specs = [specs[tid] for tid in pack_ids(result.config) if tid in specs]
    want = {t.trial_id for t in specs} & missing
    rows: dict[str, dict] = {}
    for ckpt, _ in (result.best_checkpoints or []):
        for row, data in read_pack_checkpoint(ckpt, want - set(rows))[1]:
            if data is not None:
                with atomic_path(models_dir / f"{row['trial_id']}.pt") as tmp:
                    tmp.write_bytes(data)
            rows[row["trial_id"]] = row
    return list(rows.values()) + [failed_row(ctx, t, result.error or "its pack ended without its row")
                                  for t in specs if t.trial_id in want and t.trial_id not in rows]


def row_from_result(result, ctx: TrialContext, models_dir: Path) -> dict:
    """A row from Tune's result grid, for a grid point whose row the callback did not see (a restored experiment
    that had already finished it, e.g. on a new head node whose output folder was lost)."""
    t, ident = TrialSpec(**result.config["trial"]), trial_ident(result.config)
    m = result.metrics or {}
    if result.error is not None or not m.get("row_complete"):
        return failed_row(ctx, t, result.error, ident)
    row, data = finished_row(t, m, result.checkpoint, ident)
    if data is not None:
        with atomic_path(models_dir / f"{ident[0]}.pt") as tmp:
            tmp.write_bytes(data)
    return row


def _ident(trial) -> tuple[TrialSpec, tuple[str, str]] | None:
    """(spec, (trial_id, phase)) of a trial with a row; None for a lock-curve task."""
    ident = trial_ident(trial.config)
    return None if ident is None else (TrialSpec(**trial.config["trial"]), ident)


def pack_ids(config: dict) -> list[str]:
    """The grid points a pack's Tune config names: trial ids (an experiment started before packs named their points
    by id carries whole points: their ids)."""
    return [p if isinstance(p, str) else TrialSpec(**p).trial_id for p in config["pack"]]


def _pack_points(trial) -> list[str] | None:
    if "pack" not in trial.config:
        return None
    return pack_ids(trial.config)


class RowWriter(tune.Callback):
    """Trial events → the active SweepLog: start, retry, finish (row + model file), failure after Tune's retries.

    A pack (several grid points in one Tune trial, `sweep.pack`) is recorded per grid point: each checkpoint it
    reports brings the rows (and models) of the points it finished since the last; the point it works on counts as
    running, the rest of it as pending."""

    def _pack_running(self, trial, point: str | None) -> None:
        current = _ACTIVE.setdefault("current", {})
        log = _ACTIVE["log"]
        old = current.pop(trial.trial_id, None)
        if old is not None and old != point:
            log.retrying(old)  # back to pending, unless it has its row
        if point is not None:
            current[trial.trial_id] = point
            log.started(point)

    def on_trial_start(self, iteration, trials, trial, **info):
        if _ACTIVE and (points := _pack_points(trial)) is not None:
            self._pack_running(trial, next((t for t in points if t not in _ACTIVE["log"].rows), None))
        elif _ACTIVE and (i := _ident(trial)):
            _ACTIVE["log"].started(i[1][0])

    def on_trial_recover(self, iteration, trials, trial, **info):
        if _ACTIVE and _pack_points(trial) is not None:
            self._pack_running(trial, None)
        elif _ACTIVE and (i := _ident(trial)):
            _ACTIVE["log"].retrying(i[1][0])

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if not _ACTIVE or _pack_points(trial) is None:
            return
        log = _ACTIVE["log"]
        try:
            pack, got = read_pack_checkpoint(checkpoint)
        except GradauthError as e:  # a model that is not a model file: the batch's points are failures
            print(f"[sweep] pack {trial}: {e}", file=sys.stderr)
            return
        log.finished_many(got)
        self._pack_running(trial, pack.get("next"))

    def _pack_end(self, trial, why) -> None:
        log, ctx = _ACTIVE["log"], _ACTIVE["ctx"]
        self._pack_running(trial, None)
        for tid in pack_ids(trial.config):
            if tid not in log.rows and tid in _ACTIVE["specs"]:
                log.finished(failed_row(ctx, _ACTIVE["specs"][tid], why))

    def on_trial_complete(self, iteration, trials, trial, **info):
        if _ACTIVE and _pack_points(trial) is not None:
            self._pack_end(trial, "its pack ended without its row")
            return
        if not _ACTIVE or not (i := _ident(trial)):
            return
        log, ctx, (t, ident) = _ACTIVE["log"], _ACTIVE["ctx"], i
        m = trial.last_result or {}
        if m.get("rereported") or ident[0] in log.rows:
            return  # its row is on disk already (a --resume re-reported it without training)
        if not m.get("row_complete"):
            log.finished(failed_row(ctx, t, "it ended without reporting its row", ident))
            return
        try:
            row, data = finished_row(t, m, trial.checkpoint, ident)
        except GradauthError as e:
            row, data = failed_row(ctx, t, e, ident), None
        log.finished(row, data)

    def on_trial_error(self, iteration, trials, trial, **info):  # after Tune's retries (max_failures)
        if _ACTIVE and _pack_points(trial) is not None:
            self._pack_end(trial, "its pack raised (see its error.txt)")
            return
        if _ACTIVE and (i := _ident(trial)):
            _ACTIVE["log"].finished(failed_row(_ACTIVE["ctx"], i[0], "it raised (see its error.txt)", i[1]))

    def on_step_end(self, iteration, trials, **info):
        if _ACTIVE:
            _ACTIVE["log"].flush()
            _ACTIVE["tick"]()

    def on_experiment_end(self, trials, **info):
        if _ACTIVE:
            _ACTIVE["log"].flush(force=True)


class DriverSearcher(TargetedSearcher):
    """The TargetedSearcher of `gradauth sweep`: after each proposal and each finished trial it hands its planner to
    the driver's progress writer (set with `activate`; a restored copy from tuner.pkl reaches the current driver's)."""

    def _changed(self) -> None:
        hook = _ACTIVE.get("on_search")
        if hook is not None and self.planner is not None:
            hook(self.planner)

    def suggest(self, trial_id: str):
        cfg = super().suggest(trial_id)
        if isinstance(cfg, dict):
            self._changed()
        return cfg

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        super().on_trial_complete(trial_id, result, error)
        self._changed()
