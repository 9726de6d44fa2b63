"""Common ground of the KD losses: the `KDLoss` interface and how student/teacher layers are paired.

A loss reads the student's `NetOutputs` (with gradients) and a *teacher record*: a flat dict of tensors
computed from the frozen teacher (``"logits"``, ``"embedding"``, ``"<method>:<teacher layer>"``). The
record is per sample (first dimension = batch), so the engine may compute it once per image and cache
it when augmentation is off; `KDLoss.teacher_transform` may shrink a feature map before it is stored
(attention transfer keeps only the attention map). The same transform runs whether the record is
cached or recomputed, so both paths give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from training.losses.hooks import NetOutputs


@dataclass
class LossContext:
    """What a loss needs to know to build itself (shapes come from a dummy forward: `probe_shapes`)."""

    task: str  # "single-label" | "multi-label"
    student_layers: tuple[str, ...]  # the student's ArchSpec.feature_layers
    teacher_layers: tuple[str, ...]
    student_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per-sample (C, H, W)
    teacher_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    student_embedding: int = 0
    teacher_embedding: int = 0


def pair_layers(
    student: list[str] | None, teacher: list[str] | None, ctx: LossContext, which: str
) -> list[tuple[str, str]]:
    """Pair student and teacher layers.

    Explicit lists are paired in order (same length required). Otherwise the architectures' feature
    layers are paired from the first (shallowest) and truncated to the shorter list; ``which`` picks
    "all" of those pairs or only the "last" (deepest shared) one.
    """
    if student and teacher:
        if len(student) != len(teacher):
            raise ValueError("layers and teacher_layers must have the same length")
        return list(zip(student, teacher, strict=True))
    s = list(student or ctx.student_layers)
    t = list(teacher or ctx.teacher_layers)
    n = min(len(s), len(t))
    if n == 0:
        raise ValueError("no feature layers to pair: set layers and teacher_layers")
    if student and not teacher:
        t = t[:n] if len(s) > 1 else [t[n - 1]]
        return list(zip(s, t, strict=False))
    pairs = list(zip(s[:n], t[:n], strict=True))
    return pairs if which == "all" else pairs[-1:]


class KDLoss(nn.Module):
    """One distillation term. Subclasses set ``name`` and implement `forward`."""

    name = "kd"

    def student_layers(self) -> list[str]:
        return []

    def teacher_layers(self) -> list[str]:
        return []

    @property
    def needs_embedding(self) -> bool:
        return False

    @property
    def needs_logits(self) -> bool:
        return False

    def teacher_keys(self) -> dict[str, str]:
        """Record key -> teacher layer whose (transformed) output fills it."""
        return {f"{self.name}:{layer}": layer for layer in self.teacher_layers()}

    def teacher_transform(self, layer: str, feature: torch.Tensor) -> torch.Tensor:
        """Per-sample reduction of a teacher feature before it is recorded (default: as is, float32)."""
        return feature.float()

    def forward(
        self, student: NetOutputs, teacher: dict[str, torch.Tensor], targets: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError
