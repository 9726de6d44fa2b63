"""One runtime interface, two engines: ONNX Runtime for the deployed student, torch for teacher/saliency.

Both take a preprocessed float32 batch (N, C, S, S) and return ``(logits (N, K), features (N, D))`` as
numpy arrays: the features are the penultimate activations the OOD guard scores. Runtimes are warmed
up on creation (the first call of either engine allocates and plans; users should not wait for it on
their first case).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from kdviewer.errors import BundleError, InferenceError

log = logging.getLogger(__name__)


class Runtime(ABC):
    """A model that maps a preprocessed batch to (logits, features)."""

    name: str = "runtime"
    device: str = "cpu"
    input_shape: tuple[int, int, int] | None = None  # (C, S, S) when known

    @abstractmethod
    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, C, S, S) float32 -> (logits (N, K) float32, features (N, D) float32)."""

    def warmup(self, runs: int = 1) -> float:
        """Run a dummy batch so the first real call is not the slow one; returns ms of the last run."""
        if self.input_shape is None:
            return 0.0
        x = np.zeros((1, *self.input_shape), dtype=np.float32)
        ms = 0.0
        for _ in range(max(1, runs)):
            t0 = time.perf_counter()
            self.predict(x)
            ms = (time.perf_counter() - t0) * 1000.0
        return ms

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {self.device}>"


def _check_batch(batch: np.ndarray, shape: tuple[int, int, int] | None) -> np.ndarray:
    x = np.ascontiguousarray(batch, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise InferenceError(f"model input must be (N, C, S, S), got shape {x.shape}")
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise InferenceError(f"model expects input (N, {', '.join(map(str, shape))}), got {x.shape}")
    return x


class OrtRuntime(Runtime):
    """ONNX Runtime session (CPU, or CUDA when the installed onnxruntime offers it).

    Inputs/outputs follow docs/CONTRACTS.md: input "input", outputs "logits" and "features".
    """

    def __init__(
        self,
        onnx_path: str | Path,
        threads: int = 2,
        *,
        providers: list[str] | None = None,
        warmup: bool = True,
        label: str | None = None,
        spin: bool = True,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(onnx_path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        if not spin:
            # Other busy processes share the cores (a batch's decoder processes): ORT's threads sleep
            # between operators instead of spin-waiting on CPU time the decoders need
            # (benchmarks/batch_throughput.py: ~13% more images/s on 2 cores).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception zoo
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BundleError(f"{self.path.name}: ONNX Runtime cannot load this model ({first})") from exc
        used = self.session.get_providers()
        self.device = "cuda" if used and used[0] == "CUDAExecutionProvider" else "cpu"
        self.threads = opts.intra_op_num_threads
        inputs = self.session.get_inputs()
        self._input = "input" if any(i.name == "input" for i in inputs) else inputs[0].name
        outs = [o.name for o in self.session.get_outputs()]
        self._logits = "logits" if "logits" in outs else outs[0]
        self._features = "features" if "features" in outs else None
        shape = next(i.shape for i in inputs if i.name == self._input)
        dims = shape[1:] if len(shape) == 4 else []
        static = bool(dims) and all(isinstance(d, int) for d in dims)
        self.input_shape = tuple(int(d) for d in dims) if static else None
        self.name = label or f"onnxruntime:{self.path.name}"
        if warmup:
            self.warmup()

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = _check_batch(batch, self.input_shape)
        names = [self._logits] + ([self._features] if self._features else [])
        try:
            out = self.session.run(names, {self._input: x})
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InferenceError(f"ONNX Runtime failed on a batch of shape {x.shape}: {first}") from exc
        logits = np.asarray(out[0], dtype=np.float32)
        feats = (
            np.asarray(out[1], dtype=np.float32).reshape(len(x), -1)
            if self._features
            else np.zeros((len(x), 0), np.float32)
        )
        return logits, feats


def select_device(pref: str = "auto") -> str:
    """"auto" -> "cuda" > "mps" > "cpu"; an explicit choice that is unavailable falls back to "cpu"."""
    import torch

    def ok(dev: str) -> bool:
        if dev == "cuda":
            return torch.cuda.is_available()
        if dev == "mps":
            mps = getattr(torch.backends, "mps", None)
            return bool(mps is not None and mps.is_available())
        return dev == "cpu"

    pref = (pref or "auto").lower()
    if pref == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if ok(d))
    base = pref.split(":")[0]
    if ok(base):
        return pref
    log.warning("device %r is not available here; using the CPU", pref)
    return "cpu"


class TorchRuntime(Runtime):
    """A torch model (built by `build_model`) run in inference mode, returning (logits, features)."""

    def __init__(
        self,
        model: object,
        device: str = "cpu",
        *,
        input_shape: tuple[int, int, int] | None = None,
        warmup: bool = True,
        label: str | None = None,
    ) -> None:
        from kdviewer.models.architectures import FeatureExtractor

        self.device = select_device(device)
        self.model = model.eval().to(self.device)  # type: ignore[attr-defined]
        self.extractor = FeatureExtractor(self.model)
        self.input_shape = input_shape
        spec = getattr(model, "kd_spec", None)
        self.name = label or f"torch:{getattr(spec, 'name', type(model).__name__)}"
        if warmup:
            self.warmup()

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        x = _check_batch(batch, self.input_shape)
        try:
            with torch.inference_mode():
                logits, feats = self.extractor(torch.from_numpy(x).to(self.device))
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise InferenceError(f"torch model failed on a batch of shape {x.shape}: {first}") from exc
        return (
            logits.float().cpu().numpy(),
            feats.float().reshape(len(x), -1).cpu().numpy(),
        )
