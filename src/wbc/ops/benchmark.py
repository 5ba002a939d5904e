"""Training throughput of the real `train-fold` input pipeline vs a plain timm loop on GPU-resident data.

Both sides use the same model, batch size, precision and channels_last; the pipeline side runs the trainer's own
epoch function (gradient clipping and EMA included, as configured) over cached images with its augmentation and
data-loader workers, timed after a warm-up on the same loader iterator, as a training stage keeps one. The ratio
says whether the input pipeline starves the accelerator (target >= 0.9). A third figure, the loader alone (the same
batches delivered to the device, no model), says which side is short when the ratio is low: a loader slower than
the plain loop means more workers or cheaper augmentation, not a faster model. With damage consistency on
(`train.consistency.weight` > 0) each image is `views` images through the model, on both sides; img/s counts
images, not views. On CUDA it also counts the pipeline's host-device synchronisations per step (CUDA's sync debug
mode, on a second, untimed pass): each one stops the CPU from queueing the next step while the GPU works, which a
plain loop never does.
"""
from __future__ import annotations

import contextlib
import itertools
import time
import warnings

import numpy as np
import torch

from ..core import hooks
from ..core.console import console, print_table
from ..core.environment import kernel_mode
from ..core.io import write_json
from ..core.run_folder import run_dir
from ..core.runtime import device_precision, pick_device, seed_everything
from ..models.factory import create_model, model_data_config
from ..models.inference import autocast, normalize
from ..s1_data.augment import build_transform
from ..s1_data.dataset import CellDataset
from ..s3_train.inputs import load_fold_data
from ..s3_train.loader import make_loader
from ..s3_train.optim import build_ema, optimizer, stage_loss
from ..s3_train.step import StepContext, train_epoch

clock = time.perf_counter  # the tests give it a clock that only their fake work advances


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _model(cfg, n_cls, device):
    m = create_model({**cfg["model"], "pretrained": False, "pretrained_file": None}, n_cls,
                     cfg["data"]["image_size"]).to(device)
    if device_precision(cfg["train"], device)["channels_last"]:
        m = m.to(memory_format=torch.channels_last)
    return m


