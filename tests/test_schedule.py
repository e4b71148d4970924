"""One Schedule and one LockSpec (gradauth/knobs.py): columns, grouping keys, labels, trial ids and the grid derived
from their fields; trial ids exact for any float; `attack` using the whole best schedule."""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pytest

from gradauth import attack, knobs, report, schema, select
from gradauth.config import load_config, parse_config
from gradauth.knobs import LockSpec, Schedule
from gradauth.trial import TrialSpec, base_row, grid
from paper_table import seeds, table, write_trials

ROOT = Path(__file__).resolve().parents[1]

# trials.parquet as it was before the columns were derived: the derived contract must be exactly this
OLD_COLUMNS = {
    "trial_id": pa.string(), "dataset": pa.string(), "arch": pa.string(), "num_classes": pa.int64(),
    "importance": pa.string(), "lock_mode": pa.string(), "lock_value": pa.float64(),
    "locked_channels": pa.int64(), "total_channels": pa.int64(),
    "ft_epochs": pa.int64(), "ft_lr": pa.float64(), "ft_data_fraction": pa.float64(), "ft_scope": pa.string(),
    "seed": pa.int64(), "base_acc": pa.float64(), "prun_acc": pa.float64(), "fine_acc": pa.float64(),
    "fine_top3": pa.float64(), "params": pa.int64(), "flops": pa.int64(), "status": pa.string(),
    "seconds": pa.float64(), "git_sha": pa.string(), "config_hash": pa.string(),
}


# Knobs added since (knobs.py, `id_always` False: left out of trial ids at their default), where they sit in the file.
LATER = {"lock_granularity": pa.string()}
TODAYS_COLUMNS = dict(list(OLD_COLUMNS.items())[:7] + list(LATER.items()) + list(OLD_COLUMNS.items())[7:])


def old_id(t) -> str:
    """The trial id as it was spelled before ids became exact (`:g` everywhere)."""
    return (f"{t.importance}-{t.lock_mode}{t.lock_value:g}-e{t.epochs}-lr{t.lr:g}-f{t.data_fraction:g}-{t.scope}"
            f"-s{t.seed}")


def test_derived_contract_is_todays():
    assert list(schema.TRIAL_COLUMNS.items()) == list(TODAYS_COLUMNS.items())
    assert schema.GRID == ("importance", "lock_mode", "lock_value", "lock_granularity", "ft_epochs", "ft_lr",
                           "ft_data_fraction", "ft_scope", "seed")
    assert select.GROUP == ["importance", "lock_mode", "lock_value", "lock_granularity", "ft_epochs", "ft_lr",
                            "ft_data_fraction", "ft_scope"]
    assert report.SCHEDULE == ["ft_epochs", "ft_lr", "ft_data_fraction", "ft_scope"]
    assert list(report.KNOBS.values()) == ["fine-tune epochs", "learning rate", "fraction of the training data",
                                           "parameters trained"]
    assert [f.name for f in dataclasses.fields(TrialSpec)] == ["importance", "lock_mode", "lock_value", "epochs", "lr",
                                                               "data_fraction", "scope", "seed", "lock_granularity"]
    s = Schedule(8, 0.005, 1.0, "all", 3)
    assert s.label == "8 ep, lr 0.005, 100% data, all" == select.schedule_label(knobs.schedule_dict(s))
    assert knobs.schedule_dict(s) == {"epochs": 8, "lr": 0.005, "data_fraction": 1.0, "scope": "all"}
    assert LockSpec("bn_gamma", "rate", 0.15).label == "rate 15%" and select.lock_label("threshold", 0.5) == \
        "threshold 0.5"


