"""BatchNorm swapped for a per-image normalisation (`model.norm: group | layer`), for another lab's images.

BatchNorm normalises with statistics of the training lab's images, frozen at test time: another lab's stain and
camera shift every layer's input away from them, and the network reads the shift as a different cell (Tsutsui et
al. 2023 found BatchNorm ResNets transfer worst between blood-smear domains). GroupNorm normalises each image by its
own statistics, so a gain (contrast, exposure) is divided out at every layer, and shifts shared within a group.
`group`: channels in groups of about `model.norm_groups` (the largest divisor of a layer's width not above it);
`layer`: one group, i.e. LayerNorm over channels and space. The BatchNorm layers' scale and shift start the new
layers; their running statistics have no counterpart and are dropped, so the network must re-learn part of what
ImageNet taught it.
Plugged into `create_model` through the `model_build` hook point (`wbc.core.hooks`), after any pretrained weights
are loaded. `predict.adapt_bn` refuses such a model: it has no BatchNorm left to adapt.
"""
from __future__ import annotations

import torch
from timm.layers.norm_act import BatchNormAct2d, GroupNormAct
from torch import nn

from ..core.errors import WBCError

KINDS = ("group", "layer")


def groups_for(channels: int, target: int) -> int:
    """The largest divisor of `channels` that is at most `target`."""
    return max(g for g in range(1, min(channels, target) + 1) if channels % g == 0)


def _swap(bn: nn.BatchNorm2d, groups: int) -> nn.Module:
    c = bn.num_features
    if isinstance(bn, BatchNormAct2d):
        gn = GroupNormAct(c, num_groups=groups_for(c, groups), eps=bn.eps, affine=True, apply_act=False)
        gn.act, gn.drop = bn.act, bn.drop  # the activation (and its drop) that timm fuses into the norm layer
    else:
        gn = nn.GroupNorm(groups_for(c, groups), c, eps=bn.eps, affine=True)
    with torch.no_grad():
        if bn.affine:
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
    return gn


def replace_batchnorm(model: nn.Module, groups: int) -> int:
    """Every 2-D BatchNorm of `model` replaced in place by GroupNorm with about `groups` groups; returns how many."""
    n = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, _swap(child, groups))
            n += 1
        else:
            n += replace_batchnorm(child, groups)
    return n


def convert(model: nn.Module, model_cfg: dict) -> nn.Module:
    """The `model_build` hook point: `model` with its BatchNorm layers replaced as `model.norm` says."""
    kind = model_cfg["norm"]
    if kind not in KINDS:
        raise WBCError(f"model.norm: '{kind}' is not one of {', '.join(KINDS)} (or null for the backbone's own)")
    groups = 1 if kind == "layer" else int(model_cfg["norm_groups"])
    if groups < 1:
        raise WBCError(f"model.norm_groups: at least 1, got {groups}")
    if replace_batchnorm(model, groups) == 0:
        raise WBCError(f"model.norm: {kind}: {type(model).__name__} has no BatchNorm layer to replace")
    return model
