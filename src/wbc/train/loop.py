"""Train one fold: `train_fold(cfg, fold)` -> best/last checkpoints and per-epoch metrics.

Resumable: `state.pt` after every epoch holds model, EMA, optimizer, scheduler, scaler, RNG states and the
epoch; `resume=True` continues exactly where a killed run stopped (same sampler draws and augmentations,
which are seeded per epoch / per sample). On CPU a resumed run matches an uninterrupted one bit for bit
on the same CPU kernels (`env.json` records them). On GPU, cuDNN autotuning and atomics make runs agree only
statistically unless `train.deterministic` is set (slower).
"""
from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..config import dump_config, run_dir
from ..console import console, progress
from ..data.augment import train_transform
from ..data.dataset import CellDataset, EpochTagged, StageBatches, normalize
from ..environment import describe, differences, kernel_mode
from ..errors import TrainingDiverged, WBCError
from ..io import torch_load, torch_save, write_json, write_text
from ..metrics import macro_f1
from ..models.factory import create_model, model_data_config
from ..models.inference import autocast, predict_probs
from ..runtime import device_precision, pick_device, rng_state, seed_everything, set_rng_state
from .deadline import Deadline, DeadlineReached
from .inputs import Chain, FoldData, Rows, load_fold_data
from .losses import build_loss, js_consistency
from .mix import build_mixer
from .prior_correction import report_prior_correction
from .sampling import build_sampler

FOLD_RESULTS = ("state.pt", "best.pt", "last.pt", "train_result.json", "oof.csv", "eval.csv", "test.csv",
                "prediction.json", "confusion_oof.png")
LOSS_SHOW_EVERY = 25  # steps between running-loss updates on the progress bar


class StopTraining(Exception):
    """Raised by an `on_epoch` callback to end a run early (e.g. an Optuna pruner)."""


def fold_dir(cfg: dict, fold: int) -> Path:
    return run_dir(cfg) / f"fold{fold}"


def _lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def _optimizer(params, lr: float, weight_decay: float, model=None):
    import timm.optim

    if model is not None:  # no weight decay on norms / biases
        return timm.optim.create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def stage_loss(t: dict, counts, stage: int, device) -> torch.nn.Module:
    """The stage's loss on `device` (its class weights and prior offset are buffers): the recipe's loss in stage 1,
    smoothed plain cross-entropy for stage 2's classifier re-training."""
    cfg_loss = t["loss"] if stage == 1 else {"type": "ce", "label_smoothing": t["loss"].get("label_smoothing", 0.0)}
    return build_loss(cfg_loss, counts).to(device)


def build_ema(model, t: dict):
    """timm's ModelEmaV3 when `train.ema` is on, else None."""
    if not t.get("ema"):
        return None
    from timm.utils import ModelEmaV3

    # Decay warm-up (1 - (1 + step)^-0.75, capped at ema_decay): without it the average keeps
    # ema_decay^steps of the initial weights, 21 % for a 60-epoch run of 13 steps an epoch at 0.998.
    return ModelEmaV3(model, decay=float(t["ema_decay"]), use_warmup=bool(t.get("ema_warmup")), warmup_power=0.75)


PREFETCH = 4  # batches in flight per loader worker


def _loader(ds, batch_sampler, workers: int, device):
    # One iterator per stage (StageBatches): the epoch reaches the workers inside each (epoch, index) pair.
    return DataLoader(ds, batch_sampler=batch_sampler, num_workers=workers, pin_memory=device.type == "cuda",
                      prefetch_factor=PREFETCH if workers > 0 else None)


def check_shared_memory(workers: int, batch_bytes: int, shm: str = "/dev/shm") -> bool:
    """Warn when the workers' batches in flight may not fit in shared memory (containers often give /dev/shm
    64 MB), where they would die with a bus error mid-run. True when they fit or cannot be checked."""
    if workers <= 0 or not Path(shm).is_dir():
        return True
    need, free = 2 * workers * PREFETCH * batch_bytes, shutil.disk_usage(shm).free
    if free >= need:
        return True
    console.print(f"[yellow]warning:[/] {shm} has {free / 2**20:.0f} MiB free; {workers} loader workers with "
                  f"{PREFETCH} batches of {batch_bytes / 2**20:.1f} MiB in flight want about {need / 2**20:.0f} MiB: "
                  "lower train.num_workers or enlarge it")
    return False


