"""The run configuration: one typed pydantic model loaded from YAML, validated before anything trains.

A run file has these sections (all but ``data`` and ``student`` have defaults)::

    task: single-label | multi-label
    data:          where the images are and how to split them (folders / random 70:30 / patient-wise)
    preprocessing: kdviewer's `Preprocessing` (what the deployed model sees) + ``augment`` (training only)
    teacher:       arch, weights (none | imagenet | swav | <file.pt> | <bundle>), fine-tune epochs, optim
    student:       arch, dropout, weights
    kd:            methods: [{name: hinton, T, alpha}, {name: at, beta, layers}, ...]
    optim:         sgd | adam | adamw, lr, momentum, weight_decay, schedule, epochs, batch size, ...
    runtime:       device, amp, channels_last, workers, seed, deterministic, caches
    output:        dir, bundle name, demo / synthetic flags, export options

Relative paths are resolved against the current working directory of the run (the training panel
starts runs in the project folder it shows). Errors are raised as `ConfigError` whose ``errors`` is a
list of ``{"loc": "optim.lr", "msg": "..."}`` so the GUI can put each message next to its field.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdviewer.errors import KDViewerError
from kdviewer.models.manifest import Preprocessing

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
CONFIG_VERSION = 1


class ConfigError(KDViewerError):
    """A run configuration is invalid; ``errors`` lists ``{"loc": dotted.field, "msg": text}``."""

    def __init__(self, errors: list[dict[str, str]], source: str | None = None) -> None:
        self.errors = errors
        self.source = source
        head = f"invalid configuration {source}" if source else "invalid configuration"
        lines = [f"{e['loc']}: {e['msg']}" if e["loc"] else e["msg"] for e in errors]
        super().__init__(head + ":\n" + "\n".join(lines))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ----------------------------------------------------------------------------------------------- data


class SynthSpec(_Strict):
    """Generate synthetic phantoms (``training.synth.generate``) into ``data.root`` if it holds no data."""

    kind: Literal["cxr", "ct"] = "cxr"
    n: int = Field(200, ge=4)
    size: int | None = Field(None, ge=16)
    seed: int = 0
    difficulty: float = Field(0.5, ge=0.0, le=1.0)
    fmt: Literal["png", "dicom"] = "png"
    series_slices: int = Field(1, ge=1)
    patients: int | None = Field(None, ge=2)


class DataConfig(_Strict):
    """Where the images are and how they are split into train / val / test.

    Split policies: ``folders`` (``root/train``, ``root/val``, optional ``root/test``, each with one
    sub-folder per class; with a CSV, its ``split`` column), ``random`` (one pool split by
    ``val_fraction``/``test_fraction`` with ``seed``, stratified per class), ``patient`` (like random
    but whole patients move together: no patient in two splits; needs patient IDs from the CSV or
    ``patient_pattern``), ``auto`` (folders when ``root/train`` exists, else random).
    """

    root: Path | None = None
    csv: Path | None = None
    split: Literal["auto", "folders", "random", "patient"] = "auto"
    val_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int | None = None  # split seed; default runtime.seed
    classes: list[str] | None = None
    path_column: str = "path"
    label_column: str = "label"
    patient_column: str = "patient_id"
    split_column: str = "split"
    label_separator: str = "|"
    negative_labels: list[str] = Field(default_factory=list)  # multi-label: labels meaning "no finding"
    # multi-label: findings left out of the task (too few patients to learn or measure them); an image
    # keeps its other labels, and counts as negative for every kept finding when it has none left.
    drop_labels: list[str] = Field(default_factory=list)
    # patient split: balance each label's positives (multi-label) / each class (single-label) between
    # the splits while keeping whole patients together (iterative stratification over patients).
    stratify_patients: bool = False
    ignore_dirs: list[str] = Field(default_factory=lambda: ["masks"])  # folder mode: not classes
    patient_pattern: str | None = None  # regex on the file name; group 1 = patient ID (folder datasets)
    extensions: list[str] = Field(
        default_factory=lambda: [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"]
    )
    limit: int | None = Field(None, ge=1)  # at most this many images per split (quick tries)
    cache: Literal["auto", "on", "off"] = "auto"
    cache_dtype: Literal["float16", "float32"] = "float16"
    cache_max_mb: int = Field(4096, ge=0)
    generate: SynthSpec | None = None

    @field_validator("patient_pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                pattern = re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
            if pattern.groups < 1:
                raise ValueError("needs one capture group: the patient ID")
        return v

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("class names must be unique")
        return v

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.root is None and self.csv is None:
            raise ValueError("set data.root (an image folder) or data.csv (a labels file)")
        if self.val_fraction + self.test_fraction >= 0.95:
            raise ValueError("val_fraction + test_fraction leaves almost nothing to train on")
        if self.generate is not None and self.root is None:
            raise ValueError("data.generate needs data.root (the folder to write the phantoms to)")
        return self


# -------------------------------------------------------------------------------------- preprocessing


class Augmentation(_Strict):
    """Training-only augmentation, applied on tensors after the cache (never seen by the viewer)."""

    rotation: float = Field(0.0, ge=0.0, le=180.0)  # max |degrees|, uniform in [-r, r]
    hflip: bool = False
    crop_scale: tuple[float, float] | None = None  # random resized crop: area fraction range, e.g. [0.8, 1]

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (0.05 <= v[0] <= v[1] <= 1.0):
            raise ValueError("crop_scale must be [low, high] with 0.05 <= low <= high <= 1")
        return v

    @property
    def enabled(self) -> bool:
        return self.rotation > 0 or self.hflip or self.crop_scale is not None


class PreprocessingConfig(Preprocessing):
    """kdviewer's `Preprocessing` (written into the bundle manifest) plus training augmentation."""

    augment: Augmentation = Field(default_factory=Augmentation)

    def to_manifest(self) -> Preprocessing:
        return Preprocessing(**self.model_dump(exclude={"augment"}))


