"""The run directory: every path of an output folder by name, its config reader/writer, provenance (git sha) and the
derived defaults (lock bound). A core module: it imports no stage, so every stage (pipeline, sweep, select, release,
report, attack, status …) can use it without importing another stage.

    DIR/config.yaml        the resolved config (write_config / read_config)
    DIR/base.pt            the trained base model; base.json its metrics; base.ckpt training's per-epoch checkpoint
    DIR/trials.parquet     one row per trial; trials.d/ the row parts a running (or killed) driver left
    DIR/progress.json      the sweep's progress; search.json the targeted search's; sweep.log Tune's console
    DIR/levels.json        the selected levels
    DIR/models/<id>.pt     each finished trial's model
    DIR/release/           the public locked model, the packs; keys/ the owner keys
    DIR/attack.parquet     attack results; attack.md their table
    DIR/slices.parquet     NNSlicer contributions
    DIR/report.md          the report; plots/ its figures
    DIR/ray/               Tune's storage unless sweep.storage says otherwise (its experiment in <storage>/sweep)
    DIR/.gradauth.lock     held by the stage running on the folder (runlock.py)
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .config import dump_config, load_config
from .errors import GradauthError
from .fsutil import write_text

CONFIG = "config.yaml"
BASE = "base.pt"
BASE_METRICS = "base.json"
CHECKPOINT = "base.ckpt"  # base training's per-epoch checkpoint (train.py), removed once base.pt is written
TRIALS = "trials.parquet"
PARTS = "trials.d"
PROGRESS = "progress.json"
SEARCH = "search.json"  # the targeted search's progress and outcome (sweep.write_search)
SWEEP_LOG = "sweep.log"  # Tune's console output during the sweep (console.to_log)
LEVELS = "levels.json"
MODELS = "models"
RELEASE = "release"
KEYS = "keys"
ATTACK = "attack.parquet"
ATTACK_MD = "attack.md"
SLICES = "slices.parquet"
REPORT = "report.md"
PLOTS = "plots"
RAY = "ray"
LOCK = ".gradauth.lock"  # runlock.py: one stage at a time per output folder
EXPERIMENT = "sweep"  # Tune's experiment folder inside the storage

RUNS = Path("runs")  # where a run writes unless --out says otherwise (gitignored; results/ holds committed references)


def out_dir_for(cfg, out: str | None) -> Path:
    return Path(out) if out else RUNS / cfg.name


def model_path(out: Path, trial_id: str) -> Path:
    return Path(out) / MODELS / f"{trial_id}.pt"


def tune_storage(cfg, out: Path) -> str:
    """Tune's storage_path: sweep.storage (local, NFS, s3://, gs://), else DIR/ray."""
    return cfg.sweep.storage or str((Path(out) / RAY).resolve())


def experiment_path(storage: str) -> str:
    return f"{storage.rstrip('/')}/{EXPERIMENT}"


def git_sha() -> str:
    """The commit the code came from: $GRADAUTH_GIT_SHA if set, else asked of git, else "unknown".

    A `ray job submit --working-dir .` job runs from an uploaded copy without .git, so the submitter passes the sha
    along: `--runtime-env-json '{"env_vars": {"GRADAUTH_GIT_SHA": "'$(git rev-parse --short=12 HEAD)'"}}'`."""
    if os.environ.get("GRADAUTH_GIT_SHA", "").strip():
        return os.environ["GRADAUTH_GIT_SHA"].strip()
    try:
        here = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_config(cfg, out: Path) -> None:
    write_text(Path(out) / CONFIG, dump_config(cfg))


def read_config(out: Path):
    path = Path(out) / CONFIG
    if not path.is_file():
        raise GradauthError(f"{out} holds no {CONFIG}: is it an output dir of `gradauth run` / `gradauth train`?")
    return load_config(path)


def read_base_info(out: Path) -> dict:
    """base.json of an output folder, checked: a JSON object whose base_acc is an accuracy (what trials and the
    search read). A missing, unreadable or damaged file is one line naming the fix."""
    import json
    import math
    path = Path(out) / BASE_METRICS
    fix = f"re-run `gradauth train CONFIG --out {out}` (delete base.pt first: it is retrained with its base.json)"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GradauthError(f"{path} not found: {fix}")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise GradauthError(f"{path} is not readable JSON ({type(e).__name__}): {fix}")
    acc = info.get("base_acc") if isinstance(info, dict) else None
    if not isinstance(acc, (int, float)) or isinstance(acc, bool) or not math.isfinite(acc) or not 0 <= acc <= 1:
        raise GradauthError(f"{path} has no base_acc in [0, 1]: {fix}")
    return info


def chance_bound(num_classes) -> float:
    """The default locked-accuracy bound: chance (1 / num_classes) + 0.1. The one place this default is coded."""
    return 1 / num_classes + 0.1


def lock_bound(cfg, num_classes: int) -> float:
    return cfg.sweep.lock_bound if cfg.sweep.lock_bound is not None else chance_bound(num_classes)
