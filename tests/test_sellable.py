"""Issue 12, sellable levels and a public model with no head start: thief trials (rows `thief-…` of trials.parquet)
keep levels a thief reaches out of the selection, choose the public model's lock, and show in the report."""
import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradauth.errors import GradauthError
from gradauth.release import choose_public
from gradauth.schema import read_trials, thief_rows
from gradauth.select import TRIAL_COLUMNS, select_dir, select_levels

from paper_table import seeds, table, trial, write_trials

ROOT = Path(__file__).resolve().parents[1]
NOISE = (-0.002, 0.002)  # two seeds, sample std 0.0028


def thief(fraction: float, fine_acc: float, lock_value: float | None = None, prun_acc: float = 0.1,
          seed: int = 0, epochs: int = 30) -> dict:
    """A thief row as search.search_trial writes it: from scratch (lock_value None) or from the public model."""
    if lock_value is None:
        r = trial(0.0, fine_acc, prun_acc, seed=seed, importance="scratch", lock_mode="none", epochs=epochs,
                  data_fraction=fraction, locked_channels=0)
    else:
        r = trial(lock_value, fine_acc, prun_acc, seed=seed, epochs=epochs, data_fraction=fraction)
    return r | {"trial_id": "thief-" + r["trial_id"], "params": None, "flops": None}


def levels_table() -> list[dict]:
    """Four candidate levels 0.95 / 0.85 / 0.75 / 0.65, all locked to 0.1, two seeds each."""
    return [r for v, acc in [(0.02, 0.95), (0.04, 0.85), (0.06, 0.75), (0.08, 0.65)]
            for r in seeds(acc, NOISE, lock_value=v)]


def thieves(best_public: float = 0.72) -> list[dict]:
    return [thief(0.01, 0.40), thief(0.05, 0.60), thief(0.01, 0.45, 0.08), thief(0.05, best_public, 0.08)]


# ---- select ----------------------------------------------------------------------------------------------------

def test_a_level_the_best_thief_reaches_is_refused_and_margins_recorded():
    s = select_levels(table(levels_table() + thieves()), levels=2, min_gap=0.05)
    assert [lv["fine_acc"] for lv in s.levels] == pytest.approx([0.95, 0.85])
    assert [lv["thief_margin"] for lv in s.levels] == pytest.approx([0.23, 0.13])
    assert s.thief["best_acc"] == pytest.approx(0.72) and s.thief["best"]["kind"] == "public"
    assert s.thief["by_fraction"] == [{"fraction": 0.01, "public": 0.45, "scratch": 0.4, "head_start": 0.05},
                                      {"fraction": 0.05, "public": 0.72, "scratch": 0.6, "head_start": 0.12}]
    kinds = {r["trial_id"]: r["kind"] for r in s.rejected}
    assert {t for t, k in kinds.items() if k == "thief_trial"} == {r["trial_id"] for r in thieves()}
    refused = {t for t, k in kinds.items() if k == "thief"}
    assert refused == {r["trial_id"] for r in levels_table() if r["lock_value"] in (0.06, 0.08)}
    why = next(r["why"] for r in s.rejected if r["kind"] == "thief" and "rate0.06" in r["trial_id"])
    assert why.startswith("fine_acc 0.750 not min_gap 0.05 above the best thief 0.720 (public bn_gamma rate 8%, 5% data")
    doc = s.to_json("x")
    assert doc["thief"]["best_acc"] == pytest.approx(0.72)


def test_three_levels_are_infeasible_once_the_thief_is_counted():
    with pytest.raises(GradauthError, match=r"best thief \(0\.720"):
        select_levels(table(levels_table() + thieves()), levels=3, min_gap=0.05)
    # a weaker thief (best 0.69): 0.75 is 0.06 above it and sells
    s = select_levels(table(levels_table() + thieves(0.69)), levels=3, min_gap=0.05)
    assert [lv["fine_acc"] for lv in s.levels] == pytest.approx([0.95, 0.85, 0.75])
    assert s.levels[-1]["thief_margin"] == pytest.approx(0.06)


def test_without_thief_rows_the_selection_is_todays():
    plain = select_levels(table(levels_table()), levels=3, min_gap=0.05)
    assert [lv["fine_acc"] for lv in plain.levels] == pytest.approx([0.95, 0.85, 0.75])
    assert plain.thief is None and "thief" not in plain.to_json("x")
    assert not any("thief_margin" in lv for lv in plain.levels)
    # thief rows that all failed give no best thief: the same levels, no margins
    failed = [thief(0.05, 0.9) | {"status": "error", "fine_acc": None, "fine_top3": None}]
    s = select_levels(table(levels_table() + failed), levels=3, min_gap=0.05)
    assert s.levels == plain.levels and s.thief["best_acc"] is None and s.thief["failed"] == [failed[0]["trial_id"]]


