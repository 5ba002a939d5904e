"""`pretrain-ssl`: self-supervised pretraining of the config's timm backbone on unlabelled cells.

Outputs in `<output_dir>/<name>/`:
    backbone.pt        the exported backbone as a plain state_dict, timm keys, no classifier (after every epoch): what
                       `train-fold` loads with `model.pretrained_file=` and `embed` with `embed.encoder=timm`
    ssl_state.pt       the resume state: method (student, teacher, heads, DINO's centre), optimizer, RNG, epoch
    metrics.jsonl      per epoch: mean loss, each step's loss, lr, teacher momentum and temperature, times
    loss_curve.png     the per-step loss and the epoch means
    images.csv         ID, split[, cell_ok] of every image pretraining saw
    config.yaml, env.json, report.json
The learning rate warms up linearly, then follows lightly's cosine schedule to `min_lr`; the teacher's momentum follows
it from `ssl.dino.momentum` up to 1. Both are functions of the step alone, so a resume needs no scheduler state.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader

from ...core.checkpoint import load_state, save_state
from ...core.config import display_path, dump_config
from ...core.console import console, progress
from ...core.environment import describe
from ...core.errors import TrainingDiverged, WBCError
from ...core.io import atomic_path, torch_save, write_csv, write_json, write_text
from ...core.run_folder import read_metrics, run_dir, write_metrics
from ...models.inference import autocast
from ...s1_data.dataset import EpochTagged
from .images import filter_cells, image_frame, load_frame_images
from .methods import build_method
from .settings import ssl_section
from .views import ViewsDataset, build_views

STATE, BACKBONE, CURVE = "ssl_state.pt", "backbone.pt", "loss_curve.png"
OUTPUTS = (STATE, BACKBONE, CURVE, "metrics.jsonl", "images.csv", "report.json")


def lr_at(step: int, total: int, warmup: int, s: dict) -> float:
    from lightly.utils.scheduler import cosine_schedule

    if step < warmup:
        return float(s["lr"]) * (step + 1) / warmup
    return float(cosine_schedule(step - warmup, total - warmup, float(s["lr"]), float(s["min_lr"])))


def momentum_at(step: int, total: int, s: dict) -> float:
    from lightly.utils.scheduler import cosine_schedule

    return float(cosine_schedule(step, total, float(s["dino"]["momentum"]), 1.0)) if s["method"] == "dino" else 0.0


def training_key(cfg: dict, s: dict, ids) -> str:
    """What a resume must share with the run it continues: the method, the backbone, the input size, the images."""
    skip = ("num_workers", "select")
    blob = {"ssl": {k: v for k, v in s.items() if k not in skip}, "model": cfg["model"],
            "image_size": cfg["data"]["image_size"], "center_crop": cfg["data"]["center_crop"],
            "seed": cfg.get("seed"), "ids": hashlib.sha1("\n".join(ids).encode()).hexdigest()}
    return hashlib.sha1(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_backbone(model_cfg: dict):
    """The timm backbone without classifier (pooled features), from `model.pretrained_file` or from scratch."""
    from ..embed.encoders import timm_encoder

    enc = timm_encoder(model_cfg)
    return enc.model, enc.feat_dim, enc.mean, enc.std


def run_pretrain(cfg: dict, resume: bool = False) -> dict:
    from ...core.runtime import device_precision, pick_device, seed_everything

    s = ssl_section(cfg)
    seed = int(cfg.get("seed", 0))
    seed_everything(seed)
    device = pick_device(cfg)
    prec = device_precision(cfg["train"], device)
    frame = image_frame(cfg, s)
    images = load_frame_images(cfg, frame)
    listing = frame[["ID", "split"]].copy()
    if s["cell_filter"] != "none":
        images, ok = filter_cells(images, s["cell_filter"], float(s["cell_margin"]))
        listing["cell_ok"] = ok.astype(int)
        console.print(f"cell filter: {int((~ok).sum())} of {len(ok)} images not segmented, kept as they are")
    backbone, feat_dim, mean, std = build_backbone(cfg["model"])
    method = build_method(s, backbone, feat_dim).to(device)
    if prec["channels_last"]:
        method = method.to(memory_format=torch.channels_last)
    ds = ViewsDataset(images, build_views(s, mean, std), seed)
    sampler = EpochTagged(len(ds), seed=seed)
    batches = BatchSampler(sampler, int(s["batch_size"]), drop_last=True)
    if len(batches) == 0:
        raise WBCError(f"ssl.batch_size {s['batch_size']} is larger than the {len(ds)} images pretraining sees")
    opt = torch.optim.AdamW(method.student_parameters(), lr=float(s["lr"]), weight_decay=float(s["weight_decay"]))
    out = run_dir(cfg)
    key = training_key(cfg, s, frame["ID"].tolist())
    start, history = resume_point(out, method, opt, key) if resume else (0, [])
    if start == 0:
        for name in OUTPUTS:  # a fresh start: no older run's state or curve stays behind as this run's
            (out / name).unlink(missing_ok=True)
    write_text(out / "config.yaml", dump_config(cfg))
    write_json(out / "env.json", describe())
    write_csv(out / "images.csv", listing)
    init = cfg["model"].get("pretrained_file")
    console.print(f"{cfg['name']}: {s['method']} on {len(ds)} images ({', '.join(frame['split'].unique())}), "
                  f"{len(batches)} steps an epoch, from {init or 'scratch'}", highlight=False)
    for epoch in range(start, int(s["epochs"])):
        sampler.set_epoch(epoch)
        loader = DataLoader(ds, batch_sampler=batches, num_workers=int(s["num_workers"]),
                            pin_memory=device.type == "cuda")
        rec = train_epoch(method, loader, opt, s, epoch, len(batches), device, prec)
        history.append(rec)
        torch_save(out / BACKBONE, method.backbone(s["export"]).state_dict())
        write_metrics(out, history)
        plot_losses(out / CURVE, history, f"{cfg['name']}: {s['method']}")
        save_state(out / STATE, {"method": method, "opt": opt}, epoch=epoch, key=key)
        console.print(f"{s['method']} epoch {epoch}: loss {rec['loss']:.4f} (lr {rec['lr']:.2e}"
                      + (f", teacher momentum {rec['momentum']:.4f}" if method.has_teacher else "")
                      + f"; {rec['img_per_s']:.1f} img/s)", highlight=False)
    report = {"name": cfg["name"], "method": s["method"], "export": s["export"], "images": len(ds),
              "splits": {k: int(v) for k, v in frame["split"].value_counts().items()},
              "cell_filter": s["cell_filter"], "epochs": len(history), "steps": len(history) * len(batches),
              "first_epoch_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
              "train_s": sum(r["epoch_s"] for r in history), "cpu_s": sum(r["cpu_s"] for r in history),
              "backbone": display_path(out / BACKBONE)}
    write_json(out / "report.json", report)
    console.print(f"backbone ({s['export']}) -> {display_path(out / BACKBONE)}: `model.pretrained_file=` for "
                  "train-fold, `embed.encoder=timm` for embed", highlight=False)
    return report


def resume_point(out: Path, method, opt, key: str) -> tuple[int, list[dict]]:
    """(first epoch to train, history so far) from the saved state; a state of another config is refused."""
    if not (out / STATE).exists():
        return 0, []
    from ...core.io import torch_load

    st = torch_load(out / STATE)
    if st.get("key") != key:
        raise WBCError(f"{out / STATE}: saved by another ssl config, backbone or image set; resume with the config "
                       "it started with, or start afresh without RESUME=1 (or under another name=)")
    load_state(out / STATE, {"method": method, "opt": opt}, state=st)
    start = int(st["epoch"]) + 1
    console.print(f"resuming after epoch {start - 1}", highlight=False)
    return start, read_metrics(out)[:start]


def train_epoch(method, loader, opt, s: dict, epoch: int, steps: int, device, prec: dict) -> dict:
    total, warmup = int(s["epochs"]) * steps, int(s["warmup_epochs"]) * steps
    method.train()
    losses, t0, c0 = [], time.perf_counter(), time.process_time()
    lr = m = 0.0
    with progress() as bar:
        task = bar.add_task(f"{s['method']} ep {epoch}", total=steps, info="")
        for k, views in enumerate(loader):
            step = epoch * steps + k
            lr, m = lr_at(step, total, warmup, s), momentum_at(step, total, s)
            for g in opt.param_groups:
                g["lr"] = lr
            method.momentum_update(m)
            views = [v.to(device, non_blocking=True) for v in views]
            if prec["channels_last"]:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            with autocast(device, prec["amp"]):
                loss = method.loss(views, epoch)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"ssl epoch {epoch} step {k}: loss {float(loss.detach())} (lower ssl.lr)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            method.before_step(epoch)
            if s["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(method.student_parameters(), float(s["grad_clip"]))
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(task, advance=1, info=f"loss {losses[-1]:.4f}")
    dt = time.perf_counter() - t0
    rec = {"epoch": epoch, "loss": float(np.mean(losses)), "step_losses": losses, "lr": lr, "momentum": m,
           "epoch_s": dt, "cpu_s": time.process_time() - c0, "img_per_s": steps * int(s["batch_size"]) / max(dt, 1e-9)}
    if s["method"] == "dino":
        crit = method.criterion
        rec["teacher_temp"] = float(crit.teacher_temp_schedule[epoch]) if epoch < crit.warmup_teacher_temp_epochs \
            else float(crit.teacher_temp)
    return rec


def plot_losses(path: Path, history: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [x for r in history for x in r["step_losses"]]
    per = len(history[0]["step_losses"])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        ax.plot(np.arange(len(steps)) / per, steps, lw=0.6, alpha=0.5, label="step")
        ax.plot([r["epoch"] + 0.5 for r in history], [r["loss"] for r in history], "o-", label="epoch mean")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
