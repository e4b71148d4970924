"""The Tune callback that records each trial's row in the driver as the trial finishes (rows.SweepLog).

Tune pickles its run config, callbacks included, into the experiment's tuner.pkl and restores them on `--resume`;
so the callback carries no state: it forwards to the `SweepLog` the running driver set with `activate`, and a
restored copy of it therefore writes to the current driver's log, never to a stale one.
"""
from __future__ import annotations

from ray import tune

from .errors import GradauthError
from .rows import SweepLog
from .trial import TrialContext, TrialSpec

_ACTIVE: dict = {}


def activate(log: SweepLog | None, ctx: TrialContext | None, tick=None) -> None:
    """`tick(force=False)`: called after every controller step (the console's progress line)."""
    _ACTIVE.clear()
    if log is not None:
        _ACTIVE.update(log=log, ctx=ctx, tick=tick or (lambda force=False: None))


def _spec(trial) -> TrialSpec:
    return TrialSpec(**trial.config["trial"])


class RowWriter(tune.Callback):
    """Trial events → the active SweepLog: start, retry, finish (row + model file), failure after Tune's retries."""

    def on_trial_start(self, iteration, trials, trial, **info):
        if _ACTIVE:
            _ACTIVE["log"].started(_spec(trial).trial_id)

    def on_trial_recover(self, iteration, trials, trial, **info):
        if _ACTIVE:
            _ACTIVE["log"].retrying(_spec(trial).trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        from .sweep import _failed_row, _finished_row
        if not _ACTIVE:
            return
        log, ctx, t = _ACTIVE["log"], _ACTIVE["ctx"], _spec(trial)
        m = trial.last_result or {}
        if m.get("rereported") or t.trial_id in log.rows:
            return  # its row is on disk already (a --resume re-reported it without training)
        if not m.get("row_complete"):
            log.finished(_failed_row(ctx, t, "it ended without reporting its row"))
            return
        try:
            row, data = _finished_row(t, m, trial.checkpoint)
        except GradauthError as e:
            row, data = _failed_row(ctx, t, e), None
        log.finished(row, data)

    def on_trial_error(self, iteration, trials, trial, **info):  # after Tune's retries (max_failures)
        from .sweep import _failed_row
        if _ACTIVE:
            _ACTIVE["log"].finished(_failed_row(_ACTIVE["ctx"], _spec(trial), "it raised (see its error.txt)"))

    def on_step_end(self, iteration, trials, **info):
        if _ACTIVE:
            _ACTIVE["log"].flush()
            _ACTIVE["tick"]()

    def on_experiment_end(self, trials, **info):
        if _ACTIVE:
            _ACTIVE["log"].flush(force=True)
