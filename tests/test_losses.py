"""Each KD loss: zero when the student equals the teacher, positive otherwise, and a small step of the
student's outputs/features along -grad lowers it (the gradient points the right way)."""

from __future__ import annotations

import pytest
import torch

from kdviewer.models.architectures import build_model
from training.config import KDConfig
from training.losses import (
    AttentionLoss,
    FeatureHooks,
    FitNetsLoss,
    HintonLoss,
    NetOutputs,
    RKDLoss,
    SPLoss,
    build_combiner,
    hinton_kd,
)

torch.manual_seed(0)
N = 6


def _feats(shape=(N, 8, 6, 6)) -> torch.Tensor:
    return torch.randn(*shape)


def _loss_setups():
    """(name, loss module, make student NetOutputs from leaf tensors, teacher record builder)."""
    logits = torch.randn(N, 3)
    f3 = _feats()
    f4 = _feats((N, 16, 3, 3))
    emb = torch.randn(N, 10)
    base = {"logits": logits, "layer3": f3, "layer4": f4, "embedding": emb}
    yield "hinton", HintonLoss(T=4.0), base
    yield "hinton-multilabel", HintonLoss(T=2.0, multi_label=True), base
    yield "fitnets", FitNetsLoss([("layer3", "layer3")], [8], [8]), base
    yield "at", AttentionLoss([("layer3", "layer3"), ("layer4", "layer4")], beta=1000.0), base
    yield "at-l2", AttentionLoss([("layer3", "layer3")], beta=10.0, distance="l2"), base
    yield "rkd", RKDLoss(25.0, 50.0), base
    yield "sp", SPLoss([("layer3", "layer3"), ("layer4", "layer4")]), base


def _record(loss, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    rec = {"logits": tensors["logits"], "embedding": tensors["embedding"]}
    for key, layer in loss.teacher_keys().items():
        rec[key] = loss.teacher_transform(layer, tensors[layer])
    return rec


def _student(tensors: dict[str, torch.Tensor]) -> NetOutputs:
    return NetOutputs(
        logits=tensors["logits"],
        features={"layer3": tensors["layer3"], "layer4": tensors["layer4"]},
        embedding=tensors["embedding"],
    )


@pytest.mark.parametrize("name,loss,teacher", list(_loss_setups()), ids=[s[0] for s in _loss_setups()])
def test_zero_when_equal_positive_otherwise_and_descends(name, loss, teacher):
    targets = torch.randint(0, 3, (N,))
    t_rec = _record(loss, teacher)
    same = loss(_student({k: v.clone() for k, v in teacher.items()}), t_rec, targets)
    assert same.ndim == 0
    assert same.detach().item() == pytest.approx(0.0, abs=1e-5), name

    student = {k: (v + 0.8 * torch.randn_like(v)).requires_grad_(True) for k, v in teacher.items()}
    value = loss(_student(student), t_rec, targets)
    assert value.item() > 1e-4, name
    value.backward()
    grads = {k: v.grad for k, v in student.items() if v.grad is not None}
    assert grads, f"{name}: no gradient reached the student's tensors"
    params = [p for p in loss.parameters() if p.grad is not None]
    norm2 = sum(float(g.pow(2).sum()) for g in [*grads.values(), *(p.grad for p in params)])
    lr = 1e-2 * value.item() / max(norm2, 1e-12)  # a small step: first-order decrease ~ lr * |grad|^2
    with torch.no_grad():
        stepped = {k: (v - lr * v.grad if v.grad is not None else v) for k, v in student.items()}
        for p in params:
            p -= lr * p.grad
        after = loss(_student(stepped), t_rec, targets)
    assert after.item() < value.item(), f"{name}: a step along -grad did not reduce the loss"


def test_hinton_matches_formula():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    T = 3.0
    p_t = torch.softmax(t / T, 1)
    expected = (p_t * (p_t.log() - torch.log_softmax(s / T, 1))).sum(1).mean() * T * T
    assert torch.allclose(hinton_kd(s, t, T), expected, atol=1e-6)


def test_fitnets_regressor_maps_channels_and_sizes():
    loss = FitNetsLoss([("a", "b")], [4], [12])
    s = NetOutputs(torch.zeros(2, 2), {"a": torch.randn(2, 4, 8, 8, requires_grad=True)})
    value = loss(s, {"fitnets:b": torch.randn(2, 12, 4, 4)}, torch.zeros(2, dtype=torch.long))
    value.backward()
    assert value > 0 and loss.regressors[0].weight.grad is not None


def test_attention_handles_different_spatial_sizes():
    loss = AttentionLoss([("a", "b")])
    t = loss.teacher_transform("b", torch.randn(2, 32, 8, 8))
    value = loss(NetOutputs(torch.zeros(2, 2), {"a": torch.randn(2, 4, 4, 4)}), {"at:b": t}, torch.zeros(2))
    assert torch.isfinite(value) and value > 0


def test_combiner_on_real_models_and_hooks():
    student = build_model("cxrnet_s", 3, 1)
    teacher = build_model("resnet18", 3, 1).eval()
    kd = KDConfig(
        methods=[
            {"name": "hinton", "T": 4, "alpha": 0.7},
            {"name": "at"},
            {"name": "rkd"},
            {"name": "sp"},
            {"name": "fitnets"},
        ]
    )
    comb = build_combiner(kd, "single-label", 0.3, student, teacher, 1, 32)
    assert set(comb.student_layers()) >= {"layer1", "layer4"}
    x, y = torch.randn(4, 1, 32, 32), torch.randint(0, 3, (4,))
    with FeatureHooks(teacher, comb.teacher_layers(), embedding=comb.needs_embedding) as th, torch.no_grad():
        record = comb.teacher_record(th.outputs(teacher(x)))
    with FeatureHooks(student, comb.student_layers(), embedding=comb.needs_embedding) as sh:
        total, parts = comb(sh.outputs(student(x)), record, y)
    assert set(parts) == {"task", "hinton", "at", "rkd", "sp", "fitnets"}
    assert torch.isclose(total, sum(parts.values()))
    total.backward()
    assert student.stem[0].weight.grad is not None
    assert any(p.grad is not None for p in comb.parameters())  # the FitNets regressor learns too
    # hooks are gone after the context
    assert not sh._handles and not th._handles


def test_combiner_without_teacher_is_plain_task_loss():
    student = build_model("cxrnet_s", 2, 1)
    comb = build_combiner(KDConfig(), "multi-label", 1.0, student, None, 1, 32)
    logits = torch.randn(3, 2)
    total, parts = comb(NetOutputs(logits), None, torch.tensor([[1.0, 0.0], [0, 1], [1, 1]]))
    assert list(parts) == ["task"] and total > 0
