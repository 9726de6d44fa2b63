"""Network architectures known to bundles, built with random weights (state dicts are loaded after).

Lives in ``kdviewer.models`` because both the viewer (to rebuild a teacher/student for saliency from a
bundle's state dict) and the training engine need the same definitions; the engine adds weight
loading and training-only concerns in ``training.zoo``.

Every model built here:

* takes ``in_channels`` input planes (1 for grayscale: the first convolution is built 1-channel
  instead of repeating a gray plane three times),
* exposes ``model.kd_spec``: an `ArchSpec` naming the CAM target layer, the classifier head (whose
  *input* is the penultimate feature vector) and the intermediate layers used by feature KD.

`FeatureExtractor` wraps a model so it returns ``(logits, features)``: this is what is exported to
ONNX (outputs named "logits" and "features") so the OOD guard works from ONNX Runtime alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision import models as tvm


@dataclass(frozen=True)
class ArchSpec:
    name: str
    target_layer: str  # dotted path of the CAM layer (last conv block)
    head: str  # dotted path of the final classifier module; its input = penultimate features
    feature_layers: tuple[str, ...]  # intermediate blocks for feature / attention / relational KD
    default_input: int = 224


def get_module(model: nn.Module, dotted: str) -> nn.Module:
    """Resolve "layer4" / "features.denseblock2" / "classifier.3" to a submodule."""
    mod: nn.Module = model
    for part in dotted.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)  # type: ignore[index]
    return mod


def set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    """Replace the submodule at a dotted path (the inverse of `get_module`)."""
    parent_path, _, leaf = dotted.rpartition(".")
    parent = get_module(model, parent_path) if parent_path else model
    if leaf.isdigit():
        parent[int(leaf)] = new  # type: ignore[index]
    else:
        setattr(parent, leaf, new)


def adapt_first_conv(model: nn.Module, conv_path: str, in_channels: int) -> None:
    """Rebuild the stem convolution for ``in_channels`` planes, folding RGB weights by summation."""
    old = get_module(model, conv_path)
    assert isinstance(old, nn.Conv2d)
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        bias=old.bias is not None,
    )
    with torch.no_grad():
        if in_channels == 1:
            new.weight.copy_(old.weight.sum(dim=1, keepdim=True))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    set_module(model, conv_path, new)


def _replace_head(model: nn.Module, head_path: str, num_classes: int, dropout: float) -> None:
    old = get_module(model, head_path)
    assert isinstance(old, nn.Linear)
    new: nn.Module = nn.Linear(old.in_features, num_classes)
    if dropout > 0:
        new = nn.Sequential(nn.Dropout(dropout), new)
    set_module(model, head_path, new)


def _torchvision(factory: Callable[..., nn.Module], stem: str, spec: ArchSpec) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, dropout: float) -> nn.Module:
        model = factory(weights=None)
        adapt_first_conv(model, stem, in_channels)
        _replace_head(model, spec.head, num_classes, dropout)
        return model

    return build


_RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")

SPECS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec("resnet18", "layer4", "fc", _RESNET_LAYERS),
    "resnet34": ArchSpec("resnet34", "layer4", "fc", _RESNET_LAYERS),
    "resnet50": ArchSpec("resnet50", "layer4", "fc", _RESNET_LAYERS),
    "densenet121": ArchSpec(
        "densenet121",
        "features.norm5",
        "classifier",
        ("features.denseblock1", "features.denseblock2", "features.denseblock3", "features.denseblock4"),
    ),
    "mobilenet_v3_small": ArchSpec(
        "mobilenet_v3_small", "features.12", "classifier.3", ("features.3", "features.8", "features.12")
    ),
}

_BUILDERS: dict[str, Callable[[int, int, float], nn.Module]] = {
    "resnet18": _torchvision(tvm.resnet18, "conv1", SPECS["resnet18"]),
    "resnet34": _torchvision(tvm.resnet34, "conv1", SPECS["resnet34"]),
    "resnet50": _torchvision(tvm.resnet50, "conv1", SPECS["resnet50"]),
    "densenet121": _torchvision(tvm.densenet121, "features.conv0", SPECS["densenet121"]),
    "mobilenet_v3_small": _torchvision(tvm.mobilenet_v3_small, "features.0.0", SPECS["mobilenet_v3_small"]),
}


def register(spec: ArchSpec, builder: Callable[[int, int, float], nn.Module]) -> None:
    """Add an architecture (used for the project's own nets: DenseNet-40, ghost ResNet50, ...)."""
    SPECS[spec.name] = spec
    _BUILDERS[spec.name] = builder


def available() -> list[str]:
    return sorted(_BUILDERS)


def build_model(name: str, num_classes: int, in_channels: int = 1, dropout: float = 0.0) -> nn.Module:
    """Build ``name`` with random weights; raises KeyError listing the known names."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(available())}")
    model = _BUILDERS[name](num_classes, in_channels, dropout)
    model.kd_spec = SPECS[name]  # type: ignore[assignment]
    return model


def spec_of(model: nn.Module) -> ArchSpec:
    spec = getattr(model, "kd_spec", None)
    if not isinstance(spec, ArchSpec):
        raise ValueError("model was not built by kdviewer.models.architectures.build_model")
    return spec


class FeatureExtractor(nn.Module):
    """Wraps a classifier so that forward returns (logits, penultimate features).

    The features are the input of the classifier head, captured with a forward pre-hook: no model
    code is rewritten, and the same wrapper is used for ONNX export and for torch inference.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._features: torch.Tensor | None = None
        # With dropout the head is Sequential(Dropout, Linear): its input is still the feature vector.
        get_module(model, spec_of(model).head).register_forward_pre_hook(self._grab)

    def _grab(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._features = torch.flatten(args[0], 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        assert self._features is not None
        feats, self._features = self._features, None
        return logits, feats


from kdviewer.models import custom_arch as _custom_arch  # noqa: E402,F401  (registers densenet40, ...)
from kdviewer.models import efficientnet_lite as _efficientnet_lite  # noqa: E402,F401  (efficientnet_lite0..2)
from kdviewer.models import small_arch as _small_arch  # noqa: E402,F401  (registers resnet18_s, smallcnn_s, ...)
