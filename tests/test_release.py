"""Release and unlock: every level opens with its key to exactly the sweep's model; everything else is refused."""
import base64
import contextlib
import io
import json
import os
import pickle
import re
import secrets
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import gradauth
from gradauth import release as rel
from gradauth.checkpoint import FORMAT, from_bytes, load_model_file, rebuild
from gradauth.cli import main
from gradauth.config import dump_config
from gradauth.data import load_dataset
from gradauth.engine import predict
from gradauth.errors import GradauthError
from gradauth.models import bn_layers
from gradauth.pipeline import evaluate_file, read_config
from gradauth.prune import masks_from_model

from conftest import copy_of

ROOT = Path(__file__).resolve().parents[1]
@pytest.fixture(scope="module")
def sweep_dir(tiny_sweep, tmp_path_factory):
    """The session's tiny sweep (conftest.py: 3 levels × 2 seeds on the shared base), copied: the release goes in it."""
    return copy_of(tiny_sweep, tmp_path_factory.mktemp("sweep") / "sweep")


@pytest.fixture(scope="module")
def released(sweep_dir):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        final = rel.release_dir(sweep_dir)
    printed = dict(re.findall(r"^level (\d+) .* key (\S+)$", stdout.getvalue(), re.M))
    return final, {int(k): v for k, v in printed.items()}, json.loads((final / "manifest.json").read_text())


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def test_every_level_unlocks_to_the_sweeps_model_exactly(sweep_dir, released, tmp_path, capsys):
    final, keys, manifest = released
    cfg = read_config(sweep_dir)
    ds = load_dataset(cfg.data, cfg.seed)
    trials = pd.read_parquet(sweep_dir / "trials.parquet").set_index("trial_id")
    assert sorted(keys) == [1, 2, 3] and len({*keys.values()}) == 3
    accs = []
    for lv in manifest["levels"]:
        k, out = lv["level"], tmp_path / f"level{lv['level']}.pt"
        assert _cli(capsys, "unlock", final, "--level", k, "--key", keys[k], "--out", out)[0] == 0
        result = evaluate_file(out, cfg)
        assert result["top1"] == lv["expected_acc"] == trials.loc[lv["trial_id"], "fine_acc"]
        sweep_model, _, _ = rebuild(load_model_file(sweep_dir / "models" / f"{lv['trial_id']}.pt"))
        mine = gradauth.unlock(final, k, keys[k])
        want = predict(sweep_model, ds, ds.test).argmax(1)
        assert torch.equal(predict(mine, ds, ds.test).argmax(1), want)
        assert torch.equal(predict(rebuild(load_model_file(out))[0], ds, ds.test).argmax(1), want)
        # physically compacted: fewer parameters than the full-size model the sweep saved
        n_params = lambda m: sum(p.numel() for p in m.parameters())
        assert n_params(mine) == lv["params"] < n_params(sweep_model)
        accs.append(result["top1"])
    assert accs[0] > accs[1] > accs[2]  # the tiers the owner sells
    code = main(["evaluate", str(tmp_path / "level1.pt"), "--config", str(sweep_dir / "config.yaml")])
    assert code == 0 and json.loads(capsys.readouterr().out)["top1"] == manifest["levels"][0]["expected_acc"]


def test_level_pack_is_the_seed_nearest_the_level_mean(sweep_dir, released):
    _, _, manifest = released
    trials = pd.read_parquet(sweep_dir / "trials.parquet").set_index("trial_id")
    levels = json.loads((sweep_dir / "levels.json").read_text())["levels"]
    for lv, entry in zip(levels, manifest["levels"]):
        accs = trials.loc[lv["trial_ids"], "fine_acc"]
        assert entry["trial_id"] in lv["trial_ids"]
        assert abs(accs[entry["trial_id"]] - accs.mean()) == pytest.approx((accs - accs.mean()).abs().min(), abs=1e-9)


def test_manifest_locked_model_and_hashes(sweep_dir, released):
    final, _, manifest = released
    cfg = read_config(sweep_dir)
    locked = manifest["locked"]
    assert locked["lock_bound"] == 0.2 and locked["test_acc"] <= 0.2 and locked["init"] == "zeros"
    assert evaluate_file(final / "locked.pt", cfg)["top1"] == locked["test_acc"]
    # the public model is the strongest level's lock (rate locks are nested): 40 % of the channels, γ = β = 0
    model, _, masks = rebuild(load_model_file(final / "locked.pt"))
    assert masks == {}
    zero = masks_from_model(model)
    total = sum(m.numel() for m in zero.values())
    assert locked["locked_channels"] == total - sum(int(m.sum()) for m in zero.values()) == round(0.4 * total)
    # beyond the plain lock, the locked channels' conv filters are erased too (the locked model computes the same)
    prods = rel.producers(model)
    assert sorted(prods) == sorted(zero) and all(bool((prods[k].weight[~m] == 0).all()) for k, m in zero.items())
    base, _, _ = rebuild(load_model_file(sweep_dir / "base.pt"))
    ds = load_dataset(cfg.data, cfg.seed)
    plain = rel.locked_copy(base, rel.union_masks([zero]), keep_filters=True)
    assert torch.equal(predict(plain, ds, ds.test), predict(model, ds, ds.test))
    assert sorted(manifest["files"]) == ["level-1.pack", "level-2.pack", "level-3.pack", "locked.pt"]
    for name, info in manifest["files"].items():
        data = (final / name).read_bytes()
        assert info == {"sha256": rel.sha256(data), "bytes": len(data)}
    assert [lv["level"] for lv in manifest["levels"]] == [1, 2, 3]
    assert manifest["experiment"] == "quickstart" and manifest["cipher"]["aead"] == "AES-256-GCM"


