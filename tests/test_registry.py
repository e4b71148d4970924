"""Registries (issue 11): importance criteria, datasets and architectures are registrations, the built-ins included;
a user's own ones work from a file outside the package (GRADAUTH_PLUGINS), on Ray workers too."""
import os
import pickle
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from gradauth import registry
from gradauth.cli import main
from gradauth.config import dump_config, load_config, parse_config
from gradauth.errors import GradauthError

PLUGIN = textwrap.dedent('''
    """A user's plugin: one importance criterion, one dataset, one architecture; gradauth is not edited."""
    from dataclasses import dataclass

    import torch
    import torch.nn as nn

    from gradauth import register_dataset, register_importance, register_model, setting
    from gradauth.data import Loaded, Split
    from gradauth.models import bn_layers


    @dataclass
    class OneLayer:
        layer: int = setting(0, "int", lo=0)   # the BatchNorm (by position) whose channels count most


    @register_importance("one_layer", settings=OneLayer, label=lambda s: f"one_layer[{s.layer}]")
    def one_layer(model, ds, layer):
        """Every channel of BN `layer` scores 2, all others 1: a lock removes that layer's first channels."""
        return {n: torch.full((bn.num_features,), 2.0 if i == layer else 1.0)
                for i, (n, bn) in enumerate(bn_layers(model).items())}


    def _bars(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 4, (n,), generator=g)
        x = torch.randint(0, 60, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
        for k in range(4):
            x[y == k, :, 2 * k:2 * k + 2, :] = 200
        return Split(x, y)


    @register_dataset("bars")
    def bars(cfg, seed):
        """Four classes: which pair of rows is bright."""
        return Loaded(_bars(200, seed), _bars(100, seed + 1), 4)


    class BarNet(nn.Module):
        def __init__(self, num_classes, in_channels, width):
            super().__init__()
            a, b = max(1, round(8 * width)), max(1, round(16 * width))
            self.features = nn.Sequential(nn.Conv2d(in_channels, a, 3, padding=1, bias=False), nn.BatchNorm2d(a),
                                          nn.ReLU(), nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b),
                                          nn.ReLU(), nn.AdaptiveAvgPool2d(1))
            self.head = nn.Linear(b, num_classes)

        def forward(self, x):
            return self.head(torch.flatten(self.features(x), 1))


    @register_model("barnet")
    def barnet(arch, num_classes, in_channels, width):
        return BarNet(num_classes, in_channels, width)
''')

RAW = {"name": "plug", "data": {"name": "bars", "crop_pad": 0, "flip": False},
       "model": {"arch": "barnet"}, "train": {"epochs": 3, "lr": 0.05},
       "importance": [{"name": "one_layer", "layer": 1}],
       "lock": {"mode": "rate", "values": [0.25]},
       "finetune": {"epochs": [1], "lr": [0.01], "seeds": [0]},
       "sweep": {"lock_bound": 1.0, "resources": {"cpu": 1, "gpu": 0}}}


@pytest.fixture
def sandbox(monkeypatch):
    """The registries and loaded plugins as they were before the test (a plugin's names do not leak into others)."""
    for kind in registry.KINDS:
        registry.table(kind)  # built-ins in first, so they stay
    tables = {k: dict(v) for k, v in registry._TABLES.items()}
    loaded, modules = dict(registry._LOADED), set(sys.modules)
    monkeypatch.delenv(registry.ENV, raising=False)
    yield monkeypatch
    for k, v in tables.items():
        registry._TABLES[k].clear()
        registry._TABLES[k].update(v)
    registry._LOADED.clear()
    registry._LOADED.update(loaded)
    for name in set(sys.modules) - modules:
        if name.startswith("plug_"):
            del sys.modules[name]


def _plugin(tmp_path: Path, monkeypatch, name="plug_user", text=PLUGIN) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    monkeypatch.setenv(registry.ENV, str(path))
    return path


def _cli(capsys, monkeypatch, tmp_path, raw) -> tuple[int, str]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    code = main(["train", str(cfg), "--out", str(tmp_path / "out")])
    return code, capsys.readouterr().err.strip()


# ---- the built-ins are registrations -------------------------------------------------------------------------

