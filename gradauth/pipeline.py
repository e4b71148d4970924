"""The stages as plain functions over an output directory: what each `gradauth` command does.

Every stage reads what earlier stages wrote (config.yaml, base.pt, trials.parquet, levels.json) and writes its own
files atomically, so any stage can be re-run alone and a `--resume` run skips what is already done.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from . import rundir
from .checkpoint import load_model_file, rebuild, save_model
from .config import Config, load_config, parse_config
from .data import Dataset, check_config_against, load_dataset
from .engine import evaluate, pick_device
from .errors import GradauthError
from .fsutil import write_json
from .importance import get_importance
from .runlock import check_output_space, run_lock
from .rundir import (CHECKPOINT, RUNS, git_sha, lock_bound, out_dir_for, read_config,  # noqa: F401 (re-exported)
                     write_config)
from .trial import TrialContext

def model_bytes(cfg: Config, num_classes: int, in_channels: int) -> int:
    """Bytes of the model's state dict (built on the meta device: nothing allocated)."""
    import torch
    from .models import build_model
    with torch.device("meta"):
        model = build_model(cfg.model.arch, num_classes, in_channels, cfg.model.width)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def space_needed(cfg: Config, num_classes: int, in_channels: int, stages: tuple[str, ...]) -> int:
    """An upper estimate of what `stages` write into the output dir, with a margin (×1.25 + 16 MiB).

    train: base.pt and base.ckpt (model + SGD momentum), two copies of it while one replaces the other.
    sweep: one model per trial under models/, and, with Ray's storage under the output dir, each trial's last
    checkpoint plus a new one being written (model, momentum and the final model) for the trials running at once.
    release: the public model, one pack per level and a spare.
    Locked models are compacted (smaller than the base), so the sweep's part is an upper bound."""
    from .trial import grid
    m = model_bytes(cfg, num_classes, in_channels)
    n = len(grid(cfg)) if {"sweep", "release"} & set(stages) else 0
    need = 0
    if "train" in stages:
        need += m + 2 * 2 * m
    if "sweep" in stages:
        need += n * m
        if not cfg.sweep.storage:
            need += ray_storage_bytes(cfg, m, n)
    if "release" in stages:
        levels = len(cfg.select.targets) if cfg.select.targets else cfg.select.levels
        need += (min(n, levels) + 2) * m
    return int(need * 1.25) + 16 * 2**20


def ray_storage_bytes(cfg: Config, m: int, n: int) -> int:
    """Tune's storage: each trial's last checkpoint (its final model) plus, for the trials running at once, a
    checkpoint being replaced by the next (model and momentum, twice)."""
    return n * m + (cfg.sweep.max_concurrent or os.cpu_count() or 1) * 4 * m


def train_stage(cfg: Config, out: Path, ds: Dataset | None = None, resume: bool = False) -> dict:
    """Train the sparsity-regularised base model: base.pt and base.json.

    Checkpoints every epoch to base.ckpt; `resume=True` continues from it when it belongs to this config."""
    from .train import model_spec, train_base
    if resume and (out / rundir.BASE).is_file() and (out / rundir.BASE_METRICS).is_file():
        info = rundir.read_base_info(out)
        if info.get("base_hash", info.get("config_hash")) in (cfg.base_hash(), cfg.hash()):
            print(f"[train] {out / 'base.pt'} is up to date (same seed, data, model, train), skipped", file=sys.stderr)
            return info
    ds = ds or load_dataset(cfg.data, cfg.seed)  # bad input fails here, before anything is written
    check_config_against(cfg, ds)
    with run_lock(out, "train"):
        check_output_space(out, space_needed(cfg, ds.num_classes, ds.in_channels, ("train",)), "base training")
        ckpt = out / CHECKPOINT
        if not resume and ckpt.is_file():
            print(f"[train] {ckpt} from an interrupted training is replaced (pass --resume to continue it instead)",
                  file=sys.stderr)
        device = pick_device()
        model, info = train_base(cfg, ds.to(device), device, checkpoint=ckpt, resume=resume)
        info |= {"config_hash": cfg.hash(), "base_hash": cfg.base_hash(), "git_sha": git_sha()}
        write_config(cfg, out)
        save_model(out / rundir.BASE, model.cpu(), model_spec(cfg, ds), extra={"config": cfg.to_dict()})
        write_json(out / rundir.BASE_METRICS, info)
        ckpt.unlink(missing_ok=True)  # base.pt holds everything it had
    print(f"[train] base accuracy {info['base_acc']:.4f} (top-3 {info['base_top3']:.4f}) in {info['seconds']:.0f} s",
          file=sys.stderr)
    return info


def trial_context(cfg: Config, out: Path, ds: Dataset | None = None) -> TrialContext:
    """What every trial shares: base weights, importance scores (computed once), the dataset."""
    if not (out / rundir.BASE).is_file():
        raise GradauthError(f"{out / 'base.pt'} not found: run `gradauth train CONFIG` (or `gradauth run CONFIG`) first")
    model, spec, _ = rebuild(load_model_file(out / rundir.BASE))
    info = rundir.read_base_info(out)
    ds = ds or load_dataset(cfg.data, cfg.seed)
    scores = {}
    for imp in cfg.importance:
        print(f"[sweep] importance {imp.label} …", file=sys.stderr)
        if cfg.lock.granularity == "synapse":  # one score per conv/linear weight (synlock.py)
            from .synlock import synapse_scores
            scores[imp.label] = synapse_scores(imp, model, ds, cfg.seed)
        else:
            scores[imp.label] = get_importance(imp)(model, ds)
    return TrialContext(model.state_dict(), spec, scores, ds, info["base_acc"], lock_bound(cfg, ds.num_classes),
                        cfg.finetune.batch_size, cfg.finetune.momentum, cfg.finetune.weight_decay,
                        {"git_sha": git_sha(), "config_hash": cfg.hash()}, cfg.finetune.precision,
                        cfg.release.erase_head)