def test_owner_keys_are_0600_and_written_nowhere_else(sweep_dir, released):
    final, keys, _ = released
    owner = sweep_dir / "keys" / "owner-keys.json"  # outside release/, the folder that is published
    assert owner.stat().st_mode & 0o777 == 0o600 and owner.parent.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in final.iterdir()) == ["level-1.pack", "level-2.pack", "level-3.pack", "locked.pt",
                                                       "manifest.json"]
    assert {int(k): v for k, v in json.loads(owner.read_text())["keys"].items()} == keys
    assert all(v.startswith("gak_") and len(rel.decode_key(v)) == 32 for v in keys.values())
    for path in sweep_dir.rglob("*"):
        if path.is_file() and path != owner:
            data = path.read_bytes()
            assert not any(v.encode() in data for v in keys.values()), path
    assert (final / "level-1.pack").stat().st_mode & 0o777 == 0o644


@pytest.fixture
def copy_release(released, tmp_path):
    final, keys, _ = released
    dst = tmp_path / "release"
    shutil.copytree(final, dst)
    return dst, keys


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(rdir: Path, fn) -> None:
    m = json.loads((rdir / "manifest.json").read_text())
    fn(m)
    (rdir / "manifest.json").write_text(json.dumps(m))


def _rehash(rdir: Path, name: str):
    """Make the manifest's hash agree with an altered file (what a careful forger would do)."""
    def fn(m):
        data = (rdir / name).read_bytes()
        m["files"][name] = {"sha256": rel.sha256(data), "bytes": len(data)}
    return fn


def _remac(rdir: Path, name: str, key: str):
    def fn(m):
        _rehash(rdir, name)(m)
        m["macs"]["2"] = rel.manifest_mac(m, rel.decode_key(key))
    return fn


