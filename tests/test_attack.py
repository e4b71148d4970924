"""The thief's view: fine-tuning the public model with a little data, every weight free."""
import copy
import json

import pandas as pd
import pytest
import torch

from gradauth import attack
from gradauth.checkpoint import load_model_file, rebuild
from gradauth.cli import main
from gradauth.data import load_dataset
from gradauth.engine import evaluate, predict
from gradauth.finetune import Schedule, finetune
from gradauth.importance import bn_gamma
from gradauth.models import bn_layers
from gradauth.pipeline import read_config
from gradauth.prune import count_removed, masks_from_model
from gradauth.release import locked_copy, producers, public_lock

from conftest import copy_of

COLUMNS = ["target", "lock_importance", "lock_mode", "lock_value", "locked_channels", "init", "filters", "thief_init",
           "prun_acc",
           "attacker_fraction", "attacker_images", "schedule", "ft_epochs", "ft_lr", "ft_data_fraction", "ft_scope", "seed",
           "recovered_acc",
           "recovered_top3", "level_accs", "best_level_reached", "same_masks_as", "seconds"]


@pytest.fixture(scope="module")
def attacked(tiny_sweep, tmp_path_factory):
    # The session's tiny sweep (conftest.py): 3-epoch levels at rates 0.2 / 0.3 / 0.4; the thief's strong schedule
    # scales with the best one, and it is most of this file's time. Copied: the attack writes into the folder.
    out = copy_of(tiny_sweep, tmp_path_factory.mktemp("sweep") / "sweep")
    return out, attack.run_attack(out)


def test_attack_table(attacked):
    out, df = attacked
    back = pd.read_parquet(out / "attack.parquet")
    assert list(back.columns[:len(COLUMNS)]) == COLUMNS and len(back) == len(df)
    levels = [lv["fine_acc"] for lv in json.loads((out / "levels.json").read_text())["levels"]]
    assert all(list(v) == levels for v in back["level_accs"])
    assert back["recovered_acc"].between(0, 1).all() and back["prun_acc"].between(0, 1).all()
    kinds = back.fillna({"lock_importance": "-", "lock_mode": "-", "filters": "-"}).groupby(
        ["target", "lock_importance", "init", "filters", "thief_init", "lock_mode"]).size().to_dict()
    # public: as released (3 fractions × 2 schedules + the owner's run), revived by the thief, noise release, the
    # plain lock with its filters kept, naive and revived (6 each); the weakest comparable rate lock and its
    # threshold twin of each source (bn_gamma, and slice: gradauth.slicing is part of the package): strong only
    # (3 + the owner's), revived (3); scratch (6).
    alt = {("alt", src, "zeros", "erased", thief, mode): n for src in ("bn_gamma", "slice")
           for mode in ("rate", "threshold") for thief, n in (("none", 4), ("revive", 3))}
    want = {("public", "bn_gamma", "zeros", "erased", "none", "rate"): 7,
            ("public", "bn_gamma", "zeros", "erased", "revive", "rate"): 6,
            ("public", "bn_gamma", "noise", "random", "none", "rate"): 6,
            ("public", "bn_gamma", "zeros", "kept", "none", "rate"): 6,
            ("public", "bn_gamma", "zeros", "kept", "revive", "rate"): 6,
            **alt, ("scratch", "-", "random", "-", "none", "-"): 6}
    assert kinds == want
    thief = back[back["schedule"] != "owner"]
    assert set(thief["attacker_fraction"]) == {0.01, 0.05, 0.1} and set(thief["schedule"]) == {"best", "strong"}
    assert (back["attacker_images"] == (back["attacker_fraction"] * 1132).round()).all()  # digits: 1132 train images
    owner = back[back["schedule"] == "owner"]
    assert (owner["init"] == "zeros").all() and (owner["thief_init"] == "none").all()
    assert (owner["attacker_fraction"] == 1.0).all()
    # the owner's run on the public lock is the sweep's trial for that lock and schedule, seed 0, to the last digit
    trials = pd.read_parquet(out / "trials.parquet").set_index("trial_id")
    assert owner["recovered_acc"].iloc[0] == trials.loc["bn_gamma-rate0.4-e3-lr0.01-f1-all-s0", "fine_acc"]
    # the best schedule is the sweep's best for the public lock (rate 0.4: 3 epochs, the only one swept there)
    best = back[back["schedule"] == "best"]
    assert (best["ft_epochs"] == 3).all() and (best["ft_lr"] == 0.01).all()
    strong = back[back["schedule"] == "strong"].set_index("attacker_fraction")["ft_epochs"]
    # strong: the 3 epochs × 18 steps (1132 images, batch 64) the best schedule takes on all the data
    assert strong[0.01].iloc[0] == 54 and strong[0.05].iloc[0] == 54 and strong[0.1].iloc[0] == 27
    public = back[(back["target"] == "public") & (back["init"] == "zeros") & (back["thief_init"] == "none")]
    assert public["prun_acc"].max() <= 0.2 and (public["locked_channels"] == 128).all()
    assert public["prun_acc"].nunique() == 1  # erasing the filters changes no output of the locked model


