"""Mixup / CutMix on the device, with Remix's rebalanced labels for the long tail.

Each stage-1 batch is paired with itself reversed (timm's pairing, no extra randomness): image k is mixed with
image B-1-k, with one weight lam per batch.

- Mixup (Zhang et al. 2018): x~ = lam * x + (1 - lam) * x_rev, lam ~ Beta(a, a).
- CutMix (Yun et al. 2019): a box of x_rev covering a (1 - lam) share of the image is pasted over x; lam is then
  re-measured from the box after clipping to the image.
- Targets: lam_y * onehot(y) + (1 - lam_y) * onehot(y_rev), with lam_y = lam for plain mixing.
- Remix (Chou et al. 2020, `remix_kappa` > 1): when one image's class is at least kappa times as frequent as the
  other's and the rarer image holds more than 1 - tau of the mix, the target is the rarer class alone. The
  frequent class then stops winning every mixed label it shares with a rare one.

The draws come from a generator seeded by (seed, epoch), so a resumed run mixes exactly as the killed one would.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import WBCError
from ..s3_train.step import BatchRule

MIX_KEYS = ("mixup_alpha", "cutmix_alpha", "prob", "switch_prob", "remix_kappa", "remix_tau", "off_epochs")


def cutmix_box(h: int, w: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a box with area about (1 - lam) * h * w, centred uniformly, clipped to the image."""
    r = np.sqrt(1.0 - lam)
    ch, cw = int(h * r), int(w * r)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    return (int(np.clip(cy - ch // 2, 0, h)), int(np.clip(cy + ch // 2, 0, h)),
            int(np.clip(cx - cw // 2, 0, w)), int(np.clip(cx + cw // 2, 0, w)))


def mix_images(x: torch.Tensor, lam: float, box: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, float]:
    """Mix the batch (B, C, H, W) with its reverse: blend by `lam`, or paste `box` of the reverse (CutMix).

    Returns the mixed batch and the share of each image that is its own (lam, re-measured for a box)."""
    if box is None:
        return x * lam + x.flip(0) * (1.0 - lam), float(lam)
    y0, y1, x0, x1 = box
    out = x.clone()
    out[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
    return out, 1.0 - (y1 - y0) * (x1 - x0) / float(x.shape[-2] * x.shape[-1])


def count_tensor(class_counts, device) -> torch.Tensor:
    """Class counts as float32 on `device`, absent classes counted once (no division by zero)."""
    return torch.as_tensor(np.maximum(np.asarray(class_counts, dtype=np.float32), 1.0), device=device)


def label_weights(y: torch.Tensor, lam: float, class_counts, kappa: float = 0.0, tau: float = 0.5) -> torch.Tensor:
    """Per-sample weight of each image's own label (the rest goes to its partner's): lam, or Remix's 0 / 1.
    `class_counts` may already be a `count_tensor` on y's device."""
    lam_y = torch.full((len(y),), float(lam), device=y.device)
    if kappa > 1:
        n = class_counts if torch.is_tensor(class_counts) else count_tensor(class_counts, y.device)
        ratio = n[y] / n[y.flip(0)]  # own class count over partner's
        # torch.where, not boolean-mask assignment: no host-device sync
        lam_y = torch.where((ratio >= kappa) & (lam < tau), 0.0, lam_y)  # frequent self, rare partner holds > 1 - tau
        lam_y = torch.where((ratio <= 1.0 / kappa) & (1.0 - lam < tau), 1.0, lam_y)  # rare self holds > 1 - tau
    return lam_y


def mix_targets(y: torch.Tensor, lam_y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Soft targets (B, C): lam_y * onehot(y) + (1 - lam_y) * onehot(y reversed)."""
    oh = F.one_hot(y.long(), n_classes).float()
    w = lam_y.float()[:, None]
    return w * oh + (1.0 - w) * oh.flip(0)


class Mixer(BatchRule):
    """One epoch's batch mixing: call it on (normalised images, labels) to get (mixed images, soft targets); the
    recipe's loss takes soft targets as they are."""

    def __init__(self, mix: dict, class_counts, seed: int, epoch: int):
        self.mixup_alpha = float(mix.get("mixup_alpha", 0.0) or 0.0)
        self.cutmix_alpha = float(mix.get("cutmix_alpha", 0.0) or 0.0)
        self.prob = float(mix.get("prob", 1.0))
        self.switch_prob = float(mix.get("switch_prob", 0.5))
        self.kappa = float(mix.get("remix_kappa", 0.0) or 0.0)
        self.tau = float(mix.get("remix_tau", 0.5))
        self.counts = np.asarray(class_counts)
        self._counts_on = None
        self.rng = np.random.default_rng([int(seed), int(epoch), 0x6D6978])

    def inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(x, y)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_cls = len(self.counts)
        if self.rng.random() >= self.prob:
            return x, F.one_hot(y.long(), n_cls).float()
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or self.rng.random() < self.switch_prob)
        if use_cutmix:
            lam = float(self.rng.beta(self.cutmix_alpha, self.cutmix_alpha))
            x, lam = mix_images(x, lam, cutmix_box(x.shape[-2], x.shape[-1], lam, self.rng))
        else:
            x, lam = mix_images(x, float(self.rng.beta(self.mixup_alpha, self.mixup_alpha)))
        if self.kappa > 1 and (self._counts_on is None or self._counts_on.device != y.device):
            self._counts_on = count_tensor(self.counts, y.device)  # once: a host-to-device copy syncs
        return x, mix_targets(y, label_weights(y, lam, self._counts_on, self.kappa, self.tau), n_cls)


def build_mixer(t: dict, class_counts, seed: int, epoch: int) -> Mixer | None:
    """The `train.mix` section as this stage-1 epoch's Mixer, or None when mixing is off for it.

    Off when both alphas are 0, or in the last `off_epochs` epochs of stage 1."""
    mix = t.get("mix") or {}
    unknown = set(mix) - set(MIX_KEYS)
    if unknown:
        raise WBCError(f"unknown train.mix key(s) {sorted(unknown)} (known: {', '.join(MIX_KEYS)})")
    alphas = float(mix.get("mixup_alpha", 0.0) or 0.0), float(mix.get("cutmix_alpha", 0.0) or 0.0)
    if min(alphas) < 0:
        raise WBCError(f"train.mix alphas must be >= 0, got mixup_alpha {alphas[0]}, cutmix_alpha {alphas[1]}")
    if max(alphas) == 0:
        return None
    kappa = float(mix.get("remix_kappa", 0.0) or 0.0)
    if kappa and kappa <= 1:
        raise WBCError(f"train.mix.remix_kappa must be > 1 (or 0 for plain labels), got {kappa}")
    if epoch >= int(t["epochs"]) - int(mix.get("off_epochs", 0) or 0):
        return None
    return Mixer(mix, class_counts, seed, epoch)


class MixHook:
    """`train.mix` at the `train_batch` hook point: the recipe's transform, and each stage-1 epoch's Mixer."""
    transform = None

    def __init__(self, cfg: dict, class_counts, seed: int):
        self.t, self.counts, self.seed = cfg["train"], class_counts, seed
        build_mixer(self.t, class_counts, seed, 0)  # the section's errors before any training

    def rule(self, epoch: int) -> Mixer | None:
        return build_mixer(self.t, self.counts, self.seed, epoch)


def build(cfg: dict, class_counts, seed: int) -> MixHook:
    return MixHook(cfg, class_counts, seed)
