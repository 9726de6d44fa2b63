"""The training panel's form: one widget per engine config field, with an error line under each.

The form edits a plain dict that is written as the engine's YAML run file (``training/config.py``
defines the schema; the GUI never imports it). It starts from a preset — a recipe YAML from
``training/recipes``, read as a file — and overlays only the fields it shows, so recipe settings the
form does not expose (dropout, teacher optimizer overrides, KD layers, export options...) pass through
intact. Validation messages from ``python -m training check --json`` (``{"loc": "optim.lr", "msg"}``)
are mapped back to fields through each field's config path.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

ARCHITECTURES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "densenet121",
    "densenet40",
    "ghost_resnet50",
    "mobilenet_v3_small",
    "cxrnet_s",
)
# key, label, the weight's name in the config, default weight (training/config.py defaults)
KD_METHODS = (
    ("hinton", "Response-based (Hinton soft targets)", "alpha", 0.7),
    ("fitnets", "Feature-based (FitNets hints)", "weight", 1.0),
    ("at", "Attention transfer", "beta", 1000.0),
    ("rkd", "Relation-based (RKD)", "weight", 1.0),
    ("sp", "Similarity-preserving", "weight", 3000.0),
)
WEIGHT_NAME = {k: w for k, _label, w, _d in KD_METHODS}
ERROR_STYLE = "color: #b00020;"

#: What the form shows before any preset is chosen (a small, fast CPU-friendly run).
DEFAULT_CONFIG: dict[str, Any] = {
    "version": 1,
    "task": "single-label",
    "data": {"split": "auto", "val_fraction": 0.3, "test_fraction": 0.0},
    "preprocessing": {
        "input_size": 224,
        "resize": 224,
        "channels": 1,
        "augment": {"rotation": 0, "hflip": False},
    },
    "teacher": {"arch": "resnet50", "weights": "none", "epochs": 5},
    "student": {"arch": "resnet18"},
    "kd": {"methods": {"hinton": {"T": 4.0, "alpha": 0.7}}},
    "optim": {
        "name": "adam",
        "lr": 1e-3,
        "weight_decay": 0.0,
        "schedule": {"name": "none"},
        "epochs": 10,
        "batch_size": 32,
    },
    "runtime": {"device": "auto", "amp": "auto"},
    "output": {"dir": "", "name": "kd-student"},
}


def recipes_dir() -> Path | None:
    """``training/recipes`` located without importing the ``training`` package."""
    try:
        spec = importlib.util.find_spec("training")
    except (ImportError, ValueError):
        spec = None
    candidates: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "recipes" for p in spec.submodule_search_locations]
    candidates.append(Path(__file__).resolve().parents[2] / "training" / "recipes")
    for c in candidates:
        if c.is_dir():
            return c
    return None


def load_presets(folder: Path | None = None) -> dict[str, tuple[Path, dict[str, Any]]]:
    """``{display name: (path, config dict)}`` for every recipe YAML; unreadable files are skipped."""
    out: dict[str, tuple[Path, dict[str, Any]]] = {}
    folder = folder or recipes_dir()
    if folder is None:
        return out
    for path in sorted(folder.glob("*.y*ml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict):
            title = str(data.get("description") or "").strip().splitlines()
            name = path.stem + (f" — {title[0][:70]}" if title else "")
            out[name] = (path, data)
    return out


def get_path(cfg: Any, path: tuple[str, ...], default: Any = None) -> Any:
    node: Any = cfg
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def set_path(cfg: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = cfg
    for key in path[:-1]:
        nxt = node.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            node[key] = nxt
        node = nxt
    node[path[-1]] = value


def del_path(cfg: dict[str, Any], path: tuple[str, ...]) -> None:
    parent = get_path(cfg, path[:-1])
    if isinstance(parent, dict):
        parent.pop(path[-1], None)


def kd_methods_mapping(methods: Any) -> dict[str, dict[str, Any]]:
    """The engine accepts ``methods`` as a list of ``{name: ...}`` or a mapping; the form uses the mapping."""
    out: dict[str, dict[str, Any]] = {}
    if isinstance(methods, dict):
        for k, v in methods.items():
            out[str(k)] = dict(v or {})
    elif isinstance(methods, list):
        for m in methods:
            if isinstance(m, str):
                out[m] = {}
            elif isinstance(m, dict) and m.get("name"):
                out[str(m["name"])] = {k: v for k, v in m.items() if k != "name"}
    return out


@dataclass
class Field:
    """One form row: its config path (where validation messages for it arrive) and its error label."""

    key: str
    path: tuple[str, ...]
    widget: QWidget
    error: QLabel


class PathEdit(QWidget):
    """A line edit plus Browse buttons (folder and/or file)."""

    changed = Signal()

    def __init__(self, mode: str, caption: str, filters: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.mode, self.caption, self.filters = mode, caption, filters
        self.edit = QLineEdit()
        self.edit.textChanged.connect(self.changed)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.edit, 1)
        if mode in ("dir", "any"):
            b = QPushButton("Folder…")
            b.clicked.connect(self._pick_dir)
            lay.addWidget(b)
        if mode in ("file", "any"):
            b = QPushButton("File…")
            b.clicked.connect(self._pick_file)
            lay.addWidget(b)

    def text(self) -> str:
        return self.edit.text().strip()

    def setText(self, text: str) -> None:
        self.edit.setText(text)

    def _pick_dir(self) -> None:
        d = QFileDialog.getExistingDirectory(self, self.caption, self.text())
        if d:
            self.edit.setText(d)

    def _pick_file(self) -> None:
        f, _ = QFileDialog.getOpenFileName(self, self.caption, self.text(), self.filters)
        if f:
            self.edit.setText(f)


def _combo(items: Any, editable: bool = False) -> QComboBox:
    c = QComboBox()
    for it in items:
        if isinstance(it, tuple):
            c.addItem(it[0], it[1])
        else:
            c.addItem(it, it)
    c.setEditable(editable)
    return c


def combo_value(c: QComboBox) -> str:
    if c.isEditable():
        text = c.currentText().strip()
        idx = c.findText(text)
        return str(c.itemData(idx)) if idx >= 0 and c.itemData(idx) is not None else text
    data = c.currentData()
    return str(data) if data is not None else c.currentText()


def set_combo(c: QComboBox, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool):
        value = "auto" if value else "off"
    idx = c.findData(str(value))
    if idx < 0:
        idx = c.findText(str(value))
    if idx < 0:
        c.addItem(str(value), str(value))
        idx = c.count() - 1
    c.setCurrentIndex(idx)


def _dspin(lo: float, hi: float, decimals: int, step: float) -> QDoubleSpinBox:
    s = QDoubleSpinBox()
    s.setRange(lo, hi)
    s.setDecimals(decimals)
    s.setSingleStep(step)
    return s


def _spin(lo: int, hi: int) -> QSpinBox:
    s = QSpinBox()
    s.setRange(lo, hi)
    return s


def _num_text(v: Any) -> str:
    return f"{float(v):g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v or "")


def _float_or_text(text: str) -> Any:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        return text  # let the engine's validation say what is wrong with it


class TrainingForm(QWidget):
    """The config form. `config()` → dict for the engine; `load_config(dict)`; `show_errors(list)`."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.base: dict[str, Any] = {}
        self.fields: dict[str, Field] = {}
        self._device_chosen = False  # the user picked a device in the list (then a GPU found later waits)
        self.general_error = QLabel("")
        self.general_error.setStyleSheet(ERROR_STYLE)
        self.general_error.setWordWrap(True)
        self.general_error.setVisible(False)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.general_error)
        self._build_data(outer)
        self._build_models(outer)
        self._build_kd(outer)
        self._build_optim(outer)
        self._build_runtime(outer)
        outer.addStretch(1)
        self.load_config(copy.deepcopy(DEFAULT_CONFIG))

    # -- construction ------------------------------------------------------------------------------
    def _row(
        self, form: QFormLayout, label: str, key: str, path: tuple[str, ...], widget: QWidget, tip: str = ""
    ) -> Field:
        err = QLabel("")
        err.setStyleSheet(ERROR_STYLE)
        err.setWordWrap(True)
        err.setVisible(False)
        err.setObjectName(f"error_{key}")
        box = QWidget()
        v = QVBoxLayout(box)
        v.setContentsMargins(0, 0, 0, 0)
        v.setSpacing(1)
        v.addWidget(widget)
        v.addWidget(err)
        if tip:
            widget.setToolTip(tip)
        form.addRow(label, box)
        f = Field(key, path, widget, err)
        self.fields[key] = f
        return f

    def _group(self, outer: QVBoxLayout, title: str) -> QFormLayout:
        box = QGroupBox(title)
        form = QFormLayout(box)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        outer.addWidget(box)
        return form

    def _build_data(self, outer: QVBoxLayout) -> None:
        f = self._group(outer, "Data")
        self.data_path = PathEdit("any", "Image folder or labels CSV", "CSV (*.csv);;All files (*)")
        self._row(
            f,
            "Images",
            "data",
            ("data", "root"),
            self.data_path,
            "A folder (one sub-folder per class, or train/val[/test] folders of those), or a CSV "
            "with path and label columns",
        )
        self.split = _combo(
            [
                ("Auto (folders if train/ exists, else random)", "auto"),
                ("Random, stratified", "random"),
                ("Patient-wise", "patient"),
                ("Folders train/val/test (or CSV 'split' column)", "folders"),
            ]
        )
        self._row(f, "Split", "split", ("data", "split"), self.split)
        fr = QWidget()
        h = QHBoxLayout(fr)
        h.setContentsMargins(0, 0, 0, 0)
        self.val_frac = _dspin(0.0, 0.9, 2, 0.05)
        self.val_frac.setPrefix("val ")
        self.test_frac = _dspin(0.0, 0.9, 2, 0.05)
        self.test_frac.setPrefix("test ")
        h.addWidget(self.val_frac)
        h.addWidget(self.test_frac)
        self._row(f, "Held-out fractions", "fractions", ("data", "val_fraction"), fr)
        self.fields["test_fraction"] = Field(
            "test_fraction", ("data", "test_fraction"), fr, self.fields["fractions"].error
        )
        self.task = _combo(
            [
                ("Single-label (one class per image)", "single-label"),
                ("Multi-label (any number of findings)", "multi-label"),
            ]
        )
        self._row(f, "Task", "task", ("task",), self.task)
        # Classes: typed, or chosen from the labels Check found in the data (folder / CSV labels).
        cls = QWidget()
        cv = QVBoxLayout(cls)
        cv.setContentsMargins(0, 0, 0, 0)
        cv.setSpacing(2)
        self.classes = QLineEdit()
        self.classes.setPlaceholderText("all labels found in the data (press Check to list them)")
        self.classes_found = QLabel("")
        self.classes_found.setObjectName("Dim")
        self.classes_found.setWordWrap(True)
        self.found_list = QListWidget()
        self.found_list.setMaximumHeight(96)
        self.found_list.setToolTip("Tick the labels to train on (in this order); matching ignores case")
        self.found_list.itemChanged.connect(self._found_ticked)
        self.found_list.hide()
        cv.addWidget(self.classes)
        cv.addWidget(self.classes_found)
        cv.addWidget(self.found_list)
        self._row(f, "Classes", "classes", ("data", "classes"), cls,
                  "Comma-separated class names (folder names or CSV labels; case does not matter). "
                  "Empty: every label found")
        self.input_size = _spin(16, 1024)
        self.input_size.setSuffix(" px")
        self._row(f, "Input size", "input_size", ("preprocessing", "input_size"), self.input_size)
        aug = QWidget()
        h = QHBoxLayout(aug)
        h.setContentsMargins(0, 0, 0, 0)
        self.hflip = QCheckBox("horizontal flip")
        self.rotation = _spin(0, 180)
        self.rotation.setPrefix("rotation ±")
        self.rotation.setSuffix("°")
        h.addWidget(self.hflip)
        h.addWidget(self.rotation)
        h.addStretch(1)
        self._row(
            f,
            "Augmentation",
            "augment",
            ("preprocessing", "augment"),
            aug,
            "Training only; the deployed model never sees augmentation",
        )

    def _build_models(self, outer: QVBoxLayout) -> None:
        f = self._group(outer, "Teacher and student")
        self.teacher_source = _combo(
            [
                ("Architecture (+ optional local weights)", "arch"),
                ("Existing model bundle", "bundle"),
                ("No teacher (train the student alone)", "none"),
            ]
        )
        self.teacher_source.currentIndexChanged.connect(self._sync_enabled)
        f.addRow("Teacher", self.teacher_source)
        self.teacher_bundle = PathEdit("any", "Teacher bundle (folder or .zip)", "Bundles (*.zip);;All (*)")
        self._row(f, "Teacher bundle", "teacher_bundle", ("teacher", "weights"), self.teacher_bundle)
        self.teacher_arch = _combo(ARCHITECTURES, editable=True)
        self._row(f, "Teacher architecture", "teacher_arch", ("teacher", "arch"), self.teacher_arch)
        self.teacher_weights = PathEdit(
            "file", "Teacher weights (state dict)", "Weights (*.pt *.pth);;All (*)"
        )
        self.teacher_weights.edit.setPlaceholderText("none · imagenet · swav · or a local .pt file")
        self._row(
            f,
            "Teacher weights",
            "teacher_weights",
            ("teacher", "weights"),
            self.teacher_weights,
            "none = random init; imagenet / swav are used when their files are in the local cache "
            "(nothing is downloaded here); or pick a state-dict file",
        )
        self.teacher_epochs = _spin(0, 1000)
        self.teacher_epochs.setSpecialValueText("0 (use as is)")
        self._row(f, "Teacher fine-tune epochs", "teacher_epochs", ("teacher", "epochs"), self.teacher_epochs)
        self.student_arch = _combo(ARCHITECTURES, editable=True)
        self._row(f, "Student architecture", "student_arch", ("student", "arch"), self.student_arch)

    def _build_kd(self, outer: QVBoxLayout) -> None:
        self.kd_box = QGroupBox("Distillation")
        f = QFormLayout(self.kd_box)
        outer.addWidget(self.kd_box)
        self.kd_checks: dict[str, QCheckBox] = {}
        self.kd_weights: dict[str, QDoubleSpinBox] = {}
        for key, label, weight_name, default in KD_METHODS:
            row = QWidget()
            h = QHBoxLayout(row)
            h.setContentsMargins(0, 0, 0, 0)
            check = QCheckBox(label)
            weight = _dspin(0.0, 1e5, 3, 0.1)
            weight.setValue(default)
            weight.setPrefix(f"{weight_name} ")
            h.addWidget(check, 1)
            h.addWidget(weight)
            self.kd_checks[key] = check
            self.kd_weights[key] = weight
            check.toggled.connect(self._sync_enabled)
            self._row(f, "", f"kd_{key}", ("kd", "methods", key), row)
        self.temperature = _dspin(0.1, 100.0, 2, 0.5)
        self._row(f, "Temperature T", "temperature", ("kd", "methods", "hinton", "T"), self.temperature)

    def _build_optim(self, outer: QVBoxLayout) -> None:
        f = self._group(outer, "Optimisation")
        self.epochs = _spin(1, 10000)
        self._row(f, "Epochs (student)", "epochs", ("optim", "epochs"), self.epochs)
        self.batch_size = _spin(1, 4096)
        self._row(f, "Batch size", "batch_size", ("optim", "batch_size"), self.batch_size)
        self.optimizer = _combo([("Adam", "adam"), ("AdamW", "adamw"), ("SGD (momentum)", "sgd")])
        self._row(f, "Optimizer", "optimizer", ("optim", "name"), self.optimizer)
        self.lr = QLineEdit()
        self._row(f, "Learning rate", "lr", ("optim", "lr"), self.lr, "e.g. 1e-3")
        self.weight_decay = QLineEdit()
        self._row(f, "Weight decay", "weight_decay", ("optim", "weight_decay"), self.weight_decay)
        sched = QWidget()
        h = QHBoxLayout(sched)
        h.setContentsMargins(0, 0, 0, 0)
        self.schedule = _combo([("constant", "none"), ("step", "step"), ("cosine", "cosine")])
        self.step_size = _spin(1, 1000)
        self.step_size.setPrefix("every ")
        self.step_size.setSuffix(" epochs")
        self.gamma = _dspin(0.01, 1.0, 2, 0.05)
        self.gamma.setPrefix("× ")
        self.schedule.currentIndexChanged.connect(self._sync_enabled)
        h.addWidget(self.schedule, 1)
        h.addWidget(self.step_size)
        h.addWidget(self.gamma)
        self._row(f, "LR schedule", "schedule", ("optim", "schedule"), sched)

    def _build_runtime(self, outer: QVBoxLayout) -> None:
        f = self._group(outer, "Runtime and output")
        self.device = _combo([("Auto", "auto"), ("CPU", "cpu")])
        self.device.activated.connect(self._device_picked)
        self._row(
            f, "Device", "device", ("runtime", "device"), self.device, "Looking for GPUs in the background…"
        )
        self.amp = _combo(
            [("auto (GPU: on; CPU: measured)", "auto"), ("off", "off"), ("bf16", "bf16"), ("fp16", "fp16")]
        )
        self._row(f, "Mixed precision", "amp", ("runtime", "amp"), self.amp)
        self.output_dir = PathEdit("dir", "Output folder (one sub-folder per run)")
        self._row(
            f,
            "Output folder",
            "output_dir",
            ("output", "dir"),
            self.output_dir,
            "Each run gets a sub-folder here; the run history lists them",
        )
        self.run_name = QLineEdit()
        self._row(f, "Run / model name", "run_name", ("output", "name"), self.run_name)

    def _device_picked(self, _index: int) -> None:
        self._device_chosen = True

    def gpu_default(self) -> str | None:
        """The first GPU in the Device list (``cuda:N`` or ``mps``), None on a CPU-only machine."""
        for i in range(self.device.count()):
            value = str(self.device.itemData(i))
            if value.startswith("cuda") or value == "mps":
                return value
        return None

    def set_devices(self, devices: list[tuple[str, str]]) -> None:
        """Fill the Device list (see `training_process.device_choices`). A run on a GPU is the default
        when one is present: "auto" becomes the first GPU unless the user picked a device by hand."""
        current = combo_value(self.device)
        self.device.blockSignals(True)
        self.device.clear()
        for label, value in devices:
            self.device.addItem(label, value)
        self.device.blockSignals(False)
        if current == "auto" and not self._device_chosen:
            current = self.gpu_default() or current
        set_combo(self.device, current)
        self.device.setToolTip("Auto picks a CUDA GPU, then Apple MPS, then the CPU")

    def _sync_enabled(self) -> None:
        source = combo_value(self.teacher_source)
        self.teacher_bundle.setEnabled(source == "bundle")
        self.teacher_weights.setEnabled(source == "arch")
        self.teacher_arch.setEnabled(source != "none")
        self.teacher_epochs.setEnabled(source != "none")
        self.kd_box.setEnabled(source != "none")
        for key, check in self.kd_checks.items():
            self.kd_weights[key].setEnabled(check.isChecked())
        self.temperature.setEnabled(self.kd_checks["hinton"].isChecked())
        step = combo_value(self.schedule) == "step"
        self.step_size.setEnabled(step)
        self.gamma.setEnabled(step)

    # -- config in / out ---------------------------------------------------------------------------
    def load_config(self, cfg: dict[str, Any]) -> None:
        """Show ``cfg`` (a preset or a saved run config); fields it lacks take the defaults."""
        full = copy.deepcopy(DEFAULT_CONFIG)
        for section, value in cfg.items():
            if isinstance(value, dict) and isinstance(full.get(section), dict) and section != "kd":
                full[section] = {**full[section], **copy.deepcopy(value)}
            else:
                full[section] = copy.deepcopy(value)
        if "teacher" in cfg and cfg["teacher"] is None:
            full["teacher"] = None
        self.base = copy.deepcopy(cfg)
        g = lambda *p: get_path(full, p)  # noqa: E731
        data_csv, data_root = g("data", "csv"), g("data", "root")
        self.data_path.setText(str(data_csv or data_root or ""))
        set_combo(self.split, g("data", "split") or "auto")
        self.val_frac.setValue(float(g("data", "val_fraction") or 0.3))
        self.test_frac.setValue(float(g("data", "test_fraction") or 0.0))
        set_combo(self.task, full.get("task") or "single-label")
        classes = g("data", "classes")
        self.classes.setText(", ".join(str(c) for c in classes) if isinstance(classes, list) else "")
        self.show_data_summary(None)
        self.input_size.setValue(int(g("preprocessing", "input_size") or 224))
        self.hflip.setChecked(bool(g("preprocessing", "augment", "hflip")))
        self.rotation.setValue(int(float(g("preprocessing", "augment", "rotation") or 0)))

        teacher = full.get("teacher")
        weights = str(get_path(teacher, ("weights",)) or "none")
        if not isinstance(teacher, dict):
            set_combo(self.teacher_source, "none")
        elif _looks_like_bundle(weights):
            set_combo(self.teacher_source, "bundle")
            self.teacher_bundle.setText(weights)
        else:
            set_combo(self.teacher_source, "arch")
            self.teacher_weights.setText("" if weights == "none" else weights)
        if isinstance(teacher, dict):
            set_combo(self.teacher_arch, teacher.get("arch") or "resnet50")
            self.teacher_epochs.setValue(int(teacher.get("epochs") or 0))
        set_combo(self.student_arch, g("student", "arch") or "resnet18")

        methods = kd_methods_mapping(g("kd", "methods"))
        for key, _label, weight_name, default in KD_METHODS:
            params = methods.get(key)
            self.kd_checks[key].setChecked(params is not None)
            w = (params or {}).get(weight_name)
            self.kd_weights[key].setValue(float(w) if isinstance(w, (int, float)) else default)
        self.temperature.setValue(float((methods.get("hinton") or {}).get("T") or 4.0))

        self.epochs.setValue(int(g("optim", "epochs") or 10))
        self.batch_size.setValue(int(g("optim", "batch_size") or 32))
        set_combo(self.optimizer, g("optim", "name") or "adam")
        self.lr.setText(_num_text(g("optim", "lr") if g("optim", "lr") is not None else 1e-3))
        self.weight_decay.setText(_num_text(g("optim", "weight_decay") or 0.0))
        sched = g("optim", "schedule")
        sched = {"name": sched} if isinstance(sched, str) or sched is None else dict(sched)
        set_combo(self.schedule, sched.get("name") or "none")
        self.step_size.setValue(int(sched.get("step_size") or 10))
        self.gamma.setValue(float(sched.get("gamma") or 0.1))

        device = str(g("runtime", "device") or "auto")
        set_combo(self.device, (self.gpu_default() or device) if device == "auto" else device)
        set_combo(self.amp, g("runtime", "amp") or "auto")
        out_dir = str(g("output", "dir") or "")
        name = str(g("output", "name") or "kd-student")
        # output.dir is the run's own folder: the form shows its parent and the run name.
        if out_dir:
            p = Path(out_dir)
            self.output_dir.setText(str(p.parent) if p.name else out_dir)
            self.run_name.setText(p.name or name)
        else:
            self.run_name.setText(name)
        self._sync_enabled()
        self.clear_errors()

    def run_dir(self) -> Path | None:
        """``output.dir`` of the config: <output folder>/<run name>."""
        parent, name = self.output_dir.text(), self.run_name.text().strip()
        if not parent or not name:
            return None
        return Path(parent).expanduser() / name

    def config(self) -> dict[str, Any]:
        """The config dict to write: the loaded preset with every shown field overlaid."""
        cfg = copy.deepcopy(self.base)
        cfg.setdefault("version", 1)
        data = self.data_path.text()
        if data:
            p = Path(data).expanduser()
            is_csv = p.is_file() or p.suffix.lower() == ".csv"
            set_path(cfg, ("data", "csv" if is_csv else "root"), str(p.resolve()))
            if not is_csv:  # (with a CSV, a root the preset names is kept: CSV paths may be relative to it)
                del_path(cfg, ("data", "csv"))
        set_path(cfg, ("data", "split"), combo_value(self.split))
        chosen = self.chosen_classes()
        if chosen:
            set_path(cfg, ("data", "classes"), chosen)
        else:
            del_path(cfg, ("data", "classes"))
        set_path(cfg, ("data", "val_fraction"), round(self.val_frac.value(), 4))
        set_path(cfg, ("data", "test_fraction"), round(self.test_frac.value(), 4))
        cfg["task"] = combo_value(self.task)

        size = self.input_size.value()
        old_size = get_path(self.base, ("preprocessing", "input_size"))
        old_resize = get_path(self.base, ("preprocessing", "resize"))
        if isinstance(old_size, int) and isinstance(old_resize, int) and old_size > 0:
            resize = max(size, round(size * old_resize / old_size))  # keep the recipe's crop ratio
        else:
            resize = size
        set_path(cfg, ("preprocessing", "input_size"), size)
        set_path(cfg, ("preprocessing", "resize"), resize)
        set_path(cfg, ("preprocessing", "augment", "hflip"), self.hflip.isChecked())
        set_path(cfg, ("preprocessing", "augment", "rotation"), float(self.rotation.value()))

        source = combo_value(self.teacher_source)
        if source == "none":
            cfg["teacher"] = None
            cfg.setdefault("kd", {})
            if isinstance(cfg["kd"], dict):
                cfg["kd"]["methods"] = {}
        else:
            if not isinstance(cfg.get("teacher"), dict):
                cfg["teacher"] = {}
            t = cfg["teacher"]
            t["arch"] = combo_value(self.teacher_arch)
            if source == "bundle":
                t["weights"] = self.teacher_bundle.text() or "none"
            else:
                t["weights"] = self.teacher_weights.text() or "none"
            t["epochs"] = self.teacher_epochs.value()
            base_methods = kd_methods_mapping(get_path(self.base, ("kd", "methods")))
            methods: dict[str, dict[str, Any]] = {}
            for key, _label, weight_name, _default in KD_METHODS:
                if not self.kd_checks[key].isChecked():
                    continue
                params = dict(base_methods.get(key) or {})
                params[weight_name] = round(self.kd_weights[key].value(), 6)
                if key == "hinton":
                    params["T"] = round(self.temperature.value(), 4)
                methods[key] = params
            if not isinstance(cfg.get("kd"), dict):
                cfg["kd"] = {}
            cfg["kd"]["methods"] = methods
        set_path(cfg, ("student", "arch"), combo_value(self.student_arch))

        set_path(cfg, ("optim", "epochs"), self.epochs.value())
        set_path(cfg, ("optim", "batch_size"), self.batch_size.value())
        set_path(cfg, ("optim", "name"), combo_value(self.optimizer))
        set_path(cfg, ("optim", "lr"), _float_or_text(self.lr.text()))
        set_path(cfg, ("optim", "weight_decay"), _float_or_text(self.weight_decay.text() or "0"))
        sched_base = get_path(self.base, ("optim", "schedule"))
        sched: dict[str, Any] = dict(sched_base) if isinstance(sched_base, dict) else {}
        sched["name"] = combo_value(self.schedule)
        if sched["name"] == "step":
            sched["step_size"] = self.step_size.value()
            sched["gamma"] = round(self.gamma.value(), 4)
        set_path(cfg, ("optim", "schedule"), sched)

        set_path(cfg, ("runtime", "device"), combo_value(self.device))
        set_path(cfg, ("runtime", "amp"), combo_value(self.amp))
        run_dir = self.run_dir()
        set_path(cfg, ("output", "dir"), str(run_dir.resolve()) if run_dir else "")
        # output.name names the bundle: keep the preset's, else use the run name.
        if not get_path(self.base, ("output", "name")):
            set_path(cfg, ("output", "name"), self.run_name.text().strip())
        return cfg

    # -- classes found in the data -----------------------------------------------------------------
    def chosen_classes(self) -> list[str]:
        return [c.strip() for c in self.classes.text().split(",") if c.strip()]

    def show_data_summary(self, summary: dict[str, Any] | None) -> None:
        """What Check found in the data: the labels with their image counts (tickable) and the split."""
        self.found_list.blockSignals(True)
        self.found_list.clear()
        found = (summary or {}).get("labels_found") or {}
        if not found:
            self.found_list.hide()
            self.classes_found.setText("")
            self.found_list.blockSignals(False)
            return
        chosen = {c.lower() for c in self.chosen_classes()}
        for label, n in found.items():
            item = QListWidgetItem(f"{label}  ({n} images)")
            item.setData(Qt.ItemDataRole.UserRole, label)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            on = not chosen or label.lower() in chosen
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)
            self.found_list.addItem(item)
        self.found_list.show()
        self.found_list.blockSignals(False)
        used = (summary or {}).get("classes")
        counts = (summary or {}).get("counts") or {}
        if used:
            self.classes_found.setText(
                f"Found {len(found)} label(s) in the data; training on {', '.join(used)}: "
                f"{counts.get('train', 0)} train / {counts.get('val', 0)} val / "
                f"{counts.get('test', 0)} test images."
            )
        else:
            self.classes_found.setText(
                f"Found {len(found)} label(s) in the data: tick the ones to train on."
            )

    def _found_ticked(self, _item: QListWidgetItem) -> None:
        ticked = [
            str(self.found_list.item(i).data(Qt.ItemDataRole.UserRole))
            for i in range(self.found_list.count())
            if self.found_list.item(i).checkState() == Qt.CheckState.Checked
        ]
        self.classes.setText(", ".join(ticked) if len(ticked) < self.found_list.count() else "")

    # -- validation --------------------------------------------------------------------------------
    def clear_errors(self) -> None:
        for f in self.fields.values():
            f.error.clear()
            f.error.setVisible(False)
        self.general_error.clear()
        self.general_error.setVisible(False)

    def _normalise_loc(
        self, loc: list[str] | tuple[str, ...] | str, cfg: dict[str, Any] | None
    ) -> tuple[str, ...]:
        parts = [p for p in (loc.split(".") if isinstance(loc, str) else [str(x) for x in loc]) if p]
        # kd.methods.<index>.<name>.<field> (a discriminated list) -> kd.methods.<name>.<field>
        if len(parts) >= 3 and parts[:2] == ["kd", "methods"] and parts[2].isdigit():
            rest = parts[3:]
            if rest and rest[0] in WEIGHT_NAME:
                parts = ["kd", "methods", *rest]
            else:
                names = list(kd_methods_mapping(get_path(cfg or self.config(), ("kd", "methods"))))
                i = int(parts[2])
                parts = ["kd", "methods", names[i] if i < len(names) else parts[2], *rest]
        if parts[:1] == ["data"] and len(parts) >= 2 and parts[1] == "csv":
            parts = ["data", "root", *parts[2:]]
        return tuple(parts)

    def field_for(
        self, loc: list[str] | tuple[str, ...] | str, cfg: dict[str, Any] | None = None
    ) -> Field | None:
        """The field owning a validation location (longest matching config path wins)."""
        parts = self._normalise_loc(loc, cfg)
        source = combo_value(self.teacher_source)
        skip = {"teacher_bundle"} if source != "bundle" else {"teacher_weights"}
        best: tuple[int, Field] | None = None
        for f in self.fields.values():
            if f.key in skip:
                continue
            n = len(f.path)
            if parts[:n] == f.path and (best is None or n > best[0]):
                best = (n, f)
        return best[1] if best else None

    def show_errors(self, errors: list[dict[str, Any]], cfg: dict[str, Any] | None = None) -> int:
        """Show ``[{"loc", "msg"}]`` next to their fields; returns how many landed on a field."""
        self.clear_errors()
        placed = 0
        general: list[str] = []
        for err in errors:
            loc = err.get("loc") or []
            msg = str(err.get("msg", ""))
            f = self.field_for(loc, cfg) if loc else None
            if f is None:
                where = loc if isinstance(loc, str) else ".".join(map(str, loc))
                general.append(f"{where}: {msg}" if where else msg)
                continue
            text = f.error.text()
            f.error.setText((text + "\n" if text else "") + msg)
            f.error.setVisible(True)
            placed += 1
        if general:
            self.general_error.setText("\n".join(general))
            self.general_error.setVisible(True)
        return placed

    def visible_errors(self) -> dict[str, str]:
        """``{field key: message}`` for every field showing an error (plus "general")."""
        out: dict[str, str] = {}
        for f in self.fields.values():
            if f.error.text() and f.error.text() not in out.values():
                out[f.key] = f.error.text()
        if self.general_error.text():
            out["general"] = self.general_error.text()
        return out

    def local_errors(self) -> list[dict[str, Any]]:
        """Checks that need no engine: required paths filled in."""
        errors: list[dict[str, Any]] = []
        if not self.data_path.text():
            errors.append({"loc": "data.root", "msg": "Choose an image folder or a labels CSV."})
        if not self.output_dir.text():
            errors.append({"loc": "output.dir", "msg": "Choose an output folder."})
        if not self.run_name.text().strip():
            errors.append({"loc": "output.name", "msg": "Give the run a name."})
        if combo_value(self.teacher_source) == "bundle" and not self.teacher_bundle.text():
            errors.append({"loc": "teacher.weights", "msg": "Choose the teacher's model bundle."})
        return errors

    def set_editable(self, editable: bool) -> None:
        for child in self.findChildren(QWidget):
            if isinstance(child, (QLineEdit, QComboBox, QSpinBox, QDoubleSpinBox, QCheckBox, QPushButton)):
                child.setEnabled(editable)
        if editable:
            self._sync_enabled()


def _looks_like_bundle(weights: str) -> bool:
    if weights.lower() in ("none", "imagenet", "swav", ""):
        return False
    p = Path(weights).expanduser()
    return p.suffix.lower() == ".zip" or (p / "manifest.json").is_file() or p.name == "manifest.json"
