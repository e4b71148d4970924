"""gradauth detect: the slice detector flags FGSM inputs on digits far more often than clean ones (fixed seed,
real Foolbox attack, real slicer, tiny model), and bad input is one line, exit 2, nothing written."""
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from gradauth.cli import main
from gradauth.config import parse_config
from gradauth.data import load_dataset
from gradauth.detect import Detector, Normalised, Settings, detect, parse_attacks, run_attack
from gradauth.errors import GradauthError
from gradauth.slicing.stage import profile_inputs
from gradauth.train import train_base

pytest.importorskip("foolbox")

CFG = {"name": "det", "data": {"name": "digits", "crop_pad": 1, "flip": False},
       "model": {"arch": "vgg_tiny", "width": 1.0}, "train": {"epochs": 12, "lr": 0.05, "sparsity": 0.03},
       "lock": {"mode": "rate", "values": [0.1]}, "finetune": {"epochs": [1], "lr": [0.01], "seeds": [0]}}


@pytest.fixture(autouse=True)
def torch_theta_path(monkeypatch):
    monkeypatch.setenv("GRADAUTH_SLICING_KERNEL", "0")  # no kernel build inside a test


# session, not module: conftest runs the tests that start nothing before the Ray / process ones, which splits
# this module in two, and a module fixture would be built again for the second part
@pytest.fixture(scope="session")
def trained():
    cfg = parse_config(CFG)
    ds = load_dataset(cfg.data, cfg.seed)
    model, info = train_base(cfg, ds, torch.device("cpu"), progress=False)
    assert info["base_acc"] > 0.8
    return cfg, ds, model.eval()


def test_slice_detector_flags_fgsm_above_chance(trained):
    cfg, ds, model = trained
    s = Settings(normal=500, clean=100, theta=0.3, seed=0, trees=20)
    det = Detector(model, profile_inputs(ds), ds.mean, ds.std, s).fit(ds.train.subset(500, 0).x.float() / 255)
    net = Normalised(model, ds.mean, ds.std).eval()
    x01, y = ds.test.x.float() / 255, ds.test.y
    with torch.no_grad():
        right = net(x01).argmax(1) == y
    x01, y = x01[right], y[right]
    adv, tried, _ = run_attack(net, "FGSM", 0.15, x01[100:], y[100:], 64, 600, 32)
    assert tried == 64 and len(adv) >= 20  # the attack works on this model
    with torch.no_grad():
        assert bool((net(adv).argmax(1) != net(x01[100:100 + len(adv)]).argmax(1)).any())
    clean, flagged = det.flags(x01[:100]), det.flags(adv)
    fpr, recall = float(clean["slice", "tree"].mean()), float(flagged["slice", "tree"].mean())
    # above chance: the flag fires on adversarial inputs several times as often as on clean ones
    print(f"slice tree: FGSM recall {recall:.3f}, clean FPR {fpr:.3f}")
    assert recall >= 0.1 and recall > 3 * fpr, (recall, fpr)
    # the classifier really learned the predicted class from slices (a detector that flags nothing or all fails)
    assert fpr <= 0.1


def test_theta_zero_slice_gives_the_class_away(trained):
    """At θ = 0 the slice of this model determines the criterion class: the tree never disagrees (recorded in the
    report as a finding, and why θ defaults to 0.3)."""
    cfg, ds, model = trained
    s = Settings(normal=200, theta=0.0, trees=5)
    det = Detector(model, profile_inputs(ds), ds.mean, ds.std, s).fit(ds.train.subset(200, 0).x.float() / 255)
    assert float(det.flags(ds.test.x[:100].float() / 255)["slice", "tree"].mean()) <= 0.02


