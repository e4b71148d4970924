"""report.md and plots/*.png from a small sweep with two importance sources, two schedules, an attack and slices."""
import pandas as pd
import pytest
from PIL import Image

from gradauth.errors import GradauthError
from gradauth.report import write_report
from gradauth.select import select_dir

from paper_table import seeds, table, trial, write_trials

PNG = b"\x89PNG\r\n\x1a\n"
# importance → lock rate → (Prun_acc, {fine-tune epochs: mean Fine_acc}); 1000 BN channels, so rate r locks 1000 r.
# `slice` falls under the lock bound (chance 0.1 + 0.1) at 50 channels, `bn_gamma` only at 100.
SWEEP = {"bn_gamma": {0.05: (0.30, {5: 0.88, 20: 0.91}), 0.10: (0.12, {5: 0.78, 20: 0.84})},
         "slice": {0.02: (0.35, {5: 0.90, 20: 0.92}), 0.05: (0.15, {5: 0.86, 20: 0.90}),
                   0.10: (0.10, {5: 0.70, 20: 0.80})}}


def _sweep(importances=("bn_gamma", "slice")) -> pd.DataFrame:
    rows = [trial(0.02, None, prun_acc=0.60, status="unlockable", seed=s, epochs=e, total_channels=1000)
            for e in (5, 20) for s in range(3)] if "bn_gamma" in importances else []
    for imp in importances:
        for rate, (prun, fine) in SWEEP[imp].items():
            for epochs, acc in fine.items():
                rows += seeds(acc, importance=imp, lock_value=rate, prun_acc=prun, epochs=epochs, total_channels=1000)
    return table(rows)


@pytest.fixture
def swept(tmp_path):
    write_trials(_sweep(), tmp_path / "trials.parquet")
    select_dir(tmp_path, defaults={"experiment": "two-sources"})
    return tmp_path


def _png_width(path) -> int:
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 1000
    with Image.open(path) as im:
        return im.size[0]


def test_report_has_the_level_table_and_valid_plots(swept):
    md = write_report(swept).read_text()
    assert md.startswith("# gradauth report: two-sources\n")
    assert "cifar10 · vgg19 · base accuracy 0.937 · chance 0.100 · 36 trials" in md
    assert "| ok | 30 |" in md and "| unlockable | 6 |" in md
    assert "## Levels (method 1: each level has its own lock)" in md
    for row in ["| 1 | slice rate 5% (50 ch) | 20 ep, lr 0.01, 100% data, all | 0.150 | 0.900 ± 0.002 | 0.960 | 3 |",
                "| 2 | bn_gamma rate 10% (100 ch) | 20 ep, lr 0.01, 100% data, all | 0.120 | 0.840 ± 0.002 | 0.900 | 3 |",
                "| 3 | bn_gamma rate 10% (100 ch) | 5 ep, lr 0.01, 100% data, all | 0.120 | 0.780 ± 0.002 | 0.840 | 3 |"]:
        assert row in md
    # 6 unlockable; 5 % bn_gamma and 2 % slice locked too weakly (4 groups × 3 seeds); 5 candidates' worth of
    # fine_acc that clash with a level (0.86: within 0.05 of 0.90 and 0.84) or are below level 3 (0.70).
    assert "| status unlockable (locked accuracy above sweep.lock_bound, not fine-tuned) | 6 |" in md
    assert "| locked accuracy above max_locked_acc | 12 |" in md
    assert "| fine_acc within min_gap of a level | 6 |" in md  # slice 5 % e5 (0.86) and slice 10 % e20 (0.80)
    assert "| not needed | 3 |" in md                           # slice 10 % e5 (0.70), below level 3
    assert "- … and 17 more (levels.json lists them all)" in md
    assert md.count("| slice-rate") + md.count("| bn_gamma-rate") == 36  # every trial in the full table
    for name in ("acc_vs_lock", "finetune_knobs", "importance"):
        assert f"(plots/{name}.png)" in md and _png_width(swept / "plots" / f"{name}.png") > 400
    assert not list(swept.glob("**/.*.tmp"))


