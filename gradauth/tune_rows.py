"""The Tune callback that records each trial's row in the driver as the trial finishes (rows.SweepLog).

Tune pickles its run config, callbacks included, into the experiment's tuner.pkl and restores them on `--resume`;
so the callback carries no state: it forwards to the `SweepLog` the running driver set with `activate`, and a
restored copy of it therefore writes to the current driver's log, never to a stale one. The targeted search's
`DriverSearcher` does the same with the driver's search-progress writer (DIR/search.json).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from ray import tune

from .checkpoint import from_bytes
from .errors import GradauthError
from .fsutil import atomic_path
from .packing import PACK_FILE, PROBE_S, pack_size, point_seconds, probe_sample, warm_points
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
        returned = set(str((trial.last_result or {}).get("returned") or "").split())  # a timing pack's: queued again
        for tid in pack_ids(trial.config):
            if tid not in log.rows and tid in _ACTIVE["specs"] and tid not in returned:
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


class PackSearcher(tune.search.Searcher):
    """`sweep.pack: auto`: hands the grid points out in packs as Tune asks for trials (slots free up), instead of a
    grid of packs fixed before Tune starts. With nothing timed yet, the first packs (one per slot, PROBE_POINTS
    points drawn across the grid: packing.probe_sample) run in the trials' own workers until a point ran warm and
    PROBE_S passed, report their points' seconds (`timing_json`) and hand back the points they did not run
    (`returned`, queued again at the end); from the first timing pack back on, the rest go out in packs of
    `packing.pack_size` (whole rounds of the slots, each ≥ pack_seconds).
    Before, a separate probe (Ray tasks) timed the points first: its workers started, imported torch and warmed up,
    and then Tune's actors did it all again (~4 s of a 100-point sweep's 10 s here).

    State (save/restore: JSON, never pickle): the queue, the packs out, the size. A restored searcher drops from its
    queue the points whose rows the driver already has (`activate`'s log: handed out after Tune's last snapshot and
    finished before the kill); packs out at the snapshot are Tune's restored trials, which skip finished points."""

    def __init__(self, points: list[str] | None = None, slots: int = 1, pack_seconds: float = 30.0,
                 seconds: float | None = None):
        super().__init__()
        self.queue = list(points or [])
        self.slots, self.pack_seconds = max(1, int(slots)), float(pack_seconds)
        self.size = pack_size("auto", pack_seconds, seconds, len(self.queue), self.slots) if seconds else None
        self.probes = [] if self.size or not self.queue else [list(p) for p in probe_sample(self.queue, self.slots)]
        taken = {p for pk in self.probes for p in pk}
        self.queue = [p for p in self.queue if p not in taken]
        self.live: dict[str, list[str]] = {}   # Tune trial id -> the pack's points
        self.timed: list[dict] = []             # status and seconds of the points timed warm
        self._checked = False

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the grid defines the space

    def _drop_finished(self) -> None:
        log = _ACTIVE.get("log")
        if log is not None:
            self.queue = [p for p in self.queue if p not in log.rows]
            self.probes = [pk for pk in ([p for p in pk if p not in log.rows] for pk in self.probes) if pk]
        self._checked = True

    def suggest(self, trial_id: str):
        if not self._checked:
            self._drop_finished()
        if self.probes:
            pack = self.probes.pop(0)
            self.live[trial_id] = pack
            return {"pack": pack, "budget_s": PROBE_S}
        if self.size is None:
            seconds = point_seconds(self.timed)
            if seconds is None and self.live:
                return None  # no timing pack back yet
            # Sized as soon as one timing pack is back, so its worker goes on at once: Tune keeps one idle actor for
            # reuse, so a slot left waiting for the other timing pack lost its actor (a new one: ~2.5 s to start
            # and ~1 s to warm up again). The points the others may still hand back count as queued: the last pack
            # comes out a few points short instead of one more short pack.
            out = sum(len(pk) for pk in self.live.values())
            # every timing pack ended without a timed point (they failed): one point a trial
            self.size = pack_size("auto", self.pack_seconds, seconds, len(self.queue) + out, self.slots) \
                if seconds else 1
            # The grid's order groups points of different cost (lock values: an unlockable point is never
            # fine-tuned, ~3x faster; schedules of 4 and 8 epochs): contiguous packs would differ by that much.
            # Shuffled (seeded), every pack holds a fair sample of the grid. (At N = 1,000 tiny trials here the two
            # packs still end ~1.7 s apart either way: one worker shares its core with the driver and Ray's daemons.)
            random.Random(0).shuffle(self.queue)
            if seconds:
                print(f"[sweep] pack: auto: ~{seconds:.3f} s a point ({len(self.timed)} timed): the other "
                      f"{len(self.queue)} (+ up to {out} still out) grid points in packs of {self.size}, {self.slots} "
                      "at a time", file=sys.stderr)
        if not self.queue:
            return None if self.live else self.FINISHED  # a timing pack out may still hand points back
        pack, self.queue = self.queue[:self.size], self.queue[self.size:]
        self.live[trial_id] = pack
        return {"pack": pack}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pack = self.live.pop(trial_id, None)
        if pack is None or not result:
            return  # an errored pack's points get error rows (RowWriter); Tune retried it max_failures times first
        mine = set(pack)
        self.queue += [p for p in str(result.get("returned") or "").split() if p in mine]
        if result.get("timing_json"):
            try:
                ran = [r for r in json.loads(result["timing_json"]) if isinstance(r, dict)]
            except ValueError:
                ran = []
            self.timed += ran[warm_points(ran):] or ran[1:] or ran

    def get_state(self) -> dict:
        return {"queue": self.queue, "probes": self.probes, "live": self.live, "size": self.size,
                "slots": self.slots, "pack_seconds": self.pack_seconds, "timed": self.timed}

    def set_state(self, state: dict) -> None:
        ok = isinstance(state, dict) and {"queue", "probes", "live", "size", "slots", "pack_seconds"} <= set(state)
        ok = ok and all(isinstance(p, str) for p in state["queue"]) and isinstance(state["live"], dict) and all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(p, str) for p in v)
            for k, v in state["live"].items()) and all(
            isinstance(pk, list) and all(isinstance(p, str) for p in pk) for pk in state["probes"])
        if not ok or not (state["size"] is None or isinstance(state["size"], int)):
            raise GradauthError("the sweep's pack state is damaged: run the sweep again without --resume")
        self.queue, self.probes, self.live = list(state["queue"]), [list(p) for p in state["probes"]], dict(state["live"])
        self.size, self.slots, self.pack_seconds = state["size"], int(state["slots"]), float(state["pack_seconds"])
        self.timed = [r for r in state.get("timed") or [] if isinstance(r, dict)]
        self._checked = False

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self.get_state()))

    def restore(self, checkpoint_path: str) -> None:
        try:
            state = json.loads(Path(checkpoint_path).read_text())
        except (OSError, ValueError):
            raise GradauthError(f"{checkpoint_path}: not a readable pack state: run the sweep again without "
                                "--resume") from None
        self.set_state(state)
