"""Hinton, Vinyals & Dean 2015, "Distilling the knowledge in a neural network": response-based KD.

Single-label: ``T^2 * KL(softmax(t/T) || softmax(s/T))`` (batch mean). The combiner weighs it by
``alpha`` and the cross-entropy on the labels by ``1 - alpha``.
Multi-label: each class is an independent Bernoulli, so the soft targets are ``sigmoid(t/T)`` and the
term is ``T^2 * mean_k KL(Bern(sigmoid(t_k/T)) || Bern(sigmoid(s_k/T)))`` — BCE against the soft targets
minus their entropy, i.e. the same gradient as soft-target BCE but exactly 0 when student == teacher.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from training.losses.base import KDLoss, LossContext
from training.losses.hooks import NetOutputs


def hinton_kd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float, multi_label: bool = False
):
    s = student_logits.float() / T
    t = teacher_logits.float() / T
    if multi_label:
        # KL between Bernoullis, written with logsigmoid for stability.
        p_t = torch.sigmoid(t)
        log_p_s, log_q_s = F.logsigmoid(s), F.logsigmoid(-s)
        log_p_t, log_q_t = F.logsigmoid(t), F.logsigmoid(-t)
        kl = p_t * (log_p_t - log_p_s) + (1 - p_t) * (log_q_t - log_q_s)
        return kl.mean() * T * T
    return (
        F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="batchmean", log_target=True)
        * T
        * T
    )


class HintonLoss(KDLoss):
    name = "hinton"

    def __init__(self, T: float = 4.0, multi_label: bool = False) -> None:
        super().__init__()
        self.T = float(T)
        self.multi_label = multi_label

    @classmethod
    def from_config(cls, cfg: Any, ctx: LossContext) -> HintonLoss:
        return cls(T=cfg.T, multi_label=ctx.task == "multi-label")

    @property
    def needs_logits(self) -> bool:
        return True

    def teacher_keys(self) -> dict[str, str]:
        return {}

    def forward(
        self, student: NetOutputs, teacher: dict[str, torch.Tensor], targets: torch.Tensor
    ) -> torch.Tensor:
        return hinton_kd(student.logits, teacher["logits"], self.T, self.multi_label)