# --------------------------------------------------------------------------------------------- optim


class Schedule(_Strict):
    """Learning-rate schedule, stepped once per epoch: none | step(step_size, gamma) | cosine."""

    name: Literal["none", "step", "cosine"] = "none"
    step_size: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    min_lr: float = Field(0.0, ge=0.0)

    @model_validator(mode="before")
    @classmethod
    def _string(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) or v is None else v


class EarlyStopping(_Strict):
    patience: int | None = Field(None, ge=1)  # epochs without improvement of the monitored metric
    min_delta: float = Field(0.0, ge=0.0)


class OptimConfig(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    schedule: Schedule = Field(default_factory=Schedule)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
    monitor: Literal["auto", "accuracy", "auc", "loss"] = "auto"  # auto: accuracy / macro AUC (multi-label)
    select_best: bool = True  # keep the best-validation epoch's weights at the end of a stage
    grad_clip: float | None = Field(None, gt=0)


# ------------------------------------------------------------------------------------------- models


def _check_arch(name: str) -> str:
    from kdviewer.models.architectures import available

    if name not in available():
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(available())}")
    return name


WEIGHT_KEYWORDS = ("none", "imagenet", "swav")


def _check_weights(v: str) -> str:
    v = str(v).strip()
    if not v:
        raise ValueError("empty; use 'none' to train from scratch")
    return v


class OptimOverride(_Strict):
    """Teacher-stage optimizer settings that differ from the top-level ``optim`` (all optional)."""

    name: Literal["sgd", "adam", "adamw"] | None = None
    lr: float | None = Field(None, gt=0)
    momentum: float | None = Field(None, ge=0, lt=1)
    weight_decay: float | None = Field(None, ge=0)
    schedule: Schedule | None = None
    batch_size: int | None = Field(None, ge=1)
    early_stopping: EarlyStopping | None = None


class TeacherConfig(_Strict):
    arch: str = "resnet50"
    weights: str = "none"  # none | imagenet | swav | path/to/state_dict.pt | path/to/bundle(.zip)
    epochs: int = Field(0, ge=0)  # fine-tuning epochs before distillation (0: use the weights as they are)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # keep the pretrained weights (and batch-norm statistics) up to and including this layer, e.g.
    # "blocks.10": fine-tuning trains only what follows (cheaper, and less to overfit on small sets)
    freeze: str | None = None
    # batch-norm momentum of the trainable layers (PyTorch convention: weight of the new batch). None keeps
    # the architecture's own (EfficientNet-Lite: TF's 0.01, tuned for long ImageNet runs; a fine-tune of a
    # few dozen steps then evaluates with running statistics that are still mostly ImageNet's)
    bn_momentum: float | None = Field(None, gt=0.0, le=1.0)
    optim: OptimOverride | None = None

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        return _check_arch(v)

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        return _check_weights(v)


class StudentConfig(_Strict):
    arch: str = "resnet18"
    weights: str = "none"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    freeze: str | None = None  # as for the teacher: pretrained layers kept as they are
    bn_momentum: float | None = Field(None, gt=0.0, le=1.0)  # as for the teacher

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        return _check_arch(v)

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        return _check_weights(v)


# ----------------------------------------------------------------------------------------------- KD


