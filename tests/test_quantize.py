"""training.quantize: static INT8 (QDQ) from training images and the INT8 vs fp32 parity record."""

from __future__ import annotations

import numpy as np
import onnx
from test_export_tiny import SIZE, single_thread, tiny_loaders, tiny_model, train_briefly  # noqa: F401

from kdviewer.models.onnx_export import export_onnx, ort_session
from training.quantize import calibration_images, int8_parity, quantize_onnx, run_onnx


def test_int8_model_is_quantized_and_close_to_fp32(tmp_path):
    train, val = tiny_loaders()
    model = train_briefly(tiny_model(), train, steps=10)
    fp32 = export_onnx(model, tmp_path / "student.onnx", 1, SIZE)
    cal = calibration_images(train, max_images=64)
    assert cal.shape == (64, 1, SIZE, SIZE) and cal.dtype == np.float32
    int8 = quantize_onnx(fp32, tmp_path / "student.int8.onnx", cal)

    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    names = [o.name for o in ort_session(int8).get_outputs()]
    assert names == ["logits", "features"]
    logits, feats = run_onnx(ort_session(int8), cal[:5])
    assert logits.shape == (5, 2) and feats.shape == (5, 32)

    held_out = calibration_images(val, 64)
    parity = int8_parity(fp32, int8, held_out, "single-label", temperature=1.3, runs=5, warmup=1, threads=1)
    for key in (
        "max_abs_diff_prob",
        "mean_abs_diff_prob",
        "agreement",
        "n",
        "latency_fp32_ms",
        "latency_int8_ms",
        "speedup",
        "recommended",
    ):
        assert key in parity and isinstance(parity[key], float)
    assert parity["n"] == 64
    assert 0 <= parity["mean_abs_diff_prob"] <= parity["max_abs_diff_prob"] < 0.2
    assert parity["agreement"] >= 0.9
    assert parity["recommended"] in (0.0, 1.0)
    assert parity["latency_fp32_ms"] > 0 and parity["latency_int8_ms"] > 0


def test_multilabel_parity_uses_per_label_decisions(tmp_path):
    train, val = tiny_loaders(3, multi_label=True)
    model = train_briefly(tiny_model(3), train, steps=5, multi_label=True)
    fp32 = export_onnx(model, tmp_path / "m.onnx", 1, SIZE)
    int8 = quantize_onnx(fp32, tmp_path / "m.int8.onnx", calibration_images(train, 32), preprocess=False)
    parity = int8_parity(fp32, int8, calibration_images(val, 32), "multi-label", runs=2, warmup=1, threads=1)
    assert 0.0 <= parity["agreement"] <= 1.0 and parity["max_abs_diff_prob"] < 0.3
