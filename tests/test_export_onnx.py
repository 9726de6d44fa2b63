"""kdviewer.models.onnx_export: the ONNX contract (names, dynamic batch, opset 17) and torch parity."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from test_export_tiny import SIZE, single_thread, tiny_loaders, tiny_model, train_briefly  # noqa: F401

from kdviewer.models.architectures import FeatureExtractor
from kdviewer.models.onnx_export import OnnxParityError, check_parity, export_onnx, ort_session


@pytest.mark.parametrize(("channels", "dropout"), [(1, 0.0), (3, 0.4)])
def test_export_matches_contract_and_torch(tmp_path, channels, dropout):
    model = tiny_model(3, channels, dropout)
    train, _ = tiny_loaders(3)
    if channels == 1:
        train_briefly(model, train, steps=5)  # non-trivial BatchNorm statistics
    model.eval()
    path = export_onnx(model, tmp_path / "m.onnx", channels, SIZE)

    proto = onnx.load(str(path))
    assert {o.domain: o.version for o in proto.opset_import}.get("") == 17
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits", "features"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param  # symbolic, i.e. dynamic

    sess = ort_session(path)
    for n in (1, 5):
        x = torch.randn(n, channels, SIZE, SIZE)
        logits, feats = sess.run(["logits", "features"], {"input": x.numpy()})
        with torch.no_grad():
            _, ref_feats = FeatureExtractor(tiny_model(3, channels, dropout))(x)  # shape check only
            exp_logits = model(x)
        assert logits.shape == (n, 3) and feats.shape == (n, 32)
        assert ref_feats.shape == feats.shape
        np.testing.assert_allclose(logits, exp_logits.numpy(), atol=1e-4, rtol=1e-4)
    assert model.training is False  # the caller's model is left as it was


def test_parity_check_catches_a_wrong_file(tmp_path):
    a = export_onnx(tiny_model(2, 1, seed=0), tmp_path / "a.onnx", 1, SIZE)
    other = tiny_model(2, 1, seed=1)
    with torch.no_grad():
        other.fc.weight.mul_(50)  # make the difference unmistakable
    with pytest.raises(OnnxParityError):
        check_parity(other, a, 1, SIZE)
    diffs = check_parity(tiny_model(2, 1, seed=0), a, 1, SIZE)
    assert diffs["max_abs_diff_logits"] < 1e-4


def test_evaluate_onnx_gives_the_torch_answers_and_a_sample_of_its_inputs(tmp_path):
    """The export predicts with the deployed student.onnx: same logits, features and targets as the torch
    model, the same batches kept for a partial pass, and a sample of the images it saw, with their rows."""
    from training.evaluate import evaluate_model, evaluate_onnx

    model = tiny_model(2, 1, 0.0)
    train, val = tiny_loaders(2)
    train_briefly(model, train, steps=5)
    model.eval()
    sess = ort_session(export_onnx(model, tmp_path / "m.onnx", 1, SIZE))
    names = ["a", "b"]
    ref = evaluate_model(model, val, names, features=True)
    out = evaluate_onnx(sess, val, names, features=True, sample=10)
    for key in ("logits", "probs", "features"):
        np.testing.assert_allclose(out[key], ref[key], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(out["targets"], ref["targets"])
    images = torch.cat([x for x, _ in val]).numpy()
    assert len(out["sample_index"]) == 10 and len(set(out["sample_index"].tolist())) == 10
    np.testing.assert_array_equal(out["sample_images"], images[out["sample_index"]])
    # the sample is spread over the split, not its first rows
    assert out["sample_index"].max() >= 32
    # a seeded random subset of batches and a cap give the same rows in both runtimes
    part = dict(keep_fraction=0.5, max_items=40, seed=3)
    a, b = evaluate_onnx(sess, val, names, **part), evaluate_model(model, val, names, **part)
    np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-4, rtol=1e-4)
    assert len(a["logits"]) <= 40


def test_evaluate_model_in_channels_last_gives_the_model_back_as_it_was():
    from training.evaluate import evaluate_model

    model = tiny_model(2, 1, 0.0).eval()
    _, val = tiny_loaders(2)
    ref = evaluate_model(model, val, ["a", "b"])
    out = evaluate_model(model, val, ["a", "b"], channels_last=True)
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=1e-4, rtol=1e-4)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]
    assert convs and all(c.weight.is_contiguous() for c in convs)
    # (the check can fail: a conv left in channels_last is not contiguous)
    assert not convs[0].to(memory_format=torch.channels_last).weight.is_contiguous()
