"""gradauth simplify: NNSlicer's class-targeted simplification on the shared tiny digits base. Slice-based removal
keeps target-class accuracy above the Weight baseline at a high r (fixed seed, real slicer, real fine-tune), every
method removes exactly the requested fraction per layer, and bad settings are one line, exit 2, nothing written."""
import dataclasses
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from gradauth.checkpoint import load_model_file, rebuild
from gradauth.cli import main
from gradauth.config import Config, DetectConfig, SimplifyConfig, load_config, parse_config
from gradauth.data import load_dataset
from gradauth.errors import GradauthError
from gradauth.simplify import (Pruned, class_subsets, finetune_pruned, logits_layer, masks_for, of_classes, simplify,
                               slice_scores, target_accuracy, weighted_layers)


@pytest.fixture(autouse=True)
def torch_theta_path(monkeypatch):
    monkeypatch.setenv("GRADAUTH_SLICING_KERNEL", "0")  # no kernel build inside a test


@pytest.fixture(scope="module")
def base(tiny_base):
    cfg, folder, _ = tiny_base
    model, _, _ = rebuild(load_model_file(folder / "base.pt"))
    return cfg, load_dataset(cfg.data, cfg.seed), model.eval()


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_slice_keeps_target_accuracy_above_weight_at_high_r(base):
    cfg, ds, model = base
    s = SimplifyConfig(classes=["0,3,5,8", "1,2,6,9"], rates=[0.8], methods=["slice", "weight"], samples=100)
    classes = [tuple(map(int, c.split(","))) for c in s.classes]
    got = {}
    for cl in classes:
        test, train = of_classes(ds.test, cl, None, 0), of_classes(ds.train, cl, s.finetune, 0)
        counts, sliced, _ = slice_scores(model, ds, cl, s)
        assert sliced == 100
        for method in s.methods:
            torch.manual_seed(0)
            p = Pruned(pickle_copy(model), masks_for(model, method, 0.8, counts))
            finetune_pruned(p, ds, train, s)
            got[cl, method] = target_accuracy(p.model, ds, test, cl)[0]
    sl = sum(got[c, "slice"] for c in classes) / 2
    wt = sum(got[c, "weight"] for c in classes) / 2
    print(f"r=0.8 target-class accuracy: slice {sl:.3f}, weight {wt:.3f} ({got})")
    assert sl > wt + 0.05, got
    assert sl > 0.5  # far above chance (0.25) on 4 classes


def pickle_copy(model):
    import copy
    return copy.deepcopy(model)


@pytest.mark.parametrize("rate", [0.3, 0.75, 0.9])
def test_exactly_the_requested_fraction_per_layer(base, rate):
    cfg, ds, model = base
    counts, _, _ = slice_scores(model, ds, (0, 1, 2, 3), SimplifyConfig(samples=20, theta=0.3))
    layers = weighted_layers(model)
    assert set(counts) == set(layers)
    for method in ("slice", "weight"):
        masks = masks_for(model, method, rate, counts)
        for name, m in layers.items():
            n = m.weight.numel()
            assert masks[name].shape == m.weight.shape
            assert int((~masks[name]).sum()) == round(rate * n), (method, name)
    masks = masks_for(model, "channel", rate)
    head = logits_layer(model)
    assert head == "classifier" and bool(masks[head].all())  # the classes stay
    for name, m in layers.items():
        if name == head:
            continue
        gone = ~masks[name].reshape(m.weight.shape[0], -1).any(1)
        assert int(gone.sum()) == round(rate * m.weight.shape[0])
        assert bool((masks[name].reshape(m.weight.shape[0], -1).all(1) | gone).all())  # whole channels only
    # the weight baseline removes the smallest |w|: every removed weight is no larger than every kept one
    wm = masks_for(model, "weight", rate)
    for name, m in layers.items():
        w = m.weight.detach().abs()
        assert float(w[~wm[name]].max()) <= float(w[wm[name]].min())


def test_removed_synapses_and_dead_channels_stay_zero_through_the_finetune(base):
    cfg, ds, model = base
    masks = masks_for(model, "channel", 0.5)
    p = Pruned(pickle_copy(model), masks)
    assert p.dead > 0 and abs(p.kept() - 0.5) < 0.05
    finetune_pruned(p, ds, of_classes(ds.train, (0, 1, 2, 3), 200, 0), SimplifyConfig())
    for name, m in weighted_layers(p.model).items():
        assert bool((m.weight.detach()[~masks[name]] == 0).all()), name
    for bn, keep in p.bn_keep.items():
        assert bool((bn.weight.detach()[~keep] == 0).all()) and bool((bn.bias.detach()[~keep] == 0).all())


