"""A corpus of bad configs and bad data (issue 10): each is one line on stderr, exit 2, no traceback, nothing written.

The CLI runs in-process (`gradauth.cli.main`) from inside tmp_path, so a stray relative write (results/<name>) would
show up there too; one case runs as a real subprocess.
"""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from gradauth.cli import main
from gradauth.config import Config, dump_config, load_config, parse_config
from gradauth.errors import GradauthError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
NAN, INF = float("nan"), float("inf")


def _set(raw: dict, dotted: str, value):
    *path, last = dotted.split(".")
    for p in path:
        raw = raw.setdefault(p, {})
    raw[last] = value


def _quickstart_with(**dotted) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(QUICKSTART))
    for k, v in dotted.items():
        _set(raw, k.replace("__", "."), v)
    return raw


def _refused(capsys, tmp_path, argv, needle, out, progress=False):
    """Run the CLI in tmp_path; assert exit 2 with one line holding `needle`, and nothing new on disk. With
    `progress`, training's "[train] epoch …" lines may come before that line."""
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = main(argv)
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    if progress:
        *before_err, err = err.splitlines()
        assert all(line.startswith("[train] epoch ") for line in before_err), before_err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert not out.exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    return err


# (dotted overrides of sweeps/quickstart.yaml, what the one line must say). Keys use "__" for "." (kwargs).
BAD_VALUES = [
    ({"train__lr": NAN}, "`train.lr` must be a finite number, got nan"),
    ({"train__lr": INF}, "`train.lr` must be a finite number, got inf"),
    ({"train__lr": -0.1}, "`train.lr` must be > 0, got -0.1"),
    ({"train__lr": "fast"}, "`train.lr` must be a number, got 'fast'"),
    ({"train__lr": "0.1"}, "got the text '0.1': remove the quotes"),
    ({"train__epochs": 0}, "`train.epochs` must be ≥ 1, got 0"),
    ({"train__epochs": 2.5}, "`train.epochs` must be a whole number, got 2.5"),
    ({"train__epochs": 3.0}, "got 3.0: write 3"),
    ({"train__epochs": True}, "`train.epochs` must be a whole number, got True"),
    ({"train__batch_size": -5}, "`train.batch_size` must be ≥ 1, got -5"),
    ({"train__batch_size": 0}, "`train.batch_size` must be ≥ 1, got 0"),
    ({"train__batch_size": 10**11}, "`train.batch_size` must be ≤ 2147483647"),
    ({"train__schedule": "linear"}, "`train.schedule` 'linear' is not one of cosine, step"),
    ({"train__precision": "fp16"}, "`train.precision` 'fp16' is not one of auto, fp32, bf16"),
    ({"train__momentum": 0.0}, "`train.momentum` must be in (0, 1), got 0.0"),
    ({"train__momentum": 1.5}, "`train.momentum` must be in (0, 1), got 1.5"),
    ({"train__weight_decay": -1e-4}, "`train.weight_decay` must be ≥ 0"),
    ({"train__sparsity": NAN}, "`train.sparsity` must be a finite number"),
    ({"train__gamma_max": 0}, "`train.gamma_max` must be > 0, got 0"),
    ({"data__flip": "no"}, "`data.flip` must be true or false, got the text 'no': write true or false without quotes"),
    ({"data__flip": 1}, "`data.flip` must be true or false, got 1"),
    ({"data__download": "yes"}, "`data.download` must be true or false"),
    ({"data__crop_pad": -2}, "`data.crop_pad` must be ≥ 0, got -2"),
    ({"data__name": "mnist"}, "`data.name` 'mnist' is not one of digits, cifar10, cifar100, imagefolder"),
    ({"data__val_fraction": 1.0}, "`data.val_fraction` must be in [0, 1), got 1.0"),
    ({"data__test_fraction": 0}, "`data.test_fraction` must be in (0, 1), got 0"),
    ({"data__train_subset": 0}, "`data.train_subset` must be ≥ 1, got 0"),
    ({"data__image_size": 0}, "`data.image_size` must be ≥ 1, got 0"),
    ({"data__root": 7}, "`data.root` must be text, got 7"),
    ({"data": [1, 2]}, "`data` must be a mapping of settings, got list"),
    ({"seed": "abc"}, "`seed` must be a whole number, got 'abc'"),
    ({"seed": -1}, "`seed` must be in [0, 4294967295], got -1"),
    ({"name": "../../etc"}, "`name` '../../etc' is not a plain name"),
    ({"name": 123}, "`name` must be text, got 123: put it in quotes"),
    ({"name": None}, "`name` must not be null"),
    ({"model__arch": "resnet21"}, "CIFAR ResNet depth must be 6n+2"),
    ({"model__arch": "vgg13"}, "'vgg13' is not a known model.arch"),
    ({"model__arch": "densenet41"}, "DenseNet depth must be 3n+4"),
    ({"model__arch": "torchvision:nonet"}, "torchvision has no classifier 'nonet'"),
    ({"model__width": 0}, "`model.width` must be > 0, got 0"),
    ({"lock__mode": "percent"}, "`lock.mode` 'percent' is not one of rate, threshold"),
    ({"lock__values": [0.1, NAN]}, "`lock.values` entry must be a finite number, got nan"),
    ({"lock__values": [0.1, 0.1]}, "`lock.values` lists 0.1 more than once"),
    ({"lock__values": [1.5]}, "lock rate 1.5 is outside (0, 1)"),
    ({"lock__values": []}, "`lock.values` is empty"),
    ({"finetune__scope": ["everything"]}, "`finetune.scope` entry 'everything' is not one of all, bn, head"),
    ({"finetune__seeds": [0, 0]}, "`finetune.seeds` lists 0 more than once"),
    ({"finetune__epochs": [4, 2.5]}, "`finetune.epochs` entry must be a whole number, got 2.5"),
    ({"finetune__lr": []}, "`finetune.lr` is empty: the search space needs at least one value"),
    ({"finetune__data_fraction": [0]}, "`finetune.data_fraction` entry must be in (0, 1], got 0"),
    ({"finetune__precision": "half"}, "`finetune.precision` 'half' is not one of"),
    ({"sweep__resources": {"cpu": 1, "gpu": -1}}, "`sweep.resources.gpu` must be ≥ 0, got -1"),
    ({"sweep__resources": {"cpu": 1, "gpu": 1.5}}, "more than one GPU per trial must be a whole number"),
    ({"sweep__resources": {"cpu": 1, "tpu": 1}}, "`sweep.resources` must be a mapping with keys cpu and gpu"),
    ({"sweep__resources": {"cpu": 0, "gpu": 0}}, "asks for no cpu and no gpu"),
    ({"sweep__resources": {"cpu": "one"}}, "`sweep.resources.cpu` must be a number, got 'one'"),
    ({"sweep__lock_bound": 2}, "`sweep.lock_bound` must be in [0, 1], got 2"),
    ({"sweep__max_concurrent": 0}, "`sweep.max_concurrent` must be ≥ 1, got 0"),
    ({"sweep__storage": ""}, "`sweep.storage` is empty text"),
    ({"sweep__checkpoint_min_s": -1}, "`sweep.checkpoint_min_s` must be ≥ 0"),
    ({"select__levels": 0}, "`select.levels` must be ≥ 1, got 0"),
    ({"select__min_gap": 1}, "`select.min_gap` must be in [0, 1), got 1"),
    ({"select__targets": [0.9]}, "`select.targets` has 1 values but `select.levels` is 3"),
    ({"select__targets": [0.9, 0.8, 1.7]}, "`select.targets` entry must be in [0, 1], got 1.7"),
    ({"select__max_locked_acc": NAN}, "`select.max_locked_acc` must be a finite number"),
    ({"release__noise_init": "yes"}, "`release.noise_init` must be true or false, got the text 'yes'"),
    ({"importance": ["bn_gamma", "bn_gamma"]}, "`importance` lists bn_gamma more than once"),
    ({"importance": "random"}, "`importance` 'random' is not one of bn_gamma, slice"),
    ({"importance": []}, "`importance` is empty"),
    ({"importance": [{"name": "slice", "classes": []}]}, "`importance.classes` is empty"),
    ({"importance": [{"name": "slice", "classes": [-1]}]}, "`importance.classes` entry must be ≥ 0, got -1"),
    ({"importance": [{"name": "slice", "theta": NAN}]}, "`importance.theta` must be a finite number"),
    ({"importance": [{"name": "bn_gamma", "samples": 10}]}, "`importance.samples` applies to slice only"),
    ({"importance": [7]}, "`importance` must be a name (bn_gamma, slice) or a mapping"),
    ({"colour": "blue"}, "unknown key `colour`"),
    ({"train__epoch": 3}, "unknown key `train.epoch`"),
]


