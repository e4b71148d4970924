"""Licensed release: one public locked model, one encrypted pack per level, keys for the owner only.

`gradauth release DIR` reads `levels.json`, `trials.parquet` and `models/<trial_id>.pt` and writes `DIR/release/`:

- `locked.pt`: the public model, a normal model file (no masks inside). Its lock is chosen for protection,
  independently of the levels' locks (each pack holds a complete model): among the locks that thief trials of the
  sweep measured (rows `thief-…` of trials.parquet, see select.py), the one whose thief recovery is closest to
  training from scratch, i.e. the smallest worst head start (public thief − scratch thief, best schedule at each
  of the thief's data fractions; ties: the stronger lock), among those whose locked accuracy is ≤ the lock bound
  and that were measured at every fraction the scratch thief was (`choose_public`). Without thief rows it is, as
  before, the base model locked at the union of the levels' locks (for rate or threshold locks of one importance
  source the removed sets are nested, so this is the strongest lock among the levels); the manifest's
  `locked.chosen_by` and `locked.why` say which, and `thief` holds the thief figures (per fraction: public,
  scratch, head start) of the chosen lock. The model has γ and β of the removed channels at zero and, beyond the paper's lock,
  their conv filters and BN running statistics erased (`erase`): that changes no output of the locked model, but the
  filters are the trained feature detectors a thief would otherwise revive for free. With `release.noise_init` the
  locked γ/β are redrawn from the same layer's unlocked ones and the filters are random, so nothing shows which
  channels were removed. Its measured test accuracy is in the manifest; a release whose public model is above the
  lock bound is refused.
- `level-K.pack`: what level K needs and nothing else: `checkpoint.to_bytes` of the physically compacted fine-tuned
  model, its masks and its spec, sealed with AES-256-GCM. Layout: `MAGIC` (16 bytes) ‖ nonce (12 random bytes) ‖
  ciphertext ‖ tag (16 bytes). The associated data binds the experiment, the level number and the locked model's
  sha256, so a pack cannot be moved to another level or another release. Per level the seed trial nearest the
  level's mean fine_acc is packed; the accuracy of the model rebuilt from the pack is the level's expected accuracy.
- `manifest.json`: experiment, locked model and levels with their expected accuracies, sha256 and size of every
  published file, and per level a key id and a MAC of the manifest under that level's key (so a key holder detects
  an edited manifest, not only edited files).
- `manifest.json` also carries a `release_id` (UTC time + random), which the owner's keys file repeats.

The owner's keys are written OUTSIDE the published folder, to `DIR/keys/owner-keys.json` (folder 0700, file 0600,
fsynced): one fresh random 256-bit key per level, urlsafe base64, with the release id and the manifest's sha256. The
keys are printed once; this file is the owner's only other copy. `release/` holds only what is published, so
`cp -r`/`aws s3 sync` of it ships no key.

Keys are never lost: `release_dir` refuses a folder that already has a release (or keys) unless `new_keys=True`,
and then moves the old keys and the old release (which they still open) to `DIR/keys/archive/<release id>/` before
the new ones take their place; never an overwrite. Every step is a rename of something already complete on disk,
undone in reverse order if a later one fails, so a failure midway leaves the old release and keys where they were
(a crash midway leaves them in the archive folder). A release of the old layout (keys inside `release/`) is archived
the same way, its keys moved next to it. `unlock_to_file` writes only a new regular file (or, with `force`, replaces
a regular file) outside the release and keys folders, atomically.

Each key K is expanded with HKDF-SHA256 into three independent subkeys (AES-GCM key, key id, manifest MAC), so one
secret is never used by two primitives. `unlock` checks in this order, each failure one clear GradauthError: manifest
readable → files match their sizes and hashes → the key parses → the key's id is level K's (else: "does not open
level K", naming the level it does open if any) → the manifest MAC → AES-GCM authentication → the plaintext is a
gradauth model file, read with `weights_only=True` so no pickled code runs.

What the encryption protects is the fine-tuned weights of each level. It does not make the public model useless to
someone with data: `gradauth attack` measures how much of each level a thief recovers by fine-tuning it.
"""
from __future__ import annotations

import base64
import binascii
import copy
import datetime
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch
import torch.nn as nn

from . import rundir
from .checkpoint import from_bytes, load_model_file, rebuild, to_bytes
from .compact import compact
from .errors import GradauthError
from .models import bn_layers
from .prune import Masks, apply_masks, count_removed, is_synapse, masks_from_model

FORMAT = "gradauth-release/1"
MAGIC = b"gradauth-pack/1\n"   # 16 bytes; also part of the associated data
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
LOCKED = "locked.pt"
MANIFEST = "manifest.json"
OWNER_KEYS = "owner-keys.json"
RELEASE = rundir.RELEASE             # DIR/release/: what is published
KEYS = rundir.KEYS                   # DIR/keys/ (0700): the owner's keys, never published
ARCHIVE = "archive"             # DIR/keys/archive/<release id>/: replaced releases and their keys
PUBLIC_MODE = 0o644             # what is published is world-readable; owner-keys.json is 0600
SECRET_DIR_MODE = 0o700


def pack_name(level: int) -> str:
    return f"level-{level}.pack"


# ---- keys and sealing ---------------------------------------------------------------------------------------

KEY_PREFIX = "gak_"  # also keeps a key that would start with "-" from reading as a command-line option


def encode_key(key: bytes) -> str:
    return KEY_PREFIX + base64.urlsafe_b64encode(key).decode().rstrip("=")


def decode_key(text: str) -> bytes:
    s = text.strip().removeprefix(KEY_PREFIX)
    try:
        key = base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES or not s:
        raise GradauthError(f"the key is not a gradauth level key ({KEY_PREFIX} and 43 urlsafe base64 characters, as `gradauth release` "
                            "printed it): copy it again from owner-keys.json")
    return key