def test_alt_locks_are_the_weakest_comparable_and_threshold_equals_rate(attacked):
    _, df = attacked
    public = df[(df["target"] == "public") & (df["init"] == "zeros") & (df["thief_init"] == "none")]
    bound = max(public["prun_acc"].iloc[0], 0.1) + attack.COMPARABLE_SLACK
    alt = df[(df["target"] == "alt") & (df["lock_importance"] == "bn_gamma")]
    rate, thr = (alt[alt["lock_mode"] == m] for m in ("rate", "threshold"))
    n = rate["locked_channels"].iloc[0]
    assert (alt["prun_acc"][alt["thief_init"] == "none"] <= bound).all() and 16 < n < public["locked_channels"].iloc[0]
    assert rate["lock_value"].iloc[0] == n / 320 and (thr["locked_channels"] == n).all()
    for how, label in (("none", "zeros"), ("revive", "zeros, revived by the thief")):
        r, t = rate[rate["thief_init"] == how], thr[thr["thief_init"] == how]
        assert (t["same_masks_as"] == f"alt bn_gamma rate {n / 320:g} ({label})").all() and (t["seconds"] == 0).all()
        assert list(t["recovered_acc"]) == list(r["recovered_acc"]) and len(r) > 0
    # the owner could sell something from this weaker lock too
    assert rate[rate["schedule"] == "owner"]["recovered_acc"].iloc[0] > 0.5


def test_more_data_and_more_epochs_recover_more(attacked):
    _, df = attacked
    strong = df[df["schedule"] == "strong"].groupby("attacker_fraction")["recovered_acc"].mean()
    assert strong[0.1] > strong[0.01] + 0.1
    best = df[df["schedule"] == "best"].groupby("attacker_fraction")["recovered_acc"].mean()
    assert strong[0.1] > best[0.1]


def test_public_model_is_the_released_lock_and_what_the_thief_can_train(attacked):
    out, _ = attacked
    cfg = read_config(out)
    ds = load_dataset(cfg.data, cfg.seed)
    _, _, masks, importance = public_lock(out)
    base, _, _ = rebuild(load_model_file(out / "base.pt"))
    public = locked_copy(base, masks)
    n = count_removed(masks)[0]
    assert importance == "bn_gamma" and n == 128
    visible = masks_from_model(public)  # the zeros show the thief exactly which channels are locked
    assert all(torch.equal(visible[k], masks[k]) for k in masks)
    assert evaluate(public, ds, ds.test)[0] == pd.read_parquet(out / "attack.parquet").query(
        "target == 'public' and filters == 'erased' and thief_init == 'none'")["prun_acc"].iloc[0]
    # The thief trains every weight (no masks), yet on this VGG the zeroed channels stay exactly zero: each BN feeds
    # a ReLU, and with γ = β = 0 the ReLU input is 0, where its gradient is 0, so γ and β never get a gradient.
    thief = copy.deepcopy(public)
    finetune(thief, {}, ds, Schedule(3, 0.01, 0.1, "all", 0))
    assert count_removed(masks_from_model(thief))[0] == n
    # The release erased the locked channels' filters; a careful thief revives exactly those channels (γ 1, β 0, a
    # fresh filter), and then they train, as redrawn (noise) channels do.
    prods = producers(public)
    assert all(bool((prods[k].weight[~m] == 0).all()) for k, m in masks.items())
    plain = locked_copy(base, masks, keep_filters=True)
    kept = producers(plain)
    assert all(bool((kept[k].weight[~m].flatten(1).abs().sum(1) > 0).all()) for k, m in masks.items())
    assert torch.equal(predict(plain, ds, ds.test), predict(public, ds, ds.test))
    revived = copy.deepcopy(public)
    assert attack.revive(revived) == n
    assert all(bool((bn.weight[~masks[k]] == 1).all() and (bn.bias[~masks[k]] == 0).all())
               for k, bn in bn_layers(revived).items())
    assert all(bool((producers(revived)[k].weight[~m].flatten(1).abs().sum(1) > 0).all()) for k, m in masks.items())
    for model in (revived, locked_copy(base, masks, attack.NOISE_SEED)):
        before = {k: bn.weight.detach().clone() for k, bn in bn_layers(model).items()}
        finetune(model, {}, ds, Schedule(3, 0.01, 0.1, "all", 0))
        moved = sum(int((bn.weight.detach() != before[k])[~masks[k]].sum()) for k, bn in bn_layers(model).items())
        assert moved > n // 2
    assert count_removed(masks_from_model(public))[0] == n  # finetune worked on copies


