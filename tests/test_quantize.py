"""training.quantize: static INT8 (QDQ) from training images and the INT8 vs fp32 parity record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from test_export_tiny import SIZE, single_thread, tiny_loaders, tiny_model, train_briefly  # noqa: F401

from kdviewer.models.onnx_export import export_onnx, ort_session
from training.quantize import calibration_images, fp32_nodes_through, int8_parity, quantize_onnx, run_onnx


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


def convs_by_weight_precision(path: Path) -> dict[str, set[str]]:
    """{"int8": Conv nodes whose weight comes through a DequantizeLinear, "fp32": those reading a float
    initializer} of an ONNX file."""
    graph = onnx.load(str(path)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    out: dict[str, set[str]] = {"int8": set(), "fp32": set()}
    for node in graph.node:
        if node.op_type == "Conv":
            out["int8" if producer.get(node.input[1]) == "DequantizeLinear" else "fp32"].add(node.name)
    return out


def test_the_first_layers_can_stay_fp32(tmp_path):
    train, val = tiny_loaders()
    model = train_briefly(tiny_model(), train, steps=10)  # conv1, bn1, relu, layer1, layer2, avgpool, fc
    fp32 = export_onnx(model, tmp_path / "student.onnx", 1, SIZE)
    nodes = fp32_nodes_through(model, fp32, "layer1")
    kept = {"/model/conv1/Conv", "/model/layer1/layer1.0/conv2/Conv", "/model/layer1/layer1.0/Add"}
    assert kept <= set(nodes)
    assert not [n for n in nodes if "layer2" in n or "/fc/" in n]

    cal = calibration_images(train, 32)
    int8 = quantize_onnx(fp32, tmp_path / "mixed.int8.onnx", cal, nodes_to_exclude=nodes)
    convs = convs_by_weight_precision(int8)
    assert convs["fp32"] == {"/model/conv1/Conv", "/model/layer1/layer1.0/conv1/Conv",
                             "/model/layer1/layer1.0/conv2/Conv"}
    assert convs["int8"] and all(n.startswith("/model/layer2/") for n in convs["int8"])
    everything = convs_by_weight_precision(quantize_onnx(fp32, tmp_path / "all.int8.onnx", cal))
    assert not everything["fp32"] and everything["int8"] == convs["int8"] | convs["fp32"]
    parity = int8_parity(fp32, int8, calibration_images(val, 32), "single-label", runs=0, threads=1)
    assert parity["agreement"] >= 0.9

    with pytest.raises(ValueError, match="no layer 'layer9'"):
        fp32_nodes_through(model, fp32, "layer9")
