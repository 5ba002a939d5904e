"""Backbones that turn images into pooled features, and the projection head that turns those into embeddings.

- `timm`: any timm architecture (`model.arch`), random, hub or a local checkpoint (`model.pretrained_file`:
  any timm-keyed state_dict, e.g. an open-vision tower converted to timm keys).
- `run`: a fold model of this repo (`outputs/<run>/fold<k>/<predict.weights>.pt`); arch from the run's config.yaml.
- `medsiglip`: the vision tower of a SigLIP checkpoint in the `google/medsiglip-448` layout, from a local
  folder (config.json + safetensors [+ preprocessor_config.json]); the pooled (attention-pooling head) output,
  1152-d for MedSigLIP. Inputs are resized to the tower's size (448) and normalised as its image processor.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch.nn.functional as F
from torch import nn

from ...core.config import resolve_path, run_name
from ...core.errors import WBCError, first_line
from ...core.run_folder import fold_dir
from ...models.factory import create_model, load_pretrained_file, model_data_config


class Encoder(nn.Module):
    """images (B,3,H,W), normalised with `mean`/`std` -> pooled features (B, feat_dim)."""

    feat_dim: int
    mean: tuple
    std: tuple


class TimmEncoder(Encoder):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.feat_dim = int(model.num_features)
        dc = model_data_config(model)
        self.mean, self.std = dc["mean"], dc["std"]

    def forward(self, x):
        return self.model(x)


def timm_encoder(model_cfg: dict, weights=None) -> TimmEncoder:
    """Built with a 1-class head so a checkpoint's classifier (any class count) is skipped, then removed."""
    weights = weights or model_cfg.get("pretrained_file")
    # weights to load replace the hub's: never fetch them (a run's config may say pretrained: true)
    model = create_model({**model_cfg, "pretrained_file": None, "pretrained": bool(model_cfg.get("pretrained"))
                          and not weights}, num_classes=1)
    if weights:
        load_pretrained_file(model, resolve_path(weights))
    model.reset_classifier(0)
    return TimmEncoder(model)


class MedSigLIPEncoder(Encoder):
    def __init__(self, vision_model: nn.Module, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        super().__init__()
        self.vision = vision_model
        self.feat_dim = int(vision_model.config.hidden_size)
        self.input_size = int(vision_model.config.image_size)
        self.mean, self.std = tuple(mean), tuple(std)

    def forward(self, x):
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False,
                              antialias=True)
        return self.vision(pixel_values=x).pooler_output


def load_medsiglip(local_dir) -> MedSigLIPEncoder:
    """Vision tower of a local SigLIP / MedSigLIP folder; a tower missing any weight is an error."""
    from transformers import SiglipVisionModel
    from transformers.utils import logging as hf_logging

    local_dir = resolve_path(local_dir)
    if not (local_dir / "config.json").is_file():
        raise WBCError(f"{local_dir}: no config.json (expected a local google/medsiglip-448 folder)")
    hf_logging.set_verbosity_error()  # the text tower's weights are 'unexpected' for a vision-only load
    hf_logging.disable_progress_bar()
    try:
        model, info = SiglipVisionModel.from_pretrained(str(local_dir), output_loading_info=True)
    except (OSError, ValueError) as e:
        raise WBCError(f"{local_dir}: cannot load a SigLIP vision model ({first_line(e)})") from None
    bad = sorted(map(str, info["missing_keys"])) + sorted(map(str, info["mismatched_keys"]))
    if bad:
        raise WBCError(f"{local_dir}: weights do not fit the SigLIP vision tower ({len(bad)} keys, e.g. {bad[0]})")
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    pp = local_dir / "preprocessor_config.json"
    if pp.is_file():
        proc = json.loads(pp.read_text())
        mean, std = tuple(proc.get("image_mean", mean)), tuple(proc.get("image_std", std))
    return MedSigLIPEncoder(model.eval(), mean, std)


def run_dir_model_cfg(run_dir: Path, fallback: dict) -> tuple[dict, int | None]:
    """The `model` section and image size a fold run was trained with (its resolved config.yaml)."""
    import yaml

    f = run_dir / "config.yaml"
    if not f.is_file():
        return fallback, None
    rc = yaml.safe_load(f.read_text()) or {}
    return rc.get("model", fallback), (rc.get("data") or {}).get("image_size")


def build_encoder(cfg: dict, fold: int | None = None) -> Encoder:
    ecfg = cfg["embed"]
    kind = ecfg["encoder"]
    if kind == "timm":
        return timm_encoder(cfg["model"])
    if kind == "medsiglip":
        return load_medsiglip(ecfg["medsiglip_dir"])
    if kind == "run":
        if not ecfg.get("init_from_run"):
            raise WBCError("embed.encoder=run needs embed.init_from_run (a run name under output_dir)")
        name = run_name(cfg, ecfg["init_from_run"])  # a recipe's stem names its run on this dataset
        run_dir = resolve_path(cfg["output_dir"]) / name
        ckpt = fold_dir(run_dir, fold) / f"{cfg['predict']['weights']}.pt"  # best.pt's OOF is chosen on its fold
        if not ckpt.is_file():
            raise WBCError(f"{ckpt}: fold checkpoint not found (train run '{name}' first)")
        model_cfg, _ = run_dir_model_cfg(run_dir, cfg["model"])
        return timm_encoder(model_cfg, ckpt)
    raise WBCError(f"embed.encoder: unknown encoder '{kind}' (timm | run | medsiglip)")


class EmbeddingHead(nn.Module):
    """features -> L2-normalised embedding, plus class logits when trained jointly with classification."""

    def __init__(self, feat_dim: int, proj_dim: int, hidden_dim: int = 0, n_classes: int = 0):
        super().__init__()
        if hidden_dim:
            self.proj = nn.Sequential(nn.Linear(feat_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, proj_dim))
        else:
            self.proj = nn.Linear(feat_dim, proj_dim)
        self.classifier = nn.Linear(feat_dim, n_classes) if n_classes else None

    def forward(self, f):
        z = F.normalize(self.proj(f).float(), dim=-1)
        return z, (self.classifier(f) if self.classifier is not None else None)


class EmbeddingModel(nn.Module):
    """encoder + head; `encoder=None` works on precomputed features (a frozen backbone)."""

    def __init__(self, encoder: Encoder | None, head: EmbeddingHead):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x):
        return self.head(self.encoder(x) if self.encoder is not None else x)