def test_fewer_channels_sentence_names_the_steeper_source(swept):
    md = write_report(swept).read_text()
    assert ("`slice` needs fewer locked channels to reach the lock bound (locked accuracy ≤ 0.200): 50, "
            "against 100 for `bn_gamma`.") in md


def test_importance_plot_only_with_two_sources(swept):
    write_report(swept)
    assert (swept / "plots" / "importance.png").exists()
    write_trials(_sweep(["bn_gamma"]), swept / "trials.parquet")
    (swept / "levels.json").unlink()
    md = write_report(swept).read_text()
    assert "Importance sources" not in md and not (swept / "plots" / "importance.png").exists()  # stale one removed
    assert "No levels.json yet: run `gradauth select DIR`" in md
    assert _png_width(swept / "plots" / "acc_vs_lock.png") > 400


def _write_attack(out, df, md):
    """attack.parquet and attack.md stamped, as `gradauth attack` does, with what they were derived from."""
    import json
    import pyarrow as pa
    import pyarrow.parquet as pq
    from gradauth.attack import META_KEY, derived_from, md_stamp
    derived = derived_from(out)
    table = pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(table.replace_schema_metadata(table.schema.metadata | {META_KEY: json.dumps(derived).encode()}),
                   out / "attack.parquet")
    (out / "attack.md").write_text(md_stamp(derived) + "\n" + md)


def test_attack_and_slices_are_rendered_when_present(swept):
    rows = [dict(target=t, lock_importance=imp, lock_mode=mode, lock_value=v, locked_channels=n, init="zeros",
                 filters="erased", thief_init="none", attacker_fraction=f, schedule=s, seed=0, recovered_acc=acc)
            for t, imp, mode, v, n in [("public", "bn_gamma", "rate", 0.2, 7), ("scratch", "none", "none", 0.0, 0)]
            for f, s, acc in [(0.01, "best", 0.3), (0.1, "best", 0.5), (0.01, "strong", 0.6), (0.1, "strong", 0.8),
                              (1.0, "owner", 0.9)]]
    _write_attack(swept, pd.DataFrame(rows), "# Attack: fine-tuning the public model without a key\n\n"
                  "| start from | 1% best |\n|---|---|\n| public bn_gamma rate 0.2 (zeros) | 0.300 |\n")
    pd.DataFrame({"layer": ["features.1"] * 10, "channel": range(10), "class": -1,
                  "contribution": [10.0] + [1.0] * 9, "inputs": 8}).to_parquet(swept / "slices.parquet")
    md = write_report(swept).read_text()
    assert "## Attack: fine-tuning the public model without a key" in md
    assert "| public bn_gamma rate 0.2 (zeros) | 0.300 |" in md and md.count("# Attack") == 1  # attack.md's title dropped
    assert _png_width(swept / "plots" / "attack.png") > 800 and "(plots/attack.png)" in md  # best | strong panels
    assert "| features.1 | 10 | 19 | 52.6% |" in md  # the top channel carries 10 of 19


def test_an_attack_table_from_another_version_is_refused(swept):
    pd.DataFrame({"level": ["public"], "data_fraction": [0.01], "recovered_acc": [0.3]}).to_parquet(
        swept / "attack.parquet")
    with pytest.raises(GradauthError, match=r"attack.parquet: missing columns \['attacker_fraction', 'schedule', "
                                            r"'target'\]; re-run `gradauth attack`"):
        write_report(swept)
    (swept / "attack.parquet").unlink()


def test_report_without_a_sweep_is_refused(tmp_path):
    with pytest.raises(GradauthError, match="run `gradauth sweep CONFIG` first"):
        write_report(tmp_path)
    assert not (tmp_path / "report.md").exists()
