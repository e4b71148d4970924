"""Keys are never lost: they live outside the published folder, a release is replaced only when asked (and then the
old keys and the release they open are archived), `run` leaves a release alone, `unlock --out` destroys nothing."""
import contextlib
import copy
import hashlib
import io
import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch

from gradauth import release as rel
from gradauth.checkpoint import save_model
from gradauth.cli import main
from gradauth.config import parse_config
from gradauth.pipeline import run_all, select_stage, trial_context
from gradauth.sweep import write_trials
from gradauth.trial import grid, run_trial

from conftest import tiny_raw, with_base

# A finished run in seconds: the session's tiny base (conftest.py) and one lock × two seeds, so the sweep's grid is
# complete (`run --resume` starts no Ray). The 15 % lock leaves 0.64 and the bounds are set above it: these tests are
# about files and keys, not about how good the lock is (tests/test_release.py is).
RAW = tiny_raw(name="keys", lock={"mode": "rate", "values": [0.15]},
               finetune={"epochs": [2], "lr": [0.01], "seeds": [0, 1]},
               sweep={"lock_bound": 0.75}, select={"levels": 1, "min_gap": 0.05, "max_locked_acc": 0.75})
PUBLISHED = ["level-1.pack", "locked.pt", "manifest.json"]
LOCK_FILE = ".gradauth.lock"  # a run's lock file (if any) is not part of what these tests compare


def tree(root: Path) -> dict:
    """Everything under `root`, links not followed: path → (kind, mode, content hash or link target)."""
    out = {}
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(dirpath) / name
            if name == LOCK_FILE:
                continue
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                what = None
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), what)
    return out


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.err.strip(), cap.out


def _keys_printed(stdout: str) -> dict[int, str]:
    return {int(k): v for k, v in re.findall(r"^level (\d+) .* key (\S+)$", stdout, re.M)}


@pytest.fixture(scope="module")
def finished(tiny_base, tmp_path_factory):
    """A finished run without a release: config.yaml, base.pt, trials.parquet, models/, levels.json."""
    cfg = parse_config(RAW)
    out = with_base(tiny_base[1], tmp_path_factory.mktemp("finished"), cfg)
    ctx = trial_context(cfg, out)
    rows = []
    for t in grid(cfg):
        row, model, masks = run_trial(ctx, t, torch.device("cpu"))
        assert row["status"] == "ok", row
        save_model(out / "models" / f"{t.trial_id}.pt", model.cpu(), ctx.spec, masks)
        rows.append(row)
    write_trials(rows, out / "trials.parquet")
    with contextlib.redirect_stdout(io.StringIO()):
        select_stage(out)
    return out


@pytest.fixture(scope="module")
def released(finished, tmp_path_factory):
    """`finished` copied and released once: (dir, {level: key} as printed)."""
    d = tmp_path_factory.mktemp("released") / "run"
    shutil.copytree(finished, d)
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        rel.release_dir(d)
    return d, _keys_printed(stdout.getvalue())


@pytest.fixture(scope="module")
def prebuilt(finished):
    """One real build_release of `finished` (manifest, files, keys), for tests that only exercise the file moves."""
    return rel.build_release(finished)


