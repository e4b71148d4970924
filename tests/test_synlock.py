"""Synapse locks (`lock.granularity: synapse`, gradauth/synlock.py): NNSlicer's model protection as a lock option.

On the session's tiny base (conftest.py `tiny_base`: the quickstart VGG at width 2, 15 epochs, 139,808 conv/linear
weights): the lock hides exactly round(rate × n) weights of every layer, the highest-ranked ones; fine-tuning keeps
them at zero; slice and |w| hide what matters more than random at the same rate; a synapse sweep's rows, levels,
release (packs of the complete model, unlock round trip) and `gradauth attack` (the thief retrains the hidden
weights) work end to end without Ray.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import re

import pytest
import torch

from gradauth import attack, release as rel
from gradauth.checkpoint import load_model_file, rebuild, save_model
from gradauth.config import parse_config
from gradauth.engine import evaluate
from gradauth.errors import GradauthError
from gradauth.pipeline import trial_context
from gradauth.prune import count_removed, synapse_masks, synapse_params
from gradauth.schema import read_trials
from gradauth.select import select_dir
from gradauth.sweep import write_trials
from gradauth.synlock import synapse_scores
from gradauth.trial import TrialSpec, grid, locked_model, run_trial

from conftest import TINY, tiny_raw, with_base

CPU = torch.device("cpu")


def synapse_cfg(importance, values, **finetune):
    return parse_config(tiny_raw(importance=importance,
                                 lock={"granularity": "synapse", "mode": "rate", "values": values},
                                 finetune={"epochs": [1], "lr": [0.01], "seeds": [0], **finetune}))


@pytest.fixture(scope="module")
def syn_ctx(tiny_base, tmp_path_factory):
    """The tiny base with the three synapse importances scored (slice on 64 inputs)."""
    cfg = synapse_cfg([{"name": "slice", "samples": 64}, "weight", "random"], [0.1, 0.3])
    out = with_base(tiny_base[1], tmp_path_factory.mktemp("syn-ctx"), cfg)
    return cfg, trial_context(cfg, out)


def test_synapse_lock_hides_exactly_the_requested_fraction_of_every_layer(syn_ctx):
    cfg, ctx = syn_ctx
    for label, scores in ctx.scores.items():
        for rate in (0.1, 0.3, 0.5):
            masks = synapse_masks(scores, "rate", rate)
            assert set(masks) == {"features.0.weight", "features.3.weight", "features.7.weight",
                                  "features.10.weight", "features.14.weight", "classifier.weight"}
            for name, keep in masks.items():
                n = keep.numel()
                assert keep.shape == scores[name].shape
                assert int((~keep).sum()) == int(round(rate * n)), (label, rate, name)  # per layer, exactly
                s = scores[name]
                assert s[~keep].min() >= s[keep].max(), (label, name)  # the highest-ranked ones
            hidden, total = count_removed(masks)
            assert total == 139_808 and abs(hidden / total - rate) < 1e-3
    # weight ranks by |w|; random is seeded by the config's seed (the same scores twice)
    model, _ = locked_model(ctx, TrialSpec("weight", "rate", 0.3, 1, 0.01, 1.0, "all", 0, lock_granularity="synapse"))
    for name, w in synapse_params(model).items():
        base = ctx.base_state[name]
        hidden = w == 0
        assert torch.equal(w[~hidden], base[~hidden]) and base[hidden].abs().max() >= base[~hidden].abs().min()
    again = synapse_scores(cfg.importance[2], model, ctx.ds, cfg.seed)
    assert all(torch.equal(again[n], ctx.scores["random"][n]) for n in again)
    # release.noise_init: the hidden weights redrawn from their layer's kept ones, so no zero marks them
    base_model = copy.deepcopy(model)
    base_model.load_state_dict(ctx.base_state)
    masks = synapse_masks(ctx.scores["weight"], "rate", 0.3)
    noisy = rel.locked_copy(base_model, masks, noise_seed=1)
    for name, w in synapse_params(noisy).items():
        keep, kept = masks[name], synapse_params(base_model)[name][masks[name]]
        assert torch.equal(w[keep], kept) and bool(torch.isin(w[~keep], kept).all()) and int((w == 0).sum()) == 0


def test_threshold_and_unknown_importances_are_refused_in_one_line():
    def refused(importance, lock):
        with pytest.raises(GradauthError) as e:
            parse_config(tiny_raw(importance=importance, lock=lock))
        assert "\n" not in str(e.value)
        return str(e.value)
    assert "takes lock.mode rate" in refused("weight", {"granularity": "synapse", "mode": "threshold",
                                                        "values": [0.5]})
    assert "bn_gamma ranks channels" in refused("bn_gamma", {"granularity": "synapse", "values": [0.5]})
    assert "'random' is not one of bn_gamma, slice (random ranks synapses" in refused("random", {"values": [0.1]})
    assert "'taylor' is not one of" in refused("taylor", {"granularity": "synapse", "values": [0.5]})
    assert "is outside (0, 1)" in refused("weight", {"granularity": "synapse", "values": [1.0]})
    assert "is not one of channel, synapse" in refused("slice", {"granularity": "weights", "values": [0.5]})
    # a channel config is what it was: same hash, same ids
    cfg = parse_config(copy.deepcopy(TINY))
    assert "granularity" not in cfg.to_dict()["lock"]
    assert [t.trial_id for t in grid(cfg)][0] == "bn_gamma-rate0.02-e3-lr0.01-f1-all-s0"


def test_fine_tuning_keeps_the_hidden_weights_at_zero(syn_ctx):
    cfg, ctx = syn_ctx
    t = TrialSpec("random", "rate", 0.3, 1, 0.01, 1.0, "all", 0, lock_granularity="synapse")
    row, model, masks = run_trial(ctx, t, CPU)
    assert row["status"] == "ok" and row["trial_id"] == "random-rate0.3-synapse-e1-lr0.01-f1-all-s0"
    assert row["lock_granularity"] == "synapse" and row["locked_channels"] == 41_942
    assert row["total_channels"] == 139_808 and row["params"] == sum(
        v.numel() for k, v in ctx.base_state.items() if "running" not in k and "num_batches" not in k) - 41_942
    moved = 0
    for name, w in synapse_params(model).items():
        keep = masks[name]
        assert bool((w[~keep] == 0).all()), name  # held at zero through every step
        moved += int((w[keep] != ctx.base_state[name][keep]).sum())
    assert moved > 0.9 * (139_808 - 41_942)  # the kept weights did train
    assert row["fine_acc"] > row["prun_acc"] + 0.5


def test_slice_and_weight_hide_more_than_random_at_the_same_rate(syn_ctx):
    """Locked accuracy (no fine-tuning) at 10 % of every layer hidden. Seen on the tiny base: slice 0.215, weight
    0.091, random 0.596 (base 0.996); at 5 %: 0.620, 0.091, 0.954."""
    _, ctx = syn_ctx
    acc = {}
    for imp in ("slice", "weight", "random"):
        model, _ = locked_model(ctx, TrialSpec(imp, "rate", 0.1, 1, 0.01, 1.0, "all", 0, lock_granularity="synapse"))
        acc[imp] = evaluate(model, ctx.ds, ctx.ds.test)[0]
    assert acc["random"] > 0.45, acc
    assert acc["slice"] < acc["random"] - 0.25 and acc["weight"] < acc["random"] - 0.25, acc


@pytest.fixture(scope="module")
def syn_sweep(tiny_base, tmp_path_factory):
    """A finished synapse sweep without Ray (the grid's trials run by trial.run_trial, as a Tune worker runs them):
    importance random, rates 0.3 / 0.6 / 0.9 of each layer, 2 epochs (|w| and slice locks recover too little in 2 epochs to make two levels); models, trials.parquet, levels.json."""
    cfg = synapse_cfg(["random"], [0.3, 0.6, 0.9], epochs=[2])
    out = with_base(tiny_base[1], tmp_path_factory.mktemp("syn-sweep") / "sweep", cfg)
    ctx = trial_context(cfg, out)
    rows = []
    for t in grid(cfg):
        row, model, masks = run_trial(ctx, t, CPU)
        if model is not None:
            save_model(out / "models" / f"{t.trial_id}.pt", model.cpu(), ctx.spec, masks)
        rows.append(row)
    write_trials(rows, out / "trials.parquet")
    with contextlib.redirect_stdout(io.StringIO()):
        select_dir(out, levels=2, min_gap=0.05)
    return out


def test_a_synapse_sweep_writes_rows_with_their_granularity(syn_sweep):
    trials = read_trials(syn_sweep / "trials.parquet").set_index("trial_id")
    assert list(trials.index) == [f"random-rate{r}-synapse-e2-lr0.01-f1-all-s0" for r in (0.3, 0.6, 0.9)]
    assert set(trials["lock_granularity"]) == {"synapse"} and set(trials["status"]) == {"ok"}
    assert list(trials["locked_channels"]) == [41_942, 83_885, 125_827]
    assert trials["prun_acc"].max() <= 0.2 and trials["fine_acc"].is_monotonic_decreasing
    levels = json.loads((syn_sweep / "levels.json").read_text())["levels"]
    assert [lv["lock_granularity"] for lv in levels] == ["synapse", "synapse"]


def test_release_and_unlock_round_trip_a_synapse_level(syn_sweep, tmp_path):
    from conftest import copy_of
    out = copy_of(syn_sweep, tmp_path / "sweep")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        final = rel.release_dir(out)
    keys = {int(k): v for k, v in re.findall(r"^level (\d+) .* key (\S+)$", stdout.getvalue(), re.M)}
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["locked"]["lock_granularity"] == "synapse"
    cfg = parse_config(tiny_raw())
    from gradauth.data import load_dataset
    ds = load_dataset(cfg.data, cfg.seed)
    public, _, public_masks = rebuild(load_model_file(final / "locked.pt"))
    assert public_masks == {}  # no masks published
    # the public model: the strongest level's hidden weights at zero, the rest the base's
    strongest = max(manifest["levels"], key=lambda lv: lv["locked_channels"])
    masks = load_model_file(out / "models" / f"{strongest['trial_id']}.pt")["masks"]
    base, _, _ = rebuild(load_model_file(out / "base.pt"))
    for name, w in synapse_params(public).items():
        keep = masks[name]
        assert bool((w[~keep] == 0).all()) and torch.equal(w[keep], synapse_params(base)[name][keep])
    assert manifest["locked"]["test_acc"] <= 0.2
    for lv in manifest["levels"]:
        model = rel.unlock(final, lv["level"], keys[lv["level"]])
        sweep_model, _, level_masks = rebuild(load_model_file(out / "models" / f"{lv['trial_id']}.pt"))
        assert lv["lock_granularity"] == "synapse"
        # the complete model: same shapes and weights as the sweep's, hidden weights still zero
        got = dict(model.named_parameters())
        for k, v in sweep_model.named_parameters():
            assert torch.equal(got[k], v), k
        for name, w in synapse_params(model).items():
            assert bool((w[~level_masks[name]] == 0).all())
        assert evaluate(model, ds, ds.test)[0] == lv["expected_acc"] == lv["sweep_fine_acc"]


def test_attack_on_a_synapse_release_is_the_protection_experiment(syn_sweep, tmp_path):
    from conftest import copy_of
    out = copy_of(syn_sweep, tmp_path / "sweep")
    with contextlib.redirect_stdout(io.StringIO()):
        df = attack.run_attack(out, fractions=(0.05,))
    pub = df[df["target"] == "public"]
    assert set(pub["lock_granularity"]) == {"synapse"} and set(pub["lock_importance"]) == {"random"}
    assert set(zip(pub["init"], pub["thief_init"])) == {("zeros", "none"), ("zeros", "revive"), ("noise", "none")}
    rate = max(lv["lock_value"] for lv in json.loads((out / "levels.json").read_text())["levels"])
    assert set(pub["lock_value"]) == {rate}  # the union of the levels' locks: the strongest level's
    alt = df[df["target"] == "alt"]
    assert set(alt["lock_importance"]) == {"slice", "weight", "random"}
    assert set(alt["lock_value"]) == {rate} and set(alt["lock_granularity"]) == {"synapse"}
    thief = df[(df["schedule"] != "owner") & (df["target"] != "scratch")]
    assert thief["recovered_acc"].between(0, 1).all() and (thief["prun_acc"] <= 0.2).all()
    md = (out / "attack.md").read_text()
    assert "synapses hidden" in md and f"public random synapse rate {rate:g} (zeros)" in md
