"""`train-fold`, `train-bundle` and `benchmark-throughput` commands (heavy imports happen only when a command runs)."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def fold_list(text: str) -> list[int]:
    """`--fold 3` or `--fold 0,1,2` (one token, so `key=value` overrides may follow)."""
    try:
        folds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"folds are integers separated by commas, got '{text}'") from None
    if not folds:
        raise argparse.ArgumentTypeError("no fold given")
    return folds


def gpu_slots(text: str) -> list[str]:
    """`--gpus 0,1,2,3` (one CUDA_VISIBLE_DEVICES value per slot; a GPU named twice trains two folds at once)."""
    slots = [s.strip() for s in text.split(",") if s.strip()]
    if not slots:
        raise argparse.ArgumentTypeError("no GPU given")
    return slots


def register(sub) -> None:
    from ..core.cli import add_config_args, config_from_args
    from .deadline import MODES

    def add_deadline_mode(p):
        p.add_argument("--deadline-mode", choices=MODES, default="fold",
                       help="fold: spend no time on a fold that cannot finish (a machine gone afterwards); epoch: "
                            "train until the next epoch would not fit (a RESUME=1 follows on the same disk)")

    def add_folds_and_resume(p):
        p.add_argument("--fold", type=fold_list, required=True,
                       help="a fold, or several as 0,1,2: trained in turn in this process (one start-up, one image "
                            "load)")
        p.add_argument("--resume", action="store_true", default=os.environ.get("RESUME") == "1",
                       help="continue from fold<k>/state.pt (also RESUME=1)")
        p.add_argument("--gpus", type=gpu_slots, default=None,
                       help="train the folds side by side, a process per CUDA_VISIBLE_DEVICES value, e.g. 0,1,2,3 "
                            "(0,0,1,1: two folds per GPU); logs in outputs/<name>/logs/")

    p = add_config_args(sub.add_parser("train-fold", help="train folds, each then predicting OOF / eval / test"))
    add_folds_and_resume(p)
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds from now to be done by: stop at the first epoch's end from which the fold would "
                        "not finish in time, state saved, and exit 75")
    add_deadline_mode(p)

    def run(args):
        from .deadline import Deadline

        at = None if args.time_limit is None else time.time() + args.time_limit
        from .fold_runner import run_folds

        run_folds(config_from_args(args), args.config, args.overrides, args.fold, args.resume,
                  Deadline(at, args.deadline_mode), args.gpus)

    p.set_defaults(func=run)

    tb = sub.add_parser("train-bundle", help="train several configs' folds within a time limit, then bundle each run")
    tb.add_argument("--configs", required=True, type=lambda text: [c for c in text.split(",") if c],
                    help="experiment YAMLs separated by commas, trained in this order")
    add_folds_and_resume(tb)
    tb.add_argument("--time-limit", type=float, required=True, help="seconds from now to be done training by")
    add_deadline_mode(tb)
    tb.add_argument("--dest", type=Path, default=Path("outputs/bundles"), help="where the .tar.gz files go")
    tb.add_argument("--kill-after", type=float, default=30.0,
                    help="seconds past the deadline after which a training still running is interrupted")
    tb.add_argument("overrides", nargs="*", help="key=value config overrides for every config")

    def run_bundle(args):
        from ..core.config import resolve_path
        from .deadline import Deadline
        from .fold_runner import train_bundle

        train_bundle(args.configs, args.overrides, args.fold, args.resume,
                     Deadline(time.time() + args.time_limit, args.deadline_mode), resolve_path(args.dest),
                     args.kill_after, args.gpus)

    tb.set_defaults(func=run_bundle)

    b = add_config_args(sub.add_parser("benchmark-throughput", help="train-fold img/s vs a plain preloaded loop"))
    b.add_argument("--steps", type=int, default=50)
    b.add_argument("--warmup", type=int, default=10)

    def bench(args):
        from .benchmark import benchmark

        benchmark(config_from_args(args), args.steps, args.warmup)

    b.set_defaults(func=bench)
