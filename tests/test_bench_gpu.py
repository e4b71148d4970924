"""`gradauth bench gpu`: its CPU fallback runs the whole code path on a machine like the GPU machine (no Ray, no
cryptography, no PyYAML), and the pieces it relies on behave."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = textwrap.dedent("""
    import os, sys
    BLOCKED = ("ray", "cryptography", "yaml")

    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                with open(os.environ["BLOCKED_IMPORT_LOG"], "a") as f:
                    f.write(f"{os.getpid()} {name}\\n")
                raise ImportError(f"{name} is not installed on the GPU machine")
            return None

    sys.meta_path.insert(0, _Block())
""")


def _env(tmp_path: Path) -> dict:
    """A sitecustomize that makes `import ray|cryptography|yaml` fail in this process and every child (the bench's
    workers too), logging each attempt; no CUDA device visible, so the CPU fallback runs."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "CUDA_VISIBLE_DEVICES": "",
                         "BLOCKED_IMPORT_LOG": str(tmp_path / "blocked.log"), "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.subprocess
def test_the_blocker_blocks(tmp_path):
    """Else the test below could not fail on a stray import."""
    env = _env(tmp_path)
    r = subprocess.run([sys.executable, "-c", "import yaml"], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "not installed on the GPU machine" in r.stderr
    assert "yaml" in (tmp_path / "blocked.log").read_text()


@pytest.mark.subprocess
def test_cpu_fallback_without_ray_cryptography_or_yaml(tmp_path):
    env = _env(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-m", "gradauth", "bench", "gpu", "--out", str(out)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "blocked.log").exists(), (tmp_path / "blocked.log").read_text()
    progress = [line for line in r.stderr.splitlines() if line.startswith("[bench gpu] ")]
    assert [p.split()[2] for p in progress[1:4]] == ["1/3", "2/3", "3/3"], r.stderr  # one line per measurement
    assert "FAILED" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpu.json"]  # the workers' log folder is gone too
    d = json.loads((out / "gpu.json").read_text())
    nm = "not measured (no CUDA)"
    assert d["bench"] == "gpu" and d["mode"] == "cpu-fallback" and d["errors"] == {}
    assert "synthetic" in d["data"] and d["machine"]["gpu"] == nm and d["machine"]["torch"] == torch.__version__
    assert d["settings"]["arch"] == "vgg19" and d["settings"]["processes"] == 2

    ft = d["finetune_precision"]
    assert ft["device"] == "cpu" and ft["auto_precision_here"] == {"autocast": None, "channels_last": False}
    trial = ft["warmup_trial"]  # a whole run_trial: lock, evaluate, fine-tune, compact
    assert trial["status"] == "ok" and trial["locked_channels"] == round(0.1 * trial["total_channels"])
    assert 0 < trial["params"] and 0 < trial["flops"]
    assert set(ft["runs"]) == {"fp32", "bf16_channels_last", "bf16_channels_last_masks_on_device",
                               "fp32_batch64", "bf16_channels_last_batch64"}
    for runs in ft["runs"].values():
        assert len(runs) == 2 and all(x["images"] > 0 and x["images_per_s"] > 0 for x in runs)
    assert ft["speedup_bf16_channels_last_vs_fp32"] == nm

    cap = d["memory_cap"]
    assert len(cap["rounds"]) == 1
    together = cap["rounds"][0]["concurrent"]
    assert sorted(p["rank"] for p in together) == [0, 1] and len({p["pid"] for p in together}) == 2
    n = cap["images_per_process_per_run"]
    # the same work in every process: `n` images asked, resized to whole epochs of a data fraction (rounding)
    runs = together + [cap["rounds"][0]["alone"]]
    assert len({p["images"] for p in runs}) == 1 and abs(runs[0]["images"] - n) <= 0.01 * n + 2
    assert all(p["end"] > p["start"] for p in runs)
    assert cap["best_concurrent_aggregate_images_per_s"] > 0 and cap["best_alone_images_per_s"] > 0
    for k in ("cap_bytes", "aggregate_vs_alone", "max_peak_reserved_bytes", "all_within_cap"):
        assert cap[k] == nm

    sl = d["slicing_forward"]
    assert sl["theta"] == 0.0 and sl["model"].startswith("resnet10")
    row = sl["by_batch"]["16"]
    assert row["cpu"]["samples_per_s"] > 0 and row["cpu"]["samples"] >= 16
    assert row["gpu"] == nm and row["gpu_vs_cpu"] == nm and sl["gpu_vs_cpu_sign_agreement"] == nm


def test_gpu_settings_mirror_the_cifar10_vgg19_config():
    """The GPU run times the trial sweeps/cifar10-vgg19.yaml runs: same model, batch, optimizer, GPU share."""
    from gradauth.benchgpu import GPU
    from gradauth.config import load_config
    cfg = load_config(ROOT / "sweeps" / "cifar10-vgg19.yaml")
    assert (GPU["arch"], GPU["width"]) == (cfg.model.arch, cfg.model.width)
    assert GPU["batch_size"] == cfg.finetune.batch_size
    assert (GPU["momentum"], GPU["weight_decay"]) == (cfg.finetune.momentum, cfg.finetune.weight_decay)
    assert GPU["fraction"] == cfg.sweep.resources["gpu"]
    assert GPU["lock_rate"] in cfg.lock.values and GPU["lr"] in cfg.finetune.lr


def test_schedule_for_resizes_a_trial_to_the_images_asked():
    from gradauth.benchgpu import _schedule_for
    from gradauth.trial import TrialSpec
    t = TrialSpec("bn_gamma", "rate", 0.1, 5, 0.01, 1.0, "all", 3)
    sched, n = _schedule_for(t, 120_000, 50_000)
    assert (sched.epochs, sched.data_fraction, n) == (3, 0.8, 120_000)
    assert (sched.lr, sched.scope, sched.seed) == (0.01, "all", 3)
    sched, n = _schedule_for(t, 1_000, 50_000)
    assert (sched.epochs, n) == (1, 1_000)


def test_locked_model_leaves_no_gradient_hook_and_finetune_holds_the_lock():
    """locked_model zeroes the locked channels without a gradient hook (one made on the CPU would fail the first
    backward once the model is on a GPU); finetune, on the model's device, is what holds the lock."""
    from gradauth.benchgpu import synthetic_cifar, trial_setup
    from gradauth.finetune import Schedule, finetune
    from gradauth.models import bn_layers
    from gradauth.trial import locked_model
    s = {"arch": "vgg_tiny", "width": 0.5, "num_classes": 10, "batch_size": 16, "momentum": 0.9,
         "weight_decay": 1e-4, "lock_rate": 0.2, "lr": 0.05}
    ds = synthetic_cifar(64, 16)
    ctx, t = trial_setup(s, ds, "fp32")
    model, masks = locked_model(ctx, t)
    bns = bn_layers(model)
    locked = {n: ~m for n, m in masks.items()}
    assert sum(int(m.sum()) for m in locked.values()) == round(0.2 * sum(m.numel() for m in masks.values()))
    for n, m in locked.items():
        assert torch.all(bns[n].weight[m] == 0) and torch.all(bns[n].bias[m] == 0)
    sum(bn.weight.sum() + bn.bias.sum() for bn in bns.values()).backward()  # d/dγ = d/dβ = 1 unless a hook masks it
    assert all(torch.all(bn.weight.grad == 1) and torch.all(bn.bias.grad == 1) for bn in bns.values())
    model.zero_grad(set_to_none=True)
    finetune(model, masks, ds, Schedule(2, 0.05, 1.0, "all", 0), batch_size=16)
    for n, m in locked.items():
        assert torch.all(bns[n].weight[m] == 0) and torch.all(bns[n].bias[m] == 0)
    assert any(bool((bns[n].weight[masks[n]] != ctx.base_state[f"{n}.weight"][masks[n]]).any()) for n in masks)


@pytest.mark.parametrize("make_bad", ["under_a_file", "not_a_folder_target"])
def test_bench_refuses_an_unwritable_out_before_measuring(tmp_path, capsys, make_bad):
    from gradauth.cli import main
    f = tmp_path / "plain-file"
    f.write_text("x")
    out = f / "gpu.json" if make_bad == "under_a_file" else f / "sub"
    assert main(["bench", "gpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradauth bench: error: --out") and "[bench gpu]" not in err[0]
    assert f.read_text() == "x"
