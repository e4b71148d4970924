"""Licensed release: one public locked model, one encrypted pack per level, keys for the owner only.

`gradauth release DIR` reads `levels.json`, `trials.parquet` and `models/<trial_id>.pt` and writes `DIR/release/`:

- `locked.pt`: the public model, a normal model file (no masks inside). It is the base model locked at the union of
  the levels' locks (for rate or threshold locks of one importance source the removed sets are nested, so this is
  the strongest lock among the levels), with γ and β of the removed channels at zero and, beyond the paper's lock,
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
- `owner-keys.json` (mode 0600): one fresh random 256-bit key per level, urlsafe base64. The keys are printed once;
  this file is the owner's only other copy and is NOT part of what is published (the manifest does not list it).

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
import hashlib
import hmac
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import from_bytes, load_model_file, rebuild, to_bytes
from .compact import compact
from .errors import GradauthError
from .fsutil import atomic_path, write_json
from .models import bn_layers
from .prune import Masks, apply_masks, count_removed

FORMAT = "gradauth-release/1"
MAGIC = b"gradauth-pack/1\n"   # 16 bytes; also part of the associated data
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
LOCKED = "locked.pt"
MANIFEST = "manifest.json"
OWNER_KEYS = "owner-keys.json"
PUBLIC_MODE = 0o644             # what is published is world-readable; owner-keys.json is 0600


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


def locked_copy(base: nn.Module, masks: Masks, noise_seed: int | None = None, keep_filters: bool = False):
    """The public model: a copy of `base` with `masks` applied, the locked channels' filters erased (`erase`).

    With `noise_seed` the locked γ/β are redrawn (noise_fill) and the erased filters are random instead of zero, so
    nothing marks the locked channels. `keep_filters` gives the plain lock (only γ/β zeroed), for comparison. No
    gradient hooks stay behind: whoever holds the public model may train every weight."""
    model = copy.deepcopy(base)
    for h in apply_masks(model, masks):
        h.remove()
    gen = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None
    if not keep_filters:
        erase(model, masks, gen)
    if gen is not None:
        noise_fill(model, masks, gen)
    return model.eval()


RELEASE_TRIAL_COLUMNS = ["trial_id", "status", "fine_acc", "importance", "lock_mode", "lock_value",
                         "locked_channels"]


def read_levels(out: Path, trials=None) -> dict:
    """DIR/levels.json through schema.read_levels (validated; with `trials`, its trial ids checked against them)."""
    from .schema import read_levels as read
    return read(out / "levels.json", trials)


def chosen_trials(out: Path, doc: dict, trials=None):
    """Per level, the ok seed trial whose fine_acc is nearest the level's mean (ties: first trial id)."""
    from .schema import read_trials
    if trials is None:
        trials = read_trials(out / "trials.parquet", RELEASE_TRIAL_COLUMNS)
    chosen = []
    for lv in doc["levels"]:
        rows = trials[trials["trial_id"].isin(lv["trial_ids"]) & (trials["status"] == "ok")].sort_values("trial_id")
        if rows.empty:
            raise GradauthError(f"level {lv['level']} of levels.json names no ok trial of trials.parquet: "
                                f"re-run `gradauth select {out}`")
        # The mean of the seeds themselves (levels.json rounds it to 6 digits, which would break two-seed ties).
        dist = (rows["fine_acc"] - rows["fine_acc"].mean()).abs().round(9)
        row = rows.loc[dist.idxmin()]  # idxmin takes the first minimum, and rows are in trial_id order
        path = out / "models" / f"{row['trial_id']}.pt"
        if not path.is_file():
            raise GradauthError(f"{path} not found: the sweep keeps every ok trial's model; re-run `gradauth sweep`")
        chosen.append((lv, row, path))
    return chosen


def public_lock(out: Path, doc: dict | None = None):
    """What the public model is made of: (levels.json, [(level, trial row, model file)], union masks, importance).

    trials.parquet and levels.json are validated (schema.py), and a levels.json selected from another version of
    trials.parquet (it records the sha256 of the one it came from) is refused."""
    from .schema import check_levels_current, read_trials
    trials = read_trials(out / "trials.parquet", RELEASE_TRIAL_COLUMNS)
    if doc is None:
        doc = read_levels(out, trials)
        check_levels_current(doc, out / "levels.json", out / "trials.parquet")
    chosen = chosen_trials(out, doc, trials)
    masks = union_masks([load_model_file(p)["masks"] for _, _, p in chosen])
    imps = sorted({str(r["importance"]) for _, r, _ in chosen})
    return doc, chosen, masks, "+".join(imps)


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
    entry = {"level": int(lv["level"]), "file": pack_name(int(lv["level"])), "trial_id": str(row["trial_id"]),
             "importance": str(row["importance"]), "lock_mode": str(row["lock_mode"]),
             "lock_value": float(row["lock_value"]), "locked_channels": locked, "total_channels": total,
             "schedule": lv.get("schedule"), "seed": int(row["seed"]), "expected_acc": top1, "expected_top3": top3,
             "sweep_fine_acc": float(row["fine_acc"]), "level_fine_acc": float(lv["fine_acc"]),
             "prediction_mismatches": mismatched, "params": sum(p.numel() for p in small.parameters())}
    return plain, entry