REFUSALS = {
    "wrong key": (lambda r, k: None, lambda k: rel.encode_key(secrets.token_bytes(32)), 2,
                  "does not open level 2 (it is not a key of this release)"),
    "key of another level": (lambda r, k: None, lambda k: k[1], 2, "does not open level 2 (it is the key of level 1)"),
    "malformed key": (lambda r, k: None, lambda k: k[2][:-3], 2, "not a gradauth level key"),
    "flipped byte in pack": (lambda r, k: _flip(r / "level-2.pack", 5000), lambda k: k[2], 2,
                             "level-2.pack does not match its sha256"),
    "flipped byte in locked model": (lambda r, k: _flip(r / "locked.pt", 3000), lambda k: k[2], 2,
                                     "locked.pt does not match its sha256"),
    "truncated pack": (lambda r, k: (r / "level-2.pack").write_bytes((r / "level-2.pack").read_bytes()[:-100]),
                       lambda k: k[2], 2, "truncated"),
    "truncated pack, manifest rehashed": (
        lambda r, k: ((r / "level-2.pack").write_bytes((r / "level-2.pack").read_bytes()[:-100]),
                      _edit_manifest(r, _rehash(r, "level-2.pack"))),
        lambda k: k[2], 2, "manifest.json was altered after release"),
    "flipped pack byte, manifest rehashed": (
        lambda r, k: (_flip(r / "level-2.pack", 5000), _edit_manifest(r, _rehash(r, "level-2.pack"))),
        lambda k: k[2], 2, "manifest.json was altered after release"),
    # only the owner could do this (the MAC needs the level key): it reaches AES-GCM, whose tag still refuses
    "flipped pack byte, manifest rehashed and re-MACed": (
        lambda r, k: (_flip(r / "level-2.pack", 5000), _edit_manifest(r, _remac(r, "level-2.pack", k[2]))),
        lambda k: k[2], 2, "level-2.pack failed authentication"),
    "truncated pack, manifest rehashed and re-MACed": (
        lambda r, k: ((r / "level-2.pack").write_bytes((r / "level-2.pack").read_bytes()[:-100]),
                      _edit_manifest(r, _remac(r, "level-2.pack", k[2]))),
        lambda k: k[2], 2, "level-2.pack failed authentication"),
    "manifest hash does not match": (
        lambda r, k: _edit_manifest(r, lambda m: m["files"]["level-3.pack"].update(sha256="0" * 64)),
        lambda k: k[2], 2, "level-3.pack does not match its sha256"),
    "manifest accuracy edited": (
        lambda r, k: _edit_manifest(r, lambda m: m["levels"][1].update(expected_acc=0.999)),
        lambda k: k[2], 2, "manifest.json was altered after release"),
    "pack file missing": (lambda r, k: (r / "level-3.pack").unlink(), lambda k: k[2], 2, "level-3.pack is missing"),
    "manifest levels garbled": (lambda r, k: _edit_manifest(r, lambda m: m.update(levels=["level 2"])),
                                lambda k: k[2], 2, "not a gradauth-release"),
    "manifest not json": (lambda r, k: (r / "manifest.json").write_text("{"), lambda k: k[2], 2,
                          "not a gradauth-release"),
    "no such level": (lambda r, k: None, lambda k: k[2], 7, "has no level 7 (levels: 1, 2, 3)"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unlock_refusals_exit_2_with_one_line_and_no_file(copy_release, tmp_path, capsys, case):
    rdir, keys = copy_release
    damage, key, level, needle = REFUSALS[case]
    damage(rdir, keys)
    out = tmp_path / "out.pt"
    code, err = _cli(capsys, "unlock", rdir, "--level", level, "--key", key(keys), "--out", out)
    assert code == 2 and needle in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["release"]
    with pytest.raises(GradauthError, match=re.escape(needle)):
        gradauth.unlock(rdir, level, key(keys))


def test_a_pack_is_bound_to_its_level_and_release(released):
    final, keys, manifest = released
    pack = (final / "level-1.pack").read_bytes()
    locked_sha = manifest["files"]["locked.pt"]["sha256"]
    raw = rel.decode_key(keys[1])
    assert from_bytes(rel.open_sealed(pack, raw, rel._aad("quickstart", 1, locked_sha), "p"))["extra"]["level"] == 1
    for aad in (rel._aad("quickstart", 2, locked_sha), rel._aad("quickstart", 1, "0" * 64),
                rel._aad("other", 1, locked_sha)):
        with pytest.raises(GradauthError, match="failed authentication"):
            rel.open_sealed(pack, raw, aad, "p")


class _Payload:
    """Unpickling this runs `open(marker, "w")`: the file appears if (and only if) pickled code runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "spec": {}, "state_dict": {}, "evil": _Payload(marker)}, buf)
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the plain pickle.dumps payload
def test_a_crafted_pickle_is_refused_and_never_runs(released, tmp_path, capsys):
    final, keys, _ = released
    # the payload is live: an unsafe load does run it
    torch.load(io.BytesIO(_malicious(tmp_path / "proof")), weights_only=False)
    pickle.loads(pickle.dumps(_Payload(tmp_path / "proof2")))
    assert (tmp_path / "proof").exists() and (tmp_path / "proof2").exists()

    marker = tmp_path / "pwned"
    for data in (_malicious(marker), pickle.dumps({"format": FORMAT, "evil": _Payload(marker)})):
        with pytest.raises(GradauthError, match="refused without running any code"):
            from_bytes(data)
        (tmp_path / "evil.pt").write_bytes(data)
        with pytest.raises(GradauthError, match="refused without running any code"):
            load_model_file(tmp_path / "evil.pt")
        code, err = _cli(capsys, "evaluate", tmp_path / "evil.pt", "--config", ROOT / "sweeps" / "quickstart.yaml")
        assert code == 2 and "refused without running any code" in err
    # a forged release whose pack (sealed under a key the forger made, manifest consistent) holds the payload
    rdir = tmp_path / "forged"
    shutil.copytree(final, rdir)
    key = b"\xf8" + secrets.token_bytes(31)  # its base64 starts with "-": must still pass as --key's value
    assert base64.urlsafe_b64encode(key).startswith(b"-")
    m = json.loads((rdir / "manifest.json").read_text())
    sealed = rel.seal(_malicious(marker), key, rel._aad(m["experiment"], 2, m["files"]["locked.pt"]["sha256"]))
    (rdir / "level-2.pack").write_bytes(sealed)
    _rehash(rdir, "level-2.pack")(m)
    m["levels"][1]["key_id"] = rel.key_id(key)
    m["macs"]["2"] = rel.manifest_mac(m, key)
    (rdir / "manifest.json").write_text(json.dumps(m))
    code, err = _cli(capsys, "unlock", rdir, "--level", 2, "--key", rel.encode_key(key), "--out", tmp_path / "x.pt")
    assert code == 2 and "refused without running any code" in err and len(err.splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "x.pt").exists()


def _variant(sweep_dir: Path, dst: Path, **edits) -> Path:
    """A copy of the sweep dir (no release, no keys) with config fields changed."""
    shutil.copytree(sweep_dir, dst, ignore=shutil.ignore_patterns("release", "keys"))
    cfg = read_config(dst)
    for dotted, value in edits.items():
        section, field = dotted.split("__")
        setattr(getattr(cfg, section), field, value)
    (dst / "config.yaml").write_text(dump_config(cfg))
    return dst


def test_release_refuses_a_public_model_above_the_bound(sweep_dir, tmp_path, capsys):
    d = _variant(sweep_dir, tmp_path / "d", sweep__lock_bound=0.05)
    code, err = _cli(capsys, "release", d)
    assert code == 2 and "above the lock bound 0.0500" in err and len(err.splitlines()) == 1
    assert not (d / "release").exists() and not (d / "keys").exists()
    assert not any(p.name.startswith(".release") for p in d.iterdir())
    (d / "levels.json").write_text('{"levels": [{"level": 2, "fine_acc": 0.9, "trial_ids": ["x"]}]}')
    code, err = _cli(capsys, "release", d)
    assert code == 2 and "levels 1..N" in err
    (d / "levels.json").unlink()
    code, err = _cli(capsys, "release", d)
    assert code == 2 and "gradauth select" in err


def test_noise_init_hides_the_lock_and_levels_still_unlock(sweep_dir, released, tmp_path):
    _, _, zeros_manifest = released
    d = _variant(sweep_dir, tmp_path / "d", release__noise_init=True)
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        final = rel.release_dir(d)
    keys = {int(k): v for k, v in re.findall(r"^level (\d+) .* key (\S+)$", stdout.getvalue(), re.M)}
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["locked"]["init"] == "noise" and manifest["locked"]["test_acc"] <= 0.2
    model, _, _ = rebuild(load_model_file(final / "locked.pt"))
    zero = masks_from_model(model)
    still_zero = sum(int((~m).sum()) for m in zero.values())
    assert still_zero < manifest["locked"]["locked_channels"] // 4  # the zeros no longer show the lock
    assert evaluate_file(final / "locked.pt", read_config(d))["top1"] == manifest["locked"]["test_acc"]
    assert rel.unlock_bytes(final, 3, keys[3])
    assert manifest["levels"][2]["expected_acc"] == zeros_manifest["levels"][2]["expected_acc"]
    # new release, new keys: the keys of the other release open nothing here
    with pytest.raises(GradauthError, match="not a key of this release"):
        rel.unlock_bytes(final, 3, released[1][3])


def test_erase_head_redraws_the_public_models_classifier_and_nothing_else(sweep_dir, released, tmp_path):
    """release.erase_head: the trained head is what a thief who revives every locked channel keeps; the public model
    gets a random one (nn.Linear's own init), every other weight as the zeros release has it, the levels untouched."""
    _, keys0, zeros_manifest = released
    d = _variant(sweep_dir, tmp_path / "d", release__erase_head=True)
    assert read_config(d).hash() != read_config(sweep_dir).hash()   # a config that says so, hashed as such
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        final = rel.release_dir(d)
    keys = {int(k): v for k, v in re.findall(r"^level (\d+) .* key (\S+)$", stdout.getvalue(), re.M)}
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["locked"]["head"] == "redrawn" and zeros_manifest["locked"]["head"] == "trained"
    pub, _, _ = rebuild(load_model_file(final / "locked.pt"))
    zeros, _, _ = rebuild(load_model_file(sweep_dir / "release" / "locked.pt"))
    a, b = pub.state_dict(), zeros.state_dict()
    linear = {f"{n}.{p}" for n, m in pub.named_modules() if isinstance(m, torch.nn.Linear) for p in ("weight", "bias")}
    assert linear and all(not torch.equal(a[k], b[k]) for k in linear)
    assert all(torch.equal(a[k], b[k]) for k in a if k not in linear)
    for k in linear:   # drawn as nn.Linear draws: uniform within ±1/√fan_in
        fan_in = a[k.rsplit(".", 1)[0] + ".weight"].shape[1]
        assert a[k].abs().max() <= 1 / fan_in ** 0.5
    assert manifest["locked"]["test_acc"] <= 0.2
    assert [lv["expected_acc"] for lv in manifest["levels"]] == [lv["expected_acc"] for lv in zeros_manifest["levels"]]
    assert rel.unlock_bytes(final, 1, keys[1])


@pytest.mark.subprocess
def test_gradauth_import_does_not_load_torch():
    import subprocess
    import sys
    code = "import sys, gradauth; assert 'torch' not in sys.modules; assert callable(gradauth.unlock); print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout.strip() == "ok"
