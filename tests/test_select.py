"""Level selection on tables with known answers: the paper's Table 1 and small hand-made cases."""
import json

import pyarrow as pa
import pytest

from gradauth.errors import GradauthError
from gradauth.select import TRIAL_COLUMNS, format_table, load_trials, select_dir, select_levels

from paper_table import paper_table1, seeds, table, trial, write_trials


def _why(selection, needle: str) -> dict[str, str]:
    """trial_id → reason for the rejected trials whose id contains `needle`."""
    return {r["trial_id"]: r["why"] for r in selection.rejected if needle in r["trial_id"]}


def _accs(selection) -> list[float]:
    return [lv["fine_acc"] for lv in selection.levels]


def test_paper_table1_picks_2_7_10_percent():
    s = select_levels(paper_table1())
    assert [lv["lock_value"] for lv in s.levels] == [0.02, 0.07, 0.10]
    assert _accs(s) == pytest.approx([0.912, 0.815, 0.736], abs=1e-9)
    assert [lv["fine_acc_std"] for lv in s.levels] == pytest.approx([0.002] * 3)  # sample std (ddof=1) of ±0.002
    assert [lv["prun_acc"] for lv in s.levels] == pytest.approx([0.101, 0.100, 0.100])
    assert [lv["locked_channels"] for lv in s.levels] == [110, 385, 550]
    assert s.method == 1 and s.settings["max_locked_acc"] == pytest.approx(0.2)  # chance 0.1 + 0.1
    assert len(s.rejected) == 24 - 9
    for rate, prun in [("0.001", "0.850"), ("0.006", "0.450"), ("0.007", "0.310"), ("0.01", "0.220")]:
        why = _why(s, f"rate{rate}-")
        assert len(why) == 3
        assert set(why.values()) == {f"locked accuracy {prun} (mean of 3 seeds) above max_locked_acc 0.200"}
    assert set(_why(s, "rate0.03-").values()) == {"fine_acc 0.905 within min_gap 0.05 of level 1 (0.912)"}


def test_select_dir_writes_levels_json_and_prints_the_table(tmp_path, capsys):
    write_trials(paper_table1(), tmp_path / "trials.parquet")
    s = select_dir(tmp_path, defaults={"levels": 3, "min_gap": 0.05, "experiment": "vgg19-cifar10"})
    doc = json.loads((tmp_path / "levels.json").read_text())
    assert doc["experiment"] == "vgg19-cifar10" and doc["method"] == 1
    first = doc["levels"][0]
    assert {k: first[k] for k in ("level", "lock_mode", "lock_value", "schedule", "fine_acc", "prun_acc")} == {
        "level": 1, "lock_mode": "rate", "lock_value": 0.02,
        "schedule": {"epochs": 40, "lr": 0.01, "data_fraction": 1.0, "scope": "all"},
        "fine_acc": 0.912, "prun_acc": 0.101}
    assert first["fine_acc_std"] == pytest.approx(0.002)
    assert first["trial_ids"] == [f"bn_gamma-rate0.02-e40-lr0.01-f1-all-s{i}" for i in range(3)]
    assert [lv["level"] for lv in doc["levels"]] == [1, 2, 3]
    assert len(doc["rejected"]) == 15 and all(set(r) >= {"trial_id", "why"} for r in doc["rejected"])
    from gradauth.schema import file_sha256  # levels.json records the trials.parquet it was selected from
    assert doc == json.loads(json.dumps(s.to_json("vgg19-cifar10"))) | {
        "trials_sha256": file_sha256(tmp_path / "trials.parquet")}
    out = capsys.readouterr().out
    assert "bn_gamma rate 7%" in out and "0.815 ± 0.002" in out and out.strip() == format_table(s)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["levels.json", "trials.parquet"]  # no temporary left


def test_select_dir_settings_precedence(tmp_path):
    write_trials(paper_table1(), tmp_path / "trials.parquet")
    cfg = {"levels": 3, "min_gap": 0.05, "max_locked_acc": 0.2}
    assert len(select_dir(tmp_path, levels=2, defaults=cfg).levels) == 2                  # flag beats config
    assert select_dir(tmp_path, max_locked_acc=0.25, defaults=cfg).levels[0]["fine_acc"] == 0.92  # 1 % now locks
    assert _accs(select_dir(tmp_path, targets=[0.9, 0.8], defaults=cfg)) == [0.905, 0.815]  # targets set N = 2
    assert select_dir(tmp_path).settings == {"levels": 3, "min_gap": 0.05, "max_locked_acc": 0.2, "targets": None}
    assert json.loads((tmp_path / "levels.json").read_text())["experiment"] == tmp_path.name


