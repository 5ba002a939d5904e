"""The training data loader: one iterator per stage, and a check that its workers' batches fit in shared memory."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..core.console import console

PREFETCH = 4  # batches in flight per loader worker


def make_loader(ds, batch_sampler, workers: int, device):
    # One iterator per stage (StageBatches): the epoch reaches the workers inside each (epoch, index) pair.
    return DataLoader(ds, batch_sampler=batch_sampler, num_workers=workers, pin_memory=device.type == "cuda",
                      prefetch_factor=PREFETCH if workers > 0 else None)


def stage_iterator(loader, draw_seed: bool):
    """iter(loader), letting it draw its base seed from the global torch RNG only when `draw_seed`.

    Every new iterator draws one, and on the CPU the same RNG draws the dropout and drop-path masks. An
    uninterrupted run makes one iterator per stage; a resumed run makes one more mid-stage, which must not
    draw, or its masks would differ from the uninterrupted run's."""
    if draw_seed:
        return iter(loader)
    state = torch.get_rng_state()
    batches = iter(loader)
    torch.set_rng_state(state)
    return batches


def check_shared_memory(workers: int, batch_bytes: int, shm: str = "/dev/shm") -> bool:
    """Warn when the workers' batches in flight may not fit in shared memory (containers often give /dev/shm
    64 MB), where they would die with a bus error mid-run. True when they fit or cannot be checked."""
    if workers <= 0 or not Path(shm).is_dir():
        return True
    need, free = 2 * workers * PREFETCH * batch_bytes, shutil.disk_usage(shm).free
    if free >= need:
        return True
    console.print(f"[yellow]warning:[/] {shm} has {free / 2**20:.0f} MiB free; {workers} loader workers with "
                  f"{PREFETCH} batches of {batch_bytes / 2**20:.1f} MiB in flight want about {need / 2**20:.0f} MiB: "
                  "lower train.num_workers or enlarge it")
    return False