def _subkey(key: bytes, purpose: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=f"gradauth/1 {purpose}".encode()).derive(key)


def key_id(key: bytes) -> str:
    return _subkey(key, "key id").hex()[:16]


def _aad(experiment: str, level: int, locked_sha256: str) -> bytes:
    return MAGIC + json.dumps({"experiment": experiment, "level": level, "locked_sha256": locked_sha256},
                              sort_keys=True, separators=(",", ":")).encode()


def seal(plaintext: bytes, key: bytes, aad: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    nonce = secrets.token_bytes(NONCE_BYTES)
    return MAGIC + nonce + AESGCM(_subkey(key, "aes-gcm")).encrypt(nonce, plaintext, aad)


def open_sealed(data: bytes, key: bytes, aad: bytes, where: str) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    if len(data) < len(MAGIC) + NONCE_BYTES + TAG_BYTES or not data.startswith(MAGIC):
        raise GradauthError(f"{where} is not a gradauth pack (too short or wrong header): get an intact copy of the "
                            "release")
    nonce, body = data[len(MAGIC):len(MAGIC) + NONCE_BYTES], data[len(MAGIC) + NONCE_BYTES:]
    try:
        return AESGCM(_subkey(key, "aes-gcm")).decrypt(nonce, body, aad)
    except InvalidTag:
        raise GradauthError(f"{where} failed authentication: it was altered, truncated or belongs to another level or "
                            "release; get an intact copy of the release")


def _canonical(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "macs"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def manifest_mac(manifest: dict, key: bytes) -> str:
    return hmac.new(_subkey(key, "manifest mac"), _canonical(manifest), hashlib.sha256).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the public model ---------------------------------------------------------------------------------------

def union_masks(all_masks: list[Masks]) -> Masks:
    """Keep a channel only where every level keeps it: the strongest lock when the locks are nested."""
    out = {}
    for masks in all_masks:
        for name, keep in masks.items():
            out[name] = out[name] & keep.bool() if name in out else keep.bool().clone()
    return out


@torch.no_grad()
def noise_fill(model: nn.Module, masks: Masks, gen: torch.Generator) -> None:
    """Give every removed channel a γ and β drawn from the same layer's kept channels (all layers' if none kept)."""
    bns = bn_layers(model)
    kept = [(bns[n].weight[m], bns[n].bias[m]) for n, m in masks.items()]
    pool_g = torch.cat([g for g, _ in kept]).detach()
    pool_b = torch.cat([b for _, b in kept]).detach()
    for name, keep in masks.items():
        bn, removed = bns[name], ~keep
        if not removed.any() or not len(pool_g):
            continue
        g, b = (bn.weight[keep], bn.bias[keep]) if keep.any() else (pool_g, pool_b)
        n = int(removed.sum())
        bn.weight[removed] = g[torch.randint(len(g), (n,), generator=gen)]
        bn.bias[removed] = b[torch.randint(len(b), (n,), generator=gen)]


def producers(model: nn.Module) -> dict[str, nn.Conv2d]:
    """BN name → the conv whose output only that BN reads: the feature detector behind each of its channels.

    BNs that read something else (a concat, an add) have none and are left out."""
    import torch.fx as fx
    modules = dict(model.named_modules())
    found = {}
    for node in fx.symbolic_trace(model).graph.nodes:
        if node.op != "call_module" or node.target not in bn_layers(model):
            continue
        src = node.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(modules[src.target], nn.Conv2d)
                and modules[src.target].groups == 1 and len(src.users) == 1):
            found[node.target] = modules[src.target]
    return found


def fresh_filters(conv: nn.Conv2d, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """New random filters for `rows` of `conv`, drawn like nn.Conv2d's own init (uniform ±1/√fan_in)."""
    shape = (int(rows.sum()), *conv.weight.shape[1:])
    bound = 1.0 / math.sqrt(conv.weight[0].numel())
    return (torch.rand(shape, generator=gen) * 2 - 1).mul_(bound).to(conv.weight)


def locked_channels(model: nn.Module, masks: Masks):
    """(BN, the conv feeding it or None, bool mask of its locked channels) for every BN with a locked channel."""
    prods, bns = producers(model), bn_layers(model)
    for name, keep in masks.items():
        if (~keep).any():
            yield bns[name], prods.get(name), ~keep


@torch.no_grad()
def erase(model: nn.Module, masks: Masks, gen: torch.Generator | None = None) -> None:
    """Remove what a lock leaves of each locked channel: its conv filter (zeros; random with `gen`) and its BN
    running statistics (0 and 1). With γ = β = 0 the channel's output is 0 whatever these hold, so the locked model
    computes exactly the same; but the filter is the trained feature detector, and a thief who resets γ/β of the
    visibly zero channels would otherwise get it back for free (`gradauth attack`, "revived")."""
    for bn, conv, removed in locked_channels(model, masks):
        bn.running_mean[removed], bn.running_var[removed] = 0.0, 1.0
        if conv is not None:
            conv.weight[removed] = 0.0 if gen is None else fresh_filters(conv, removed, gen)
            if conv.bias is not None:
                conv.bias[removed] = 0.0


def locked_copy(base: nn.Module, masks: Masks, noise_seed: int | None = None, keep_filters: bool = False,
                head_seed: int | None = None):
    """The public model: a copy of `base` with `masks` applied, the locked channels' filters erased (`erase`).

    With `noise_seed` the locked γ/β are redrawn (noise_fill) and the erased filters are random instead of zero, so
    nothing marks the locked channels. `keep_filters` gives the plain lock (only γ/β zeroed), for comparison. With
    `head_seed` the classifier head is redrawn too (`erase_head`, `release.erase_head`). No gradient hooks stay
    behind: whoever holds the public model may train every weight.

    A synapse lock (weight masks, `lock.granularity: synapse`) has nothing more to erase (the hidden weights are
    zero); with `noise_seed` they are redrawn from their layer's kept weights (synlock.noise_fill_synapses)."""
    model = copy.deepcopy(base)
    for h in apply_masks(model, masks):
        h.remove()
    gen = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None
    if is_synapse(masks):
        if gen is not None:
            from .synlock import noise_fill_synapses
            noise_fill_synapses(model, masks, gen)
        if head_seed is not None:
            erase_head(model, torch.Generator().manual_seed(head_seed))
        return model.eval()
    if not keep_filters:
        erase(model, masks, gen)
    if gen is not None:
        noise_fill(model, masks, gen)
    if head_seed is not None:
        erase_head(model, torch.Generator().manual_seed(head_seed))
    return model.eval()


HEAD_SEED = 20261201   # the head a thief trial / an attack redraws (a release draws its own, secret)


@torch.no_grad()
def erase_head(model: nn.Module, gen: torch.Generator) -> int:
    """Redraw every nn.Linear (the classifier head) as nn.Linear initialises itself (weight and bias uniform in
    ±1/√fan_in). A lock erases channels; the head that maps the base's features to the classes is trained knowledge
    too, and a thief who revives every locked channel keeps it: on the CIFAR-10 CPU base at a 99 % lock, a revived
    thief with 5 % of the labels reached 0.395 with the trained head and 0.297 with a redrawn one (scratch 0.280).
    Returns the number of layers redrawn."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.in_features)
            m.weight.copy_((torch.rand(m.weight.shape, generator=gen) * 2 - 1).mul_(bound))
            if m.bias is not None:
                m.bias.copy_((torch.rand(m.bias.shape, generator=gen) * 2 - 1).mul_(bound))
            n += 1
    return n


@torch.no_grad()
def revive(model: nn.Module, seed: int = 0) -> int:
    """What a thief does first with a zeros release: every channel whose γ and β are both exactly 0 (every locked
    channel: the zeros show them) gets BN's initial γ = 1, β = 0, and an all-zero conv filter feeding it a fresh
    random one, so gradients flow through it again. Returns the number of channels revived."""
    gen, n = torch.Generator().manual_seed(seed), 0
    for bn, conv, dead in locked_channels(model, masks_from_model(model)):
        bn.weight[dead], bn.bias[dead] = 1.0, 0.0
        if conv is not None:
            blank = dead & (conv.weight.flatten(1).abs().sum(1) == 0)
            if blank.any():
                conv.weight[blank] = fresh_filters(conv, blank, gen)
        n += int(dead.sum())
    return n


RELEASE_TRIAL_COLUMNS = ["trial_id", "status", "fine_acc", "importance", "lock_mode", "lock_value",
                         "locked_channels"]


def read_levels(out: Path, trials=None) -> dict:
    """DIR/levels.json through schema.read_levels (validated; with `trials`, its trial ids checked against them)."""
    from .schema import read_levels as read
    return read(out / rundir.LEVELS, trials)


def chosen_trials(out: Path, doc: dict, trials=None):
    """Per level, the ok seed trial whose fine_acc is nearest the level's mean (ties: first trial id)."""
    from .schema import read_trials
    if trials is None:
        trials = read_trials(out / rundir.TRIALS, RELEASE_TRIAL_COLUMNS)
    chosen = []
    for lv in doc["levels"]:
        rows = trials[trials["trial_id"].isin(lv["trial_ids"]) & (trials["status"] == "ok")].sort_values("trial_id")
        if rows.empty:
            raise GradauthError(f"level {lv['level']} of levels.json names no ok trial of trials.parquet: "
                                f"re-run `gradauth select {out}`")
        # The mean of the seeds themselves (levels.json rounds it to 6 digits, which would break two-seed ties).
        dist = (rows["fine_acc"] - rows["fine_acc"].mean()).abs().round(9)
        row = rows.loc[dist.idxmin()]  # idxmin takes the first minimum, and rows are in trial_id order
        path = rundir.model_path(out, row['trial_id'])
        if not path.is_file():
            raise GradauthError(f"{path} not found: the sweep keeps every ok trial's model; re-run `gradauth sweep`")
        chosen.append((lv, row, path))
    return chosen


def public_lock(out: Path, doc: dict | None = None):
    """What the public model is made of: (levels.json, [(level, trial row, model file)], masks, importance).
    `public_model` says more (how the lock was chosen, the thief figures)."""
    p = public_model(out, doc)
    return p["doc"], p["chosen"], p["masks"], p["importance"]


UNION = "levels_union"
THIEF = "thief"


def public_model(out: Path, doc: dict | None = None) -> dict:
    """The public model's lock: {doc, chosen, masks, importance, choice} where `choice` is `choose_public`'s (with
    `lock_mode`/`lock_value` of the lock). trials.parquet and levels.json are validated (schema.py), and a
    levels.json selected from another version of trials.parquet (it records the sha256 of the one it came from) is
    refused."""
    from .rundir import lock_bound, read_config
    from .schema import check_levels_current, read_trials
    trials = read_trials(out / rundir.TRIALS, RELEASE_TRIAL_COLUMNS + ["num_classes", "prun_acc", "ft_epochs",
                                                                          "ft_lr", "ft_data_fraction", "ft_scope"])
    if doc is None:
        doc = read_levels(out, trials)
        check_levels_current(doc, out / rundir.LEVELS, out / rundir.TRIALS)
    chosen = chosen_trials(out, doc, trials)
    classes = pd.to_numeric(trials["num_classes"]).dropna().unique()
    bound = lock_bound(read_config(out), int(classes[0])) if len(classes) == 1 else None
    choice = choose_public(trials, bound) if bound is not None else {
        "chosen_by": UNION, "why": "trials.parquet mixes num_classes, so no lock bound: the union of the levels' locks"}
    if choice["chosen_by"] == THIEF:
        masks = _thief_lock_masks(out, choice)
        importance = choice["importance"]
    else:
        masks = union_masks([load_model_file(p)["masks"] for _, _, p in chosen])
        importance = "+".join(sorted({str(r["importance"]) for _, r, _ in chosen}))
        strongest = max(chosen, key=lambda c: int(c[1]["locked_channels"]))[1]
        choice |= {"lock_mode": str(strongest["lock_mode"]), "lock_value": float(strongest["lock_value"])}
    # channel | synapse (a union of synapse locks of one source at several rates is the strongest of them per layer)
    choice["lock_granularity"] = "synapse" if is_synapse(masks) else "channel"
    return {"doc": doc, "chosen": chosen, "masks": masks, "importance": importance, "choice": choice}


def choose_public(trials, bound: float) -> dict:
    """Pick the public lock from the thief rows of `trials` (plain rows, no models): {chosen_by: thief, importance,
    lock_mode, lock_value, locked_channels, prun_acc, worst_head_start, by_fraction: [{fraction, public, scratch,
    head_start}], candidates: [...], why} or {chosen_by: levels_union, why} when no measured lock qualifies."""
    from .schema import thief_rows
    from .select import head_start, lock_label, thief_table
    thieves = trials[thief_rows(trials)]
    union = lambda why: {"chosen_by": UNION, "why": f"{why}: the union of the levels' locks"}
    if thieves.empty:
        return union("no thief trials in trials.parquet")
    t = thief_table(thieves)
    fracs = sorted(set(t.loc[t["kind"] == "scratch", "ft_data_fraction"].astype(float)))
    if not fracs:
        return union("no finished from-scratch thief trial to compare the public locks with")
    cands, skipped = [], []
    for (imp, mode, value), g in t[t["kind"] == "public"].groupby(["importance", "lock_mode", "lock_value"], sort=True):
        name = f"{imp} {lock_label(mode, float(value))}"
        fig = head_start(t, (imp, mode, float(value)))
        heads = {r["fraction"]: r["head_start"] for r in fig}
        missing = [f for f in fracs if heads.get(f) is None]
        prun = float(g["prun_acc"].max())
        if missing:
            skipped.append(f"{name}: no thief trial at {', '.join(f'{100 * f:g}%' for f in missing)} of the data")
        elif not prun <= bound + 1e-9:
            skipped.append(f"{name}: locked accuracy {prun:.3f} above the lock bound {bound:.3f}")
        else:
            cands.append({"importance": str(imp), "lock_mode": str(mode), "lock_value": float(value),
                          "locked_channels": int(g["locked_channels"].max()), "prun_acc": round(prun, 6),
                          "worst_head_start": round(max(heads[f] for f in fracs), 6),
                          "by_fraction": [r for r in fig if r["fraction"] in fracs]})
    if not cands:
        return union("no thief-measured lock qualifies (" + "; ".join(skipped) + ")" if skipped else
                     "no finished thief trial on a public model")
    best = min(cands, key=lambda c: (c["worst_head_start"], -c["locked_channels"], c["lock_value"]))
    why = (f"of {len(cands)} thief-measured lock(s) at or under the lock bound {bound:.3f}, the one whose thief "
           f"recovery is closest to training from scratch: worst head start {best['worst_head_start']:+.3f} over "
           f"{', '.join(f'{100 * f:g}%' for f in fracs)} of the data")
    return {"chosen_by": THIEF, **best, "candidates": cands, "skipped": skipped, "why": why}


def _thief_lock_masks(out: Path, choice: dict) -> Masks:
    """The masks of a thief-measured lock, recomputed from base.pt and the config's importance source; refused if
    they do not lock as many channels as the thief trials recorded (base.pt is not the sweep's)."""
    from .data import load_dataset
    from .importance import get_importance
    from .rundir import read_config
    from .prune import lock_masks
    cfg = read_config(out)
    imp = next((i for i in cfg.importance if i.label == choice["importance"]), None)
    if imp is None:
        raise GradauthError(f"the thief trials' lock uses importance {choice['importance']!r}, which config.yaml does "
                            f"not define: re-run the sweep with this config")
    base, _, _ = rebuild(load_model_file(out / rundir.BASE))
    ds = load_dataset(cfg.data, cfg.seed)  # a criterion may read the data (slice, plugins)
    masks = lock_masks(get_importance(imp)(base, ds), choice["lock_mode"], choice["lock_value"])
    n = count_removed(masks)[0]
    if n != choice["locked_channels"]:
        raise GradauthError(f"the public lock {choice['lock_mode']} {choice['lock_value']:g} removes {n} channels of "
                            f"base.pt but the thief trials recorded {choice['locked_channels']}: base.pt is not the "
                            f"model the sweep ran on; re-run the sweep")
    return {k: v.bool() for k, v in masks.items()}


# ---- release ------------------------------------------------------------------------------------------------

def _level_pack(lv: dict, row, path: Path, ds, experiment: str) -> tuple[bytes, dict]:
    """Plaintext of a level's pack and its manifest entry, checked by rebuilding the model from the bytes."""
    from .engine import evaluate, predict
    model, spec, masks = rebuild(load_model_file(path))
    small = compact(model, masks, spec.example())
    extra = {"experiment": experiment, "level": int(lv["level"]), "trial_id": str(row["trial_id"])}
    plain = to_bytes(small, spec, masks, compacted=True, extra=extra)
    again, _, _ = rebuild(from_bytes(plain, f"level {lv['level']} pack"))
    top1, top3 = evaluate(again, ds, ds.test)
    mismatched = int((predict(again, ds, ds.test).argmax(1) != predict(model, ds, ds.test).argmax(1)).sum())
    if mismatched:
        print(f"[release] level {lv['level']}: the compacted model disagrees with the sweep's on {mismatched} test "
              "images (float rounding); its own accuracy is the expected one", file=sys.stderr)
    locked, total = count_removed(masks)
    syn = {"lock_granularity": "synapse"} if is_synapse(masks) else {}  # locked/total_channels then count synapses
    entry = {"level": int(lv["level"]), "file": pack_name(int(lv["level"])), "trial_id": str(row["trial_id"]),
             "importance": str(row["importance"]), "lock_mode": str(row["lock_mode"]),
             "lock_value": float(row["lock_value"]), "locked_channels": locked, "total_channels": total,
             "schedule": lv.get("schedule"), "seed": int(row["seed"]), "expected_acc": top1, "expected_top3": top3,
             "sweep_fine_acc": float(row["fine_acc"]), "level_fine_acc": float(lv["fine_acc"]),
             "prediction_mismatches": mismatched, "params": sum(p.numel() for p in small.parameters()), **syn}
    return plain, entry


def build_release(out: Path) -> tuple[dict, dict[str, bytes], dict[int, bytes]]:
    """Everything `release_dir` writes, in memory: (manifest, {file name: bytes}, {level: key})."""
    from .data import load_dataset
    from .engine import evaluate
    from .rundir import git_sha, lock_bound, read_config
    cfg = read_config(out)
    pub = public_model(out)
    doc, chosen, masks, importance, choice = pub["doc"], pub["chosen"], pub["masks"], pub["importance"], pub["choice"]
    experiment = str(doc.get("experiment") or cfg.name)
    ds = load_dataset(cfg.data, cfg.seed)
    bound = lock_bound(cfg, ds.num_classes)
    noise_seed = secrets.randbits(63) if cfg.release.noise_init else None  # secret: a known seed would show the lock
    base, spec, _ = rebuild(load_model_file(out / rundir.BASE))
    head_seed = secrets.randbits(63) if cfg.release.erase_head else None
    public = locked_copy(base, masks, noise_seed, head_seed=head_seed)
    acc, top3 = evaluate(public, ds, ds.test)
    if acc > bound:
        raise GradauthError(f"the public locked model has accuracy {acc:.4f}, above the lock bound {bound:.4f}: select "
                            "levels with a stronger lock (or set release.noise_init: false) before releasing")
    files = {LOCKED: to_bytes(public, spec, extra={"experiment": experiment, "locked": True})}
    locked, total = count_removed(masks)
    manifest = {"format": FORMAT, "experiment": experiment, "method": doc.get("method"), "dataset": ds.name,
                "arch": spec.arch, "num_classes": spec.num_classes, "git_sha": git_sha(), "config_hash": cfg.hash(),
                "locked": {"file": LOCKED, "importance": importance, "locked_channels": locked, "total_channels": total,
                           "init": "noise" if noise_seed is not None else "zeros",
                           "head": "redrawn" if head_seed is not None else "trained", "test_acc": acc, "test_top3": top3,
                           "lock_bound": bound, "lock_mode": choice["lock_mode"], "lock_value": choice["lock_value"],
                           "chosen_by": choice["chosen_by"], "why": choice["why"],
                           **({"lock_granularity": "synapse"} if is_synapse(masks) else {})},
                "thief": None if choice["chosen_by"] != THIEF else {
                    "by_fraction": choice["by_fraction"], "worst_head_start": choice["worst_head_start"],
                    "thief_prun_acc": choice["prun_acc"], "candidates": choice["candidates"],
                    "skipped": choice["skipped"]},
                "cipher": {"aead": "AES-256-GCM", "kdf": "HKDF-SHA256", "nonce_bytes": NONCE_BYTES,
                           "key_encoding": "gak_ + urlsafe base64, no padding"},
                "levels": [], "files": {}, "release_id": new_release_id()}
    locked_sha = sha256(files[LOCKED])
    keys = {}
    for lv, row, path in chosen:
        k = int(lv["level"])
        plain, entry = _level_pack(lv, row, path, ds, experiment)
        keys[k] = secrets.token_bytes(KEY_BYTES)
        files[pack_name(k)] = seal(plain, keys[k], _aad(experiment, k, locked_sha))
        manifest["levels"].append(entry | {"key_id": key_id(keys[k])})
    manifest["files"] = {name: {"sha256": sha256(data), "bytes": len(data)} for name, data in files.items()}
    manifest["macs"] = {str(k): manifest_mac(manifest, key) for k, key in keys.items()}
    return manifest, files, keys


def new_release_id() -> str:
    """UTC time and 32 random bits: sorts by time, unique without coordination, safe as a folder name."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{secrets.token_hex(4)}"


def owner_keys_path(out: Path) -> Path:
    """Where the owner's keys of DIR's current release live: DIR/keys/owner-keys.json, outside DIR/release/."""
    return Path(out) / KEYS / OWNER_KEYS


def _lexists(path: Path) -> bool:
    return os.path.lexists(path)


def _check_keys_dir(kdir: Path) -> None:
    """DIR/keys must be a real folder of ours (not a link a stranger planted to send the keys elsewhere); 0700."""
    if not _lexists(kdir):
        return
    st = os.lstat(kdir)
    if not stat.S_ISDIR(st.st_mode):
        raise GradauthError(f"{kdir} is not a folder (a link or a file): the owner's keys go there; move it away "
                            "and run again")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise GradauthError(f"{kdir} belongs to another user (uid {st.st_uid}): the owner's keys must be in a folder "
                            "only you can read; move it away and run again")
    archive = kdir / ARCHIVE
    if _lexists(archive) and not stat.S_ISDIR(os.lstat(archive).st_mode):
        raise GradauthError(f"{archive} is not a folder (a link or a file): replaced releases and their keys go "
                            "there; move it away and run again")
    if st.st_mode & 0o077:
        os.chmod(kdir, SECRET_DIR_MODE)


def _old_layout_keys(final: Path) -> Path | None:
    """The keys file of a release written before keys moved out of it (DIR/release/owner-keys.json), if any."""
    inside = final / OWNER_KEYS
    return inside if final.is_dir() and not final.is_symlink() and _lexists(inside) else None


def existing_release(out: Path) -> list[Path]:
    """What of a release already exists in DIR: DIR/release and/or DIR/keys/owner-keys.json."""
    return [p for p in (Path(out) / RELEASE, owner_keys_path(out)) if _lexists(p)]


def _refuse_existing(out: Path, present: list[Path]) -> None:
    final = out / RELEASE
    inside = _old_layout_keys(final)
    if inside is not None:
        raise GradauthError(
            f"{final} already holds a release, with its owner keys inside the published folder (old layout; do not "
            f"publish it as is): pass --new-keys to make a new release (the old one and its keys are kept under "
            f"{out / KEYS / ARCHIVE}/), or keep it and move its keys out: mkdir -p -m 700 {out / KEYS} && "
            f"mv {inside} {owner_keys_path(out)}")
    what = " and ".join(str(p) for p in present)
    raise GradauthError(f"{what} already exist{'s' if len(present) == 1 else ''}: a new release would make new keys "
                        f"and buyers' keys would stop working; pass --new-keys to release anyway (the old release and "
                        f"its keys are kept under {out / KEYS / ARCHIVE}/), or keep this release")


def release_refusal(out: Path, present: list[Path], resume: bool) -> None:
    """For `gradauth run`, up front: a folder with a release is refused without --resume (a run would replace the
    keys), and with it refused only for the old layout (keys inside the folder to publish); else the release stays."""
    out = Path(out)
    inside = _old_layout_keys(out / RELEASE)
    if not resume:
        what = " and ".join(str(p) for p in present)
        raise GradauthError(f"{out} already holds a release ({what}): a new run would replace its keys; pass --resume "
                            f"to finish this run and keep the release, or --out NEWDIR for a new run")
    if inside is not None:
        raise GradauthError(f"{out / RELEASE} holds its owner keys inside the published folder (old layout): move them "
                            f"out first, mkdir -p -m 700 {out / KEYS} && mv {inside} {owner_keys_path(out)}, then "
                            f"run again")


def _safe_id(value) -> str | None:
    return value if isinstance(value, str) and re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z._-]{0,63}", value) else None


def _old_release_id(final: Path, kfile: Path) -> str:
    """The archive folder name of the release being replaced: its manifest's release_id (or its keys file's), else
    `legacy-<UTC now>` for a release made before release ids. Untrusted input: only a plain short name is used."""
    for path in (final / MANIFEST, kfile, final / OWNER_KEYS):
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 10_000_000:
                rid = _safe_id(json.loads(path.read_bytes()).get("release_id"))
                if rid:
                    return rid
        except (OSError, ValueError, AttributeError):
            pass
    return "legacy-" + new_release_id()


def _move(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, never over something: every step of a release is one of these."""
    if _lexists(dst):
        raise GradauthError(f"{dst} already exists: nothing was changed; move it away and run again")
    os.rename(src, dst)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` (which must not exist) with `mode`, write and fsync it; no link is followed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        os.close(fd)


def release_dir(out: Path, new_keys: bool = False) -> Path:
    """`gradauth release DIR [--new-keys]`: write DIR/release/ (public) and DIR/keys/owner-keys.json (secret).

    A folder that already has a release or keys is refused unless `new_keys`; then the old release and its keys are
    moved to DIR/keys/archive/<its release id>/ (so the old keys still open the release they were issued for) and
    the new ones take their place. Nothing is ever overwritten, and a failure at any step puts back what it moved."""
    out = Path(out)
    final, kdir = out / RELEASE, out / KEYS
    kfile = kdir / OWNER_KEYS
    _check_keys_dir(kdir)
    present = existing_release(out)
    if present and not new_keys:
        _refuse_existing(out, present)  # before the slow part: nothing is built, nothing written
    manifest, files, keys = build_release(out)
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
    owner = {"experiment": manifest["experiment"], "release_id": manifest["release_id"],
             "manifest_sha256": sha256(manifest_bytes),
             "warning": "secret: never publish this file or the keys/ folder",
             "keys": {str(k): encode_key(v) for k, v in keys.items()}}

    created: list[Path] = []   # folders this call made (removed again if it fails and they are empty)
    moved: list[tuple[Path, Path]] = []   # renames done, undone in reverse on failure
    tmp_keys = None
    tmp_rel = Path(tempfile.mkdtemp(prefix=".release.", dir=out))
    try:
        os.chmod(tmp_rel, PUBLIC_MODE | 0o111)
        for name, data in files.items():
            _write_new(tmp_rel / name, data, PUBLIC_MODE)
        _write_new(tmp_rel / MANIFEST, manifest_bytes, PUBLIC_MODE)
        _fsync_dir(tmp_rel)
        for d in (kdir, kdir / ARCHIVE) if present else (kdir,):
            if not _lexists(d):
                d.mkdir(mode=SECRET_DIR_MODE)
                created.append(d)
        os.chmod(kdir, SECRET_DIR_MODE)
        tmp_keys = kdir / f".{OWNER_KEYS}.{secrets.token_hex(8)}.tmp"
        _write_new(tmp_keys, (json.dumps(owner, indent=2) + "\n").encode(), 0o600)

        def step(src: Path, dst: Path) -> None:
            _move(src, dst)
            moved.append((src, dst))

        if present:
            rid = _old_release_id(final, kfile)
            arch = kdir / ARCHIVE / rid
            n = 1
            while _lexists(arch):
                n += 1
                arch = kdir / ARCHIVE / f"{rid}-{n}"
            arch.mkdir(mode=SECRET_DIR_MODE)
            created.append(arch)
            if _lexists(kfile):
                step(kfile, arch / OWNER_KEYS)
            if _lexists(final):
                inside = _old_layout_keys(final)
                step(final, arch / RELEASE)
                if inside is not None and not _lexists(arch / OWNER_KEYS):
                    step(arch / RELEASE / OWNER_KEYS, arch / OWNER_KEYS)
            _fsync_dir(arch)
        step(tmp_keys, kfile)      # the keys first: a release never stands without its keys
        step(tmp_rel, final)
        for d in (kdir, kdir / ARCHIVE, out):
            _fsync_dir(d)
    except BaseException:
        for src, dst in reversed(moved):
            try:
                os.rename(dst, src)
            except OSError as e:  # cannot happen short of the disk failing; say where everything is
                print(f"[release] could not move {dst} back to {src} ({e}): it is still at {dst}", file=sys.stderr)
        if tmp_keys is not None and _lexists(tmp_keys):
            tmp_keys.unlink()
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass
        raise
    finally:
        shutil.rmtree(tmp_rel, ignore_errors=True)
        if tmp_keys is not None and _lexists(tmp_keys):
            tmp_keys.unlink()
    if present:
        print(f"[release] the previous release and its keys were moved to {arch}: its keys still open it there",
              file=sys.stderr)
    _print_release(final, kfile, manifest, keys)
    return final


def _print_release(final: Path, kfile: Path, manifest: dict, keys: dict[int, bytes]) -> None:
    lk = manifest["locked"]
    what = "synapses hidden" if lk.get("lock_granularity") == "synapse" else "channels locked"
    print(f"[release] public model {final / LOCKED}: {lk['locked_channels']}/{lk['total_channels']} {what} "
          f"({lk['init']}), accuracy {lk['test_acc']:.4f} ≤ bound {lk['lock_bound']:.4f}", file=sys.stderr)
    print(f"[release] public lock: {lk.get('why', '')}", file=sys.stderr)
    for lv in manifest["levels"]:
        print(f"level {lv['level']}  expected accuracy {lv['expected_acc']:.4f}  key {encode_key(keys[lv['level']])}")
    print(f"[release] {manifest['release_id']}: these keys are shown once; the owner's copy is {kfile} (mode 0600). "
          f"Publish {final} as it is; never publish {kfile.parent}.", file=sys.stderr)


# ---- unlock -------------------------------------------------------------------------------------------------

def read_manifest(release: Path) -> dict:
    path = release / MANIFEST
    if not path.is_file():
        raise GradauthError(f"{path} not found: pass the release folder that `gradauth release` wrote")
    try:
        manifest = json.loads(path.read_bytes())
        ok = (manifest.get("format") == FORMAT and isinstance(manifest.get("experiment"), str)
              and isinstance(manifest.get("files"), dict) and isinstance(manifest.get("macs"), dict)
              and all(isinstance(v, dict) for v in manifest["files"].values())
              and isinstance(manifest.get("levels"), list) and all(isinstance(v, dict) for v in manifest["levels"]))
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise GradauthError(f"{path} is not a {FORMAT} manifest: get an intact copy of the release")
    return manifest


def verify_files(release: Path, manifest: dict) -> None:
    """Every file the manifest lists exists with its size and sha256."""
    for name, info in manifest["files"].items():
        path = release / name
        if not isinstance(name, str) or Path(name).name != name or name in (MANIFEST, OWNER_KEYS):
            raise GradauthError(f"{release / MANIFEST} lists {name!r}, not a release file: get an intact copy")
        if not path.is_file():
            raise GradauthError(f"{path} is missing but {MANIFEST} lists it: get a complete copy of the release")
        data = path.read_bytes()
        if len(data) != info.get("bytes"):
            raise GradauthError(f"{path} has {len(data)} bytes but {MANIFEST} says {info.get('bytes')}: it is "
                                "truncated or altered (or the manifest is); get an intact copy of the release")
        if sha256(data) != info.get("sha256"):
            raise GradauthError(f"{path} does not match its sha256 in {MANIFEST}: it was altered (or the manifest "
                                "was); get an intact copy of the release")


def _level_entry(manifest: dict, level: int) -> dict:
    entry = next((lv for lv in manifest["levels"] if lv.get("level") == level), None)
    if entry is None:
        have = ", ".join(str(lv.get("level")) for lv in manifest["levels"])
        raise GradauthError(f"this release has no level {level} (levels: {have}): pass one of them to --level")
    if entry.get("file") not in manifest["files"] or LOCKED not in manifest["files"]:
        raise GradauthError(f"{MANIFEST} does not list level {level}'s pack and {LOCKED}: get an intact copy")
    return entry


def unlock_bytes(release_dir: str | os.PathLike, level: int, key: str) -> bytes:
    """The verified, decrypted model file of `level` (the bytes `unlock_to_file` writes)."""
    release, level = Path(release_dir), int(level)
    manifest = read_manifest(release)
    entry = _level_entry(manifest, level)
    verify_files(release, manifest)
    raw = decode_key(key)
    kid = key_id(raw)
    if kid != entry.get("key_id"):
        other = next((lv.get("level") for lv in manifest["levels"] if lv.get("key_id") == kid), None)
        which = f"it is the key of level {other}" if other is not None else "it is not a key of this release"
        raise GradauthError(f"the key does not open level {level} ({which}): use the key issued for level {level}")
    if not hmac.compare_digest(manifest["macs"].get(str(level), ""), manifest_mac(manifest, raw)):
        raise GradauthError(f"{release / MANIFEST} was altered after release (its MAC under the level {level} key "
                            "fails): get an intact copy of the release")
    where = str(release / entry["file"])
    aad = _aad(manifest["experiment"], level, manifest["files"][LOCKED]["sha256"])
    plain = open_sealed((release / entry["file"]).read_bytes(), raw, aad, where)
    obj = from_bytes(plain, f"the model inside {where}")
    if obj.get("extra", {}).get("level") != level or not obj.get("compacted"):
        raise GradauthError(f"{where} does not hold level {level}'s model: get an intact copy of the release")
    return plain


def unlock(release_dir: str | os.PathLike, level: int, key: str) -> nn.Module:
    """Verify and decrypt level `level` of a release; its model, rebuilt, in eval mode."""
    model, _, _ = rebuild(from_bytes(unlock_bytes(release_dir, level, key), f"level {level}"))
    return model


def _looks_like_owner_keys(path: Path) -> bool:
    """A JSON object whose "keys" are gradauth level keys: an owner keys file, whatever its name."""
    try:
        if os.lstat(path).st_size > 1_000_000:
            return False
        doc = json.loads(path.read_bytes())
        return isinstance(doc, dict) and isinstance(doc.get("keys"), dict) and any(
            isinstance(v, str) and v.startswith(KEY_PREFIX) for v in doc["keys"].values())
    except (OSError, ValueError):
        return False


def _protected_folders(release: Path) -> list[tuple[Path, str]]:
    """The folders `unlock --out` never writes into: the release itself and the owner's keys folder beside it (or
    around it, for a release archived under keys/archive/), symlinks and `..` resolved."""
    rel = release.resolve()
    found = [(rel, "the release folder"), ((rel.parent / KEYS).resolve(), "the owner's keys folder")]
    for a in rel.parents:
        if a.name == KEYS and ((a / OWNER_KEYS).exists() or (a / ARCHIVE).is_dir()):
            found += [(a, "the owner's keys folder"), ((a.parent / RELEASE).resolve(), "the release folder")]
    return found


def check_unlock_out(release_dir: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an `unlock --out` that could destroy something: a path inside the release or keys folder, the owner
    keys file, anything that is not a regular file (a folder, a device such as /dev/null, a FIFO, a symlink), and
    an existing file unless `force`. Returns the path to write."""
    out = Path(out)
    target = out.resolve()  # symlinks first, then `..`, as the kernel will (not os.path.abspath's text edit)
    for folder, what in _protected_folders(Path(release_dir)):
        if target == folder or folder in target.parents:
            raise GradauthError(f"--out {out} is inside {what} {folder}: write the model somewhere else")
    if out.name == OWNER_KEYS or target.name == OWNER_KEYS:
        raise GradauthError(f"--out {out} names an owner keys file: write the model somewhere else")
    if _lexists(out):
        mode = os.lstat(out).st_mode
        if stat.S_ISLNK(mode):
            raise GradauthError(f"--out {out} is a symbolic link (even --force does not write through one): give "
                                "the path of a new file")
        if not stat.S_ISREG(mode):
            kind = ("a folder" if stat.S_ISDIR(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
            raise GradauthError(f"--out {out} is {kind}, not a regular file (even --force only replaces a file): "
                                "give the path of a new file")
        if _looks_like_owner_keys(out):
            raise GradauthError(f"--out {out} holds owner keys (even --force does not replace them): write the "
                                "model somewhere else")
        if not force:
            raise GradauthError(f"--out {out} already exists: pass --force to replace it, or give a new path")
    return out


def unlock_to_file(release_dir: str | os.PathLike, level: int, key: str, out: str | os.PathLike,
                   force: bool = False) -> Path:
    """`gradauth unlock`: the level's model file at `out` (nothing is written if any check fails).

    `out` is checked (`check_unlock_out`) before anything is decrypted and again when the file is put in place: the
    bytes go to a new temporary file beside it, which is then linked to `out` (fails if something appeared there)
    or, with `force`, renamed over the regular file that is there: never written through a link or into a device."""
    out = check_unlock_out(release_dir, out, force)
    plain = unlock_bytes(release_dir, level, key)
    rebuild(from_bytes(plain, f"level {level}"))  # the file must rebuild before it is written
    out = check_unlock_out(release_dir, out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GradauthError(f"cannot make the folder of --out {out} ({e.strerror}): give a path in a writable folder")
    umask = os.umask(0)
    os.umask(umask)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(8)}.tmp"
    try:
        _write_new(tmp, plain, 0o666 & ~umask)
        if _lexists(out):  # only with force, and only a regular file (checked just above)
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)
            except FileExistsError:
                raise GradauthError(f"--out {out} appeared while unlocking: nothing was written; run again")
            except OSError:  # a filesystem without hard links
                if _lexists(out):
                    raise GradauthError(f"--out {out} appeared while unlocking: nothing was written; run again")
                os.replace(tmp, out)
    finally:
        if _lexists(tmp):
            tmp.unlink()
    print(f"[unlock] level {level} → {out}", file=sys.stderr)
    return out


__all__ = ["public_model", "choose_public", "release_dir", "build_release", "unlock", "unlock_to_file", "unlock_bytes", "public_lock",
           "locked_copy", "erase", "producers", "noise_fill", "union_masks", "read_levels", "encode_key", "decode_key", "check_unlock_out", "owner_keys_path",
           "existing_release"]
