"""A wall-clock deadline for time-boxed machines (a lent GPU, a notebook session with a time limit).

Mode `fold` (for a machine that is gone afterwards): training stops at an epoch's end, state saved, as soon as the
rest of the fold and its predictions would not finish in time, and a fold is not started when the last one took
longer than the time left; no time goes to a fold that cannot finish, and a `make bundle` after it still runs in
the time box. Mode `epoch` (for a RESUME=1 on the same disk: a warm machine, a notebook that keeps its outputs):
training goes on until the next epoch would not fit.
"""
from __future__ import annotations

import math
import time

EXIT_CODE = 75  # EX_TEMPFAIL: stopped on purpose, try again (RESUME=1) with more time
MODES = ("fold", "epoch")
clock = time.time  # a test replaces it


class DeadlineReached(Exception):
    """Training stopped at a clean point before the deadline; the CLI prints the message and exits EXIT_CODE."""


class Deadline:
    """`at`: Unix time (seconds) to be done by; None means no deadline. `mode`: `fold` or `epoch` (above)."""

    def __init__(self, at: float | None = None, mode: str = "fold"):
        if mode not in MODES:
            raise ValueError(f"deadline mode must be one of {MODES}, got '{mode}'")
        self.at, self.mode = at, mode

    def left(self) -> float:
        return math.inf if self.at is None else self.at - clock()

    def fits(self, need_s: float) -> bool:
        return need_s <= self.left()

    def check_fold(self, fold: int, last_fold_s: float | None) -> None:
        """Refuse to start `fold` when the fold before it in this process took longer than the time left."""
        if self.mode == "fold" and last_fold_s is not None and not self.fits(last_fold_s):
            raise DeadlineReached(f"fold {fold} not started: the last fold took {last_fold_s:.0f} s and "
                                  f"{max(self.left(), 0):.0f} s are left before the deadline")

    def must_stop(self, epoch_s: list[float], epochs_left: int, val_s_per_view: float,
                  n_predict_views: int) -> float | None:
        """After an epoch: the seconds still needed (the rest of the fold and its predictions, or in mode `epoch`
        the next epoch) when they exceed the time left, else None.

        `epoch_s` are this process's epoch times. The first one carries the start-up (loader workers, cuDNN
        autotuning) and is left out once there are others; on it alone, only a deadline already passed stops.
        """
        if epochs_left <= 0 or self.at is None:
            return None
        recent = (epoch_s[1:] or epoch_s)[-3:]
        per_epoch = sum(recent) / len(recent)
        need = per_epoch if self.mode == "epoch" else per_epoch * epochs_left + val_s_per_view * n_predict_views
        if self.left() <= 0 or (len(epoch_s) > 1 and not self.fits(need)):
            return need
        return None

    def reached(self, stopped: str, need: float, epochs_left: int) -> DeadlineReached:
        """The exception that ends a fold stopped for this deadline (`stopped`: where and after what), with what the
        rest would have needed."""
        what = ("the next epoch needs" if self.mode == "epoch" else
                f"the other {epochs_left} epochs and the predictions need")
        return DeadlineReached(f"{stopped}: {what} about {need:.0f} s, {max(self.left(), 0):.0f} s are left before "
                               "the deadline")
