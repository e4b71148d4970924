"""Files are verified, nothing stale is mixed in, select works on a bare trials.parquet.

The damaged-file corpus starts from the committed quickstart reference (results/quickstart: base.pt, trials.parquet,
levels.json, config.yaml), so no test here trains anything: every bad file must give one line and exit 2 from every
command that reads it, with nothing written (levels.json, release/, report.md and plots/ as they were).
"""
import io
import json
import math
import shutil
import struct
import zipfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gradauth.attack import META_KEY, derived_from, md_stamp, read_derived
from gradauth.checkpoint import FORMAT, checksum, from_bytes, load_model_file
from gradauth.cli import main
from gradauth.config import parse_config
from gradauth.pipeline import out_dir_for
from gradauth.schema import TRIAL_COLUMNS, file_sha256

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "results" / "quickstart"
CONFIG = str(ROOT / "sweeps" / "quickstart.yaml")


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.err.strip()


def _one_line_exit_2(capsys, *argv, needle=None):
    code, err = _cli(capsys, *argv)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    if needle:
        assert needle in err, err
    return err


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def ref(tmp_path):
    """A copy of the committed quickstart reference, plus a report.md and plots/ to check nothing is rewritten."""
    d = tmp_path / "quickstart"
    d.mkdir()
    for name in ("base.pt", "trials.parquet", "levels.json", "config.yaml"):
        shutil.copy(REF / name, d / name)
    (d / "plots").mkdir()
    (d / "plots" / "acc_vs_lock.png").write_bytes(b"old plot")
    (d / "report.md").write_text("old report\n")
    return d


# ---- model files ---------------------------------------------------------------------------------------------------

def _member_offsets(data: bytes) -> dict:
    """name → (start, size) of each stored member's bytes in a torch.save zip."""
    out = {}
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
            out[info.filename] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


def test_committed_base_models_load_in_the_checksummed_format():
    for path in sorted((ROOT / "results").glob("*/base.pt")):
        obj = load_model_file(path)
        assert obj["format"] == FORMAT == "gradauth-model/2" and obj["checksum"] == checksum(obj)


