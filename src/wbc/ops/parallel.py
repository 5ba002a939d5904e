"""Folds trained side by side, one `wbc train-fold` process per GPU slot (`make train-all GPUS="0 1 2 3"`).

A slot is a `CUDA_VISIBLE_DEVICES` value; name a GPU twice to train two folds on it at once (a small model leaves an
H100 half idle). Each slot takes the next queued fold when its last one ends. Every fold is its own process with its
own log, `outputs/<name>/logs/fold<k>.log`, so one fold that fails does not stop the others; the summary names it.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core.config import display_path
from ..core.console import console, print_table, progress
from ..core.errors import WBCError
from ..core.io import write_json
from ..core.run_folder import finished, fold_dir, read_metrics, run_dir
from .deadline import EXIT_CODE, DeadlineReached

TERMINATE_GRACE_S = 20  # a child stopped mid-epoch gets this long to exit before it is killed


@dataclass
class FoldJob:
    fold: int
    log: Path
    slot: str | None = None  # its CUDA_VISIBLE_DEVICES
    slot_i: int | None = field(default=None, repr=False)  # which slot (a GPU named twice is two slots)
    status: str = "queued"  # queued, running, done, stopped (deadline), failed, interrupted, not started, skipped
    rc: int | None = None
    seconds: float | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)
    t0: float = field(default=0.0, repr=False)


def _command(config: str | None, overrides: list[str], fold: int, resume: bool, deadline) -> list[str]:
    cmd = [sys.executable, "-m", "wbc", "train-fold", "--fold", str(fold)]
    cmd += ["-c", str(config)] if config else []
    cmd += ["--resume"] if resume else []
    if deadline.at is not None:
        cmd += ["--time-limit", f"{max(deadline.left(), 0):.0f}", "--deadline-mode", deadline.mode]
    return cmd + list(overrides)


def _epochs_logged(fold_out: Path) -> tuple[int, float | None]:
    """Epochs in metrics.jsonl and the last validation macro-F1 (for the progress bar)."""
    rows = read_metrics(fold_out)
    return len(rows), (rows[-1].get("val_macro_f1") if rows else None)


def _stop(jobs: list[FoldJob]) -> None:
    """Interrupt running folds (their state is saved each epoch, so RESUME=1 continues them) and wait for them."""
    running = [j for j in jobs if j.status == "running"]
    for j in running:
        with contextlib.suppress(ProcessLookupError):
            j.proc.send_signal(signal.SIGINT)
    for j in running:
        try:
            j.proc.wait(TERMINATE_GRACE_S)
        except subprocess.TimeoutExpired:
            j.proc.kill()
            j.proc.wait()
        j.status, j.rc, j.seconds = "interrupted", j.proc.returncode, time.monotonic() - j.t0


def train_folds_parallel(cfg: dict, config: str | None, overrides: list[str], folds: list[int], slots: list[str],
                         resume: bool, deadline, poll_s: float = 1.0) -> list[FoldJob]:
    """Train and predict `folds` on `slots`, a process per fold; raise if any fold failed or stopped early."""
    from ..s3_train.inputs import load_fold_data

    out = run_dir(cfg)
    jobs = [FoldJob(k, out / "logs" / f"fold{k}.log") for k in folds]
    for j in jobs:
        if resume and finished(fold_dir(out, j.fold)):
            j.status = "skipped"
            console.print(f"{fold_dir(out, j.fold)}: trained and predicted already; nothing to resume")
    if all(j.status == "skipped" for j in jobs):
        return jobs
    import torch

    if not torch.cuda.is_available():  # CUDA_VISIBLE_DEVICES then picks nothing: every fold shares the CPU
        console.print("[yellow]warning:[/] no CUDA GPU visible: the folds train side by side on the CPU")
    load_fold_data(cfg)  # builds the image caches once, before several processes would each build them
    queue = [j for j in jobs if j.status == "queued"]
    free = {i: None for i in range(len(slots))}  # idle slot -> seconds its last fold took (None: none yet)
    stage2 = cfg["train"]["stage2"]["epochs"] or 0
    total_epochs = cfg["train"]["epochs"] + stage2
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RESUME", None)  # the parent's choice travels as --resume
    with progress(transient=False) as bar, _term_raises():
        tasks = {}
        try:
            while queue or any(j.status == "running" for j in jobs):
                for j in [j for j in jobs if j.status == "running" and j.proc.poll() is not None]:
                    j.rc, j.seconds = j.proc.returncode, time.monotonic() - j.t0
                    j.status = {0: "done", EXIT_CODE: "stopped (deadline)"}.get(j.rc, "failed")
                    free[j.slot_i] = j.seconds
                    console.print(f"fold {j.fold} on GPU {j.slot}: {j.status} after {j.seconds:.0f} s"
                                  + ("" if j.rc == 0 else f" (exit {j.rc}; {display_path(j.log)})"))
                for i in sorted(free):
                    if not queue:
                        break
                    slot, last_s = slots[i], free[i]
                    if deadline.left() <= 0 or (deadline.mode == "fold" and last_s is not None
                                                and not deadline.fits(last_s)):
                        for j in queue:
                            j.status = "not started"
                        queue = []
                        break
                    j = queue.pop(0)
                    j.log.parent.mkdir(parents=True, exist_ok=True)
                    with open(j.log, "a") as log:
                        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} fold {j.fold} on "
                                  f"CUDA_VISIBLE_DEVICES={slot} ===\n")
                        log.flush()
                        j.proc = subprocess.Popen(_command(config, overrides, j.fold, resume, deadline), env={
                            **env, "CUDA_VISIBLE_DEVICES": slot}, stdout=log, stderr=subprocess.STDOUT)
                        j.slot, j.slot_i, j.status, j.t0 = slot, i, "running", time.monotonic()
                    del free[i]
                    tasks[j.fold] = bar.add_task(f"fold {j.fold} [GPU {slot}]", total=total_epochs, info="")
                    console.print(f"fold {j.fold} on GPU {slot}: started (log {display_path(j.log)})")
                for j in jobs:
                    if j.fold in tasks and j.status == "running":  # an ended fold's file no longer changes
                        n, f1 = _epochs_logged(fold_dir(out, j.fold))
                        bar.update(tasks[j.fold], completed=n, info="" if f1 is None else f"val F1 {f1:.3f}")
                time.sleep(poll_s)
        except BaseException:  # Ctrl-C, SIGTERM or train-bundle's backstop alarm: no fold left running unattended
            _stop(jobs)
            _save(out, jobs)
            raise
    _report(out, jobs)
    return jobs


@contextlib.contextmanager
def _term_raises():
    """SIGTERM (`kill`, `timeout`, a notebook's stop) as an exception, so the folds are stopped rather than left."""
    def raise_exit(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, raise_exit)
    except ValueError:  # not the main thread: signals stay as they are
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _save(out: Path, jobs: list[FoldJob]) -> None:
    write_json(out / "parallel_train.json", [{"fold": j.fold, "gpu": j.slot, "status": j.status, "exit": j.rc,
                                              "seconds": j.seconds, "log": str(j.log) if j.slot else None}
                                             for j in jobs])


def _report(out: Path, jobs: list[FoldJob]) -> None:
    rows = [[j.fold, j.slot or "-", j.status, "-" if j.seconds is None else f"{j.seconds / 60:.1f}",
             display_path(j.log) if j.slot else "-"] for j in jobs]
    print_table(f"{out.name}: folds in parallel", ["fold", "GPU", "status", "minutes", "log"], rows)
    _save(out, jobs)
    failed = [j for j in jobs if j.status == "failed"]
    for j in failed:
        console.print(f"[red]fold {j.fold}[/] ({display_path(j.log)}), last lines:")
        console.print("\n".join(j.log.read_text(errors="replace").splitlines()[-5:]), highlight=False, markup=False)
    if failed:
        raise WBCError(f"{out.name}: fold(s) {', '.join(str(j.fold) for j in failed)} failed; their logs are "
                       f"under {display_path(out / 'logs')}")
    late = [j.fold for j in jobs if j.status in ("stopped (deadline)", "not started")]
    if late:
        raise DeadlineReached(f"{out.name}: fold(s) {', '.join(map(str, late))} did not finish before the "
                              f"deadline; RESUME=1 continues them")
