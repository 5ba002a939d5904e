"""Torch dataset over cached uint8 images; augmentation is seeded per (seed, epoch, index).

Per-sample seeding makes a run independent of worker count and lets a resumed run draw exactly the
augmentations an uninterrupted one would. `EpochTagged` sends `(epoch, index)` pairs through the loader, so
workers that serve a whole stage (`StageBatches`, one loader iterator per stage) still know each sample's epoch.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


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

    def __getitem__(self, i):
        epoch, i = i if isinstance(i, tuple) else (self.epoch, i)
        img = np.asarray(self.images[i])
        if self.transform is not None:
            s = int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0])
            if callable(getattr(self.transform, "set_random_seed", None)):
                self.transform.set_random_seed(s)
                img = self.transform(image=img)["image"]
            else:  # a multi-view transform (`DamageViews`): (V, H, W, 3)
                img = self.transform(img, s)
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(img, -1, -3)))  # uint8 CHW (or VCHW)
        y = -1 if self.targets is None else int(self.targets[i])
        return x, y


class EpochTagged(Sampler):
    """Yields `(epoch, index)`: the base sampler's draw, or a permutation seeded by (seed, epoch)."""

    def __init__(self, n: int, base=None, seed: int = 0):
        self.n, self.base, self.seed, self.epoch = n, base, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.base is not None:
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base) if self.base is not None else self.n

    def __iter__(self):
        if self.base is not None:
            order = list(self.base)
        else:
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
            order = torch.randperm(self.n, generator=g).tolist()
        return iter([(self.epoch, i) for i in order])


class StageBatches(Sampler):
    """Batches of `(epoch, index)` pairs for epochs `first`..`end - 1` of a training stage, as one stream.

    One loader iterator then serves the whole stage, so its workers prefetch the next epoch's batches while the
    main process validates, instead of each epoch starting on an empty queue (with short epochs on a GPU that
    wait is a large share of the epoch). Each epoch is `sampler`'s draw for it, cut into full batches; the draws
    are pure functions of (seed, epoch), so making them ahead of time changes nothing."""

    def __init__(self, sampler: EpochTagged, batch_size: int, first: int, end: int):
        self.sampler, self.batch_size, self.first, self.end = sampler, int(batch_size), int(first), int(end)
        self.per_epoch = len(sampler) // self.batch_size

    def __len__(self) -> int:
        return max(self.end - self.first, 0) * self.per_epoch

    def __iter__(self):
        for epoch in range(self.first, self.end):
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            for k in range(self.per_epoch):
                yield order[k * self.batch_size:(k + 1) * self.batch_size]
