"""Architectures for small inputs (28-64 px, e.g. PneumoniaMNIST), registered with `architectures` on import.

ImageNet-style nets downsample by 4 in their stem (7x7 stride-2 convolution + max-pool): a 28 px image
is 7 px wide before the first residual stage and 1 px after the last. The nets here keep the full
resolution in their first stage instead (a "CIFAR stem": one 3x3 stride-1 convolution, no max-pool),
so at 28 px the four stages see 28, 14, 7 and 4 px, and teacher and student stages line up one to one
for feature distillation (FitNets, attention transfer).

* ``resnet18_s``: ResNet-18 (torchvision `BasicBlock`, blocks 2-2-2-2, widths 64-128-256-512) with the
  CIFAR stem. Module names are torchvision's (``conv1``, ``layer1``..``layer4``, ``fc``), so a
  torchvision ResNet-18 state dict loads into everything but the (differently shaped) stem.
* ``resnet18_s_half``: the same at half width (32-64-128-256): about 1/4 of the FLOPs, for
  CPU-budgeted teachers.
* ``smallcnn_s``: a plain CNN, a 3x3 stem then four stages of one 3x3 conv-BN-ReLU each (widths
  16-32-64-128, stages 2-4 halve the size): 0.10 M parameters, 0.010 GFLOPs at 28 px, the same stage
  geometry as the teachers. At 28 px a forward pass costs tens of microseconds of arithmetic, so ONNX
  Runtime latency is dominated by per-operator overhead: few layers matter more than few channels.
* ``smallcnn_m``: the same with two convolutions per stage (0.30 M parameters, 0.025 GFLOPs).

Every net exposes ``layer4`` as the CAM target, ``fc`` as the head (its input, the pooled
``layer4`` features, is the embedding used by RKD and by the OOD guard) and ``layer1``..``layer4`` as
feature layers. The viewer imports this module (through `architectures`) so bundles of these nets
can be rebuilt.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock

from kdviewer.models.architectures import ArchSpec, register

_LAYERS = ("layer1", "layer2", "layer3", "layer4")


def _head(features: int, num_classes: int, dropout: float) -> nn.Module:
    fc = nn.Linear(features, num_classes)
    return nn.Sequential(nn.Dropout(dropout), fc) if dropout > 0 else fc


class SmallResNet(nn.Module):
    """ResNet with a 3x3 stride-1 stem and no max-pool (the CIFAR layout), torchvision module names."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        dropout: float = 0.0,
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
        blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
    ) -> None:
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(widths[0], blocks[0], 1)
        self.layer2 = self._stage(widths[1], blocks[1], 2)
        self.layer3 = self._stage(widths[2], blocks[2], 2)
        self.layer4 = self._stage(widths[3], blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = _head(widths[3], num_classes, dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # zero-init the last BN of each residual branch (He et al. "bag of tricks")
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SmallCNN(nn.Module):
    """3x3 stem -> 4 stages of ``convs[i]`` conv-BN-ReLU (stages 2-4 start with stride 2) -> pool -> fc."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        dropout: float = 0.0,
        widths: tuple[int, int, int, int] = (16, 32, 64, 128),
        convs: tuple[int, int, int, int] = (1, 1, 1, 1),
    ) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, widths[0])
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, convs, strict=True)):
            blocks = [_conv_bn(cin, w, 1 if i == 0 else 2)] + [_conv_bn(w, w) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = w
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = _head(widths[-1], num_classes, dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(x).flatten(1))


RESNET18_S_SPEC = ArchSpec("resnet18_s", "layer4", "fc", _LAYERS, default_input=28)
RESNET18_S_HALF_SPEC = ArchSpec("resnet18_s_half", "layer4", "fc", _LAYERS, default_input=28)
SMALLCNN_S_SPEC = ArchSpec("smallcnn_s", "layer4", "fc", _LAYERS, default_input=28)
SMALLCNN_M_SPEC = ArchSpec("smallcnn_m", "layer4", "fc", _LAYERS, default_input=28)


def build_resnet18_s(num_classes: int, in_channels: int = 1, dropout: float = 0.0) -> nn.Module:
    return SmallResNet(num_classes, in_channels, dropout)


def build_resnet18_s_half(num_classes: int, in_channels: int = 1, dropout: float = 0.0) -> nn.Module:
    return SmallResNet(num_classes, in_channels, dropout, widths=(32, 64, 128, 256))


def build_smallcnn_s(num_classes: int, in_channels: int = 1, dropout: float = 0.0) -> nn.Module:
    return SmallCNN(num_classes, in_channels, dropout, convs=(1, 1, 1, 1))


def build_smallcnn_m(num_classes: int, in_channels: int = 1, dropout: float = 0.0) -> nn.Module:
    return SmallCNN(num_classes, in_channels, dropout, convs=(2, 2, 2, 2))


register(RESNET18_S_SPEC, build_resnet18_s)
register(RESNET18_S_HALF_SPEC, build_resnet18_s_half)
register(SMALLCNN_S_SPEC, build_smallcnn_s)
register(SMALLCNN_M_SPEC, build_smallcnn_m)
