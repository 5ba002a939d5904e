"""`train-fold` and `benchmark-throughput` commands (heavy imports happen only when a command runs)."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def finished(fold_out: Path) -> bool:
    """Trained to the end and predicted since: oof.csv (written last by predict_fold) is no older than anything
    training writes (env.json at each start), so a killed re-run of a finished fold does not count as finished."""
    marks = [fold_out / n for n in ("oof.csv", "train_result.json", "state.pt", "env.json", "metrics.jsonl")]
    if not all(m.exists() for m in marks[:2]):
        return False
    return all(marks[0].stat().st_mtime_ns >= m.stat().st_mtime_ns for m in marks[1:] if m.exists())


def fold_list(text: str) -> list[int]:
    """`--fold 3` or `--fold 0,1,2` (one token, so `key=value` overrides may follow)."""
    try:
        folds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"folds are integers separated by commas, got '{text}'") from None
    if not folds:
        raise argparse.ArgumentTypeError("no fold given")
    return folds


def register(sub) -> None:
    from ..cli_common import add_config_args, config_from_args

    p = add_config_args(sub.add_parser("train-fold", help="train folds, each then predicting OOF / eval / test"))
    p.add_argument("--fold", type=fold_list, required=True,
                   help="a fold, or several as 0,1,2: trained in turn in this process (one start-up, one image load)")
    p.add_argument("--resume", action="store_true", default=os.environ.get("RESUME") == "1",
                   help="continue from fold<k>/state.pt (also RESUME=1)")
    p.add_argument("--deadline", type=float, default=None,
                   help="Unix time to be done by (make's TIME_LIMIT): stop at the first epoch's end from which the "
                        "fold would not finish in time, state saved, and exit 75")
    p.add_argument("--deadline-mode", choices=("fold", "epoch"), default="fold",
                   help="fold: spend no time on a fold that cannot finish (a machine gone afterwards); epoch: train "
                        "until the next epoch would not fit (a RESUME=1 follows on the same disk)")

    def run(args):
        from ..config import run_dir
        from ..console import console
        from ..errors import WBCError
        from ..predict.fold import predict_fold  # the command orchestrates; the library flows one way
        from .deadline import Deadline
        from .inputs import load_fold_data
        from .loop import train_fold

        cfg = config_from_args(args)
        if cfg["predict"].get("checkpoints"):
            raise WBCError(f"{cfg['name']}: predict.checkpoints is set, so this config only predicts "
                           f"with another run's models; use `make predict`")
        data, deadline, last_fold_s = None, Deadline(args.deadline, args.deadline_mode), None
        for fold in args.fold:
            out = run_dir(cfg) / f"fold{fold}"
            if args.resume and finished(out):  # `RESUME=1 make train-all` skips the folds a killed call finished
                console.print(f"{out}: trained and predicted already; nothing to resume")
                continue
            deadline.check_fold(fold, last_fold_s)
            data = data or load_fold_data(cfg)
            t0 = time.monotonic()  # after the one image load: the next fold will not repeat it
            train_fold(cfg, fold, resume=args.resume, data=data, deadline=deadline)
            predict_fold(cfg, fold, data)
            last_fold_s = time.monotonic() - t0

    p.set_defaults(func=run)

    d = add_config_args(sub.add_parser("run-dir", help="print the folder a config's run writes to (outputs/<name>)"))

    def show_run_dir(args):
        from ..config import run_dir

        print(run_dir(config_from_args(args)))

    d.set_defaults(func=show_run_dir)

    b = add_config_args(sub.add_parser("benchmark-throughput", help="train-fold img/s vs a plain preloaded loop"))
    b.add_argument("--steps", type=int, default=50)
    b.add_argument("--warmup", type=int, default=10)

    def bench(args):
        from .benchmark import benchmark

        benchmark(config_from_args(args), args.steps, args.warmup)

    b.set_defaults(func=bench)
