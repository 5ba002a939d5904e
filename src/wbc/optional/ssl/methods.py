"""The self-supervised methods, assembled from lightly's heads, losses and momentum helpers around a timm backbone
(`forward_features` + pooling: a timm model without classifier).

- DINO (Caron et al. 2021): a student and an exponential-moving-average teacher; the teacher sees the 2 global crops,
  the student every crop; cross-entropy between the centred, sharpened teacher distribution and the student's.
- FastSiam (Pototzky et al. 2022): SimSiam with several views, each view's prediction matched to the mean projection
  of the others; no teacher, no negatives, stable at small batches (a CPU's).
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


def _drop_path_off(model: nn.Module) -> nn.Module:
    """The teacher is a target, not a regulariser: its stochastic depth is switched off."""
    for m in model.modules():
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    return model


def _by_size(views: list[torch.Tensor]) -> list[list[int]]:
    """Indices of equally sized views, in order of first appearance: each group is one batched forward pass."""
    groups: dict[tuple, list[int]] = {}
    for i, v in enumerate(views):
        groups.setdefault(tuple(v.shape[-2:]), []).append(i)
    return list(groups.values())


def _forward_views(backbone: nn.Module, head: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """head(backbone(view)) of every view, one forward pass per crop size (DINO's multi-crop wrapper)."""
    out: list = [None] * len(views)
    for idx in _by_size(views):
        z = head(backbone(torch.cat([views[i] for i in idx])))
        for i, part in zip(idx, z.chunk(len(idx))):
            out[i] = part
    return out


class DINO(nn.Module):
    has_teacher = True

    def __init__(self, backbone: nn.Module, feat_dim: int, d: dict):
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.student_backbone = backbone
        dims = (feat_dim, int(d["hidden_dim"]), int(d["bottleneck_dim"]), int(d["out_dim"]))
        with warnings.catch_warnings():  # lightly's head uses torch's deprecated (still working) weight_norm
            warnings.simplefilter("ignore", FutureWarning)
            self.student_head = DINOProjectionHead(*dims, freeze_last_layer=int(d["freeze_last_layer"]))
            self.teacher_head = DINOProjectionHead(*dims)
        # the teacher starts as the student (DINO's reference code; lightly's example draws a fresh head); the head is
        # built anew and loaded, since its weight-normed layer cannot be deep-copied
        self.teacher_backbone = _drop_path_off(copy.deepcopy(backbone))
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(output_dim=int(d["out_dim"]), warmup_teacher_temp=float(d["warmup_teacher_temp"]),
                                  teacher_temp=float(d["teacher_temp"]),
                                  warmup_teacher_temp_epochs=int(d["warmup_teacher_temp_epochs"]),
                                  student_temp=float(d["student_temp"]), center_momentum=float(d["center_momentum"]))

    def student_parameters(self) -> list[nn.Parameter]:
        return [p for m in (self.student_backbone, self.student_head) for p in m.parameters() if p.requires_grad]

    def momentum_update(self, m: float) -> None:
        from lightly.models.utils import update_momentum

        update_momentum(self.student_backbone, self.teacher_backbone, m)
        update_momentum(self.student_head, self.teacher_head, m)

    def loss(self, views: list[torch.Tensor], epoch: int) -> torch.Tensor:
        with torch.no_grad():
            teacher = _forward_views(self.teacher_backbone, self.teacher_head, views[:2])
        student = _forward_views(self.student_backbone, self.student_head, views)
        return self.criterion(teacher, student, epoch=epoch)

    def before_step(self, epoch: int) -> None:
        self.student_head.cancel_last_layer_gradients(current_epoch=epoch)

    def backbone(self, which: str) -> nn.Module:
        return self.teacher_backbone if which == "teacher" else self.student_backbone


class FastSiam(nn.Module):
    has_teacher = False

    def __init__(self, backbone: nn.Module, feat_dim: int, d: dict):
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead

        super().__init__()
        self.student_backbone = backbone
        self.projection_head = SimSiamProjectionHead(feat_dim, int(d["proj_hidden_dim"]), int(d["proj_dim"]))
        self.prediction_head = SimSiamPredictionHead(int(d["proj_dim"]), int(d["pred_hidden_dim"]), int(d["proj_dim"]))
        self.criterion = NegativeCosineSimilarity()

    def student_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def momentum_update(self, m: float) -> None:
        """No teacher."""

    def loss(self, views: list[torch.Tensor], epoch: int) -> torch.Tensor:
        z = _forward_views(self.student_backbone, self.projection_head, views)
        p = [self.prediction_head(zi) for zi in z]
        z = torch.stack(z).detach()  # stop-gradient on the targets
        n = len(views)
        others = (z.sum(0, keepdim=True) - z) / (n - 1)  # the mean of the other views' projections, per view
        return sum(self.criterion(p[i], others[i]) for i in range(n)) / n

    def before_step(self, epoch: int) -> None:
        """Nothing frozen."""

    def backbone(self, which: str) -> nn.Module:
        return self.student_backbone


METHODS = {"dino": DINO, "fastsiam": FastSiam}


def build_method(s: dict, backbone: nn.Module, feat_dim: int) -> nn.Module:
    return METHODS[s["method"]](backbone, feat_dim, s[s["method"]])
