"""Model files that carry their own description and load without executing pickled code.

A model file is a `torch.save`d dict of tensors and plain values only, read back with `weights_only=True`, so a
crafted pickle cannot run code. It records arch, width, classes, channels, normalisation, the lock masks and whether
the weights are physically compacted, so `rebuild` can recreate the exact module from the file alone.

Format 2 adds `checksum`: the sha256 of everything else in the file (spec, compacted flag, extra, then every mask
and state_dict tensor in sorted name order with its dtype, shape and bytes; `checksum`), checked on every load, so
a flipped byte anywhere in the file is refused instead of silently evaluating a different model. Format 1 files
(no checksum) are refused with the command that regenerates them.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .compact import compact
from .errors import GradauthError
from .fsutil import atomic_path
from .models import build_model
from .prune import Masks, apply_masks

FORMAT = "gradauth-model/2"
LEGACY_FORMATS = ("gradauth-model/1",)
SPEC_FIELDS = {"arch": str, "num_classes": int, "in_channels": int, "image_size": int, "width": (int, float),
               "mean": list, "std": list}
REGENERATE = ("regenerate it with this gradauth: delete it, then `gradauth train CONFIG` for base.pt, "
              "`gradauth sweep CONFIG --resume` for models/, `gradauth release DIR` for release/")


@dataclass
class ModelSpec:
    arch: str
    num_classes: int
    in_channels: int
    image_size: int
    width: float
    mean: tuple
    std: tuple

    def example(self, n: int = 2) -> torch.Tensor:
        return torch.zeros(n, self.in_channels, self.image_size, self.image_size)


def spec_dict(spec: ModelSpec) -> dict:
    return {"arch": spec.arch, "num_classes": spec.num_classes, "in_channels": spec.in_channels,
            "image_size": spec.image_size, "width": spec.width, "mean": list(spec.mean), "std": list(spec.std)}


def _tensor_digest(h, group: str, tensors: dict) -> None:
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([group, name, str(t.dtype), list(t.shape)]).encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def checksum(obj: dict) -> str:
    """sha256 of a model file's content: spec, compacted, extra (canonical JSON), then masks and state_dict tensors
    in sorted name order, each as (name, dtype, shape) and its raw bytes."""
    h = hashlib.sha256(b"gradauth-model/2\0")
    head = {"spec": obj["spec"], "compacted": obj["compacted"], "extra": obj.get("extra", {})}
    h.update(json.dumps(head, sort_keys=True, separators=(",", ":"), default=repr).encode() + b"\0")
    _tensor_digest(h, "masks", obj["masks"])
    _tensor_digest(h, "state_dict", obj["state_dict"])
    return h.hexdigest()


def to_bytes(model: nn.Module, spec: ModelSpec, masks: Masks | None = None, compacted: bool = False,
             extra: dict | None = None) -> bytes:
    obj = {"format": FORMAT, "spec": spec_dict(spec), "compacted": compacted,
           "masks": {k: v.cpu() for k, v in (masks or {}).items()},
           "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "extra": extra or {}}
    obj["checksum"] = checksum(obj)
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_model(path: str | Path, model: nn.Module, spec: ModelSpec, masks: Masks | None = None,
               compacted: bool = False, extra: dict | None = None) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(to_bytes(model, spec, masks, compacted, extra))
    return Path(path)


def from_bytes(data: bytes, source: str = "model") -> dict:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged zip/pickle raises many types; all mean "not a model file" (no code ran)
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise GradauthError(f"{source} is not a readable gradauth model file ({first}); "
                            f"it was refused without running any code in it: {REGENERATE}") from None
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt in LEGACY_FORMATS:
        raise GradauthError(f"{source} is a {fmt} file, an older format without a checksum that this gradauth no "
                            f"longer loads: {REGENERATE}")
    if fmt != FORMAT:
        raise GradauthError(f"{source} is not a gradauth model file (format {FORMAT} expected): {REGENERATE}")
    problem = _shape_problem(obj)
    if problem:
        raise GradauthError(f"{source} is damaged ({problem}): {REGENERATE}")
    try:
        ok = checksum(obj) == obj["checksum"]
    except Exception:  # a value of the wrong kind inside an otherwise well-formed file
        ok = False
    if not ok:
        raise GradauthError(f"{source} is damaged: its content does not match its sha256 checksum (a changed or "
                            f"corrupted byte); copy it again or {REGENERATE}")
    return obj


def _shape_problem(obj: dict) -> str | None:
    """What is missing or of the wrong kind in a format-2 dict, or None."""
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return "no model spec (arch, classes, channels, normalisation)"
    bad = [k for k, t in SPEC_FIELDS.items() if not isinstance(spec.get(k), t) or isinstance(spec.get(k), bool)]
    if bad:
        return f"its spec lacks or mistypes {', '.join(bad)}"
    for key in ("masks", "state_dict"):
        if not isinstance(obj.get(key), dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj[key].items()):
            return f"{key} is not a dict of named tensors"
    if not obj["state_dict"]:
        return "no weights"
    if not isinstance(obj.get("compacted"), bool) or not isinstance(obj.get("extra", {}), dict):
        return "compacted/extra missing or mistyped"
    if not isinstance(obj.get("checksum"), str):
        return "no checksum"
    return None


def load_model_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise GradauthError(f"model file {path} not found: check the path (or run the stage that writes it)")
    return from_bytes(path.read_bytes(), str(path))


def rebuild(obj: dict) -> tuple[nn.Module, ModelSpec, Masks]:
    """The module a model file describes, weights loaded, in eval mode."""
    s = obj["spec"]
    spec = ModelSpec(s["arch"], s["num_classes"], s["in_channels"], s["image_size"], s["width"],
                     tuple(s["mean"]), tuple(s["std"]))
    model = build_model(spec.arch, spec.num_classes, spec.in_channels, spec.width)
    masks = obj["masks"]
    if masks:
        apply_masks(model, masks)
        if obj["compacted"]:
            model = compact(model, masks, spec.example())
    try:
        model.load_state_dict(obj["state_dict"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise GradauthError(f"model file does not match its own description ({str(e).splitlines()[0][:120]}): regenerate it")
    return model.eval(), spec, masks


def base_for(cfg, out: Path, command: str, ds=None, model: nn.Module | None = None):
    """(model on the CPU in eval mode, dataset) for a command that reads DIR/base.pt (detect, simplify): the given
    model, or DIR/base.pt checked against the config's data (classes and channels), one line if either is off."""
    from . import rundir
    from .data import load_dataset
    spec = None
    if model is None:
        if not (out / rundir.BASE).is_file():
            raise GradauthError(f"{out / 'base.pt'} not found: run `gradauth train CONFIG` first, then {command}")
        model, spec, _ = rebuild(load_model_file(out / rundir.BASE))
    model = model.cpu().eval()
    ds = ds or load_dataset(cfg.data, cfg.seed)
    if spec is not None and (ds.num_classes, ds.in_channels) != (spec.num_classes, spec.in_channels):
        raise GradauthError(f"{out / 'base.pt'} is a {spec.num_classes}-class, {spec.in_channels}-channel model but "
                            f"{cfg.data.name} has {ds.num_classes} classes, {ds.in_channels} channels: pass its own "
                            "config")
    return model, ds