class HintonKD(_Strict):
    """Hinton et al. 2015: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * task loss."""

    name: Literal["hinton"] = "hinton"
    T: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0.0, le=1.0)
    weight: float = Field(1.0, ge=0.0)


class FitNetsKD(_Strict):
    """Romero et al. 2015: MSE between a 1x1-conv regression of student features and teacher hints."""

    name: Literal["fitnets"] = "fitnets"
    weight: float = Field(1.0, ge=0.0)
    layers: list[str] | None = None  # student layers; default: the deepest shared feature layer
    teacher_layers: list[str] | None = None


class AttentionKD(_Strict):
    """Zagoruyko & Komodakis 2017: L2-normalised spatial attention maps sum_c |F_c|^p."""

    name: Literal["at"] = "at"
    beta: float = Field(1000.0, ge=0.0)
    p: float = Field(2.0, gt=0)
    distance: Literal["squared_mean", "l2"] = "squared_mean"
    layers: list[str] | None = None  # default: the student's feature layers paired from the first
    teacher_layers: list[str] | None = None


class RelationalKD(_Strict):
    """Park et al. 2019 (RKD): distance- and angle-wise relations of penultimate embeddings."""

    name: Literal["rkd"] = "rkd"
    distance_weight: float = Field(25.0, ge=0.0)
    angle_weight: float = Field(50.0, ge=0.0)
    weight: float = Field(1.0, ge=0.0)


class SimilarityKD(_Strict):
    """Tung & Mori 2019: similarity-preserving KD on batch Gram matrices of activations."""

    name: Literal["sp"] = "sp"
    weight: float = Field(3000.0, ge=0.0)
    layers: list[str] | None = None  # default: the last feature layer
    teacher_layers: list[str] | None = None


KDMethod = Annotated[
    HintonKD | FitNetsKD | AttentionKD | RelationalKD | SimilarityKD, Field(discriminator="name")
]


