"""Embedding training (SigLIP / SupCon on class-balanced batches) and batched embedding export.

Inputs are either uint8 images (N, H, W, 3), augmented by `wbc.s1_data.augment` and normalised on the device
(backbone trained), or precomputed float features (N, F) of a frozen backbone (only the head trains).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ...core.checkpoint import load_state, save_state
from ...core.console import console, progress
from ...core.io import torch_save
from ...core.run_folder import read_metrics, write_metrics
from ...models.inference import autocast, normalize, view
from ...s1_data.dataset import CellDataset
from .sampler import ClassBalancedBatchSampler


def _param_groups(model: nn.Module, loss_fn: nn.Module, ecfg: dict) -> list[dict]:
    wd = float(ecfg["weight_decay"])
    groups = []
    if model.encoder is not None and any(p.requires_grad for p in model.encoder.parameters()):
        groups.append({"params": [p for p in model.encoder.parameters() if p.requires_grad],
                       "lr": float(ecfg["backbone_lr"]), "weight_decay": wd})
    head = list(model.head.parameters())
    groups.append({"params": [p for p in head if p.ndim > 1], "lr": float(ecfg["lr"]), "weight_decay": wd})
    groups.append({"params": [p for p in head if p.ndim <= 1], "lr": float(ecfg["lr"]), "weight_decay": 0.0})
    # SigLIP's t', b and the class embeddings: no weight decay (it would pull t towards 1 and b towards 0).
    groups.append({"params": list(loss_fn.parameters()), "lr": float(ecfg["lr"]), "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def _cosine(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))
    return f


def train_embedding(model: nn.Module, loss_fn: nn.Module, inputs, targets: np.ndarray, ecfg: dict,
                    device: torch.device, out_dir: Path, seed: int, transform=None, norm: dict | None = None,
                    amp: str = "none", desc: str = "embed", resume: bool = False) -> list[dict]:
    """Train `model` (an EmbeddingModel) for `ecfg['epochs']`; writes `embed.pt` (model + loss parameters,
    a plain state_dict), `metrics.jsonl` and `embed_state.pt` (optimizer, schedule, sampler and RNG states)
    after every epoch. With `resume`, training goes on after the last saved epoch, as if never stopped.
    `inputs` are images when `norm` is given."""
    images = norm is not None
    targets = np.asarray(targets, dtype=np.int64)
    ds = CellDataset(inputs, targets, transform, seed) if images else \
        TensorDataset(torch.as_tensor(np.asarray(inputs), dtype=torch.float32), torch.from_numpy(targets))
    sampler = ClassBalancedBatchSampler(targets, int(ecfg["classes_per_batch"]), int(ecfg["samples_per_class"]),
                                        ecfg.get("steps_per_epoch"), seed)
    epochs = int(ecfg["epochs"])
    model.to(device)
    loss_fn.to(device)
    opt = torch.optim.AdamW(_param_groups(model, loss_fn, ecfg))
    total = epochs * len(sampler)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(total, min(len(sampler), total // 10)))
    both = nn.ModuleDict({"model": model, "loss": loss_fn})
    workers = int(ecfg["num_workers"]) if images else 0
    history, start = [], 0
    state_file = out_dir / "embed_state.pt"
    if resume and state_file.exists():
        st = load_state(state_file, {"both": both, "opt": opt, "sched": sched})
        sampler.rng.bit_generator.state = json.loads(st["sampler_rng"])  # the batches draw on across epochs
        start = int(st["epoch"]) + 1
        history = read_metrics(out_dir)[:start]
        console.print(f"{desc}: resuming after epoch {start - 1}", highlight=False)
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        if images:
            ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda")
        model.train()
        if model.encoder is not None and not any(p.requires_grad for p in model.encoder.parameters()):
            model.encoder.eval()
        # summed on the device (float64 as the Python float it replaces; MPS has none): no host-device sync per step
        run_loss = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
        n = 0
        with progress() as bar:
            task = bar.add_task(f"{desc} ep {epoch}", total=len(sampler), info="")
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if images:
                    x = normalize(x, norm["mean"], norm["std"])
                with autocast(device, amp):
                    z, logits = model(x)
                loss = loss_fn(z.float(), y)
                if logits is not None and float(ecfg["ce_weight"]) > 0:
                    loss = loss + float(ecfg["ce_weight"]) * F.cross_entropy(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if ecfg.get("grad_clip"):
                    torch.nn.utils.clip_grad_norm_(both.parameters(), float(ecfg["grad_clip"]))
                opt.step()
                sched.step()
                run_loss = run_loss + loss.detach().to(run_loss.dtype) * len(y)
                n += len(y)
                bar.update(task, advance=1)
        rec = {"epoch": epoch, "loss": float(run_loss) / max(n, 1), **loss_fn.temperature_bias(),
               "lr": opt.param_groups[-1]["lr"], "epoch_s": time.perf_counter() - t0}
        history.append(rec)
        torch_save(out_dir / "embed.pt", both.state_dict())
        write_metrics(out_dir, history)
        # the sampler's state as a string: the state then loads with weights_only=True
        save_state(state_file, {"both": both, "opt": opt, "sched": sched},
                   sampler_rng=json.dumps(sampler.rng.bit_generator.state), epoch=epoch)
        console.print(f"{desc} epoch {epoch}: loss {rec['loss']:.4f} t {rec['t']:.2f}"
                      + (f" b {rec['b']:.2f}" if "b" in rec else ""), highlight=False)
    return history


@torch.no_grad()
def embed_array(model: nn.Module, inputs, device: torch.device, norm: dict | None = None, batch_size: int = 128,
                amp: str = "none", tta: int = 1, desc: str = "embed") -> np.ndarray:
    """Embeddings (or pooled features, for a bare encoder) of images (`norm` given) or features, float32.

    Images are averaged over `tta` dihedral views; a model returning (z, logits) is re-normalised after."""
    model.eval()
    out = []
    with progress() as bar:
        task = bar.add_task(desc, total=len(inputs), info="")
        for s in range(0, len(inputs), batch_size):
            x = torch.from_numpy(np.array(inputs[s:s + batch_size]))  # a copy: memmaps are read-only
            x = x.to(device, non_blocking=True)
            views = 1
            if norm is not None:
                x = normalize(x.permute(0, 3, 1, 2), norm["mean"], norm["std"])
                views = tta
            acc = 0
            with autocast(device, amp):
                for k in range(views):
                    r = model(view(x, k) if views > 1 else x)
                    acc = acc + (r[0] if isinstance(r, tuple) else r).float()
            z = acc / views
            out.append((F.normalize(z, dim=-1) if isinstance(r, tuple) else z).cpu().numpy())
            bar.advance(task, len(x))
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)
