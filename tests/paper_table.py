"""Trial tables with known answers, shaped like trials.parquet: the paper's Table 1 and a row builder for small cases."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gradauth.select import TRIAL_COLUMNS
from gradauth.trial import TrialSpec

VGG19_CHANNELS = 2 * 64 + 2 * 128 + 4 * 256 + 8 * 512  # BN channels of VGG-19: 5504
# The paper's Table 1 (VGG-19, CIFAR-10, bn_gamma, rate mode): lock rate → (Prun_acc, mean Fine_acc over seeds).
TABLE1 = {0.001: (0.85, 0.935), 0.006: (0.45, 0.930), 0.007: (0.31, 0.925), 0.01: (0.22, 0.920),
          0.02: (0.101, 0.912), 0.03: (0.100, 0.905), 0.07: (0.100, 0.815), 0.10: (0.100, 0.736)}
SEED_NOISE = (-0.002, 0.0, 0.002)  # symmetric, so each mean is exactly the table's value; sample std 0.002


def trial(lock_value: float = 0.02, fine_acc: float | None = 0.9, prun_acc: float = 0.1, *, seed: int = 0,
          importance: str = "bn_gamma", lock_mode: str = "rate", epochs: int = 40, lr: float = 0.01,
          data_fraction: float = 1.0, scope: str = "all", status: str = "ok", num_classes: int = 10,
          total_channels: int = VGG19_CHANNELS, locked_channels: int | None = None) -> dict:
    """One trials.parquet row; trial_id is the sweep's (`TrialSpec.trial_id`)."""
    tid = TrialSpec(importance, lock_mode, lock_value, epochs, lr, data_fraction, scope, seed).trial_id
    if locked_channels is None:
        locked_channels = round(lock_value * total_channels) if lock_mode == "rate" else 0
    tuned = status == "ok"
    return {"trial_id": tid, "dataset": "cifar10", "arch": "vgg19", "num_classes": num_classes,
            "importance": importance, "lock_mode": lock_mode, "lock_value": lock_value,
            "locked_channels": locked_channels, "total_channels": total_channels, "ft_epochs": epochs, "ft_lr": lr,
            "ft_data_fraction": data_fraction, "ft_scope": scope, "seed": seed, "base_acc": 0.9366,
            "prun_acc": prun_acc, "fine_acc": fine_acc if tuned else None,
            "fine_top3": min(1.0, fine_acc + 0.06) if tuned else None,
            "params": 20_000_000 - 1000 * locked_channels if tuned else None,
            "flops": 398_000_000 - 60_000 * locked_channels if tuned else None,
            "status": status, "seconds": 60.0, "git_sha": "0" * 40, "config_hash": "test"}


def seeds(fine_acc: float, noise=SEED_NOISE, **kw) -> list[dict]:
    """One row per seed, fine_acc spread by `noise` around the mean."""
    return [trial(fine_acc=round(fine_acc + d, 6), seed=s, **kw) for s, d in enumerate(noise)]


def table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(TRIAL_COLUMNS))


def paper_table1() -> pd.DataFrame:
    """24 trials: 8 lock rates × 3 seeds, one schedule. Rates ≤ 1 % leave the locked model above chance + 0.1."""
    return table([r for rate, (prun, fine) in TABLE1.items() for r in seeds(fine, lock_value=rate, prun_acc=prun)])


def write_trials(df: pd.DataFrame, path: Path) -> Path:
    """Write with the contract schema, as the sweep does."""
    pq.write_table(pa.Table.from_pandas(df, schema=pa.schema(TRIAL_COLUMNS), preserve_index=False), path)
    return path
