"""docs/design.md is the contracts' source of truth for users: it must list what the code writes and accepts.

These tests read the document's tables and compare them with the code's own declarations (schema.py, knobs.py,
config.py, slicing/stage.py, checkpoint.py, release.py), so a column, a config key or a format string added in code
without its line in the document fails here.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "design.md"


def _section(title: str) -> str:
    """The text under the heading `title` (any level) up to the next heading of the same or a higher level."""
    text = DOC.read_text(encoding="utf-8")
    m = re.search(rf"^(#+) {re.escape(title)}\s*$", text, re.M)
    assert m, f"docs/design.md has no heading {title!r}"
    level = len(m.group(1))
    rest = text[m.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[:end.start()] if end else rest


def _table(section: str) -> dict[str, list[str]]:
    """First-column `name` → the row's other cells, for every table row of `section` that starts with a code name."""
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\| `([^`]+)` \|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


ARROW_WORDS = {"string": "string", "int64": "int64", "double": "double"}


def test_trials_parquet_columns_and_types_match_the_schema():
    from gradauth.schema import WRITTEN_COLUMNS
    rows = _table(_section("trials.parquet (`schema.py` owns it; `rows.write_trials` writes it)"))
    want = {name: str(t) for name, t in WRITTEN_COLUMNS.items()}
    assert list(rows) == list(want), "the document lists the columns in the file's order"
    got = {name: ARROW_WORDS.get(cells[0], cells[0]) for name, cells in rows.items()}
    assert got == want


def test_slices_parquet_columns_and_types_match_the_stage():
    from gradauth.slicing.stage import SCHEMA
    rows = _table(_section("slices.parquet (`slicing/stage.py`)"))
    assert {n: c[0] for n, c in rows.items()} == {f.name: str(f.type) for f in SCHEMA}


def _config_keys(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("section", ["data", "model", "train", "lock", "finetune", "sweep", "select", "release",
                                     "detect", "simplify"])
def test_every_config_key_is_documented(section):
    from gradauth.config import SECTIONS
    heading = next(h for h in re.findall(r"^### (`[a-z]+`.*)$", DOC.read_text(encoding="utf-8"), re.M)
                   if h.startswith(f"`{section}`"))
    documented = set(_table(_section(heading)))
    assert set(_config_keys(SECTIONS[section])) == documented


def test_top_level_and_search_keys_are_documented():
    from gradauth.config import TOP_LEVEL, SearchConfig, ThiefBudget
    text = DOC.read_text(encoding="utf-8")
    listed = re.search(r"Top-level keys: (.*?)\.\n", text, re.S).group(1)
    assert set(re.findall(r"`([a-z]+)`", listed)) == TOP_LEVEL
    assert set(_table(_section("top level"))) == {"name", "seed"}
    search = set(_table(_section("`search` (targeted search, `search.py`)")))
    want = {k for k in _config_keys(SearchConfig) if k != "thief"} | {f"thief.{k}" for k in _config_keys(ThiefBudget)}
    assert search == want


def test_importance_settings_are_documented():
    from gradauth import registry
    rows = [line for line in _section("`importance` (which channels count as most important)").splitlines()
            if line.startswith("| `")]
    documented = {(m.group(1), m.group(2)) for line in rows
                  if (m := re.match(r"^\| `([^`]+)` \| `([^`]+)` \|", line))}
    want = set()
    for name in registry.names("importance"):
        settings = registry.importance(name).settings
        if settings is not None:
            want |= {(name, f.name) for f in dataclasses.fields(settings)}
    assert documented == want


def test_format_strings_are_the_codes():
    from gradauth import checkpoint, release, train
    text = DOC.read_text(encoding="utf-8")
    for s in (checkpoint.FORMAT, release.FORMAT, train.CKPT_FORMAT, release.KEY_PREFIX):
        assert f"`{s}" in text, s
    for name in (release.MANIFEST, release.OWNER_KEYS, release.LOCKED, release.pack_name(1)):
        assert name in text, name
    assert release.MAGIC == b"gradauth-pack/1\n" and "`gradauth-pack/1\\n`" in text
    assert (release.NONCE_BYTES, release.TAG_BYTES, release.KEY_BYTES) == (12, 16, 32)


def test_detect_settings_and_columns_are_documented():
    from gradauth.detect import SCHEMA, Settings
    assert set(_table(_section("`detect` (`gradauth detect` only, `detect.py`)"))) == set(_config_keys(Settings))
    rows = _table(_section("detect.parquet, detect.md, plots/detect.png (`detect.py`)"))
    assert {n: c[0] for n, c in rows.items()} == {f.name: str(f.type) for f in SCHEMA}


def test_simplify_columns_are_documented():
    from gradauth.simplify import SCHEMA
    rows = _table(_section("simplify.parquet, simplify.md, plots/simplify.png (`simplify.py`)"))
    assert {n: c[0] for n, c in rows.items()} == {f.name: str(f.type) for f in SCHEMA}