def _record_environment(path: Path, start: int) -> None:
    """env.json: one record per start of the fold; a resume on other kernels or libraries says what changed."""
    now = {"start_epoch": start, **describe()}
    starts = json.loads(path.read_text()) if start > 0 and path.exists() else []
    if starts:
        changed = differences(starts[-1], now)
        if changed:
            console.print(f"[yellow]warning:[/] {path.parent} resumes in another environment, so it will not match an "
                          f"uninterrupted run bit for bit: {'; '.join(changed)}")
    write_json(path, starts + [now])


def train_fold(cfg: dict, fold: int, on_epoch: Callable[[int, dict], None] | None = None,
               resume: bool = False, data: FoldData | None = None, deadline: Deadline | None = None) -> dict:
    """Train `fold` of the K-fold split: best.pt / last.pt / state.pt and metrics.jsonl in outputs/<name>/fold<k>/.

    Predictions come after, from `wbc.predict.fold.predict_fold` (the `train-fold` command runs both). With a
    `deadline`, raises DeadlineReached at the first epoch's end from which the fold would not finish in time.
    """
    with kernel_mode(bool(cfg["train"].get("deterministic"))):
        return _train_fold(cfg, fold, on_epoch, resume, data, deadline or Deadline())


def _train_fold(cfg: dict, fold: int, on_epoch, resume: bool, data: FoldData | None, deadline: Deadline) -> dict:
    device = pick_device(cfg)
    t = device_precision(cfg["train"], device)  # amp / channels_last as they apply here
    out = fold_dir(cfg, fold)
    out.mkdir(parents=True, exist_ok=True)
    write_text(run_dir(cfg) / "config.yaml", dump_config(cfg))
    seed = int(cfg.get("seed", 0)) + fold
    seed_everything(seed)
    data = data or load_fold_data(cfg)
    if fold not in set(data.pool["fold"]):
        raise WBCError(f"fold {fold} not in the folds file (folds: {sorted(set(data.pool['fold']))})")
    classes, n_cls = data.classes, len(data.classes)
    lut = {c: i for i, c in enumerate(classes)}
    y_all = data.pool["labels"].map(lut).fillna(-1).astype(int).to_numpy()
    keep = data.in_classes(data.pool)  # all rows, except in a specialist (`data.subset_classes`)
    tr_idx = np.flatnonzero((data.pool["fold"].to_numpy() != fold) & keep & data.trainable())
    va_idx = np.flatnonzero((data.pool["fold"].to_numpy() == fold) & keep)
    if not keep.all():
        console.print(f"fold {fold}: specialist on {', '.join(classes)}: {len(tr_idx)} training / {len(va_idx)} "
                      "validation images")
    pseudo_images, pseudo_labels = data.pseudo_rows()
    tr_images = Chain([Rows(data.pool_images, tr_idx), pseudo_images])
    y_tr = np.concatenate([y_all[tr_idx], [lut[c] for c in pseudo_labels]]).astype(int)
    n_tr = len(y_tr)
    if len(pseudo_labels):
        console.print(f"fold {fold}: {len(tr_idx)} pool + {len(pseudo_labels)} pseudo-labelled training images")
        if (data.pseudo["source"] == "holdout").any():
            console.print("[yellow]warning:[/] pseudo-labels include holdout images: their scores are transductive")
    counts = np.bincount(y_tr, minlength=n_cls)
    prior = report_prior_correction(t, counts)

    model = create_model(cfg["model"], n_cls, cfg["data"]["image_size"]).to(device)
    norm = model_data_config(model)
    if t["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    ema = build_ema(model, t)
    fwd = torch.compile(model) if t.get("compile") else model

    ds = CellDataset(tr_images, y_tr, train_transform(cfg), seed)
    bs = min(int(t["batch_size"]), n_tr)
    epochs1, epochs2 = int(t["epochs"]), int(t.get("stage2", {}).get("epochs", 0) or 0)
    steps_per_epoch = n_tr // bs

    def stage_objects(stage: int):
        if stage == 1:
            sampler = EpochTagged(n_tr, build_sampler(y_tr, n_cls, t["sampler"], seed=seed), seed)
            opt = _optimizer(None, float(t["lr"]), float(t["weight_decay"]), model)
            total, warm, lr0 = epochs1 * steps_per_epoch, int(t["warmup_epochs"]) * steps_per_epoch, float(t["lr"])
            loss = stage_loss(t, counts, 1, device)
        else:  # decoupled: re-train a fresh classifier on the frozen backbone with balanced sampling
            s2 = t["stage2"]
            sampler = EpochTagged(n_tr, build_sampler(y_tr, n_cls, {"type": s2.get("sampler", "balanced")},
                                                      seed=seed + 1), seed + 1)
            model.zero_grad(set_to_none=True)  # stale stage-1 grads must not reach clipping
            model.requires_grad_(False)
            model.reset_classifier(n_cls)
            model.get_classifier().to(device).requires_grad_(True)
            opt = _optimizer(model.get_classifier().parameters(), float(s2["lr"]), 0.0)
            total, warm, lr0 = epochs2 * steps_per_epoch, 0, float(s2["lr"])
            loss = stage_loss(t, counts, 2, device)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(max(total, 1), warm, float(t["min_lr"]) / lr0))
        return sampler, opt, sched, loss

    def stage_batches(stage: int, first: int):
        """The rest of the stage from epoch `first` as one stream of batches."""
        end = epochs1 if stage == 1 else epochs1 + epochs2
        item_bytes = np.asarray(ds.images[0]).nbytes * getattr(ds.transform, "n_views", 1)
        check_shared_memory(int(t["num_workers"]), bs * item_bytes)
        loader = _loader(ds, StageBatches(sampler, bs, first, end), int(t["num_workers"]), device)
        return _batches(loader, draw_seed=first in (0, epochs1))  # a resume starts mid-stage: no draw

    stage = 1 if epochs1 > 0 else 2
    sampler, opt, sched, loss_fn = stage_objects(stage)
    scaler = torch.amp.GradScaler("cuda", enabled=t["amp"] == "fp16")  # fp16 is CUDA-only
    start, best, history = 0, -1.0, []

    state_path = out / "state.pt"
    if resume and state_path.exists():
        st = torch_load(state_path)
        if st["stage"] == 2 and stage == 1:
            stage = 2
            sampler, opt, sched, loss_fn = stage_objects(2)
        model.load_state_dict(st["model"])
        if ema is not None and st.get("ema") is not None:
            ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        scaler.load_state_dict(st["scaler"])
        set_rng_state(st["rng"])
        start, best = int(st["epoch"]) + 1, float(st["best"])
        history = _read_metrics(out / "metrics.jsonl")[:start]
        console.print(f"resumed {out} at epoch {start}")
    else:
        if resume:
            console.print(f"nothing to resume in {out}; starting fresh")
        # A fresh start replaces the fold: killed before its first save, it must not leave an older run's state to
        # resume or its models and predictions to count as this run's.
        for name in FOLD_RESULTS:
            (out / name).unlink(missing_ok=True)
    _record_environment(out / "env.json", start)

    eval_model = lambda: ema.module if ema is not None and stage == 1 else model  # noqa: E731
    total_epochs = epochs1 + epochs2
    batches = None
    # The fold's predictions (the deadline's estimate): every image of the fold (a specialist's other classes too),
    # eval and test under predict.tta views, plus one pass over each for test-time BatchNorm adaptation.
    n_predicted = int((data.pool["fold"].to_numpy() == fold).sum()) + sum(
        len(x) for x in (data.holdout_images, data.test_images) if x is not None)
    n_predict_views = n_predicted * (int(cfg["predict"]["tta"]) + (1 if cfg["predict"].get("adapt_bn") else 0))
    epoch_s = []
    every, saved_at, best_sd = float(t.get("checkpoint_every_s", 0) or 0), time.monotonic(), None
    for epoch in range(start, total_epochs):
        if stage == 1 and epoch >= epochs1:
            stage = 2
            if ema is not None:  # stage 2 starts from the averaged backbone
                model.load_state_dict(ema.module.state_dict())
            sampler, opt, sched, loss_fn = stage_objects(2)
            batches = None
        t0 = time.perf_counter()
        if batches is None:
            batches = stage_batches(stage, epoch)
        mixer = build_mixer(t, counts, seed, epoch) if stage == 1 else None
        ep = _train_epoch(fwd, model, ema if stage == 1 else None, itertools.islice(batches, steps_per_epoch),
                          steps_per_epoch, opt, sched, scaler, loss_fn, device, norm, t, stage,
                          desc=f"fold {fold} ep {epoch}", mixer=mixer)
        t_train = time.perf_counter() - t0
        check_finite(ep, scaler, f"{out}: epoch {epoch}", clipped=bool(t.get("grad_clip")))
        val_probs = predict_probs(eval_model(), Rows(data.pool_images, va_idx), device, norm["mean"], norm["std"],
                                  tta=int(t.get("val_tta", 1)), batch_size=int(cfg["predict"]["batch_size"]),
                                  amp=t["amp"], channels_last=t["channels_last"], desc="validate")
        val_s_per_view = (time.perf_counter() - t0 - t_train) / max(len(va_idx) * int(t.get("val_tta", 1)), 1)
        y_va = y_all[va_idx]
        f1 = macro_f1(y_va, val_probs.argmax(1), n_cls)
        val_loss = float(-np.log(np.clip(val_probs[np.arange(len(y_va)), y_va], 1e-12, None)).mean())
        rec = {"epoch": epoch, "stage": stage, "train_loss": ep["loss"], "val_loss": val_loss,
               "val_macro_f1": f1, "lr": opt.param_groups[0]["lr"], "grad_norm": ep["grad_norm"],
               "grad_norm_max": ep["grad_norm_max"], "nonfinite_steps": ep["nonfinite_steps"],
               "train_img_per_s": ep["n"] / t_train, "epoch_s": time.perf_counter() - t0}
        history.append(rec)
        warning = collapse_warning(history, f"{out}: epoch {epoch}", clipped=bool(t.get("grad_clip")))
        if warning:
            rec["warning"] = warning
        improved = f1 > best
        epoch_s.append(rec["epoch_s"])
        need = deadline.must_stop(epoch_s, total_epochs - 1 - epoch, val_s_per_view, n_predict_views)
        stop = need is not None
        # Checkpoints (about 450 MB for ConvNeXt-T with EMA and AdamW) every `checkpoint_every_s` and at each
        # stage's end; in between, new best weights wait in host memory and a kill loses at most that long.
        save = (every <= 0 or epoch in (epochs1 - 1, total_epochs - 1) or time.monotonic() - saved_at >= every
                or stop)
        if improved:
            best = f1
            best_sd = eval_model().state_dict() if save else _host_copy(eval_model().state_dict())
        if save:
            if best_sd is not None:
                torch_save(out / "best.pt", best_sd)
                best_sd = None
            torch_save(out / "last.pt", eval_model().state_dict())
            torch_save(state_path, {"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                    "scaler": scaler.state_dict(), "rng": rng_state(), "epoch": epoch,
                                    "best": best, "stage": stage})
            saved_at = time.monotonic()
        write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        console.print(f"fold {fold} epoch {epoch} stage {stage}: loss {ep['loss']:.4f} val_loss {val_loss:.4f} "
                      f"val_macro_f1 {f1:.4f}{' *' if improved else ''} (grad norm {ep['grad_norm']:.3g}, max "
                      f"{ep['grad_norm_max']:.3g}; {rec['train_img_per_s']:.0f} img/s)", highlight=False)
        if warning:
            console.print(f"[yellow]warning:[/] {warning}", highlight=False)
        if on_epoch is not None:
            on_epoch(epoch, rec)
        if stop:
            what = ("the next epoch needs" if deadline.mode == "epoch" else
                    f"the other {total_epochs - 1 - epoch} epochs and the predictions need")
            raise DeadlineReached(f"{out}: stopped after epoch {epoch}, state saved (RESUME=1 continues): {what} "
                                  f"about {need:.0f} s, {max(deadline.left(), 0):.0f} s are left before the deadline")

    write_json(out / "train_result.json", {"fold": fold, "best_macro_f1": best, "epochs": len(history),
                                           "n_train": n_tr, "prior_correction": prior,
                                           "pseudo_labelled": len(pseudo_labels)})
    return {"fold": fold, "best_macro_f1": best, "history": history}


