"""Where and how a run executes: the device, the seeds, and the RNG states a resume restores.

Shared by training, prediction, embeddings and restoration, so none of them imports another for these.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from .errors import WBCError


def resolve_device(want: str = "auto") -> torch.device:
    """`auto` -> cuda when there is one, else cpu; asking for cuda without one is an error."""
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise WBCError("device=cuda but no CUDA device is available")
    return torch.device(want)


def pick_device(cfg: dict) -> torch.device:
    return resolve_device(str(cfg.get("device", "auto")))


def device_precision(train: dict, device: torch.device) -> dict:
    """`train` with `amp` and `channels_last` as they apply on `device`: its own keys on CUDA, its `cpu` block
    elsewhere. The CPU block defaults off, so CPU runs repeat the figures measured before it existed."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    src = train if on_cuda else (train.get("cpu") or {})
    amp = str(src.get("amp") or "none")
    allowed = ("none", "bf16", "fp16") if on_cuda else ("none", "bf16")
    if amp not in allowed:
        key = "train.amp" if on_cuda else "train.cpu.amp"
        raise WBCError(f"{key}={amp!r} on {device.type}: expected one of {', '.join(allowed)}")
    return {**train, "amp": amp, "channels_last": bool(src.get("channels_last"))}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    # tensors and ints only, so the state loads with weights_only=True
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "numpy_pos": int(np.random.get_state()[2]),
            "python": list(random.getstate()[1]),
            # this process's device only: a resume may see fewer GPUs (one per process under `GPUS=`)
            "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(int(v) for v in s["python"]), None))
    if torch.cuda.is_available() and len(s["cuda"]):
        torch.cuda.set_rng_state(s["cuda"][0])  # states saved per visible GPU before: the first was this one