def build_release(out: Path) -> tuple[dict, dict[str, bytes], dict[int, bytes]]:
    """Everything `release_dir` writes, in memory: (manifest, {file name: bytes}, {level: key})."""
    from .data import load_dataset
    from .engine import evaluate
    from .pipeline import git_sha, lock_bound, read_config
    cfg = read_config(out)
    doc, chosen, masks, importance = public_lock(out)
    experiment = str(doc.get("experiment") or cfg.name)
    ds = load_dataset(cfg.data, cfg.seed)
    bound = lock_bound(cfg, ds.num_classes)
    noise_seed = secrets.randbits(63) if cfg.release.noise_init else None  # secret: a known seed would show the lock
    base, spec, _ = rebuild(load_model_file(out / "base.pt"))
    public = locked_copy(base, masks, noise_seed)
    acc, top3 = evaluate(public, ds, ds.test)
    if acc > bound:
        raise GradauthError(f"the public locked model has accuracy {acc:.4f}, above the lock bound {bound:.4f}: select "
                            "levels with a stronger lock (or set release.noise_init: false) before releasing")
    files = {LOCKED: to_bytes(public, spec, extra={"experiment": experiment, "locked": True})}
    locked, total = count_removed(masks)
    manifest = {"format": FORMAT, "experiment": experiment, "method": doc.get("method"), "dataset": ds.name,
                "arch": spec.arch, "num_classes": spec.num_classes, "git_sha": git_sha(), "config_hash": cfg.hash(),
                "locked": {"file": LOCKED, "importance": importance, "locked_channels": locked, "total_channels": total,
                           "init": "noise" if noise_seed is not None else "zeros", "test_acc": acc, "test_top3": top3,
                           "lock_bound": bound},
                "cipher": {"aead": "AES-256-GCM", "kdf": "HKDF-SHA256", "nonce_bytes": NONCE_BYTES,
                           "key_encoding": "gak_ + urlsafe base64, no padding"},
                "levels": [], "files": {}}
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


def release_dir(out: Path) -> Path:
    """`gradauth release DIR`: write DIR/release/ (replacing an old one only once the new one is complete)."""
    out = Path(out)
    manifest, files, keys = build_release(out)
    final = out / "release"
    tmp = Path(tempfile.mkdtemp(prefix=".release.", dir=out))
    try:
        os.chmod(tmp, PUBLIC_MODE | 0o111)
        for name, data in files.items():
            with atomic_path(tmp / name, PUBLIC_MODE) as p:
                p.write_bytes(data)
        write_json(tmp / MANIFEST, manifest, mode=PUBLIC_MODE)
        owner = {"experiment": manifest["experiment"], "warning": "secret: never publish this file",
                 "keys": {str(k): encode_key(v) for k, v in keys.items()}}
        write_json(tmp / OWNER_KEYS, owner, mode=0o600)
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=".release.old.", dir=out))
            os.replace(final, old / "release")
        os.replace(tmp, final)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print_release(final, manifest, keys)
    return final


def _print_release(final: Path, manifest: dict, keys: dict[int, bytes]) -> None:
    lk = manifest["locked"]
    print(f"[release] public model {final / LOCKED}: {lk['locked_channels']}/{lk['total_channels']} channels locked "
          f"({lk['init']}), accuracy {lk['test_acc']:.4f} ≤ bound {lk['lock_bound']:.4f}", file=sys.stderr)
    for lv in manifest["levels"]:
        print(f"level {lv['level']}  expected accuracy {lv['expected_acc']:.4f}  key {encode_key(keys[lv['level']])}")
    print(f"[release] these keys are shown once; the owner's copy is {final / OWNER_KEYS} (mode 0600). "
          f"Publish {final} WITHOUT {OWNER_KEYS}; a new release makes new keys.", file=sys.stderr)


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


def unlock_to_file(release_dir: str | os.PathLike, level: int, key: str, out: str | os.PathLike) -> Path:
    """`gradauth unlock`: the level's model file at `out` (nothing is written if any check fails)."""
    plain = unlock_bytes(release_dir, level, key)
    rebuild(from_bytes(plain, f"level {level}"))  # the file must rebuild before it is written
    with atomic_path(out) as tmp:
        tmp.write_bytes(plain)
    print(f"[unlock] level {level} → {out}", file=sys.stderr)
    return Path(out)


__all__ = ["release_dir", "build_release", "unlock", "unlock_to_file", "unlock_bytes", "public_lock",
           "locked_copy", "erase", "producers", "noise_fill", "union_masks", "read_levels", "encode_key", "decode_key"]