def test_trial_carries_one_lock_and_one_schedule():
    lock, sched = LockSpec("slice[3,5]", "threshold", 0.25), Schedule(4, 0.02, 0.5, "bn", 7)
    t = TrialSpec.of(lock, sched)
    assert t.lock == lock and t.schedule == sched
    assert t == TrialSpec("slice[3,5]", "threshold", 0.25, 4, 0.02, 0.5, "bn", 7) == TrialSpec(**dataclasses.asdict(t))
    assert t.trial_id == "slice[3,5]-threshold0.25-e4-lr0.02-f0.5-bn-s7" == old_id(t)
    ctx = SimpleNamespace(ds=SimpleNamespace(name="digits", num_classes=10), spec=SimpleNamespace(arch="vgg_tiny"),
                          base_acc=0.9, provenance={"git_sha": "x", "config_hash": "y"})
    row = base_row(ctx, t)
    assert [c for c in TODAYS_COLUMNS if c in row] == list(row)  # in contract order
    assert {k: row[k] for k in schema.GRID} == {"importance": "slice[3,5]", "lock_mode": "threshold",
                                                 "lock_value": 0.25, "lock_granularity": "channel", "ft_epochs": 4, "ft_lr": 0.02,
                                                 "ft_data_fraction": 0.5, "ft_scope": "bn", "seed": 7}
    assert knobs.from_row(Schedule, row) == sched and knobs.from_row(LockSpec, row) == lock


def test_grid_is_the_product_of_the_knob_lists_in_todays_order(tiny_cfg):
    cfg = parse_config({"lock": {"values": [0.1, 0.2]}, "importance": ["bn_gamma", "slice"],
                        "finetune": {"epochs": [1, 2], "lr": [0.01, 0.1], "data_fraction": [0.5, 1.0],
                                     "scope": ["all", "bn"], "seeds": [0, 1]}})
    ft = cfg.finetune
    want = [(imp.label, cfg.lock.mode, v, e, lr, f, s, seed, "channel") for imp in cfg.importance for v in cfg.lock.values
            for e in ft.epochs for lr in ft.lr for f in ft.data_fraction for s in ft.scope for seed in ft.seeds]
    assert [dataclasses.astuple(t) for t in grid(cfg)] == want and len(want) == 128


def test_trial_ids_are_exact_for_any_float():
    a = TrialSpec("bn_gamma", "rate", 0.07123451, 3, 0.01, 1.0, "all", 0)
    b = TrialSpec("bn_gamma", "rate", 0.07123449, 3, 0.01, 1.0, "all", 0)
    assert old_id(a) == old_id(b)  # what `:g` did: one model file for two trials
    assert a.trial_id == "bn_gamma-rate0.07123451-e3-lr0.01-f1-all-s0"
    assert b.trial_id == "bn_gamma-rate0.07123449-e3-lr0.01-f1-all-s0"
    for x, y in [(0.1, 0.1 + 2 ** -56), (1e-4, 1.0000001e-4), (0.5, 0.5000000000000001), (0.0, -0.0)]:
        assert x != y or str(x) != str(y)
        ids = {TrialSpec("bn_gamma", "rate", x, 3, y, 1.0, "all", 0).trial_id,
               TrialSpec("bn_gamma", "rate", y, 3, x, 1.0, "all", 0).trial_id,
               TrialSpec("bn_gamma", "rate", x, 3, x, y, "all", 0).trial_id}
        assert len(ids) == 3
    for v in (0.07123451, 0.1 + 2 ** -56, 1e-4, 1 / 3, 2.5e-7, 123456789.0):  # the written value reads back exactly
        assert float(knobs.num(v)) == v