def _singles(*accs, **kw):
    """One single-seed candidate per accuracy, each its own lock rate (all locked to chance)."""
    return table([trial(lock_value=0.01 * (i + 1), fine_acc=a, **kw) for i, a in enumerate(accs)])


def test_targets_choose_the_nearest_chain_not_the_highest():
    df = _singles(0.95, 0.90, 0.85, 0.80, 0.75, 0.70)
    assert _accs(select_levels(df)) == [0.95, 0.90, 0.85]
    near = select_levels(df, targets=[0.9, 0.8, 0.7])
    assert _accs(near) == [0.90, 0.80, 0.70]
    assert _why(near, "rate0.01-")["bn_gamma-rate0.01-e40-lr0.01-f1-all-s0"] == (
        "not needed: levels 0.900/0.800/0.700 are the feasible chain nearest the targets 0.9/0.8/0.7 "
        "(total distance 0.000)")
    # Two targets nearest the same 0.90: the whole chain is weighed (0 + 0.03 + 0 beats 0.05 + 0.02 + 0).
    assert _accs(select_levels(df, targets=[0.9, 0.88, 0.7])) == [0.90, 0.85, 0.70]


def test_gap_must_exceed_twice_the_seed_std():
    # 0.84 is 0.06 ≥ min_gap from 0.90 and 0.78, but its seeds spread ±0.04 (std 0.04): 2 × std = 0.08 > 0.06.
    df = table(seeds(0.90, lock_value=0.02) + seeds(0.84, noise=(-0.04, 0, 0.04), lock_value=0.03)
               + seeds(0.78, lock_value=0.04) + seeds(0.70, lock_value=0.05))
    s = select_levels(df)
    assert _accs(s) == pytest.approx([0.90, 0.78, 0.70])
    assert set(_why(s, "rate0.03-").values()) == {
        "fine_acc 0.840 ± 0.040 too close to level 1 (0.900 ± 0.002): gap 0.060 not above 2 × std 0.080"}


def test_exact_search_finds_a_chain_where_greedy_dead_ends():
    # Greedy takes 0.95, then the next highest it may, 0.92; but 0.92's seed std (0.012) is too wide for 0.898
    # (gap 0.022 ≤ 0.024) and 0.919 is too near it, so greedy stops at 2. The exact search takes 0.919 instead.
    df = table([trial(0.01, 0.95)] + seeds(0.92, noise=(-0.012, 0, 0.012), lock_value=0.02)
               + [trial(0.03, 0.919), trial(0.04, 0.898)])
    s = select_levels(df, levels=3, min_gap=0.02)
    assert _accs(s) == pytest.approx([0.95, 0.919, 0.898])
    assert set(_why(s, "rate0.02-").values()) == {
        "fine_acc 0.920 cannot be level 2: with it at most 2 of 3 levels fit the min_gap and 2 × std rules"}


def test_infeasible_says_how_many_levels_are_possible_and_what_to_change():
    df = _singles(0.90, 0.87, 0.80)
    with pytest.raises(GradauthError) as e:
        select_levels(df, levels=3)
    msg = str(e.value)
    assert "only 2 of 3 levels possible" in msg and "--levels 2" in msg and "smaller --min-gap" in msg
    assert "--max-locked-acc" not in msg and len(msg.splitlines()) == 1
    assert select_levels(df, levels=3, min_gap=0.03).levels[2]["fine_acc"] == 0.80


def test_infeasible_because_of_the_lock_suggests_max_locked_acc():
    df = table([trial(0.01, 0.95, prun_acc=0.30), trial(0.02, 0.90), trial(0.03, 0.85, prun_acc=0.25)])
    with pytest.raises(GradauthError, match=r"only 1 of 3 levels possible.*a larger --max-locked-acc"):
        select_levels(df)
    with pytest.raises(GradauthError, match=r"0 of 1 levels possible: .*lowest 0.250\): use a larger --max-locked-acc"):
        select_levels(df.iloc[[0, 2]], levels=1)