def test_the_quickstart_levels_json_reproduces_byte_for_byte(tmp_path):
    src = ROOT / "results" / "quickstart"
    for name in ("trials.parquet", "config.yaml"):
        shutil.copy(src / name, tmp_path / name)
    select_dir(tmp_path, defaults={"levels": 3, "min_gap": 0.05, "max_locked_acc": None, "experiment": "quickstart"})
    assert (tmp_path / "levels.json").read_bytes() == (src / "levels.json").read_bytes()


def test_thief_rows_never_become_levels_even_when_they_are_the_best_rows():
    # a thief row at 0.99 would be "level 1" if it were a candidate; it is the best thief instead, and no level beats it
    with pytest.raises(GradauthError, match="best thief"):
        select_levels(table(levels_table() + [thief(1.0, 0.99, 0.08, prun_acc=0.1)]), levels=1, min_gap=0.05)


# ---- schema ----------------------------------------------------------------------------------------------------

def _write(rows: list[dict], path: Path, phase: list | None = None) -> Path:
    t = pa.Table.from_pandas(table(rows), schema=pa.schema(TRIAL_COLUMNS), preserve_index=False)
    if phase is not None:
        t = t.append_column("phase", pa.array(phase, pa.string()))
    pq.write_table(t, path)
    return path


def _write_init(rows, path, init):
    t = pa.Table.from_pandas(table(rows), schema=pa.schema(TRIAL_COLUMNS), preserve_index=False)
    pq.write_table(t.append_column("thief_init", pa.array(init, pa.string())), path)
    return path


def test_the_released_and_the_revived_thief_are_two_thieves_and_the_better_one_counts(tmp_path):
    released = thief(0.05, 0.55, 0.08)
    revived = released | {"trial_id": released["trial_id"] + "-revive", "fine_acc": 0.66}
    rows = levels_table() + [thief(0.05, 0.60), released, revived]
    df = read_trials(_write_init(rows, tmp_path / "t.parquet", [None] * 8 + ["none", "none", "revive"]))
    s = select_levels(df, levels=2, min_gap=0.05)
    assert s.thief["best_acc"] == pytest.approx(0.66) and s.thief["best"]["label"].startswith(
        "public bn_gamma rate 8%, revived")
    assert s.thief["by_fraction"] == [{"fraction": 0.05, "public": 0.66, "scratch": 0.6, "head_start": 0.06}]
    assert sorted(g["thief_init"] for g in s.thief["groups"]) == ["none", "none", "revive"]
    assert choose_public(df, 0.2)["worst_head_start"] == pytest.approx(0.06)   # the better form counts
    for init, match in (([None] * 8 + ["none", "none", "x"], "unknown thief_init x"),
                        (["revive"] + [None] * 7 + ["none", "none", "revive"], "thief_init but are not thief")):
        with pytest.raises(GradauthError, match=match):
            read_trials(_write_init(rows, tmp_path / "bad.parquet", init))


def test_a_thief_and_a_level_trial_may_share_a_grid_point(tmp_path):
    lvl = trial(0.08, 0.7, epochs=30, data_fraction=0.05)
    rows = [lvl, thief(0.05, 0.6, 0.08)]
    df = read_trials(_write(rows, tmp_path / "t.parquet", ["level", "thief"]))
    assert thief_rows(df).tolist() == [False, True]
    with pytest.raises(GradauthError, match="same grid point"):
        read_trials(_write([lvl, lvl | {"trial_id": "other"}], tmp_path / "t2.parquet"))


@pytest.mark.parametrize("rows, phase, match", [
    ([thief(0.05, 0.6, 0.08)], ["level"], "phase and trial_id that disagree"),
    ([trial(0.08, 0.6)], ["thief"], "phase and trial_id that disagree"),
    ([thief(0.05, 0.6)], ["attack"], "unknown phase attack"),
    ([thief(0.05, 0.6) | {"trial_id": "scratch-x"}], None, "importance scratch but are not thief trials"),
    ([thief(0.05, 0.6) | {"lock_mode": "rate"}], None, "carry a lock"),
])
def test_inconsistent_thief_rows_are_refused_in_one_line(tmp_path, rows, phase, match):
    with pytest.raises(GradauthError, match=match) as e:
        read_trials(_write(rows, tmp_path / "t.parquet", phase))
    assert "\n" not in str(e.value) and "gradauth sweep" in str(e.value)


# ---- the public lock -------------------------------------------------------------------------------------------

