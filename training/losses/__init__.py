"""Knowledge-distillation losses, one method per file, combined as a weighted sum with the task loss.

========  =============================================  ==========================================
name      method                                         reads
========  =============================================  ==========================================
hinton    Hinton et al. 2015 (soft targets, T, alpha)    logits
fitnets   Romero et al. 2015 (hint + 1x1 regressor)      intermediate features
at        Zagoruyko & Komodakis 2017 (attention maps)    intermediate features
rkd       Park et al. 2019 (distance + angle relations)  penultimate embeddings
sp        Tung & Mori 2019 (similarity preserving)       intermediate features
========  =============================================  ==========================================

`build_combiner` turns ``cfg.kd`` into a `KDCombiner`; ``combiner(student_outputs, teacher_record,
targets)`` returns ``(total, components)`` where components maps ``"task"`` and each method name to its
*weighted* value (what the ``step`` events report). Intermediate features come from `FeatureHooks`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdviewer.models.architectures import spec_of
from training.losses.attention import AttentionLoss
from training.losses.base import KDLoss, LossContext, pair_layers
from training.losses.fitnets import FitNetsLoss
from training.losses.hinton import HintonLoss, hinton_kd
from training.losses.hooks import FeatureHooks, NetOutputs
from training.losses.rkd import RKDLoss
from training.losses.sp import SPLoss

LOSSES: dict[str, type[KDLoss]] = {
    "hinton": HintonLoss,
    "fitnets": FitNetsLoss,
    "at": AttentionLoss,
    "rkd": RKDLoss,
    "sp": SPLoss,
}

__all__ = [
    "LOSSES",
    "AttentionLoss",
    "FeatureHooks",
    "FitNetsLoss",
    "HintonLoss",
    "KDCombiner",
    "KDLoss",
    "LossContext",
    "NetOutputs",
    "RKDLoss",
    "SPLoss",
    "build_combiner",
    "hinton_kd",
    "pair_layers",
    "probe_shapes",
    "task_loss",
]


def task_loss(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Cross-entropy (int64 targets) or BCE-with-logits (float multi-hot targets)."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())
    return F.cross_entropy(logits.float(), targets)


class KDCombiner(nn.Module):
    """``total = task_weight * task + sum_i weight_i * loss_i``; holds trainable parts (regressors)."""

    def __init__(self, task: str, task_weight: float, losses: list[tuple[KDLoss, float]]) -> None:
        super().__init__()
        self.multi_label = task == "multi-label"
        self.task_weight = float(task_weight)
        self.losses = nn.ModuleList([loss for loss, _ in losses])
        self.weights = [float(w) for _, w in losses]

    # What the engine must capture -----------------------------------------------------------------
    def student_layers(self) -> list[str]:
        return list(dict.fromkeys(layer for loss in self.losses for layer in loss.student_layers()))

    def teacher_layers(self) -> list[str]:
        return list(dict.fromkeys(layer for loss in self.losses for layer in loss.teacher_layers()))

    @property
    def needs_embedding(self) -> bool:
        return any(loss.needs_embedding for loss in self.losses)

    @property
    def needs_teacher(self) -> bool:
        return len(self.losses) > 0

    def teacher_record(self, outputs: NetOutputs) -> dict[str, torch.Tensor]:
        """Frozen-teacher outputs -> the per-sample tensors the losses read (cacheable)."""
        record: dict[str, torch.Tensor] = {}
        if any(loss.needs_logits for loss in self.losses):
            record["logits"] = outputs.logits.float()
        if self.needs_embedding:
            assert outputs.embedding is not None
            record["embedding"] = outputs.embedding.float()
        for loss in self.losses:
            for key, layer in loss.teacher_keys().items():
                record[key] = loss.teacher_transform(layer, outputs.features[layer])
        return record

    def forward(
        self, student: NetOutputs, teacher: dict[str, torch.Tensor] | None, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        components: dict[str, torch.Tensor] = {}
        total = student.logits.new_zeros((), dtype=torch.float32)
        if self.task_weight > 0 or teacher is None:
            weight = self.task_weight if teacher is not None else 1.0
            value = weight * task_loss(student.logits, targets, self.multi_label)
            components["task"] = value
            total = total + value
        if teacher is not None:
            for loss, weight in zip(self.losses, self.weights, strict=True):
                value = weight * loss(student, teacher, targets)
                components[loss.name] = value
                total = total + value
        return total, components


@torch.no_grad()
def probe_shapes(
    model: nn.Module, layers: list[str], in_channels: int, size: int
) -> tuple[dict[str, tuple[int, ...]], int]:
    """Per-sample output shapes of ``layers`` and the embedding width, from one dummy forward (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(1, in_channels, size, size, device=param.device, dtype=param.dtype)
        with FeatureHooks(model, layers, embedding=True) as hooks:
            out = hooks.outputs(model(x))
    finally:
        model.train(was_training)
    shapes = {name: tuple(f.shape[1:]) for name, f in out.features.items()}
    return shapes, int(out.embedding.shape[1]) if out.embedding is not None else 0


def build_combiner(
    kd_cfg: Any,
    task: str,
    task_weight: float,
    student: nn.Module,
    teacher: nn.Module | None,
    in_channels: int,
    input_size: int,
) -> KDCombiner:
    """Build the configured methods for this student/teacher pair (``kd_cfg``: a `KDConfig`)."""
    methods = list(getattr(kd_cfg, "methods", []) or [])
    if not methods or teacher is None:
        return KDCombiner(task, task_weight if teacher is not None else 1.0, [])
    s_spec, t_spec = spec_of(student), spec_of(teacher)
    s_layers = sorted(
        {*s_spec.feature_layers, *(x for m in methods for x in (getattr(m, "layers", None) or []))}
    )
    t_layers = sorted(
        {*t_spec.feature_layers, *(x for m in methods for x in (getattr(m, "teacher_layers", None) or []))}
    )
    s_shapes, s_emb = probe_shapes(student, s_layers, in_channels, input_size)
    t_shapes, t_emb = probe_shapes(teacher, t_layers, in_channels, input_size)
    ctx = LossContext(task, s_spec.feature_layers, t_spec.feature_layers, s_shapes, t_shapes, s_emb, t_emb)
    losses: list[tuple[KDLoss, float]] = []
    for m in methods:
        loss = LOSSES[m.name].from_config(m, ctx)
        weight = m.alpha * m.weight if m.name == "hinton" else (1.0 if m.name == "at" else m.weight)
        losses.append((loss, weight))
    return KDCombiner(task, task_weight, losses)
