"""Where a model and its inputs run: ONE object decides the device, the autocast dtype and the layout.

Every place that runs a network on data — the stage loop, the per-epoch validation, the teacher cache,
the final evaluation, the best-checkpoint reload, the bundle's evaluation / INT8 calibration / OOD
statistics / complexity, pruning — takes a `Placement` and lets it place both sides::

    place = Placement(torch.device("cuda"), torch.bfloat16, channels_last=True)
    model = place.model(model)                 # parameters fp32 on cuda, channels_last
    for idx, x, y in place.batches(loader):    # inputs fp32 on cuda, channels_last
        with place.autocast():
            out = model(x)

so a model left on the CPU can no longer meet inputs a loader put on a GPU (the bug that killed the
final evaluation of GPU runs: CUDA bf16 inputs fed to a CPU model). `Placement.of(model)` is the
placement a model already has (for code handed a model by a caller); `Placement.cpu()` the export's.

Parameters always stay fp32: lower precision comes only from autocast (bf16/fp16), which casts inside
the supported ops and keeps the model's weights and its outputs' consumers in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Placement:
    device: torch.device
    amp: torch.dtype | None = None  # autocast dtype (None: fp32)
    channels_last: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))

    @classmethod
    def cpu(cls) -> Placement:
        """fp32, contiguous, CPU: the export's placement (ONNX export, INT8, complexity, OOD)."""
        return cls(torch.device("cpu"))

    @classmethod
    def of(cls, model: nn.Module) -> Placement:
        """The device a model's parameters (or buffers) are on; fp32, no autocast."""
        for t in (*model.parameters(), *model.buffers()):
            return cls(t.device)
        return cls.cpu()

    def model(self, model: nn.Module) -> nn.Module:
        """``model`` moved (in place) to this device, fp32 parameters, this memory layout."""
        model = model.to(device=self.device, dtype=torch.float32)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return model.to(memory_format=fmt)

    def inputs(self, x: torch.Tensor | Any) -> torch.Tensor:
        """A batch of images on this device, fp32, this memory layout."""
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        x = x.to(self.device, dtype=torch.float32, non_blocking=self.device.type == "cuda")
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def batches(
        self, loader: Any, epoch: int = 0, start: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(indices, images, targets)`` of a `training.data.BatchLoader`, images placed here."""
        for idx, x, y in loader.iter_batches(epoch, start, self.device):
            yield idx, self.inputs(x), y

    def pairs(self, loader: Iterable) -> Iterator[tuple[torch.Tensor, Any]]:
        """``(images, targets)`` of any loader yielding ``(images, targets, ...)``, images placed here."""
        for batch in loader:
            yield self.inputs(batch[0]), batch[1]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp)

    def describe(self) -> str:
        amp = str(self.amp).replace("torch.", "") if self.amp is not None else "fp32"
        return f"{self.device} {amp}{' channels_last' if self.channels_last else ''}"