def test_calibrate_finds_the_weakest_comparable_lock(attacked):
    out, _ = attacked
    cfg = read_config(out)
    ds = load_dataset(cfg.data, cfg.seed)
    base, _, _ = rebuild(load_model_file(out / "base.pt"))
    scores = bn_gamma(base)
    rate, rate_masks, rate_acc = attack.calibrate(base, scores, "rate", 16, 0.2, ds)
    thr, thr_masks, thr_acc = attack.calibrate(base, scores, "threshold", 16, 0.2, ds)
    n = count_removed(rate_masks)[0]
    assert rate_acc <= 0.2 and rate == n / 320 and n > 16
    assert thr_acc == rate_acc and all(torch.equal(rate_masks[k], thr_masks[k]) for k in rate_masks)
    assert len(f"{thr:g}") <= 8  # a threshold a person would write
    step = 320 // 100  # calibration steps by 1 % of the channels: one step weaker is not comparable
    weaker = locked_copy(base, attack.lock_masks(scores, "rate", (n - step) / 320))
    assert evaluate(weaker, ds, ds.test)[0] > 0.2


def test_report_and_cli(attacked, capsys):
    out, df = attacked
    text = (out / "attack.md").read_text()
    assert "level 1" in text and "public bn_gamma rate 0.4 (zeros)" in text and "scratch (random init)" in text
    main_table = text.split("## Head start")[0]  # the head-start table (issue 12) follows the main one
    lines = [line for line in main_table.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + df.apply(attack.attack_label, axis=1).nunique()  # header + one line per starting model
    assert lines[0].split(" | ")[3:] == ["1% best", "1% strong", "5% best", "5% strong", "10% best", "10% strong",
                                         "owner, all data |"]
    public = next(line for line in lines if line.startswith("| public bn_gamma rate 0.4 (zeros) |"))
    zeros = df[(df["target"] == "public") & (df["init"] == "zeros") & (df["schedule"] == "owner")]
    assert public.split(" | ")[-1].startswith(f"{zeros['recovered_acc'].iloc[0]:.3f}")
    head = [line for line in text.split("## Head start")[1].splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in head[1:]] == ["| 1%", "| 5%", "| 10%"]  # every fraction, both sides
    for h in attack.head_starts(df):
        assert h["scratch"] == df[(df["target"] == "scratch") & (df["attacker_fraction"] == h["fraction"])][
            "recovered_acc"].max()
        assert h["head_start"] == pytest.approx(h["public"] - h["scratch"])
    assert main(["attack", str(out / "nope")]) == 2
    assert "config.yaml" in capsys.readouterr().err
    before = (out / "attack.parquet").read_bytes(), text
    for forms, why in (("zeros", "lacks revive"), ("zeros,revive,bogus", "give distinct forms"),
                       ("zeros,zeros,revive", "give distinct forms")):
        assert main(["attack", str(out), "--no-alt", "--forms", forms]) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, err
    assert ((out / "attack.parquet").read_bytes(), (out / "attack.md").read_text()) == before   # nothing rewritten