def test_builtins_come_from_the_registries(sandbox):
    assert registry.names("importance") == ("bn_gamma", "slice")
    assert registry.names("dataset") == ("digits", "cifar10", "cifar100", "imagefolder")
    assert registry.names("model") == ("vgg_tiny", "vgg11", "vgg16", "vgg19", "resnet<depth>", "densenet<depth>",
                                       "torchvision:<name>")
    assert all(e.origin == "builtin" for k in registry.KINDS for e in registry.table(k).values())
    assert registry.model("resnet20").name == "resnet" and registry.model("torchvision:resnet18").prefix
    assert registry.model("vgg13") is None
    from gradauth.models import arch_problem, build_model
    assert arch_problem("resnet21") == "'resnet21': CIFAR ResNet depth must be 6n+2 (20, 56, 110) or 10/18/34"
    with pytest.raises(GradauthError, match="DenseNet depth must be 3n\\+4"):
        build_model("densenet41", 10)
    assert sum(p.numel() for p in build_model("resnet20", 10, 3, 0.25).parameters()) == \
        sum(p.numel() for p in __import__("gradauth.models", fromlist=["ResNet"]).ResNet(20, 10, 3, 0.25).parameters())


def test_builtin_settings_are_the_criterions_and_serialise_as_before(sandbox):
    """slice owns classes/theta/samples; bn_gamma owns none but still writes them (the hashes of committed results),
    and a resolved config.yaml reads back to the same config."""
    from gradauth.config import ImportanceConfig
    from gradauth.importance import SliceSettings
    cfg = parse_config({"importance": ["bn_gamma", {"name": "slice", "classes": [3, 5], "samples": 64}]})
    gamma, sl = cfg.importance
    assert gamma.settings is None and sl.settings == SliceSettings(classes=[3, 5], theta=0.0, samples=64)
    assert sl.samples == 64 and sl.label == "slice[3,5]"
    assert cfg.to_dict()["importance"] == [
        {"name": "bn_gamma", "classes": None, "theta": 0.0, "samples": 256},
        {"name": "slice", "classes": [3, 5], "theta": 0.0, "samples": 64}]
    back = parse_config(yaml.safe_load(dump_config(cfg)))
    assert back == cfg and back.hash() == cfg.hash()
    # the frozen keys are accepted back only at their written values
    with pytest.raises(GradauthError, match="`importance.samples` applies to slice only, not bn_gamma"):
        parse_config({"importance": [{"name": "bn_gamma", "samples": 255}]})
    imp = ImportanceConfig("bn_gamma")
    imp.name = "slice"  # a new name brings that criterion's default settings
    assert imp.settings == SliceSettings() and imp.label == "slice"
    imp.classes = [1]
    assert imp.label == "slice[1]"
    with pytest.raises(AttributeError, match="no setting 'classes'"):
        ImportanceConfig("bn_gamma").classes = [1]


# ---- a user's plugin -----------------------------------------------------------------------------------------

def test_plugin_from_env_registers_a_criterion_a_dataset_and_a_model(sandbox, tmp_path):
    _plugin(tmp_path, sandbox)
    cfg = parse_config(RAW)
    (imp,) = cfg.importance
    assert (cfg.data.name, cfg.model.arch, imp.name, imp.layer, imp.label) == ("bars", "barnet", "one_layer", 1,
                                                                                "one_layer[1]")
    assert cfg.to_dict()["importance"] == [{"name": "one_layer", "layer": 1}]  # its own settings only
    assert registry.names("importance") == ("bn_gamma", "slice", "one_layer")
    assert registry.importance("one_layer").origin == f"plugin:{tmp_path / 'plug_user.py'}"
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg
    # its settings are checked by its own rule, and other criteria's keys are refused by name
    for item, needle in [({"name": "one_layer", "layer": -1}, "`importance.layer` must be ≥ 0, got -1"),
                         ({"name": "one_layer", "layer": "2"}, "`importance.layer` must be a whole number, got the text"),
                         ({"name": "one_layer", "samples": 8}, "`importance.samples` applies to slice only, not one_layer"),
                         ({"name": "bn_gamma", "layer": 1}, "`importance.layer` applies to one_layer only, not bn_gamma"),
                         ({"name": "one_layer", "k": 1}, "unknown key `importance.k` (one_layer takes name, layer)")]:
        with pytest.raises(GradauthError) as e:
            parse_config({**RAW, "importance": [item]})
        assert needle in str(e.value)
    # the plain stages run it: the data loads through its loader, the model builds, the criterion locks
    from gradauth.data import load_dataset
    from gradauth.importance import get_importance
    from gradauth.models import bn_layers, build_model
    from gradauth.prune import lock_masks
    ds = load_dataset(cfg.data, cfg.seed)
    assert (ds.name, ds.num_classes, len(ds.train) + len(ds.val), len(ds.test)) == ("bars", 4, 200, 100)
    model = build_model("barnet", 4, 1, 1.0)
    scores = get_importance(imp)(model, ds)
    masks = lock_masks(scores, "rate", 0.25)  # 24 channels: the 6 top-scored are layer 1's first 6
    first, second = bn_layers(model)
    assert masks[first].all() and masks[second].tolist() == [False] * 6 + [True] * 10


