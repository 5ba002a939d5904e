"""Train one fold: `train_fold(cfg, fold)` -> best/last checkpoints and per-epoch metrics in the fold's folder.

Resumable: `state.pt` after every epoch holds model, EMA, optimizer, scheduler, scaler, RNG states and the
epoch; `resume=True` continues exactly where a killed run stopped (same sampler draws and augmentations,
which are seeded per epoch / per sample). On CPU a resumed run matches an uninterrupted one bit for bit
on the same CPU kernels (`env.json` records them). On GPU, cuDNN autotuning and atomics make runs agree only
statistically unless `train.deterministic` is set (slower).
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..core import hooks
from ..core.checkpoint import load_state, read_state, save_state
from ..core.config import base_defaults, dump_config, leaves, read_yaml
from ..core.console import console
from ..core.environment import describe, differences, kernel_mode
from ..core.errors import WBCError
from ..core.io import atomic_path, file_digest, read_json, write_json, write_text
from ..core.metrics import macro_f1
from ..core.run_folder import (
    FOLD_RESULTS,
    METRICS,
    check_fold_record,
    claim,
    fold_dir,
    read_metrics,
    record_weights,
    run_dir,
    start_fold_record,
    write_metrics,
)
from ..core.runtime import device_precision, pick_device, seed_everything
from ..models.factory import create_model, model_data_config
from ..models.inference import predict_probs
from ..s1_data.augment import build_transform
from ..s1_data.cache import load_images
from ..s1_data.dataset import CellDataset, StageBatches
from ..s1_data.layout import folds_path
from ..s1_data.preprocess import build_preprocess
from ..s2_folds.folds import dataset_record
from . import distributed
from .guards import check_finite, collapse_warning
from .inputs import Chain, FoldData, Rows, load_fold_data
from .loader import check_shared_memory, make_loader, stage_iterator
from .optim import build_ema, build_stage
from .prior_correction import report_prior_correction
from .step import StepContext, train_epoch


class StopTraining(Exception):
    """Raised by an `on_epoch` callback to end a run early (e.g. an Optuna pruner)."""


def _record_environment(path: Path, start: int) -> None:
    """env.json: one record per start of the fold; a resume on other kernels or libraries says what changed."""
    now = {"start_epoch": start, **describe()}
    starts = read_json(path, kind=list) if start > 0 and path.exists() else []
    if starts:
        changed = differences(starts[-1], now)
        if changed:
            console.print(f"[yellow]warning:[/] {path.parent} resumes in another environment, so it will not match an "
                          f"uninterrupted run bit for bit: {'; '.join(changed)}")
    write_json(path, starts + [now])


def train_fold(cfg: dict, fold: int, on_epoch: Callable[[int, dict], None] | None = None,
               resume: bool = False, data: FoldData | None = None, deadline=None) -> dict:
    """Train `fold` of the K-fold split: best.pt / last.pt / state.pt and metrics.jsonl in outputs/<name>/fold<k>/.

    Predictions come after, from `wbc.s4_predict.fold.predict_fold` (`make train-fold` runs both). A `deadline`
    (`wbc.ops.deadline.Deadline`) stops training at the first epoch's end from which the fold would not finish in
    time, state saved, raising what its `reached()` gives.
    """
    with kernel_mode(bool(cfg["train"]["deterministic"])):
        return _train_fold(cfg, fold, on_epoch, resume, data, deadline)


def split_rows(data: FoldData, fold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class index of every pool row, -1 outside the model's classes; training rows; validation rows) of `fold`.
    A specialist (`data.subset_classes`) trains and validates on its classes only."""
    if fold not in set(data.pool["fold"]):
        raise WBCError(f"fold {fold} not in the folds file (folds: {sorted(set(data.pool['fold']))})")
    lut = {c: i for i, c in enumerate(data.classes)}
    y_all = data.pool["labels"].map(lut).fillna(-1).astype(int).to_numpy()
    keep = data.in_classes(data.pool)
    in_fold = data.pool["fold"].to_numpy() == fold
    tr_idx = np.flatnonzero(~in_fold & keep & data.trainable())
    va_idx = np.flatnonzero(in_fold & keep)
    if not keep.all():
        console.print(f"fold {fold}: specialist on {', '.join(data.classes)}: {len(tr_idx)} training / {len(va_idx)} "
                      "validation images")
    return y_all, tr_idx, va_idx


