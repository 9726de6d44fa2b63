"""Experiment (issue 11): can any post-training setting bring the Kermany Lite0 student's ONNX Runtime INT8
model within the exporter's parity bar (max |dp| <= 0.1 at the manifest temperature) on all val images?

    python scripts/int8_ptq_probe.py                   # every variant below, ~1 min each on 2 cores
    python scripts/int8_ptq_probe.py minmax eq:1,1     # chosen ones

Each variant is quantized from the same exported fp32 graph (after ``quant_pre_process``) with ORT's
``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations: the exporter's setting unless the
variant says otherwise) and compared with the *unchanged* fp32 student on the 1039 val images: max and
mean |dlogit|, max |dp| at T = 1.9 and the number of images above the 0.1 bar, and its batch-1 latency
as a ratio of the fp32 file's (1 thread, timed in turn with it).

Variants (``+`` joins exclusions):
* ``minmax`` -- the exporter's setting: MinMax ranges from 64 training images.
* ``n256`` / ``n512`` -- MinMax from 256 / 512 other training images; ``avg`` -- moving-average MinMax;
  ``pct`` -- 99.99th percentile ranges; ``s8`` -- int8 activations (S8S8).
* ``skip:CAT`` -- the nodes of a category stay fp32 (``add``, ``dw`` depthwise convs, ``project`` and
  ``expand`` 1x1 convs, ``stem``, ``head`` = last conv + pooling + classifier).
* ``shipped`` -- no quantization here: the INT8 file of the installed default bundle
  (resources/models/kermany_cxr), with its val ACC / ROC-AUC / specificity and bootstrap 95% CIs.
* ``tail`` -- pooling + classifier (`training.quantize.output_tail`) stay fp32, as the exporter keeps them.
* ``fp32:LAYER`` -- mixed precision: the stem and every layer up to and including ``LAYER`` stay fp32
  (`training.quantize.fp32_nodes_through`, the recipe's ``output.int8_fp32_through``).
* ``eq:A,B`` -- activation-range equalization first: each ReLU6 output channel c whose values reach only
  m_c (over 512 training images) is scaled by s_c = (6 / m_c)^A where the next layer is a depthwise conv
  (whose per-channel weights absorb 1/s_c exactly) and (6 / m_c)^B where it is a 1x1 conv or the
  classifier (whose input columns shrink by 1/s_c); BN gamma/beta carry s_c. The fp32 function changes
  only where a value exceeds m_c (max |dlogit| vs the original is printed).
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from int8_qat_probe import CLASSES, SHIPPED_T, kermany_student
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from kdviewer.models.onnx_export import export_onnx, ort_session
from training.calibration import probabilities
from training.data import BatchLoader
from training.evaluate import evaluate_onnx
from training.quantize import _ArrayReader, calibration_images, fp32_nodes_through, int8_latency, output_tail

DEFAULT = ["minmax", "n256", "n512+avg", "pct", "s8", "skip:add", "skip:stem", "skip:head", "skip:expand",
           "skip:project", "skip:dw", "eq:1,0", "eq:1,0.5", "eq:1,1"]


class _Reader(_ArrayReader, CalibrationDataReader):
    pass


def relu6_pairs(model: nn.Module) -> list[tuple[nn.BatchNorm2d, nn.Module, nn.Module, str]]:
    """(BN before a ReLU6, that ReLU6, the one layer reading it, 'dw' | 'conv' | 'linear') in a Lite net."""
    pairs: list[tuple[nn.BatchNorm2d, nn.Module, nn.Module, str]] = []
    b0 = model.blocks[0]
    first = (b0.expand[0], "conv") if not isinstance(b0.expand, nn.Identity) else (b0.depthwise[1], "dw")
    pairs.append((model.stem[2], model.stem[3], *first))
    for b in model.blocks:
        if not isinstance(b.expand, nn.Identity):
            pairs.append((b.expand[1], b.expand[2], b.depthwise[1], "dw"))
        pairs.append((b.depthwise[2], b.depthwise[3], b.project[0], "conv"))
    pairs.append((model.head[1], model.head[2], model.classifier, "linear"))
    return pairs


@torch.no_grad()
def equalize(model: nn.Module, images: np.ndarray, a_dw: float, a_other: float) -> nn.Module:
    """Activation-range equalization (see the module docstring), in place."""
    pairs = relu6_pairs(model)
    peak: dict[int, torch.Tensor] = {}

    def hook(k: int):
        def record(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            top = out.amax(dim=(0, 2, 3)) if out.dim() == 4 else out.amax(0)
            peak[k] = torch.maximum(peak[k], top) if k in peak else top
        return record

    handles = [act.register_forward_hook(hook(k)) for k, (_, act, _, _) in enumerate(pairs)]
    for i in range(0, len(images), 32):
        model(torch.from_numpy(images[i : i + 32]))
    for h in handles:
        h.remove()
    for k, (bn, _act, nxt, kind) in enumerate(pairs):
        s = (6.0 / peak[k].clamp(6.0 / 64, 6.0)) ** (a_dw if kind == "dw" else a_other)
        bn.weight.mul_(s)
        bn.bias.mul_(s)
        shape = {"dw": (-1, 1, 1, 1), "conv": (1, -1, 1, 1), "linear": (1, -1)}[kind]
        nxt.weight.div_(s.view(shape))
    return model


def categories(graph: onnx.GraphProto) -> dict[str, list[str]]:
    """Node names of the pre-processed graph by role."""
    readers: dict[str, list[str]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    convs = [n for n in graph.node if n.op_type == "Conv"]
    cats: dict[str, list[str]] = {k: [] for k in ("add", "dw", "project", "expand", "stem", "head")}
    for n in graph.node:
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if n.op_type == "Add":
            cats["add"].append(n.name)
        elif n is convs[0]:
            cats["stem"].append(n.name)
        elif n is convs[-1] or n.op_type in ("Gemm", "MatMul", "GlobalAveragePool", "Flatten"):
            cats["head"].append(n.name)
        elif n.op_type == "Conv":
            role = "dw" if group > 1 else "expand" if "Clip" in readers.get(n.output[0], []) else "project"
            cats[role].append(n.name)
    return cats


def report_shipped(ref: dict, p_ref: np.ndarray, val: BatchLoader) -> None:
    """The installed bundle's INT8 student against the fp32 student (``ref``) on the same val images."""
    from training.metrics import compute_metrics

    bundle = Path(__file__).resolve().parents[1] / "resources" / "models" / "kermany_cxr"
    r8 = evaluate_onnx(ort_session(bundle / "student.int8.onnx", 2), val, CLASSES)
    dlogit = np.abs(r8["logits"] - ref["logits"]).max(1)
    probs = probabilities(r8["logits"], "single-label", SHIPPED_T)
    dp = np.abs(probs[:, 1] - p_ref)
    print(f"shipped        max |dlogit| {dlogit.max():.3f} mean {dlogit.mean():.3f}  max |dp| {dp.max():.3f} "
          f"(> 0.1: {(dp > 0.1).sum()})", flush=True)
    m = compute_metrics(r8["targets"], probs, CLASSES, "single-label", "PNEUMONIA", n_boot=1000)["metrics"]
    for key in ("accuracy", "roc_auc", "recall", "specificity", "f1"):
        v = m[key]
        print(f"  INT8 val {key}: {v['value']:.3f} ({v['ci_low']:.3f}-{v['ci_high']:.3f})", flush=True)


