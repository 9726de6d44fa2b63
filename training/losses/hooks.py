"""Forward hooks that capture intermediate features of a model without rewriting it.

``with FeatureHooks(model, ["layer3", "layer4"], embedding=True) as hooks:`` registers one forward hook
per named module (its output) and, with ``embedding=True``, a forward pre-hook on the classifier head (its
input = the penultimate feature vector). After ``logits = model(x)``, ``hooks.outputs(logits)`` returns a
`NetOutputs` and clears the captured tensors. Hooks are removed on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from kdviewer.models.architectures import get_module, spec_of


@dataclass
class NetOutputs:
    """What a KD loss may look at: logits, named intermediate features, penultimate embedding."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    embedding: torch.Tensor | None = None


class FeatureHooks:
    def __init__(
        self, model: nn.Module, layers: Iterable[str] = (), embedding: bool = False, head: str | None = None
    ) -> None:
        self.model = model
        self.layers = list(dict.fromkeys(layers))
        self.embedding = embedding
        self.head = head
        self.features: dict[str, torch.Tensor] = {}
        self._embedding: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> FeatureHooks:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def attach(self) -> None:
        if self._handles:
            return
        for name in self.layers:
            module = get_module(self.model, name)
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        if self.embedding:
            head = self.head or spec_of(self.model).head
            self._handles.append(get_module(self.model, head).register_forward_pre_hook(self._grab_embedding))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def clear(self) -> None:
        self.features = {}
        self._embedding = None

    def _make_hook(self, name: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(_module: nn.Module, _args: object, output: torch.Tensor) -> None:
            self.features[name] = output

        return hook

    def _grab_embedding(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._embedding = torch.flatten(args[0], 1)

    def outputs(self, logits: torch.Tensor) -> NetOutputs:
        out = NetOutputs(logits=logits, features=dict(self.features), embedding=self._embedding)
        self.clear()
        return out
