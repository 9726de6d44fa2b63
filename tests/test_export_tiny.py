"""A tiny ResNet-style network and tiny data for the evaluation/export tests (seconds, not minutes).

Other test modules import `tiny_model`, `tiny_loaders`, `train_briefly` and the autouse
`single_thread` fixture from here. The network is
registered with `kdviewer.models.architectures.register` as "c2_tiny_resnet" so that bundles written
by the tests can be rebuilt by the viewer's code like any other architecture.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.resnet import BasicBlock, Bottleneck

from kdviewer.models import architectures
from kdviewer.models.architectures import ArchSpec, build_model

ARCH = "c2_tiny_resnet"
ARCH_BOTTLENECK = "c2_tiny_bottleneck"
SIZE = 32


class TinyResNet(nn.Module):
    """conv-bn-relu stem, two residual stages (8 and 16 channels), global pool, linear head."""

    def __init__(self, num_classes: int, in_channels: int, dropout: float, bottleneck: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        if bottleneck:  # Bottleneck expands x4: planes 4 -> 16 channels out
            self.layer1 = nn.Sequential(Bottleneck(16, 4))
            down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
            self.layer2 = nn.Sequential(Bottleneck(16, 8, stride=2, downsample=down))
        else:
            self.layer1 = nn.Sequential(BasicBlock(16, 16))
            down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
            self.layer2 = nn.Sequential(BasicBlock(16, 32, stride=2, downsample=down))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        head = nn.Linear(32, num_classes)
        self.fc = nn.Sequential(nn.Dropout(dropout), head) if dropout > 0 else head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


architectures.register(
    ArchSpec(ARCH, "layer2", "fc", ("layer1", "layer2"), default_input=SIZE),
    lambda k, c, d: TinyResNet(k, c, d),
)
architectures.register(
    ArchSpec(ARCH_BOTTLENECK, "layer2", "fc", ("layer1", "layer2"), default_input=SIZE),
    lambda k, c, d: TinyResNet(k, c, d, bottleneck=True),
)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One torch thread while these tests run: on a shared 2-core box, 2 spinning threads are ~5x slower.

    Modules that import this fixture (``from test_export_tiny import single_thread``) get it too;
    the previous setting is restored afterwards.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(num_classes: int = 2, channels: int = 1, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ARCH, num_classes, channels, dropout)


def tiny_data(n: int, seed: int, num_classes: int = 2, channels: int = 1, multi_label: bool = False):
    """Images whose class shows as a bright square in a class-specific quadrant (learnable in steps)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, SIZE, SIZE, generator=g) * 0.5
    if multi_label:
        y = (torch.rand(n, num_classes, generator=g) < 0.4).float()
        present = y
    else:
        y = torch.randint(0, num_classes, (n,), generator=g)
        present = nn.functional.one_hot(y, num_classes).float()
    h = SIZE // 2
    for c in range(num_classes):
        r, q = divmod(c % 4, 2)
        x[:, :, r * h : r * h + h, q * h : q * h + h] += 1.5 * present[:, c].view(-1, 1, 1, 1)
    return x, y


def tiny_loaders(num_classes: int = 2, multi_label: bool = False, n_train: int = 96, n_val: int = 64):
    xtr, ytr = tiny_data(n_train, 0, num_classes, multi_label=multi_label)
    xva, yva = tiny_data(n_val, 1, num_classes, multi_label=multi_label)
    gen = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=32, shuffle=True, generator=gen)
    val = DataLoader(TensorDataset(xva, yva), batch_size=32)
    return train, val


def train_briefly(
    model: nn.Module, loader: DataLoader, steps: int = 30, multi_label: bool = False
) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.BCEWithLogitsLoss() if multi_label else nn.CrossEntropyLoss()
    model.train()
    done = 0
    while done < steps:
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    return model.eval()


def test_tiny_model_learns_the_toy_task():
    train, val = tiny_loaders()
    model = train_briefly(tiny_model(), train, steps=15)
    x, y = next(iter(val))
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.8


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_tiny_model_has_a_kd_spec(dropout: float):
    model = tiny_model(3, 1, dropout)
    assert architectures.spec_of(model).name == ARCH
    out = model.eval()(torch.randn(2, 1, SIZE, SIZE))
    assert out.shape == (2, 3)
    assert np.isfinite(out.detach().numpy()).all()
