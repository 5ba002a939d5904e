"""One model over several processes (`make train-fold NPROC=2`: torchrun + DistributedDataParallel).

torchrun starts one `wbc train-fold` per process with RANK / WORLD_SIZE / LOCAL_RANK set; `process_group` joins them
(nccl on CUDA, gloo on the CPU). Every helper here is the identity while no group is joined, so a single process
trains exactly as before. Within a group:
- `train.batch_size` stays the global batch: every rank takes the same global draw (the samplers are pure functions
  of seed and epoch) and trains on its 1/world share of each batch (`RankShare`); DDP averages the gradients, so a
  step sees the same images as a single process's step.
- Only rank 0 writes files; the others wait at a barrier where they would read them (`rank0_first`, `barrier`).
- Validation and prediction are sharded by rows and gathered on every rank in row order (`predict_rows`).
- Choices made from the clock (deadlines) are rank 0's, shared (`from_rank0`), so no rank stops alone.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import numpy as np
import torch
import torch.distributed as dist

from ..core.console import console
from ..core.errors import WBCError
from .inputs import Rows

# Rank 0 alone builds missing image caches while the others wait at a barrier: minutes on a large dataset.
TIMEOUT = datetime.timedelta(minutes=60)


def launched_world() -> int:
    """The processes torchrun started (WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return rank() == 0


def check(cfg: dict, world: int, device: torch.device) -> None:
    """Refuse, before any work, what a group of `world` processes cannot train."""
    bs = int(cfg["train"]["batch_size"])
    if bs % world:
        raise WBCError(f"train.batch_size {bs} (the global batch) does not divide among {world} processes: give a "
                       f"multiple of {world}")
    if cfg["train"]["sync_bn"] and device.type != "cuda":
        raise WBCError("train.sync_bn needs CUDA GPUs (torch's SyncBatchNorm does not run on the CPU): set "
                       "train.sync_bn=false")
    if device.type == "cuda" and int(os.environ.get("LOCAL_RANK", 0)) >= torch.cuda.device_count():
        raise WBCError(f"NPROC={world} processes but {torch.cuda.device_count()} visible GPU(s) on this machine")


@contextlib.contextmanager
def process_group(cfg: dict, device: torch.device):
    """Join torchrun's group for the block when it started several processes; otherwise change nothing."""
    world = launched_world()
    if world <= 1:
        yield
        return
    check(cfg, world, device)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(local)  # "cuda" then means this rank's GPU everywhere
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                            device_id=torch.device("cuda", local) if device.type == "cuda" else None)
    quiet, console.quiet = console.quiet, dist.get_rank() != 0  # one log: rank 0's
    try:
        yield
    finally:
        console.quiet = quiet
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def rank0_first(fn):
    """fn() on rank 0, then on the others once it returned: rank 0 writes what is missing (image caches), the others
    only read it."""
    if not active():
        return fn()
    out = fn() if is_main() else None
    barrier()
    return out if is_main() else fn()


def from_rank0(fn):
    """fn()'s result (or exception) on rank 0, on every rank: a choice made from the clock must be the same on all."""
    if not active():
        return fn()
    box = [None]
    if is_main():
        try:
            box[0] = (True, fn())
        except Exception as e:  # noqa: BLE001 -- re-raised on every rank below
            box[0] = (False, e)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model in DistributedDataParallel (its forward averages the gradients across ranks), or as it is."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)


def sync_batchnorm(model: torch.nn.Module, on: bool) -> torch.nn.Module:
    """`train.sync_bn`: BatchNorm statistics over the global batch instead of each rank's share (off by default: a
    share of 32 or more images estimates them about as well, and the sync costs a collective per BN layer)."""
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if on and active() else model


def average_grads(module: torch.nn.Module) -> None:
    """Average `module`'s gradients across ranks as they are accumulated: stage 2 trains a fresh classifier on the
    frozen backbone's features, a forward that does not go through the DDP wrapper."""
    if not active():
        return
    world = world_size()

    def hook(p):
        dist.all_reduce(p.grad)
        p.grad.div_(world)

    for p in module.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(hook)


class RankShare:
    """This rank's share of every global batch of `batches` (every world-th item, as DistributedSampler deals):
    the shares are disjoint and together the whole batch, so no index is padded or dropped."""

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield batch[self.rank::self.world]


def share(batches, batch_size: int):
    """`batches` (global batches of `batch_size`) as this rank's shares, or as they are in a single process."""
    if not active():
        return batches
    if batch_size % world_size():  # train.batch_size is checked up front; this is a training set smaller than it
        raise WBCError(f"global batch {batch_size} (the training set, smaller than train.batch_size) does not divide "
                       f"among {world_size()} processes")
    return RankShare(batches, rank(), world_size())


def epoch_totals(ep: dict, device: torch.device) -> dict:
    """`train_epoch`'s record over every rank's images: the mean loss and the image count (the gradient norms are
    the same on every rank, taken after DDP averaged the gradients)."""
    if not active():
        return ep
    at = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([ep["loss"] * ep["n"], ep["n"]], dtype=torch.float64, device=at)
    dist.all_reduce(t)
    total, n = (float(v) for v in t.cpu())
    return {**ep, "loss": total / max(n, 1), "n": int(n)}


def average_buffers(*modules) -> None:
    """Each rank's BatchNorm running statistics replaced by their mean over the ranks (timm's `--dist-bn reduce`), so
    the model validated, saved and predicted with is the same on every rank."""
    if not active():
        return
    for m in modules:
        if m is None:
            continue
        for b in m.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b.div_(world_size())
            else:
                dist.broadcast(b, src=0)


def predict_rows(predict, images) -> np.ndarray:
    """`predict(rows) -> probabilities` over `images`: each rank predicts every world-th row and every rank gets
    all rows back in their order (no padding: the shares differ by one row at most)."""
    world = world_size()
    if world == 1 or len(images) < world:
        return predict(images)
    parts = [None] * world
    dist.all_gather_object(parts, predict(Rows(images, np.arange(rank(), len(images), world))))
    out = np.empty((len(images), parts[0].shape[1]), parts[0].dtype)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out