class KDConfig(_Strict):
    """Distillation methods, combined as a weighted sum (plus the task loss).

    ``methods`` may be a list of ``{name: ..., ...}`` or a mapping ``{hinton: {T: 4}, at: {beta: 1000}}``.
    ``task_weight`` (weight of the cross-entropy / BCE on the labels) defaults to ``1 - alpha`` when
    Hinton KD is used, else 1.
    """

    methods: list[KDMethod] = Field(default_factory=list)
    task_weight: float | None = Field(None, ge=0.0)

    @field_validator("methods", mode="before")
    @classmethod
    def _mapping(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return [{"name": k, **(p or {})} for k, p in v.items()]
        if isinstance(v, list):
            return [{"name": m} if isinstance(m, str) else m for m in v]
        return v

    @field_validator("methods")
    @classmethod
    def _once(cls, v: list[Any]) -> list[Any]:
        names = [m.name for m in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"each method at most once (repeated: {', '.join(sorted(dup))})")
        return v

    def method(self, name: str) -> Any | None:
        return next((m for m in self.methods if m.name == name), None)


# ------------------------------------------------------------------------------------------- runtime


class RuntimeConfig(_Strict):
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    num_workers: int = Field(0, ge=0)  # decoding workers (cache fill / uncached loading)
    threads: int | None = Field(None, ge=1)  # torch intra-op threads (CPU)
    seed: int = 0
    deterministic: bool = False
    teacher_cache: Literal["auto", "on", "off"] = "auto"  # reuse frozen-teacher outputs (no augmentation)
    teacher_cache_max_mb: int = Field(2048, ge=0)
    eval_batch_size: int | None = Field(None, ge=1)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError("use auto, cpu, cuda, cuda:N or mps")
        return v

    @field_validator("channels_last", mode="before")
    @classmethod
    def _bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            return "on" if v else "off"
        return v


class ModelCardInfo(_Strict):
    """What the model card says beyond the numbers: where the data came from and who it represents."""

    data_source: str = ""  # citation and licence of the training data
    population: str = ""  # who the images are of (age group, centre, views)
    intended_use: str | None = None  # replaces the manifest's generic decision-support text
    limitations: list[str] = Field(default_factory=list)  # known limits, added to the generic ones


class OutputConfig(_Strict):
    dir: Path = Path("runs/kd-run")
    name: str = "kd-student"
    demo: bool = False
    synthetic: bool | None = None  # None: True when data.generate made the data
    export: bool = True  # write <dir>/bundle at the end (ONNX, INT8, metrics, report)
    quantize: bool = True
    # mixed-precision INT8: the stem and every layer up to and including this module stay fp32 (a
    # module name as in `freeze`, e.g. blocks.7); see training.quantize.fp32_nodes_through
    int8_fp32_through: str | None = None
    parity_images: int = Field(128, ge=8)  # val images the INT8 vs fp32 parity check compares on
    checkpoint_every: int = Field(1, ge=1)  # epochs
    bootstrap: int = Field(1000, ge=0)  # bootstrap resamples for the metrics' 95% CIs
    latency_runs: int = Field(20, ge=1)  # timed runs per latency measurement in the bundle
    card: ModelCardInfo = Field(default_factory=ModelCardInfo)


# ------------------------------------------------------------------------------------------ the run


class RunConfig(_Strict):
    version: int = CONFIG_VERSION
    description: str = ""
    notes: str = ""
    task: Literal["single-label", "multi-label"] = "single-label"
    data: DataConfig
    preprocessing: PreprocessingConfig = Field(default_factory=PreprocessingConfig)
    teacher: TeacherConfig | None = None
    student: StudentConfig = Field(default_factory=StudentConfig)
    kd: KDConfig = Field(default_factory=KDConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    # Named overlays of dotted keys ({"teacher.arch": "ghost_resnet50", ...}) chosen with --variant.
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != CONFIG_VERSION:
            raise ValueError(
                f"config version {v} is not supported (this engine reads version {CONFIG_VERSION})"
            )
        return v

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.kd.methods and self.teacher is None:
            raise ValueError("kd.methods need a teacher: add a teacher section or remove the methods")
        return self

    @property
    def synthetic(self) -> bool:
        if self.output.synthetic is not None:
            return self.output.synthetic
        return self.data.generate is not None

    def teacher_optim(self) -> OptimConfig:
        """The teacher fine-tuning optimizer: top-level ``optim`` updated by ``teacher.optim``."""
        assert self.teacher is not None
        update: dict[str, Any] = {"epochs": max(1, self.teacher.epochs)}
        if self.teacher.optim is not None:
            update.update({k: v for k, v in self.teacher.optim if v is not None})
        return self.optim.model_copy(update=update)

    def task_weight(self) -> float:
        if self.kd.task_weight is not None:
            return self.kd.task_weight
        hinton = self.kd.method("hinton")
        return 1.0 - hinton.alpha if hinton is not None else 1.0


# ------------------------------------------------------------------------------------------ loading


def _loc(parts: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in parts)


def _errors_from(exc: ValidationError) -> list[dict[str, str]]:
    out = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling)"
        out.append({"loc": _loc(loc), "msg": msg})
    return out


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "optim.lr", 0.1)``; creates missing sections; list items by index."""
    parts = key.split(".")
    node: Any = raw
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
            continue
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key.path=value`` strings (values parsed as YAML: 0.1, true, [a, b], null)."""
    raw = copy.deepcopy(raw)
    errors = []
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            errors.append({"loc": "--set", "msg": f"{item!r} is not key.path=value"})
            continue
        try:
            set_dotted(raw, key.strip(), yaml.safe_load(text) if text.strip() else None)
        except (ValueError, IndexError, yaml.YAMLError, AttributeError, TypeError) as exc:
            errors.append({"loc": key.strip(), "msg": f"cannot set from --set: {exc}"})
    if errors:
        raise ConfigError(errors)
    return raw


def _normalise_methods(raw: dict[str, Any]) -> dict[str, Any]:
    """``kd.methods`` as a list (so ``--set kd.methods.0.T=2`` addresses the first method)."""
    kd = raw.get("kd")
    if isinstance(kd, dict) and "methods" in kd:
        kd["methods"] = KDConfig._mapping(kd["methods"])
    return raw


def config_from_dict(
    raw: dict[str, Any],
    overrides: list[str] | None = None,
    variant: str | None = None,
    source: str | None = None,
) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(
            [{"loc": "", "msg": "the file must hold a mapping of sections (data:, student:, ...)"}]
        )
    raw = _normalise_methods(copy.deepcopy(raw))
    if variant:
        variants = raw.get("variants") or {}
        if variant not in variants:
            known = ", ".join(sorted(variants)) or "none"
            raise ConfigError(
                [{"loc": "variants", "msg": f"no variant {variant!r} (known: {known})"}], source
            )
        for key, value in (variants[variant] or {}).items():
            set_dotted(raw, str(key), copy.deepcopy(value))
    raw = apply_overrides(raw, overrides)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_errors_from(exc), source) from None