def test_detect_writes_parquet_and_report(trained, tmp_path):
    cfg, ds, model = trained
    s = Settings(normal=150, clean=40, attacks="FGSM:0.15;GaussianBlur", samples=16, seconds=60, trees=5)
    path = detect(cfg, tmp_path, s, ds=ds, model=model)
    t = pq.read_table(path).to_pandas()
    assert len(t) == 2 * 4  # two attacks × (slice, featuremap) × (tree, forest)
    assert set(t.detector) == {"slice", "featuremap"} and set(t.classifier) == {"tree", "forest"}
    fg = t[t.attack == "FGSM"]
    assert (fg.epsilon == 0.15).all() and (fg.attempted == 16).all() and (fg.clean == 40).all()
    assert ((fg.succeeded >= 0) & (fg.succeeded <= 16)).all()
    assert np.isnan(t[t.attack == "GaussianBlur"].epsilon).all()
    assert ((t.fpr >= 0) & (t.fpr <= 1)).all()
    assert (tmp_path / "detect.md").is_file() and (tmp_path / "plots" / "detect.png").stat().st_size > 1000


@pytest.mark.parametrize("attacks, says", [
    ("FGSM:0.1;Nope", "unknown attack 'Nope'"),
    ("JSMA", "not in Foolbox"),
    ("FGSM:1.5", "outside the data's range"),
    ("PGD:0", "outside the data's range"),
    ("FGSM:-0.1", "outside the data's range"),
    ("FGSM", "needs ε"),
    ("CW-L2:0.1", "takes no ε"),
    ("FGSM:abc", "not a number"),
])
def test_bad_attacks_are_one_line_exit_2(tmp_path, capsys, attacks, says):
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text("name: det\ndata: {name: digits}\nmodel: {arch: vgg_tiny}\n")
    out = tmp_path / "out"
    assert main(["detect", str(cfgfile), "--out", str(out), "--attacks", attacks]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_detect_mapping_in_the_config_and_its_refusals(tmp_path, capsys):
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text("name: det\ndata: {name: digits}\nmodel: {arch: vgg_tiny}\n"
                       "detect: {attacks: 'FGSM:2', normal: 10}\n")
    assert main(["detect", str(cfgfile), "--out", str(tmp_path / "o")]) == 2
    assert "outside the data's range" in capsys.readouterr().err
    cfgfile.write_text("name: det\ndata: {name: digits}\nmodel: {arch: vgg_tiny}\ndetect: {colour: red}\n")
    assert main(["detect", str(cfgfile), "--out", str(tmp_path / "o")]) == 2
    assert "unknown key" in capsys.readouterr().err
    # a valid mapping parses, and the run stops at the missing base model with one line
    cfgfile.write_text("name: det\ndata: {name: digits}\nmodel: {arch: vgg_tiny}\ndetect: {attacks: 'FGSM:0.1'}\n")
    assert main(["detect", str(cfgfile), "--out", str(tmp_path / "o")]) == 2
    assert "base.pt not found" in capsys.readouterr().err
    assert not (tmp_path / "o" / "detect.parquet").exists()


def test_parse_attacks():
    assert parse_attacks("fgsm:0.1,0.2; DeepFool-L2") == [("FGSM", 0.1), ("FGSM", 0.2), ("DeepFool-L2", None)]
    with pytest.raises(GradauthError):
        parse_attacks(";")


@pytest.mark.ray
def test_ray_slice_features_equal_single_process(trained):
    """The per-input slice vectors from Ray tasks (forward actor + backward tasks) equal the single-process ones."""
    from gradauth.detect import slice_features
    from gradauth.slicing.distributed import local_cluster
    cfg, ds, model = trained
    prof = profile_inputs(ds)
    x = (ds.test.x[:40].float() / 255 - torch.tensor(ds.mean).view(1, -1, 1, 1)) / torch.tensor(ds.std).view(1, -1, 1, 1)
    f1, p1 = slice_features(model, prof, x, 0.3, "channel", batch=16)
    with local_cluster(2):
        f2, p2 = slice_features(model, prof, x, 0.3, "channel", batch=16)
    assert f1.shape == f2.shape and f1.shape[0] == 40 and np.array_equal(f1, f2) and np.array_equal(p1, p2)
    assert f1.sum() > 0