def main() -> None:
    variants = sys.argv[1:] or DEFAULT
    torch.set_num_threads(2)
    tmp = tempfile.mkdtemp()
    student, sets = kermany_student()
    train_eval, val = BatchLoader(sets["train"], 64), BatchLoader(sets["val"], 128)
    calib = calibration_images(train_eval, 64)  # the exporter's sample
    other = calibration_images(train_eval, 512, seed=1)
    fp32 = export_onnx(student, f"{tmp}/fp32.onnx", 1, 224)
    ref = evaluate_onnx(ort_session(fp32, 2), val, CLASSES)
    p_ref = probabilities(ref["logits"], "single-label", SHIPPED_T)[:, 1]
    for name in variants:
        if name == "shipped":
            report_shipped(ref, p_ref, val)
            continue
        src, note = fp32, ""
        if name.startswith("eq:"):
            a_dw, a_other = (float(v) for v in name[3:].split(","))
            model = equalize(copy.deepcopy(student), other, a_dw, a_other)
            src = export_onnx(model, f"{tmp}/eq.onnx", 1, 224)
            moved = np.abs(evaluate_onnx(ort_session(src, 2), val, CLASSES)["logits"] - ref["logits"]).max()
            note = f" (equalized fp32 vs original: max |dlogit| {moved:.3f})"
        pre = f"{tmp}/pre.onnx"
        quant_pre_process(str(src), pre, skip_symbolic_shape=False)
        opts = set(name.split("+"))
        skip = [n for o in opts if o.startswith("skip:") for n in categories(onnx.load(pre).graph)[o[5:]]]
        skip += [n for o in opts if o.startswith("fp32:") for n in fp32_nodes_through(student, src, o[5:])]
        skip += output_tail(onnx.load(pre).graph) if "tail" in opts else []
        data = other[:256] if "n256" in opts else other if "n512" in opts else calib
        extra: dict[str, object] = {"CalibMovingAverage": True} if "avg" in opts else {}
        method = CalibrationMethod.MinMax
        if "pct" in opts:
            method, extra["CalibPercentile"] = CalibrationMethod.Percentile, 99.99
        int8 = f"{tmp}/int8.onnx"
        quantize_static(pre, int8, _Reader(data), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8 if "s8" in opts else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=skip, calibrate_method=method,
                        extra_options=extra)
        r8 = evaluate_onnx(ort_session(int8, 2), val, CLASSES)
        dlogit = np.abs(r8["logits"] - ref["logits"]).max(1)
        dp = np.abs(probabilities(r8["logits"], "single-label", SHIPPED_T)[:, 1] - p_ref)
        acc = float((r8["probs"].argmax(1) == ref["targets"]).mean())
        lat = int8_latency(fp32, int8, calib[:1], threads=1, runs=60, warmup=5)
        print(f"{name:14s} max |dlogit| {dlogit.max():.3f} mean {dlogit.mean():.3f}  max |dp| {dp.max():.3f} "
              f"(> 0.1: {(dp > 0.1).sum()})  INT8 ACC {acc:.4f}  latency int8/fp32 "
              f"{lat['latency_int8_ms'] / lat['latency_fp32_ms']:.2f}{note}", flush=True)


if __name__ == "__main__":
    main()