@pytest.mark.parametrize("overrides, needle", BAD_VALUES, ids=[str(i) for i in range(len(BAD_VALUES))])
def test_bad_value_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, overrides, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(_quickstart_with(**overrides)))
    _refused(capsys, tmp_path, ["run", str(cfg), "--out", str(tmp_path / "out")], needle, tmp_path / "out")


# Files that are not a config at all, and YAML-level problems.
BAD_FILES = [
    ("dup_key", b"name: q\ntrain:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n",
     "duplicate key `lr` at line 5 (first at line 3): keep one of them"),
    ("dup_section", b"train: {lr: 0.1}\nseed: 1\ntrain: {epochs: 2}\n", "duplicate key `train` at line 3 (first at line 1)"),
    ("dup_and_more", b"seed: 1\nseed: 2\ntrain: {epochs: 0}\n", "duplicate key `seed` at line 2 (first at line 1): keep one of them; "
                                                                "`train.epochs` must be ≥ 1, got 0"),
    ("latin1", "name: café\n".encode("latin-1"), "is not UTF-8 text (byte 9 is 0xe9): save it as UTF-8"),
    ("binary", bytes(range(256)) * 4, "is a binary file, not YAML text"),
    ("empty", b"", "is empty"),
    ("blank", b"  \n\n", "is empty"),
    ("comments_only", b"# nothing here\n", "holds no settings (only comments)"),
    ("a_list", b"- train\n- lock\n", "the config must be a YAML mapping"),
    ("a_string", b"quickstart\n", "the config must be a YAML mapping"),
    ("bad_syntax", b"train: {lr: 0.1\n", "not valid YAML at line 2"),
    ("python_tag", b"name: !!python/object/apply:os.system ['touch PWNED']\n", "not valid YAML at line 1"),
    ("tab_indent", b"train:\n\tlr: 0.1\n", "not valid YAML"),
]


