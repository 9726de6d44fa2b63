"""Park et al. 2019, "Relational knowledge distillation": relation-based KD on embeddings.

Distance-wise: pairwise Euclidean distances of the batch's penultimate embeddings, each divided by
their mean, matched with the Huber (smooth-L1) loss. Angle-wise: cosines of the angles formed by every
triplet (e_i - e_j, e_k - e_j), matched with Huber. Loss = distance_weight * D + angle_weight * A
(paper: 25 and 50). Student and teacher embeddings may differ in width: only relations are compared.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from training.losses.base import KDLoss, LossContext
from training.losses.hooks import NetOutputs


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    sq = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    d = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * prod).clamp(min=eps).sqrt()
    d = d.clone()
    d[range(len(e)), range(len(e))] = 0
    return d


def distance_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        td = pairwise_distances(t)
        td = td / td[td > 0].mean().clamp(min=1e-12)
    sd = pairwise_distances(s)
    sd = sd / sd[sd > 0].mean().clamp(min=1e-12)
    return F.smooth_l1_loss(sd, td)


def angles(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # (j, i, D): e_i - e_j
    return torch.bmm(diff, diff.transpose(1, 2)).view(-1)


def angle_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        ta = angles(t)
    return F.smooth_l1_loss(angles(s), ta)


class RKDLoss(KDLoss):
    name = "rkd"

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)

    @classmethod
    def from_config(cls, cfg: Any, ctx: LossContext) -> RKDLoss:
        return cls(cfg.distance_weight, cfg.angle_weight)

    @property
    def needs_embedding(self) -> bool:
        return True

    def teacher_keys(self) -> dict[str, str]:
        return {}

    def forward(
        self, student: NetOutputs, teacher: dict[str, torch.Tensor], targets: torch.Tensor
    ) -> torch.Tensor:
        assert student.embedding is not None
        s = student.embedding.float()
        t = teacher["embedding"].float()
        loss = s.new_zeros(())
        if len(s) < 2:
            return loss
        if self.distance_weight:
            loss = loss + self.distance_weight * distance_loss(s, t)
        if self.angle_weight and len(s) >= 3:
            loss = loss + self.angle_weight * angle_loss(s, t)
        return loss
