"""`train-fold`, `train-bundle` and `benchmark-throughput` commands (heavy imports happen only when a command runs)."""
from __future__ import annotations

import argparse
import math
import os
import signal
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


def gpu_slots(text: str) -> list[str]:
    """`--gpus 0,1,2,3` (one CUDA_VISIBLE_DEVICES value per slot; a GPU named twice trains two folds at once)."""
    slots = [s.strip() for s in text.split(",") if s.strip()]
    if not slots:
        raise argparse.ArgumentTypeError("no GPU given")
    return slots


def train_folds(cfg: dict, folds: list[int], resume: bool, deadline) -> None:
    """Train and predict `folds` in turn in this process (one start-up, one image load) under `deadline`."""
    from ..config import run_dir
    from ..console import console
    from ..predict.fold import predict_fold  # the command orchestrates; the library flows one way
    from .inputs import load_fold_data
    from .loop import train_fold

    data, last_fold_s = None, None
    for fold in folds:
        out = run_dir(cfg) / f"fold{fold}"
        if resume and finished(out):  # `RESUME=1 make train-all` skips the folds a killed call finished
            console.print(f"{out}: trained and predicted already; nothing to resume")
            continue
        deadline.check_fold(fold, last_fold_s)
        data = data or load_fold_data(cfg)
        t0 = time.monotonic()  # after the one image load: the next fold will not repeat it
        train_fold(cfg, fold, resume=resume, data=data, deadline=deadline)
        predict_fold(cfg, fold, data)
        last_fold_s = time.monotonic() - t0


def run_folds(cfg: dict, config: str | None, overrides: list[str], folds: list[int], resume: bool, deadline,
              gpus: list[str] | None) -> None:
    """In this process, or with `gpus` a process per fold on each GPU slot (train/parallel.py)."""
    from ..errors import WBCError

    if cfg["predict"].get("checkpoints"):
        raise WBCError(f"{cfg['name']}: predict.checkpoints is set, so this config only predicts "
                       f"with another run's models; use `make predict`")
    if gpus:
        from .parallel import train_folds_parallel

        train_folds_parallel(cfg, config, overrides, folds, gpus, resume, deadline)
    else:
        train_folds(cfg, folds, resume, deadline)


def train_bundle(configs: list[str], overrides: list[str], folds: list[int], resume: bool, deadline,
                 dest: Path, kill_after_s: float, gpus: list[str] | None = None) -> None:
    """Each config's folds in turn under one deadline, then every run that has a folder bundled into `dest`, also
    when training stopped early or failed. A backstop alarm `kill_after_s` after the deadline interrupts a training
    that overran it (on a lent machine the call's own limit would take the bundles with it)."""
    from ..bundle import bundle_run
    from ..config import load_config, run_dir
    from ..console import console
    from .deadline import DeadlineReached

    cfgs = [load_config(c, overrides) for c in configs]  # every config checked before any training

    def overran(signum, frame):
        raise DeadlineReached(f"still training {kill_after_s:.0f} s after the deadline: interrupted")

    previous = signal.signal(signal.SIGALRM, overran)
    signal.alarm(max(int(math.ceil(deadline.left() + kill_after_s)), 1))
    try:
        for config, cfg in zip(configs, cfgs):
            run_folds(cfg, config, overrides, folds, resume, deadline, gpus)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        for cfg in cfgs:
            if (run_dir(cfg) / "config.yaml").is_file():  # a run that got as far as starting a fold
                console.print(f"bundle: {bundle_run(run_dir(cfg), dest)}")


def register(sub) -> None:
    from ..cli_common import add_config_args, config_from_args
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
        from ..config import resolve_path
        from .deadline import Deadline

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
