"""Runs folds: each trained, then predicted, in this process or side by side in processes (`GPUS=`), under a
deadline for time-boxed machines; and `train-bundle`, several configs under one deadline, then bundled."""
from __future__ import annotations

import math
import signal
import time
from pathlib import Path

from ..core.config import load_config
from ..core.console import console
from ..core.errors import WBCError
from ..core.run_folder import finished, fold_dir, run_dir
from .deadline import Deadline, DeadlineReached
from .tracker import EpochLogger


def train_folds(cfg: dict, folds: list[int], resume: bool, deadline: Deadline) -> None:
    """Train and predict `folds` in turn in this process (one start-up, one image load) under `deadline`; under
    torchrun, each fold over all its processes, rank 0 alone writing (s3_train/distributed.py)."""
    from ..s3_train import distributed
    from ..s3_train.inputs import load_fold_data
    from ..s3_train.loop import train_fold
    from ..s4_predict.fold import predict_fold

    n = int(cfg["folds"]["n_folds"])
    outside = [f for f in folds if not 0 <= f < n]
    if outside:  # before any folder is made
        raise WBCError(f"--fold {outside[0]}: folds.n_folds is {n}, so the folds are 0-{n - 1}")
    data, last_fold_s = None, None
    for fold in folds:
        out = fold_dir(run_dir(cfg), fold)
        if resume and finished(out):  # `RESUME=1 make train-all` skips the folds a killed call finished
            console.print(f"{out}: trained and predicted already; nothing to resume")
            continue
        distributed.from_rank0(lambda: deadline.check_fold(fold, last_fold_s))
        data = data or distributed.rank0_first(lambda: load_fold_data(cfg))
        t0 = time.monotonic()  # after the one image load: the next fold will not repeat it
        log = EpochLogger(out) if cfg["train"]["tracker"] == "tensorboard" and distributed.is_main() else None
        try:
            train_fold(cfg, fold, on_epoch=log, resume=resume, data=data, deadline=deadline)
        finally:
            if log is not None:
                log.close()
        distributed.barrier()  # rank 0's checkpoints are on disk before any rank predicts with them
        predict_fold(cfg, fold, data)
        distributed.barrier()
        last_fold_s = time.monotonic() - t0


def run_folds(cfg: dict, config: str | None, overrides: list[str], folds: list[int], resume: bool,
              deadline: Deadline, gpus: list[str] | None) -> None:
    """In this process (one of torchrun's when it started several), or with `gpus` a process per fold on each GPU
    slot (parallel.py)."""
    if cfg["predict"]["checkpoints"]:
        raise WBCError(f"{cfg['name']}: predict.checkpoints is set, so this config only predicts "
                       f"with another run's models; use `make predict`")
    from ..core.runtime import pick_device
    from ..s3_train import distributed

    if gpus and distributed.launched_world() > 1:
        raise WBCError("GPUS= (a process per fold) and NPROC= (torchrun: one model over several processes) do not "
                       "mix: give one of them")
    if gpus:
        from .parallel import train_folds_parallel

        train_folds_parallel(cfg, config, overrides, folds, gpus, resume, deadline)
    else:
        with distributed.process_group(cfg, pick_device(cfg)):
            train_folds(cfg, folds, resume, deadline)


def train_bundle(configs: list[str], overrides: list[str], folds: list[int], resume: bool, deadline: Deadline,
                 dest: Path, kill_after_s: float, gpus: list[str] | None = None) -> None:
    """Each config's folds in turn under one deadline, then every run that has a folder bundled into `dest`, also
    when training stopped early or failed. A backstop alarm `kill_after_s` after the deadline interrupts a training
    that overran it (on a lent machine the call's own limit would take the bundles with it)."""
    from ..s3_train.distributed import launched_world
    from .bundle import bundle_run

    if launched_world() > 1:
        raise WBCError("train-bundle runs in one process: NPROC= (torchrun) is for train-fold / train-all")
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