@contextlib.contextmanager
def count_syncs(device):
    """Counts host-device synchronisations inside the block with CUDA's sync debug mode; yields a list that
    holds the count on exit, or None off CUDA."""
    if device.type != "cuda":
        yield [None]
        return
    found = [0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
            found[0] = sum("synchroniz" in str(w.message) for w in caught)


def benchmark(cfg: dict, steps: int = 50, warmup: int = 10) -> dict:
    with kernel_mode(bool(cfg["train"]["deterministic"])):  # both sides on the kernels training uses
        return _benchmark(cfg, steps, warmup)


def _benchmark(cfg: dict, steps: int, warmup: int) -> dict:
    seed_everything(int(cfg["seed"]))
    device = pick_device(cfg)
    t = device_precision(cfg["train"], device)
    data = load_fold_data(cfg, with_test=False)
    n_cls = len(data.classes)
    bs = int(t["batch_size"])
    lut = {c: i for i, c in enumerate(data.classes)}
    y = data.pool["labels"].map(lut).to_numpy()
    counts = np.bincount(y, minlength=n_cls)
    loss_fn = stage_loss(t, counts, 1, device)
    cl = t["channels_last"]

    # The trainer's path: cached uint8 images -> augmentation in workers -> device normalisation -> step.
    model = _model(cfg, n_cls, device)
    norm = model_data_config(model)
    ema = build_ema(model, t)  # the trainer's step includes the weight average's update
    opt = optimizer(None, float(t["lr"]), float(t["weight_decay"]), model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    fwd = torch.compile(model) if t["compile"] else model
    idx = np.random.default_rng(0).integers(0, len(y), (warmup + steps) * bs)
    batch_hook = hooks.single("train_batch", cfg)  # an optional batch rule costs what it costs in training
    batch_hook = batch_hook.build(cfg, counts, int(cfg["seed"])) if batch_hook else None
    transform = batch_hook.transform if batch_hook and batch_hook.transform else build_transform(cfg, train=True)
    n_views = getattr(transform, "n_views", 1)
    ds = CellDataset(data.pool_images, y, transform, 0)

    def batches(n_batches):
        sub = torch.utils.data.Subset(ds, idx[: n_batches * bs].tolist())
        sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(sub), bs, drop_last=True)
        return iter(make_loader(sub, sampler, int(t["num_workers"]), device))

    def pipeline_run(n_batches):
        """(img/s, host-device syncs per step) of the trainer's steps after `warmup` of them on the same iterator:
        a training stage makes one loader iterator (StageBatches), so its workers start once per stage. The
        syncs come from a second, untimed pass (the debug mode costs time); their floor is 1 / n_batches, the
        epoch's one read of its loss."""
        rates, found = [], [None]
        for counted in (False, True) if device.type == "cuda" else (False,):
            stream = batches(warmup + n_batches)
            ctx = StepContext(fwd, model, ema, opt, sched, scaler, loss_fn, device, norm, t["amp"], cl, t["grad_clip"],
                              1, batch_hook.rule(0) if batch_hook else None)
            train_epoch(ctx, itertools.islice(stream, warmup), warmup, "pipeline")
            _sync(device)
            t0 = clock()
            with count_syncs(device) if counted else contextlib.nullcontext([None]) as got:
                n = train_epoch(ctx, stream, n_batches, "pipeline")["n"]
            _sync(device)
            rates.append(n / (clock() - t0))
            found = got
        return rates[0], None if found[0] is None else found[0] / n_batches

    def loader_run(n_batches):
        stream = batches(warmup + n_batches)
        for _ in itertools.islice(stream, warmup):
            pass
        _sync(device)
        t0, n = clock(), 0
        for x, _ in stream:
            x.to(device, non_blocking=True)
            n += len(x)
        _sync(device)
        return n / (clock() - t0)

    pipe, syncs = pipeline_run(steps)
    loader = loader_run(steps)

    # The plain loop: the same images, pre-normalised and resident on the device.
    model = _model(cfg, n_cls, device)
    opt = optimizer(None, float(t["lr"]), float(t["weight_decay"]), model)
    fwd = torch.compile(model) if t["compile"] else model
    x_all = normalize(torch.from_numpy(np.ascontiguousarray(data.pool_images[np.sort(idx[: steps * bs][:4096])]))
                      .permute(0, 3, 1, 2).to(device), norm["mean"], norm["std"])
    y_all = torch.as_tensor(y[np.sort(idx[: steps * bs][:4096])], device=device)
    # permuted HWC images are channels_last already: lay them out as the pipeline's batches are
    x_all = x_all.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)

    def plain_run(n_batches):
        model.train()
        _sync(device)
        t0 = clock()
        for _ in range(n_batches):
            j = torch.randint(0, len(x_all), (bs * n_views,), device=device)  # the views' forward passes
            with autocast(device, t["amp"]):
                loss = loss_fn(fwd(x_all[j]).float(), y_all[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)
        return n_batches * bs / (clock() - t0)

    plain_run(warmup)
    plain = plain_run(steps)
    res = {"arch": cfg["model"]["arch"], "image_size": cfg["data"]["image_size"], "batch_size": bs,
           "views": n_views, "amp": t["amp"], "channels_last": cl, "num_workers": int(t["num_workers"]),
           "device": str(device),
           "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "steps": steps,
           "pipeline_img_per_s": pipe, "plain_img_per_s": plain, "loader_img_per_s": loader, "ratio": pipe / plain,
           "pipeline_syncs_per_step": syncs,
           "limited_by": "input pipeline" if loader < plain else "model step"}
    print_table("training throughput", ["path", "img/s"],
                [["train-fold pipeline", pipe], ["plain loop, data on device", plain],
                 ["loader alone (no model)", loader], ["ratio pipeline / plain", pipe / plain],
                 ["pipeline host-device syncs / step", "n/a (CUDA only)" if syncs is None else syncs]], "{:.2f}")
    console.print(f"limited by the {res['limited_by']}")
    out = run_dir(cfg) / "throughput.json"
    write_json(out, res)
    console.print(f"wrote {out}")
    return res
