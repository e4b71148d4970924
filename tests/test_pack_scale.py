"""Packs that cost the same per grid point at any sweep size (issue 14): configs name points by id, a checkpoint
carries only its own batch's rows, the driver checks a model file by its digest, `pack: auto` sizes whole rounds."""
import hashlib
import json
import math

import pytest

from gradauth.errors import GradauthError
from gradauth.packing import make_packs, pack_size


@pytest.mark.parametrize("points,seconds,slots", [(100, 0.1, 2), (1000, 0.1, 2), (5000, 0.1, 2), (1000, 0.04, 8),
                                                  (37, 1.3, 3), (10_000, 0.25, 16)])
def test_auto_packs_fill_every_slot_evenly_and_run_long_enough(points, seconds, slots):
    """`pack: auto` (pack_seconds 30): packs of equal size (±1 point) in whole rounds of the slots, so the slots
    finish together, each pack at least pack_seconds long unless that would leave a slot idle."""
    size = pack_size("auto", 30.0, seconds, points, slots)
    packs = make_packs(list(range(points)), size)
    rounds = math.ceil(len(packs) / slots)
    assert len(packs) <= slots * rounds and len(packs) > slots * (rounds - 1)  # whole rounds, none nearly empty
    per_slot = points * seconds / slots
    if per_slot >= 30.0:
        assert size * seconds >= 30.0  # Tune's ~0.5 s per trial: under 2 % of a pack
        assert 0.5 / (size * seconds) < 0.02
    else:
        assert len(packs) == min(slots, points)  # one pack per slot: as long as the work allows


def test_auto_pack_sizes():
    assert pack_size("auto", 30.0, 0.1, 100, 2) == 50       # 5 s of work per slot: one pack each
    assert pack_size("auto", 30.0, 0.1, 1000, 2) == 500     # 50 s per slot: one 50 s pack each
    assert pack_size("auto", 30.0, 0.1, 5000, 2) == 313     # 250 s per slot: 8 rounds of ~31 s
    assert pack_size("auto", 3.0, 0.1, 100, 2) == 50        # not 30, 30, 30, 10 (one slot idle 2 packs at the end)
    assert pack_size("auto", 30.0, 60.0, 100, 2) == 1       # long points: one per Tune trial
    assert pack_size(7, 30.0, 0.1, 100, 2) == 7 and pack_size("auto", 30.0, None, 100, 2) == 1


def _checkpoint(tmp_path, pack: dict, models: dict):
    from ray import tune
    d = tmp_path / "ckpt"
    (d / "models").mkdir(parents=True)
    for tid, data in models.items():
        (d / "models" / f"{tid}.pt").write_bytes(data)
    (d / "pack.json").write_text(json.dumps(pack))
    return tune.Checkpoint.from_directory(str(d))


def _row(tid, status="ok"):
    return {"trial_id": tid, "status": status, "fine_acc": 0.5, "seconds": 0.1}


def _model_bytes():
    import torch

    from gradauth.checkpoint import ModelSpec, to_bytes
    from gradauth.models import build_model
    torch.manual_seed(0)
    return to_bytes(build_model("vgg_tiny", 10, 1, 0.5), ModelSpec("vgg_tiny", 10, 1, 8, 0.5, (0.5,), (0.25,)))


def test_a_pack_checkpoint_brings_its_batch_and_checks_models_by_digest(tmp_path):
    from gradauth.tune_rows import read_pack_checkpoint
    data = _model_bytes()
    pack = {"done": ["a", "b", "c"], "rows": {"b": _row("b"), "c": _row("c", "unlockable")},
            "digests": {"b": hashlib.sha256(data).hexdigest()}, "batch": ["b", "c"], "next": "d", "state_point": None}
    got = read_pack_checkpoint(_checkpoint(tmp_path, pack, {"b": data}))[1]
    assert [(r["trial_id"], r["status"], r["phase"], d is not None) for r, d in got] == [
        ("b", "ok", "grid", True), ("c", "unlockable", "grid", False)]
    assert got[0][1] == data
    # `only` (the rows of a restored experiment's points): from this checkpoint's rows, never from "done"'s ids
    assert [r["trial_id"] for r, _ in read_pack_checkpoint(_checkpoint(tmp_path / "o", pack, {"b": data}),
                                                            only={"a", "c"})[1]] == ["c"]
    # a model file that is not the bytes its pack wrote is refused
    with pytest.raises(GradauthError, match="sha256 differs"):
        read_pack_checkpoint(_checkpoint(tmp_path / "x", pack, {"b": data[:-1] + bytes([data[-1] ^ 1])}))