@pytest.mark.parametrize("content, needle", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_file_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, content, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(content)
    _refused(capsys, tmp_path, ["train", str(cfg), "--out", str(tmp_path / "out")], needle, tmp_path / "out")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("make, needle", [
    (lambda d: d, "is a directory: pass a YAML file"),
    (lambda d: d / "missing.yaml", "not found"),
    (lambda d: Path("/dev/null"), "is not a regular file"),
], ids=["directory", "missing", "device"])
def test_a_path_that_is_no_config_file(tmp_path, capsys, make, needle):
    (tmp_path / "sub").mkdir()
    path = make(tmp_path / "sub")
    _refused(capsys, tmp_path, ["run", str(path), "--out", str(tmp_path / "out")], needle, tmp_path / "out")


def test_every_problem_is_in_the_one_line(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("seed: abc\ntrain: {lr: .nan, epochs: 2.5, schedule: linear}\ndata: {flip: 'no', crop_pad: -2}\n"
                   "select: {levels: 0}\nsweep: {resources: {cpu: 1, gpu: -1}}\nbogus: 1\n")
    err = _refused(capsys, tmp_path, ["run", str(cfg), "--out", str(tmp_path / "out")], "bad.yaml: ", tmp_path / "out")
    for needle in ("`seed`", "`train.lr`", "`train.epochs`", "`train.schedule`", "`data.flip`", "`data.crop_pad`",
                   "`select.levels`", "`sweep.resources.gpu`", "unknown key `bogus`"):
        assert needle in err
    assert err.count("; ") == 8


def test_a_merge_key_override_is_not_a_duplicate(tmp_path):
    """`<<: *anchor` then an explicit key is YAML's way to override: allowed, the explicit value wins."""
    p = tmp_path / "c.yaml"
    p.write_text("train: &t {lr: 0.1, epochs: 3}\nfinetune:\n  batch_size: 32\n  <<: {momentum: 0.5, batch_size: 16}\n")
    cfg = load_config(p)
    assert (cfg.finetune.batch_size, cfg.finetune.momentum, cfg.train.lr) == (32, 0.5, 0.1)


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path):
    """YAML 1.1 reads `1e-4` as text; the config reads it as the number it looks like (and hashes it as one)."""
    p = tmp_path / "c.yaml"
    p.write_text("train: {lr: 1e-2, sparsity: 3E-5}\n")
    cfg = load_config(p)
    assert cfg.train.lr == 0.01 and cfg.train.sparsity == 3e-5
    assert cfg.hash() == parse_config({"train": {"lr": 0.01, "sparsity": 3e-5}}).hash()


def test_a_resolved_config_reads_back_identically(tmp_path):
    """config.yaml as written beside outputs (every importance field listed, defaults included) parses to the same
    config and hash."""
    cfg = load_config(ROOT / "sweeps" / "quickstart-criteria.yaml")
    p = tmp_path / "config.yaml"
    p.write_text(dump_config(cfg))
    back = load_config(p)
    assert back == cfg and back.hash() == cfg.hash() and dump_config(back) == dump_config(cfg)


@pytest.mark.parametrize("name", ["quickstart", "quickstart-criteria", "cifar10-cpu", "cifar10-cpu-criteria",
                                  "cifar10-cpu-targeted"])
def test_shipped_sweeps_keep_the_hashes_of_their_committed_results(name):
    """The stricter parser must not change what a shipped sweep means: its hashes are those its committed results
    were made with (so --resume still reuses their base.pt and trials)."""
    cfg = load_config(ROOT / "sweeps" / f"{name}.yaml")
    res = ROOT / "results" / name
    assert cfg.base_hash() == json.loads((res / "base.json").read_text())["base_hash"]
    assert set(pd.read_parquet(res / "trials.parquet", columns=["config_hash"])["config_hash"]) == {cfg.hash()}


def test_rules_are_declared_on_every_field():
    """Every config field carries its rule, so nothing escapes the check (and a registry can feed choices)."""
    from dataclasses import fields
    from gradauth.config import SECTIONS, ImportanceConfig, Rule
    for cls in [*SECTIONS.values(), ImportanceConfig]:
        for f in fields(cls):
            assert isinstance(f.metadata.get("rule"), Rule), f"{cls.__name__}.{f.name}"
    assert {f.name for f in fields(Config) if isinstance(f.metadata.get("rule"), Rule)} == {"name", "seed"}


def test_a_choice_function_feeds_the_check(monkeypatch):
    """Choices are read when checking, from one place (the registry): a dataset added there is accepted without
    other changes."""
    from gradauth import registry
    with pytest.raises(GradauthError, match="'svhn' is not one of"):
        parse_config({"data": {"name": "svhn"}})
    monkeypatch.setitem(registry.table("dataset"), "svhn", registry.DatasetEntry("svhn", lambda cfg, seed: None))
    assert parse_config({"data": {"name": "svhn"}}).data.name == "svhn"


# ---- data problems: one line before training -----------------------------------------------------------------

def _png(path: Path, value: int = 128):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def _imagefolder(root: Path, train=("cat", "dog"), test=("cat", "dog"), per_class=3):
    for part, classes in (("train", train), ("test", test)):
        (root / part).mkdir(parents=True, exist_ok=True)
        for c in classes:
            for i in range(per_class):
                _png(root / part / c / f"{i}.png", 40 * i)


def _imagefolder_config(tmp_path, root: Path, **data) -> Path:
    raw = _quickstart_with(data={"name": "imagefolder", "root": str(root), "image_size": 8, "crop_pad": 1,
                                 "val_fraction": 0.0, **data})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _data_refused(capsys, tmp_path, cfg, needle):
    return _refused(capsys, tmp_path, ["train", str(cfg), "--out", str(tmp_path / "out")], needle, tmp_path / "out")


def test_imagefolder_without_class_folders(tmp_path, capsys):
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    (tmp_path / "imgs" / "test").mkdir()
    cfg = _imagefolder_config(tmp_path, tmp_path / "imgs")
    _data_refused(capsys, tmp_path, cfg, "imgs/train holds no class folders")


def test_imagefolder_without_test_split(tmp_path, capsys):
    _imagefolder(tmp_path / "imgs")
    import shutil
    shutil.rmtree(tmp_path / "imgs" / "test")
    _data_refused(capsys, tmp_path, _imagefolder_config(tmp_path, tmp_path / "imgs"), "imgs/test is missing")


def test_imagefolder_class_folder_without_images(tmp_path, capsys):
    _imagefolder(tmp_path / "imgs")
    (tmp_path / "imgs" / "train" / "emu").mkdir()
    (tmp_path / "imgs" / "test" / "emu").mkdir()
    (tmp_path / "imgs" / "test" / "emu" / "notes.txt").write_text("no image")
    _data_refused(capsys, tmp_path, _imagefolder_config(tmp_path, tmp_path / "imgs"),
                  "Found no valid file for the classes emu")


def test_imagefolder_train_and_test_classes_differ(tmp_path, capsys):
    _imagefolder(tmp_path / "imgs", train=("cat", "dog"), test=("cat", "dog", "emu"))
    _data_refused(capsys, tmp_path, _imagefolder_config(tmp_path, tmp_path / "imgs"),
                  "train and test have different class folders (only in test: emu)")


def test_imagefolder_undecodable_image_is_named(tmp_path, capsys):
    _imagefolder(tmp_path / "imgs")
    (tmp_path / "imgs" / "train" / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    err = _data_refused(capsys, tmp_path, _imagefolder_config(tmp_path, tmp_path / "imgs"), "cannot be decoded")
    assert "train/dog/1.png" in err


def test_imagefolder_with_one_class(tmp_path, capsys):
    _imagefolder(tmp_path / "imgs", train=("cat",), test=("cat",))
    _data_refused(capsys, tmp_path, _imagefolder_config(tmp_path, tmp_path / "imgs"), "a classifier needs at least 2")


def test_imagefolder_good_one_loads(tmp_path):
    """The checks above refuse only what is wrong: the same layout, complete, loads with its labels."""
    from gradauth.data import load_dataset
    _imagefolder(tmp_path / "imgs")
    cfg = load_config(_imagefolder_config(tmp_path, tmp_path / "imgs"))
    ds = load_dataset(cfg.data)
    assert (len(ds.train), len(ds.test), ds.num_classes) == (6, 6, 2) and ds.train.x.shape[1:] == (3, 8, 8)
    assert sorted(ds.test.y.tolist()) == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("subset, needle", [
    ({"train_subset": 1133}, "data.train_subset 1133 is larger than the train split (1132 images after holding out "
                             "data.val_fraction 0.1): lower it to at most 1132"),
    ({"test_subset": 540}, "data.test_subset 540 is larger than the test split (539 images)"),
    ({"val_fraction": 0.9999}, "has 0 train images"),
])
def test_subsets_larger_than_the_split(tmp_path, capsys, subset, needle):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_quickstart_with(**{f"data__{k}": v for k, v in subset.items()})))
    _data_refused(capsys, tmp_path, p, needle)


