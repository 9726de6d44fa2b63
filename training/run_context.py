"""What one run shares between its stages: config, event writer, device/AMP, data, stop monitor, saver.

`RunContext` is built by `training.engine.run` once the data are loaded, and passed to the stage loop
(`training.stage`), the teacher cache (`training.teacher_cache`), the evaluation events
(`training.validation`) and the export stage (`training.export_stage`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdviewer.events import EventWriter
from training import distributed as ddp
from training.checkpoint import AsyncSaver
from training.config import RunConfig
from training.data import BatchLoader, DataSplits, ImageDataset
from training.placement import Placement
from training.stopping import StopMonitor


@dataclass
class RunResult:
    status: str  # "completed" | "stopped"
    output_dir: Path
    bundle: Path | None = None
    checkpoint: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    student: nn.Module | None = field(default=None, repr=False)
    teacher: nn.Module | None = field(default=None, repr=False)


@dataclass
class RunContext:
    cfg: RunConfig
    events: EventWriter
    device: torch.device
    amp: torch.dtype | None
    channels_last: bool
    dist: ddp.DistEnv
    out: Path
    ckpt_dir: Path
    stop: StopMonitor
    splits: DataSplits
    sets: dict[str, ImageDataset]
    loaders: dict[str, BatchLoader]
    history: list[dict[str, Any]]
    t0: float
    stage_steps: dict[str, int]
    resume_state: dict[str, Any] | None = None
    last_checkpoint: Path | None = None
    saver: AsyncSaver = field(default_factory=AsyncSaver)

    @property
    def placement(self) -> Placement:
        """Where this run's networks and batches go (``training.placement``)."""
        return Placement(self.device, self.amp, self.channels_last)




def _autocast(ctx: RunContext) -> contextlib.AbstractContextManager[Any]:
    return ctx.placement.autocast()


def _to_input(x: torch.Tensor, ctx: RunContext) -> torch.Tensor:
    return ctx.placement.inputs(x)
