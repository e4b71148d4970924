"""What the owner sees while a run goes: one live progress line per stage.

On a terminal the line is rewritten in place (carriage return); in a plain log (CI, `ray job logs -f`, a file) a
new line is printed every `every_s` seconds or every 10 % of the stage, whichever comes first, so a 1,000-trial
sweep prints a few dozen lines, not thousands. `--verbose` (or GRADAUTH_VERBOSE=1) brings the full output back:
per-epoch lines, Tune's tables and Ray's worker logs on the console instead of in DIR/sweep.log.

Plain Python, no torch, no Ray: the sweep's Tune callback and base training feed it numbers.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

_VERBOSE = [os.environ.get("GRADAUTH_VERBOSE", "") not in ("", "0")]


def set_verbose(on: bool) -> None:
    _VERBOSE[0] = bool(on)
    if on:
        os.environ["GRADAUTH_VERBOSE"] = "1"  # subprocesses (and a Ray job's driver) see it too


def verbose() -> bool:
    return _VERBOSE[0]


def duration(seconds: float | None) -> str:
    """12 s, 3m05s, 2h07m; '?' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """One stage's live line. `update(done, total, text)`; `close(text)` ends it with a newline."""

    def __init__(self, stage: str, stream=None, every_s: float = 30.0, tty: bool | None = None):
        self.stage, self.stream, self.every_s = stage, stream or sys.stderr, every_s
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"
        self.tty = tty
        self._last_t, self._last_decile, self._width, self._open = float("-inf"), -1, 0, False
        self.lines = 0  # plain lines written (what a log file gets)

    def _write(self, line: str, end: bool) -> None:
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad + ("\n" if end else ""))
            self._width = 0 if end else len(line)
            self._open = not end
        else:
            self.stream.write(line + "\n")
            self.lines += 1
        self.stream.flush()

    def update(self, done: int, total: int, text: str, force: bool = False) -> None:
        now = time.monotonic()
        decile = int(10 * done / total) if total else 0
        if self.tty:
            due = force or now - self._last_t >= 0.2
        else:
            due = force or now - self._last_t >= self.every_s or decile > self._last_decile
        if not due:
            return
        self._last_t, self._last_decile = now, max(decile, self._last_decile)
        self._write(f"[{self.stage}] {text}", end=False)

    def close(self, text: str | None = None) -> None:
        if text is not None:
            self._write(f"[{self.stage}] {text}", end=True)
        elif self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


class EpochProgress:
    """Base training: epoch, loss, ETA."""

    def __init__(self, epochs: int, start: int = 0, stream=None, stage: str = "train"):
        self.epochs, self.start, self.t0 = epochs, start, time.monotonic()
        self.line = Progress(stage, stream)

    def epoch(self, epoch: int, loss: float) -> None:
        done = epoch + 1
        rate = (time.monotonic() - self.t0) / max(1, done - self.start)
        eta = rate * (self.epochs - done)
        self.line.update(done, self.epochs, f"epoch {done}/{self.epochs} loss {loss:.4f} ETA {duration(eta)}",
                         force=done == self.epochs)

    def close(self) -> None:
        self.line.close()


