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