def _host_copy(state_dict: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def _batches(loader, draw_seed: bool):
    """iter(loader), letting it draw its base seed from the global torch RNG only when `draw_seed`.

    Every new iterator draws one, and on the CPU the same RNG draws the dropout and drop-path masks. An
    uninterrupted run makes one iterator per stage; a resumed run makes one more mid-stage, which must not
    draw, or its masks would differ from the uninterrupted run's."""
    if draw_seed:
        return iter(loader)
    state = torch.get_rng_state()
    batches = iter(loader)
    torch.set_rng_state(state)
    return batches


def _train_epoch(fwd, model, ema, batches, n_batches: int, opt, sched, scaler, loss_fn, device, norm, t, stage, desc,
                 mixer=None) -> dict:
    """One pass over `batches`: {"loss" (mean per image), "n" (images), "grad_norm" (mean pre-clip norm over the
    steps with a finite one), "grad_norm_max", "nonfinite_steps"}. Sums stay on the device and are read once at the
    end, so a step costs no host-device sync."""
    model.train()
    if stage == 2:  # frozen backbone: BN statistics stay as trained
        model.eval()
        model.get_classifier().train()
    # float64 as the Python float it replaces, so logged losses stay bit for bit (MPS has no float64)
    acc = torch.float32 if device.type == "mps" else torch.float64
    total, n, step = torch.zeros((), dtype=acc, device=device), 0, 0
    gsum, gmax, bad = (torch.zeros((), dtype=acc, device=device) for _ in range(3))
    cl = bool(t.get("channels_last"))
    with progress() as bar:
        task = bar.add_task(desc, total=n_batches, info="")
        for x, y in batches:
            loss, gnorm = _train_step(fwd, model, ema, x, y, opt, sched, scaler, loss_fn, device, norm, t, stage,
                                      mixer, cl)
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


def check_finite(ep: dict, scaler, where: str, clipped: bool = False) -> None:
    """Stop a diverged run with one line. An fp16 GradScaler skips steps with inf gradients by design; without it
    such a step has already written NaN into the weights."""
    bad = ep["nonfinite_steps"] if not scaler.is_enabled() else 0
    if math.isfinite(ep["loss"]) and not bad:
        return
    raise TrainingDiverged(f"{where}: training diverged (loss {ep['loss']:.4g}, {bad} steps with non-finite "
                           f"gradients, finite-step gradient norm mean {ep['grad_norm']:.3g} / max "
                           f"{ep['grad_norm_max']:.3g}); {_stabilise(clipped)}. Checkpoints of the epochs before "
                           "are kept")


def collapse_warning(history: list[dict], where: str, clipped: bool = False) -> str | None:
    """A warning when the newest stage-1 epoch's training loss is back above the stage's first: a finite collapse,
    which `check_finite` cannot see (Swin-T at lr 1e-3 under bf16 did this at CPU scale and never recovered)."""
    s1 = [r for r in history if r["stage"] == 1]
    if len(s1) < 2 or history[-1]["stage"] != 1 or not s1[-1]["train_loss"] > s1[0]["train_loss"]:
        return None
    return (f"{where}: training loss {s1[-1]['train_loss']:.4g} is back above its first epoch's "
            f"{s1[0]['train_loss']:.4g}; the run is collapsing: {_stabilise(clipped)}")


def _stabilise(clipped: bool) -> str:
    return f"lower train.lr, lengthen train.warmup_epochs or {'lower' if clipped else 'set'} train.grad_clip"


def _train_step(fwd, model, ema, x, y, opt, sched, scaler, loss_fn, device, norm, t, stage, mixer=None,
                channels_last=False) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a loader batch (uint8 images, integer labels); returns the loss and the gradients'
    total norm before clipping (both on the device)."""
    loss = _batch_loss(fwd, model, x, y, loss_fn, device, norm, t, stage, mixer, channels_last)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # a no-op unless fp16: the norm below is the true one
    params = [p for g in opt.param_groups for p in g["params"]]
    if t.get("grad_clip"):
        gnorm = torch.nn.utils.clip_grad_norm_(params, float(t["grad_clip"]))
    else:
        gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    scaler.step(opt)
    scaler.update()
    sched.step()
    if ema is not None:
        ema.update(model, step=sched.last_epoch)  # stage-1 optimizer steps so far; resumes with sched
    return loss, gnorm


def _batch_loss(fwd, model, x, y, loss_fn, device, norm, t, stage, mixer=None, channels_last=False) -> torch.Tensor:
    """The training loss of a loader batch: to the device, normalised, mixed, forward (autocast), loss."""
    n_views = x.shape[1] if x.ndim == 5 else 0
    if n_views and stage == 2:  # consistency is a stage-1 term: the head sees the recipe's view only
        x, n_views = x[:, 0], 0
    x = x.to(device, non_blocking=True)
    x = normalize(x.flatten(0, 1) if n_views else x, norm["mean"], norm["std"])
    y = y.to(device, non_blocking=True)
    if mixer is not None:  # soft targets from here on
        x, y = mixer(x, y)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, t.get("amp", "none")):
        if stage == 2:
            with torch.no_grad():
                feats = model.forward_head(model.forward_features(x), pre_logits=True)
            logits = model.get_classifier()(feats.float())
        else:
            logits = fwd(x)
    if n_views:  # the recipe's loss on view 0, plus agreement across the damage draws
        logits = logits.float().view(len(y), n_views, -1)
        loss = loss_fn(logits[:, 0], y) + float(t["consistency"]["weight"]) * js_consistency(logits)
    else:
        loss = loss_fn(logits.float(), y)
    return loss


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