def test_simplify_writes_parquet_report_and_plot(base, tmp_path):
    cfg, ds, model = base
    s = SimplifyConfig(k=3, subsets=2, rates=[0.5, 0.9], samples=30, finetune=100)
    path = simplify(cfg, tmp_path, s, ds=ds, model=model)
    t = pq.read_table(path).to_pandas()
    assert len(t) == 2 * 3 * 2 and set(t.method) == {"slice", "weight", "channel"}
    assert t.subset.nunique() == 2 and all(len(x.split(",")) == 3 for x in t.subset)
    assert ((t.kept > 0) & (t.kept < 1)).all() and (t[t.method == "slice"].sliced == 30).all()
    assert (t.finetune_inputs <= 100).all() and (t.test_inputs > 0).all()
    assert "| slice | 0.9 |" in (tmp_path / "simplify.md").read_text()
    assert (tmp_path / "plots" / "simplify.png").stat().st_size > 1000


def test_class_subsets():
    assert len(class_subsets(SimplifyConfig(k=4, subsets=1000), 10)) == 210  # all of them, as in the paper
    some = class_subsets(SimplifyConfig(k=4, subsets=7, seed=3), 10)
    assert len(set(some)) == 7 and some == class_subsets(SimplifyConfig(k=4, subsets=7, seed=3), 10)
    assert class_subsets(SimplifyConfig(classes=["3,1", "0,9,2"]), 10) == [(3, 1), (0, 9, 2)]
    with pytest.raises(GradauthError, match="does not have"):
        class_subsets(SimplifyConfig(classes=["0,10"]), 10)
    with pytest.raises(GradauthError, match="more than the dataset's 10 classes"):
        class_subsets(SimplifyConfig(k=11), 10)


def test_sections_are_declared_and_hash_neutral():
    raw = {"name": "x", "detect": {"normal": 50, "attacks": "FGSM:0.1"}, "simplify": {"rates": [0.5], "k": 3}}
    cfg = parse_config(raw)
    assert cfg.detect == dataclasses.replace(DetectConfig(), normal=50, attacks="FGSM:0.1")
    assert cfg.simplify.rates == [0.5] and cfg.simplify.k == 3
    plain = parse_config({"name": "x"})
    assert cfg.hash() == plain.hash()  # analyses' settings never make trials stale
    d = cfg.to_dict()
    assert d["simplify"]["k"] == 3 and "detect" in d
    assert "detect" not in plain.to_dict() and "simplify" not in plain.to_dict()
    assert parse_config(d) == cfg  # config.yaml reads back
    assert Config().simplify == SimplifyConfig()


def _config(tmp_path, extra=""):
    f = tmp_path / "c.yaml"
    f.write_text("name: s\ndata: {name: digits}\nmodel: {arch: vgg_tiny}\n" + extra)
    return f


@pytest.mark.parametrize("extra, args, says", [
    ("simplify: {colour: red}\n", [], "unknown key `simplify.colour`"),
    ("simplify: {rates: [0.5, 1.5]}\n", [], "`simplify.rates` entry must be in (0, 1), got 1.5"),
    ("", ["--rates", "0"], "`simplify.rates` entry must be in (0, 1), got 0.0"),
    ("simplify: {classes: ['0,x']}\n", [], "is not a list of class numbers"),
    ("", ["--methods", "magic"], "'magic' is not one of slice, weight, channel"),
    ("detect: {theta: -1}\n", [], "`detect.theta` must be ≥ 0"),
])
def test_bad_settings_are_one_line_exit_2(tmp_path, capsys, extra, args, says):
    out = tmp_path / "out"
    assert main(["simplify", str(_config(tmp_path, extra)), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("args, says", [
    (["--classes", "0,1,2", "3,12"], "names class 12, which the dataset does not have"),
    (["--k", "11"], "simplify.k = 11 is more than the dataset's 10 classes"),
])
def test_classes_the_data_lacks_are_one_line_and_nothing_written(tiny_base, tmp_path, capsys, args, says):
    cfg, folder, _ = tiny_base
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy2(folder / "base.pt", out / "base.pt")
    before = _files(out)
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text((folder / "config.yaml").read_text())
    assert main(["simplify", str(cfgfile), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert _files(out) == before


def test_a_missing_base_is_one_line(tmp_path, capsys):
    assert main(["simplify", str(_config(tmp_path)), "--out", str(tmp_path / "o")]) == 2
    assert "base.pt not found" in capsys.readouterr().err
    assert load_config(_config(tmp_path, "simplify: {k: 3}\n")).simplify.k == 3
