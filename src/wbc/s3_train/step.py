"""One training step and one epoch of them, with no host-device synchronisation per step.

An optional step plugged into the `train_batch` hook point (`wbc.core.hooks`: Mixup / CutMix, damage consistency)
changes a stage-1 batch through a `BatchRule`: the inputs before the forward pass, the loss after it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.console import progress
from ..models.inference import autocast, normalize

LOSS_SHOW_EVERY = 25  # steps between running-loss updates on the progress bar


class BatchRule:
    """How an optional step changes one epoch's stage-1 batches; this base changes nothing."""

    def inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images (views flattened into the batch) and their labels, before the forward pass."""
        return x, y

    def loss(self, logits: torch.Tensor, y: torch.Tensor, loss_fn) -> torch.Tensor:
        return loss_fn(logits.float(), y)


@dataclass
class StepContext:
    """What every step of a stage uses."""
    fwd: torch.nn.Module  # the model, or its compiled graph
    model: torch.nn.Module
    ema: object | None  # stage 1 only
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    device: torch.device
    norm: dict  # the model's input mean / std
    amp: str
    channels_last: bool
    grad_clip: float
    stage: int
    rule: BatchRule | None = None  # this epoch's optional batch rule (stage 1)


def train_epoch(ctx: StepContext, batches, n_batches: int, desc: str) -> dict:
    """One pass over `batches`: {"loss" (mean per image), "n" (images), "grad_norm" (mean pre-clip norm over the
    steps with a finite one), "grad_norm_max", "nonfinite_steps"}. Sums stay on the device and are read once at the
    end, so a step costs no host-device sync."""
    model, device = ctx.model, ctx.device
    model.train()
    if ctx.stage == 2:  # frozen backbone: BN statistics stay as trained
        model.eval()
        model.get_classifier().train()
    # float64 as the Python float it replaces, so logged losses stay bit for bit (MPS has no float64)
    acc = torch.float32 if device.type == "mps" else torch.float64
    total, n, step = torch.zeros((), dtype=acc, device=device), 0, 0
    gsum, gmax, bad = (torch.zeros((), dtype=acc, device=device) for _ in range(3))
    with progress() as bar:
        task = bar.add_task(desc, total=n_batches, info="")
        for x, y in batches:
            loss, gnorm = train_step(ctx, x, y)
            total = total + loss.detach().to(total.dtype) * len(y)  # on the device: no host-device sync per step
            gnorm = gnorm.to(acc)
            finite = torch.isfinite(gnorm)
            gsum = gsum + torch.where(finite, gnorm, 0.0)
            gmax = torch.maximum(gmax, torch.where(finite, gnorm, 0.0))
            bad = bad + (~finite).to(acc)
            n += len(y)
            step += 1
            if step % LOSS_SHOW_EVERY == 0 and not bar.disable:  # the running loss costs a sync: shown now and then
                bar.update(task, info=f"loss {total.item() / n:.4f}")
            bar.update(task, advance=1)
    total, gsum, gmax, bad = (float(v) for v in torch.stack([total, gsum, gmax, bad]).cpu())  # one sync
    return {"loss": total / max(n, 1), "n": n, "grad_norm": gsum / max(step - bad, 1), "grad_norm_max": gmax,
            "nonfinite_steps": int(bad)}


def train_step(ctx: StepContext, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a loader batch (uint8 images, integer labels); returns the loss and the gradients'
    total norm before clipping (both on the device)."""
    loss = batch_loss(ctx, x, y)
    ctx.opt.zero_grad(set_to_none=True)
    ctx.scaler.scale(loss).backward()
    ctx.scaler.unscale_(ctx.opt)  # a no-op unless fp16: the norm below is the true one
    params = [p for g in ctx.opt.param_groups for p in g["params"]]
    if ctx.grad_clip:
        gnorm = torch.nn.utils.clip_grad_norm_(params, float(ctx.grad_clip))
    else:
        gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    ctx.scaler.step(ctx.opt)
    ctx.scaler.update()
    ctx.sched.step()
    if ctx.ema is not None:
        ctx.ema.update(ctx.model, step=ctx.sched.last_epoch)  # stage-1 optimizer steps so far; resumes with sched
    return loss, gnorm


def batch_loss(ctx: StepContext, x, y) -> torch.Tensor:
    """The training loss of a loader batch: to the device, normalised, the batch rule's inputs, forward (autocast),
    the rule's loss. A multi-view transform gives (B, V, C, H, W) batches: stage 1 passes every view through the
    network, stage 2 re-trains the head on view 0, the recipe's own augmentation."""
    n_views = x.shape[1] if x.ndim == 5 else 0
    if n_views and ctx.stage == 2:
        x, n_views = x[:, 0], 0
    x = x.to(ctx.device, non_blocking=True)
    x = normalize(x.flatten(0, 1) if n_views else x, ctx.norm["mean"], ctx.norm["std"])
    y = y.to(ctx.device, non_blocking=True)
    rule = ctx.rule if ctx.stage == 1 else None
    if rule is not None:
        x, y = rule.inputs(x, y)
    if ctx.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(ctx.device, ctx.amp):
        if ctx.stage == 2:
            with torch.no_grad():
                feats = ctx.model.forward_head(ctx.model.forward_features(x), pre_logits=True)
            logits = ctx.model.get_classifier()(feats.float())
        else:
            logits = ctx.fwd(x)
    return rule.loss(logits, y, ctx.loss_fn) if rule is not None else ctx.loss_fn(logits.float(), y)
