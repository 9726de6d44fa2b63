"""Zagoruyko & Komodakis 2017, "Paying more attention to attention": attention transfer (AT).

Attention map of a feature map F (N, C, H, W): ``Q = mean_c |F_c|^p`` (p = 2), flattened and
L2-normalised per sample. Loss = ``beta / 2 * sum_layers D(q_s, q_t)`` where D is

* ``squared_mean`` (default): mean over the batch and the H*W positions of ``(q_s - q_t)^2`` — the
  authors' reference implementation, for which their beta = 1000 was tuned;
* ``l2``: the paper's equation, the batch mean of ``||q_s - q_t||_2``.

If the two maps differ in size, the teacher's map is resized to the student's before normalising. The
teacher record keeps only the (un-normalised) map, so caching it costs H*W floats per image.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from training.losses.base import KDLoss, LossContext, pair_layers
from training.losses.fitnets import match_size
from training.losses.hooks import NetOutputs


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W): mean over channels of |F|^p (not yet normalised)."""
    return feature.float().abs().pow(p).mean(dim=1)


def normalise(am: torch.Tensor) -> torch.Tensor:
    return F.normalize(am.flatten(1), p=2, dim=1, eps=1e-12)


class AttentionLoss(KDLoss):
    name = "at"

    def __init__(
        self,
        pairs: list[tuple[str, str]],
        beta: float = 1000.0,
        p: float = 2.0,
        distance: str = "squared_mean",
    ) -> None:
        super().__init__()
        self.pairs = pairs
        self.beta = float(beta)
        self.p = float(p)
        self.distance = distance

    @classmethod
    def from_config(cls, cfg: Any, ctx: LossContext) -> AttentionLoss:
        return cls(pair_layers(cfg.layers, cfg.teacher_layers, ctx, "all"), cfg.beta, cfg.p, cfg.distance)

    def student_layers(self) -> list[str]:
        return [s for s, _ in self.pairs]

    def teacher_layers(self) -> list[str]:
        return [t for _, t in self.pairs]

    def teacher_transform(self, layer: str, feature: torch.Tensor) -> torch.Tensor:
        return attention_map(feature, self.p)

    def forward(
        self, student: NetOutputs, teacher: dict[str, torch.Tensor], targets: torch.Tensor
    ) -> torch.Tensor:
        total = student.logits.new_zeros((), dtype=torch.float32)
        for s_name, t_name in self.pairs:
            am_s = attention_map(student.features[s_name], self.p)
            am_t = teacher[f"{self.name}:{t_name}"].float()
            if am_t.shape[-2:] != am_s.shape[-2:]:
                am_t = match_size(am_t.unsqueeze(1), am_s.shape[-2:]).squeeze(1)
            diff = normalise(am_s) - normalise(am_t)
            if self.distance == "l2":
                total = total + diff.norm(p=2, dim=1).mean()
            else:
                total = total + diff.pow(2).mean()
        return self.beta / 2.0 * total
