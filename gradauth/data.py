"""Datasets as whole uint8 tensors, augmented in whole batches on the trial's device (the airbench way).

No DataLoader workers and no PIL in the training loop: a trial holds its split in memory (on the GPU where there is
one) and `augment` crops and flips a whole batch with a few tensor ops. Datasets are registered loaders
(`register_dataset(name)`: `load(cfg, seed) -> Loaded`, the built-ins below included); `load_dataset` checks what a
loader returns and makes the validation split, subsets and normalisation the same way for all of them.
"""
from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import DataConfig
from .errors import GradauthError
from .registry import register_dataset


@dataclass
class Split:
    x: torch.Tensor  # uint8, N×C×H×W
    y: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))

    def subset(self, n: int | None, seed: int) -> "Split":
        if n is None or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return Split(self.x[idx], self.y[idx])


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]
    crop_pad: int = 4
    flip: bool = True

    @property
    def in_channels(self) -> int:
        return self.train.x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.x.shape[-1]

    def to(self, device) -> "Dataset":
        return Dataset(self.name, self.train.to(device), self.val.to(device), self.test.to(device),
                       self.num_classes, self.mean, self.std, self.crop_pad, self.flip)


@dataclass
class Loaded:
    """What a dataset loader returns: uint8 images N×C×H×W and int64 labels in 0…num_classes-1, for the train split
    (the validation split is held out of it by `data.val_fraction`) and the test split."""
    train: Split
    test: Split
    num_classes: int


# ---- batch transforms (pure tensor in, tensor out) -----------------------------------------------------------

def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 batch -> float batch, standardised per channel."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def batch_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to `pad` pixels (zero padding), one offset per image, as one gather."""
    if pad == 0:
        return x
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]   # n,1,h,1
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]   # n,1,1,w
    ni = torch.arange(n, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[ni, ci, rows, cols]


def batch_flip_lr(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(x), generator=gen, device=gen.device).to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment(x: torch.Tensor, ds: Dataset, gen: torch.Generator) -> torch.Tensor:
    x = batch_crop(x, ds.crop_pad, gen)
    if ds.flip:
        x = batch_flip_lr(x, gen)
    return normalize(x, ds.mean, ds.std)


# ---- loaders -------------------------------------------------------------------------------------------------

def _split_train_val(x, y, val_fraction: float, seed: int) -> tuple[Split, Split]:
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(y) * val_fraction))
    return Split(x[perm[n_val:]], y[perm[n_val:]]), Split(x[perm[:n_val]], y[perm[:n_val]])