def test_an_older_pack_checkpoint_still_reads(tmp_path):
    """Before: every done point's row under "done" and no digests: models are loaded and checked as model files."""
    from gradauth.tune_rows import read_pack_checkpoint
    data = _model_bytes()
    old = {"done": {"a": _row("a"), "b": _row("b")}, "batch": ["b"], "next": None, "state_point": None}
    got = read_pack_checkpoint(_checkpoint(tmp_path, old, {"b": data}))[1]
    assert [(r["trial_id"], d == data) for r, d in got] == [("b", True)]
    with pytest.raises(GradauthError, match="not a readable gradauth model file"):
        read_pack_checkpoint(_checkpoint(tmp_path / "x", old, {"b": b"not a model"}))


def test_pack_configs_name_points_by_id_and_older_ones_by_value():
    from dataclasses import asdict

    from gradauth.bench import scale_config
    from gradauth.trial import grid
    from gradauth.tune_rows import pack_ids
    specs = grid(scale_config(100))[:3]
    ids = [s.trial_id for s in specs]
    assert pack_ids({"pack": ids}) == ids
    assert pack_ids({"pack": [asdict(s) for s in specs]}) == ids  # an experiment started before, restored
    # the id-only config a Tune trial carries is what Tune's state and every result.json line repeat: ~3.5x smaller
    assert len(json.dumps({"pack": ids})) * 3 < len(json.dumps({"pack": [asdict(s) for s in specs]}))


