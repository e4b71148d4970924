"""Trial packing (`sweep.pack`): several grid points per Tune trial, every row still per grid point."""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from gradauth.config import parse_config
from gradauth.errors import GradauthError
from gradauth.rows import PARTS, read_parts
from gradauth.packing import make_packs, pack_name, pack_size, point_seconds
from gradauth.sweep import concurrent_slots
from gradauth.trial import grid

from conftest import HALF, with_base

# Half-width tiny VGG on digits: 0.3–0.35 rate locks fine-tune (status ok), 0.45 is unlockable or degenerate.
RAW = copy.deepcopy(HALF) | {"name": "pk", "lock": {"mode": "rate", "values": [0.3, 0.35, 0.45]},
                             "finetune": {"epochs": [1], "lr": [0.01], "seeds": [0, 1, 2]},
                             "sweep": {"lock_bound": 0.3, "resources": {"cpu": 1, "gpu": 0}}}


def _cfg(**sweep):
    raw = copy.deepcopy(RAW)
    raw["sweep"] |= sweep
    return parse_config(raw)


def test_pack_sizes():
    assert pack_size(4, 10.0, None, 100, 2) == 4  # a number is the number
    assert pack_size("auto", 10.0, None, 100, 2) == 1  # nothing measured: no packing
    assert pack_size("auto", 10.0, 0.04, 1000, 2) == 250  # ~10 s per Tune trial
    assert pack_size("auto", 10.0, 0.04, 100, 2) == 50  # but every slot gets work
    assert pack_size("auto", 10.0, 30.0, 1000, 2) == 1  # long trials: one per Tune trial
    specs = grid(_cfg())
    packs = make_packs(specs, 4)
    assert [len(p) for p in packs] == [4, 4, 1] and [t for p in packs for t in p] == specs
    assert len({pack_name([t.trial_id for t in p]) for p in packs}) == 3


def test_slots_and_point_seconds():
    cfg = _cfg()
    assert concurrent_slots(cfg, {"cpu": 1.0, "gpu": 0.0}, {"CPU": 8.0}) == 8
    assert concurrent_slots(cfg, {"cpu": 1.0, "gpu": 0.25}, {"CPU": 8.0, "GPU": 1.0}) == 4
    assert concurrent_slots(cfg, {"cpu": 1.0, "gpu": 1.0}, {"CPU": 8.0}) == 1  # no GPU yet (autoscaler): 1
    assert concurrent_slots(_cfg(), {"cpu": 2.0, "gpu": 0.0}, {"CPU": 7.0}) == 3
    cfg.sweep.max_concurrent = 2
    assert concurrent_slots(cfg, {"cpu": 1.0, "gpu": 0.0}, {"CPU": 8.0}) == 2
    rows = [{"status": "ok", "seconds": s} for s in (0.5, 0.1, 0.2)] + [{"status": "unlockable", "seconds": 0.01}]
    assert point_seconds(rows) == 0.2  # the median of the fine-tuned ones
    assert point_seconds([{"status": "unlockable", "seconds": 0.01}]) == 0.01
    assert point_seconds([]) is None


@pytest.mark.parametrize("bad", [0, -3, "fast", True, 2.0, None])
def test_pack_setting_is_checked(bad):
    with pytest.raises(GradauthError, match="sweep.pack"):
        _cfg(pack=bad)


def test_packing_changes_neither_the_config_hash_nor_a_default_config_file():
    from gradauth.config import dump_config
    plain, packed = _cfg(), _cfg(pack="auto", pack_seconds=5)
    assert plain.hash() == packed.hash()  # the rows' config_hash is the same packed or not
    assert "pack" not in dump_config(plain) and "pack: auto" in dump_config(packed)


