"""Romero et al. 2015, "FitNets: hints for thin deep nets": feature-based KD.

For each (student layer, teacher layer) pair a 1x1-convolution regressor maps the student's channels
to the teacher's; if the spatial sizes differ the student map is resized (area pooling when larger,
bilinear when smaller) to the teacher's. Loss = mean squared error, summed over pairs. When the channel
counts match, the regressor starts as the identity (so a student equal to its teacher has zero loss).
The regressors are trained with the student and saved in its checkpoints, never exported.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.losses.base import KDLoss, LossContext, pair_layers
from training.losses.hooks import NetOutputs


def match_size(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class FitNetsLoss(KDLoss):
    name = "fitnets"

    def __init__(
        self, pairs: list[tuple[str, str]], student_channels: list[int], teacher_channels: list[int]
    ):
        super().__init__()
        self.pairs = pairs
        self.regressors = nn.ModuleList()
        for cs, ct in zip(student_channels, teacher_channels, strict=True):
            conv = nn.Conv2d(cs, ct, kernel_size=1, bias=False)
            if cs == ct:
                with torch.no_grad():
                    conv.weight.copy_(torch.eye(cs).view(cs, cs, 1, 1))
            self.regressors.append(conv)

    @classmethod
    def from_config(cls, cfg: Any, ctx: LossContext) -> FitNetsLoss:
        pairs = pair_layers(cfg.layers, cfg.teacher_layers, ctx, "last")
        return cls(
            pairs,
            [ctx.student_shapes[s][0] for s, _ in pairs],
            [ctx.teacher_shapes[t][0] for _, t in pairs],
        )

    def student_layers(self) -> list[str]:
        return [s for s, _ in self.pairs]

    def teacher_layers(self) -> list[str]:
        return [t for _, t in self.pairs]

    def forward(
        self, student: NetOutputs, teacher: dict[str, torch.Tensor], targets: torch.Tensor
    ) -> torch.Tensor:
        total = student.logits.new_zeros((), dtype=torch.float32)
        for (s_name, t_name), reg in zip(self.pairs, self.regressors, strict=True):
            t = teacher[f"{self.name}:{t_name}"].float()
            s = match_size(reg(student.features[s_name]).float(), t.shape[-2:])
            total = total + F.mse_loss(s, t)
        return total
