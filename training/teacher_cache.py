"""The frozen teacher's per-image records (logits, features, attention maps), computed once and cached.

Without augmentation the teacher sees the same input every epoch, so its outputs are computed once
before the student stage (`build_teacher_cache`) and each step takes its batch's rows (`TeacherCache`).
``runtime.teacher_cache`` (auto | on | off) and ``runtime.teacher_cache_max_mb`` decide; with
augmentation or over the budget the stage calls `teacher_record` every step instead (the same code
path, so cached and live records are identical).
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from training.data import BatchLoader, ImageDataset
from training.losses import FeatureHooks, KDCombiner
from training.placement import Placement
from training.run_context import RunContext


class TeacherCache:
    """Frozen-teacher records for every training image, computed once (valid only without augmentation)."""

    def __init__(self, records: dict[str, torch.Tensor]) -> None:
        self.records = records

    def take(self, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        return {k: v[idx].to(device, non_blocking=True) for k, v in self.records.items()}


def teacher_record(
    teacher: nn.Module, combiner: KDCombiner, hooks: FeatureHooks, x: torch.Tensor, amp: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """The frozen teacher's per-sample record for a batch (the one code path for cached and live)."""
    with (
        torch.no_grad(),
        torch.autocast(x.device.type, dtype=amp) if amp is not None else contextlib.nullcontext(),
    ):
        return combiner.teacher_record(hooks.outputs(teacher(x)))


def build_teacher_cache(
    teacher: nn.Module,
    combiner: KDCombiner,
    dataset: ImageDataset,
    *,
    device: torch.device,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
    batch_size: int = 64,
    max_bytes: int | None = None,
) -> TeacherCache | None:
    """Teacher records for every image of ``dataset`` (in order), or None if over ``max_bytes``."""
    place = Placement(device, amp, channels_last)
    order = BatchLoader(dataset, batch_size)
    records: dict[str, torch.Tensor] = {}
    teacher = place.model(teacher).eval()
    with FeatureHooks(teacher, combiner.teacher_layers(), embedding=combiner.needs_embedding) as hooks:
        for idx, x, _ in place.batches(order):
            rec = teacher_record(teacher, combiner, hooks, x, amp)
            if not records:
                per_item = sum(v[0].numel() * 4 for v in rec.values())
                if max_bytes is not None and per_item * len(dataset) > max_bytes:
                    return None
                records = {
                    k: torch.empty((len(dataset), *v.shape[1:]), dtype=torch.float32) for k, v in rec.items()
                }
            for k, v in rec.items():
                records[k][idx] = v.detach().float().cpu()
    return TeacherCache(records)


def _teacher_cache_for(
    ctx: RunContext, teacher: nn.Module, combiner: KDCombiner, loader: BatchLoader
) -> TeacherCache | None:
    policy = ctx.cfg.runtime.teacher_cache
    if policy == "off" or not combiner.needs_teacher:
        return None
    if loader.augment is not None:
        if policy == "on" and ctx.dist.is_main:
            ctx.events.emit(
                "log",
                level="warning",
                message=("teacher cache disabled: augmentation changes the teacher's input every epoch"),
            )
        return None
    t0 = time.time()
    budget = None if policy == "on" else ctx.cfg.runtime.teacher_cache_max_mb * 2**20
    cache = build_teacher_cache(
        teacher,
        combiner,
        loader.dataset,
        device=ctx.device,
        amp=ctx.amp,
        channels_last=ctx.channels_last,
        batch_size=ctx.cfg.runtime.eval_batch_size or 2 * ctx.cfg.optim.batch_size,
        max_bytes=budget,
    )
    if ctx.dist.is_main:
        if cache is None:
            ctx.events.emit(
                "log",
                level="info",
                message=("teacher outputs exceed runtime.teacher_cache_max_mb: recomputing them every step"),
            )
        else:
            mb = sum(v.numel() * 4 for v in cache.records.values()) / 2**20
            ctx.events.emit(
                "log",
                level="info",
                message=(
                    f"teacher outputs cached for {len(loader.dataset)} images "
                    f"({mb:.1f} MB, {time.time() - t0:.1f} s): "
                    "the frozen teacher runs once instead of every epoch"
                ),
            )
    return cache