@pytest.mark.parametrize("config", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_keep_their_readable_ids(config):
    specs = grid(load_config(config))
    # a synapse lock (lock.granularity, added later) adds its token after the lock; channel ids are the old ones
    want = [old_id(t) if t.lock_granularity == "channel" else old_id(t).replace("-e", "-synapse-e", 1) for t in specs]
    assert [t.trial_id for t in specs] == want and len({t.trial_id for t in specs}) == len(specs)


def test_committed_results_keep_their_ids_and_model_names():
    checked = 0
    for path in sorted((ROOT / "results").glob("*/trials.parquet")):
        df = pd.read_parquet(path)
        for r in df.to_dict("records"):
            t = TrialSpec.of(knobs.from_row(LockSpec, r), knobs.from_row(Schedule, r))
            if r.get("phase") == "thief":   # a thief attack: `thief-<id>`, `-revive` for the revived start
                revived = r.get("thief_init") == "revive"
                assert r["trial_id"] == f"thief-{t.trial_id}" + ("-revive" if revived else "")
            else:
                assert t.trial_id == r["trial_id"]
            checked += 1
        models = path.parent / "models"
        if models.is_dir():
            assert {p.stem for p in models.glob("*.pt")} <= set(df["trial_id"])
    assert checked >= 36


def test_attack_uses_the_whole_best_schedule(tmp_path):
    # two schedules for the public lock; the better one fine-tunes BN only on half the data
    rows = seeds(0.80, lock_value=0.1, epochs=4, lr=0.05, data_fraction=1.0, scope="all") + \
        seeds(0.85, lock_value=0.1, epochs=4, lr=0.05, data_fraction=0.5, scope="bn") + \
        seeds(0.95, lock_value=0.2, epochs=9, lr=0.1, data_fraction=1.0, scope="head")  # another lock: ignored
    write_trials(table(rows), tmp_path / "trials.parquet")
    best = attack.best_schedule(tmp_path, "bn_gamma", "rate", 0.1)
    assert best == Schedule(4, 0.05, 0.5, "bn", 0)
    n, batch = 1000, 50
    scheds = dict(attack.schedules(best, 0.1, n, batch))
    assert scheds["best"] == Schedule(4, 0.05, 0.1, "bn", 0)  # the thief's slice, the rest as swept
    # strong: as many steps as best takes on its own 500 images (10 per epoch), the thief having 2 per epoch
    assert scheds["strong"] == Schedule(20, 0.05, 0.1, "bn", 0)
    target = SimpleNamespace(schedules=("best", "strong"), masks={"m": None}, init="zeros", filters="erased",
                             thief_init="none")
    owner = [r for r in attack.runs(target, best, (0.1,), n, batch) if r[1] == "owner"]
    assert owner == [(0.5, "owner", best, {"m": None})]  # the owner's run is the level's schedule, as swept


KNOB_TEST = r'''
import json, sys
import pandas as pd
from pathlib import Path
from gradauth import knobs, report, schema, select, attack, status
from gradauth.errors import GradauthError
from gradauth.knobs import Schedule
from gradauth.trial import TrialSpec, grid
from gradauth.config import parse_config
sys.path.insert(0, sys.argv[1])
from paper_table import seeds, table, write_trials

assert "ft_smoothing" in schema.TRIAL_COLUMNS and str(schema.TRIAL_COLUMNS["ft_smoothing"]) == "double"
cols = list(schema.TRIAL_COLUMNS)
assert cols[cols.index("seed"):cols.index("seed") + 2] == ["seed", "ft_smoothing"]
assert "ft_smoothing" in select.GROUP and "ft_smoothing" in schema.GRID and report.KNOBS["ft_smoothing"] == "label smoothing"
t = TrialSpec("bn_gamma", "rate", 0.1, 3, 0.01, 1.0, "all", 0)
assert t.smoothing == 0.0 and t.trial_id == "bn_gamma-rate0.1-e3-lr0.01-f1-all-s0"  # default: today's id
m = TrialSpec("bn_gamma", "rate", 0.1, 3, 0.01, 1.0, "all", 0, smoothing=0.1)
assert m.trial_id == "bn_gamma-rate0.1-e3-lr0.01-f1-all-ls0.1-s0" and m.schedule.smoothing == 0.1
assert m.schedule.label == "3 ep, lr 0.01, 100% data, all, smoothing 0.1" and t.schedule.label == "3 ep, lr 0.01, 100% data, all"
cfg = parse_config({"finetune": {"epochs": [3], "seeds": [0, 1]}})  # no smoothing list: the default, same ids
assert [s.trial_id for s in grid(cfg)] == ["bn_gamma-rate0.1-e3-lr0.01-f1-all-s0", "bn_gamma-rate0.1-e3-lr0.01-f1-all-s1"]
# the config: a finetune.smoothing list, swept and checked by the knob's rule
cfg = parse_config({"finetune": {"epochs": [3], "smoothing": [0.0, 0.1]}})
assert [s.trial_id for s in grid(cfg)] == ["bn_gamma-rate0.1-e3-lr0.01-f1-all-s0", "bn_gamma-rate0.1-e3-lr0.01-f1-all-ls0.1-s0"]
from gradauth.config import ProgressView
assert status._grid_size(ProgressView(cfg.name, 1, cfg.lock, cfg.finetune, cfg.select, cfg.search)) == 2
try:
    parse_config({"finetune": {"smoothing": [1.5]}})
    raise SystemExit("smoothing 1.5 accepted")
except GradauthError as e:
    assert "`finetune.smoothing` entry must be in [0, 1), got 1.5" in str(e), e
# select: two smoothing values of one lock and schedule are two candidates, each labelled with its smoothing
rows = seeds(0.90, lock_value=0.1) + seeds(0.80, lock_value=0.1)
df = table(rows)
df["ft_smoothing"] = [0.0] * 3 + [0.1] * 3
df["trial_id"] = [TrialSpec("bn_gamma", "rate", 0.1, 40, 0.01, 1.0, "all", s, smoothing=mo).trial_id
                  for s, mo in zip(df["seed"], df["ft_smoothing"])]
sel = select.select_levels(df, levels=2, max_locked_acc=0.2)
assert [lv["schedule"].get("smoothing") for lv in sel.levels] == [0.0, 0.1], sel.levels
assert [lv["fine_acc"] for lv in sel.levels] == [0.9, 0.8]
print(select.format_table(sel))
out = Path(sys.argv[2])
write_trials(df, out / "trials.parquet")
select.select_dir(out, levels=2, max_locked_acc=0.2)  # levels.json written and read back through its validator
doc = schema.read_levels(out / "levels.json", schema.read_trials(out / "trials.parquet"))
assert [lv["schedule"]["smoothing"] for lv in doc["levels"]] == [0.0, 0.1]
assert attack.best_schedule(out, "bn_gamma", "rate", 0.1).smoothing == 0.0
df.loc[:2, "fine_acc"] = 0.7
write_trials(df, out / "trials.parquet")
best = attack.best_schedule(out, "bn_gamma", "rate", 0.1)
assert best.smoothing == 0.1 and all(s.smoothing == 0.1 for _, s in attack.schedules(best, 0.1, 1000, 50))
# an older trials.parquet, without the column: every row at the default, selected as before
old = table(seeds(0.90, lock_value=0.1) + seeds(0.80, lock_value=0.2)).drop(columns=["ft_smoothing"])
levels = select.select_levels(old, levels=2, max_locked_acc=0.2).levels
assert [lv["schedule"]["smoothing"] for lv in levels] == [0.0, 0.0]
print("KNOB OK")
'''


@pytest.mark.subprocess
def test_a_knob_added_in_one_place_flows_to_columns_grouping_labels_ids_and_attack(tmp_path):
    """Copy the package, add ONE field to Schedule (nothing else edited), and check in a fresh interpreter that the
    new knob is a checked `finetune.<name>` config list, a grid axis, a trials.parquet column, a grouping key of
    select, a label in select's table and the report's plot axis, a trial id part (absent at its default, so
    existing ids hold), a TrialSpec field, a levels.json schedule key and part of attack's schedule."""
    pkg = tmp_path / "gradauth"
    shutil.copytree(ROOT / "gradauth", pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so", "build"))
    src = (pkg / "knobs.py").read_text()
    anchor = '    seed: int = knob(0, column="seed", kind="int", id="s", id_always=True, group=False, config="seeds")\n'
    assert src.count(anchor) == 1
    added = ('    smoothing: float = knob(0.0, column="ft_smoothing", kind="float", label="smoothing {}", '
             'title="label smoothing", id="ls", config="smoothing", rule={"lo": 0, "hi": 1, "hi_open": True})\n')
    (pkg / "knobs.py").write_text(src.replace(anchor, anchor + added))
    (tmp_path / "script.py").write_text(KNOB_TEST)
    (tmp_path / "out").mkdir()
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(ROOT / "tests"), str(tmp_path / "out")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "KNOB OK" in r.stdout, r.stdout + r.stderr
    assert "40 ep, lr 0.01, 100% data, all, smoothing 0.1" in r.stdout  # select's table labels the new knob


def test_every_knob_has_its_finetune_list():
    from gradauth.config import FinetuneConfig
    lists = {f.name: f.metadata["rule"] for f in dataclasses.fields(FinetuneConfig)}
    for f, m in knobs.knobs(Schedule):
        assert m["config"] in lists and lists[m["config"]].many and lists[m["config"]].kind == m["kind"], f.name
    assert [m["config"] for _, m in knobs.knobs(Schedule)] == ["epochs", "lr", "data_fraction", "scope", "seeds"]
