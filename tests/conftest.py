import os

# Before torch loads OpenMP: idle threads sleep instead of spinning, so parallel test processes (Ray workers, the
# fault-tolerance subprocesses) on 2 cores do not starve each other (seen: 3 ms → 600 ms per step for a tiny model).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def tiny_cfg():
    """The quickstart config shrunk to seconds: digits, a half-width tiny VGG."""
    from gradauth.config import parse_config
    return parse_config({
        "name": "tiny", "data": {"name": "digits", "crop_pad": 1, "flip": False},
        "model": {"arch": "vgg_tiny", "width": 1.0},
        "train": {"epochs": 12, "lr": 0.05, "sparsity": 0.03},
        "lock": {"mode": "rate", "values": [0.1, 0.2]},
        "finetune": {"epochs": [2], "lr": [0.01], "seeds": [0]},
        "sweep": {"lock_bound": 0.2},
    })