def _stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (unbiased) of uint8 images, in [0, 1] units, computed exactly from a histogram.

    A float32 reduction's result depends on the thread count (the summation order): a sweep driver on another
    machine, or a test reference computed with one thread, normalised a few ulps differently and its trials
    diverged from the same base model. Integer sums are exact, so every machine gets the same bits."""
    n = x.numel() // x.shape[1]
    mean, std = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).tolist()  # uint8 in, int64 counts out
        s1 = sum(v * k for v, k in enumerate(counts))
        s2 = sum(v * v * k for v, k in enumerate(counts))
        mean.append(s1 / (n * 255))
        var = (n * s2 - s1 * s1) / (n * (n - 1)) if n > 1 else 0.0  # exact integers, one rounding
        std.append(max(math.sqrt(var) / 255, 1e-3))
    return tuple(mean), tuple(std)


@register_dataset("digits", _builtin=True)
def _digits(cfg: DataConfig, seed: int) -> Loaded:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8))[:, None]  # N×1×8×8
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 1))
    n_test = int(round(len(y) * cfg.test_fraction))
    test = Split(x[perm[:n_test]], y[perm[:n_test]])
    return Loaded(Split(x[perm[n_test:]], y[perm[n_test:]]), test, 10)


class _ArraysOnly(pickle.Unpickler):
    """The CIFAR python batches are dicts of numpy arrays, lists and strings: nothing else may be built from them, so
    a crafted batch file cannot run code (plain pickle.load, as torchvision uses, would call any global it names)."""
    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")
               } | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OSError) as e:
        raise GradauthError(f"{path} is not a CIFAR python batch ({e}): re-extract the dataset's python version")
    if not isinstance(batch, dict) or "data" not in batch:
        raise GradauthError(f"{path} is not a CIFAR python batch (no 'data' array): re-extract the dataset")
    return batch


def _cifar(cfg: DataConfig, hundred: bool):
    root = _root(cfg)
    folder, files, key = (("cifar-100-python", ["train"], "fine_labels") if hundred else
                          ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "labels"))
    test_file = "test" if hundred else "test_batch"
    k = 100 if hundred else 10
    if not (root / folder).is_dir() and cfg.download:
        import torchvision
        (torchvision.datasets.CIFAR100 if hundred else torchvision.datasets.CIFAR10)(str(root), download=True)
    if not (root / folder).is_dir():
        raise GradauthError(f"dataset folder {root / folder} not found: set data.root (or $GRADAUTH_DATA) to the folder "
                            f"holding {folder}/, or set data.download: true")
    missing = [n for n in files + [test_file] if not (root / folder / n).is_file()]
    if missing:
        raise GradauthError(f"{root / folder} lacks {', '.join(missing)}: re-extract the dataset's python version there "
                            f"(or remove the folder and set data.download: true)")

    def read(names):
        batches = [(n, _unpickle(root / folder / n)) for n in names]
        xs, ys = [], []
        for n, b in batches:
            try:
                x = np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                y = np.asarray(b[key], dtype=np.int64).reshape(-1)
            except (KeyError, ValueError, TypeError) as e:
                raise GradauthError(f"{root / folder / n} is not a CIFAR python batch (bad {e.__class__.__name__}: "
                                    f"no 32×32×3 uint8 'data' with '{key}'): re-extract the dataset")
            if len(x) != len(y) or (len(y) and not (0 <= y.min() and y.max() < k)):
                raise GradauthError(f"{root / folder / n} is damaged: {len(x)} images, {len(y)} labels"
                                    f"{'' if not len(y) else f' in {y.min()}…{y.max()}'} (expected labels 0…{k - 1}, "
                                    f"one per image): re-extract the dataset")
            xs.append(x), ys.append(y)
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    return Loaded(Split(*read(files)), Split(*read([test_file])), k)


@register_dataset("cifar10", _builtin=True)
def _cifar10(cfg: DataConfig, seed: int) -> Loaded:
    return _cifar(cfg, hundred=False)


@register_dataset("cifar100", _builtin=True)
def _cifar100(cfg: DataConfig, seed: int) -> Loaded:
    return _cifar(cfg, hundred=True)


def _class_folders(folder: Path) -> list[str]:
    """ImageFolder's classes: the sub-folders, sorted (their order gives the labels)."""
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir())
    except OSError as e:
        raise GradauthError(f"imagefolder {folder} cannot be read ({e.strerror or e}): check the path and permissions")


@register_dataset("imagefolder", _builtin=True)
def _imagefolder(cfg: DataConfig, seed: int) -> Loaded:
    import torchvision
    from PIL import Image
    from torchvision.transforms import v2
    root = _root(cfg)
    layout = f"imagefolder needs {root}/train/<class>/* and {root}/test/<class>/*"
    classes = {}
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise GradauthError(f"{layout}: {root / part} is missing")
        classes[part] = _class_folders(root / part)
        if not classes[part]:
            raise GradauthError(f"{layout}: {root / part} holds no class folders")
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        diff = "; ".join(f"only in {p}: {', '.join(c)}" for p, c in (("train", only_train), ("test", only_test)) if c)
        raise GradauthError(f"imagefolder {root}: train and test have different class folders ({diff}): labels follow "
                            f"the sorted folder names, so both splits need the same classes")
    tf = v2.Compose([v2.PILToTensor(), v2.Resize((cfg.image_size, cfg.image_size), antialias=True)])
    splits = {}
    for part in ("train", "test"):
        try:
            ds = torchvision.datasets.ImageFolder(str(root / part), transform=tf)
        except FileNotFoundError as e:
            raise GradauthError(f"imagefolder {root / part}: {e}".rstrip(". ") + ": put images in every class folder")
        xs = []
        for i, (path, _) in enumerate(ds.samples):
            try:
                xs.append(ds[i][0][:3].expand(3, -1, -1))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                why = str(e).splitlines()[0][:120] if str(e) else e.__class__.__name__
                raise GradauthError(f"image {path} cannot be decoded ({why}): remove or replace it")
        splits[part] = (torch.stack(xs), torch.tensor(ds.targets), len(ds.classes))
    x, y, k = splits["train"]
    return Loaded(Split(x, y), Split(*splits["test"][:2]), k)


