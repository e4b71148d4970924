"""The Tune callback that records each trial's row in the driver as the trial finishes (rows.SweepLog).

Tune pickles its run config, callbacks included, into the experiment's tuner.pkl and restores them on `--resume`;
so the callback carries no state: it forwards to the `SweepLog` the running driver set with `activate`, and a
restored copy of it therefore writes to the current driver's log, never to a stale one. The targeted search's
`DriverSearcher` does the same with the driver's search-progress writer (DIR/search.json).
"""
from __future__ import annotations

from ray import tune

from .errors import GradauthError
from .rows import SweepLog
from .search import TargetedSearcher
from .trial import TrialContext, TrialSpec

_ACTIVE: dict = {}


def activate(log: SweepLog | None, ctx: TrialContext | None, on_search=None, tick=None) -> None:
    """`on_search(planner)`: called by the DriverSearcher whenever the search's state changed; `tick(force=False)`:
    after every controller step (the console's progress line)."""
    _ACTIVE.clear()
    if log is not None:
        _ACTIVE.update(log=log, ctx=ctx, on_search=on_search, tick=tick or (lambda force=False: None))


def _ident(trial) -> tuple[TrialSpec, tuple[str, str]] | None:
    """(spec, (trial_id, phase)) of a trial with a row; None for a lock-curve task."""
    from .sweep import trial_ident
    ident = trial_ident(trial.config)
    return None if ident is None else (TrialSpec(**trial.config["trial"]), ident)


class RowWriter(tune.Callback):
    """Trial events → the active SweepLog: start, retry, finish (row + model file), failure after Tune's retries."""

    def on_trial_start(self, iteration, trials, trial, **info):
        if _ACTIVE and (i := _ident(trial)):
            _ACTIVE["log"].started(i[1][0])

    def on_trial_recover(self, iteration, trials, trial, **info):
        if _ACTIVE and (i := _ident(trial)):
            _ACTIVE["log"].retrying(i[1][0])

    def on_trial_complete(self, iteration, trials, trial, **info):
        from .sweep import _failed_row, _finished_row
        if not _ACTIVE or not (i := _ident(trial)):
            return
        log, ctx, (t, ident) = _ACTIVE["log"], _ACTIVE["ctx"], i
        m = trial.last_result or {}
        if m.get("rereported") or ident[0] in log.rows:
            return  # its row is on disk already (a --resume re-reported it without training)
        if not m.get("row_complete"):
            log.finished(_failed_row(ctx, t, "it ended without reporting its row", ident))
            return
        try:
            row, data = _finished_row(t, m, trial.checkpoint, ident)
        except GradauthError as e:
            row, data = _failed_row(ctx, t, e, ident), None
        log.finished(row, data)

    def on_trial_error(self, iteration, trials, trial, **info):  # after Tune's retries (max_failures)
        from .sweep import _failed_row
        if _ACTIVE and (i := _ident(trial)):
            _ACTIVE["log"].finished(_failed_row(_ACTIVE["ctx"], i[0], "it raised (see its error.txt)", i[1]))

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
