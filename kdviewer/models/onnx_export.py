"""Export a classifier to the bundle's ONNX contract and check it (torch + onnx + onnxruntime; no Qt).

Contract (docs/CONTRACTS.md): input "input" float32 (N, C, S, S) with a dynamic batch N; outputs
"logits" (N, K) and "features" (N, D) from `FeatureExtractor(model)`; opset 17.

The legacy TorchScript exporter (``dynamo=False``) is used first: it is fast (about a second for a
ResNet-18), needs no network and gives a plain static graph. If it is unavailable in a future torch,
the torch.export-based exporter is tried. Every export is followed by ``onnx.checker`` and a parity
check of ONNX Runtime against torch on a random batch of two (which also proves the batch axis is
really dynamic).
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdviewer.models.architectures import FeatureExtractor

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "features")
DEFAULT_OPSET = 17


class OnnxParityError(RuntimeError):
    """ONNX Runtime and torch disagree on the exported model beyond tolerance."""


def _export(wrapper: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    dynamic = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy-exporter deprecation + tracer warnings
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        return
    except (TypeError, RuntimeError, AttributeError) as exc:  # legacy exporter gone or failing
        log.warning("TorchScript ONNX export failed (%s); trying the torch.export-based exporter", exc)
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        wrapper,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes={"x": {0: batch}},
        opset_version=opset,
        dynamo=True,
        external_data=False,
    )


def ort_session(path: str | Path, threads: int = 1):  # -> onnxruntime.InferenceSession
    """A CPU InferenceSession with ``threads`` intra-op threads and quiet logging."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def check_parity(
    model: nn.Module, path: str | Path, channels: int, input_size: int, batch: int = 2, seed: int = 0
) -> dict[str, float]:
    """Run torch and ORT on the same random batch; returns max |Δ| of logits and features.

    ``model`` is a classifier (a deep copy is wrapped) or an already built `FeatureExtractor`.

    Raises `OnnxParityError` when the logits differ by more than 1e-3 relative to their scale
    (``max|Δ| > 1e-3 * max(1, max|logits|)``).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, input_size, input_size, generator=gen)
    if isinstance(model, FeatureExtractor):
        wrapper = model.eval()
    else:
        wrapper = FeatureExtractor(copy.deepcopy(model).to("cpu").float().eval()).eval()
    with torch.no_grad():
        ref_logits, ref_feats = (t.numpy() for t in wrapper(x))
    sess = ort_session(path)
    logits, feats = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
    d_logits = float(np.max(np.abs(logits - ref_logits)))
    d_feats = float(np.max(np.abs(feats - ref_feats)))
    scale = max(1.0, float(np.max(np.abs(ref_logits))))
    if logits.shape != ref_logits.shape or feats.shape != ref_feats.shape:
        raise OnnxParityError(f"ONNX output shapes {logits.shape}/{feats.shape} differ from torch")
    if not d_logits <= 1e-3 * scale:
        raise OnnxParityError(f"ONNX Runtime logits differ from torch by {d_logits:.3g} (scale {scale:.3g})")
    return {"max_abs_diff_logits": d_logits, "max_abs_diff_features": d_feats}


def export_onnx(
    model: nn.Module,
    path: str | Path,
    channels: int,
    input_size: int,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
) -> Path:
    """Export ``FeatureExtractor(model)`` (eval mode, on CPU) to ``path`` and verify it.

    The model itself is not modified (a deep copy is exported). Returns the path written.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu_model = copy.deepcopy(model).to("cpu").float().eval()
    wrapper = FeatureExtractor(cpu_model).eval()
    example = torch.randn(1, channels, input_size, input_size)
    with torch.no_grad():
        _export(wrapper, example, path, opset)
    onnx.checker.check_model(str(path))
    if check:
        diffs = check_parity(wrapper, path, channels, input_size)
        log.info("exported %s: ORT vs torch max |Δ logits| = %.2g", path.name, diffs["max_abs_diff_logits"])
    return path
