"""The targeted search wired into the sweep (issue 12): the `search:` config section, rows with a `phase`,
DIR/search.json and `gradauth status`, infeasible intents refused before Ray, and a real `gradauth sweep` of a
targeted config whose driver is SIGKILLed mid-search and finished by `--resume`."""
from __future__ import annotations

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

from gradauth.cli import main
from gradauth.config import Config, SearchConfig, dump_config, load_config, parse_config
from gradauth.errors import GradauthError
from gradauth.rows import PARTS, read_parts

ROOT = Path(__file__).resolve().parents[1]

TARGETED = {"mode": "targeted", "levels": 2, "below_base": 0.03, "step": 0.15, "tolerance": 0.03, "seeds": 1,
            "max_trials": 16, "max_concurrent": 2, "lock_range": [0.02, 0.4], "lock_points": 6, "epochs": [1, 4],
            "lr": [0.01], "thief": {"fractions": [0.1], "epochs": 2}}


# ------------------------------------------------------------------------------------------------- config
def test_a_default_search_section_changes_neither_config_yaml_nor_the_hash():
    """Chosen: a default `search` (grid) is left out of to_dict, so every existing config keeps its hash and its
    config.yaml; a targeted section is in both and round-trips."""
    for name in ("quickstart", "cifar10-cpu"):
        cfg = load_config(ROOT / "sweeps" / f"{name}.yaml")
        assert cfg.search == SearchConfig() and "search" not in cfg.to_dict()
        explicit = parse_config(yaml.safe_load((ROOT / "sweeps" / f"{name}.yaml").read_text()) | {"search": {"mode": "grid"}})
        assert explicit.hash() == cfg.hash() == json.loads((ROOT / "results" / name / "base.json").read_text())["config_hash"]
    t = load_config(ROOT / "sweeps" / "quickstart-targeted.yaml")
    assert t.search.mode == "targeted" and t.to_dict()["search"]["thief"]["fractions"] == [0.01, 0.05, 0.1]
    back = parse_config(yaml.safe_load(dump_config(t)))
    assert back == t and back.hash() == t.hash() != load_config(ROOT / "sweeps" / "quickstart.yaml").hash()
    # the targeted variants train the same base as their grid configs (a bench or resume reuses base.pt)
    for name in ("quickstart", "cifar10-cpu"):
        assert (load_config(ROOT / "sweeps" / f"{name}-targeted.yaml").base_hash()
                == load_config(ROOT / "sweeps" / f"{name}.yaml").base_hash())


def test_search_problems_come_in_the_one_message_with_the_others():
    raw = {"lock": {"values": [2.0]}, "search": {"mode": "targeted", "levels": 0, "bogus": 1}}
    with pytest.raises(GradauthError) as e:
        parse_config(raw)
    msg = str(e.value)
    assert "\n" not in msg and "unknown key `search.bogus`" in msg and "lock rate 2.0 is outside" in msg
    for search, words in [({"mode": "targeted", "levels": 0}, "`search.levels` must be a whole number ≥ 1, got 0"),
                          ({"mode": "random"}, "`search.mode` must be grid or targeted"),
                          ({"mode": "targeted", "max_trials": 0}, "`search.max_trials` must be a whole number ≥ 1"),
                          ({"mode": "targeted", "epochs": [4, 2]}, "`search.epochs` must be [fewest, most]"),
                          ({"mode": "targeted", "thief": {"fractions": [2]}}, "`search.thief.fractions`"),
                          ({"mode": "targeted", "thief": "lots"}, "`search.thief` must be a mapping"),
                          ("targeted", "`search` must be a mapping")]:
        with pytest.raises(GradauthError, match=None) as e:
            parse_config({"search": search})
        assert words in str(e.value), (search, str(e.value))
    with pytest.raises(GradauthError, match="rate locks only"):
        parse_config({"lock": {"mode": "threshold", "values": [0.1]}, "search": {"mode": "targeted"}})
    with pytest.raises(GradauthError, match="one importance source, got 2"):
        parse_config({"importance": ["bn_gamma", "slice"], "search": {"mode": "targeted"}})
    # a threshold grid sweep with a default search section is as fine as before
    assert parse_config({"lock": {"mode": "threshold", "values": [0.1]}}).search.mode == "grid"