def _public_case() -> pd.DataFrame:
    scratch = [thief(0.01, 0.30), thief(0.05, 0.50), thief(0.05, 0.52, seed=1)]
    strong = [thief(0.01, 0.40, 0.10, 0.08), thief(0.05, 0.62, 0.10, 0.08)]       # head start +0.09 / +0.11
    closest = [thief(0.01, 0.33, 0.06, 0.12), thief(0.05, 0.52, 0.06, 0.12)]      # +0.03 / +0.01
    no_lock = [thief(0.01, 0.20, 0.02, 0.60), thief(0.05, 0.40, 0.02, 0.60)]      # below scratch, but unlocked
    partial = [thief(0.01, 0.10, 0.12, 0.09)]                                     # 5 % never measured
    return table(levels_table() + scratch + strong + closest + no_lock + partial)


def test_the_public_lock_is_the_one_closest_to_scratch_under_the_bound():
    c = choose_public(_public_case(), bound=0.2)
    assert c["chosen_by"] == "thief" and (c["lock_mode"], c["lock_value"]) == ("rate", 0.06)
    assert c["worst_head_start"] == pytest.approx(0.03) and c["prun_acc"] == pytest.approx(0.12)
    assert c["by_fraction"] == [{"fraction": 0.01, "public": 0.33, "scratch": 0.3, "head_start": 0.03},
                                {"fraction": 0.05, "public": 0.52, "scratch": 0.51, "head_start": 0.01}]
    assert sorted(x["lock_value"] for x in c["candidates"]) == [0.06, 0.1]
    assert any("rate 2%: locked accuracy 0.600 above the lock bound" in s for s in c["skipped"])
    assert any("rate 12%: no thief trial at 5%" in s for s in c["skipped"])
    # a tighter bound leaves only the strong lock
    assert choose_public(_public_case(), bound=0.1)["lock_value"] == 0.1


def test_without_thief_rows_the_public_lock_is_the_union_of_the_levels():
    c = choose_public(table(levels_table()), bound=0.2)
    assert c["chosen_by"] == "levels_union" and c["why"].startswith("no thief trials")
    only_public = table(levels_table() + [thief(0.05, 0.6, 0.08)])
    assert "from-scratch" in choose_public(only_public, bound=0.2)["why"]


# ---- end to end on a tiny run ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def thief_run(tiny_sweep, tmp_path_factory):
    """A tiny sweep (3 locks, 2 seeds, 3 epochs) plus real thief trials as the search runs them (search_trial):
    from scratch and from the public model at two of the levels' locks, on 5 % and 10 % of the labels."""
    import torch
    from gradauth.pipeline import read_config, trial_context
    from gradauth.search import search_trial
    from gradauth.sweep import write_trials as write_rows
    from gradauth.trial import TrialSpec, spec_to_dict
    from conftest import copy_of
    out = copy_of(tiny_sweep, tmp_path_factory.mktemp("thief") / "run")  # the shared sweep: 3 locks × 2 seeds
    shutil.copytree(out, out.parent / "plain")  # the same run before any thief trial
    ctx = trial_context(read_config(out), out)
    rows = read_trials(out / "trials.parquet").to_dict("records")
    for f in (0.05, 0.1):
        for imp, mode, v in [("scratch", "none", 0.0), ("bn_gamma", "rate", 0.3), ("bn_gamma", "rate", 0.4)]:
            spec = TrialSpec(imp, mode, v, 40, 0.05, f, "all", 0)
            row, _, _ = search_trial(ctx, {"phase": "thief", "trial": spec_to_dict(spec)}, torch.device("cpu"))
            rows.append(row)
    write_rows(rows, out / "trials.parquet")
    return out


