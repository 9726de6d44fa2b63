"""training.zoo weight loading and the project's own architectures (kdviewer.models.custom_arch)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kdviewer.errors import WeightsUnavailableError
from kdviewer.models.architectures import FeatureExtractor, available, build_model, get_module, spec_of
from kdviewer.models.custom_arch import GhostModule
from training.zoo import create_model, hub_checkpoint_dir


def test_custom_architectures_are_registered_and_run():
    assert {"densenet40", "ghost_resnet50", "cxrnet_s"} <= set(available())
    x = torch.randn(2, 1, 32, 32)
    for arch in ("densenet40", "ghost_resnet50", "cxrnet_s"):
        model = build_model(arch, 3, 1, dropout=0.2).eval()
        spec = spec_of(model)
        get_module(model, spec.target_layer)
        for layer in spec.feature_layers:
            get_module(model, layer)
        logits, feats = FeatureExtractor(model)(x)
        assert logits.shape == (2, 3) and feats.ndim == 2


def test_densenet40_is_the_first_two_blocks_of_densenet121():
    d40 = build_model("densenet40", 2, 3)
    names = [n for n, _ in d40.features.named_children()]
    assert names == ["conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1", "denseblock2", "norm5"]
    convs = sum(isinstance(m, nn.Conv2d) for m in d40.modules())
    assert convs == 1 + 2 * (6 + 12) + 1  # stem + dense layers (1x1 + 3x3) + transition; + fc = 40 layers
    d121 = build_model("densenet121", 2, 3).state_dict()
    shared = [k for k in d40.state_dict() if k.startswith(("features.denseblock1", "features.denseblock2"))]
    assert shared and all(d121[k].shape == d40.state_dict()[k].shape for k in shared)


def test_ghost_resnet50_replaces_stage3_and_4_convs():
    ghost = build_model("ghost_resnet50", 2, 1)
    plain = build_model("resnet50", 2, 1)
    n_ghost = sum(isinstance(m, GhostModule) for m in ghost.modules())
    assert n_ghost == 6 + 3  # ResNet-50 has 6 bottlenecks in layer3 and 3 in layer4
    assert all(not isinstance(m, GhostModule) for m in ghost.layer2.modules())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ghost) < 0.85 * count(plain)


def test_local_state_dict_with_rgb_stem_and_other_head(tmp_path):
    src = build_model("resnet18", 1000, 3)  # e.g. an ImageNet-like RGB checkpoint
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    model = create_model("resnet18", 2, 1, dropout=0.5, weights=str(path))
    assert torch.allclose(model.conv1.weight, src.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.layer3[0].conv1.weight, src.layer3[0].conv1.weight)
    assert model.fc[1].weight.shape == (2, 512)  # the 1000-class head was skipped, not forced in


def test_wrong_architecture_file_is_refused(tmp_path):
    path = tmp_path / "dn.pt"
    torch.save(build_model("densenet40", 2, 1).state_dict(), path)
    with pytest.raises(WeightsUnavailableError, match="does not look like"):
        create_model("resnet18", 2, 1, weights=str(path))
    with pytest.raises(WeightsUnavailableError, match="not found"):
        create_model("resnet18", 2, 1, weights=str(tmp_path / "missing.pt"))


def test_imagenet_weights_only_from_the_hub_cache(tmp_path, monkeypatch):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(WeightsUnavailableError) as err:
            create_model("resnet18", 2, 1, weights="imagenet")
        msg = str(err.value)
        assert "resnet18-f37072fd.pth" in msg and str(hub_checkpoint_dir()) in msg and "weights: none" in msg
        # a file placed in the cache is used (made here: no network in tests)
        hub_checkpoint_dir().mkdir(parents=True)
        fake = build_model("resnet18", 1000, 3)
        state = {k.replace("fc.1.", "fc."): v for k, v in fake.state_dict().items()}
        torch.save(state, hub_checkpoint_dir() / "resnet18-f37072fd.pth")
        model = create_model("resnet18", 2, 1, weights="imagenet")
        assert torch.equal(model.layer1[0].conv1.weight, fake.layer1[0].conv1.weight)
        with pytest.raises(WeightsUnavailableError, match="swav"):
            create_model("resnet50", 2, 1, weights="swav")
    finally:
        torch.hub.set_dir(old)


def test_weights_from_a_bundle_folder_and_zip(tmp_path):
    import zipfile

    teacher = build_model("resnet18", 2, 1)
    student = build_model("cxrnet_s", 2, 1)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    torch.save(teacher.state_dict(), bundle / "teacher.pt")
    torch.save(student.state_dict(), bundle / "student.pt")
    manifest = {
        "teacher": {"architecture": "resnet18", "weights": "teacher.pt"},
        "student": {"architecture": "cxrnet_s", "weights": "student.pt"},
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    t = create_model("resnet18", 2, 1, weights=str(bundle), role="teacher")
    assert torch.equal(t.conv1.weight, teacher.conv1.weight)
    with zipfile.ZipFile(tmp_path / "b.zip", "w") as zf:
        for f in bundle.iterdir():
            zf.write(f, f"bundle/{f.name}")
    s = create_model("cxrnet_s", 2, 1, weights=str(tmp_path / "b.zip"), role="student")
    assert torch.equal(s.stem[0].weight, student.stem[0].weight)
    with pytest.raises(Exception, match="no densenet40 weights"):
        create_model("densenet40", 2, 1, weights=str(bundle))
    manifest["student"]["weights"] = "../escape.pt"
    manifest["student"]["architecture"] = "densenet40"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="refusing"):
        create_model("densenet40", 2, 1, weights=str(bundle), role="student")
