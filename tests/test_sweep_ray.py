"""The sweep on a real local Ray cluster (started here, never an existing one): fractional-GPU packing with a declared
GPU on this CPU machine, then one end-to-end sweep; and which Ray the sweep joins."""
import json
import shutil
import threading

import pandas as pd
import pytest
import ray

from gradauth.checkpoint import load_model_file, rebuild
from gradauth.config import parse_config
from gradauth.data import load_dataset
from gradauth.engine import evaluate
from gradauth.pipeline import select_stage, sweep_stage, train_stage
from gradauth.sweep import started_local_ray, trial_resources


def test_gpu_request_dropped_only_on_a_local_ray_without_gpu(capsys):
    asked = {"cpu": 2, "gpu": 0.25}
    assert trial_resources(asked, True, {"CPU": 2.0}) == {"cpu": 2.0, "gpu": 0.0}          # laptop: run on CPU
    assert trial_resources(asked, False, {"CPU": 4.0}) == {"cpu": 2.0, "gpu": 0.25}        # cluster: autoscaler adds GPUs
    assert "wait for the autoscaler" in capsys.readouterr().err
    assert trial_resources(asked, True, {"CPU": 8.0, "GPU": 1.0}) == {"cpu": 2.0, "gpu": 0.25}
    assert trial_resources({"cpu": 1}, True, {"CPU": 2.0}) == {"cpu": 1.0, "gpu": 0.0}


@pytest.fixture
def fake_gpu_ray():
    # One declared GPU that CUDA cannot see, and CPUs enough that the GPU is what bounds the packing.
    ray.init(address="local", num_cpus=8, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_quarter_gpu_trials_pack_four_on_a_gpu_and_fall_back_to_cpu(fake_gpu_ray, tmp_path, capfd):
    assert started_local_ray()
    cfg = parse_config({
        "name": "gpu", "data": {"name": "digits", "crop_pad": 1, "flip": False},
        "model": {"arch": "vgg_tiny"}, "train": {"epochs": 2, "lr": 0.05},
        "lock": {"mode": "rate", "values": [0.1, 0.2]},
        "finetune": {"epochs": [1], "lr": [0.01], "seeds": [0, 1, 2]},
        "sweep": {"lock_bound": 1.0, "resources": {"cpu": 1, "gpu": 0.25}, "storage": str(tmp_path / "shared")}})
    train_stage(cfg, tmp_path)
    free_gpu, stop = [], threading.Event()

    def watch():  # what the scheduler has left of the GPU while the sweep runs
        while not stop.is_set():
            free_gpu.append(ray.available_resources().get("GPU", 0.0))
            stop.wait(0.02)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        df = sweep_stage(cfg, tmp_path)
    finally:
        stop.set()
        watcher.join()
    assert len(df) == 6 and set(df["status"]) == {"ok"}
    # Six trials of 0.25 GPU, eight CPUs: four at once held the whole GPU (0 left), never more (never below 0).
    assert min(free_gpu) == pytest.approx(0.0) and max(free_gpu) == pytest.approx(1.0)
    last = [json.loads(p.read_text().splitlines()[-1]) for p in (tmp_path / "shared" / "sweep").glob("*/result.json")]
    assert len(last) == 6
    for r in last:
        assert r["gpu_ids"] == ["0"] and r["device"] == "cpu"  # Ray's GPU 0, torch on CPU (no CUDA here)
    # A new head node: the output dir kept only its inputs, the experiment is in sweep.storage (a stand-in for
    # s3://). `--resume` restores it from there (nothing re-runs) and rebuilds trials.parquet and models/.
    (tmp_path / "trials.parquet").unlink()
    shutil.rmtree(tmp_path / "models")
    again = sweep_stage(cfg, tmp_path, resume=True)
    assert "[sweep] resuming" in capfd.readouterr().err
    pd.testing.assert_frame_equal(again, df)
    assert sorted(p.stem for p in (tmp_path / "models").glob("*.pt")) == sorted(df["trial_id"])


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.ray
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