@pytest.fixture
def run_dir(released, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(released[0], d, symlinks=True)
    return d, released[1]


def test_keys_live_outside_the_published_folder(released, capsys):
    d, keys = released
    assert sorted(os.listdir(d / "release")) == PUBLISHED  # nothing secret in what is published
    kdir, kfile = d / "keys", d / "keys" / "owner-keys.json"
    assert stat.S_IMODE(kdir.stat().st_mode) == 0o700 and stat.S_IMODE(kfile.stat().st_mode) == 0o600
    owner = json.loads(kfile.read_text())
    manifest = json.loads((d / "release" / "manifest.json").read_text())
    assert {int(k): v for k, v in owner["keys"].items()} == keys and len(keys) == 1
    assert owner["release_id"] == manifest["release_id"] and re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{8}", owner["release_id"])
    assert owner["manifest_sha256"] == rel.sha256((d / "release" / "manifest.json").read_bytes())
    for p in (d / "release").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644 and keys[1].encode() not in p.read_bytes()
    assert not any(n.startswith(".") for n in os.listdir(d)) and os.listdir(kdir) == ["owner-keys.json"]


def test_a_second_release_is_refused_and_changes_nothing(run_dir, capsys):
    d, _ = run_dir
    before = tree(d)
    code, err, out = _cli(capsys, "release", d)
    assert code == 2 and "--new-keys" in err and "already exist" in err and len(err.splitlines()) == 1, err
    assert out == "" and tree(d) == before
    # the keys file alone (release/ deleted or lost) is refused the same way: those keys are not overwritten
    shutil.rmtree(d / "release")
    before = tree(d)
    code, err, _ = _cli(capsys, "release", d)
    assert code == 2 and "owner-keys.json already exists" in err and tree(d) == before


def test_new_keys_keeps_the_old_keys_and_the_release_they_open(run_dir, tmp_path, capsys):
    d, old_keys = run_dir
    old = tree(d)
    old_id = json.loads((d / "release" / "manifest.json").read_text())["release_id"]
    code, err, out = _cli(capsys, "release", d, "--new-keys")
    assert code == 0, err
    new_keys = _keys_printed(out)
    arch = d / "keys" / "archive" / old_id
    assert sorted(os.listdir(d / "keys")) == ["archive", "owner-keys.json"] and os.listdir(d / "keys" / "archive") == [old_id]
    # the archive holds the old release and keys byte for byte
    assert tree(arch) == {k.replace("keys/", "", 1): v for k, v in old.items() if k.startswith("keys/o")} | {
        k: v for k, v in old.items() if k.startswith("release")}
    assert stat.S_IMODE(arch.stat().st_mode) == 0o700
    assert json.loads((d / "keys" / "owner-keys.json").read_text())["keys"] == {"1": new_keys[1]} != {"1": old_keys[1]}
    # old keys open the archived release, new keys the new one; neither opens the other
    for rdir, key in ((arch / "release", old_keys[1]), (d / "release", new_keys[1])):
        target = tmp_path / f"{rdir.parent.name}.pt"
        assert _cli(capsys, "unlock", rdir, "--level", 1, "--key", key, "--out", target)[0] == 0 and target.is_file()
    for rdir, key in ((arch / "release", new_keys[1]), (d / "release", old_keys[1])):
        code, err, _ = _cli(capsys, "unlock", rdir, "--level", 1, "--key", key, "--out", tmp_path / "x.pt")
        assert code == 2 and "not a key of this release" in err
    # a second rotation archives the second release beside the first, never over it
    mid_id = json.loads((d / "release" / "manifest.json").read_text())["release_id"]
    mid = tree(d / "release")
    assert _cli(capsys, "release", d, "--new-keys")[0] == 0
    assert sorted(os.listdir(d / "keys" / "archive")) == sorted([old_id, mid_id])
    assert tree(d / "keys" / "archive" / mid_id / "release") == mid


def _patched_build(monkeypatch, prebuilt):
    """build_release answered from one real build (fresh release id), so the file moves can be tested quickly."""
    def build(out):
        manifest, files, keys = copy.deepcopy(prebuilt)
        manifest["release_id"] = rel.new_release_id()
        return manifest, files, keys
    monkeypatch.setattr(rel, "build_release", build)


def _old_layout(d: Path) -> None:
    """What `gradauth release` wrote before the keys moved out: release/owner-keys.json, no keys/ folder."""
    os.replace(d / "keys" / "owner-keys.json", d / "release" / "owner-keys.json")
    (d / "keys").rmdir()


@pytest.mark.parametrize("layout", ["current", "old"])
def test_a_failure_at_any_step_of_new_keys_leaves_the_old_release_and_keys(released, prebuilt, tmp_path, monkeypatch,
                                                                         layout):
    _patched_build(monkeypatch, prebuilt)
    real_move = rel._move

    def fresh(name):
        d = tmp_path / name
        shutil.copytree(released[0], d, symlinks=True)
        if layout == "old":
            _old_layout(d)
        return d

    steps = []
    monkeypatch.setattr(rel, "_move", lambda src, dst: (steps.append(dst), real_move(src, dst)))
    with contextlib.redirect_stdout(io.StringIO()):
        rel.release_dir(fresh("ok"), new_keys=True)
    # current: old keys → archive, old release → archive; old layout: old release → archive, its keys out of it;
    # then new keys, new release
    assert len(steps) == 4
    for fail_at in range(len(steps)):
        d = fresh(f"fail{fail_at}")
        before, calls = tree(d), []

        def failing(src, dst):
            calls.append(dst)
            if len(calls) > fail_at:
                raise OSError(28, "No space left on device (injected)")
            real_move(src, dst)
        monkeypatch.setattr(rel, "_move", failing)
        with pytest.raises(OSError, match="injected"), contextlib.redirect_stdout(io.StringIO()) as stdout:
            rel.release_dir(d, new_keys=True)
        assert tree(d) == before, fail_at  # everything moved back, no temporary left, no archive folder
        assert stdout.getvalue() == ""     # no key was shown for a release that does not exist


def test_old_layout_is_refused_with_the_way_out_and_archived_whole_by_new_keys(run_dir, prebuilt, monkeypatch,
                                                                               capsys):
    d, keys = run_dir
    _old_layout(d)
    before = tree(d)
    code, err, _ = _cli(capsys, "release", d)
    assert code == 2 and len(err.splitlines()) == 1 and "old layout" in err and "--new-keys" in err
    assert f"mv {d / 'release' / 'owner-keys.json'} {d / 'keys' / 'owner-keys.json'}" in err and tree(d) == before
    code, err, _ = _cli(capsys, "run", d / "config.yaml", "--out", d, "--resume")
    assert code == 2 and "old layout" in err and "mv " in err and tree(d) == before
    _patched_build(monkeypatch, prebuilt)
    old_id = json.loads((d / "release" / "manifest.json").read_text())["release_id"]
    assert _cli(capsys, "release", d, "--new-keys")[0] == 0
    arch = d / "keys" / "archive" / old_id
    assert sorted(os.listdir(arch / "release")) == PUBLISHED  # the archived release no longer holds its keys
    assert hashlib.sha256((arch / "owner-keys.json").read_bytes()).hexdigest() == before["release/owner-keys.json"][2]
    assert sorted(os.listdir(d / "release")) == PUBLISHED
    assert rel.unlock_bytes(arch / "release", 1, keys[1])


def test_a_planted_keys_link_is_refused(finished, tmp_path, capsys):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    elsewhere = tmp_path / "public"
    elsewhere.mkdir()
    (d / "keys").symlink_to(elsewhere)
    before = tree(d)
    code, err, _ = _cli(capsys, "release", d)
    assert code == 2 and "keys is not a folder" in err and tree(d) == before and not any(elsewhere.iterdir())


def test_a_planted_archive_link_is_refused(run_dir, tmp_path, capsys):
    d, _ = run_dir  # a folder that travelled with keys/archive pointing somewhere public
    elsewhere = tmp_path / "public"
    elsewhere.mkdir()
    (d / "keys" / "archive").symlink_to(elsewhere)
    before = tree(d)
    code, err, _ = _cli(capsys, "release", d, "--new-keys")
    assert code == 2 and "archive is not a folder" in err and tree(d) == before and not any(elsewhere.iterdir())


def test_run_refuses_a_released_folder_before_training_and_resume_leaves_the_release(run_dir, capsys):
    d, keys = run_dir
    before = tree(d)
    code, err, _ = _cli(capsys, "run", d / "config.yaml", "--out", d)
    assert code == 2 and "already holds a release" in err and "--resume" in err and len(err.splitlines()) == 1
    assert tree(d) == before  # refused up front: base.pt, trials, levels untouched
    release_and_keys = {k: v for k, v in before.items() if k.startswith(("release", "keys"))}
    with contextlib.redirect_stdout(io.StringIO()):
        run_all(str(d / "config.yaml"), str(d), resume=True)
    err = capsys.readouterr().err
    assert "left as it is" in err and "up to date" in err  # the base was not retrained either
    after = tree(d)
    assert {k: v for k, v in after.items() if k.startswith(("release", "keys"))} == release_and_keys
    assert after["base.pt"] == before["base.pt"] and (d / "report.md").is_file()
    assert rel.unlock_bytes(d / "release", 1, keys[1])


def _fifo(p: Path) -> Path:
    os.mkfifo(p)
    return p


def _symlink(p: Path, to: Path) -> Path:
    p.symlink_to(to)
    return p


# --out targets that must be refused, even with --force: (make the path from (run dir, scratch dir), message part)
PROTECTED = {
    "owner keys file": (lambda d, t: d / "keys" / "owner-keys.json", "inside the owner's keys folder"),
    "new file in keys folder": (lambda d, t: d / "keys" / "level1.pt", "inside the owner's keys folder"),
    "published locked model": (lambda d, t: d / "release" / "locked.pt", "inside the release folder"),
    "new file in release folder": (lambda d, t: d / "release" / "level-1.pt", "inside the release folder"),
    "release folder itself": (lambda d, t: d / "release", "inside the release folder"),
    "release folder via ..": (lambda d, t: Path(f"{t}/../run/release/new.pt"), "inside the release folder"),
    # `..` after a link leaves the link's target, not the link's folder: textually this is scratch/release/new.pt
    "release folder via a link then ..": (lambda d, t: _symlink(t / "rl", d / "release") / ".." / "release" / "new.pt",
                                          "inside the release folder"),
    "keys folder via a linked folder": (lambda d, t: _symlink(t / "k", d / "keys") / "new.pt",
                                        "inside the owner's keys folder"),
    "/dev/null": (lambda d, t: Path("/dev/null"), "a device, not a regular file"),
    "a folder": (lambda d, t: t, "a folder, not a regular file"),
    "a FIFO": (lambda d, t: _fifo(t / "pipe"), "a FIFO, not a regular file"),
    "a symlink to a file": (lambda d, t: _symlink(t / "link.pt", t / "victim.txt"), "symbolic link"),
    "a dangling symlink": (lambda d, t: _symlink(t / "dangling.pt", t / "nothing-here"), "symbolic link"),
    "an owner keys copy elsewhere": (lambda d, t: Path(shutil.copy(d / "keys" / "owner-keys.json", t / "backup.json")),
                                     "holds owner keys"),
    "a new owner-keys.json elsewhere": (lambda d, t: t / "owner-keys.json", "names an owner keys file"),
}


@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
@pytest.mark.parametrize("case", list(PROTECTED))
def test_unlock_out_refuses_protected_paths_and_changes_nothing(run_dir, tmp_path, capsys, case, force):
    d, keys = run_dir
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "victim.txt").write_text("precious")
    make, needle = PROTECTED[case]
    target = make(d, scratch)
    before, before_scratch = tree(d), tree(scratch)
    dev = os.lstat("/dev/null")
    code, err, _ = _cli(capsys, "unlock", d / "release", "--level", 1, "--key", keys[1], "--out", target,
                        *(["--force"] if force else []))
    assert code == 2 and needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert tree(d) == before and tree(scratch) == before_scratch
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode) and os.lstat("/dev/null").st_rdev == dev.st_rdev


