"""(damaged, clean) training pairs made on the fly from clean images with the shared damage simulator.

Damage is applied to the whole image before cropping: the simulator scales blur radii and vignettes with
the image size, so damaging a crop would describe a different (milder) world than the test images.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ...s1_data.damage import damage


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NxHxWx3 (or HxWx3) -> float NCHW (or CHW) in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)
    return t.permute(0, 3, 1, 2) if t.ndim == 4 else t.permute(2, 0, 1)


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NxHxWx3."""
    x = (t.detach().float().clamp(-1, 1) + 1.0) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class PairDataset(Dataset):
    """Item i -> (damaged, clean) CHW float tensors in [-1, 1].

    Each item draws a severity in 1..max_severity, a composite damage, a crop and a dihedral flip from a
    generator seeded by (seed, epoch, i), so an epoch is repeatable whatever the worker count.
    """

    def __init__(self, images: np.ndarray, crop: int | None = None, max_severity: int = 3, seed: int = 0,
                 kinds=None):
        self.images = images
        self.crop = crop
        self.max_severity = int(max_severity)
        self.seed = int(seed)
        self.kinds = kinds
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        rng = np.random.default_rng((self.seed, self.epoch, int(i)))
        clean = np.asarray(self.images[i])
        sev = int(rng.integers(1, self.max_severity + 1))
        dmg = damage(clean, sev, rng, kinds=self.kinds)
        h, w = clean.shape[:2]
        if self.crop and (h > self.crop or w > self.crop):
            y, x = int(rng.integers(0, h - self.crop + 1)), int(rng.integers(0, w - self.crop + 1))
            clean, dmg = (a[y:y + self.crop, x:x + self.crop] for a in (clean, dmg))
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        clean, dmg = (np.rot90(a[:, ::-1] if flip else a, k) for a in (clean, dmg))
        return to_tensor(dmg), to_tensor(clean)


def simulate(images: np.ndarray, severity: int, seed: int, kinds=None) -> np.ndarray:
    """Deterministic damaged copies of `images` at one severity (held-out evaluation, QA sheets).

    Image i uses the same faults at every severity (only stronger), so per-severity numbers compare.
    """
    out = np.empty_like(images)
    for i, im in enumerate(images):
        out[i] = damage(np.asarray(im), severity, np.random.default_rng((seed, i)), kinds=kinds)
    return out