def test_end_to_end_select_release_report_attack_with_thief_trials(thief_run, capsys):
    import io
    import contextlib
    from gradauth import release as rel
    from gradauth.checkpoint import from_bytes, load_model_file, rebuild
    from gradauth.data import load_dataset
    from gradauth.pipeline import read_config
    from gradauth.report import write_report
    out = thief_run
    trials = read_trials(out / "trials.parquet")
    th = trials[thief_rows(trials)]
    assert len(th) == 6 and th["status"].eq("ok").all()
    best = float(th["fine_acc"].max())
    # select: a level sells only min_gap above the best thief (on digits a thief with 10 % of the labels gets close
    # to level 1, so min_gap is set around the real margin), and levels.json says by how much
    lv_rows = trials[~thief_rows(trials) & (trials["status"] == "ok") & (trials["prun_acc"] <= 0.2)]
    top = float(lv_rows.groupby(["lock_value", "ft_epochs"])["fine_acc"].mean().max())
    margin = top - best
    assert margin > 0.01, (top, best)
    before = (out / "levels.json").read_bytes()
    with pytest.raises(GradauthError, match="best thief"):
        select_dir(out, levels=1, min_gap=margin + 0.005)
    assert (out / "levels.json").read_bytes() == before  # nothing half-written
    select_dir(out, levels=1, min_gap=margin - 0.005)
    doc = json.loads((out / "levels.json").read_text())
    assert doc["thief"]["best_acc"] == pytest.approx(best, abs=1e-6)
    assert doc["levels"][0]["fine_acc"] == pytest.approx(top, abs=1e-6)
    assert doc["levels"][0]["thief_margin"] == pytest.approx(margin, abs=1e-6)
    assert not set(th["trial_id"]) & {t for lv in doc["levels"] for t in lv["trial_ids"]}
    assert "over best thief" in capsys.readouterr().out
    # release: the public lock is the thief-chosen one, the model is what the thief trials started from
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        final = rel.release_dir(out)
    manifest = json.loads((final / "manifest.json").read_text())
    lk = manifest["locked"]
    cfg = read_config(out)
    choice = choose_public(trials, 0.2)
    assert lk["chosen_by"] == "thief" and (lk["lock_mode"], lk["lock_value"]) == ("rate", choice["lock_value"])
    started = th[(th["importance"] == "bn_gamma") & (th["lock_value"] == choice["lock_value"])]["prun_acc"]
    assert lk["test_acc"] == pytest.approx(float(started.iloc[0]), abs=1e-9) and lk["test_acc"] <= 0.2
    assert lk["locked_channels"] == int(started.index.map(lambda i: trials.loc[i, "locked_channels"])[0])
    assert manifest["thief"]["by_fraction"] == choice["by_fraction"]
    assert [r["fraction"] for r in manifest["thief"]["by_fraction"]] == [0.05, 0.1]
    # the level packs are today's: each opens to the compacted model of the sweep's seed trial
    keys = dict(__import__("re").findall(r"^level (\d+) .* key (\S+)$", printed.getvalue(), __import__("re").M))
    ds = load_dataset(cfg.data, cfg.seed)
    for lv, row, path in rel.chosen_trials(out, doc):
        plain, _ = rel._level_pack(lv, row, path, ds, doc["experiment"])
        got = from_bytes(rel.unlock_bytes(final, lv["level"], keys[str(lv["level"])]), "pack")
        want = from_bytes(plain, "today's pack")
        assert got.keys() == want.keys()
        a, b = rebuild(got)[0].state_dict(), rebuild(want)[0].state_dict()
        assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)
    # report: the sellable column, the thief table and its plot
    md = write_report(out).read_text()
    assert "Sellable (over best thief)" in md and "| yes (+" in md and "## Thieves" in md
    assert (out / "plots" / "thieves.png").stat().st_size > 1000
    # attack: the thief starts from the released (thief-chosen) lock, and from scratch (the fine-tuning runs and the
    # per-fraction head-start table are tested in test_attack.py; here only which models are attacked)
    from gradauth.attack import targets
    found, public = targets(out, cfg, ds, compare=False)
    assert (public["lock_mode"], public["lock_value"], public["chosen_by"]) == ("rate", choice["lock_value"], "thief")
    assert public["locked_channels"] == lk["locked_channels"] and public["prun_acc"] == lk["test_acc"]
    assert {t.target for t in found} == {"public", "scratch"}


def test_without_thief_trials_release_locks_the_union_and_says_so(thief_run):
    import contextlib
    import io
    from gradauth import release as rel
    plain = thief_run.parent / "plain"
    with contextlib.redirect_stdout(io.StringIO()):
        final = rel.release_dir(plain)
    m = json.loads((final / "manifest.json").read_text())
    assert m["thief"] is None and m["locked"]["chosen_by"] == "levels_union"
    assert m["locked"]["why"] == "no thief trials in trials.parquet: the union of the levels' locks"
    assert (m["locked"]["lock_mode"], m["locked"]["lock_value"]) == ("rate", 0.4)
    assert m["locked"]["locked_channels"] == max(lv["locked_channels"] for lv in m["levels"])


def torch_equal(a, b) -> bool:
    import torch
    return torch.equal(a, b)


def test_cli_select_refuses_in_one_line_when_the_thief_leaves_too_few_levels(tmp_path, capsys):
    from gradauth.cli import main
    write_trials(table(levels_table() + thieves()), tmp_path / "trials.parquet")
    assert main(["select", str(tmp_path), "--levels", "3", "--min-gap", "0.05"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "has no config.yaml" not in ln]  # bare-select note
    assert len(err) == 1 and "best thief (0.720" in err[0] and "--levels" in err[0]
    assert not (tmp_path / "levels.json").exists()
    assert main(["select", str(tmp_path), "--levels", "2", "--min-gap", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "over best thief" in out and "+0.230" in out and "best thief without a key: 0.720" in out
