"""Test-time BatchNorm adaptation (AdaBN; Schneider et al. 2020, "Improving robustness against common
corruptions by covariate shift adaptation").

Noise, blur and lighting shift the statistics of every BatchNorm layer's input. Re-estimating them on the
unlabelled split being predicted, mixed with the training statistics,

    mean = (1 - alpha) * mean_train + alpha * mean_split      (and the same for the variance),

re-centres the features without any label or gradient. `alpha` is `predict.adapt_bn` (0 = off, 1 = the
split's statistics only). Models without BatchNorm (ConvNeXt, Swin: LayerNorm) are refused, not silently
left as they were.

Label shift guard (`predict.adapt_bn_guard: balance`): batch statistics average over the split's class mix, and a mix
unlike the training batches' (a long-tailed test set against square-root-sampled training, or another lab's
differential) moves them as much as the stain does; adaptation then hurts (Niu et al. 2024, arXiv 2402.04958). The
guard pseudo-labels the split with the unadapted model and draws the images the statistics are averaged over so
that their class mix is the one the training sampler drew (each image weighted by its class's training share over
its predicted share, capped), then records both mixes.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..core.console import console, progress
from ..core.errors import WBCError
from ..models.inference import autocast, normalize, predict_probs


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


GUARDS = ("balance", "none")
MAX_WEIGHT = 10.0  # an image stands for at most 10 of its predicted class's share: a class the unadapted model
                   # barely predicts is not blown up from a handful of (possibly wrong) pseudo-labels


def balancing_weights(pseudo: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image draw weights (sum 1) that give predicted classes `pseudo` the class mix `target`."""
    n_cls = len(target)
    have = np.bincount(pseudo, minlength=n_cls) / len(pseudo)
    ratio = np.divide(target, have, out=np.zeros(n_cls), where=have > 0)
    present = ratio > 0
    ratio = np.clip(ratio / ratio[present].min(), 0, MAX_WEIGHT) if present.any() else np.ones(n_cls)
    w = ratio[pseudo]
    return w / w.sum() if w.sum() > 0 else np.full(len(pseudo), 1 / len(pseudo))


def _systematic(weights, rng) -> np.ndarray:
    """N indices drawn by `weights` with systematic resampling: each image appears within one of N x its weight
    times, so the statistics' class mix is the target's, not a noisy draw of it."""
    n = len(weights)
    edges = np.cumsum(weights)
    edges[-1] = 1.0
    return np.searchsorted(edges, (rng.random() + np.arange(n)) / n, side="right")


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, images, alpha: float, device, mean, std, batch_size: int = 128,
                    amp: str = "none", seed: int = 0, desc: str = "adapt BN", draw_weights=None) -> nn.Module:
    """A copy of `model` (in eval mode) whose BatchNorm statistics mix its own with those of `images`
    (uint8 N x H x W x 3, as `predict_probs` takes them). `draw_weights` (sum 1): the statistics average over N
    images drawn with replacement by these weights instead of each image once. `model` itself is not changed."""
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
    rng = np.random.default_rng(seed)
    order = rng.permutation(n if draw_weights is None else _systematic(draw_weights, rng))
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


def adapt(model: nn.Module, images, cfg: dict, seed: int, desc: str, prior=None, **predict_kw) -> nn.Module:
    """`predict.adapt_bn` at the `predict_adapt` hook point: the model adapted to the images it will predict.
    `prior`: the class mix of the batches the model trained on (`sampling.sampled_class_mix`), for the guard."""
    p = cfg["predict"]
    guard = p.get("adapt_bn_guard") or "none"
    weights = None
    if guard == "balance":
        if prior is None:
            console.print(f"[yellow]warning:[/] {desc}: adapt_bn_guard=balance needs the training class mix (the "
                          "run's folds file); adapting without it")
        else:
            plain = predict_probs(model, images, desc=f"{desc}: pseudo-labels", **{**predict_kw, "tta": 1,
                                                                                   "color_tta": 1})
            pseudo = plain.argmax(1)
            weights = balancing_weights(pseudo, np.asarray(prior, dtype=float) / np.sum(prior))
            have = np.bincount(pseudo, minlength=len(prior)) / len(pseudo)
            console.print(f"{desc}: BN statistics re-weighted from the predicted class mix "
                          f"[{' '.join(f'{v:.2f}' for v in have)}] to the training batches' "
                          f"[{' '.join(f'{v:.2f}' for v in np.asarray(prior) / np.sum(prior))}]", highlight=False)
    return adapt_batchnorm(model, images, float(p["adapt_bn"]), seed=seed, desc=f"{desc}: adapt BN",
                           device=predict_kw["device"], mean=predict_kw["mean"], std=predict_kw["std"],
                           batch_size=predict_kw["batch_size"], amp=predict_kw["amp"], draw_weights=weights)