def test_auto_times_points_from_across_the_grid():
    """The grid's first points share one lock value (in the scale bench, one that is never fine-tuned and 5x faster
    than the rest): the probe draws its points evenly across the grid instead."""
    from gradauth.bench import scale_config
    from gradauth.packing import PROBE_POINTS, probe_sample
    from gradauth.trial import grid
    specs = grid(scale_config(1000))
    tasks = probe_sample(specs, 2)
    assert len(tasks) == 2 and all(len(t) == PROBE_POINTS for t in tasks)
    picked = [t for task in tasks for t in task]
    assert len({t.trial_id for t in picked}) == 2 * PROBE_POINTS
    assert {t.lock_value for t in picked} == {t.lock_value for t in specs}  # every lock value, not the first one
    assert all(len({t.lock_value for t in task}) >= PROBE_POINTS // 2 for task in tasks)
    assert [len(t) for t in probe_sample(specs[:5], 4)] == [5]  # few points: fewer tasks, none empty
    assert [len(t) for t in probe_sample(specs[:20], 4)] == [7, 7, 6]
    assert probe_sample(specs[:1], 8) == [[specs[0]]]


def test_the_probe_times_only_points_that_ran_warm():
    """A fresh worker's first point pays the process's warm-up, its first fine-tuned one the first fine-tune's
    (autograd, torch.fx): neither is timed."""
    from gradauth.packing import warm_points
    ok, unl = {"status": "ok"}, {"status": "unlockable"}
    assert warm_points([ok, ok, ok]) == 1
    assert warm_points([unl, unl, ok, ok]) == 3  # the third was the first fine-tune
    assert warm_points([unl, unl]) == 1 and warm_points([]) == 1
    assert warm_points([{"status": "error"}, ok]) == 2


# ---- pack: auto hands packs out as slots free up (tune_rows.PackSearcher) -----------------------------------------

def _ids(n):
    return [f"p{i:03d}" for i in range(n)]


def test_auto_times_its_first_packs_then_hands_out_sized_ones():
    """No probe of its own: the first pack per slot is a timing pack (PROBE_POINTS points across the grid, a time
    budget); its warm points' seconds size the rest, and the points it did not run go back into the queue."""
    from gradauth.packing import PROBE_POINTS, PROBE_S, pack_size
    from gradauth.tune_rows import PackSearcher
    s = PackSearcher(_ids(1000), slots=2, pack_seconds=30.0)
    a, b = s.suggest("t1"), s.suggest("t2")
    assert a["budget_s"] == PROBE_S == b["budget_s"] and len(a["pack"]) == len(b["pack"]) == PROBE_POINTS
    assert s.suggest("t3") is None  # nothing timed yet: no sized pack
    assert len(s.queue) == 1000 - 2 * PROBE_POINTS
    # t1 ran 5 of its 8 points: the first (the worker's warm-up) and four warm ones of 0.1 s; 3 come back
    ran = [{"status": "ok", "seconds": 2.0}] + [{"status": "ok", "seconds": 0.1}] * 4
    s.on_trial_complete("t1", {"timing_json": json.dumps(ran), "returned": " ".join(a["pack"][5:] + ["zzz"])})
    assert s.queue[-3:] == a["pack"][5:] and "zzz" not in s.queue  # a point not of its pack is not taken back
    # sized at once (t1's worker goes on: Tune keeps one idle actor), t2's 8 points counted as if they came back
    c = s.suggest("t3")
    assert s.size == pack_size("auto", 30.0, 0.1, 1000 - 2 * PROBE_POINTS + 3 + PROBE_POINTS, 2) == 498
    assert "budget_s" not in c and len(c["pack"]) == 498
    # the grid's order groups lock values (points of different cost): the packs are a seeded shuffle of it
    assert c["pack"] != sorted(c["pack"]) and len({p[:2] for p in c["pack"]}) == 10
    s.on_trial_complete("t2", {"timing_json": json.dumps(ran), "returned": " ".join(b["pack"][6:])})
    assert s.queue[-2:] == b["pack"][6:]
    handed = a["pack"][:5] + b["pack"][:6] + c["pack"]
    assert len(s.suggest("t4")["pack"]) == 491 and s.suggest("t5") is None  # 989 points: 498 + 491, none left
    handed += s.live["t4"]
    assert sorted(handed) == _ids(1000)  # every point exactly once


def test_auto_with_timed_rows_skips_the_timing_packs_and_a_failed_timing_falls_back_to_one_point():
    from gradauth.tune_rows import PackSearcher
    s = PackSearcher(_ids(100), slots=2, pack_seconds=3.0, seconds=0.1)
    assert s.probes == [] and s.size == 50 and len(s.suggest("t")["pack"]) == 50
    s = PackSearcher(_ids(100), slots=2, pack_seconds=3.0)
    s.suggest("a"), s.suggest("b")
    s.on_trial_complete("a", None, error=True)   # both timing packs failed (after Tune's retries)
    s.on_trial_complete("b", None, error=True)
    assert len(s.suggest("c")["pack"]) == 1


def test_a_restored_pack_state_drops_points_finished_after_the_snapshot(tmp_path):
    """Tune restores the searcher from its last snapshot: a point handed out after it and finished before the kill
    has its row on disk, so the restored queue drops it; a damaged state is one line, not a traceback."""
    from gradauth.rows import SweepLog
    from gradauth.tune_rows import PackSearcher, activate
    s = PackSearcher(_ids(40), slots=2, pack_seconds=3.0, seconds=0.1)
    s.save(str(tmp_path / "state.json"))   # the snapshot
    first = s.suggest("t1")["pack"]        # handed out after it
    log = SweepLog(tmp_path / "out", "x", _ids(40), {}, fresh=True)
    log.finished_many([({"trial_id": p, "status": "unlockable", "seconds": 0.1}, None) for p in first[:7]])
    r = PackSearcher()
    r.restore(str(tmp_path / "state.json"))
    activate(log, None)
    try:
        handed = []
        while (d := r.suggest(f"t{len(handed)}")) not in (None, r.FINISHED):
            handed += d["pack"]
    finally:
        activate(None, None)
    assert sorted(handed) == sorted(set(_ids(40)) - set(first[:7]))
    (tmp_path / "bad.json").write_text(json.dumps({"queue": [1, 2], "probes": [], "live": {}, "size": 3,
                                                   "slots": 2, "pack_seconds": 3.0}))
    with pytest.raises(GradauthError, match="pack state is damaged"):
        PackSearcher().restore(str(tmp_path / "bad.json"))
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(GradauthError, match="not a readable pack state"):
        PackSearcher().restore(str(tmp_path / "junk.json"))
