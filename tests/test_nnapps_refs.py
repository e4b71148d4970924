"""The committed NNSlicer-application references (issue 13) say what the README says they say, and were made with
the shipped configs: the quickstart simplification, the quickstart synapse-lock sweep and its attack (the
protection experiment), and the CIFAR-10 config sharing the committed CPU base."""
import json
from pathlib import Path

import pandas as pd
import pytest

from gradauth.attack import read_derived
from gradauth.config import load_config
from gradauth.schema import file_sha256

ROOT = Path(__file__).resolve().parents[1]
QS, SYN = ROOT / "results" / "quickstart", ROOT / "results" / "quickstart-synapse"


def test_quickstart_simplify_reference_has_slice_ahead_of_weight_and_channel():
    cfg = load_config(ROOT / "sweeps" / "quickstart.yaml")
    s = cfg.simplify
    df = pd.read_parquet(QS / "simplify.parquet")
    assert len(df) == s.subsets * len(s.rates) * len(s.methods) and df["subset"].nunique() == s.subsets
    assert set(df["theta"]) == {s.theta} and set(df.loc[df.method == "slice", "sliced"]) == {s.samples}
    for m in ("slice", "weight"):  # exactly round(r·n) synapses of each layer go: kept is 1 − r up to rounding
        kept = df[df.method == m].groupby("rate")["kept"].mean()
        assert all(abs(k - (1 - r)) < 0.01 for r, k in kept.items())
    after = df.groupby(["method", "rate"])["acc_after"].mean().unstack(0)
    assert (after["slice"] > after["weight"]).all() and (after["slice"] > after["channel"]).all()
    assert after.loc[0.9, "slice"] - after.loc[0.9, "weight"] > 0.2     # the README's 0.919 against 0.588
    assert "| slice | 0.9 |" in (QS / "simplify.md").read_text()


def test_quickstart_synapse_reference_was_made_from_its_config_and_the_quickstart_base():
    cfg = load_config(ROOT / "sweeps" / "quickstart-synapse.yaml")
    assert json.loads((SYN / "base.json").read_text())["base_hash"] == cfg.base_hash()
    assert file_sha256(SYN / "base.pt") == file_sha256(QS / "base.pt")  # the quickstart's base, not trained again
    t = pd.read_parquet(SYN / "trials.parquet")
    assert set(t["config_hash"]) == {cfg.hash()} and set(t["lock_granularity"]) == {"synapse"}
    assert not any(str(s).endswith("+dirty") for s in t["git_sha"])
    assert set(t["importance"]) == {"slice", "weight", "random"} and len(t) == 36


def test_quickstart_synapse_attack_compares_slice_weight_and_random_at_one_rate():
    a = pd.read_parquet(SYN / "attack.parquet")
    derived = read_derived(SYN / "attack.parquet")
    assert derived["levels_sha256"] == file_sha256(SYN / "levels.json")
    assert derived["trials_sha256"] == file_sha256(SYN / "trials.parquet")
    assert not any(str(s).endswith("+dirty") for s in a["git_sha"])
    alt = a[a.target == "alt"]
    assert set(alt["lock_importance"]) == {"slice", "weight", "random"}
    assert alt["lock_value"].nunique() == 1                 # the paper's comparison: one hidden fraction for all
    assert set(alt["thief_init"]) == {"none", "revive"} and set(alt["schedule"]) == {"strong", "owner"}
    assert set(a.loc[a.target == "public", "lock_granularity"]) == {"synapse"}
    # What the README reads off it: at 5 and 10 % of the data a thief recovers less from a slice or |w| lock than
    # from scratch, and more from a random one than from either
    thief = a[a.schedule != "owner"]
    for f in (0.05, 0.1):
        at = thief[thief.attacker_fraction == f]
        best = {imp: at.loc[(at.target == "alt") & (at.lock_importance == imp), "recovered_acc"].max()
                for imp in ("slice", "weight", "random")}
        scratch = at.loc[at.target == "scratch", "recovered_acc"].max()
        assert best["slice"] < scratch and best["weight"] < scratch, f
        assert best["random"] > max(best["slice"], best["weight"]), f


def test_cifar_nnapps_config_shares_the_committed_cifar_base():
    """Its README commands copy results/cifar10-cpu-targeted/base.pt: the base hash must be that base's, so
    `gradauth run --resume` skips training, and detect/simplify read the same model."""
    cfg = load_config(ROOT / "sweeps" / "cifar10-cpu-nnapps.yaml")
    base = json.loads((ROOT / "results" / "cifar10-cpu-targeted" / "base.json").read_text())
    assert cfg.base_hash() == base["base_hash"]
    assert cfg.lock.granularity == "synapse" and cfg.lock.values == [0.5]
    assert [i.name for i in cfg.importance] == ["slice", "weight", "random"]


@pytest.mark.parametrize("section", ["detect", "simplify"])
def test_cifar_nnapps_sections_are_hash_neutral(section):
    import yaml
    raw = yaml.safe_load((ROOT / "sweeps" / "cifar10-cpu-nnapps.yaml").read_text())
    from gradauth.config import parse_config
    without = {k: v for k, v in raw.items() if k != section}
    assert parse_config(without).hash() == parse_config(raw).hash()
