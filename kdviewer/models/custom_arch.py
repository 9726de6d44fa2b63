"""The project's own architectures, registered with `kdviewer.models.architectures` on import.

* ``densenet40``: a DenseNet with the first two dense blocks of the DenseNet-121 layout (6 + 12 layers,
  growth rate 32, bn_size 4, 64 stem features), then the final norm, global pooling and the classifier.
  1 stem conv + 36 dense-layer convs + 1 transition conv + 1 classifier + the final norm ~ 40 layers
  (the student of the attention-transfer seed, 004). Its module names are torchvision's, so the first
  two blocks of an ImageNet DenseNet-121 state dict load into it as they are.
* ``ghost_resnet50``: torchvision's ResNet-50 whose stage-3 and stage-4 bottleneck 3x3 convolutions are
  replaced by Ghost modules (Han et al., "GhostNet: More Features from Cheap Operations", CVPR 2020):
  a primary convolution producing ``out / ratio`` maps plus cheap depthwise convolutions generating the
  rest. Built by module replacement, so every other weight keeps ResNet-50's name and shape.
* ``cxrnet_s``: a small, fast 4-stage CNN (about 0.3 M parameters) for quick experiments and tests.

The viewer imports this module (through `architectures`) so it can rebuild these nets from a bundle.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision import models as tvm

from kdviewer.models.architectures import (
    ArchSpec,
    _replace_head,
    adapt_first_conv,
    get_module,
    register,
)

# --------------------------------------------------------------------------------------- DenseNet-40


DENSENET40_SPEC = ArchSpec(
    "densenet40",
    target_layer="features.norm5",
    head="classifier",
    feature_layers=("features.denseblock1", "features.denseblock2"),
)


def build_densenet40(num_classes: int, in_channels: int = 1, dropout: float = 0.0) -> nn.Module:
    """DenseNet-121 layout truncated after its second dense block (growth 32, blocks (6, 12))."""
    model = tvm.DenseNet(growth_rate=32, block_config=(6, 12), num_init_features=64, bn_size=4)  # type: ignore[arg-type]
    adapt_first_conv(model, "features.conv0", in_channels)
    _replace_head(model, "classifier", num_classes, dropout)
    return model


# --------------------------------------------------------------------------------- ghost ResNet-50


class GhostModule(nn.Module):
    """Ghost module: ``ceil(out/ratio)`` primary maps by a k x k conv, the rest by cheap depthwise convs.

    Output = concat(primary, cheap(primary))[:, :out_channels]. Each half has its own BN (+ ReLU), as
    in GhostNet; the bottleneck's own ``bn2``/ReLU still follow when it replaces ``conv2``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        ratio: int = 2,
        dw_size: int = 3,
        relu: bool = True,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        init_channels = math.ceil(out_channels / ratio)
        new_channels = init_channels * (ratio - 1)
        act: type[nn.Module] = nn.ReLU if relu else nn.Identity
        self.primary_conv = nn.Sequential(
            nn.Conv2d(in_channels, init_channels, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(init_channels),
            act(),
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(
                init_channels, new_channels, dw_size, 1, dw_size // 2, groups=init_channels, bias=False
            ),
            nn.BatchNorm2d(new_channels),
            act(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        primary = self.primary_conv(x)
        cheap = self.cheap_operation(primary)
        return torch.cat([primary, cheap], dim=1)[:, : self.out_channels]


def ghostify_resnet(model: nn.Module, stages: tuple[str, ...] = ("layer3", "layer4"), ratio: int = 2) -> int:
    """Replace every bottleneck ``conv2`` (3x3) in ``stages`` by a `GhostModule`; returns how many."""
    replaced = 0
    for stage in stages:
        for block in get_module(model, stage).children():
            conv = getattr(block, "conv2", None)
            if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (3, 3):
                continue
            block.conv2 = GhostModule(
                conv.in_channels, conv.out_channels, kernel_size=3, stride=conv.stride[0], ratio=ratio
            )
            replaced += 1
    return replaced


_RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")
GHOST_RESNET50_SPEC = ArchSpec("ghost_resnet50", "layer4", "fc", _RESNET_LAYERS)


def build_ghost_resnet50(num_classes: int, in_channels: int = 1, dropout: float = 0.0) -> nn.Module:
    model = tvm.resnet50(weights=None)
    adapt_first_conv(model, "conv1", in_channels)
    _replace_head(model, "fc", num_classes, dropout)
    ghostify_resnet(model)
    return model


# -------------------------------------------------------------------------------------- cxrnet_s


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class CXRNetS(nn.Module):
    """stem (stride 2) -> 4 stages of two 3x3 conv-BN-ReLU (each halving the size) -> pool -> fc."""

    def __init__(self, num_classes: int, in_channels: int = 1, dropout: float = 0.0, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = _conv_bn(in_channels, w, 2)
        self.layer1 = nn.Sequential(_conv_bn(w, w, 1), _conv_bn(w, w, 1))
        self.layer2 = nn.Sequential(_conv_bn(w, 2 * w, 2), _conv_bn(2 * w, 2 * w, 1))
        self.layer3 = nn.Sequential(_conv_bn(2 * w, 4 * w, 2), _conv_bn(4 * w, 4 * w, 1))
        self.layer4 = nn.Sequential(_conv_bn(4 * w, 8 * w, 2), _conv_bn(8 * w, 8 * w, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc: nn.Module = nn.Linear(8 * w, num_classes)
        if dropout > 0:
            self.fc = nn.Sequential(nn.Dropout(dropout), self.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


CXRNET_S_SPEC = ArchSpec("cxrnet_s", target_layer="layer4", head="fc", feature_layers=_RESNET_LAYERS)


def build_cxrnet_s(num_classes: int, in_channels: int = 1, dropout: float = 0.0) -> nn.Module:
    return CXRNetS(num_classes, in_channels, dropout)


register(DENSENET40_SPEC, build_densenet40)
register(GHOST_RESNET50_SPEC, build_ghost_resnet50)
register(CXRNET_S_SPEC, build_cxrnet_s)