class SweepProgress:
    """The sweep: done / running / pending / failed, trials per minute, ETA, best so far. Reads the SweepLog's
    `state` ({trial_id: pending|running|ok|unlockable|degenerate|failed}) and `rows`."""

    def __init__(self, log, stream=None):
        self.log, self.t0, self.first = log, time.monotonic(), None
        done, _, _, failed = self._counts()
        self.done0 = done + failed  # rows a --resume started with: not counted in the rate
        self.line = Progress("sweep", stream)

    def _rate_start(self, done: int, running: int) -> float | None:
        """The rate counts from the first trial seen running or finished, not from Ray's start (~20 s)."""
        if self.first is None and (running or done > self.done0):
            self.first = time.monotonic()
        return self.first

    def _counts(self) -> tuple[int, int, int, int]:
        """(finished without error, running, pending, failed)."""
        n = self.log.counts  # kept by the log as states change: no pass over every trial per controller step
        running, pending, failed = n.get("running", 0), n.get("pending", 0), n.get("failed", 0)
        return sum(n.values()) - running - pending - failed, running, pending, failed

    def _kinds(self) -> str:
        """ok, then the other finished states that occur (unlockable, degenerate), then failed: '8 ok, 2 unlockable,
        0 failed'."""
        n = self.log.counts
        kinds = [f"{n.get('ok', 0)} ok"] + [f"{n[k]} {k}" for k in ("unlockable", "degenerate") if n.get(k)]
        return ", ".join(kinds + [f"{n.get('failed', 0)} failed"])

    def _best(self) -> str:
        best = self.log.best_ok
        return f", best fine-tuned {best:.3f}" if best is not None else ""

    def text(self) -> str:
        done, running, pending, failed = self._counts()
        total = done + running + pending + failed
        start = self._rate_start(done + failed, running)
        minutes = (time.monotonic() - start) / 60 if start is not None else 0.0
        new = done + failed - self.done0
        rate = new / minutes if minutes > 0 else 0.0
        eta = (running + pending) / rate * 60 if rate > 0 else None
        return (f"{done + failed}/{total} done ({self._kinds()}), {running} running, {pending} pending, "
                f"{rate:.1f} trials/min, ETA {duration(eta)}{self._best()}")

    def tick(self, force: bool = False) -> None:
        done, running, pending, failed = self._counts()
        self.line.update(done + failed, done + failed + running + pending, self.text(), force=force)

    def close(self) -> None:
        self.line.close(self.text() + f", {duration(time.monotonic() - self.t0)}")


class SearchProgress:
    """The targeted search (search.mode: targeted): per target hit / probing / missed, trials so far (running),
    trial-seconds, elapsed. Fed the planner's `summary()` whenever the search's state changes; `tick` between."""

    WORDS = {"hit": "hit", "searching": "probing", "missed": "missed"}

    def __init__(self, log=None, stream=None):
        self.log, self.t0, self.summary = log, time.monotonic(), None
        self.line = Progress("search", stream)

    def text(self) -> str:
        s = self.summary or {}
        parts = []
        for lv in s.get("levels", []):
            word = self.WORDS.get(lv["status"], lv["status"])
            acc = f" {lv['fine_acc']:.3f}" if lv["status"] == "hit" and lv.get("fine_acc") is not None else ""
            parts.append(f"{lv['target']:.3f} {word}{acc}")
        running = sum(1 for v in self.log.state.values() if v == "running") if self.log is not None else 0
        return (f"targets {', '.join(parts) or '?'}; {s.get('trials', 0)} trials ({running} running), "
                f"{s.get('trial_seconds', 0.0):.0f} trial-s, {duration(time.monotonic() - self.t0)}")

    @staticmethod
    def _settled(summary: dict | None) -> tuple[int, int]:
        """(targets settled, targets): the line's 'done of total'."""
        levels = (summary or {}).get("levels", [])
        return sum(1 for lv in levels if lv["status"] != "searching"), len(levels)

    def update(self, summary: dict) -> None:
        """A target settled (hit or missed) prints at once; otherwise as `Progress` throttles."""
        changed = self.summary is None or self._settled(self.summary) != self._settled(summary)
        self.summary = summary
        self.line.update(*self._settled(summary), self.text(), force=changed)

    def tick(self, force: bool = False) -> None:
        if self.summary is not None:
            self.line.update(*self._settled(self.summary), self.text(), force=force)

    def close(self) -> None:
        self.line.close(self.text() if self.summary is not None else None)


@contextlib.contextmanager
def to_log(path) -> "contextlib.AbstractContextManager":
    """Tune's tables, Ray's log records and anything else printed meanwhile → `path` (appended), unless verbose.
    The progress lines keep the real stderr (they hold a reference to it, taken before)."""
    if verbose():
        yield
        return
    f = open(path, "a", buffering=1)
    loggers = [logging.getLogger(n) for n in ("ray", "ray.tune", "ray.train", "ray.air")]
    saved = []
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                saved.append((h, h.setStream(f)))
    try:
        with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            yield
    finally:
        for h, old in saved:
            h.setStream(old)
        f.close()
