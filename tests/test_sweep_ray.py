"""One end-to-end sweep on a real local Ray cluster (started here, never an existing one)."""
import pandas as pd
import pytest
import ray

from gradauth.checkpoint import load_model_file, rebuild
from gradauth.config import parse_config
from gradauth.data import load_dataset
from gradauth.engine import evaluate
from gradauth.pipeline import select_stage, sweep_stage, train_stage


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_sweep_end_to_end_on_local_ray(local_ray, tmp_path):
    cfg = parse_config({
        "name": "e2e", "data": {"name": "digits", "crop_pad": 1, "flip": False},
        "model": {"arch": "vgg_tiny"}, "train": {"epochs": 15, "lr": 0.05, "sparsity": 0.03},
        "lock": {"mode": "rate", "values": [0.02, 0.3, 0.4]},
        "finetune": {"epochs": [1, 6], "lr": [0.01], "seeds": [0, 1]},
        "sweep": {"lock_bound": 0.2, "resources": {"cpu": 1, "gpu": 0}},
        "select": {"levels": 2, "min_gap": 0.05}})
    train_stage(cfg, tmp_path)
    df = sweep_stage(cfg, tmp_path)
    assert len(df) == 12 and df["trial_id"].is_unique
    back = pd.read_parquet(tmp_path / "trials.parquet")
    assert set(back["status"]) <= {"ok", "unlockable"} and (back["status"] == "ok").sum() >= 4
    unlockable = back[back.status == "unlockable"]
    assert (unlockable["prun_acc"] > 0.2).all() and unlockable["fine_acc"].isna().all()
    ok = back[back.status == "ok"]
    assert (ok["prun_acc"] <= 0.2).all()
    # longer fine-tunes recover more, on average over the locked rates
    by_epochs = ok.groupby("ft_epochs")["fine_acc"].mean()
    assert by_epochs[6] > by_epochs[1]
    # every ok trial's model file reproduces its row's accuracy
    ds = load_dataset(cfg.data, cfg.seed)
    for r in ok.itertuples():
        model, _, masks = rebuild(load_model_file(tmp_path / "models" / f"{r.trial_id}.pt"))
        assert evaluate(model, ds, ds.test)[0] == pytest.approx(r.fine_acc, abs=1e-6)
    sel = select_stage(tmp_path)
    assert len(sel.levels) == 2 and (tmp_path / "levels.json").is_file()
    # the grid grows by one lock value: --resume runs only its trials and keeps every finished row as it was
    import dataclasses
    grown = dataclasses.replace(cfg, lock=dataclasses.replace(cfg.lock, values=[0.02, 0.3, 0.4, 0.35]))
    models_before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "models").iterdir()}
    again = sweep_stage(grown, tmp_path, resume=True)
    assert len(again) == 16 and again["trial_id"].is_unique
    new = again[again["lock_value"] == 0.35]
    assert len(new) == 4 and set(new["status"]) <= {"ok", "unlockable"}
    kept = again[again["lock_value"] != 0.35].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, back.reset_index(drop=True))
    assert all((tmp_path / "models" / n).stat().st_mtime_ns == t for n, t in models_before.items())