def test_a_flipped_byte_anywhere_in_base_pt_is_refused(tmp_path, capsys):
    data = (REF / "base.pt").read_bytes()
    members = _member_offsets(data)
    pkl = next(n for n in members if n.endswith("data.pkl"))
    tensors = sorted((n for n in members if "/data/" in n), key=lambda n: members[n][1])
    # content: the pickle (spec, names, dtypes, shapes), the smallest and largest tensors' bytes, a middle one
    content = {f"{n}+{k}": members[n][0] + k for n in (tensors[0], tensors[len(tensors) // 2], tensors[-1])
               for k in (0, members[n][1] // 2, members[n][1] - 1)}
    content |= {f"{pkl}+{k}": members[pkl][0] + k for k in (10, members[pkl][1] // 2)}
    container = {"zip header": 0, "central directory": len(data) - 30}
    bad = tmp_path / "base.pt"
    for where, off in (content | container).items():
        flipped = bytearray(data)
        flipped[off] ^= 0x10
        bad.write_bytes(bytes(flipped))
        err = _one_line_exit_2(capsys, "evaluate", bad, "--config", CONFIG)
        assert "regenerate it" in err, (where, err)
        if where in content and "/data/" in where:  # tensor bytes: only the checksum can tell
            assert "does not match its sha256 checksum" in err, (where, err)
    bad.write_bytes(data[: len(data) // 2])  # truncated
    _one_line_exit_2(capsys, "evaluate", bad, "--config", CONFIG, needle="not a readable gradauth model file")
    bad.write_bytes(b"")
    _one_line_exit_2(capsys, "evaluate", bad, "--config", CONFIG, needle="not a readable gradauth model file")
    shutil.copy(REF / "base.pt", bad)  # the control: the intact copy evaluates
    assert main(["evaluate", str(bad), "--config", CONFIG]) == 0


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_spec_less_legacy_and_malformed_model_files(tmp_path, capsys):
    good = load_model_file(REF / "base.pt")
    cases = {
        "no spec": ({k: v for k, v in good.items() if k != "spec"}, "no model spec"),
        "spec missing a field": (good | {"spec": {k: v for k, v in good["spec"].items() if k != "arch"}},
                                 "lacks or mistypes arch"),
        "spec with text for a number": (good | {"spec": good["spec"] | {"num_classes": "10"}}, "num_classes"),
        "no checksum": ({k: v for k, v in good.items() if k != "checksum"}, "no checksum"),
        "weights not tensors": (good | {"state_dict": {"w": 1.0}}, "not a dict of named tensors"),
        "one weight changed, old checksum": (
            good | {"state_dict": good["state_dict"] | {"features.0.weight": good["state_dict"]["features.0.weight"] + 1}},
            "does not match its sha256 checksum"),
        "legacy format 1": ({k: v for k, v in good.items() if k != "checksum"} | {"format": "gradauth-model/1"},
                            "older format without a checksum"),
        "not a dict": ([1, 2, 3], "not a gradauth model file"),
    }
    assert "features.0.weight" in good["state_dict"]
    path = tmp_path / "m.pt"
    for name, (obj, needle) in cases.items():
        path.write_bytes(_saved(obj))
        err = _one_line_exit_2(capsys, "evaluate", path, "--config", CONFIG, needle=needle)
        if name == "legacy format 1":
            assert "gradauth train CONFIG" in err  # says how to regenerate it
    # a file re-saved from the same tensors with a fresh checksum loads (the checksum is over content, not bytes)
    path.write_bytes(_saved(good | {"checksum": checksum(good)}))
    assert from_bytes(path.read_bytes())["checksum"] == good["checksum"]


# ---- trials.parquet ------------------------------------------------------------------------------------------------

def _trials() -> pd.DataFrame:
    """The committed quickstart rows, with a knob column added after they were made at its default (as readers do)."""
    from gradauth.knobs import LockSpec, Schedule, fill_defaults
    return fill_defaults(fill_defaults(pd.read_parquet(REF / "trials.parquet"), LockSpec), Schedule)


def _write(df: pd.DataFrame, path: Path, schema: pa.Schema | None = None) -> None:
    pq.write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False), path)


def _ok_index(df):
    return df.index[df["status"] == "ok"][0]


def _damaged_trials():
    """name → (write(path), what the one line must say)."""
    contract = pa.schema(TRIAL_COLUMNS)

    def with_(edit, schema=contract):
        def write(path):
            df = _trials()
            df = edit(df) if edit else df
            _write(df, path, schema)
        return write

    def set_(col, value, where=_ok_index):
        def edit(df):
            df.loc[where(df), col] = value
            return df
        return edit

    def text_in(col):
        def write(path):
            df = _trials()
            df[col] = df[col].astype(str)
            _write(df, path)
        return write

    def dup_id(df):
        df.loc[1, "trial_id"] = df.loc[0, "trial_id"]
        return df

    return {
        "empty": (with_(lambda df: df.iloc[:0]), "no rows"),
        "NaN fine_acc in an ok row": (with_(set_("fine_acc", math.nan)), "fine_acc is NaN/missing"),
        "null prun_acc in an ok row": (with_(set_("prun_acc", None)), "prun_acc is NaN/missing"),
        "accuracy above 1": (with_(set_("fine_acc", 1.5)), "fine_acc outside [0, 1]"),
        "negative accuracy": (with_(set_("prun_acc", -0.1)), "prun_acc outside [0, 1]"),
        "infinite lr": (with_(set_("ft_lr", math.inf)), "ft_lr is infinite"),
        "text in fine_acc": (text_in("fine_acc"), "column(s) of the wrong type: fine_acc"),
        "text in seed": (text_in("seed"), "seed"),
        "unknown status": (with_(set_("status", "finished")), "unknown status finished"),
        "duplicated trial_id": (with_(dup_id), "duplicated trial_id"),
        "one grid point and seed twice": (with_(lambda df: pd.concat(
            [df, df.iloc[[0]].assign(trial_id="copy-of-0")], ignore_index=True)), "same grid point and seed"),
        "missing trial_id": (with_(set_("trial_id", None, lambda df: 0)), "without a trial_id"),
        "missing column": (lambda p: _write(_trials().drop(columns=["fine_acc"]), p), "lacks column(s) fine_acc"),
        "truncated": (lambda p: p.write_bytes((REF / "trials.parquet").read_bytes()[:500]), "not a readable Parquet"),
        "not parquet": (lambda p: p.write_text("trial_id,fine_acc\na,0.5\n"), "not a readable Parquet"),
    }


DAMAGED_TRIALS = _damaged_trials()


@pytest.mark.parametrize("name", list(DAMAGED_TRIALS))
def test_damaged_trials_parquet_is_one_line_for_every_reader(ref, capsys, name):
    write, needle = DAMAGED_TRIALS[name]
    write(ref / "trials.parquet")
    before = _snapshot(ref)
    for command in ("select", "report", "release"):
        err = _one_line_exit_2(capsys, command, ref, needle=needle)
        assert "trials.parquet" in err
    assert _snapshot(ref) == before  # no levels.json, release/, report.md or plot rewritten


def test_attack_validates_trials_before_it_trains(ref, capsys):
    DAMAGED_TRIALS["duplicated trial_id"][0](ref / "trials.parquet")
    before = _snapshot(ref)
    _one_line_exit_2(capsys, "attack", ref, needle="duplicated trial_id")
    assert _snapshot(ref) == before


def test_degenerate_status_is_accepted_and_not_selected(ref, capsys):
    df = _trials()
    ok = df["status"] == "ok"
    worst = df[ok]["fine_acc"].idxmin()
    df.loc[worst, "status"] = "degenerate"
    _write(df, ref / "trials.parquet", pa.schema(TRIAL_COLUMNS))
    code, _ = _cli(capsys, "select", ref)
    doc = json.loads((ref / "levels.json").read_text())
    assert code == 0 and all(df.loc[worst, "trial_id"] not in lv["trial_ids"] for lv in doc["levels"])
    assert any(r["trial_id"] == df.loc[worst, "trial_id"] and "degenerate" in r["why"] for r in doc["rejected"])


# ---- levels.json ---------------------------------------------------------------------------------------------------

def _levels() -> dict:
    return json.loads((REF / "levels.json").read_text())


def _lv(edit):
    doc = _levels()
    edit(doc)
    return json.dumps(doc)


DAMAGED_LEVELS = {
    "not json": ("{levels: [", "not valid UTF-8 JSON"),
    "not utf-8": (b"\xff\xfe{\x00}", "not valid UTF-8 JSON"),
    "a list": ("[1, 2, 3]", "not a JSON object"),
    "no levels": (_lv(lambda d: d.pop("levels")), "`levels` is not a non-empty list"),
    "empty levels": (_lv(lambda d: d.update(levels=[])), "`levels` is not a non-empty list"),
    "levels 1, 3, 3": (_lv(lambda d: d["levels"][1].update(level=3)), "levels 1..N expected"),
    "level as text": (_lv(lambda d: d["levels"][0].update(level="1")), "levels 1..N expected"),
    "out of order": (_lv(lambda d: d["levels"].reverse()), "levels 1..N expected"),
    "fine_acc as text": (_lv(lambda d: d["levels"][0].update(fine_acc="0.99")), "fine_acc must be an accuracy"),
    "fine_acc above 1": (_lv(lambda d: d["levels"][1].update(fine_acc=1.2)), "fine_acc must be an accuracy"),
    "fine_acc NaN": (_lv(lambda d: d["levels"][1].update(fine_acc=math.nan)), "fine_acc must be an accuracy"),
    "missing trial_ids": (_lv(lambda d: d["levels"][2].pop("trial_ids")), "level 3 lacks trial_ids"),
    "missing schedule": (_lv(lambda d: d["levels"][0].pop("schedule")), "level 1 lacks schedule"),
    "schedule without lr": (_lv(lambda d: d["levels"][0]["schedule"].pop("lr")), "schedule must be"),
    "trial ids from elsewhere": (_lv(lambda d: d["levels"][0].update(trial_ids=["not-a-trial-s0"])),
                                 "not in trials.parquet"),
    "method 3": (_lv(lambda d: d.update(method=3)), "method must be 1 or 2"),
    "rejected not a list": (_lv(lambda d: d.update(rejected="none")), "`rejected` is not a list"),
    "settings with text": (_lv(lambda d: d["settings"].update(max_locked_acc="0.2")), "`settings` is not"),
}


@pytest.mark.parametrize("name", list(DAMAGED_LEVELS))
def test_malformed_levels_json_is_one_line_for_every_reader(ref, capsys, name):
    text, needle = DAMAGED_LEVELS[name]
    path = ref / "levels.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = _snapshot(ref)
    for command in ("report", "release"):
        err = _one_line_exit_2(capsys, command, ref, needle=needle)
        assert "levels.json" in err
    assert _snapshot(ref) == before


def test_the_reference_copy_itself_reports(ref, capsys):
    """The control for the corpora: the undamaged copy reports, with the committed levels."""
    code, _ = _cli(capsys, "report", ref)
    md = (ref / "report.md").read_text()
    assert code == 0 and "## Levels (method 1" in md and "0.992 ± 0.001" in md and "stale" not in md


# ---- select on a bare trials.parquet -------------------------------------------------------------------------------

def test_select_on_a_bare_trials_parquet(tmp_path, capsys):
    d = tmp_path / "from-the-cluster"
    d.mkdir()
    shutil.copy(REF / "trials.parquet", d / "trials.parquet")  # no config.yaml, nothing else
    code, err = _cli(capsys, "select", d)
    assert code == 0 and "no config.yaml" in err
    doc, want = json.loads((d / "levels.json").read_text()), _levels()
    assert doc["experiment"] == "from-the-cluster"
    # digits: 10 classes → max_locked_acc 1/10 + 0.1, 3 levels, min_gap 0.05, as the quickstart config says too
    assert doc["settings"] == {"levels": 3, "min_gap": 0.05, "max_locked_acc": pytest.approx(0.2), "targets": None}
    assert doc["levels"] == want["levels"] and doc["trials_sha256"] == file_sha256(d / "trials.parquet")
    code, _ = _cli(capsys, "select", d, "--levels", "2")
    assert code == 0 and len(json.loads((d / "levels.json").read_text())["levels"]) == 2


# ---- no stale mixes ------------------------------------------------------------------------------------------------

def test_runs_go_to_runs_not_to_the_committed_results():
    cfg = parse_config({"name": "quickstart", "data": {"name": "digits"}, "model": {"arch": "vgg_tiny"},
                        "lock": {"mode": "rate", "values": [0.1]}, "finetune": {"epochs": [1], "lr": [0.01]}})
    assert out_dir_for(cfg, None) == Path("runs") / "quickstart"
    assert out_dir_for(cfg, "elsewhere") == Path("elsewhere")
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "/runs/" in ignored


def _stamp_attack(d: Path) -> dict:
    """attack.parquet/attack.md from the committed reference's numbers, stamped as `gradauth attack` stamps them."""
    derived = derived_from(d)
    table = pq.read_table(REF / "attack.parquet")
    pq.write_table(table.replace_schema_metadata((table.schema.metadata or {}) | {META_KEY: json.dumps(derived)}),
                   d / "attack.parquet")
    (d / "attack.md").write_text(md_stamp(derived) + "\n" + (REF / "attack.md").read_text())
    return derived


def test_levels_json_records_the_trials_it_came_from(ref, capsys):
    assert _cli(capsys, "select", ref)[0] == 0
    doc = json.loads((ref / "levels.json").read_text())
    assert doc["trials_sha256"] == file_sha256(ref / "trials.parquet")
    # trials.parquet rewritten (a resumed sweep): release refuses the old levels, report calls them stale
    df = _trials()
    df.loc[0, "seconds"] = df.loc[0, "seconds"] + 1
    _write(df, ref / "trials.parquet", pa.schema(TRIAL_COLUMNS))
    _one_line_exit_2(capsys, "release", ref, needle="selected from another version of trials.parquet")
    assert _cli(capsys, "report", ref)[0] == 0
    md = (ref / "report.md").read_text()
    assert "levels.json is stale: it was selected from another version of trials.parquet; run `gradauth select" in md
    assert "## Levels (method" not in md and "## Rejected trials" not in md


def test_stale_attack_section_is_detected(ref, capsys):
    derived = _stamp_attack(ref)
    assert read_derived(ref / "attack.parquet") == derived and derived["levels_sha256"] == file_sha256(ref / "levels.json")
    assert list(pd.read_parquet(ref / "attack.parquet").columns) == list(pd.read_parquet(REF / "attack.parquet").columns)
    assert _cli(capsys, "report", ref)[0] == 0
    md = (ref / "report.md").read_text()
    assert "## Attack: fine-tuning the public model without a key" in md and "stale" not in md
    assert "| public bn_gamma rate 0.15 (zeros) |" in md and "derived_from" not in md
    assert (ref / "plots" / "attack.png").is_file()

    # new levels (another min_gap): the attack no longer matches; its section is one stale line, its plot removed
    assert _cli(capsys, "select", ref, "--min-gap", "0.06")[0] == 0
    assert _cli(capsys, "report", ref)[0] == 0
    md = (ref / "report.md").read_text()
    stale = [ln for ln in md.splitlines() if "stale" in ln]
    assert stale == [f"The attack results are stale: it attacked another levels.json; run `gradauth attack {ref}` "
                     "to refresh them."]
    assert "| public bn_gamma rate 0.15 (zeros) |" not in md and not (ref / "plots" / "attack.png").exists()

    # current levels again, but the attack stamped for another release than the one now in release/
    shutil.copy(REF / "levels.json", ref / "levels.json")
    (ref / "release").mkdir()
    (ref / "release" / "manifest.json").write_text('{"release": 1}\n')
    _stamp_attack(ref)
    (ref / "release" / "manifest.json").write_text('{"release": 2}\n')
    assert _cli(capsys, "report", ref)[0] == 0
    assert "it attacked another release (release/manifest.json changed)" in (ref / "report.md").read_text()

    # attack.md edited apart from attack.parquet
    _stamp_attack(ref)
    (ref / "attack.md").write_text((REF / "attack.md").read_text())  # unstamped
    assert _cli(capsys, "report", ref)[0] == 0
    assert "attack.md does not match attack.parquet" in (ref / "report.md").read_text()


def test_an_unstamped_attack_is_stale_not_shown(ref, capsys):
    """The committed references' attack files predate the stamp: a report on them says so instead of embedding."""
    shutil.copy(REF / "attack.parquet", ref / "attack.parquet")
    shutil.copy(REF / "attack.md", ref / "attack.md")
    assert _cli(capsys, "report", ref)[0] == 0
    md = (ref / "report.md").read_text()
    assert "The attack results are stale: attack.parquet records no levels.json sha256 (an older attack)" in md
    assert "## Levels (method 1" in md


def test_a_damaged_attack_is_refused_before_any_plot(ref, capsys):
    _stamp_attack(ref)
    table = pq.read_table(ref / "attack.parquet")  # still stamped as current, but without a column it plots
    pq.write_table(table.drop_columns(["init"]).replace_schema_metadata(table.schema.metadata), ref / "attack.parquet")
    before = _snapshot(ref)
    _one_line_exit_2(capsys, "report", ref, needle="attack.parquet")
    assert _snapshot(ref) == before
    (ref / "attack.parquet").write_bytes(b"PAR1 damaged")
    before = _snapshot(ref)
    _one_line_exit_2(capsys, "report", ref, needle="not a readable Parquet file")
    assert _snapshot(ref) == before


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"base_acc": "high"}', '{"base_acc": NaN}', ""])
def test_a_damaged_base_json_is_one_line_before_the_sweep(tmp_path, capsys, content):
    out = tmp_path / "q"
    out.mkdir()
    for name in ("base.pt", "config.yaml"):
        shutil.copy2(ROOT / "results" / "quickstart" / name, out / name)
    (out / "base.json").write_text(content)
    before = sorted(p.name for p in out.iterdir())
    assert main(["sweep", str(ROOT / "sweeps" / "quickstart.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "base.json" in err[0] and "gradauth train" in err[0], err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written, Ray never started
