"""Model inputs and batched inference: device-side normalisation, dihedral test-time augmentation, autocast (used by
training, validation and prediction)."""
from __future__ import annotations

import functools

import numpy as np
import torch

from ..core.console import progress


@functools.lru_cache(maxsize=32)
def _stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Once per device: a tensor made from Python floats is a pageable host-to-device copy, which waits for the
    # GPU's queue to drain; made at every step, it would stall the training loop at every step.
    with torch.inference_mode(False):
        m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
        s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
    return m, s


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 NCHW batch -> float, normalised, on whatever device x lives on."""
    m, s = _stats(tuple(float(v) for v in np.ravel(mean)), tuple(float(v) for v in np.ravel(std)), x.device)
    return (x.float() - m) / s


# The 8 dihedral views, ordered so the first n are a sensible subset for n = 1, 2, 4, 8.
_VIEWS = [(0, False), (0, True), (1, False), (2, False), (3, False), (1, True), (2, True), (3, True)]


def view(x: torch.Tensor, k: int) -> torch.Tensor:
    rot, flip = _VIEWS[k]
    x = torch.rot90(x, rot, dims=(2, 3)) if rot else x
    return torch.flip(x, dims=(3,)) if flip else x


# Colour views for another lab's stain and light, on 0-255 values: the image, its grey level (luma in every channel),
# darker and lighter gamma. The first n are used for n = 1, 2, 4.
COLOR_VIEWS = ("identity", "grey", "gamma_0.8", "gamma_1.25")
_LUMA = (0.299, 0.587, 0.114)


def color_view(x: torch.Tensor, k: int) -> torch.Tensor:
    name = COLOR_VIEWS[k]
    if name == "identity":
        return x
    x = x.float()
    if name == "grey":
        w = torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True).expand_as(x)
    gamma = float(name.split("_")[1])
    return 255.0 * (x / 255.0).clamp(0, 1) ** gamma


def autocast(device: torch.device, amp: str):
    """Autocast for an `amp` already resolved for `device` (`runtime.device_precision`): none | bf16 | fp16."""
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=amp in ("bf16", "fp16"))


@torch.no_grad()
def predict_probs(model, images: np.ndarray, device, mean, std, tta: int = 1, batch_size: int = 128,
                   amp: str = "none", channels_last: bool = False, desc: str = "predict",
                   color_tta: int = 1) -> np.ndarray:
    """Class probabilities averaged over `tta` dihedral views times `color_tta` colour views, for uint8 (N, H, W, 3)
    images."""
    if tta not in (1, 2, 4, 8):
        raise ValueError(f"tta must be 1, 2, 4 or 8, got {tta}")
    if color_tta not in (1, 2, 4):
        raise ValueError(f"color_tta must be 1, 2 or 4, got {color_tta}")
    model.eval()
    out = []
    with progress() as bar:
        task = bar.add_task(desc, total=len(images), info="")
        for s in range(0, len(images), batch_size):
            x = torch.from_numpy(np.array(images[s:s + batch_size])).permute(0, 3, 1, 2)  # copy: memmaps are read-only
            if device.type == "cuda":  # pinned, so the copy runs while the host gathers the next batch
                x = x.pin_memory()
            x = x.to(device, non_blocking=True)
            acc = 0
            for c in range(color_tta):
                xc = normalize(color_view(x, c), mean, std)
                if channels_last:
                    xc = xc.contiguous(memory_format=torch.channels_last)
                with autocast(device, amp):
                    for k in range(tta):
                        acc = acc + model(view(xc, k)).float().softmax(1)
            out.append(acc / (tta * color_tta))  # stays on the device: one read at the end, not a wait per batch
            bar.advance(task, len(x))
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, 0))
