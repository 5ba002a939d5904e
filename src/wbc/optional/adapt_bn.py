"""Test-time BatchNorm adaptation (AdaBN; Schneider et al. 2020, "Improving robustness against common
corruptions by covariate shift adaptation").

Noise, blur and lighting shift the statistics of every BatchNorm layer's input. Re-estimating them on the
unlabelled split being predicted, mixed with the training statistics,

    mean = (1 - alpha) * mean_train + alpha * mean_split      (and the same for the variance),

re-centres the features without any label or gradient. `alpha` is `predict.adapt_bn` (0 = off, 1 = the
split's statistics only). Models without BatchNorm (ConvNeXt, Swin: LayerNorm) are refused, not silently
left as they were.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..core.console import progress
from ..core.errors import WBCError
from ..models.inference import autocast, normalize


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, images, alpha: float, device, mean, std, batch_size: int = 128,
                    amp: str = "none", seed: int = 0, desc: str = "adapt BN") -> nn.Module:
    """A copy of `model` (in eval mode) whose BatchNorm statistics mix its own with those of `images`
    (uint8 N x H x W x 3, as `predict_probs` takes them). `model` itself is not changed."""
    if not 0 < alpha <= 1:
        raise WBCError(f"predict.adapt_bn must be in (0, 1], got {alpha}")
    if not batchnorm_layers(model):
        raise WBCError(f"predict.adapt_bn: {type(model).__name__} has no BatchNorm layer to adapt")
    n = len(images)
    if n < 2:
        raise WBCError(f"predict.adapt_bn: {n} image(s) cannot give batch statistics")
    model = copy.deepcopy(model).eval()
    layers = batchnorm_layers(model)
    source = [(m.running_mean.clone(), m.running_var.clone(), m.momentum) for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over batches
        m.train()          # only the BatchNorm layers: dropout and drop-path stay off
    # Shuffled, near-equal batches: each batch mixes clean and damaged images, and the cumulative average
    # weights every batch alike. One view (the identity): rotations and flips barely move channel statistics.
    order = np.random.default_rng(seed).permutation(n)
    with progress() as bar:
        task = bar.add_task(desc, total=n, info="")
        for idx in np.array_split(order, -(-n // batch_size)):
            idx = np.sort(idx)
            x = torch.from_numpy(np.asarray(images[idx])).permute(0, 3, 1, 2)
            with autocast(device, amp):
                model(normalize(x.to(device), mean, std))
            bar.advance(task, len(idx))
    for m, (mu, var, momentum) in zip(layers, source):
        m.running_mean.mul_(alpha).add_(mu, alpha=1 - alpha)
        m.running_var.mul_(alpha).add_(var, alpha=1 - alpha)
        m.momentum = momentum
        m.eval()
    return model


def adapt(model: nn.Module, images, cfg: dict, seed: int, desc: str, **predict_kw) -> nn.Module:
    """`predict.adapt_bn` at the `predict_adapt` hook point: the model adapted to the images it will predict."""
    return adapt_batchnorm(model, images, float(cfg["predict"]["adapt_bn"]), seed=seed, desc=f"{desc}: adapt BN",
                           device=predict_kw["device"], mean=predict_kw["mean"], std=predict_kw["std"],
                           batch_size=predict_kw["batch_size"], amp=predict_kw["amp"])
