"""Predict and compare: a `Study` in, calibrated probabilities, a label, an OOD score and timings out.

`Classifier` owns a bundle's runtimes: the deployed student on ONNX Runtime (INT8 when available and
allowed, else fp32; torch only when the bundle has no ONNX), the teacher on torch (loaded on demand),
and the OOD guard. Preprocessing is exactly `kdviewer.models.preprocess` with the manifest's settings.

Probabilities: ``softmax(logits / T)`` for single-label tasks, ``sigmoid(logits / T)`` for multi-label
ones, T = ``manifest.calibration.temperature``; ``calibrated`` is True when T != 1 or a calibration was
fitted (``ece_after`` recorded).

CT volumes (``study.is_volume``): every slice is classified (``per_slice``) and the series aggregate
is computed as follows, documented here because it is a clinical choice:

* binary single-label task: the *positive* class probability of the series is the **maximum** over
  slices (a finding on any slice makes the series positive); the other class gets ``1 - p``. The
  positive class is ``manifest.positive_class`` or, if unset, the second class name;
* single-label with more than two classes: the **mean** of slice probabilities;
* multi-label: the **maximum** over slices, per label;
* OOD: the series score is the **median** of slice scores (the few slices above or below the lungs
  must not flag a whole chest CT), flagged when above the threshold.

Modality gate: a bundle lists the DICOM modalities it reads (``manifest.modality``, e.g. CR, DX). A
study of another modality (a CT series given to a radiograph model) is not run through the model at
all: its `Prediction` has ``refused`` set to a human-readable reason, ``label == ""``,
``label_index == -1`` and NaN probabilities. Studies without a DICOM modality (PNG/JPEG load as "OT")
are not refused here; the OOD guard judges them.

Teacher comparison: see `kdviewer.inference.compare` (total variation, Jensen-Shannon, disagreement
flag when labels differ or TV > ``manifest.disagreement_threshold``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kdviewer.errors import BundleError, InferenceError
from kdviewer.imaging.study import Study
from kdviewer.inference.compare import Comparison, compare_predictions
from kdviewer.inference.ood import OodGuard, load_ood_stats
from kdviewer.models.bundle import Bundle, open_bundle
from kdviewer.models.preprocess import preprocess_frame
from kdviewer.models.runtime import OrtRuntime, Runtime, TorchRuntime

log = logging.getLogger(__name__)

Frames = None | Literal["all", "middle"] | list[int]
#: Largest chunk of slices sent to a runtime at once (bounded memory for long CT series).
CHUNK = 32
#: The label of a multi-label answer with no finding at or above its threshold.
NO_FINDING_LABEL = "no finding above its threshold"
#: "auto" deploys INT8 when the exporter recommended it (``int8_parity["recommended"] == 1``), or, for
#: bundles without that flag, when its recorded top-1 agreement with fp32 is at least this.
INT8_MIN_AGREEMENT = 0.98


def cap_to_cores(n: int, what: str) -> int:
    """``n`` capped at the machine's cores, with a warning: more decoder processes or inference threads
    than cores only cost memory (``--workers 32`` on 2 cores started 32 decoders, 2.1 GB)."""
    cores = os.cpu_count() or 1
    if n > cores:
        log.warning("%d %s requested but this machine has %d cores; using %d", n, what, cores, cores)
        return cores
    return n


# ------------------------------------------------------------------------------------------- maths


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def sigmoid(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    return (1.0 / (1.0 + np.exp(-np.clip(z, -80, 80)))).astype(np.float32)


def energy_scores(logits: np.ndarray) -> np.ndarray:
    """Negative free energy ``-logsumexp(logits)`` (higher = less like the training data)."""
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=-1, keepdims=True)
    return (-(m[:, 0] + np.log(np.exp(z - m).sum(axis=-1)))).astype(np.float32)


# ------------------------------------------------------------------------------------- dataclasses


@dataclass
class Prediction:
    """One model's answer for one case (one image, one chosen frame, or a whole CT series)."""

    class_names: list[str]
    probabilities: np.ndarray  # (K,) float32; series aggregate for volumes
    label: str
    label_index: int
    task: str = "single-label"
    role: str = "student"
    runtime: str = ""
    calibrated: bool = False
    temperature: float = 1.0
    ood_score: float | None = None
    ood_flag: bool | None = None
    ood_threshold: float | None = None
    timings: dict[str, float] = field(default_factory=dict)  # preprocess_ms, inference_ms, total_ms
    frames: list[int] = field(default_factory=list)
    aggregate: str | None = None  # how a series aggregate was computed ("max-positive", "mean", ...)
    per_slice: list[dict[str, Any]] | None = None  # [{"index", "probabilities", "label", "ood_score"}]
    logits: np.ndarray | None = None  # (n_frames, K)
    positives: list[str] = field(default_factory=list)  # multi-label: labels with p >= their threshold
    #: multi-label: each label's decision threshold (the manifest's, chosen on val; 0.5 when it has none)
    thresholds: list[float] | None = None
    #: None when the model answered; the reason when the modality gate refused the study (no class then)
    refused: str | None = None

    @property
    def probability(self) -> float:
        """Probability of the predicted label (NaN when the study was refused)."""
        if self.refused is not None or self.label_index < 0:
            return float("nan")
        return float(self.probabilities[self.label_index])

    @property
    def reliable(self) -> bool:
        """False when there is no answer to show as one: refused, or flagged by the OOD guard."""
        return self.refused is None and not self.ood_flag

    def prob_of(self, name: str) -> float:
        return float(self.probabilities[self.class_names.index(name)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "task": self.task,
            "label": self.label,
            "label_index": self.label_index,
            "refused": self.refused,
            "probabilities": {} if self.refused is not None else {
                n: float(p) for n, p in zip(self.class_names, self.probabilities, strict=True)
            },
            "positives": list(self.positives),
            "thresholds": None if self.thresholds is None else {
                n: float(t) for n, t in zip(self.class_names, self.thresholds, strict=True)
            },
            "calibrated": self.calibrated,
            "temperature": self.temperature,
            "ood_score": None if self.ood_score is None else float(self.ood_score),
            "ood_flag": self.ood_flag,
            "ood_threshold": self.ood_threshold,
            "runtime": self.runtime,
            "timings": {k: round(float(v), 3) for k, v in self.timings.items()},
            "frames": list(self.frames),
            "aggregate": self.aggregate,
            "per_slice": self.per_slice,
        }


# ------------------------------------------------------------------------------------ modality gate

#: What a DICOM modality code means, for the gate's messages.
MODALITY_WORDS = {
    "CR": "radiographs", "DX": "radiographs", "RG": "radiographs", "CT": "CT", "MR": "MR", "PT": "PET",
    "NM": "nuclear medicine", "US": "ultrasound", "MG": "mammograms", "XA": "angiograms",
    "RF": "fluoroscopy", "SC": "secondary captures", "OT": "other images",
}
#: Modalities the gate never refuses: ordinary pictures carry no DICOM modality and load as "OT".
UNGATED = frozenset({"", "OT"})


def _modality_words(codes: list[str]) -> str:
    words: list[str] = []
    for c in codes:
        w = MODALITY_WORDS.get(c.upper(), c.upper())
        if w not in words:
            words.append(w)
    return " / ".join(words)


def modality_refusal(accepted: list[str] | tuple[str, ...], modality: str | None) -> str | None:
    """The modality gate: None when a model reading ``accepted`` may answer for a study of ``modality``,
    else the human-readable reason it gives no class.

    An empty ``accepted`` list means the bundle declares no modality (no gate). Studies without a DICOM
    modality (PNG/JPEG, "OT") pass: the OOD guard judges them.
    """
    mod = (modality or "").strip().upper()
    codes = [str(c).strip().upper() for c in accepted if str(c).strip()]
    if not codes or mod in UNGATED or mod in codes:
        return None
    what = MODALITY_WORDS.get(mod, "")
    return (
        f"this model reads chest {_modality_words(codes)} ({', '.join(codes)}); "
        f"this image is {mod}{f' ({what})' if what and what != mod else ''}"
    )


# -------------------------------------------------------------------------------------- classifier


def _frame_indices(study: Study, frames: Frames) -> list[int]:
    n = study.n_frames
    if frames is None:
        return list(range(n)) if study.is_volume else [study.middle_index()]
    if frames == "all":
        return list(range(n))
    if frames == "middle":
        return [study.middle_index()]
    idx = [int(i) for i in frames]
    bad = [i for i in idx if not 0 <= i < n]
    if bad or not idx:
        raise InferenceError(f"frame indices {bad or idx} are outside this study (0..{n - 1})")
    return idx


class Classifier:
    """A bundle ready to classify: student runtime, optional teacher, OOD guard.

    Args:
        bundle: a `Bundle` or a path to one.
        use_int8: True = INT8 ONNX (error if absent), False = fp32 ONNX, "auto" = INT8 when present
            and recommended by the exporter's parity check (``manifest.int8_parity``), else fp32.
        threads: ONNX Runtime intra-op threads.
        load_teacher: build the teacher now (otherwise on the first `compare`).
        device: torch device for the teacher and saliency ("auto": cuda > mps > cpu).
        spin: let ONNX Runtime's threads spin-wait between operators (its default, fastest alone);
            False when other busy processes share the cores (`kdviewer.batch`'s decoders).
    """

    def __init__(
        self,
        bundle: Bundle | str | Path,
        use_int8: bool | Literal["auto"] = "auto",
        threads: int = 2,
        load_teacher: bool = False,
        device: str = "cpu",
        spin: bool = True,
    ) -> None:
        self.spin = spin
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        self.manifest = self.bundle.manifest
        self.pre = self.manifest.preprocessing
        self.class_names = list(self.manifest.class_names)
        self.multi_label = self.manifest.task == "multi-label"
        self.thresholds = np.array([self.manifest.threshold_of(n) for n in self.class_names], np.float32)
        self.temperature = float(self.manifest.calibration.temperature)
        self.calibrated = self.temperature != 1.0 or self.manifest.calibration.ece_after is not None
        self.threads = cap_to_cores(max(1, int(threads)), "inference threads (--threads)")
        self.device = device
        self._torch_models: dict[str, Any] = {}
        self._teacher_rt: Runtime | None = None
        self.input_shape = (self.pre.channels, self.pre.input_size, self.pre.input_size)
        self.int8 = False
        self.student = self._make_student(use_int8)
        self.ood = self._make_guard()
        if load_teacher:
            self.teacher_runtime()

    # -- construction -----------------------------------------------------------------------------
    def _make_student(self, use_int8: bool | Literal["auto"]) -> Runtime:
        spec = self.manifest.student
        if use_int8 is True and not spec.onnx_int8:
            raise BundleError(f"{self.bundle.source}: this bundle has no INT8 student model")
        parity = self.manifest.int8_parity
        auto_ok = parity.get("recommended", 0.0) >= 1.0 or (
            "recommended" not in parity and parity.get("agreement", 0.0) >= INT8_MIN_AGREEMENT
        )
        want_int8 = bool(spec.onnx_int8) and (use_int8 is True or (use_int8 == "auto" and auto_ok))
        if want_int8 or spec.onnx:
            self.int8 = want_int8
            path = self.bundle.onnx_path(int8=want_int8)
            label = f"onnxruntime {'int8' if want_int8 else 'fp32'} {spec.architecture}"
            return OrtRuntime(path, threads=self.threads, label=label, spin=self.spin)  # type: ignore[arg-type]
        return TorchRuntime(
            self.torch_model("student"), self.device, input_shape=self.input_shape,
            label=f"torch fp32 {spec.architecture}",
        )

    def _make_guard(self) -> OodGuard | None:
        spec = self.manifest.ood
        if spec is None or spec.method != "mahalanobis" or not spec.stats:
            return None
        try:
            stats = load_ood_stats(self.bundle.path(spec.stats))
        except (ValueError, OSError) as exc:
            raise BundleError(f"{self.bundle.source}: OOD statistics {spec.stats} unreadable: {exc}") from exc
        guard = OodGuard(stats, float(spec.threshold))
        # statistics fitted for another feature size would leave the guard silently off: refuse them
        _, feats = self.student.predict(np.zeros((1, *self.input_shape), np.float32))
        if feats.ndim != 2 or feats.shape[1] != guard.dim:
            raise BundleError(
                f"{self.bundle.source}: ood.stats {spec.stats} describes {guard.dim} features but the "
                f"student gives {feats.shape[-1] if feats.ndim else 0}; the OOD statistics belong to "
                "another model (re-export the bundle)"
            )
        return guard

    def torch_model(self, role: Literal["student", "teacher"] = "student") -> Any:
        """The torch network of ``role`` (built once from the bundle's state dict; for saliency)."""
        if role not in self._torch_models:
            from kdviewer.models.runtime import select_device

            self._torch_models[role] = self.bundle.build_torch(role).to(select_device(self.device))
        return self._torch_models[role]

    def teacher_runtime(self) -> Runtime:
        if self._teacher_rt is None:
            if not self.bundle.has_teacher:
                raise BundleError(f"{self.bundle.source}: this bundle has no teacher weights to compare with")
            arch = self.manifest.teacher.architecture  # type: ignore[union-attr]
            self._teacher_rt = TorchRuntime(
                self.torch_model("teacher"), self.device, input_shape=self.input_shape,
                label=f"torch fp32 {arch}",
            )
        return self._teacher_rt

    @property
    def has_teacher(self) -> bool:
        return self.bundle.has_teacher

    # -- low level --------------------------------------------------------------------------------
    def preprocess(self, study: Study, frames: Frames = None) -> tuple[np.ndarray, list[int]]:
        idx = _frame_indices(study, frames)
        batch = np.stack([preprocess_frame(study.frames[i], self.pre, study) for i in idx])
        return batch, idx

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        fn = sigmoid if self.multi_label else softmax
        return fn(logits, self.temperature)

    def _run(self, runtime: Runtime, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outs = [runtime.predict(batch[i : i + CHUNK]) for i in range(0, len(batch), CHUNK)]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

    def _ood(self, logits: np.ndarray, feats: np.ndarray) -> np.ndarray | None:
        spec = self.manifest.ood
        if spec is not None and spec.method == "energy":
            return energy_scores(logits)
        if self.ood is None:
            return None
        if feats.shape[1] != self.ood.dim:
            raise InferenceError(f"the model gave {feats.shape[1]} features but the OOD guard expects "
                                 f"{self.ood.dim}")
        return self.ood.score(feats)

    def _label(self, probs: np.ndarray) -> tuple[str, int, list[str]]:
        """Single-label: the arg-max. Multi-label: every label at or above its own threshold (listed
        from the most probable), and as ``label_index`` the label furthest above (or least below) its
        threshold: the finding a saliency map is drawn for by default."""
        if not self.multi_label:
            k = int(np.argmax(probs))
            return self.class_names[k], k, []
        margin = np.asarray(probs, np.float32) - self.thresholds
        k = int(np.argmax(margin))
        order = np.argsort(-np.asarray(probs, np.float64), kind="stable")
        pos = [self.class_names[i] for i in order if margin[i] >= 0]
        return (", ".join(pos) if pos else NO_FINDING_LABEL), k, pos

    def _positive_index(self) -> int:
        if self.manifest.positive_class is not None:
            return self.class_names.index(self.manifest.positive_class)
        return 1

    def _aggregate(self, probs: np.ndarray) -> tuple[np.ndarray, str]:
        if len(probs) == 1:
            return probs[0], "single"
        if self.multi_label:
            return probs.max(axis=0), "max"
        if len(self.class_names) == 2:
            pi = self._positive_index()
            agg = np.empty(2, np.float32)
            agg[pi] = probs[:, pi].max()
            agg[1 - pi] = 1.0 - agg[pi]
            return agg, f"max-{self.class_names[pi]}"
        return probs.mean(axis=0), "mean"

    def _prediction(
        self,
        logits: np.ndarray,
        feats: np.ndarray,
        idx: list[int],
        role: str,
        runtime: Runtime,
        timings: dict[str, float],
        per_slice: bool,
    ) -> Prediction:
        probs = self.probabilities(logits)
        scores = self._ood(logits, feats) if role == "student" else None
        agg, how = self._aggregate(probs)
        label, k, pos = self._label(agg)
        ood_score = ood_flag = threshold = None
        if scores is not None and self.manifest.ood is not None:
            ood_score = float(np.median(scores))
            threshold = float(self.manifest.ood.threshold)
            ood_flag = bool(ood_score > threshold)
        slices = None
        if per_slice:
            slices = []
            for j, i in enumerate(idx):
                lab, _, _ = self._label(probs[j])
                slices.append(
                    {
                        "index": i,
                        "probabilities": [float(p) for p in probs[j]],
                        "label": lab,
                        "ood_score": None if scores is None else float(scores[j]),
                    }
                )
        return Prediction(
            class_names=self.class_names,
            probabilities=np.asarray(agg, np.float32),
            label=label,
            label_index=k,
            task=self.manifest.task,
            role=role,
            runtime=runtime.name,
            calibrated=self.calibrated,
            temperature=self.temperature,
            ood_score=ood_score,
            ood_flag=ood_flag,
            ood_threshold=threshold,
            timings=timings,
            frames=list(idx),
            aggregate=how if len(idx) > 1 else None,
            per_slice=slices,
            logits=logits,
            positives=pos,
            thresholds=[float(t) for t in self.thresholds] if self.multi_label else None,
        )

    # -- modality gate ----------------------------------------------------------------------------
    def refusal(self, study_or_modality: Study | str | None) -> str | None:
        """Why this model gives no class for a study (or a DICOM modality code); None when it may answer."""
        modality = study_or_modality.modality if isinstance(study_or_modality, Study) else study_or_modality
        return modality_refusal(self.manifest.modality, modality)

    def refused_prediction(self, reason: str, frames: list[int] | None = None,
                           role: Literal["student", "teacher"] = "student") -> Prediction:
        """The answer for a refused study: no class, no probabilities, the reason."""
        return Prediction(
            class_names=self.class_names,
            probabilities=np.full(len(self.class_names), np.nan, np.float32),
            label="",
            label_index=-1,
            task=self.manifest.task,
            role=role,
            runtime="",
            calibrated=self.calibrated,
            temperature=self.temperature,
            frames=list(frames or []),
            refused=reason,
        )

    # -- public -----------------------------------------------------------------------------------
    def predict(self, study: Study, frames: Frames = None, role: Literal["student", "teacher"] = "student"
                ) -> Prediction:
        """Classify a study. ``frames``: None = middle frame of an image / every slice of a CT volume;
        "all"; "middle"; or a list of frame indices. A study the modality gate refuses is not run
        through the model: the `Prediction` carries ``refused`` and no class."""
        reason = self.refusal(study)
        if reason is not None:
            return self.refused_prediction(reason, _frame_indices(study, frames), role)
        t0 = time.perf_counter()
        batch, idx = self.preprocess(study, frames)
        t1 = time.perf_counter()
        runtime = self.student if role == "student" else self.teacher_runtime()
        logits, feats = self._run(runtime, batch)
        t2 = time.perf_counter()
        timings = {"preprocess_ms": (t1 - t0) * 1e3, "inference_ms": (t2 - t1) * 1e3}
        pred = self._prediction(logits, feats, idx, role, runtime, timings, per_slice=len(idx) > 1)
        pred.timings["total_ms"] = (time.perf_counter() - t0) * 1e3
        return pred

    def compare(self, study: Study, frames: Frames = None) -> Comparison:
        """Student and teacher on the same input (preprocessed once); both refused by the modality gate
        (without running either model) when the study is of a modality the bundle does not read."""
        reason = self.refusal(study)
        if reason is not None:
            idx = _frame_indices(study, frames)
            return self.compare_predictions(self.refused_prediction(reason, idx, "student"),
                                            self.refused_prediction(reason, idx, "teacher"))
        t0 = time.perf_counter()
        batch, idx = self.preprocess(study, frames)
        pre_ms = (time.perf_counter() - t0) * 1e3
        preds = []
        for role, rt in (("student", self.student), ("teacher", self.teacher_runtime())):
            t1 = time.perf_counter()
            logits, feats = self._run(rt, batch)
            inf_ms = (time.perf_counter() - t1) * 1e3
            preds.append(self._prediction(logits, feats, idx, role, rt,
                                          {"preprocess_ms": pre_ms, "inference_ms": inf_ms,
                                           "total_ms": pre_ms + inf_ms}, per_slice=len(idx) > 1))
        return self.compare_predictions(preds[0], preds[1])

    def compare_predictions(self, student: Prediction, teacher: Prediction) -> Comparison:
        return compare_predictions(student, teacher, self.manifest.disagreement_threshold, self.multi_label)

    def predict_batch(
        self, inputs: list[np.ndarray] | np.ndarray, role: Literal["student", "teacher"] = "student"
    ) -> list[Prediction]:
        """Classify already preprocessed inputs, one (C, S, S) array (or (n, C, S, S) series) per case.

        Each case is one `Prediction` (a series of n slices is aggregated as in `predict`); the
        inference runs over all cases in chunks, so this is the fast path for batch mode.
        """
        arrays = [np.asarray(a, np.float32) for a in inputs]
        arrays = [a[None] if a.ndim == 3 else a for a in arrays]
        if not arrays:
            return []
        sizes = [len(a) for a in arrays]
        runtime = self.student if role == "student" else self.teacher_runtime()
        t1 = time.perf_counter()
        logits, feats = self._run(runtime, np.concatenate(arrays))
        per_image_ms = (time.perf_counter() - t1) * 1e3 / max(1, len(logits))
        out, start = [], 0
        for n in sizes:
            sl = slice(start, start + n)
            start += n
            timings = {"inference_ms": per_image_ms * n}
            out.append(self._prediction(logits[sl], feats[sl], list(range(n)), role, runtime, timings,
                                        per_slice=n > 1))
        return out

    def compare_batch(self, inputs: list[np.ndarray] | np.ndarray) -> list[Comparison]:
        students = self.predict_batch(inputs, "student")
        teachers = self.predict_batch(inputs, "teacher")
        return [self.compare_predictions(s, t) for s, t in zip(students, teachers, strict=True)]