def _root(cfg: DataConfig) -> Path:
    if cfg.root:
        return Path(cfg.root).expanduser()
    env = os.environ.get("GRADAUTH_DATA")
    if env:
        return Path(env).expanduser() / cfg.name
    raise GradauthError(f"data.root is not set for {cfg.name}: set data.root in the config or $GRADAUTH_DATA")


def _loaded_problem(got, name: str) -> str | None:
    """Why a loader's return value is not a `Loaded` gradauth can use (a user's loader is refused in one line)."""
    if not isinstance(got, Loaded):
        return f"returned {type(got).__name__}, not gradauth.data.Loaded(train=Split(x, y), test=Split(x, y), num_classes)"
    if not isinstance(got.num_classes, int) or isinstance(got.num_classes, bool):
        return f"num_classes must be a whole number, got {got.num_classes!r}"
    shapes = set()
    for part, split in (("train", got.train), ("test", got.test)):
        x, y = getattr(split, "x", None), getattr(split, "y", None)
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
            return f"{part} images must be a uint8 tensor N×C×H×W, got " + \
                (f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__)
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (len(x),):
            return f"{part} labels must be an int64 tensor with one label per image ({len(x)}), got " + \
                (f"{y.dtype} of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__)
        if len(y) and not (0 <= int(y.min()) and int(y.max()) < got.num_classes):
            return f"{part} labels must be in 0…{got.num_classes - 1}, got {int(y.min())}…{int(y.max())}"
        shapes.add(tuple(x.shape[1:]))
    if len(shapes) > 1:
        return f"train and test images differ in shape ({' vs '.join(map(str, sorted(shapes)))})"
    return None


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    """The fixed, seeded train/val/test split of the configured dataset, as uint8 tensors on the CPU."""
    from .registry import dataset
    got = dataset(cfg.name).load(cfg, seed)
    problem = _loaded_problem(got, cfg.name)
    if problem:
        raise GradauthError(f"dataset {cfg.name}: its loader {problem}: fix the loader")
    x, y, test, k = got.train.x, got.train.y, got.test, got.num_classes
    if k < 2:
        raise GradauthError(f"{cfg.name} has {k} class{'' if k == 1 else 'es'}: a classifier needs at least 2")
    train, val = _split_train_val(x, y, cfg.val_fraction, seed)
    if not len(train) or not len(test):
        raise GradauthError(f"{cfg.name} has {len(train)} train images (after holding out data.val_fraction "
                            f"{cfg.val_fraction}) and {len(test)} test images: both splits need images")
    for part, split, n in (("train", train, cfg.train_subset), ("test", test, cfg.test_subset)):
        if n is not None and n > len(split):
            held = f" after holding out data.val_fraction {cfg.val_fraction}" if part == "train" else ""
            raise GradauthError(f"data.{part}_subset {n} is larger than the {part} split ({len(split)} images{held}): "
                                f"lower it to at most {len(split)} or remove it")
    train, test = train.subset(cfg.train_subset, seed), test.subset(cfg.test_subset, seed)
    mean, std = _stats(train.x)
    return Dataset(cfg.name, train, val, test, k, mean, std, cfg.crop_pad, cfg.flip)


def check_config_against(cfg, ds: Dataset) -> None:
    """What a config asks of its data that only the loaded data can answer, checked before training (the sweep would
    find it only after the base model is trained): each importance criterion's `check_data` (slice: its classes)."""
    from .config import importance_entry  # the registry's, or a synapse-only importance (weight, random)
    problems = []
    for imp in cfg.importance:
        check = importance_entry(imp.name).check_data
        problem = check(imp.settings, ds) if check else None
        if problem:
            problems.append(f"`importance` {imp.label} {problem}")
    if problems:
        raise GradauthError("; ".join(problems))