def predicted_views(cfg: dict, data: FoldData, fold: int) -> int:
    """Image views the fold's predictions will take (for the deadline's estimate): every image of the fold (a
    specialist's other classes too), eval and test, under predict.tta views, plus one pass over each for every
    optional step that adapts the model first."""
    n = int((data.pool["fold"].to_numpy() == fold).sum()) + sum(
        len(x) for x in (data.holdout_images, data.test_images) if x is not None)
    return n * (int(cfg["predict"]["tta"]) + len(hooks.switched_on("predict_adapt", cfg)))


def _train_fold(cfg: dict, fold: int, on_epoch, resume: bool, data: FoldData | None, deadline) -> dict:
    device = pick_device(cfg)
    t = device_precision(cfg["train"], device)  # amp / channels_last as they apply here
    out = fold_dir(run_dir(cfg), fold)
    state_path = out / "state.pt"
    if resume and state_path.exists():  # before anything is written: a refused resume leaves the run as it was
        check_same_training(out, cfg)
        check_fold_record(out, folds_path(cfg))
    main = distributed.is_main()  # with several processes (torchrun), only rank 0 writes files
    if main:
        claim(run_dir(cfg), dataset_record(cfg))  # one dataset per run folder
        out.mkdir(parents=True, exist_ok=True)
        write_text(run_dir(cfg) / "config.yaml", dump_config(cfg))
    seed = int(cfg["seed"]) + fold
    seed_everything(seed)
    data = data or distributed.rank0_first(lambda: load_fold_data(cfg))
    y_all, tr_idx, va_idx = split_rows(data, fold)
    classes, n_cls = data.classes, len(data.classes)
    extra = data.extra_rows()
    tr_images = Chain([Rows(data.pool_images, tr_idx), extra.images])
    y_tr = np.concatenate([y_all[tr_idx], [classes.index(c) for c in extra.labels]]).astype(int)
    n_tr = len(y_tr)
    if len(extra.labels):
        console.print(f"fold {fold}: {len(tr_idx)} pool + {extra.note} training images")
    counts = np.bincount(y_tr, minlength=n_cls)
    prior = report_prior_correction(t, counts)

    model = create_model(cfg["model"], n_cls, cfg["data"]["image_size"]).to(device)
    norm = model_data_config(model)
    if t["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    model = distributed.sync_batchnorm(model, bool(t["sync_bn"]))
    ema = build_ema(model, t)
    fwd = distributed.wrap(model, device)
    fwd = torch.compile(fwd) if t["compile"] else fwd
    batch_hook = hooks.single("train_batch", cfg)  # Mixup / CutMix or damage consistency, when switched on
    batch_hook = batch_hook.build(cfg, counts, seed) if batch_hook else None
    transform = batch_hook.transform if batch_hook and batch_hook.transform else build_transform(cfg, train=True)

    bs = min(int(t["batch_size"]), n_tr)
    epochs1, epochs2 = int(t["epochs"]), int(t["stage2"]["epochs"] or 0)
    total_epochs = epochs1 + epochs2
    steps_per_epoch = n_tr // bs

    def stage_of(k):
        stage = build_stage(k, model, t, y_tr, counts, seed, steps_per_epoch, device, classes)
        if k == 2:  # its fresh classifier trains outside the DDP wrapper
            distributed.average_grads(model.get_classifier())
        return stage

    low = distributed.rank0_first(lambda: LowRes(cfg, data, epochs1, len(extra.labels)))
    datasets = {False: CellDataset(tr_images, y_tr, transform, seed)}
    if low.on:
        datasets[True] = CellDataset(Rows(low.pool_images, tr_idx), y_tr, transform, seed)

    def stage_batches(stage, first: int):
        """The rest of the stage (or of its low-resolution phase) from epoch `first` as one stream of batches."""
        at_low = low.at(stage.number, first)
        end = (low.switch if at_low else epochs1) if stage.number == 1 else total_epochs
        ds = datasets[at_low]
        item_bytes = np.asarray(ds.images[0]).nbytes * getattr(ds.transform, "n_views", 1)
        check_shared_memory(int(t["num_workers"]), bs // distributed.world_size() * item_bytes)
        batches = distributed.share(StageBatches(stage.sampler, bs, first, end), bs)  # this rank's share of each
        loader = make_loader(ds, batches, int(t["num_workers"]), device)
        # a resume starts mid-stage (or mid-phase): no draw
        return stage_iterator(loader, draw_seed=first in (0, epochs1) or (low.on and first == low.switch))

    stage = stage_of(1 if epochs1 > 0 else 2)
    scaler = torch.amp.GradScaler("cuda", enabled=t["amp"] == "fp16")  # fp16 is CUDA-only
    start, best, history = 0, -1.0, []
    st = read_state(state_path) if resume and state_path.exists() else None
    if st is not None:
        history = read_metrics(out)[:int(st["epoch"]) + 1]
        if len(history) <= int(st["epoch"]):  # a version that saved state.pt first, killed before the metrics
            console.print(f"[yellow]warning:[/] {out / METRICS} holds {len(history)} of the {int(st['epoch']) + 1} "
                          "epochs state.pt has trained: the fold starts afresh", highlight=False)
            st, history = None, []
    if st is not None:
        if st["stage"] == 2 and stage.number == 1:
            stage = stage_of(2)
        load_state(state_path, {"model": model, "ema": ema, "optimizer": stage.opt, "scheduler": stage.sched,
                                "scaler": scaler}, state=st)
        start, best = int(st["epoch"]) + 1, float(st["best"])
        console.print(f"resumed {out} at epoch {start}")
    else:
        if resume and not state_path.exists():
            console.print(f"nothing to resume in {out}; starting fresh")
        if main:
            for name in FOLD_RESULTS:  # a fresh start replaces the fold (run_folder.FOLD_RESULTS says why)
                (out / name).unlink(missing_ok=True)
            write_text(out / "config.yaml", dump_config(cfg))  # what this fold trains with (the run's may change)
            start_fold_record(out, folds_path(cfg))
    if main:
        _record_environment(out / "env.json", start)

    eval_model = lambda: ema.module if ema is not None and stage.number == 1 else model  # noqa: E731
    batches = None
    n_predict_views = predicted_views(cfg, data, fold)
    epoch_s = []
    every, saved_at, best_sd = float(t["checkpoint_every_s"] or 0), time.monotonic(), None
    for epoch in range(start, total_epochs):
        if stage.number == 1 and epoch >= epochs1:
            if ema is not None:  # stage 2 starts from the averaged backbone
                model.load_state_dict(ema.module.state_dict())
            stage, batches = stage_of(2), None
        if low.on and epoch == low.switch and stage.number == 1:
            batches = None  # the last epochs of stage 1 at the full size
        t0 = time.perf_counter()
        if batches is None:
            batches = stage_batches(stage, epoch)
        rule = batch_hook.rule(epoch) if batch_hook is not None and stage.number == 1 else None
        ctx = StepContext(fwd, model, ema if stage.number == 1 else None, stage.opt, stage.sched, scaler, stage.loss,
                          device, norm, t["amp"], t["channels_last"], t["grad_clip"], stage.number, rule)
        ep = train_epoch(ctx, itertools.islice(batches, steps_per_epoch), steps_per_epoch, f"fold {fold} ep {epoch}")
        ep = distributed.epoch_totals(ep, device)  # over every process's share
        t_train = time.perf_counter() - t0
        check_finite(ep, scaler, f"{out}: epoch {epoch}", clipped=bool(t["grad_clip"]))
        distributed.average_buffers(model, ema.module if ema is not None else None)
        val_images = low.pool_images if low.at(stage.number, epoch) else data.pool_images
        val_probs = distributed.predict_rows(
            lambda rows: predict_probs(eval_model(), rows, device, norm["mean"], norm["std"], tta=int(t["val_tta"]),
                                       batch_size=int(cfg["predict"]["batch_size"]), amp=t["amp"],
                                       channels_last=t["channels_last"], desc="validate"), Rows(val_images, va_idx))
        val_s_per_view = (time.perf_counter() - t0 - t_train) / max(len(va_idx) * int(t["val_tta"]), 1)
        y_va = y_all[va_idx]
        f1 = macro_f1(y_va, val_probs.argmax(1), n_cls)
        val_loss = float(-np.log(np.clip(val_probs[np.arange(len(y_va)), y_va], 1e-12, None)).mean())
        rec = {"epoch": epoch, "stage": stage.number, "train_loss": ep["loss"], "val_loss": val_loss,
               "val_macro_f1": f1, "val_classes_predicted": int(np.unique(val_probs.argmax(1)).size),
               "lr": stage.opt.param_groups[0]["lr"], "grad_norm": ep["grad_norm"],
               "grad_norm_max": ep["grad_norm_max"], "nonfinite_steps": ep["nonfinite_steps"],
               "train_img_per_s": ep["n"] / t_train, "epoch_s": time.perf_counter() - t0}
        history.append(rec)
        warning = collapse_warning(history, f"{out}: epoch {epoch}", clipped=bool(t["grad_clip"]))
        if warning:
            rec["warning"] = warning
        improved = f1 > best
        epoch_s.append(rec["epoch_s"])
        need = distributed.from_rank0(lambda: None if deadline is None else deadline.must_stop(
            epoch_s, total_epochs - 1 - epoch, val_s_per_view, n_predict_views))
        # Checkpoints (about 450 MB for ConvNeXt-T with EMA and AdamW) every `checkpoint_every_s` and at each
        # stage's end; in between, new best weights wait in host memory and a kill loses at most that long.
        save = (every <= 0 or epoch in (epochs1 - 1, total_epochs - 1) or time.monotonic() - saved_at >= every
                or need is not None)
        if improved:
            best = f1
            best_sd = eval_model().state_dict() if save else _host_copy(eval_model().state_dict())
        if main:  # the epoch's record before its checkpoints: a kill in between repeats the epoch, losing nothing
            write_metrics(out, history)
        if save:
            if main:
                _save_checkpoints(out, best_sd, eval_model(), model, ema, stage, scaler, epoch, best)
            best_sd, saved_at = None, time.monotonic()
        console.print(f"fold {fold} epoch {epoch} stage {stage.number}: loss {ep['loss']:.4f} val_loss {val_loss:.4f} "
                      f"val_macro_f1 {f1:.4f}{' *' if improved else ''} (grad norm {ep['grad_norm']:.3g}, max "
                      f"{ep['grad_norm_max']:.3g}; {rec['train_img_per_s']:.0f} img/s)", highlight=False)
        if warning:
            console.print(f"[yellow]warning:[/] {warning}", highlight=False)
        if on_epoch is not None:
            on_epoch(epoch, rec)
        if need is not None:
            raise deadline.reached(f"{out}: stopped after epoch {epoch}, state saved (RESUME=1 continues)", need,
                                   total_epochs - 1 - epoch)

    if main:
        write_json(out / "train_result.json", {"fold": fold, "best_macro_f1": best, "epochs": len(history),
                                               "n_train": n_tr, "prior_correction": prior,
                                               "extra_rows": len(extra.labels)})
    return {"fold": fold, "best_macro_f1": best, "history": history}


# Keys that do not change what a fold learns: where things are, how fast, and the later steps' own sections.
# train.sync_bn: how several processes share BatchNorm statistics, like their number, which a resume may change too.
NOT_TRAINING = ("name", "output_dir", "device", "data.root", "data.cache_dir", "data.max_image_pixels",
                "data.holdout_splits", "data.test_split", "train.num_workers", "train.checkpoint_every_s",
                "train.sync_bn", "predict", "ensemble", "morph", "refine", "embed", "restorer", "shift", "ssl")


def check_same_training(fold: Path, cfg: dict) -> None:
    """Refuse to resume a fold with a config that trains differently from the one it started with (its own
    config.yaml), naming the keys: the schedule, model and data of a resumed run are the saved ones."""
    saved = fold / "config.yaml"
    if not saved.exists():  # a fold started before folds recorded their config
        return
    skip = lambda k: any(k == s or k.startswith(s + ".") for s in NOT_TRAINING)  # noqa: E731
    was = {k: v for k, v in leaves(read_yaml(saved)).items() if not skip(k)}
    now = {k: v for k, v in leaves(cfg).items() if not skip(k)}
    # a key added to base.yaml since the fold started trained as its default says (the code before it)
    default = {k: v for k, v in leaves(base_defaults()).items() if k not in was}
    was.update({k: default[k] for k in now if k in default})
    changed = sorted(k for k in set(was) | set(now) if was.get(k, "<unset>") != now.get(k, "<unset>"))
    if changed:
        shown = ", ".join(f"{k} {was.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r}" for k in changed[:6])
        raise WBCError(f"{fold}: RESUME with another training config ({shown}"
                       f"{', ...' if len(changed) > 6 else ''}): resume with the config it started with, or train "
                       "it afresh without RESUME=1 (or under another name=)")


class LowRes:
    """`train.low_res`: stage 1's epochs before its last `final_epochs` train (and validate) on the pool cached at
    `size`, the rest at data.image_size, as prediction does (Touvron et al. 2019, "FixRes": a short last phase at
    the test's resolution; on a CPU the low-resolution epochs cost a third of the full ones at 128 vs 224 px)."""

    def __init__(self, cfg: dict, data: FoldData, epochs1: int, n_extra: int):
        lr = cfg["train"]["low_res"]
        self.on = bool(lr["size"])
        self.switch = epochs1 - int(lr["final_epochs"] or 0)
        self.pool_images = None
        if not self.on:
            return
        size, full = int(lr["size"]), int(cfg["data"]["image_size"])
        if not 8 <= size < full or not 0 <= self.switch <= epochs1:
            raise WBCError(f"train.low_res: size {size} must be in [8, data.image_size={full}) and final_epochs "
                           f"{lr['final_epochs']} in [0, train.epochs={epochs1}]")
        if n_extra:
            raise WBCError("train.low_res with extra training rows (data.pseudo_labels) is not supported")
        low_cfg = {**cfg, "data": {**cfg["data"], "image_size": size}}
        self.pool_images = load_images(low_cfg, data.pool, build_preprocess(low_cfg))

    def at(self, stage: int, epoch: int) -> bool:
        """Whether `epoch` of `stage` trains at the low size."""
        return self.on and stage == 1 and epoch < self.switch


def _save_checkpoints(out: Path, best_sd, eval_model, model, ema, stage, scaler, epoch: int, best: float) -> None:
    """best.pt (when a new best waits), last.pt (the weights predictions use: EMA in stage 1) and state.pt."""
    if best_sd is not None:
        _save_weights(out / "best.pt", best_sd)
    _save_weights(out / "last.pt", eval_model.state_dict())
    save_state(out / "state.pt", {"model": model, "ema": ema, "optimizer": stage.opt, "scheduler": stage.sched,
                                  "scaler": scaler}, epoch=epoch, best=best, stage=stage.number)


def _save_weights(path: Path, state_dict: dict) -> None:
    """A weights file, its digest recorded as the fold's before it takes its name (`run_folder.check_fold_record`)."""
    with atomic_path(path) as tmp:
        torch.save(state_dict, tmp)
        record_weights(path.parent, file_digest(tmp))


def _host_copy(state_dict: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}
