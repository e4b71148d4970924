"""`gradauth` command line: each subcommand maps to one plain function in pipeline.py (or its stage module).

Bad input raises GradauthError anywhere below; here it becomes one line on stderr and exit code 2, and so does an
OSError (a read-only or full disk met while writing: the files themselves are written atomically, see fsutil.py).
Every command that writes into an output folder holds its lock (runlock.py) while it does.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import GradauthError


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GradauthError(f"--targets {text!r}: give comma-separated accuracies, e.g. 0.9,0.8,0.7")


def cmd_run(a):
    from .pipeline import run_all
    run_all(a.config, a.out, a.resume)


def cmd_train(a):
    from .config import load_config
    from .pipeline import out_dir_for, train_stage
    cfg = load_config(a.config)
    train_stage(cfg, out_dir_for(cfg, a.out), resume=a.resume)


def cmd_sweep(a):
    from .config import load_config
    from .pipeline import out_dir_for, sweep_stage
    cfg = load_config(a.config)
    sweep_stage(cfg, out_dir_for(cfg, a.out), resume=a.resume)


def cmd_select(a):
    from .pipeline import select_stage
    select_stage(Path(a.dir), levels=a.levels, min_gap=a.min_gap, max_locked_acc=a.max_locked_acc,
                 targets=_floats(a.targets) if a.targets else None)


def cmd_release(a):
    from .release import release_dir
    from .runlock import run_lock
    with run_lock(Path(a.dir), "release", create=False):
        release_dir(Path(a.dir), new_keys=a.new_keys)


def cmd_unlock(a):
    from .release import unlock_to_file
    unlock_to_file(Path(a.release_dir), a.level, a.key, Path(a.out), force=a.force)


def cmd_evaluate(a):
    from .config import load_config
    from .pipeline import evaluate_file
    print(json.dumps(evaluate_file(a.model_file, load_config(a.config)), indent=2))


def cmd_slice(a):
    from .config import load_config
    from .pipeline import out_dir_for, slice_stage
    cfg = load_config(a.config)
    slice_stage(cfg, out_dir_for(cfg, a.out))


def cmd_detect(a):
    from .detect import detect, load, settings_from
    from .pipeline import out_dir_for
    cfg, raw = load(a.config)
    settings = settings_from(raw, {"normal": a.normal, "clean": a.clean, "attacks": a.attacks,
                                   "samples": a.samples, "seconds": a.seconds, "features": a.features,
                                   "theta": a.theta, "seed": a.seed})
    from .runlock import run_lock
    out = out_dir_for(cfg, a.out)
    with run_lock(out, "detect", create=False):  # detect needs DIR/base.pt: a missing DIR is refused, not made
        print(detect(cfg, out, settings))


def cmd_report(a):
    from .report import write_report
    from .runlock import run_lock
    with run_lock(Path(a.dir), "report", create=False):
        print(write_report(Path(a.dir)))


def cmd_attack(a):
    from .attack import run_attack
    from .runlock import run_lock
    with run_lock(Path(a.dir), "attack", create=False):
        run_attack(Path(a.dir), compare=not a.no_alt, forms=a.forms.split(",") if a.forms else None)


def cmd_status(a):
    from .status import print_status
    print_status(Path(a.dir))


def cmd_bench(a):
    from .bench import run_bench
    run_bench(a.name, Path(a.out) if a.out else None)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradauth", description="Graded authorization by structured pruning.")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="the full output: a line per epoch, Tune's tables and Ray's worker logs (else in DIR/sweep.log)")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_):
        s = sub.add_parser(name, help=help_)
        s.set_defaults(fn=fn)
        s.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                       help="the full output (Tune's tables, Ray's worker logs, a line per epoch)")
        return s

    s = add("run", cmd_run, "every stage: train, sweep, select, release, report")
    s.add_argument("config"), s.add_argument("--out"), s.add_argument("--resume", action="store_true")
    s = add("train", cmd_train, "base training with BN-γ sparsity")
    s.add_argument("config"), s.add_argument("--out"), s.add_argument("--resume", action="store_true")
    s = add("sweep", cmd_sweep, "the Ray Tune sweep → trials.parquet")
    s.add_argument("config"), s.add_argument("--out"), s.add_argument("--resume", action="store_true")
    s = add("select", cmd_select, "choose levels from DIR/trials.parquet → levels.json")
    s.add_argument("dir")
    s.add_argument("--levels", type=int), s.add_argument("--min-gap", type=float)
    s.add_argument("--max-locked-acc", type=float), s.add_argument("--targets")
    s = add("release", cmd_release, "locked model + one encrypted pack per level → DIR/release/, owner's keys → "
            "DIR/keys/ (never publish DIR/keys)")
    s.add_argument("dir")
    s.add_argument("--new-keys", action="store_true",
                   help="replace an existing release: new keys; the old release and its keys are moved to "
                        "DIR/keys/archive/<release id>/, never deleted")
    s = add("unlock", cmd_unlock, "decrypt and rebuild one level's model")
    s.add_argument("release_dir"), s.add_argument("--level", type=int, required=True)
    s.add_argument("--key", required=True), s.add_argument("--out", required=True)
    s.add_argument("--force", action="store_true", help="replace --out if it is an existing regular file")
    s = add("evaluate", cmd_evaluate, "accuracy of a saved model on the config's test split")
    s.add_argument("model_file"), s.add_argument("--config", required=True)
    s = add("slice", cmd_slice, "NNSlicer slicing → slices.parquet")
    s.add_argument("config"), s.add_argument("--out")
    s = add("detect", cmd_detect, "NNSlicer adversarial-input detection on the base model → detect.parquet, "
            "detect.md (settings: flags, or a detect: mapping in the config)")
    s.add_argument("config"), s.add_argument("--out")
    s.add_argument("--attacks", help="NAME[:EPS,EPS…];NAME… (EPS in (0, 1] pixel units), e.g. 'FGSM:0.03;CW-L2'")
    s.add_argument("--normal", type=int, help="normal training inputs the classifiers learn from")
    s.add_argument("--clean", type=int, help="clean test inputs for the false-positive rate")
    s.add_argument("--samples", type=int, help="budget: inputs attacked per attack and ε")
    s.add_argument("--seconds", type=float, help="budget: no new batch after this many seconds per attack and ε")
    s.add_argument("--features", choices=["channel", "neuron"]), s.add_argument("--theta", type=float)
    s.add_argument("--seed", type=int)
    s = add("report", cmd_report, "report.md and plots/*.png")
    s.add_argument("dir")
    s = add("attack", cmd_attack, "the thief's view: fine-tune the public model with some data")
    s.add_argument("dir")
    s.add_argument("--forms", help="public-model forms to attack, comma-separated, from zeros, revive, noise, kept, "
                                   "kept+revive (default: all; the head-start table needs zeros and revive, or noise "
                                   "for a release.noise_init release)")
    s.add_argument("--no-alt", action="store_true", help="skip the comparison locks (other importance sources and "
                                                          "lock modes): the public lock and scratch only")
    s = add("status", cmd_status, "trials done / running / pending / failed and the levels so far")
    s.add_argument("dir")
    s = add("bench", cmd_bench, "a benchmark → results/bench/NAME.json")
    s.add_argument("name"), s.add_argument("--out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.verbose:
        from .console import set_verbose
        set_verbose(True)
    try:
        args.fn(args)
    except GradauthError as e:
        print(f"gradauth {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full disk, a permission, a vanished folder: one line, never a traceback
        from .runlock import os_error_line
        print(f"gradauth {args.command}: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gradauth {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
