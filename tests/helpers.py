"""Helpers shared by the test modules (fixtures live in conftest.py)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def write_folds(cfg: dict) -> dict:
    """Write `cfg`'s folds file and class declaration (as `make folds` does) and return `cfg`."""
    from wbc.s2_folds.folds import write_folds as write

    write(cfg)
    return cfg


def edit_csv(path, fn) -> None:
    """Rewrite a label file through `fn(DataFrame) -> DataFrame`, every cell kept as text."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    fn(df).to_csv(path, index=False)


def peaked(rng: np.random.Generator, y, n_cls: int, peak: float) -> np.ndarray:
    """Probability rows with `peak` on each row's class `y` and the rest spread at random."""
    p = rng.dirichlet(np.ones(n_cls), len(y)) * (1 - peak)
    p[np.arange(len(y)), y] += peak
    return p


def make(*args) -> subprocess.CompletedProcess:
    """`make -s <args>` in the repository, without the caller's data root or make state."""
    env = {k: v for k, v in os.environ.items() if k not in ("WBC_DATA", "MAKEFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True, env=env)


def kill_at_save(monkeypatch, n: int, name: str | None = None):
    """Make the n-th state save through `core.checkpoint` (of files called `name`, or any) raise KeyboardInterrupt, as
    a kill there would; returns the real saver to put back."""
    from wbc.core import checkpoint

    real, saves = checkpoint.torch_save, []

    def killed(path, obj):
        if name is None or Path(path).name == name:
            saves.append(path)
            if len(saves) == n:
                raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(checkpoint, "torch_save", killed)
    return real
