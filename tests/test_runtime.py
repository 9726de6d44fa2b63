"""Runtimes: ONNX Runtime (fp32 / INT8) against torch on the same trained student."""

from __future__ import annotations

import numpy as np
import pytest
from _bundles import cxr_bundle

from kdviewer.errors import BundleError, InferenceError
from kdviewer.models.bundle import open_bundle
from kdviewer.models.runtime import OrtRuntime, Runtime, TorchRuntime, select_device

# The first test builds the shared trained bundle (~20 s on an idle machine, minutes on a loaded one).
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def runtimes() -> dict[str, Runtime]:
    b = open_bundle(cxr_bundle().path)
    shape = (1, 64, 64)
    return {
        "ort": OrtRuntime(b.onnx_path(), threads=2),
        "int8": OrtRuntime(b.onnx_path(int8=True), threads=2),
        "torch": TorchRuntime(b.build_torch("student"), "cpu", input_shape=shape),
    }


def test_ort_matches_torch(runtimes: dict[str, Runtime]) -> None:
    x = cxr_bundle().val_inputs
    lo, fo = runtimes["ort"].predict(x)
    lt, ft = runtimes["torch"].predict(x)
    assert lo.shape == (len(x), 2) and fo.shape == (len(x), 512)
    assert lo.dtype == np.float32 and fo.dtype == np.float32
    assert np.max(np.abs(lo - lt)) < 1e-3
    assert np.max(np.abs(fo - ft)) < 1e-3
    assert runtimes["ort"].input_shape == (1, 64, 64)
    assert runtimes["ort"].device == "cpu"


def test_int8_agrees_with_fp32_on_labels(runtimes: dict[str, Runtime]) -> None:
    x = cxr_bundle().val_inputs
    l8, f8 = runtimes["int8"].predict(x)
    l32, _ = runtimes["ort"].predict(x)
    assert f8.shape == (len(x), 512)
    assert np.mean(l8.argmax(1) == l32.argmax(1)) >= 0.9


def test_batch_shapes_and_errors(runtimes: dict[str, Runtime]) -> None:
    rt = runtimes["ort"]
    one = cxr_bundle().val_inputs[0]
    logits, _ = rt.predict(one)  # (C, S, S) is taken as a batch of one
    assert logits.shape == (1, 2)
    with pytest.raises(InferenceError, match="expects input"):
        rt.predict(np.zeros((2, 1, 32, 32), np.float32))
    with pytest.raises(InferenceError, match="expects input"):
        runtimes["torch"].predict(np.zeros((2, 3, 64, 64), np.float32))
    assert rt.warmup() >= 0.0


def test_unloadable_onnx_is_a_bundle_error(tmp_path) -> None:
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(BundleError, match="cannot load"):
        OrtRuntime(bad)


def test_select_device() -> None:
    assert select_device("auto") in ("cuda", "mps", "cpu")
    assert select_device("cpu") == "cpu"
    import torch

    if not torch.cuda.is_available():
        assert select_device("cuda") == "cpu"
