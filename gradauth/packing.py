"""How `sweep.pack` groups grid points into Tune trials: plain planning over numbers and trial ids (no torch, no
Ray), shared by the trainable that runs a pack (`sweep`) and the searcher that hands packs out (`tune_rows`)."""
from __future__ import annotations

import hashlib
import math

PACK_FILE = "pack.json"     # in a pack's checkpoint: the rows of the points it brings, every point done, where it is


def pack_name(points: list[str]) -> str:
    """A pack's Tune trial name: its size and a digest of its grid points (stable across `--resume`)."""
    return f"pack{len(points)}-{hashlib.sha256(chr(10).join(points).encode()).hexdigest()[:12]}"


def point_seconds(rows: list[dict]) -> float | None:
    """A grid point's typical seconds (median of the finished rows given; fine-tuned ones if any), or None."""
    secs = [r.get("seconds") for r in rows if r.get("status") == "ok"] or [r.get("seconds") for r in rows]
    secs = sorted(float(x) for x in secs if isinstance(x, (int, float)) and x == x and x > 0)
    return secs[len(secs) // 2] if secs else None


def pack_size(pack, pack_seconds: float, seconds: float | None, points: int, slots: int) -> int:
    """Grid points per Tune trial: `pack` itself when a number; for auto, packs of at least ~pack_seconds (points of
    `seconds` each) in a whole number of rounds of the slots, so every slot gets the same work and they finish
    together (packs of 30, 30, 30, 10 on two slots leave one idle for two packs' worth at the end; two of 50 do
    not); no more than points / slots, so every slot is busy; 1 when nothing is measured."""
    if pack != "auto":
        return max(1, int(pack))
    if not seconds:
        return 1
    slots = max(1, slots)
    rounds = max(1, math.floor(points * seconds / (slots * pack_seconds)))  # packs per slot, each ≥ pack_seconds
    return max(1, math.ceil(points / (slots * rounds)))


def make_packs(specs: list, size: int) -> list[list]:
    return [specs[i:i + size] for i in range(0, len(specs), size)]


# pack: auto's first packs (tune_rows.PackSearcher): up to PROBE_POINTS points per slot, each pack stopping once
# PROBE_TIMED points ran warm and PROBE_S passed (one timed point was off by 3x on a busy machine)
PROBE_POINTS, PROBE_S, PROBE_TIMED = 8, 1.0, 3


def warm_points(rows: list[dict]) -> int:
    """How many of a fresh worker's first points (run back to back) paid a warm-up rather than their own cost: the
    first (the process: imports, allocator) and every one up to the first fine-tuned (`ok`) one (the first fine-tune
    and compaction: autograd, torch.fx). A probe that began with unlockable points measured its first fine-tuned
    point at 6 s for a 0.2 s point on a loaded machine, and packs 30x too small followed."""
    first_ok = next((i for i, r in enumerate(rows) if r.get("status") == "ok"), None)
    return max(1, first_ok + 1 if first_ok is not None else 1)


def probe_sample(pending: list, slots: int) -> list[list]:
    """The points `pack: auto` times: its first packs (tune_rows.PackSearcher), PROBE_POINTS each (one per slot, as
    many as the points fill), every (len / PROBE_POINTS·packs)-th of the grid, so every part of it (each lock value)
    is in the sample."""
    tasks = min(max(1, slots), math.ceil(len(pending) / PROBE_POINTS))
    want = tasks * PROBE_POINTS
    sample = pending[::max(1, len(pending) // want)][:want]
    return [sample[i::tasks] for i in range(tasks)]
