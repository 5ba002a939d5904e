"""Torch dataset over cached uint8 images; augmentation is seeded per (seed, epoch, index).

Per-sample seeding makes a run independent of worker count and lets a resumed run draw exactly the
augmentations an uninterrupted one would.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class CellDataset(Dataset):
    def __init__(self, images: np.ndarray, targets=None, transform=None, seed: int = 0):
        self.images = images
        self.targets = None if targets is None else np.asarray(targets, dtype=np.int64)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = np.asarray(self.images[i])
        if self.transform is not None:
            self.transform.set_random_seed(int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0]))
            img = self.transform(image=img)["image"]
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))  # uint8 CHW
        y = -1 if self.targets is None else int(self.targets[i])
        return x, y


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 NCHW batch -> float, normalised, on whatever device x lives on."""
    mean = torch.as_tensor(mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1) * 255
    std = torch.as_tensor(std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1) * 255
    return (x.float() - mean) / std
