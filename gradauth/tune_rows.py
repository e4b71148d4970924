"""The Tune callback that records each trial's row in the driver as the trial finishes (rows.SweepLog).

Tune pickles its run config, callbacks included, into the experiment's tuner.pkl and restores them on `--resume`;
so the callback carries no state: it forwards to the `SweepLog` the running driver set with `activate`, and a
restored copy of it therefore writes to the current driver's log, never to a stale one.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ray import tune

from .checkpoint import from_bytes
from .errors import GradauthError
from .fsutil import atomic_path
from .rows import TRIALS_SCHEMA, SweepLog
from .trial import TrialContext, TrialSpec, base_row

_ACTIVE: dict = {}


def activate(log: SweepLog | None, ctx: TrialContext | None) -> None:
    _ACTIVE.clear()
    if log is not None:
        _ACTIVE.update(log=log, ctx=ctx)


def _spec(trial) -> TrialSpec:
    return TrialSpec(**trial.config["trial"])


def failed_row(ctx: TrialContext, t: TrialSpec, error) -> dict:
    why = str(error).strip().splitlines()[-1][:200] if error else "did not finish"
    print(f"[sweep] trial {t.trial_id} failed: {why}", file=sys.stderr)
    return base_row(ctx, t) | {"status": "error"}


def finished_row(t: TrialSpec, metrics: dict, checkpoint) -> tuple[dict, bytes | None]:
    """(row, model file bytes) of a trial that reported its row; the model comes from its final checkpoint and is
    refused unless it is a plain gradauth model file."""
    # Tune fills in its own `trial_id` metric: ours is derived from the grid point, which also keeps it stable.
    row = {k: metrics.get(k) for k in TRIALS_SCHEMA.names} | {"trial_id": t.trial_id}
    data = None
    if row["status"] == "ok":
        if checkpoint is None:
            raise GradauthError(f"trial {t.trial_id} finished without its model checkpoint")
        with checkpoint.as_directory() as d:
            data = (Path(d) / "model.pt").read_bytes()
        from_bytes(data, f"checkpoint of {t.trial_id}")  # refuse anything that is not a plain model file
    return row, data


def row_from_result(result, ctx: TrialContext, models_dir: Path) -> dict:
    """A row from Tune's result grid, for a grid point whose row the callback did not see (a restored experiment
    that had already finished it, e.g. on a new head node whose output folder was lost)."""
    t = TrialSpec(**result.config["trial"])
    m = result.metrics or {}
    if result.error is not None or not m.get("row_complete"):
        return failed_row(ctx, t, result.error)
    row, data = finished_row(t, m, result.checkpoint)
    if data is not None:
        with atomic_path(models_dir / f"{t.trial_id}.pt") as tmp:
            tmp.write_bytes(data)
    return row


class RowWriter(tune.Callback):
    """Trial events → the active SweepLog: start, retry, finish (row + model file), failure after Tune's retries."""

    def on_trial_start(self, iteration, trials, trial, **info):
        if _ACTIVE:
            _ACTIVE["log"].started(_spec(trial).trial_id)

    def on_trial_recover(self, iteration, trials, trial, **info):
        if _ACTIVE:
            _ACTIVE["log"].retrying(_spec(trial).trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not _ACTIVE:
            return
        log, ctx, t = _ACTIVE["log"], _ACTIVE["ctx"], _spec(trial)
        m = trial.last_result or {}
        if m.get("rereported") or t.trial_id in log.rows:
            return  # its row is on disk already (a --resume re-reported it without training)
        if not m.get("row_complete"):
            log.finished(failed_row(ctx, t, "it ended without reporting its row"))
            return
        try:
            row, data = finished_row(t, m, trial.checkpoint)
        except GradauthError as e:
            row, data = failed_row(ctx, t, e), None
        log.finished(row, data)

    def on_trial_error(self, iteration, trials, trial, **info):  # after Tune's retries (max_failures)
        if _ACTIVE:
            _ACTIVE["log"].finished(failed_row(_ACTIVE["ctx"], _spec(trial), "it raised (see its error.txt)"))

    def on_step_end(self, iteration, trials, **info):
        if _ACTIVE:
            _ACTIVE["log"].flush()

    def on_experiment_end(self, trials, **info):
        if _ACTIVE:
            _ACTIVE["log"].flush(force=True)
