import os
import pickle

import numpy as np
import pytest
import torch

from gradauth.config import DataConfig
from gradauth.data import batch_crop, batch_flip_lr, load_dataset
from gradauth.errors import GradauthError


def test_digits_split_is_fixed_and_disjoint():
    a, b = load_dataset(DataConfig(name="digits"), seed=0), load_dataset(DataConfig(name="digits"), seed=0)
    assert (len(a.train), len(a.val), len(a.test)) == (1132, 126, 539)   # 1797 images: 30 % test, 10 % val
    assert a.train.x.dtype == torch.uint8 and a.train.x.shape[1:] == (1, 8, 8)
    assert torch.equal(a.train.y, b.train.y) and torch.equal(a.test.x, b.test.x)
    assert a.num_classes == 10 and int(a.train.x.max()) == 255


def test_batch_crop_translates_each_image_within_pad():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.uint8).reshape(2, 1, 5, 5)
    out = batch_crop(x, 1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for i in range(2):  # each output is the input shifted by (dy, dx) in [-1, 1]^2 with zero fill
        ok = False
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ref = torch.zeros(5, 5, dtype=torch.uint8)
                src = x[i, 0]
                ys, xs = slice(max(0, -dy), 5 - max(0, dy)), slice(max(0, -dx), 5 - max(0, dx))
                yd, xd = slice(max(0, dy), 5 - max(0, -dy)), slice(max(0, dx), 5 - max(0, -dx))
                ref[ys, xs] = src[yd, xd]
                ok |= torch.equal(out[i, 0], ref)
        assert ok


def test_flip_flips_about_half():
    x = torch.arange(1000 * 4, dtype=torch.float32).reshape(1000, 1, 1, 4)
    out = batch_flip_lr(x, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] != x[:, 0, 0, 0]).sum().item()
    assert 400 < flipped < 600
    assert torch.equal(out.sort(-1).values, x)


def _fake_cifar(root, n=20):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}, f)


def test_cifar_reads_python_batches_without_md5(tmp_path):
    _fake_cifar(tmp_path)
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path), val_fraction=0.1, train_subset=50))
    assert ds.train.x.shape == (50, 3, 32, 32) and len(ds.val) == 10 and len(ds.test) == 20


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_crafted_cifar_batch_is_refused_without_running_code(tmp_path, monkeypatch):
    _fake_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": _Payload(), "labels": [0]}, f)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GradauthError, match=r"data_batch_3 is not a CIFAR python batch \(refusing to load "
                                            r"(posix|os)\.system\)"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert not (tmp_path / "PWNED").exists()


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(GradauthError, match="not found.*data.root"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "nowhere")))
