"""Class-balanced batches for contrastive training: P classes x K images each.

Classes are visited in shuffled rounds so every class (rare ones included) appears equally often, and each
chosen class contributes K images: without replacement when it has at least K, with replacement otherwise.
So every image in a batch has K-1 positives whatever the class frequency.
"""
from __future__ import annotations

import numpy as np

from ...core.errors import WBCError


class ClassBalancedBatchSampler:
    """Yields lists of row indices; use as `DataLoader(batch_sampler=...)`. Each iteration is one epoch."""

    def __init__(self, targets, classes_per_batch: int, samples_per_class: int, steps: int | None = None,
                 seed: int = 0):
        self.targets = np.asarray(targets)
        self.by_class = [np.flatnonzero(self.targets == c) for c in np.unique(self.targets)]
        if samples_per_class < 2:
            raise WBCError("embed.samples_per_class must be >= 2 so every image has a positive")
        if not self.by_class:
            raise WBCError("class-balanced sampler: no training images")
        self.p = min(int(classes_per_batch), len(self.by_class))
        self.k = int(samples_per_class)
        self.steps = int(steps) if steps else max(1, int(np.ceil(len(self.targets) / (self.p * self.k))))
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        queue: list[int] = []
        for _ in range(self.steps):
            chosen: list[int] = []
            while len(chosen) < self.p:
                if not queue:
                    queue = list(self.rng.permutation(len(self.by_class)))
                c = queue.pop()
                if c in chosen:  # a new round can repeat a class just taken; defer it
                    queue.insert(0, c)
                    continue
                chosen.append(c)
            batch = []
            for c in chosen:
                idx = self.by_class[c]
                batch.extend(self.rng.choice(idx, self.k, replace=len(idx) < self.k).tolist())
            yield batch