def sweep_stage(cfg: Config, out: Path, resume: bool = False, ds: Dataset | None = None):
    from .sweep import run_sweep
    with run_lock(out, "sweep"):
        if (out / rundir.BASE).is_file():  # before the importance scores, which can take a while
            spec = load_model_file(out / rundir.BASE)["spec"]
            check_output_space(out, space_needed(cfg, spec["num_classes"], spec["in_channels"], ("sweep",)),
                               "the sweep")
            storage = cfg.sweep.storage
            if storage and "://" not in storage:  # a local or NFS storage outside the output dir: check it too
                from .trial import grid
                m = model_bytes(cfg, spec["num_classes"], spec["in_channels"])
                check_output_space(Path(storage), int(ray_storage_bytes(cfg, m, len(grid(cfg))) * 1.25) + 16 * 2**20,
                                   "the sweep's Ray storage", "set sweep.storage on another disk")
        ctx = trial_context(cfg, out, ds)
        write_config(cfg, out)
        df = run_sweep(cfg, ctx, out, resume=resume)
    counts = df["status"].value_counts().to_dict()
    print(f"[sweep] {len(df)} trials → {out / 'trials.parquet'} ({counts})", file=sys.stderr)
    return df


def select_stage(out: Path, **overrides):
    """`gradauth select DIR`: the config's select section gives the defaults; a bare trials.parquet (no
    config.yaml, e.g. copied down from a cluster) selects with the built-ins: 3 levels, min_gap 0.05,
    max_locked_acc chance (1 / num_classes from the table) + 0.1, the folder's name as the experiment."""
    from .select import select_dir
    with run_lock(out, "select", create=False):
        if (out / rundir.CONFIG).is_file() or not (out / rundir.TRIALS).is_file():
            from .select import config_defaults
            defaults = config_defaults(read_config(out), out)
        else:
            print(f"[select] {out} has no config.yaml: built-in defaults (3 levels, min_gap 0.05, max_locked_acc "
                  f"1/num_classes + 0.1)", file=sys.stderr)
            defaults = {"experiment": Path(out).resolve().name}
        return select_dir(out, defaults=defaults, **overrides)


def slice_stage(cfg: Config, out: Path) -> Path:
    """NNSlicer contributions of the base model's channels → slices.parquet."""
    from .slicing import run_slice
    if not (out / rundir.BASE).is_file():
        raise GradauthError(f"{out / 'base.pt'} not found: run `gradauth train CONFIG` first, then slice it")
    with run_lock(out, "slice"):
        model, _, _ = rebuild(load_model_file(out / rundir.BASE))
        path = run_slice(cfg, out, model, load_dataset(cfg.data, cfg.seed))
    print(f"[slice] → {path}", file=sys.stderr)
    return path


def evaluate_file(model_file: str | Path, cfg: Config) -> dict:
    model, spec, masks = rebuild(load_model_file(model_file))
    ds = load_dataset(cfg.data, cfg.seed)
    if (ds.num_classes, ds.in_channels) != (spec.num_classes, spec.in_channels):
        raise GradauthError(f"{model_file} is a {spec.num_classes}-class, {spec.in_channels}-channel model but "
                            f"{cfg.data.name} has {ds.num_classes} classes, {ds.in_channels} channels: pass its own config")
    top1, top3 = evaluate(model, ds, ds.test)
    return {"model": str(model_file), "dataset": ds.name, "split": "test", "images": len(ds.test),
            "top1": top1, "top3": top3}


def run_all(config_path: str, out: str | None = None, resume: bool = False) -> Path:
    """The main job: train → sweep → select → release → report, holding the output dir's lock throughout."""
    from .release import existing_release, release_dir, release_refusal
    cfg = load_config(config_path)
    out_dir = out_dir_for(cfg, out)
    released = existing_release(out_dir)  # a release is never replaced by a run: checked before any training
    if released:
        release_refusal(out_dir, released, resume)
    ds = load_dataset(cfg.data, cfg.seed)
    with run_lock(out_dir, "run"):
        # Before hours of training: the whole run's output must fit (train, sweep and release).
        check_output_space(out_dir, space_needed(cfg, ds.num_classes, ds.in_channels, ("train", "sweep", "release")),
                           "this run")
        train_stage(cfg, out_dir, ds, resume)
        sweep_stage(cfg, out_dir, resume, ds)
        select_stage(out_dir)
        if released:
            print(f"[run] --resume: the release in {out_dir} was left as it is (its keys still work); "
                  f"`gradauth release {out_dir} --new-keys` makes a new one from levels.json and archives the old",
                  file=sys.stderr)
        else:
            release_dir(out_dir)
        from .report import write_report
        write_report(out_dir)
    print(f"[run] done: {out_dir}", file=sys.stderr)
    return out_dir


__all__ = ["run_all", "train_stage", "sweep_stage", "select_stage", "evaluate_file", "parse_config"]
