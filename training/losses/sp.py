"""Tung & Mori 2019, "Similarity-preserving knowledge distillation".

For a batch of b activation maps flattened to A (b, C*H*W): G = A A^T, rows L2-normalised. Loss per
layer pair = ||G_s - G_t||_F^2 / b^2, summed over pairs (the paper's gamma = 3000 is the method weight).
Only batch-internal similarities are compared, so student and teacher shapes may differ freely.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from training.losses.base import KDLoss, LossContext, pair_layers
from training.losses.hooks import NetOutputs


def similarity(feature: torch.Tensor) -> torch.Tensor:
    a = feature.float().flatten(1)
    return F.normalize(a @ a.t(), p=2, dim=1)


class SPLoss(KDLoss):
    name = "sp"

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        super().__init__()
        self.pairs = pairs

    @classmethod
    def from_config(cls, cfg: Any, ctx: LossContext) -> SPLoss:
        return cls(pair_layers(cfg.layers, cfg.teacher_layers, ctx, "last"))

    def student_layers(self) -> list[str]:
        return [s for s, _ in self.pairs]

    def teacher_layers(self) -> list[str]:
        return [t for _, t in self.pairs]

    def forward(
        self, student: NetOutputs, teacher: dict[str, torch.Tensor], targets: torch.Tensor
    ) -> torch.Tensor:
        total = student.logits.new_zeros((), dtype=torch.float32)
        for s_name, t_name in self.pairs:
            g_s = similarity(student.features[s_name])
            g_t = similarity(teacher[f"{self.name}:{t_name}"])
            b = g_s.shape[0]
            total = total + (g_s - g_t).pow(2).sum() / (b * b)
        return total