def load_config(
    path: str | Path, overrides: list[str] | None = None, variant: str | None = None
) -> RunConfig:
    """Read a YAML run file (or a packaged recipe name such as ``002_resnet34_resnet18``)."""
    path = resolve_recipe(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [{"loc": "", "msg": f"cannot read {path}: {exc.strerror or exc}"}], str(path)
        ) from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([{"loc": "", "msg": f"not valid YAML{where}: {problem}"}], str(path)) from None
    return config_from_dict(raw, overrides, variant, source=str(path))


def list_recipes() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(name: str | Path) -> Path:
    """A path as is, or the packaged recipe whose file name starts with ``name`` (e.g. "002")."""
    p = Path(name)
    if p.exists() or p.suffix in (".yaml", ".yml") or "/" in str(name):
        return p
    matches = [r for r in list_recipes() if r.stem == str(name) or r.stem.startswith(str(name))]
    return matches[0] if len(matches) == 1 else p


def _is_weight_path(w: str) -> bool:
    return w.lower() not in WEIGHT_KEYWORDS


def check_environment(cfg: RunConfig) -> list[dict[str, str]]:
    """Checks that need the file system (folders and weight files exist); [] when all is well."""
    issues: list[dict[str, str]] = []
    d = cfg.data
    will_generate = d.generate is not None
    if d.root is not None and not d.root.is_dir() and not will_generate:
        issues.append({"loc": "data.root", "msg": f"folder {d.root} does not exist"})
    if d.csv is not None and not d.csv.is_file() and not will_generate:
        issues.append({"loc": "data.csv", "msg": f"file {d.csv} does not exist"})
    if d.split == "patient" and d.csv is None and d.patient_pattern is None and not will_generate:
        issues.append(
            {
                "loc": "data.split",
                "msg": "a patient-wise split needs patient IDs: data.csv or data.patient_pattern",
            }
        )
    for section in ("teacher", "student"):
        part = getattr(cfg, section)
        if (
            part is not None
            and _is_weight_path(part.weights)
            and not Path(part.weights).expanduser().exists()
        ):
            issues.append(
                {
                    "loc": f"{section}.weights",
                    "msg": f"{part.weights} not found (use none, imagenet, swav, a .pt file or a bundle)",
                }
            )
    for i, m in enumerate(cfg.kd.methods):
        for attr, model in (
            ("layers", cfg.student.arch),
            ("teacher_layers", cfg.teacher and cfg.teacher.arch),
        ):
            names = getattr(m, attr, None)
            if names and model:
                from kdviewer.models.architectures import build_model, get_module

                net = build_model(model, 2, cfg.preprocessing.channels)
                for layer in names:
                    try:
                        get_module(net, layer)
                    except (AttributeError, IndexError, ValueError):
                        issues.append(
                            {
                                "loc": f"kd.methods.{i}.{m.name}.{attr}",
                                "msg": f"{model} has no layer {layer!r}",
                            }
                        )
    return issues


def validate(
    path: str | Path, overrides: list[str] | None = None, variant: str | None = None
) -> list[dict[str, str]]:
    """All problems of a run file as ``[{loc, msg}]`` (schema, then file-system checks)."""
    try:
        cfg = load_config(path, overrides, variant)
    except ConfigError as exc:
        return exc.errors
    return check_environment(cfg)


def validate_with_data(
    path: str | Path, overrides: list[str] | None = None, variant: str | None = None
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """What ``run`` checks before training, data included: (problems, data summary).

    After the schema and file-system checks, the images and classes are discovered exactly as a run
    does (`training.data.discover`); its errors ("no labelled images found ...") become problems here
    instead of a failure after Start. The summary: ``classes`` used, image ``counts`` per split,
    ``labels_found`` (every folder / CSV label with its image count, so a form can offer them) and the
    first ``skipped`` notes. A dataset still to be generated (``data.generate``) is not discovered.
    """
    try:
        cfg = load_config(path, overrides, variant)
    except ConfigError as exc:
        return exc.errors, {}
    issues = check_environment(cfg)
    if issues:
        return issues, {}
    if cfg.data.generate is not None and not (cfg.data.root and cfg.data.root.is_dir()):
        return [], {"generated": True}
    from training.data import discover, label_counts

    summary: dict[str, Any] = {}
    try:
        summary["labels_found"] = label_counts(cfg.data, cfg.task)
    except ConfigError as exc:
        return exc.errors, {}
    except OSError as exc:
        return [{"loc": "data", "msg": f"cannot read the data: {exc}"}], {}
    try:
        splits = discover(cfg.data, cfg.task, cfg.runtime.seed)
    except ConfigError as exc:
        return exc.errors, summary
    summary.update(classes=list(splits.class_names), counts=splits.counts(), skipped=splits.skipped[:10])
    return [], summary