def test_a_level_no_better_than_the_locked_model_is_not_sold():
    # 0.25 is 0.05 below 0.30 and far from the rest, but a tier at 0.25 is barely above what the public model is
    # allowed to be (max_locked_acc 0.2): it must beat that by min_gap (0.25 ≥ 0.25 passes, 0.24 does not).
    df = table([trial(0.01, 0.40), trial(0.02, 0.30), trial(0.03, 0.24), trial(0.04, 0.25)])
    s = select_levels(df, levels=3)
    assert _accs(s) == pytest.approx([0.40, 0.30, 0.25])
    assert set(_why(s, "rate0.03-").values()) == {
        "fine_acc 0.240 not min_gap 0.05 above max_locked_acc 0.200: no better than a locked model"}
    with pytest.raises(GradauthError, match=r"0 of 1 levels possible: every \(lock, schedule\) pair that locks to "
                                            r"≤ max_locked_acc 0.200 recovers less than 0.250"):
        select_levels(df.iloc[[2]], levels=1)


def test_unlockable_and_error_trials_are_rejected_with_their_status():
    df = table([trial(0.005, None, prun_acc=0.62, status="unlockable"), trial(0.05, None, status="error")]
               + [trial(0.01 * (i + 1), a) for i, a in enumerate([0.9, 0.8])])
    s = select_levels(df, levels=2)
    assert _accs(s) == [0.9, 0.8]
    assert s.rejected == [
        {"trial_id": "bn_gamma-rate0.005-e40-lr0.01-f1-all-s0", "kind": "unlockable",
         "why": "status unlockable (locked accuracy 0.620 above lock_bound)"},
        {"trial_id": "bn_gamma-rate0.05-e40-lr0.01-f1-all-s0", "kind": "error",
         "why": "status error: the trial failed (`gradauth sweep CONFIG --resume` retries it)"}]
    with pytest.raises(GradauthError, match=r"no trial finished fine-tuning \(1 error, 1 unlockable\)"):
        select_levels(df.iloc[:2], levels=1)


def test_one_lock_with_several_schedules_is_method_2():
    df = table([trial(0.05, a, epochs=e) for a, e in [(0.90, 20), (0.80, 5), (0.70, 1)]] + [trial(0.09, 0.85)])
    s = select_levels(df, levels=3, targets=[0.9, 0.8, 0.7])
    assert s.method == 2 and [lv["schedule"]["epochs"] for lv in s.levels] == [20, 5, 1]
    lex = select_levels(df, levels=3)
    assert _accs(lex) == [0.90, 0.85, 0.80] and lex.method == 1  # rate 9 % joins the 5 % lock
    assert _why(lex, "e1-") == {"bn_gamma-rate0.05-e1-lr0.01-f1-all-s0":
                                "not needed: fine_acc 0.700 is below level 3 (0.800) and 3 levels were asked for"}


def test_missing_columns_and_files_are_refused_with_the_fix(tmp_path):
    with pytest.raises(GradauthError, match=r"not found: run `gradauth sweep CONFIG` first"):
        load_trials(tmp_path / "trials.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(GradauthError, match=r"not a readable Parquet file"):
        load_trials(tmp_path / "bad.parquet")
    write_trials(paper_table1(), tmp_path / "trials.parquet")
    df = load_trials(tmp_path / "trials.parquet").drop(columns=["prun_acc", "ft_scope"])
    df.to_parquet(tmp_path / "trials.parquet")
    with pytest.raises(GradauthError, match=r"lacks column\(s\) ft_scope, prun_acc") as e:
        select_dir(tmp_path)
    assert len(str(e.value).splitlines()) == 1 and not (tmp_path / "levels.json").exists()
    with pytest.raises(GradauthError, match=r"lacks column\(s\) ft_scope, prun_acc"):
        select_levels(df)


@pytest.mark.parametrize("kw, needle", [
    ({"levels": 0}, "levels must be a whole number"),
    ({"min_gap": -0.1}, "min_gap must be in [0, 1)"),
    ({"targets": [0.9, 0.8]}, "pass --targets with 3 values or --levels 2"),
    ({"max_locked_acc": 1.5}, "max_locked_acc must be in [0, 1]"),
])
def test_bad_settings_are_refused(kw, needle):
    with pytest.raises(GradauthError) as e:
        select_levels(paper_table1(), **kw)
    assert needle in str(e.value)


def test_trial_columns_match_the_sweep_writer():
    pytest.importorskip("torch")
    from gradauth.schema import OPTIONAL_COLUMNS
    from gradauth.sweep import TRIALS_SCHEMA
    assert pa.schema(TRIAL_COLUMNS | OPTIONAL_COLUMNS) == TRIALS_SCHEMA  # the contract, then the sweep's `phase`
