"""Base training with BN-γ sparsity (network slimming): the model every lock and level starts from.

With a `checkpoint` path, training saves model, optimizer, epochs done, RNG states and the config's base_hash there
after every epoch (atomically), and `resume=True` continues from it; since batches and learning rates are pure
functions of (seed, epoch, step) (engine.py), the result equals an uninterrupted training bit for bit.
"""
from __future__ import annotations

import io
import math
import pickle
import sys
import time
from pathlib import Path

import torch

from .checkpoint import ModelSpec
from .config import Config
from .data import Dataset
from .engine import FitSpec, evaluate, fit, make_optimizer
from .errors import GradauthError
from .fsutil import atomic_path
from .models import bn_layers, build_model
from .sparsity import clamp_gamma, regularize

CKPT_FORMAT = "gradauth-base-checkpoint/1"


def model_spec(cfg: Config, ds: Dataset) -> ModelSpec:
    return ModelSpec(cfg.model.arch, ds.num_classes, ds.in_channels, ds.image_size, cfg.model.width, ds.mean, ds.std)


def _rng_states() -> dict:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def save_checkpoint(path: Path, cfg: Config, model: torch.nn.Module, opt: torch.optim.Optimizer, epochs_done: int,
                    seconds: float) -> None:
    obj = {"format": CKPT_FORMAT, "base_hash": cfg.base_hash(), "epochs_done": epochs_done, "seconds": seconds,
           "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
           "optimizer": opt.state_dict(), "rng": _rng_states()}
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def read_checkpoint(path: Path, cfg: Config) -> dict | None:
    """The checkpoint at `path` if it belongs to `cfg` (same base_hash), else None, saying why on stderr."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        ok = isinstance(obj, dict) and obj.get("format") == CKPT_FORMAT
    except (OSError, pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError):
        ok = False
    if not ok:
        print(f"[train] {path} is not a readable base-training checkpoint: not used, training from epoch 0",
              file=sys.stderr)
        return None
    if obj.get("base_hash") != cfg.base_hash():
        print(f"[train] {path} belongs to another config (base_hash {obj.get('base_hash')}, this config's is "
              f"{cfg.base_hash()}): not used, training from epoch 0", file=sys.stderr)
        return None
    return obj


def train_base(cfg: Config, ds: Dataset, device: torch.device, progress: bool = True,
               checkpoint: Path | None = None, resume: bool = False) -> tuple[torch.nn.Module, dict]:
    """Train `cfg.model` on `ds` (already on `device`) with sparsity; returns the model and its summary.

    `checkpoint`: save there after every epoch; `resume`: continue from it when it belongs to this config."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.arch, ds.num_classes, ds.in_channels, cfg.model.width).to(device)
    t = cfg.train
    spec = FitSpec(t.epochs, t.lr, t.batch_size, t.momentum, t.weight_decay, t.schedule, cfg.seed, t.precision)
    opt = make_optimizer(model.parameters(), spec)
    start, before = 0, 0.0
    state = read_checkpoint(checkpoint, cfg) if checkpoint is not None and resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        start, before = int(state["epochs_done"]), float(state["seconds"])
        print(f"[train] resuming from {checkpoint}: {start} of {t.epochs} epochs done", file=sys.stderr)
    t0 = time.perf_counter()
    from .console import EpochProgress, verbose
    line = EpochProgress(t.epochs, start) if progress and not verbose() else None  # verbose: a line per epoch

    def diverged(what: str):
        return GradauthError(f"base training diverged ({what}): lower train.lr (now {t.lr:g}) and train again; "
                             f"nothing was written")

    def on_epoch(epoch: int, loss: float) -> None:  # the mean loss is already on the host: no extra sync
        if not math.isfinite(loss):
            raise diverged(f"loss {loss} in epoch {epoch + 1} of {t.epochs}")
        if checkpoint is not None:
            save_checkpoint(checkpoint, cfg, model, opt, epoch + 1, before + time.perf_counter() - t0)
        if line is not None:
            line.epoch(epoch, loss)

    try:
        fit(model, ds, ds.train, spec, opt, start_epoch=start,
            after_backward=lambda: regularize(model, t.sparsity),
            after_step=lambda: clamp_gamma(model, t.gamma_max),
            on_epoch=on_epoch, progress="train" if progress and line is None else None)
    finally:
        if line is not None:
            line.close()
    bad = [n for n, v in list(model.named_parameters()) + list(model.named_buffers())
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise diverged(f"non-finite weights in {', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}")
    top1, top3 = evaluate(model, ds, ds.test)
    val1, _ = evaluate(model, ds, ds.val) if len(ds.val) else (float("nan"), None)
    gammas = torch.cat([bn.weight.detach().abs().flatten().cpu() for bn in bn_layers(model).values()])
    info = {"base_acc": top1, "base_top3": top3, "val_acc": val1, "seconds": before + time.perf_counter() - t0,
            "epochs": t.epochs, "total_channels": int(gammas.numel()),
            "gamma_quantiles": {q: float(gammas.quantile(q)) for q in (0.1, 0.5, 0.9, 0.99)},
            "dataset": ds.name, "arch": cfg.model.arch, "num_classes": ds.num_classes,
            "train_images": len(ds.train), "test_images": len(ds.test), "device": str(device)}
    if start:
        info["resumed_at_epoch"] = start
    return model, info