def test_unknown_names_list_the_registered_ones_in_one_line(sandbox, tmp_path, capsys):
    _plugin(tmp_path, sandbox)
    for dotted, value, needle in [
            ("data", {"name": "svhn"}, "`data.name` 'svhn' is not one of digits, cifar10, cifar100, imagefolder, bars"),
            ("model", {"arch": "lenet"}, "'lenet' is not a known model.arch: choose one of vgg_tiny, vgg11, vgg16, "
                                         "vgg19, resnet<depth>, densenet<depth>, torchvision:<name>, barnet"),
            ("importance", "taylor", "`importance` 'taylor' is not one of bn_gamma, slice, one_layer")]:
        code, err = _cli(capsys, sandbox, tmp_path, {**RAW, dotted: value})
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert needle in err, err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, needle", [
    ("raise RuntimeError('boom')", "failed while importing (RuntimeError: boom): fix the plugin"),
    ("import no_such_module_xyz", "cannot be imported (No module named 'no_such_module_xyz')"),
    ("from gradauth import register_model\nregister_model('vgg_tiny', lambda *a: None)",
     "cannot register model 'vgg_tiny': 'vgg_tiny' is already registered (by builtin)"),
    ("from gradauth import register_model\nregister_model('resnet20', lambda *a: None)",
     "'resnet' is already registered (by builtin)"),
    ("from dataclasses import dataclass\nfrom gradauth import register_importance\n"
     "@dataclass\nclass S:\n    k: int = 1\nregister_importance('mine', lambda m, d, k: {}, settings=S)",
     "settings field(s) k carry no rule"),
])
def test_a_broken_plugin_is_one_line(sandbox, tmp_path, capsys, text, needle):
    _plugin(tmp_path, sandbox, "plug_broken", text)
    code, err = _cli(capsys, sandbox, tmp_path, {**RAW, "data": {"name": "digits"}, "model": {"arch": "vgg_tiny"},
                                                 "importance": "bn_gamma"})
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "plug_broken.py" in err and needle in err, err


def test_missing_plugin_file_and_module(sandbox, tmp_path, capsys):
    sandbox.setenv(registry.ENV, str(tmp_path / "nowhere.py"))
    code, err = _cli(capsys, sandbox, tmp_path, {"importance": "bn_gamma"})
    assert code == 2 and "GRADAUTH_PLUGINS names" in err and "nowhere.py, which cannot be read" in err, err
    sandbox.setenv(registry.ENV, "plug_not_installed")
    code, err = _cli(capsys, sandbox, tmp_path, {"importance": "bn_gamma"})
    assert code == 2 and "plugin module plug_not_installed cannot be imported" in err, err


def test_a_loader_returning_the_wrong_thing_is_refused(sandbox):
    from gradauth.config import DataConfig
    from gradauth.data import Loaded, Split, load_dataset
    x = torch.zeros(10, 1, 4, 4)
    registry.register_dataset("floats", lambda cfg, seed: Loaded(Split(x, torch.zeros(10, dtype=torch.long)),
                                                                 Split(x, torch.zeros(10, dtype=torch.long)), 2))
    registry.register_dataset("tuple", lambda cfg, seed: (x, x))
    with pytest.raises(GradauthError, match="dataset floats: its loader train images must be a uint8 tensor N×C×H×W, "
                                            "got torch.float32"):
        load_dataset(DataConfig(name="floats"))
    with pytest.raises(GradauthError, match="dataset tuple: its loader returned tuple, not gradauth.data.Loaded"):
        load_dataset(DataConfig(name="tuple"))


