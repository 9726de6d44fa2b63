"""Static INT8 quantization of the exported student with ONNX Runtime, and its parity check.

`quantize_onnx` runs ``quant_pre_process`` (shape inference + graph optimisation), then
``quantize_static`` in QDQ format with per-channel signed weights and unsigned activations (U8S8),
calibrated (MinMax) on preprocessed images drawn from the TRAINING data (`calibration_images`,
typically 64-256 images). The held-out set is never used for calibration. ``nodes_to_exclude`` keeps
nodes in fp32 (mixed precision); `fp32_nodes_through` names the nodes of the first layers of a network,
"the stem up to and including layer X" (``output.int8_fp32_through`` of a recipe). Why: in a network
whose early layers feed a fine-tuned head, rounding the early layers' weights and activations to 8 bits
can move a probability far more than rounding the later ones (the Kermany Lite0 student: stem to
``blocks.9`` in fp32 takes max |Δp| on all val images from 0.23 to 0.03 at 0.64-0.77x the fp32
latency; docs/results/kermany_cxr.md). Keeping a contiguous first part in fp32 works; excluding scattered node
types does not (their neighbours' tensors stay quantized).

`int8_parity` compares INT8 and fp32 probabilities on a held-out set and times both at batch 1; its
dict is stored verbatim in ``Manifest.int8_parity``:

* ``max_abs_diff_prob`` / ``mean_abs_diff_prob``: max / mean |p_int8 - p_fp32| over all cases and
  classes (softmax, or per-label sigmoid for multi-label), after the manifest temperature;
* ``agreement``: fraction of cases with the same arg-max label (multi-label: fraction of
  (case, label) decisions at 0.5 that agree);
* ``latency_fp32_ms`` / ``latency_int8_ms`` / ``speedup``: median batch-1 latency in ONNX Runtime;
* ``recommended``: 1.0 when INT8 is both faster and agrees on >= 98% of labels and its max |Δp| is
  <= 0.1, else 0.0. The INT8 file is kept in the bundle either way; the viewer deploys it only when
  ``recommended`` is 1.0 (or when the user asks for it).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

AGREEMENT_MIN = 0.98
MAX_DP_MAX = 0.1


class Reservoir:
    """A uniform random sample of up to ``size`` images from batches seen one after another
    (reservoir sampling), kept as float32 copies with their running index."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = int(size)
        self.rng = np.random.default_rng(seed)
        self.items: list[tuple[int, np.ndarray]] = []
        self.seen = 0

    def add(self, images: Any) -> None:
        arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
        for img in arr:
            if len(self.items) < self.size:
                self.items.append((self.seen, np.array(img, dtype=np.float32)))
            else:
                j = int(self.rng.integers(0, self.seen + 1))
                if j < self.size:
                    self.items[j] = (self.seen, np.array(img, dtype=np.float32))
            self.seen += 1

    def result(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(indices (M,) int64, images (M, C, S, S)) in the order seen; ``limit`` drops indices >= it."""
        kept = sorted(t for t in self.items if limit is None or t[0] < limit)
        if not kept:
            return np.zeros(0, dtype=np.int64), np.zeros((0,), dtype=np.float32)
        return np.array([i for i, _ in kept], dtype=np.int64), np.stack([img for _, img in kept])


def calibration_images(
    loader: Iterable, max_images: int = 128, seed: int = 0, max_scan: int = 50_000
) -> np.ndarray:
    """A uniform random sample of up to ``max_images`` preprocessed images (N, C, S, S) float32.

    Reservoir sampling over the batches of ``loader`` (``(images, targets)`` or images), scanning at
    most ``max_scan`` images, so that a loader ordered by class still gives a sample of every class.
    The sample keeps the loader's order.
    """
    reservoir = Reservoir(max_images, seed)
    for batch in loader:
        reservoir.add(batch[0] if isinstance(batch, (tuple, list)) else batch)
        if reservoir.seen >= max_scan:
            break
    if not reservoir.items:
        raise ValueError("the calibration loader yielded no images")
    return reservoir.result()[1]


class _ArrayReader:
    """onnxruntime CalibrationDataReader over an in-memory array, in small batches."""

    def __init__(self, images: np.ndarray, input_name: str = "input", batch_size: int = 16) -> None:
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.input_name = input_name
        self.batch_size = batch_size
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self.images):
            return None
        batch = self.images[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._pos = 0


def _onnx_scope(module_name: str) -> str:
    """The node-name prefix the TorchScript ONNX exporter gives the nodes of ``module_name`` inside
    `kdviewer.models.onnx_export.FeatureExtractor` (whose network is its ``model``): one level per
    attribute, an indexed child named after its container ("blocks.0.depthwise.3" ->
    "/model/blocks/blocks.0/depthwise/depthwise.3/", "layer1.0.0" -> "/model/layer1/layer1.0/layer1.0.0/")."""
    scopes: list[str] = []
    for part in module_name.split("."):
        scopes.append(f"{scopes[-1]}.{part}" if part.isdigit() and scopes else part)
    return "/model/" + "/".join(scopes) + "/"


def require_layer(model: nn.Module, layer: str) -> None:
    """ValueError unless ``model`` has a module named ``layer`` (checked when a run starts, not hours later
    at its export)."""
    if not layer or layer not in dict(model.named_modules()):
        raise ValueError(f"output.int8_fp32_through: no layer {layer!r} in {type(model).__name__}")


def fp32_nodes_through(model: nn.Module, onnx_path: str | Path, layer: str) -> list[str]:
    """Names of the nodes of ``onnx_path`` (exported from ``model`` by `export_onnx`) that belong to
    ``model``'s layers up to and including module ``layer``, in the order the network registers its
    modules (its forward order for the sequential nets here: stem, then blocks).

    Raises ValueError for a layer ``model`` does not have, or when no node carries the layers' names
    (a graph from another exporter): never a silent "nothing excluded".
    """
    import onnx

    require_layer(model, layer)
    names = [n for n, _ in model.named_modules() if n]
    inside = [i for i, n in enumerate(names) if n == layer or n.startswith(layer + ".")]
    ancestors = {layer.rsplit(".", i)[0] for i in range(layer.count(".") + 1)} - {layer}
    prefixes = tuple(_onnx_scope(n) for n in names[: inside[-1] + 1] if n not in ancestors)
    nodes = [n.name for n in onnx.load(str(onnx_path)).graph.node if n.name.startswith(prefixes)]
    if not nodes:
        raise ValueError(
            f"int8_fp32_through {layer!r}: no node of {Path(onnx_path).name} carries the names of the layers "
            "up to it (not exported by kdviewer's TorchScript exporter?)"
        )
    return nodes


def output_tail(graph: Any) -> list[str]:
    """Names of the nodes between the network's last convolutions and its outputs (pooling, flatten, the
    classifier; a last residual addition), found walking back from the graph outputs to the first Conv
    on each path (a Conv's own activation stays with it: ORT fuses the two).

    `quantize_onnx` keeps them fp32: ORT would otherwise round the logits and features to 8 bits on a
    range set by the calibration images — a grid of ~0.1 logit on which two logits can tie exactly
    (p = 0.5), and a clamp for a case more confident than any calibration image (the Kermany student's
    max |Δlogit| on val: 2.26 with them INT8, 1.38 without). They are a few thousand multiply-adds:
    nothing to gain from INT8."""
    producer = {o: n for n in graph.node for o in n.output}
    tail: list[str] = []
    todo = [o.name for o in graph.output]
    seen: set[str] = set()
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in seen or node.op_type == "Conv":
            continue
        if node.op_type in ("Relu", "Clip") and getattr(producer.get(node.input[0]), "op_type", "") == "Conv":
            continue
        seen.add(node.name)
        tail.append(node.name)
        todo.extend(node.input)
    return tail


def quantize_onnx(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: np.ndarray,
    *,
    per_channel: bool = True,
    activation_type: str = "QUInt8",
    reduce_range: bool = False,
    preprocess: bool = True,
    nodes_to_exclude: Sequence[str] = (),
) -> Path:
    """Statically quantize ``fp32_path`` to INT8 (QDQ, per-channel weights) -> ``out_path``; the nodes
    named in ``nodes_to_exclude`` (e.g. `fp32_nodes_through`) and the `output_tail` stay fp32.

    Activations are unsigned (U8S8) by default: on x86 ONNX Runtime runs U8S8 convolutions with
    integer dot-product kernels, measured 2.5x faster than fp32 for ResNet-18 at 224 px, while S8S8
    QDQ was *slower* than fp32 on the same CPU. ``reduce_range`` (7-bit weights) avoids saturation on
    old AVX2 CPUs without VNNI at a small accuracy cost; the parity check shows either effect.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    calibration = np.asarray(calibration, dtype=np.float32)
    if calibration.ndim != 4 or len(calibration) == 0:
        raise ValueError(f"calibration images must be (N>0, C, S, S), got {calibration.shape}")

    class Reader(_ArrayReader, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory(prefix="kd-quant-") as tmp:
        src = fp32_path
        if preprocess:
            pre = Path(tmp) / "pre.onnx"
            try:
                quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
                src = pre
            except Exception as exc:  # pre-processing is an optimisation; quantize without it
                log.warning("quant_pre_process failed (%s); quantizing the raw graph", exc)
        quantize_static(
            str(src),
            str(out_path),
            Reader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=getattr(QuantType, activation_type),
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=[*nodes_to_exclude, *output_tail(onnx.load(str(src)).graph)],
            # A BatchNormalization that cannot be folded into a convolution (DenseNet's pre-activation
            # norm1/norm2) keeps its rank-1 scale: per channel along axis 0, not ORT's default axis 1
            # (which warned "Axis 1 is out-of-range" for each and fell back to one scale per tensor).
            extra_options={"QDQOpTypePerChannelSupportToAxis": {"BatchNormalization": 0}},
        )
    return out_path


def run_onnx(sess: Any, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(logits, features) of an ORT session with outputs "logits"/"features" over ``images``."""
    name = sess.get_inputs()[0].name
    logits, feats = [], []
    for i in range(0, len(images), batch_size):
        lo, fe = sess.run(["logits", "features"], {name: np.ascontiguousarray(images[i : i + batch_size])})
        logits.append(lo)
        feats.append(fe)
    return np.concatenate(logits), np.concatenate(feats)


def _session(model: Any, threads: int) -> Any:
    """An ORT session of ``model``: an ONNX file, or a session already (returned as it is)."""
    from kdviewer.models.onnx_export import ort_session

    return ort_session(model, threads) if isinstance(model, (str, Path)) else model


def int8_parity(
    fp32: Any,
    int8: Any,
    images: np.ndarray,
    task: str = "single-label",
    temperature: float = 1.0,
    *,
    threads: int = 2,
    runs: int = 20,
    warmup: int = 3,
    fp32_logits: np.ndarray | None = None,
) -> dict[str, float]:
    """Compare INT8 and fp32 ONNX probabilities on held-out ``images``; see the module docstring.

    ``fp32`` / ``int8`` are ONNX files or ORT sessions of them. ``fp32_logits``: the fp32 model's
    logits of ``images`` when the caller has them already (the export's prediction pass): fp32 is then
    not run again. ``runs`` <= 0 leaves out the latencies (and ``speedup``/``recommended``):
    `recommend_int8` adds them once the caller has timed the files (`int8_latency`)."""
    from training.calibration import probabilities

    images = np.asarray(images, dtype=np.float32)
    s8 = _session(int8, threads)
    s32 = None
    if fp32_logits is None or runs > 0:
        s32 = _session(fp32, threads)
    logits32 = run_onnx(s32, images)[0] if fp32_logits is None else np.asarray(fp32_logits, dtype=np.float32)
    if len(logits32) != len(images):
        raise ValueError(f"{len(logits32)} fp32 logits for {len(images)} images")
    p32 = probabilities(logits32, task, temperature)
    p8 = probabilities(run_onnx(s8, images)[0], task, temperature)
    diff = np.abs(p8 - p32)
    if task == "multi-label":
        agreement = float(np.mean((p8 >= 0.5) == (p32 >= 0.5)))
    else:
        agreement = float(np.mean(p8.argmax(1) == p32.argmax(1)))
    out = {
        "max_abs_diff_prob": float(diff.max()),
        "mean_abs_diff_prob": float(diff.mean()),
        "agreement": agreement,
        "n": float(len(images)),
        "threads": float(threads),
    }
    if runs <= 0:  # the caller times the two files elsewhere (export: with the complexity table)
        return out
    out.update(int8_latency(s32, s8, images[:1], threads, runs, warmup))
    return recommend_int8(out)


def int8_latency(
    fp32: Any, int8: Any, image: np.ndarray, threads: int = 2, runs: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median batch-1 milliseconds of two ONNX files (paths or sessions), timed round-robin."""
    from training.complexity import round_robin_latency

    s32 = _session(fp32, threads)
    s8 = _session(int8, threads)
    feed = {s32.get_inputs()[0].name: np.ascontiguousarray(np.asarray(image, dtype=np.float32)[:1])}
    lat = round_robin_latency(
        {"fp32": lambda: s32.run(None, feed), "int8": lambda: s8.run(None, feed)}, runs=runs, warmup=warmup
    )
    return {"latency_fp32_ms": lat["fp32"], "latency_int8_ms": lat["int8"]}


def recommend_int8(parity: dict[str, float]) -> dict[str, float]:
    """Add ``speedup`` and ``recommended`` (see the module docstring) to a parity dict with latencies."""
    out = dict(parity)
    lat32, lat8 = float(out["latency_fp32_ms"]), float(out["latency_int8_ms"])
    out["speedup"] = lat32 / lat8 if lat8 > 0 else 0.0
    good = out["agreement"] >= AGREEMENT_MIN and out["max_abs_diff_prob"] <= MAX_DP_MAX and lat8 < lat32
    out["recommended"] = 1.0 if good else 0.0
    if not good:
        log.warning(
            "INT8 model kept but not recommended: agreement %.3f, max |Δp| %.3f, %.2f ms vs fp32 %.2f ms",
            out["agreement"],
            out["max_abs_diff_prob"],
            lat8,
            lat32,
        )
    return out
