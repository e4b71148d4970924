"""`gradauth attack DIR`: the thief's view of a release. How much of each level does the public model give away?

The thief holds the public locked model and a labelled slice of the training data (1 %, 5 %, 10 %: the first images
of one seeded shuffle, so a larger slice contains the smaller). They do not know the masks and hold nothing at zero:
`finetune` with empty masks trains every weight. Two schedules:

- best: the sweep's best schedule for the public lock (highest mean fine_acc over seeds among the trials with that
  lock; any lock if none has it), every knob of it (`knobs.Schedule`: epochs, lr, scope, any knob added later), run
  on the thief's slice (its data_fraction is the thief's fraction);
- strong: the best schedule for as many optimizer steps as it takes on its own share of the full training set (the
  owner's compute), and at least 4 × its epochs: on 1 % of the data, about 100 × the epochs.

Targets (one row per target × fraction × schedule × seed in `attack.parquet`):

- `public`: the released lock (`release.public_model`: the thief-chosen lock when trials.parquet has thief trials,
  else the union of the levels' locks) in the forms of `FORMS`:
  - `zeros` (init zeros, filters erased, thief_init none): the release as `gradauth release` writes it, fine-tuned
    naively. A channel with γ = β = 0 gets no gradient where its BN feeds a ReLU (the ReLU input is exactly 0, where
    its gradient is 0), and with its filter erased not even through a residual add, so it never comes back.
  - `revive` (thief_init revive): the careful thief. The zeros show exactly which channels are locked, so they get
    BN's init (γ 1, β 0) and, their filters being blank, fresh random filters, then fine-tuning.
  - `noise` (init noise, filters random): a `release.noise_init` release, the locked γ/β redrawn from their layer's
    kept channels and the filters random (`release.locked_copy`, seed `NOISE_SEED`): nothing marks the lock, so the
    thief fine-tunes naively.
  - `kept`, `kept+revive` (filters kept): the paper's plain lock, only γ/β zeroed, the trained filters left in the
    public model: what `release.erase` is for.
- `alt`: bn_gamma and slice locks, rate and threshold, computed directly from the base model, each the weakest lock
  of its kind with comparable locked accuracy: from 1 % of the channels upward in steps of 1 %, the first whose
  locked accuracy is ≤ max(public locked accuracy, chance) + `COMPARABLE_SLACK`. (The public lock is the strongest
  of the levels', usually stronger than it needs to be; the alt locks are compared with each other on equal
  footing.) A threshold is the shortest decimal that removes exactly that many channels, so at equal strength a
  threshold lock is the same masks as a rate lock of the same source (the ranking is global either way); identical
  models are attacked once and their rows say `same_masks_as`. To keep the run short, alt locks get the strong
  schedule only, as released (`zeros`) and revived. A source that is not installed (slicing) is skipped, with one
  message.
- `scratch`: the same architecture from random initialisation: what the data alone is worth to the thief.

A synapse-lock release (`lock.granularity: synapse`, synlock.py) is NNSlicer's protection experiment: the thief
holds the model with the hidden weights at zero and retrains every weight on its data. Its public forms are
`zeros`, `revive` (every exactly-zero conv/linear weight redrawn like the layer's init: the zeros show the hidden
synapses) and `noise` (hidden weights redrawn from their layer's kept ones); there are no filters to keep. Its
`alt` targets are the synapse locks of `slice`, `weight` (|w|) and `random` at the public lock's rate (the paper's
comparison at equal hidden fraction, not calibrated to equal locked accuracy), strong schedule, zeros and revived.

Every lock as released (`zeros`) also gets one `owner` row: the best schedule as swept (its data fraction included)
with the masks held, the level that lock could sell, so a lock the thief cannot recover is not mistaken for a good
one when the owner cannot either.

Every fraction is attacked from the public model and from scratch with the same schedules (checked), and attack.md
has a head-start table: per fraction, the thief's best from the public model as released (zeros and revived, or
noise for a `release.noise_init` config) against the best from scratch, and the difference.

`prun_acc` is each target's accuracy before the attack; `level_accs` are the levels' mean fine_acc (levels.json);
`best_level_reached` is the best level whose accuracy the thief matches (null if none). The report is `attack.md`.

What was attacked is recorded (`derived_from`): the sha256 of levels.json, of trials.parquet and of
release/manifest.json (null if there was no release), in attack.parquet's schema metadata (key `gradauth`) and on
attack.md's first line (an HTML comment), so `gradauth report` embeds the attack only while it matches the
current levels and release.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn as nn

from . import rundir
from .checkpoint import load_model_file, rebuild
from .config import ImportanceConfig
from .data import Dataset
from .engine import evaluate, pick_device
from .errors import GradauthError
from .finetune import finetune
from .knobs import LockSpec, Schedule, columns, fill_defaults, from_row, schedule_dict, schedule_label, to_row
from .fsutil import atomic_path, write_text
from .importance import bn_gamma
from .prune import count_removed, is_synapse, lock_masks, synapse_masks
from .release import HEAD_SEED, MANIFEST, locked_copy, public_model, revive
from .schema import file_sha256, read_trials

FRACTIONS = (0.01, 0.05, 0.1)   # of the labelled training split the thief holds
STRONG_MIN_FACTOR = 4           # strong schedule: at least 4 × the best schedule's epochs
COMPARABLE_SLACK = 0.02         # alt locks: locked accuracy within this of the public model's (or of chance)
NOISE_SEED = 0                  # the attack's noise draw; a release draws a secret one
SCHEDULE_GROUP = columns(Schedule, group_only=True)  # the schedule columns of trials.parquet, seed excluded
ALT_LOCKS = (("bn_gamma", "rate"), ("bn_gamma", "threshold"), ("slice", "rate"), ("slice", "threshold"))


@dataclass
class Target:
    target: str                 # public | alt | scratch
    importance: str | None
    lock_mode: str | None
    lock_value: float | None
    locked_channels: int
    init: str                   # the public model's removed γ/β: zeros | noise | random (scratch)
    model: nn.Module
    prun_acc: float = float("nan")
    masks: dict | None = None
    thief_init: str = "none"    # none | revive: the thief resets every all-zero γ/β pair (and blank filter) first
    schedules: tuple = ("best", "strong")
    filters: str | None = None  # the locked channels' conv filters in the public model: erased | kept | random
    signature: bytes = b""      # everything above that decides the runs, to attack identical models once
    granularity: str | None = "channel"  # channel | synapse (lock.granularity); None for scratch


def best_schedule(out: Path, importance: str, mode: str, value: float, granularity: str = "channel") -> Schedule:
    """The whole schedule (every knob but the seed) with the highest mean fine_acc over seeds for this lock in
    trials.parquet (any lock if none has it); ties go to the first in sorted knob order."""
    group = SCHEDULE_GROUP
    t = read_trials(out / rundir.TRIALS, ["status", "importance", "lock_mode", "lock_value", "ft_epochs", "ft_lr",
                                             "fine_acc"])
    ok = fill_defaults(fill_defaults(t[t["status"] == "ok"], Schedule), LockSpec)  # an older file: the defaults
    same = ok[(ok["importance"] == importance) & (ok["lock_mode"] == mode) & ((ok["lock_value"] - value).abs() < 1e-12)
              & (ok["lock_granularity"] == granularity)]
    g = (same if len(same) else ok).groupby(group, sort=True)["fine_acc"].mean()
    best = g.idxmax()
    return from_row(Schedule, dict(zip(group, best if isinstance(best, tuple) else (best,))))


def schedules(best: Schedule, fraction: float, n_train: int, batch: int) -> list[tuple[str, Schedule]]:
    """[(name, schedule)] of the thief holding `fraction` of the training data: best as swept on the thief's slice;
    strong as many optimizer steps as best took on its own share of all `n_train` images. Every other knob of the
    best schedule (scope, any knob added later) is kept."""
    steps = lambda n: math.ceil(max(1, round(n)) / batch)
    epochs = best.epochs
    strong = max(STRONG_MIN_FACTOR * epochs,
                 math.ceil(epochs * steps(n_train * best.data_fraction) / steps(n_train * fraction)))
    mine = replace(best, data_fraction=fraction)
    return [("best", mine), ("strong", replace(mine, epochs=strong))]


def _short_threshold(lo: float, hi: float) -> float | None:
    """The shortest decimal t with lo ≤ t < hi: `score > t` then removes exactly the channels scoring ≥ hi."""
    for digits in range(1, 10):
        t = math.ceil(lo * 10 ** digits) / 10 ** digits
        if t < hi:
            return round(t, digits)
    return None  # hi == lo: a tie no threshold can split


def calibrate(base: nn.Module, scores: dict, mode: str, start: int, target_acc: float, ds: Dataset):
    """(value, masks, locked accuracy): the weakest lock from `start` channels up with accuracy ≤ target_acc.

    Counts step by 1 % of the channels. A threshold is the shortest decimal that removes exactly that count, so at
    equal counts a rate and a threshold lock of one source are the same masks (the ranking is global either way)."""
    flat = torch.cat([s.flatten().double() for s in scores.values()]).sort(descending=True).values
    total, last = len(flat), None
    for count in range(max(1, start), int(0.9 * total) + 1, max(1, total // 100)):
        value = count / total if mode == "rate" else _short_threshold(float(flat[count]), float(flat[count - 1]))
        if value is None:
            continue
        masks = lock_masks(scores, mode, value)
        if count_removed(masks)[0] != count:
            continue  # float32 rounding moved the threshold onto a score
        acc = evaluate(locked_copy(base, masks), ds, ds.test)[0]
        last = (value, masks, acc)
        if acc <= target_acc:
            break
    return last


def _scores(name: str, cfg, base: nn.Module, ds: Dataset):
    from .importance import get_importance
    imp = next((i for i in cfg.importance if i.name == name), ImportanceConfig(name=name))
    try:
        return get_importance(imp)(base, ds)
    except ImportError as e:
        print(f"[attack] {name} locks skipped: {e}", file=sys.stderr)
        return None


def check_forms(forms, released_init: str) -> tuple:
    """`forms` (None: every form of FORMS) as a tuple, refused in one line when unknown or when it lacks what the
    head-start table compares (zeros and revive for a zeros release, noise for a noise_init one)."""
    if forms is None:
        return tuple(FORMS)
    unknown = [f for f in forms if f not in FORMS]
    if unknown or not forms or len(set(forms)) != len(forms):
        raise GradauthError(f"--forms {','.join(forms)}: give distinct forms from {', '.join(FORMS)}")
    need = {"noise"} if released_init == "noise" else {"zeros", "revive"}
    if not need <= set(forms):
        raise GradauthError(f"--forms {','.join(forms)} lacks {', '.join(sorted(need - set(forms)))}: the head-start "
                            f"table compares the public model as released ({released_init}) with scratch")
    return tuple(forms)


def targets(out: Path, cfg, ds: Dataset, compare: bool = True, forms=None) -> tuple[list[Target], dict]:
    """The models the thief may start from, and what the public lock is."""
    forms = check_forms(forms, "noise" if cfg.release.noise_init else "zeros")
    pub = public_model(out)
    doc, masks, importance, choice = pub["doc"], pub["masks"], pub["importance"], pub["choice"]
    base, spec, _ = rebuild(load_model_file(out / rundir.BASE))
    mode, value = str(choice["lock_mode"]), float(choice["lock_value"])
    n = count_removed(masks)[0]
    head = HEAD_SEED if cfg.release.erase_head else None   # the public model's head as released: redrawn or trained
    synapse = is_synapse(masks)
    if synapse:  # a synapse lock has no filters to keep: the kept forms are left out
        forms = tuple(f for f in forms if f in SYNAPSE_FORMS)
    found = _lock_targets("public", importance, mode, value, base, masks, ds, forms, head_seed=head)
    if compare and synapse:
        found += synapse_alt_targets(cfg, base, ds, value, head)
    elif compare:
        target_acc = max(found[0].prun_acc, 1.0 / ds.num_classes) + COMPARABLE_SLACK
        found += alt_targets(cfg, base, ds, target_acc, head)
    torch.manual_seed(cfg.seed)
    scratch = _fresh(spec)
    found.append(Target("scratch", None, None, None, 0, "random", scratch, evaluate(scratch, ds, ds.test)[0],
                        granularity=None))
    public = {"importance": importance, "lock_mode": mode, "lock_value": value, "locked_channels": n,
              "prun_acc": found[0].prun_acc, "levels": doc["levels"], "chosen_by": choice["chosen_by"],
              "why": choice["why"], "released_init": "noise" if cfg.release.noise_init else "zeros",
              "erase_head": bool(cfg.release.erase_head), "lock_granularity": "synapse" if synapse else "channel"}
    return found, public


def synapse_alt_targets(cfg, base: nn.Module, ds: Dataset, rate: float, head_seed: int | None = None) -> list[Target]:
    """NNSlicer's protection comparison: the synapse locks of slice, weight and random at the public lock's rate
    (the `slice` entry's settings from the config where it has one), strong schedule, zeros and revived."""
    from .config import SYNAPSE_IMPORTANCE
    from .synlock import synapse_scores
    found = []
    for name in SYNAPSE_IMPORTANCE:
        imp = next((i for i in cfg.importance if i.name == name), None) or ImportanceConfig(name=name)
        try:
            scores = synapse_scores(imp, base, ds, cfg.seed)
        except ImportError as e:
            print(f"[attack] {name} synapse locks skipped: {e}", file=sys.stderr)
            continue
        masks = synapse_masks(scores, "rate", rate)
        found += _lock_targets("alt", imp.label, "rate", rate, base, masks, ds, ("zeros", "revive"), ("strong",),
                               head_seed=head_seed)
    return found


def alt_targets(cfg, base: nn.Module, ds: Dataset, target_acc: float, head_seed: int | None = None) -> list[Target]:
    """The comparison locks of ALT_LOCKS, each the weakest with locked accuracy ≤ `target_acc`."""
    found, scores = [], {}
    start = max(1, sum(s.numel() for s in bn_gamma(base).values()) // 100)
    for name, mode in ALT_LOCKS:
        if name not in scores:
            scores[name] = _scores(name, cfg, base, ds)
        if scores[name] is None:
            continue
        value, masks, _ = calibrate(base, scores[name], mode, start, target_acc, ds)
        found += _lock_targets("alt", name, mode, value, base, masks, ds, ("zeros", "revive"), ("strong",),
                               head_seed=head_seed)
    return found


# How a lock may reach the thief: (public model's γ/β, its locked filters, what the thief does first).
FORMS = {"zeros": ("zeros", "erased", "none"), "revive": ("zeros", "erased", "revive"),
         "noise": ("noise", "random", "none"), "kept": ("zeros", "kept", "none"),
         "kept+revive": ("zeros", "kept", "revive")}
SYNAPSE_FORMS = ("zeros", "revive", "noise")  # a synapse lock has no filters to keep


def _lock_targets(kind: str, importance: str, mode: str, value: float, base: nn.Module, masks, ds: Dataset,
                  forms=tuple(FORMS), schedules=("best", "strong"), head_seed: int | None = None) -> list[Target]:
    """One lock in each of `forms` (see FORMS and the module docstring)."""
    n = count_removed(masks)[0]
    synapse = is_synapse(masks)
    found = []
    for form in forms:
        init, filters, thief = FORMS[form]
        model = locked_copy(base, masks, NOISE_SEED if init == "noise" else None, keep_filters=filters == "kept",
                            head_seed=head_seed)
        if thief == "revive":
            if synapse:
                from .synlock import revive_synapses
                revive_synapses(model)
            else:
                revive(model)
        t = Target(kind, importance, mode, value, n, init, model, evaluate(model, ds, ds.test)[0], masks, thief,
                   schedules, filters=filters, granularity="synapse" if synapse else "channel")
        t.signature = repr((form, schedules)).encode() + _sig(masks)
        found.append(t)
    return found


def _sig(masks) -> bytes:
    return b"".join(k.encode() + masks[k].cpu().numpy().tobytes() for k in sorted(masks))


def _fresh(spec) -> nn.Module:
    from .models import build_model
    return build_model(spec.arch, spec.num_classes, spec.in_channels, spec.width).eval()


def steal(model: nn.Module, ds: Dataset, sched: Schedule, cfg, masks: dict | None = None) -> tuple[float, float]:
    """Fine-tune a copy of `model` under `sched` (its data_fraction is the slice of the training data used), every
    weight free unless `masks` holds some at zero (the owner's run); its (top-1, top-3) on the test split."""
    m = copy.deepcopy(model).to(ds.train.x.device)
    ft = cfg.finetune
    finetune(m, masks or {}, ds, sched, batch_size=ft.batch_size, momentum=ft.momentum,
             weight_decay=ft.weight_decay, precision=ft.precision)
    return evaluate(m, ds, ds.test)


def runs(tg: Target, best: Schedule, fractions, n_train: int, batch: int) -> list[tuple]:
    """(attacker fraction, schedule name, Schedule, masks) of every fine-tune of one target. Besides the thief's
    runs, a lock gets the owner's: the best schedule exactly as swept, the masks held, i.e. the level this lock could
    sell (its attacker fraction is the schedule's data fraction)."""
    out = [(f, name, s, None) for f in fractions for name, s in schedules(best, f, n_train, batch)
           if name in tg.schedules]
    if tg.masks is not None and tg.init == "zeros" and tg.filters == "erased" and tg.thief_init == "none":
        out.append((best.data_fraction, "owner", best, tg.masks))
    return out


def run_attack(out_dir: str | Path, fractions=FRACTIONS, seeds=(0,), compare: bool = True,
               forms=None) -> pd.DataFrame:
    """`gradauth attack DIR`: DIR/attack.parquet and DIR/attack.md; returns the table. `forms` (None: all of FORMS)
    are the public model's forms attacked; `compare` adds the alt locks."""
    from .data import load_dataset
    from .rundir import git_sha, read_config
    out = Path(out_dir)
    cfg = read_config(out)
    check_forms(forms, "noise" if cfg.release.noise_init else "zeros")   # before minutes of loading
    if not (out / rundir.TRIALS).is_file():
        raise GradauthError(f"{out / 'trials.parquet'} not found: run `gradauth sweep` (and `gradauth select`) first")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise GradauthError(f"attacker fractions {bad} are outside (0, 1]: give fractions of the training split")
    ds = load_dataset(cfg.data, cfg.seed)
    derived = derived_from(out)
    found, public = targets(out, cfg, ds, compare, forms)
    best = best_schedule(out, public["importance"], public["lock_mode"], public["lock_value"],
                         public["lock_granularity"])
    level_accs = [float(lv["fine_acc"]) for lv in sorted(public["levels"], key=lambda lv: int(lv["level"]))]
    dsd = ds.to(pick_device())
    prov = {"experiment": cfg.name, "dataset": ds.name, "arch": cfg.model.arch, "git_sha": git_sha(),
            "config_hash": cfg.hash()}
    rows, done = [], {}
    for tg in found:
        twin = done.get(tg.signature) if tg.signature else None
        if twin is not None:  # same masks and init as a target already attacked: same runs, same numbers
            rows += [r | _describe(tg) | {"same_masks_as": attack_label(twin[0]), "seconds": 0.0} for r in twin]
            continue
        mine = []
        for f, sched, schedule, masks in runs(tg, best, fractions, len(ds.train), cfg.finetune.batch_size):
            for seed in seeds:
                t0 = time.perf_counter()
                run = replace(schedule, seed=seed)
                acc, top3 = steal(tg.model, dsd, run, cfg, masks)
                reached = [i + 1 for i, a in enumerate(level_accs) if acc >= a]
                mine.append(_describe(tg) | {
                    "attacker_fraction": f, "attacker_images": max(1, int(round(len(ds.train) * f))),
                    "schedule": sched, **to_row(run), "recovered_acc": acc,
                    "recovered_top3": top3, "level_accs": level_accs,
                    "best_level_reached": min(reached) if reached else None, "same_masks_as": None,
                    "seconds": time.perf_counter() - t0, **prov,
                    "lock_granularity": tg.granularity})  # last: the columns before it are as they always were
                print(f"[attack] {attack_label(mine[-1])} {f:.0%} {sched:6s} ({run.epochs} ep): {acc:.4f}", file=sys.stderr)
        if tg.signature:
            done[tg.signature] = mine
        rows += mine
    df = pd.DataFrame(rows)
    df["best_level_reached"] = df["best_level_reached"].astype("Int64")
    head_starts(df, public.get("released_init", "zeros"))  # every fraction attacked from both, or refuse
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata((table.schema.metadata or {}) | {META_KEY: json.dumps(derived).encode()})
    with atomic_path(out / rundir.ATTACK) as tmp:
        pq.write_table(table, tmp)
    text = md_stamp(derived) + "\n" + report(df, public, best)
    write_text(out / rundir.ATTACK_MD, text)
    print(text)
    return df


META_KEY = b"gradauth"
MD_STAMP = "<!-- gradauth derived_from: "


def derived_from(out: Path) -> dict:
    """sha256 of the files an attack of DIR is derived from (None for a file that is not there)."""
    sha = lambda p: file_sha256(p) if p.is_file() else None
    return {"levels_sha256": sha(out / rundir.LEVELS), "trials_sha256": sha(out / rundir.TRIALS),
            "manifest_sha256": sha(out / rundir.RELEASE / MANIFEST)}


def md_stamp(derived: dict) -> str:
    return MD_STAMP + json.dumps(derived, sort_keys=True) + " -->"


def read_derived(parquet: Path) -> dict | None:
    """What attack.parquet says it was derived from, or None (an older file, or one not written by gradauth)."""
    try:
        raw = (pq.read_schema(parquet).metadata or {}).get(META_KEY)
        doc = json.loads(raw) if raw else None
    except Exception:
        return None
    return doc if isinstance(doc, dict) else None


def _describe(tg: Target) -> dict:
    return {"target": tg.target, "lock_importance": tg.importance, "lock_mode": tg.lock_mode,
            "lock_value": tg.lock_value, "locked_channels": tg.locked_channels, "init": tg.init,
            "filters": tg.filters, "thief_init": tg.thief_init, "prun_acc": tg.prun_acc}


def attack_label(r) -> str:
    if r["target"] == "scratch":
        return "scratch (random init)"
    how = r["init"] + (", filters kept" if r["filters"] == "kept" else "") + (
        ", revived by the thief" if r["thief_init"] == "revive" else "")
    syn = " synapse" if r.get("lock_granularity") == "synapse" else ""
    return f"{r['target']} {r['lock_importance']}{syn} {r['lock_mode']} {r['lock_value']:g} ({how})"


def head_starts(df: pd.DataFrame, released_init: str = "zeros") -> list[dict]:
    """Per thief fraction: the best recovered accuracy from the public model as released (`zeros` and the careful
    thief's `revive` of it, or `noise` for a noise_init release; any schedule), from scratch (any schedule), and the
    head start public − scratch. Refuses (an internal error) a fraction that lacks either side."""
    forms = {("noise", "none")} if released_init == "noise" else {("zeros", "none"), ("zeros", "revive")}
    thief = df[df["schedule"] != "owner"]
    pub = thief[(thief["target"] == "public") & (thief["filters"] != "kept")
                & pd.Series([(i, t) in forms for i, t in zip(thief["init"], thief["thief_init"])], index=thief.index,
                            dtype=bool)]
    scr = thief[thief["target"] == "scratch"]
    mean = lambda d: d.groupby(["attacker_fraction", "schedule", "init", "thief_init"])["recovered_acc"].mean()
    out = []
    for f in sorted(set(thief["attacker_fraction"])):
        p, s = mean(pub[pub["attacker_fraction"] == f]), mean(scr[scr["attacker_fraction"] == f])
        if p.empty or s.empty:
            raise GradauthError(f"the attack has no {'public' if p.empty else 'scratch'} run at {f:.0%} of the data: "
                                f"every fraction needs both; re-run `gradauth attack`")
        out.append({"fraction": float(f), "public": float(p.max()), "scratch": float(s.max()),
                    "head_start": float(p.max() - s.max())})
    return out


def report(df: pd.DataFrame, public: dict, best: Schedule) -> str:
    """attack.md: one line per starting model, recovered accuracy per (thief's data, schedule), the level reached."""
    levels = sorted(public["levels"], key=lambda lv: int(lv["level"]))
    df = df.assign(label=df.apply(attack_label, axis=1), column=[
        "owner, all data" if s == "owner" else f"{f:.0%} {s}" for f, s in zip(df["attacker_fraction"], df["schedule"])])
    columns = list(dict.fromkeys(df.sort_values(["attacker_fraction", "schedule"])["column"]))
    synapse = public.get("lock_granularity") == "synapse"
    head = ["start from", "hidden synapses" if synapse else "locked ch.", "acc before fine-tune", *columns]
    lines = ["# Attack: fine-tuning the public model without a key", "",
             "Levels (what the keys sell): " + "; ".join(f"level {lv['level']} {float(lv['fine_acc']):.3f}"
                                                         for lv in levels) + ".",
             f"Public model: {public['importance']}{' synapse' if synapse else ''} {public['lock_mode']} "
             f"{public['lock_value']:g}, {public['locked_channels']} {'synapses hidden' if synapse else 'channels locked'}"
             f", accuracy {public['prun_acc']:.3f}"
             + (", classifier head redrawn (release.erase_head)" if public.get("erase_head") else "") + ".", "",
             *(["Synapse lock (NNSlicer's protection experiment): the hidden weights are zero in the public model; "
                "`revived by the thief` = every exactly-zero conv/linear weight redrawn like the layer's init; "
                "`noise` = hidden weights redrawn from their layer's kept ones; `alt` = the synapse locks of slice, "
                "weight (|w|) and random at the same rate.", ""] if synapse else []),
             "The thief trains every weight (nothing held at zero) on 1/5/10 % of the labelled training data: "
             f"`best` = the sweep's best schedule for the public lock ({schedule_label(schedule_dict(best))}) on "
             f"the thief's data; `strong` = as many steps as `best` takes on its share of all the data "
             f"(≥ {STRONG_MIN_FACTOR} × its epochs); "
             "`owner` = the best schedule as swept, with the masks held: what that lock could sell. "
             "`zeros` = the lock as `gradauth release` writes it (locked γ/β zero, their conv filters erased); "
             "`revived by the thief` = its all-zero γ/β (the zeros show which channels are locked) reset to γ 1, "
             "β 0 and blank filters redrawn before fine-tuning; `filters kept` = the paper's plain lock, trained "
             "filters left in; `noise` = a `release.noise_init` release (locked γ/β redrawn from their layer, "
             "random filters: the thief cannot see the lock). "
             "Cells: top-1 on the test split (mean over seeds), and `Lk` when it reaches level k's accuracy.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, g in df.groupby("label", sort=False):
        cells = []
        for c in columns:
            r = g[g["column"] == c]
            reached = r["best_level_reached"].min() if len(r) else None
            cells.append("" if r.empty else f"{r['recovered_acc'].mean():.3f}" +
                         ("" if pd.isna(reached) else f" L{int(reached)}"))
        same = g["same_masks_as"].iloc[0]
        name = label + (f" (same masks as {same})" if isinstance(same, str) else "")
        before = g["prun_acc"].iloc[0]
        at_start = [int(lv["level"]) for lv in levels if before >= float(lv["fine_acc"])]
        start = f"{before:.3f}" + (f" L{min(at_start)}" if at_start else "")
        lines.append(f"| {name} | {g['locked_channels'].iloc[0]} | {start} | " + " | ".join(cells) + " |")
    init = public.get("released_init", "zeros")
    lines += ["", "## Head start: the public model against training from scratch", "",
              f"Public lock chosen by: {public.get('chosen_by', 'levels_union')} ({public.get('why', '')}).", "",
              "Per fraction of the labelled data: the thief's best from the public model as released ("
              + ("noise init" if init == "noise" else "zeros, or revived by the thief") + ", any schedule), the best "
              "from scratch on the same data (any schedule), and the head start the public model gives.", "",
              "| thief's data | from the public model | from scratch | head start |", "|---|---|---|---|"]
    for h in head_starts(df, init):
        lines.append(f"| {h['fraction']:.0%} | {h['public']:.3f} | {h['scratch']:.3f} | {h['head_start']:+.3f} |")
    return "\n".join(lines) + "\n"


__all__ = ["run_attack", "derived_from", "read_derived", "md_stamp", "targets", "alt_targets", "calibrate", "steal", "runs", "best_schedule", "schedules", "report", "head_starts",
           "FRACTIONS"]