def test_a_criterion_answering_the_wrong_shape_is_refused(sandbox):
    from gradauth.config import ImportanceConfig
    from gradauth.importance import get_importance
    from gradauth.models import build_model
    registry.register_importance("short", lambda model, ds: {"features.1": torch.ones(3)})
    with pytest.raises(GradauthError, match="importance short must return .* expected 5 layers"):
        get_importance(ImportanceConfig("short"))(build_model("vgg_tiny", 10, 1, 1.0), None)


def test_prefix_model_and_snapshot_restore_without_ray(sandbox, tmp_path):
    """What a Ray worker does with the driver's snapshot, in this process: registrations from a plugin file come back
    from its source (the file is gone), those of a driver script by value."""
    path = _plugin(tmp_path, sandbox)
    registry.names("model")  # loads the plugin
    registry.register_model("wide", lambda arch, k, c, w: torch.nn.Linear(int(arch[4:]), k), prefix=True,
                            check=lambda arch: None if arch[4:].isdigit() else f"{arch!r}: wide<inputs>")
    assert registry.model("wide12").name == "wide" and registry.names("model")[-1] == "wide<…>"
    from gradauth.models import arch_problem, build_model
    assert arch_problem("widex") == "'widex': wide<inputs>" and build_model("wide12", 3).in_features == 12
    snap = pickle.loads(pickle.dumps(registry.snapshot()))
    # the plugin by its source; "wide", registered from this (importable) test module, by the module's name
    assert snap.specs == (("file", str(path), PLUGIN), ("module", __name__, None)) and snap.entries == ()
    path.unlink()
    sandbox.delenv(registry.ENV)
    for kind in registry.KINDS:  # a fresh worker: built-ins only
        for name in [n for n, e in registry._TABLES[kind].items() if e.origin != "builtin"]:
            del registry._TABLES[kind][name]
    registry._LOADED.pop(str(path))
    del sys.modules["plug_user"]
    registry.restore(registry.Plugins(snap.specs[:1]))
    assert registry.names("dataset")[-1] == "bars" and registry.model("barnet") is not None


# ---- a sweep on Ray with the plugin ---------------------------------------------------------------------------

@pytest.fixture
def ray_without_plugin_env():
    """A local Ray started BEFORE the plugin is named in the environment: its workers cannot find the plugin by
    themselves, so what they know of it came from the driver."""
    import ray
    assert registry.ENV not in os.environ
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_sweep_on_ray_with_a_plugin_whose_file_is_gone(ray_without_plugin_env, sandbox, tmp_path):
    import pandas as pd

    from gradauth.checkpoint import load_model_file, rebuild
    from gradauth.data import load_dataset
    from gradauth.engine import evaluate
    from gradauth.pipeline import sweep_stage, train_stage
    (tmp_path / "plugins").mkdir()
    path = _plugin(tmp_path / "plugins", sandbox)
    cfg = parse_config(RAW)
    path.rename(path.with_suffix(".moved"))  # workers must get the source from the driver, not from the disk
    out = tmp_path / "out"
    train_stage(cfg, out)
    df = sweep_stage(cfg, out)
    row = pd.read_parquet(out / "trials.parquet").iloc[0]
    assert len(df) == 1 and row["status"] == "ok", row.to_dict()
    assert (row["dataset"], row["arch"], row["importance"], row["locked_channels"], row["total_channels"]) == \
        ("bars", "barnet", "one_layer[1]", 6, 24)
    model, spec, masks = rebuild(load_model_file(out / "models" / f"{row['trial_id']}.pt"))
    assert spec.arch == "barnet" and type(model).__name__ == "BarNet"
    assert [m.tolist() for m in masks.values()] == [[True] * 8, [False] * 6 + [True] * 10]  # the worker's lock
    ds = load_dataset(cfg.data, cfg.seed)
    assert evaluate(model, ds, ds.test)[0] == pytest.approx(row["fine_acc"], abs=1e-6)