def test_unlock_out_existing_file_needs_force_and_force_writes_no_link_through(run_dir, tmp_path, capsys):
    d, keys = run_dir
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "model.pt"
    os.link(victim, out)  # a hard link: replacing `out` must not write into `victim`
    code, err, _ = _cli(capsys, "unlock", d / "release", "--level", 1, "--key", keys[1], "--out", out)
    assert code == 2 and "already exists: pass --force" in err and out.read_text() == "precious"
    code, err, _ = _cli(capsys, "unlock", d / "release", "--level", 1, "--key", keys[1], "--out", out, "--force")
    assert code == 0, err
    assert victim.read_text() == "precious" and out.read_bytes() == rel.unlock_bytes(d / "release", 1, keys[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "run", "victim.txt"]  # no temporary left
    # a refused key writes nothing even with --force
    code, err, _ = _cli(capsys, "unlock", d / "release", "--level", 1, "--key", keys[1][:-2] + "AA", "--out",
                        tmp_path / "new.pt", "--force")
    assert code == 2 and not (tmp_path / "new.pt").exists()


def test_unlock_an_archived_release_refuses_the_keys_folder_around_it(run_dir, prebuilt, monkeypatch, tmp_path, capsys):
    d, keys = run_dir
    _patched_build(monkeypatch, prebuilt)
    old_id = json.loads((d / "release" / "manifest.json").read_text())["release_id"]
    assert _cli(capsys, "release", d, "--new-keys")[0] == 0
    arch = d / "keys" / "archive" / old_id
    before = tree(d)
    for target in (arch / "owner-keys.json", arch / "x.pt", d / "keys" / "x.pt", d / "release" / "x.pt"):
        code, err, _ = _cli(capsys, "unlock", arch / "release", "--level", 1, "--key", keys[1], "--out", target,
                            "--force")
        assert code == 2 and "inside" in err, (target, err)
    assert tree(d) == before
    assert _cli(capsys, "unlock", arch / "release", "--level", 1, "--key", keys[1], "--out", tmp_path / "ok.pt")[0] == 0


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown to another user needs root")
def test_a_keys_folder_of_another_user_is_refused_and_a_loose_mode_tightened(finished, prebuilt, tmp_path,
                                                                              monkeypatch, capsys):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    (d / "keys").mkdir(mode=0o755)
    os.chmod(d / "keys", 0o755)
    os.chown(d / "keys", 54321, -1)
    before = tree(d)
    code, err, _ = _cli(capsys, "release", d)
    assert code == 2 and "belongs to another user (uid 54321)" in err and tree(d) == before
    os.chown(d / "keys", os.geteuid(), -1)
    _patched_build(monkeypatch, prebuilt)
    assert _cli(capsys, "release", d)[0] == 0
    assert stat.S_IMODE((d / "keys").stat().st_mode) == 0o700 and os.listdir(d / "keys") == ["owner-keys.json"]
