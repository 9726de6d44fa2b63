"""Structural channel pruning surgery: shrink residual-block convolutions for real (no masks).

Lives in ``kdviewer.models`` because the viewer must rebuild a pruned student from its bundle
(`apply_channel_config` before ``load_state_dict``); ``training.prune`` adds the L1 pruning command,
fine-tuning and bundle re-export on top.

`prune_model` shrinks the *internal* channels of every residual block of a ResNet-style network
(torchvision ``BasicBlock``: the output of ``conv1``; ``Bottleneck``: the outputs of ``conv1`` and
``conv2``). For each such convolution the filters with the smallest L1 norm are dropped, and the
convolution, the BatchNorm after it and the input side of the next convolution are rebuilt with
fewer channels (weights of kept channels copied). Block outputs are untouched, so residual
additions, downsample branches and the classifier keep their shapes.

The pruned structure is recorded as a *channel config* ``{"layer1.0.conv1": 45, ...}``
(`channel_config`), stored by export in ``manifest.training["pruned_channels"]``.
"""

from __future__ import annotations

import torch
from torch import nn

from kdviewer.models.architectures import get_module, set_module


def prunable_pairs(model: nn.Module) -> list[tuple[str, str, str]]:
    """(conv, bn, next_conv) dotted paths whose shared channel dimension may be pruned.

    A block qualifies when it has ``conv1``/``bn1``/``conv2`` (+ ``bn2``/``conv3`` for bottlenecks)
    that are plain ``Conv2d``/``BatchNorm2d`` with ``groups == 1`` — torchvision's ``BasicBlock``
    and ``Bottleneck`` and look-alikes.
    """
    out: list[tuple[str, str, str]] = []
    for name, mod in model.named_modules():
        convs = [getattr(mod, f"conv{i}", None) for i in (1, 2, 3)]
        bns = [getattr(mod, f"bn{i}", None) for i in (1, 2, 3)]
        if not (isinstance(convs[0], nn.Conv2d) and isinstance(convs[1], nn.Conv2d)):
            continue
        if not isinstance(bns[0], nn.BatchNorm2d):
            continue
        prefix = f"{name}." if name else ""
        chain = [i for i in range(3) if isinstance(convs[i], nn.Conv2d)]
        for i in chain[:-1]:
            conv, bn, nxt = convs[i], bns[i], convs[i + 1]
            if not isinstance(bn, nn.BatchNorm2d) or conv.groups != 1 or nxt.groups != 1:
                break
            if conv.out_channels != bn.num_features or nxt.in_channels != conv.out_channels:
                break
            out.append((f"{prefix}conv{i + 1}", f"{prefix}bn{i + 1}", f"{prefix}conv{i + 2}"))
    return out


