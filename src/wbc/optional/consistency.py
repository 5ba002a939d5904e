"""Damage-consistency training (AugMix-style, `train.consistency`, the `train_batch` hook point): each training image
comes as several views with fresh damage draws, and the loss adds the Jensen-Shannon divergence among the views'
predictions to the recipe's loss on view 0. Off by default: it did not help at CPU scale (docs/RESULTS.md)."""
from __future__ import annotations

import albumentations as A
import numpy as np
import torch

from ..core.errors import WBCError
from ..s1_data.augment import base_ops, damage_ops
from ..s3_train.step import BatchRule


class DamageViews:
    """Views for damage-consistency training: geometry and colour are drawn once per image; view 0 then gets the
    recipe's damage (at its chance), views 1.. each get a fresh draw of damage, always applied."""

    def __init__(self, cfg: dict, n_views: int):
        a, s = cfg["augment"], float(cfg["augment"]["strength"])
        if n_views < 2:
            raise WBCError(f"train.consistency.views must be >= 2, got {n_views}")
        if not damage_ops(a, s):
            raise WBCError("train.consistency needs the damage augmentation (augment.damage.p > 0)")
        self.n_views = int(n_views)
        self.base = A.Compose(base_ops(a, s))
        self.first = A.Compose(damage_ops(a, s))
        self.extra = A.Compose(damage_ops(a, s, p=1.0))

    def __call__(self, image: np.ndarray, seed: int) -> np.ndarray:
        """(n_views, H, W, 3) uint8; every draw follows from `seed`."""
        seeds = np.random.SeedSequence(seed).generate_state(self.n_views + 1)
        self.base.set_random_seed(int(seeds[0]))
        img = self.base(image=image)["image"]
        out = []
        for v in range(self.n_views):
            t = self.first if v == 0 else self.extra
            t.set_random_seed(int(seeds[v + 1]))
            out.append(t(image=img)["image"])
        return np.stack(out)


def js_consistency(logits: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence among the views' predictions, logits (B, V, C): the mean over views of
    KL(p_v || m), m the views' mean prediction (AugMix, Hendrycks et al. 2020), averaged over the batch."""
    p = logits.float().softmax(-1)
    log_m = p.mean(1, keepdim=True).clamp_min(1e-7).log()
    return (p * (p.clamp_min(1e-7).log() - log_m)).sum(-1).mean()


class ConsistencyRule(BatchRule):
    """The recipe's loss on view 0 plus `weight` times the views' Jensen-Shannon divergence."""

    def __init__(self, weight: float):
        self.weight = weight

    def loss(self, logits: torch.Tensor, y: torch.Tensor, loss_fn) -> torch.Tensor:
        logits = logits.float().view(len(y), logits.shape[0] // len(y), -1)
        return loss_fn(logits[:, 0], y) + self.weight * js_consistency(logits)


class ConsistencyHook:
    def __init__(self, cfg: dict):
        cons = cfg["train"]["consistency"]
        self.transform = DamageViews(cfg, int(cons["views"]))
        self._rule = ConsistencyRule(float(cons["weight"]))

    def rule(self, epoch: int) -> ConsistencyRule:
        return self._rule


def build(cfg: dict, class_counts, seed: int) -> ConsistencyHook:
    return ConsistencyHook(cfg)
