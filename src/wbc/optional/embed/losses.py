"""Losses on L2-normalised embeddings: label-aware SigLIP sigmoid loss and supervised contrastive (SupCon).

SigLIP (Zhai et al. 2023) scores each pair on its own: -log sigmoid(s * (exp(t') * cos + b)), s = +1 for a
positive pair and -1 otherwise, summed over pairs and divided by the batch size. t' = log 10 and b = -10 at
start, so the many negatives begin near zero loss. Made label-aware here: two images with the same label are
a positive pair (self-pairs excluded), and optionally every image is also scored against learnable class
embeddings (its own class positive, every other class negative), each term with its own t' and b.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import WBCError


def sigmoid_pair_loss(z: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor):
    """Image-image term: same label = positive; the diagonal (an image with itself) is left out."""
    n = z.shape[0]
    logits = logit_scale.exp() * z @ z.T + logit_bias
    sign = 2.0 * (y[:, None] == y[None, :]).to(z.dtype) - 1.0
    off_diag = ~torch.eye(n, dtype=torch.bool, device=z.device)
    return -F.logsigmoid(sign * logits)[off_diag].sum() / n


def sigmoid_class_loss(z: torch.Tensor, y: torch.Tensor, class_emb: torch.Tensor, logit_scale: torch.Tensor,
                       logit_bias: torch.Tensor):
    """Image-class term: one positive (the image's class embedding) and C-1 negatives per image."""
    logits = logit_scale.exp() * z @ F.normalize(class_emb, dim=-1).T + logit_bias
    sign = -torch.ones_like(logits)
    sign[torch.arange(len(y), device=z.device), y] = 1.0
    return -F.logsigmoid(sign * logits).sum() / z.shape[0]


class SigLIPLoss(nn.Module):
    def __init__(self, dim: int, n_classes: int = 0, pairwise: bool = True, class_embeddings: bool = False,
                 t_init: float = math.log(10.0), b_init: float = -10.0):
        super().__init__()
        if not (pairwise or class_embeddings):
            raise WBCError("embed.siglip: enable pairwise and/or class_embeddings")
        if class_embeddings and n_classes < 2:
            raise WBCError("embed.siglip.class_embeddings needs at least 2 classes")
        self.pairwise = pairwise
        self.logit_scale = nn.Parameter(torch.tensor(float(t_init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(b_init)))
        if class_embeddings:
            self.class_emb = nn.Parameter(F.normalize(torch.randn(n_classes, dim), dim=-1))
            self.class_logit_scale = nn.Parameter(torch.tensor(float(t_init)))
            self.class_logit_bias = nn.Parameter(torch.tensor(float(b_init)))
        else:
            self.class_emb = None

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = z.new_zeros(())
        if self.pairwise:
            loss = loss + sigmoid_pair_loss(z, y, self.logit_scale, self.logit_bias)
        if self.class_emb is not None:
            loss = loss + sigmoid_class_loss(z, y, self.class_emb, self.class_logit_scale, self.class_logit_bias)
        return loss

    def temperature_bias(self) -> dict:
        return {"t": float(self.logit_scale.exp()), "b": float(self.logit_bias)}


class SupConLoss(nn.Module):
    """Khosla et al. 2020 (L_out): each anchor's log-softmax over all other images, averaged over its positives;
    anchors without a positive in the batch are skipped."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = z.shape[0]
        eye = torch.eye(n, dtype=torch.bool, device=z.device)
        logits = (z @ z.T / self.temperature).masked_fill(eye, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        pos = (y[:, None] == y[None, :]) & ~eye
        n_pos = pos.sum(1)
        has = n_pos > 0
        if not has.any():
            return z.sum() * 0.0
        per_anchor = log_prob.masked_fill(~pos, 0.0).sum(1)[has] / n_pos[has]
        return -per_anchor.mean()

    def temperature_bias(self) -> dict:
        return {"t": 1.0 / self.temperature}


def build_loss(ecfg: dict, dim: int, n_classes: int) -> nn.Module:
    kind = ecfg["loss"]
    if kind == "siglip":
        s = ecfg["siglip"]
        return SigLIPLoss(dim, n_classes, pairwise=bool(s["pairwise"]), class_embeddings=bool(s["class_embeddings"]),
                          t_init=float(s["t_init"]), b_init=float(s["b_init"]))
    if kind == "supcon":
        return SupConLoss(float(ecfg["supcon_temperature"]))
    raise WBCError(f"embed.loss: unknown loss '{kind}' (siglip | supcon)")