@pytest.mark.ray
def test_a_packed_sweep_writes_the_same_rows_as_an_unpacked_one(half_base, tmp_path):
    """Same grid points, same ids, same accuracies bit for bit: a pack runs each point exactly as its own trial
    would (same seeds, same one thread), and writes one row per point."""
    from gradauth.pipeline import trial_context
    from gradauth.sweep import ensure_ray, run_sweep
    import ray
    ctx = trial_context(_cfg(), half_base[1])
    ensure_ray(num_cpus=2)
    got = {}
    try:   # the Ray this test starts goes with it: later tests start their own, or assert none runs
        for pack in (1, 4, "auto"):
            out = tmp_path / f"p{pack}"
            out.mkdir()
            # pack_seconds tiny: auto times the first points, then packs the rest in twos or more
            got[pack] = run_sweep(_cfg(pack=pack, pack_seconds=0.2), ctx, out).set_index("trial_id")
            assert not (out / PARTS).exists() and len(list((out / "models").glob("*.pt"))) == (
                got[pack].status == "ok").sum()
            trials = [p.name for p in (out / "ray" / "sweep").iterdir() if p.is_dir()]
            if pack == 4:
                assert sorted(n[:5] for n in trials) == ["pack1", "pack4", "pack4"]  # 9 points: 4 + 4 + 1
                # Tune's config names the points by id; each checkpoint holds its own batch's rows, the rest by id
                exp = out / "ray" / "sweep"
                for name in trials:
                    cfg_pack = json.loads((exp / name / "params.json").read_text())["pack"]
                    assert all(isinstance(p, str) for p in cfg_pack) and pack_name(cfg_pack) == name
                    seen = []
                    for ck in sorted((exp / name).glob("checkpoint_*/pack.json")):
                        pj = json.loads(ck.read_text())
                        assert sorted(pj["rows"]) == sorted(pj["batch"]) and pj["done"][-len(pj["batch"]):] == pj["batch"]
                        assert set(pj["digests"]) <= set(pj["batch"])
                        seen += pj["batch"]
                    assert sorted(seen) == sorted(cfg_pack)  # every point's row in exactly one checkpoint
    finally:
        ray.shutdown()
    ref = got[1]
    assert len(ref) == 9 and set(ref.status) >= {"ok"} and ref.status.isin(["ok", "unlockable", "degenerate"]).all()
    for pack in (4, "auto"):
        df = got[pack]
        assert list(df.index) == list(ref.index)
        cols = [c for c in ref.columns if c != "seconds"]
        pd.testing.assert_frame_equal(df[cols], ref[cols])  # fine_acc, prun_acc, params, … exactly
    a, b = (open(tmp_path / p / "models" / f"{ref.index[ref.status == 'ok'][0]}.pt", "rb").read() for p in ("p1", "p4"))
    assert a == b  # the model file too


# ---- a driver killed mid-pack (real processes) ------------------------------------------------------------------

