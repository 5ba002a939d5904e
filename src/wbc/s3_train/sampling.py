"""Class-rebalancing samplers: draw training images so that p(class) follows a chosen law of its count n.

`kind` (config `train.sampler.type`) -> p(class c):
- `none`: ~ n (the natural distribution; no sampler is built),
- `sqrt`: ~ n^0.5, `power`: ~ n^power (0 = balanced, 1 = natural),
- `balanced`: uniform over the classes present,
- `effective`: ~ E_n = (1 - beta^n) / (1 - beta) (Cui et al. 2019): natural for rare classes, head
  classes capped at 1 / (1 - beta) images' worth.
Within a class every image is equally likely; classes without images get nothing.

The sampler draws with replacement from a generator seeded by (seed, epoch): call `set_epoch(epoch)`
before each epoch (as with DistributedSampler), and a resumed run draws the same indices as an
uninterrupted one.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from ..core.config import section
from ..core.errors import WBCError

SAMPLER_KINDS = ("none", "sqrt", "power", "balanced", "effective")


def class_sampling_weights(labels, n_classes: int, kind: str, power: float = 0.5, beta: float = 0.999) -> np.ndarray:
    """Per-sample probabilities (sum 1) giving each class the mass of its law above."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise WBCError(f"sampler labels must be a non-empty 1-D array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= n_classes:
        raise WBCError(f"sampler labels must be integers in [0, {n_classes}), got range {labels.min()}..{labels.max()}")
    n = np.bincount(labels, minlength=n_classes).astype(np.float64)
    if kind == "none":
        mass = n
    elif kind == "sqrt":
        mass = n ** 0.5
    elif kind == "power":
        mass = n ** float(power)
    elif kind == "balanced":
        mass = np.ones_like(n)
    elif kind == "effective":
        if not 0.0 < beta < 1.0:
            raise WBCError(f"sampler beta must be in (0, 1), got {beta}")
        mass = -np.expm1(n * np.log(beta)) / (1.0 - beta)
    else:
        raise WBCError(f"unknown sampler type '{kind}' (choose from {', '.join(SAMPLER_KINDS)})")
    mass = np.where(n > 0, mass, 0.0)
    w = (mass / mass.sum() / np.maximum(n, 1.0))[labels]
    return w / w.sum()


def sampled_class_mix(labels, n_classes: int, cfg_sampler: dict) -> np.ndarray:
    """The class mix (sum 1) the sampler `cfg_sampler` draws from training labels `labels`: what the training batches
    looked like, hence what a BatchNorm layer's running statistics were averaged over."""
    labels, c = np.asarray(labels), section("train.sampler", cfg_sampler)
    w = class_sampling_weights(labels, n_classes, c["type"] or "none", power=c["power"], beta=c["beta"])
    return np.bincount(labels, weights=w, minlength=n_classes)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed mixing (seed, epoch) so nearby pairs give unrelated streams."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class EpochWeightedSampler(WeightedRandomSampler):
    """WeightedRandomSampler whose draw is a pure function of (weights, num_samples, seed, epoch)."""

    def __init__(self, weights, num_samples: int, seed: int = 0):
        super().__init__(torch.as_tensor(np.asarray(weights), dtype=torch.float64), int(num_samples),
                         replacement=True)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        # Drawn eagerly with a fresh generator: iterators created earlier cannot shift this epoch's draw.
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return iter(torch.multinomial(self.weights, self.num_samples, True, generator=g).tolist())


def build_sampler(labels, n_classes: int, cfg_sampler: dict, num_samples: int | None = None,
                  seed: int = 0) -> EpochWeightedSampler | None:
    """The `train.sampler` config section as a sampler; None for `none` (plain shuffling).

    One epoch is `num_samples` draws, by default the dataset length.
    """
    c = section("train.sampler", cfg_sampler)
    kind = c["type"] or "none"
    weights = class_sampling_weights(labels, n_classes, kind, power=c["power"], beta=c["beta"])
    if kind == "none":
        return None
    return EpochWeightedSampler(weights, len(weights) if num_samples is None else num_samples, seed=seed)