def _fake_cifar(root: Path, n=10, labels=None):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": labels if labels is not None else list(rng.integers(0, 10, n))}, f)
    return d


def _cifar_config(tmp_path, root) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_quickstart_with(data={"name": "cifar10", "root": str(root)})))
    return p


def test_cifar_root_missing_files(tmp_path, capsys):
    d = _fake_cifar(tmp_path / "cifar")
    (d / "data_batch_3").unlink()
    (d / "test_batch").unlink()
    _data_refused(capsys, tmp_path, _cifar_config(tmp_path, tmp_path / "cifar"),
                  "cifar-10-batches-py lacks data_batch_3, test_batch: re-extract")


def test_cifar_batch_with_labels_out_of_range(tmp_path, capsys):
    _fake_cifar(tmp_path / "cifar", labels=[0, 1, 2, 3, 4, 5, 6, 7, 8, 12])
    _data_refused(capsys, tmp_path, _cifar_config(tmp_path, tmp_path / "cifar"), "data_batch_1 is damaged")


def test_cifar_batch_with_the_wrong_shape(tmp_path, capsys):
    d = _fake_cifar(tmp_path / "cifar")
    with open(d / "data_batch_2", "wb") as f:
        pickle.dump({"data": np.zeros((10, 100), dtype=np.uint8), "labels": [0] * 10}, f)
    _data_refused(capsys, tmp_path, _cifar_config(tmp_path, tmp_path / "cifar"),
                  "data_batch_2 is not a CIFAR python batch")


def test_slice_classes_the_data_lacks_are_refused_before_training(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_quickstart_with(importance=["bn_gamma", {"name": "slice", "classes": [3, 12]}])))
    _data_refused(capsys, tmp_path, p, "`importance` slice[3,12] names classes [12], but digits has classes 0…9")


# ---- base training that diverges -----------------------------------------------------------------------------

def test_diverging_base_training_writes_no_nan_model(tmp_path, capsys):
    raw = _quickstart_with(train__epochs=2, train__lr=1.0e30, model__width=0.5)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    err = _refused(capsys, tmp_path, ["train", str(p), "--out", str(tmp_path / "out")], "base training diverged",
                   tmp_path / "out", progress=True)
    assert "loss nan in epoch 1 of 2" in err and "lower train.lr (now 1e+30)" in err


# ---- one real process ----------------------------------------------------------------------------------------

@pytest.mark.subprocess
def test_a_real_process_gets_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: q\ntrain: {lr: .nan, schedule: linear}\nselect: {levels: 0}\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "gradauth", "run", str(cfg), "--out", str(tmp_path / "out")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradauth run: error: ") and "Traceback" not in r.stderr
    assert "`train.lr` must be a finite number" in lines[0] and "'linear'" in lines[0] and "`select.levels`" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
