"""Base training with BN-γ sparsity (network slimming): the model every lock and level starts from."""
from __future__ import annotations

import math
import time

import torch

from .checkpoint import ModelSpec
from .config import Config
from .data import Dataset
from .engine import FitSpec, evaluate, fit, make_optimizer
from .errors import GradauthError
from .models import bn_layers, build_model
from .sparsity import clamp_gamma, regularize


def model_spec(cfg: Config, ds: Dataset) -> ModelSpec:
    return ModelSpec(cfg.model.arch, ds.num_classes, ds.in_channels, ds.image_size, cfg.model.width, ds.mean, ds.std)


def train_base(cfg: Config, ds: Dataset, device: torch.device, progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """Train `cfg.model` on `ds` (already on `device`) with sparsity; returns the model and its summary."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.arch, ds.num_classes, ds.in_channels, cfg.model.width).to(device)
    t = cfg.train
    spec = FitSpec(t.epochs, t.lr, t.batch_size, t.momentum, t.weight_decay, t.schedule, cfg.seed, t.precision)
    opt = make_optimizer(model.parameters(), spec)
    t0 = time.perf_counter()

    def diverged(what: str):
        return GradauthError(f"base training diverged ({what}): lower train.lr (now {t.lr:g}) and train again; "
                             f"nothing was written")

    def check_loss(epoch: int, loss: float) -> None:  # the mean loss is already on the host: no extra sync
        if not math.isfinite(loss):
            raise diverged(f"loss {loss} in epoch {epoch + 1} of {t.epochs}")

    fit(model, ds, ds.train, spec, opt,
        after_backward=lambda: regularize(model, t.sparsity),
        after_step=lambda: clamp_gamma(model, t.gamma_max),
        on_epoch=check_loss, progress="train" if progress else None)
    bad = [n for n, v in list(model.named_parameters()) + list(model.named_buffers())
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise diverged(f"non-finite weights in {', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}")
    top1, top3 = evaluate(model, ds, ds.test)
    val1, _ = evaluate(model, ds, ds.val) if len(ds.val) else (float("nan"), None)
    gammas = torch.cat([bn.weight.detach().abs().flatten().cpu() for bn in bn_layers(model).values()])
    info = {"base_acc": top1, "base_top3": top3, "val_acc": val1, "seconds": time.perf_counter() - t0,
            "epochs": t.epochs, "total_channels": int(gammas.numel()),
            "gamma_quantiles": {q: float(gammas.quantile(q)) for q in (0.1, 0.5, 0.9, 0.99)},
            "dataset": ds.name, "arch": cfg.model.arch, "num_classes": ds.num_classes,
            "train_images": len(ds.train), "test_images": len(ds.test), "device": str(device)}
    return model, info