def _new_conv(old: nn.Conv2d, in_ch: int, out_ch: int) -> nn.Conv2d:
    conv = nn.Conv2d(
        in_ch,
        out_ch,
        kernel_size=old.kernel_size,  # type: ignore[arg-type]
        stride=old.stride,  # type: ignore[arg-type]
        padding=old.padding,  # type: ignore[arg-type]
        dilation=old.dilation,  # type: ignore[arg-type]
        groups=1,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    return conv.to(device=old.weight.device, dtype=old.weight.dtype)


def _new_bn(old: nn.BatchNorm2d, n: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(
        n, eps=old.eps, momentum=old.momentum, affine=old.affine, track_running_stats=old.track_running_stats
    )
    ref = old.weight if old.weight is not None else old.running_mean
    return bn.to(device=ref.device, dtype=ref.dtype) if ref is not None else bn


def _shrink(model: nn.Module, conv_p: str, bn_p: str, next_p: str, keep: torch.Tensor | int) -> None:
    """Rebuild conv/bn/next_conv to keep the channels ``keep`` (indices) or the first ``keep`` ones."""
    conv, bn, nxt = get_module(model, conv_p), get_module(model, bn_p), get_module(model, next_p)
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and isinstance(nxt, nn.Conv2d)
    idx = torch.arange(keep) if isinstance(keep, int) else keep
    idx = idx.to(conv.weight.device)
    n = len(idx)
    new_conv, new_bn, new_next = (
        _new_conv(conv, conv.in_channels, n),
        _new_bn(bn, n),
        _new_conv(nxt, n, nxt.out_channels),
    )
    with torch.no_grad():
        new_conv.weight.copy_(conv.weight[idx])
        if conv.bias is not None:
            new_conv.bias.copy_(conv.bias[idx])
        if bn.affine:
            new_bn.weight.copy_(bn.weight[idx])
            new_bn.bias.copy_(bn.bias[idx])
        if bn.track_running_stats:
            new_bn.running_mean.copy_(bn.running_mean[idx])
            new_bn.running_var.copy_(bn.running_var[idx])
            new_bn.num_batches_tracked.copy_(bn.num_batches_tracked)
        new_next.weight.copy_(nxt.weight[:, idx])
        if nxt.bias is not None:
            new_next.bias.copy_(nxt.bias)
    for new, old in ((new_conv, conv), (new_bn, bn), (new_next, nxt)):
        new.train(old.training)  # a pruned eval-mode model stays in eval mode
    set_module(model, conv_p, new_conv)
    set_module(model, bn_p, new_bn)
    set_module(model, next_p, new_next)


def channel_config(model: nn.Module) -> dict[str, int]:
    """Output channels of every prunable convolution: the shape a pruned model must be rebuilt to."""
    return {conv: int(get_module(model, conv).out_channels) for conv, _, _ in prunable_pairs(model)}


def prune_model(model: nn.Module, ratio: float, inplace: bool = False) -> nn.Module:
    """Remove ``ratio`` of the internal channels of every residual block by filter L1 norm.

    Keeps ``max(1, round(C * (1 - ratio)))`` channels of each pruned convolution (the ones with the
    largest L1 norms, in their original order). Returns the pruned model (a deep copy unless
    ``inplace``); the ``kd_spec`` attribute is kept, and ``model.pruned_channels`` holds the
    channel config. Raises ValueError when the model has no prunable blocks.
    """
    import copy

    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    if not inplace:
        model = copy.deepcopy(model)
    pairs = prunable_pairs(model)
    if not pairs:
        raise ValueError(
            f"{type(model).__name__} has no ResNet-style blocks (conv1/bn1/conv2) to prune structurally"
        )
    for conv_p, bn_p, next_p in pairs:
        conv = get_module(model, conv_p)
        assert isinstance(conv, nn.Conv2d)
        n_keep = max(1, round(conv.out_channels * (1.0 - ratio)))
        if n_keep >= conv.out_channels:
            continue
        l1 = conv.weight.detach().abs().flatten(1).sum(dim=1)
        keep = torch.sort(torch.topk(l1, n_keep).indices).values
        _shrink(model, conv_p, bn_p, next_p, keep)
    model.pruned_channels = channel_config(model)  # type: ignore[assignment]
    return model


def apply_channel_config(model: nn.Module, config: dict[str, int]) -> nn.Module:
    """Reshape a freshly built model (in place) to a recorded channel config, ready for load_state_dict.

    Weights of the rebuilt layers are placeholders (the first channels); load the pruned state dict
    afterwards. Raises ValueError for a layer the model does not have or cannot shrink.
    """
    pairs = {conv: (bn, nxt) for conv, bn, nxt in prunable_pairs(model)}
    for conv_p, n in config.items():
        if conv_p not in pairs:
            raise ValueError(f"pruned layer {conv_p!r} is not a prunable convolution of this model")
        conv = get_module(model, conv_p)
        assert isinstance(conv, nn.Conv2d)
        if n == conv.out_channels:
            continue
        if not 1 <= n <= conv.out_channels:
            raise ValueError(f"pruned layer {conv_p!r}: {n} channels is not in 1..{conv.out_channels}")
        _shrink(model, conv_p, *pairs[conv_p], int(n))
    model.pruned_channels = channel_config(model)  # type: ignore[assignment]
    return model
