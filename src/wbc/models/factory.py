"""`create_model(cfg)`: any timm backbone by name, with hub, local-file or no pretrained weights."""
from __future__ import annotations

from pathlib import Path

import timm
import torch

from ..core import hooks
from ..core.config import resolve_path
from ..core.console import console
from ..core.errors import WBCError, first_line
from ..core.io import torch_load


def load_state_file(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise WBCError(f"{path}: pretrained_file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch_load(path)  # weights_only: a file that would run code is refused, one line
    for key in ("state_dict", "model", "model_ema"):  # common checkpoint wrappers
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_pretrained_file(model: torch.nn.Module, path) -> list[str]:
    """Load a local state_dict, skipping the classifier when its shape differs (new class count).

    Returns the keys left at their initial values. Any other mismatch is an error: silent partial loads
    are how 'pretrained' runs end up training from scratch.
    """
    sd = load_state_file(path)
    own = model.state_dict()
    # the classifier's own keys, found by module identity: its state_dict alone says only "weight" / "bias"
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    prefix = next((n for n, m in model.named_modules() if m is head), None)
    head_keys = set() if prefix is None else {f"{prefix}.{k}".lstrip(".") for k in head.state_dict()}
    skipped = []
    for k in list(sd):
        if k in own and own[k].shape != sd[k].shape:
            if k in head_keys:
                sd.pop(k)
                skipped.append(k)
            else:
                raise WBCError(f"{path}: shape of {k} is {tuple(sd[k].shape)}, model has {tuple(own[k].shape)}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    body_missing = [k for k in missing if k not in head_keys]
    if body_missing or unexpected:
        first = (body_missing or unexpected)[0]
        raise WBCError(f"{path}: weights do not fit {type(model).__name__} "
                       f"({len(body_missing)} missing, {len(unexpected)} unexpected keys, e.g. {first})")
    return sorted(set(missing) | set(skipped))


def create_model(model_cfg: dict, num_classes: int, image_size: int | None = None) -> torch.nn.Module:
    """`image_size`: the input it will see, checked against models built for one size (ViT, Swin)."""
    kwargs = dict(model_cfg.get("kwargs") or {})
    for k in ("drop_rate", "drop_path_rate"):
        if model_cfg.get(k) is not None:
            kwargs[k] = model_cfg[k]
    while True:
        try:
            model = timm.create_model(model_cfg["arch"], pretrained=bool(model_cfg.get("pretrained")),
                                      num_classes=num_classes, **kwargs)
            break
        except OSError as e:  # hub unreachable and no cached copy: say what to use offline
            if not model_cfg.get("pretrained"):
                raise
            raise WBCError(f"model.pretrained: the hub's weights for {model_cfg['arch']} could not be fetched "
                           f"({first_line(e)[:120]}); offline, train the recipe's *_scratch twin, or set "
                           "model.pretrained=false with model.pretrained_file=<state_dict>") from None
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise WBCError(f"model.arch: unknown timm model '{model_cfg['arch']}'") from None
            raise
        except TypeError as e:  # some families (VGG, DenseNet, Inception) take no drop_path_rate / drop_rate
            dropped = next((k for k in ("drop_path_rate", "drop_rate") if k in kwargs and f"'{k}'" in str(e)), None)
            if dropped is None:
                raise
            console.print(f"[yellow]warning:[/] {model_cfg['arch']} takes no {dropped}; built without it")
            kwargs.pop(dropped)
    if image_size is not None:
        check_input_size(model, model_cfg["arch"], int(image_size))
    if model_cfg.get("pretrained_file"):
        load_pretrained_file(model, resolve_path(model_cfg["pretrained_file"]))
    for step in hooks.enabled("model_build", {"model": model_cfg}):  # optional changes (GroupNorm for BatchNorm)
        model = step.convert(model, model_cfg)
    return model


def check_input_size(model: torch.nn.Module, arch: str, size: int) -> None:
    """A patch-embedding model built for one input size fails at the first batch otherwise, deep inside timm."""
    pe = getattr(model, "patch_embed", None)
    fixed = getattr(pe, "img_size", None)
    if fixed is not None and getattr(pe, "strict_img_size", False) and tuple(fixed) != (size, size):
        raise WBCError(f"model.arch {arch} takes {fixed[0]} px inputs, data.image_size is {size}: add "
                       f"model.kwargs.img_size={size} (Swin also needs a model.kwargs.window_size that divides "
                       f"{size}/32, e.g. {_window(size)})")


def _window(size: int) -> int:
    last = max(size // 32, 1)  # Swin's last stage is size/32 wide; its window must divide every stage
    return max(w for w in range(1, 8) if last % w == 0)


def model_data_config(model: torch.nn.Module) -> dict:
    """Input normalisation the backbone was (pre)trained with (timm's pretrained_cfg)."""
    cfg = timm.data.resolve_data_config({}, model=model)
    return {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}
