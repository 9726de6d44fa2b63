"""The model-bundle manifest: the contract between the training engine and the viewer.

A bundle is a folder or .zip holding ``manifest.json`` plus the files it names:

* ``student.onnx`` (required for deployment), ``student.int8.onnx`` (optional),
* ``student.pt`` / ``teacher.pt``: *state dicts* only, read with ``torch.load(weights_only=True)``,
* ``ood.npz`` (optional): feature statistics for the out-of-distribution guard,
* ``model_card.md`` / ``report.html`` (optional, human-readable).

Schema versioning: ``schema_version`` is "MAJOR.MINOR". Readers accept any minor of a major they
know and refuse other majors with a clear message. Bump the minor for additive fields, the major
for anything a current reader would misread.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = "1.1"  # 1.1: per-label decision thresholds (multi-label)
SUPPORTED_MAJOR = 1

#: Model input sizes a bundle may ask for (a 60000-pixel input would allocate 13 GiB per image).
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 8, 2048
#: Calibration temperatures outside this range are not a calibration but a broken number
#: (1e-320 turns every logit into inf / NaN; 1e300 makes every answer 50/50).
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 1e2


def _finite(value: float | None, what: str) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, not {value}")
    return value


def _printable_name(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"{what} must not be empty")
    if any(ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0 for ch in value):
        raise ValueError(f"{what} {value!r} contains control characters")
    return value


class Normalization(BaseModel):
    """Per-channel mean/std applied after scaling pixels to [0, 1]."""

    model_config = ConfigDict(extra="forbid")
    mean: list[float] = Field(default_factory=lambda: [0.5])
    std: list[float] = Field(default_factory=lambda: [0.25])


class Preprocessing(BaseModel):
    """How a `Study` frame becomes model input; shared by training and inference so they agree.

    Steps, in order: choose the frame (middle slice for volumes unless per-slice), map modality
    values to [0, 1] (``intensity``: "window" uses ``window_center``/``window_width`` — e.g. a CT
    lung window; "minmax" uses the frame's robust 0.5/99.5 percentiles; "voi" uses the study's
    default window), invert if the study is MONOCHROME1, resize (shorter side to ``resize`` then
    centre crop ``input_size``; ``resize`` == ``input_size`` means a direct resize that squeezes the
    frame to a square, see ``aspect``), repeat to
    ``channels``, then normalise.
    """

    model_config = ConfigDict(extra="forbid")
    input_size: int = 224
    resize: int = 224
    channels: Literal[1, 3] = 1
    intensity: Literal["minmax", "window", "voi"] = "minmax"
    # How the frame's shape becomes a square: "squeeze" resizes straight to input_size x input_size
    # (the aspect ratio is not kept — for models trained on images stored that way, e.g. the Kermany
    # 224 px copy); "crop" keeps it (shorter side to ``resize``, centre crop). None: "squeeze" when
    # resize == input_size, else "crop" (what bundles before this field did).
    aspect: Literal["squeeze", "crop"] | None = None
    window_center: float | None = None
    window_width: float | None = None
    normalization: Normalization = Field(default_factory=Normalization)

    @model_validator(mode="after")
    def _check(self) -> Preprocessing:
        for what, size in (("input_size", self.input_size), ("resize", self.resize)):
            if not MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE:
                raise ValueError(f"{what} {size} is outside {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE} pixels")
        _finite(self.window_center, "window_center")
        _finite(self.window_width, "window_width")
        if self.window_width is not None and self.window_width <= 0:
            raise ValueError("window_width must be > 0")
        for v in self.normalization.mean:
            _finite(v, "normalization.mean")
        for v in self.normalization.std:
            _finite(v, "normalization.std")
            if v <= 0:
                raise ValueError("normalization.std values must be > 0")
        if self.intensity == "window" and (self.window_center is None or not self.window_width):
            raise ValueError("intensity='window' needs window_center and a positive window_width")
        if self.resize < self.input_size:
            raise ValueError("resize must be >= input_size (resize, then centre-crop)")
        if self.aspect == "squeeze" and self.resize != self.input_size:
            raise ValueError("aspect 'squeeze' resizes straight to input_size: set resize == input_size")
        if self.aspect == "crop" and self.resize == self.input_size:
            raise ValueError("aspect 'crop' keeps the aspect ratio: set resize > input_size")
        n = self.channels
        if len(self.normalization.mean) not in (1, n) or len(self.normalization.std) not in (1, n):
            raise ValueError("normalization mean/std must have 1 or `channels` entries")
        return self


class ModelSpec(BaseModel):
    """An architecture plus where its weights live inside the bundle."""

    model_config = ConfigDict(extra="forbid")
    architecture: str
    weights: str | None = None  # state-dict file inside the bundle, e.g. "student.pt"
    onnx: str | None = None  # e.g. "student.onnx"
    onnx_int8: str | None = None  # e.g. "student.int8.onnx"
    target_layer: str | None = None  # dotted module path for CAM, e.g. "layer4"
    feature_layer: str | None = None  # dotted module path of penultimate features (OOD)
    params: int | None = None
    gflops: float | None = None

    @field_validator("gflops")
    @classmethod
    def _finite_gflops(cls, v: float | None) -> float | None:
        return _finite(v, "gflops")


class MetricWithCI(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: float
    ci_low: float | None = None
    ci_high: float | None = None

    @model_validator(mode="after")
    def _finite_values(self) -> MetricWithCI:
        for what in ("value", "ci_low", "ci_high"):
            _finite(getattr(self, what), what)
        return self


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = 1.0
    ece_before: float | None = None
    ece_after: float | None = None

    @field_validator("temperature")
    @classmethod
    def _positive(cls, v: float) -> float:
        _finite(v, "temperature")
        if v <= 0:
            raise ValueError("temperature must be > 0")
        if not MIN_TEMPERATURE <= v <= MAX_TEMPERATURE:
            raise ValueError(f"temperature {v:g} is outside {MIN_TEMPERATURE:g}..{MAX_TEMPERATURE:g}: not a "
                             "calibration a model can have")
        return v

    @field_validator("ece_before", "ece_after")
    @classmethod
    def _finite_ece(cls, v: float | None) -> float | None:
        return _finite(v, "ece")


class OodSpec(BaseModel):
    """Out-of-distribution guard: method, statistics file and the threshold above which we warn."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["mahalanobis", "energy"] = "mahalanobis"
    stats: str | None = "ood.npz"
    threshold: float
    score_note: str = "higher = less like the training data"

    @field_validator("threshold")
    @classmethod
    def _finite_threshold(cls, v: float) -> float:
        return _finite(v, "threshold")  # type: ignore[return-value]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    schema_version: str = SCHEMA_VERSION
    name: str
    task: Literal["single-label", "multi-label"] = "single-label"
    class_names: list[str]
    positive_class: str | None = None  # for binary tasks: the class ROC/specificity refer to
    modality: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    student: ModelSpec
    teacher: ModelSpec | None = None
    calibration: Calibration = Field(default_factory=Calibration)
    disagreement_threshold: float = 0.25  # total-variation distance above which we flag
    # multi-label: the probability at or above which each label is called present (chosen on val by the
    # exporter, with how in ``threshold_rule``); a label not listed uses 0.5. Single-label bundles: empty.
    thresholds: dict[str, float] = Field(default_factory=dict)
    threshold_rule: str | None = None
    ood: OodSpec | None = None
    metrics: dict[str, MetricWithCI] = Field(default_factory=dict)
    metrics_split: str | None = None  # which held-out split the metrics were measured on
    training: dict = Field(default_factory=dict)  # config, data fingerprint, history summary
    created_with: dict[str, str] = Field(default_factory=dict)
    intended_use: str = (
        "Decision support for trained readers. Not a diagnosis; not validated for clinical use."
    )
    demo: bool = False  # True for demo models: the UI labels them DEMO
    synthetic_data: bool = False  # True when trained on synthetic phantoms: labelled SYNTHETIC
    int8_parity: dict[str, float] = Field(default_factory=dict)  # max |p_int8 - p_fp32|, agreement

    @field_validator("schema_version")
    @classmethod
    def _known_major(cls, v: str) -> str:
        try:
            major = int(str(v).split(".")[0])
        except ValueError as exc:
            raise ValueError(f"schema_version {v!r} is not 'MAJOR.MINOR'") from exc
        if major != SUPPORTED_MAJOR:
            raise ValueError(
                f"bundle schema {v} is not supported by this kdviewer (reads {SUPPORTED_MAJOR}.x); "
                "update kdviewer or re-export the bundle"
            )
        return v

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        for name in self.class_names:
            _printable_name(name, "class name")
        dupes = sorted({n for n in self.class_names if self.class_names.count(n) > 1})
        if dupes:
            raise ValueError(f"class_names must be unique; repeated: {', '.join(map(repr, dupes))}")
        _printable_name(self.name, "name")
        _finite(self.disagreement_threshold, "disagreement_threshold")
        if not 0.0 <= self.disagreement_threshold <= 1.0:
            raise ValueError("disagreement_threshold must be between 0 and 1 (a total-variation distance)")
        for label, t in self.thresholds.items():
            if label not in self.class_names:
                raise ValueError(f"thresholds: {label!r} is not one of class_names")
            _finite(t, f"thresholds.{label}")
            if not 0.0 < t < 1.0:
                raise ValueError(f"thresholds.{label} = {t:g}: a probability threshold must be in (0, 1)")
        if self.thresholds and self.task != "multi-label":
            raise ValueError("per-label thresholds are for multi-label bundles (single-label: the arg-max)")
        for k, v in self.int8_parity.items():
            _finite(v, f"int8_parity.{k}")
        if len(self.class_names) < 2 and self.task == "single-label":
            raise ValueError("a single-label task needs at least two class names")
        if self.positive_class is not None and self.positive_class not in self.class_names:
            raise ValueError(f"positive_class {self.positive_class!r} is not one of class_names")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def threshold_of(self, label: str) -> float:
        """The decision threshold of a multi-label ``label`` (0.5 unless the bundle chose one)."""
        return float(self.thresholds.get(label, 0.5))