def _env():
    return os.environ | {"RAY_ADDRESS": "local", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _sweep(cfg_path, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "gradauth", "sweep", str(cfg_path), "--out", str(out), *extra],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _ran_since(out: Path, since: float) -> list[str]:
    """Every grid point a pack reported from `since` on (result.json: one line per report, Tune's timestamp in whole
    seconds): what the resumed sweep computed."""
    ran = []
    for p in sorted((out / "ray" / "sweep").glob("pack*/result.json")):
        for line in p.read_text().splitlines():
            if line.strip() and json.loads(line)["timestamp"] >= int(since):
                ran += json.loads(line).get("batch_points", "").split()
    return ran


# pack: auto hands packs out as slots free up (tune_rows.PackSearcher): timing packs first, then sized ones; its
# queue is restored from Tune's snapshot with the experiment. A fixed pack size is not killed separately: its packs
# are a grid (param_space), restored as an unpacked grid is (test_fault_tolerance's killed driver), and each pack
# resumes through the same pack trainable as here (~1 min of the suite's Ray time each).
KILL = copy.deepcopy(RAW) | {"lock": {"mode": "rate", "values": [0.3, 0.35]},
                             "finetune": {"epochs": [4], "lr": [0.005], "seeds": list(range(12))}}
KILL["sweep"] = KILL["sweep"] | {"pack": "auto", "pack_seconds": 2.0, "checkpoint_min_s": 0}


@pytest.mark.ray
@pytest.mark.subprocess
def test_a_driver_killed_mid_pack_resumes_without_rerunning_a_point(half_base, tmp_path):
    raw = KILL
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = parse_config(copy.deepcopy(raw))
    out = with_base(half_base[1], tmp_path / "out", cfg)
    specs = grid(cfg)
    proc = _sweep(tmp_path / "c.yaml", out)
    t0 = time.time()
    while time.time() - t0 < 240:  # rows arrive while packs run; kill once a few are on disk
        if (out / PARTS).is_dir() and len(read_parts(out)) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, at once
    proc.wait()
    before = read_parts(out).set_index("trial_id")
    assert 3 <= len(before) < len(specs), "the kill must land mid-sweep"
    models = {t: (out / "models" / f"{t}.pt").stat().st_mtime_ns for t in before.index[before.status == "ok"]}
    time.sleep(1.1)  # the resumed run's reports carry later whole-second timestamps than any before the kill
    since = time.time()
    proc = _sweep(tmp_path / "c.yaml", out, "--resume")
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert f"[sweep] --resume: {len(before)} of {len(specs)} grid points already finished" in err.decode()
    assert "[sweep] resuming" in err.decode()  # the packs restored from their checkpoints
    df = pd.read_parquet(out / "trials.parquet")
    assert sorted(df["trial_id"]) == sorted(t.trial_id for t in specs)  # every grid point, once
    after = df.set_index("trial_id").loc[before.index]
    pd.testing.assert_frame_equal(after, before, check_like=True, check_dtype=False)  # to the second it took
    assert {t: (out / "models" / f"{t}.pt").stat().st_mtime_ns for t in models} == models
    # the resumed packs skipped every point finished before the kill and ran each other point exactly once
    assert sorted(_ran_since(out, since)) == sorted(t.trial_id for t in specs if t.trial_id not in before.index)
    from gradauth.status import sweep_status
    s = sweep_status(out)
    assert (s["done"] + s["failed"], s["running"], s["pending"]) == (len(specs), 0, 0)


# ---- the targeted search's progress line (console.SearchProgress) ------------------------------------------------

def test_the_targeted_search_prints_one_line_per_target_state(tmp_path):
    import io

    from gradauth.config import load_config
    from gradauth.console import SearchProgress
    from gradauth.rows import SweepLog
    from gradauth.search import Planner
    cfg = load_config(Path(__file__).resolve().parents[1] / "sweeps" / "quickstart-targeted.yaml")
    planner = Planner(cfg.search, 0.95, 0.2, cfg.select.min_gap, "bn_gamma", "rate")
    log = SweepLog(tmp_path, "t", [], {}, fresh=True)
    stream = io.StringIO()
    progress = SearchProgress(log, stream)
    summary = planner.summary()  # nothing run yet: every target is being probed
    progress.update(summary)
    first = stream.getvalue().splitlines()
    assert len(first) == 1 and first[0].startswith("[search] targets 0.940 probing, 0.860 probing, 0.780 probing; "
                                                   "0 trials (0 running)")
    log.started("a")
    levels = [dict(summary["levels"][0], status="hit", fine_acc=0.9412), summary["levels"][1],
              dict(summary["levels"][2], status="missed", why="budget")]
    progress.update(summary | {"levels": levels, "trials": 7, "trial_seconds": 42.0})
    progress.tick()  # nothing settled since: throttled, no new line in a plain log
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and all(line.startswith("[search] targets ") for line in lines)
    assert lines[1].startswith("[search] targets 0.940 hit 0.941, 0.860 probing, 0.780 missed; 7 trials (1 running), "
                               "42 trial-s")


def test_a_point_that_raises_is_its_own_error_row_and_the_next_point_runs(half_base, capsys):
    """Inside a pack each point runs through `run_point`: one that raises (here an importance criterion the
    context lacks) becomes that point's `error` row, and the pack goes on to the next."""
    import dataclasses

    import torch

    from gradauth.pipeline import trial_context
    from gradauth.sweep import run_point
    from gradauth.tune_rows import point_row
    cfg = _cfg()
    ctx = trial_context(cfg, half_base[1])
    bad = dataclasses.replace(ctx, scores={})
    t = grid(cfg)[0]
    row, data = run_point(bad, t, torch.device("cpu"), ctx.ds)
    assert row["status"] == "error" and row["trial_id"] == t.trial_id and data is None
    assert point_row(row)["phase"] == "grid" and set(point_row(row)) >= {"fine_acc", "status", "seconds"}
    assert f"grid point {t.trial_id} failed: KeyError" in capsys.readouterr().err
    row, data = run_point(ctx, t, torch.device("cpu"), ctx.ds)
    assert row["status"] in ("ok", "unlockable", "degenerate") and (data is not None) == (row["status"] == "ok")


def test_a_packs_report_is_one_part_file_and_rows_stay_per_point(tmp_path):
    """The driver writes a pack's report (several points) as its models and ONE part file; a point it already has is
    skipped; CHUNK rows of loose parts become one chunk file; every row reads back, once."""
    from gradauth import rows as rows_mod
    from gradauth.rows import SweepLog

    def row(i, status="ok"):
        return {"trial_id": f"p{i:03d}", "status": status, "fine_acc": i / 1000, "seconds": 0.1, "phase": "grid"}
    ids = [f"p{i:03d}" for i in range(rows_mod.CHUNK + 10)]
    log = SweepLog(tmp_path, "x", ids, {}, fresh=True)
    assert log.finished_many([(row(0), b"m0"), (row(1, "unlockable"), None), (row(2), b"m2")]) == 3
    parts = sorted(p.name for p in (tmp_path / PARTS).glob("*.parquet"))
    assert parts == ["p000.parquet"] and sorted(p.name for p in (tmp_path / "models").iterdir()) == ["p000.pt", "p002.pt"]
    assert log.finished_many([(row(2), b"again"), (row(3), b"m3")]) == 1  # p002 has its row: not written again
    assert (tmp_path / "models" / "p002.pt").read_bytes() == b"m2"
    for i in range(4, rows_mod.CHUNK + 10, 7):
        log.finished_many([(row(j), b"m") for j in range(i, min(i + 7, rows_mod.CHUNK + 10))])
    names = sorted(p.name for p in (tmp_path / PARTS).glob("*.parquet"))
    assert names[0] == "chunk-000001.parquet" and len(names) < 5  # the loose parts went into the chunk
    df = read_parts(tmp_path)
    assert sorted(df["trial_id"]) == ids and df.set_index("trial_id").loc["p042", "fine_acc"] == 0.042
    assert log.state["p001"] == "unlockable" and sum(v == "ok" for v in log.state.values()) == len(ids) - 1
