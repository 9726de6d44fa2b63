"""training.prune: channels are really removed, outputs keep their shape, the config rebuilds the model."""

from __future__ import annotations

import pytest
import torch
from test_export_tiny import (  # noqa: F401
    ARCH,
    ARCH_BOTTLENECK,
    SIZE,
    single_thread,
    tiny_loaders,
    tiny_model,
    train_briefly,
)
from torch import nn

from kdviewer.models.architectures import build_model, spec_of
from kdviewer.models.onnx_export import export_onnx, ort_session
from training.complexity import count_flops, count_params
from training.prune import (
    apply_channel_config,
    channel_config,
    expected_param_fraction,
    finetune,
    prunable_pairs,
    prune_model,
)


def test_finds_the_block_internal_convolutions():
    assert prunable_pairs(tiny_model()) == [
        ("layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"),
        ("layer2.0.conv1", "layer2.0.bn1", "layer2.0.conv2"),
    ]
    bott = build_model(ARCH_BOTTLENECK, 2, 1)
    assert [p[0] for p in prunable_pairs(bott)] == [
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer2.0.conv1",
        "layer2.0.conv2",
    ]


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_pruning_removes_parameters_and_flops(ratio):
    model = tiny_model(3, 1, dropout=0.2)
    train, _ = tiny_loaders(3)
    train_briefly(model, train, steps=3)
    pruned = prune_model(model, ratio)
    assert pruned is not model and count_params(model) == count_params(tiny_model(3, 1, dropout=0.2))
    removed = 1 - count_params(pruned) / count_params(model)
    assert removed == pytest.approx(expected_param_fraction(model, ratio), abs=0.03)
    assert removed > 0.5 * ratio  # block convolutions dominate this net
    assert count_flops(pruned, SIZE, 1) < count_flops(model, SIZE, 1)
    # Channels really gone (no masks): the conv tensors are smaller.
    c1 = pruned.layer1[0].conv1
    assert (
        c1.out_channels == round(16 * (1 - ratio)) == c1.weight.shape[0] == pruned.layer1[0].bn1.num_features
    )
    assert pruned.layer1[0].conv2.in_channels == c1.out_channels
    assert not any(isinstance(b, torch.Tensor) and b.dtype == torch.bool for b in pruned.buffers())
    x = torch.randn(4, 1, SIZE, SIZE)
    assert pruned.eval()(x).shape == (4, 3)
    assert spec_of(pruned).name == ARCH


def test_keeps_the_filters_with_largest_l1_norm():
    model = tiny_model().eval()
    conv = model.layer1[0].conv1
    with torch.no_grad():
        conv.weight.mul_(0.01)
        conv.weight[[2, 5, 11]] *= 1000  # three clearly strongest filters
    pruned = prune_model(model, 13 / 16)  # keep 3 of 16
    kept = pruned.layer1[0].conv1.weight
    assert kept.shape[0] == 3
    torch.testing.assert_close(kept, conv.weight[[2, 5, 11]])
    torch.testing.assert_close(pruned.layer1[0].conv2.weight, model.layer1[0].conv2.weight[:, [2, 5, 11]])


def test_pruning_with_zero_impact_channels_keeps_outputs():
    """Channels whose filters are zero contribute nothing: removing them leaves outputs unchanged."""
    model = tiny_model().eval()
    blk = model.layer1[0]
    with torch.no_grad():
        blk.conv1.weight[8:] = 0
        blk.bn1.bias[8:] = 0  # BN of a zero channel then outputs exactly 0 (after ReLU)
        blk.bn1.running_mean[8:] = 0
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        ref = model(x)
    pruned = prune_model(model, 0.5)
    # layer2 is pruned too (by L1), so compare only through a model where layer2 is untouched.
    partial = prune_model(model, 0.0)
    assert channel_config(partial) == channel_config(model)
    apply_channel_config(partial, {"layer1.0.conv1": 8})
    partial.layer1[0].load_state_dict(pruned.layer1[0].state_dict())
    with torch.no_grad():
        torch.testing.assert_close(partial(x), ref, atol=1e-5, rtol=1e-5)


def test_pruned_model_reloads_from_state_dict_via_channel_config(tmp_path):
    pruned = prune_model(tiny_model(2, 1, dropout=0.3).eval(), 0.4)
    config = pruned.pruned_channels
    assert config == channel_config(pruned)
    torch.save(pruned.state_dict(), tmp_path / "student.pt")

    fresh = build_model(ARCH, 2, 1, dropout=0.3)
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(torch.load(tmp_path / "student.pt", weights_only=True))
    apply_channel_config(fresh, config)
    fresh.load_state_dict(torch.load(tmp_path / "student.pt", weights_only=True))
    x = torch.randn(3, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), pruned(x))
    # The ONNX export of a pruned model needs nothing special.
    path = export_onnx(pruned, tmp_path / "pruned.onnx", 1, SIZE)
    assert ort_session(path).run(["logits"], {"input": x.numpy()})[0].shape == (3, 2)


def test_bottleneck_blocks_are_pruned_twice():
    model = build_model(ARCH_BOTTLENECK, 2, 1).eval()
    pruned = prune_model(model, 0.5)
    blk = pruned.layer2[0]
    assert (blk.conv1.out_channels, blk.conv2.in_channels, blk.conv2.out_channels, blk.conv3.in_channels) == (
        4,
        4,
        4,
        4,
    )
    assert blk.conv3.out_channels == 32  # block output untouched
    assert pruned(torch.randn(2, 1, SIZE, SIZE)).shape == (2, 2)


def test_bad_ratio_and_unprunable_models_raise():
    with pytest.raises(ValueError):
        prune_model(tiny_model(), 1.0)
    with pytest.raises(ValueError, match="no ResNet-style blocks"):
        prune_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), 0.3)
    with pytest.raises(ValueError):
        apply_channel_config(tiny_model(), {"layer9.conv1": 3})
    with pytest.raises(ValueError):
        apply_channel_config(tiny_model(), {"layer1.0.conv1": 99})


def test_finetune_reduces_loss():
    train, _ = tiny_loaders()
    pruned = prune_model(tiny_model(), 0.5)
    hist = finetune(pruned, train, epochs=3, lr=3e-3)
    assert len(hist) == 3 and hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert not pruned.training


def test_prune_command_prints_progress_and_a_before_after_table(tmp_path, capsys):
    """`kd-train prune` says what it does as it goes (stderr) and ends with a before/after table."""
    from _bundles import cxr_bundle

    from training.cli import main

    assert main(["prune", str(cxr_bundle().path), "--ratio", "0.3", "--out", str(tmp_path / "p")]) == 0
    cap = capsys.readouterr()
    steps = [line for line in cap.err.splitlines() if line.startswith("[")]
    assert len(steps) >= 3 and "pruning resnet18: 30% of the internal channels" in cap.err
    assert "params" in cap.err and "writing the bundle" in cap.err
    table = cap.out.splitlines()
    assert table[0].split() == ["before", "after", "change"]
    params = next(line for line in table if line.startswith("params")).split()
    before, after = (int(v.replace(",", "")) for v in params[1:3])
    assert after < before and params[3].startswith("-") and params[3].endswith("%")
    assert next(line for line in table if line.startswith("GFLOPs")).split()[3].startswith("-")
    assert table[-1].startswith("pruned bundle written to")
