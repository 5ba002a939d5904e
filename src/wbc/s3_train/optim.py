"""Optimiser, learning-rate schedule, EMA and each training stage's loss and sampler."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..core.config import section
from ..s1_data.dataset import EpochTagged
from .losses import build_loss
from .sampling import build_sampler


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """LambdaLR factor: linear warm-up, then cosine decay to `min_ratio` of the peak."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def optimizer(params, lr: float, weight_decay: float, model=None):
    """AdamW; given the model, timm's grouping (no weight decay on norms and biases)."""
    import timm.optim

    if model is not None:
        return timm.optim.create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def stage_loss(t: dict, counts, stage: int, device, classes: list[str] | None = None) -> torch.nn.Module:
    """The stage's loss on `device` (its class weights and prior offset are buffers): the recipe's loss in stage 1,
    smoothed plain cross-entropy for stage 2's classifier re-training (with the recipe's smoothing, lineage too)."""
    loss = section("train.loss", t["loss"])
    cfg_loss = loss if stage == 1 else {"type": "ce", "label_smoothing": loss["label_smoothing"],
                                        "lineage": loss["lineage"], "lineage_share": loss["lineage_share"]}
    return build_loss(cfg_loss, counts, classes).to(device)


def build_ema(model, t: dict):
    """timm's ModelEmaV3 when `train.ema` is on, else None."""
    if not t["ema"]:
        return None
    from timm.utils import ModelEmaV3

    # Decay warm-up (1 - (1 + step)^-0.75, capped at ema_decay): without it the average keeps
    # ema_decay^steps of the initial weights, 21 % for a 60-epoch run of 13 steps an epoch at 0.998.
    return ModelEmaV3(model, decay=float(t["ema_decay"]), use_warmup=bool(t["ema_warmup"]), warmup_power=0.75)


@dataclass
class Stage:
    """What a training stage steps with: 1 trains the network, 2 re-trains a fresh classifier on the frozen
    backbone with balanced sampling (decoupled training)."""
    number: int
    sampler: EpochTagged
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    loss: torch.nn.Module


def build_stage(number: int, model, t: dict, y_tr: np.ndarray, counts, seed: int, steps_per_epoch: int,
                device, classes: list[str] | None = None) -> Stage:
    n_tr, n_cls = len(y_tr), len(counts)
    if number == 1:
        sampler = EpochTagged(n_tr, build_sampler(y_tr, n_cls, t["sampler"], seed=seed), seed)
        opt = optimizer(None, float(t["lr"]), float(t["weight_decay"]), model)
        total, warm, lr0 = (int(t["epochs"]) * steps_per_epoch, int(t["warmup_epochs"]) * steps_per_epoch,
                            float(t["lr"]))
    else:
        s2 = t["stage2"]
        sampler = EpochTagged(n_tr, build_sampler(y_tr, n_cls, {"type": s2["sampler"]}, seed=seed + 1), seed + 1)
        model.zero_grad(set_to_none=True)  # stale stage-1 grads must not reach clipping
        model.requires_grad_(False)
        model.reset_classifier(n_cls)
        model.get_classifier().to(device).requires_grad_(True)
        opt = optimizer(model.get_classifier().parameters(), float(s2["lr"]), 0.0)
        total, warm, lr0 = int(s2["epochs"]) * steps_per_epoch, 0, float(s2["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(total, 1), warm, float(t["min_lr"]) / lr0))
    return Stage(number, sampler, opt, sched, stage_loss(t, counts, number, device, classes))