def test_a_bad_search_section_is_one_line_exit_2(tmp_path, capsys):
    cfg = yaml.safe_load((ROOT / "sweeps" / "quickstart-targeted.yaml").read_text())
    cfg["search"]["tolerance"] = 0.7
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["sweep", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`search.tolerance` 0.7 must be in (0, 0.5)" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- infeasible intent, before Ray
def _ctx(base_acc: float, tiny_cfg):
    """A trial context on an untrained model: enough for everything the sweep does before its first trial."""
    import torch
    from gradauth.checkpoint import ModelSpec
    from gradauth.data import load_dataset
    from gradauth.importance import bn_gamma
    from gradauth.models import build_model
    from gradauth.trial import TrialContext
    ds = load_dataset(tiny_cfg.data, 0)
    torch.manual_seed(0)
    m = build_model("vgg_tiny", ds.num_classes, ds.in_channels, 1.0)
    spec = ModelSpec("vgg_tiny", ds.num_classes, ds.in_channels, ds.image_size, 1.0, (0.0,), (1.0,))
    return TrialContext(m.state_dict(), spec, {"bn_gamma": bn_gamma(m)}, ds, base_acc, 0.2)


@pytest.mark.parametrize("search, words", [
    ({"targets": [0.99, 0.8]}, "above the base model's accuracy 0.900"),
    ({"targets": [0.85, 0.82]}, "are 0.030 apart"),
    ({"targets": [0.85, 0.24]}, "below lock bound 0.200 + min_gap"),
    ({"max_trials": 5}, "cannot buy 2 levels"),
])
def test_an_infeasible_intent_is_refused_before_ray_starts_and_nothing_is_written(tmp_path, tiny_cfg, search, words):
    import ray
    from gradauth.sweep import run_sweep
    cfg = parse_config(tiny_cfg.to_dict() | {"search": TARGETED | search})
    with pytest.raises(GradauthError) as e:
        run_sweep(cfg, _ctx(0.9, tiny_cfg), tmp_path / "out")
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ search.json and status
def _planner_run():
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from test_search import QUICK, Oracle, run_search, targeted
    finally:
        sys.path.pop(0)
    from gradauth.search import Planner
    o = Oracle(**QUICK)
    p = Planner(targeted(o.base, epochs=[1, 24]), o.base, 0.2, 0.05)
    return p, o, run_search


def test_status_shows_the_search_progress_toward_each_target(tmp_path, capsys):
    from gradauth.status import read_search
    from gradauth.sweep import write_search
    p, o, run_search = _planner_run()
    cfg = parse_config({"name": "q", "search": TARGETED | {"levels": 3, "targets": None}})
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    # mid-search: the curve is in, the levels are being searched
    for c in p.propose(1):
        pts, secs = o.curve(c["curve"]["values"])
        p.observe_curve(c["key"], pts, secs)
    write_search(tmp_path, p)
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "targeted search (searching): 1 trials, 1 trial-seconds"
    assert [ln.split(":")[0].strip() for ln in out[2:5]] == ["level 1", "level 2", "level 3"]
    assert all("0 trials  searching: in progress" in ln for ln in out[2:5])
    assert f"target {p.targets[0]:.3f}" in out[2]
    saved = json.loads((tmp_path / "search.json").read_text())
    assert saved["curve"] and all(c["prun_acc"] <= 1 for c in saved["curve"])
    # finished: one line per target with its best, hit or missed
    run_search(p, o)
    s = write_search(tmp_path, p)
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith(f"targeted search (finished): {s['trials']} trials")
    for lv, line in zip(s["levels"], out[2:5]):
        assert line.startswith(f"  level {lv['level']}: target {lv['target']:.3f}  best {lv['fine_acc']:.3f} over 2 seed(s)")
        assert f"  {lv['trials']} trials  hit" in line and lv["trials"] >= 2
        assert (" hit, sellable" if lv["sellable"] else " hit, NOT sellable") in line
    assert read_search(tmp_path)["summary"]["all_hit"]


@pytest.mark.parametrize("content", [b"{", b"[]", b'{"version": 1, "summary": {"levels": "x"}}',
                                     b'{"version": 1, "summary": {"levels": [{"level": 1, "target": 0.9, '
                                     b'"status": "won"}], "trials": 1, "trial_seconds": 1, "finished": true}}'])
def test_a_damaged_search_json_is_one_line_exit_2(tmp_path, capsys, content):
    (tmp_path / "config.yaml").write_text(dump_config(Config(name="q")))
    (tmp_path / "search.json").write_bytes(content)
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a gradauth search progress file" in err


# ------------------------------------------------------------------------- a real targeted sweep, killed
def _env():
    return os.environ | {"RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT)}


def _sweep(cfg_path, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "gradauth", "sweep", str(cfg_path), "--out", str(out), *extra],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _wait(pred, timeout):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.05)
    raise TimeoutError


@pytest.mark.ray
@pytest.mark.subprocess
def test_a_killed_targeted_sweep_is_finished_by_resume_every_trial_once(tmp_path, tiny_cfg):
    """`gradauth sweep` of a targeted config, the driver and its Ray SIGKILLed once a few trials have their rows;
    `--resume` restores Tune's experiment with the searcher's state and finishes the search: every proposed trial
    ran once (one Tune trial folder each), the rows on disk at the kill are unchanged, level and thief rows carry
    their phase, and search.json says each target's outcome."""
    from gradauth.pipeline import train_stage
    raw = tiny_cfg.to_dict() | {"search": TARGETED, "sweep": tiny_cfg.to_dict()["sweep"] | {"lock_bound": 0.3}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "c.yaml")
    out = tmp_path / "out"
    train_stage(cfg, out)
    proc = _sweep(tmp_path / "c.yaml", out)

    def some_rows():
        return (out / PARTS).is_dir() and (read_parts(out)["status"] == "ok").sum() >= 3
    try:
        _wait(some_rows, timeout=300)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, at once
        proc.wait()
    assert not (out / "trials.parquet").exists()
    before = read_parts(out).set_index("trial_id")
    models = {t: (out / "models" / f"{t}.pt").stat().st_mtime_ns for t in before.index
              if before.loc[t, "status"] == "ok" and before.loc[t, "phase"] == "level"}
    killed = json.loads((out / "search.json").read_text())["summary"]
    assert not killed["finished"]
    proc = _sweep(tmp_path / "c.yaml", out, "--resume")
    _, err = proc.communicate(timeout=600)
    err = err.decode()
    assert proc.returncode == 0, err[-3000:]
    assert "(the searcher's state is restored with it)" in err
    df = pd.read_parquet(out / "trials.parquet")
    assert df["trial_id"].is_unique and set(df["phase"]) <= {"level", "thief"} and "thief" in set(df["phase"])
    assert set(df.loc[df["phase"] == "thief", "trial_id"].str[:6]) == {"thief-"}
    # nothing on disk at the kill trained again
    after = df.set_index("trial_id").loc[before.index]
    pd.testing.assert_frame_equal(after, before, check_like=True, check_dtype=False)
    assert {t: (out / "models" / f"{t}.pt").stat().st_mtime_ns for t in models} == models
    # every trial once: one Tune trial folder per row (and per lock-curve task), each observed by the searcher
    s = json.loads((out / "search.json").read_text())["summary"]
    dirs = {d.name for d in (out / "ray" / "sweep").iterdir() if d.is_dir()}
    curves = {d for d in dirs if d.startswith("curve-")}
    assert dirs - curves == set(df["trial_id"]) and curves
    assert s["finished"] and s["trials"] == len(dirs) > killed["trials"]
    for lv in s["levels"]:
        assert f"[search] level {lv['level']}: target {lv['target']:.3f} {lv['status']}" in err
    assert main(["status", str(out)]) == 0
    # `gradauth select` of a targeted run selects for the search's targets (nearest), not the lexicographic maximum
    assert main(["select", str(out)]) == 0
    doc = json.loads((out / "levels.json").read_text())
    assert doc["settings"]["targets"] == pytest.approx(s["targets"])
    # the search's hits are one feasible level set, so the selector's set is no farther from the targets in total
    hits = [lv["fine_acc"] for lv in s["levels"] if lv["status"] == "hit"]
    if len(hits) == len(s["targets"]) and s["spaced"]:
        dist = lambda accs: sum(abs(a - t) for a, t in zip(accs, s["targets"]))
        assert dist([lv["fine_acc"] for lv in doc["levels"]]) <= dist(hits) + 1e-5


# ------------------------------------------------------------------------------------------ bench search
@pytest.mark.ray
def test_bench_search_compares_grid_and_targeted_on_one_base(tmp_path, tiny_cfg):
    """`gradauth bench search`'s per-config comparison on a shrunken pair (the quickstart and CIFAR pairs take
    minutes to hours): both sides fine-tune the same base; the targeted side counts its curve tasks as trials."""
    import ray
    from gradauth.bench import bench_search_pair
    grid = parse_config(tiny_cfg.to_dict() | {"sweep": tiny_cfg.to_dict()["sweep"] | {"lock_bound": 0.3},
                                              "lock": {"mode": "rate", "values": [0.25, 0.35]}})
    tgt = parse_config(grid.to_dict() | {"search": TARGETED})
    dirs = (tmp_path / "grid", tmp_path / "targeted")
    try:
        r = bench_search_pair("tiny", grid, tgt, tmp_path)
    finally:
        ray.shutdown()
    # the same pair measured from the two finished sweeps: nothing runs again, nothing in them is written
    files = {f: f.stat().st_mtime_ns for d in dirs for f in d.rglob("*") if f.is_file()}
    again = bench_search_pair("tiny", grid, tgt, tmp_path / "unused", dirs=dirs)
    assert {f: f.stat().st_mtime_ns for d in dirs for f in d.rglob("*") if f.is_file()} == files
    with pytest.raises(GradauthError, match="not a sweep of sweeps/"):
        bench_search_pair("tiny", grid, grid, tmp_path / "unused", dirs=dirs[::-1])
    for side in ("grid", "targeted"):
        assert {k: again[side][k] for k in ("trials", "trial_seconds", "levels")} == {
            k: r[side][k] for k in ("trials", "trial_seconds", "levels")}
        assert again[side]["wall_s"] is None
    assert again["measured_from"]["grid"] == str(dirs[0]) and again["measured_from"]["targeted_git_sha"]
    assert not (tmp_path / "unused").exists()
    (dirs[1] / "base.pt").write_bytes(b"another base")
    with pytest.raises(GradauthError, match="same base.pt"):
        bench_search_pair("tiny", grid, tgt, tmp_path / "unused", dirs=dirs)
    g, t = r["grid"], r["targeted"]
    assert g["trials"] == g["grid_points"] == 2 and g["trial_seconds"] > 0 and g["wall_s"] > 0
    curve_tasks = t["trials"] - len(pd.read_parquet(tmp_path / "targeted" / "trials.parquet"))
    assert curve_tasks in (1, 2)   # the lock-curve tasks count as trials (they are billed) but are no rows
    assert t["seconds_by_phase"]["curve"] > 0 and set(t["thief"]) == {"0.1"}
    assert r["targets"] == pytest.approx([r["base_acc"] - 0.03, r["base_acc"] - 0.18])
    for side in (g, t):
        assert [lv["target"] for lv in side["levels"]] == r["targets"]
        assert side["all_within_tolerance"] == all(
            lv["level"] is not None and abs(lv["level"] - lv["target"]) <= 0.03 + 1e-9 for lv in side["levels"])
    assert r["trial_seconds_ratio"] == pytest.approx(t["trial_seconds"] / g["trial_seconds"])
    # the hit levels' own trials: part of what the search paid, and some of it when a level was hit
    hits = [lv for lv in t["levels"] if lv["level"] is not None]
    assert 0 <= t["hit_trial_seconds"] < t["trial_seconds"] and (t["hit_trial_seconds"] > 0) == bool(hits)
    assert r["hit_trial_seconds_ratio"] == pytest.approx(t["hit_trial_seconds"] / g["trial_seconds"])
    assert json.loads((tmp_path / "grid" / "base.json").read_bytes()) == json.loads(
        (tmp_path / "targeted" / "base.json").read_bytes())


def test_bench_search_takes_finished_run_folders_by_any_path(tmp_path, monkeypatch):
    """The pair measured from finished runs is named by two variables holding one path each, so a path may hold ','
    or ':'; half a request, several pairs, an unknown pair or the old combined variable is one line."""
    from gradauth.bench import _search_dirs, bench_search
    g, t = tmp_path / "grid,a:b", tmp_path / "t:x,y"
    g.mkdir(), t.mkdir()
    monkeypatch.setenv("GRADAUTH_BENCH_SEARCH_GRID", str(g))
    monkeypatch.setenv("GRADAUTH_BENCH_SEARCH_TARGETED", str(t))
    assert _search_dirs(["cifar10-cpu"]) == {"cifar10-cpu": (g, t)}
    for only in (None, ["quickstart", "cifar10-cpu"]):
        with pytest.raises(GradauthError, match="all three"):
            _search_dirs(only)
    monkeypatch.setenv("GRADAUTH_BENCH_SEARCH_TARGETED", str(tmp_path / "nowhere"))
    with pytest.raises(GradauthError, match="is not a folder"):
        _search_dirs(["cifar10-cpu"])
    with pytest.raises(GradauthError, match="unknown pair"):
        bench_search(tmp_path / "s.json", only=["cifar"])
    monkeypatch.delenv("GRADAUTH_BENCH_SEARCH_GRID"), monkeypatch.delenv("GRADAUTH_BENCH_SEARCH_TARGETED")
    assert _search_dirs(["quickstart"]) == {}
    monkeypatch.setenv("GRADAUTH_BENCH_SEARCH_DIRS", f"cifar10-cpu={g}:{t}")
    with pytest.raises(GradauthError, match="is gone"):
        _search_dirs(["cifar10-cpu"])
    assert not (tmp_path / "s.json").exists()


def test_the_searcher_takes_a_curve_reported_as_json_text():
    """The sweep's trainable reports a curve task's points as JSON text (Tune's loggers take scalars); the searcher
    observes them as it does a list."""
    from gradauth.search import TargetedSearcher
    p, o, _ = _planner_run()
    s = TargetedSearcher(p)
    cfg = s.suggest("t1")
    assert cfg["phase"] == "curve"
    pts, secs = o.curve(cfg["curve"]["values"])
    s.on_trial_complete("t1", {"curve_json": json.dumps(pts), "seconds": secs})
    assert sorted(p.curve) == sorted(p._q(v) for v in cfg["curve"]["values"]) and p.trials == 1 and not p.pending
