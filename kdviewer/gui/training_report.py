"""End-of-run report of the training panel: metrics with CIs, confusion matrix, ROC, complexity.

Built only from the engine's events (``eval`` and ``run_end``) and, when present, the new bundle's
``manifest.json`` and ``report.json`` — read as plain JSON files, never by importing ``training``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QBrush, QColor, QDesktopServices
from PySide6.QtWidgets import (
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from kdviewer.gui.run_history import format_metric

_ROC_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def flatten_metrics(metrics: Any, prefix: str = "") -> dict[str, Any]:
    """``{"auc": {...ci...}, "per_class": {"a": {...}}}`` → ``{"auc": {...}, "per_class/a": {...}}``."""
    out: dict[str, Any] = {}
    if not isinstance(metrics, dict):
        return out
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and "value" not in value:
            out.update(flatten_metrics(value, prefix=f"{name}/"))
        elif isinstance(value, dict) or _num(value) is not None:
            out[name] = value
    return out


def _fmt_big(v: Any) -> str:
    x = _num(v)
    if x is None:
        return "" if v is None else str(v)
    if abs(x) >= 1e6:
        return f"{x / 1e6:.2f} M"
    if abs(x) >= 1e4:
        return f"{x / 1e3:.1f} k"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if float(x).is_integer():
        return f"{int(x)}"
    return f"{x:.3g}"


_MEASURE_LABELS = {
    "params": "Parameters",
    "parameters": "Parameters",
    "gflops": "GFLOPs",
    "flops": "FLOPs",
    "latency_ms": "Latency (ms, CPU)",
    "activation_mb": "Activations (MiB)",
    "state_dict_mb": "Weights (MiB)",
    "size_mb": "Size (MB)",
    "onnx_mb": "ONNX size (MB)",
    "int8_mb": "INT8 ONNX size (MB)",
    "file_mb": "File size (MB)",
    "train_time_s": "Training time (s)",
}


def measure_label(name: str) -> str:
    if "/" in name:  # latency_ms/ort_int8 -> "Latency ORT INT8 (ms)"
        head, sub = name.split("/", 1)
        unit = " (ms)" if head.endswith("_ms") else ""
        pretty = sub.replace("torch_fp32", "torch FP32").replace("ort_fp32", "ONNX Runtime FP32")
        pretty = pretty.replace("ort_int8", "ONNX Runtime INT8").replace("_", " ")
        return f"{head.removesuffix('_ms').replace('_', ' ').capitalize()} {pretty}{unit}"
    return _MEASURE_LABELS.get(name, name.replace("_", " "))


def complexity_rows(complexity: Any) -> tuple[list[str], list[str], dict[tuple[str, str], Any]]:
    """Normalise a complexity dict into (measures, models, cells).

    Accepts the engine's ``{"student": {"params", "gflops", "latency_ms": {"torch_fp32", ...}},
    "teacher": {...}, "ratios": {...}, "settings": {...}}`` (nested measures are flattened to
    ``latency_ms/torch_fp32``; ratios and settings are left out — the table computes its own ratio) and
    the flat form ``{"student_params": .., "teacher_params": ..}``.
    """
    cells: dict[tuple[str, str], Any] = {}
    measures: list[str] = []
    models: list[str] = []
    if not isinstance(complexity, dict):
        return measures, models, cells

    def add(model: str, measure: str, value: Any) -> None:
        if model not in models:
            models.append(model)
        if measure not in measures:
            measures.append(measure)
        cells[(measure, model)] = value

    for key, value in complexity.items():
        if key in ("ratios", "settings", "notes"):
            continue
        if isinstance(value, dict):
            for measure, v in value.items():
                if isinstance(v, dict):
                    for sub, vv in v.items():
                        if not isinstance(vv, (dict, list)):
                            add(str(key), f"{measure}/{sub}", vv)
                elif not isinstance(v, list):
                    add(str(key), str(measure), v)
        else:
            for model in ("student", "teacher"):
                if key.startswith(model + "_"):
                    add(model, key[len(model) + 1 :], value)
                    break
    order = {"student": 0, "teacher": 1}
    models.sort(key=lambda m: order.get(m, 2))
    return measures, models, cells


def roc_curves(source: Any) -> dict[str, tuple[list[float], list[float], float | None]]:
    """Find ROC points in an eval event / report: ``{"roc": {cls: {"fpr": [], "tpr": [], "auc": x}}}``

    (also accepts a single ``{"fpr", "tpr"}`` dict or a list of per-class dicts with a ``class`` key).
    """
    if not isinstance(source, dict):
        return {}
    roc = source.get("roc") or source.get("roc_curves") or source.get("roc_points")
    out: dict[str, tuple[list[float], list[float], float | None]] = {}
    if isinstance(roc, dict) and "fpr" in roc and "tpr" in roc:
        roc = {"positive": roc}
    if isinstance(roc, list):
        roc = {str(r.get("class", i)): r for i, r in enumerate(roc) if isinstance(r, dict)}
    if isinstance(roc, dict):
        for name, item in roc.items():
            if (
                isinstance(item, dict)
                and isinstance(item.get("fpr"), list)
                and isinstance(item.get("tpr"), list)
            ):
                out[str(name)] = (list(item["fpr"]), list(item["tpr"]), _num(item.get("auc")))
    return out


class TrainingReport(QWidget):
    """The report page; `show_run` fills it from the run's events, `clear` empties it."""

    def __init__(
        self, open_bundle: Callable[[str], None] | None = None, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self._open_bundle = open_bundle
        self.bundle_path: str | None = None

        self.summary = QLabel("No finished run yet.")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.open_button = QPushButton("Open in viewer")
        self.open_button.setToolTip("Load the new model bundle into the viewer")
        self.open_button.clicked.connect(self.open_in_viewer)
        self.folder_button = QPushButton("Show bundle folder")
        self.folder_button.clicked.connect(self._show_folder)
        self.html_button = QPushButton("Full report (HTML)")
        self.html_button.clicked.connect(self._show_html)
        self.html_report: str | None = None
        # The bundle path and the SYNTHETIC note get lines of their own (a long path ran into the note):
        # the path is elided in the middle to the width available, in full in its tooltip.
        self.bundle_label = QLabel("")
        self.bundle_label.setObjectName("Dim")
        self.bundle_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.bundle_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.bundle_label.hide()
        self._bundle_text = ""
        self.synthetic_note = QLabel("Trained on SYNTHETIC data — not for clinical use.")
        self.synthetic_note.setStyleSheet("font-weight: bold; color: #e0a030;")
        self.synthetic_note.hide()
        text_col = QVBoxLayout()
        text_col.setSpacing(2)
        text_col.addWidget(self.summary)
        text_col.addWidget(self.bundle_label)
        text_col.addWidget(self.synthetic_note)
        top = QHBoxLayout()
        top.addLayout(text_col, 1)
        top.addWidget(self.html_button, 0, Qt.AlignmentFlag.AlignTop)
        top.addWidget(self.folder_button, 0, Qt.AlignmentFlag.AlignTop)
        top.addWidget(self.open_button, 0, Qt.AlignmentFlag.AlignTop)

        self.metrics_table = self._table(["Metric", "Student", "95% CI"])
        self.confusion_table = QTableWidget(0, 0)
        self.confusion_table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.confusion_caption = QLabel("rows = true class, columns = predicted")
        self.roc_plot = pg.PlotWidget(background="w")
        self.roc_plot.setAspectLocked(True)
        self.roc_plot.setXRange(0, 1, padding=0.02)
        self.roc_plot.setYRange(0, 1, padding=0.02)
        self.roc_plot.setLabel("bottom", "1 − specificity (FPR)")
        self.roc_plot.setLabel("left", "sensitivity (TPR)")
        self.roc_plot.showGrid(x=True, y=True, alpha=0.25)
        self.roc_note = QLabel("")
        self.roc_note.setWordWrap(True)
        self.complexity_table = self._table(["Measure", "Student", "Teacher", "S / T"])
        # long measure names wrap in a column that takes the width left, so the numbers stay visible
        self.complexity_table.setWordWrap(True)
        self.complexity_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.complexity_table.horizontalHeader().setMinimumSectionSize(60)

        grid = QGridLayout()
        self.metrics_box = self._box("Metrics (held-out)", self.metrics_table)
        grid.addWidget(self.metrics_box, 0, 0)
        cm_box = QGroupBox("Confusion matrix")
        cm_layout = QVBoxLayout(cm_box)
        cm_layout.addWidget(self.confusion_table, 1)
        cm_layout.addWidget(self.confusion_caption)
        grid.addWidget(cm_box, 0, 1)
        roc_box = QGroupBox("ROC")
        roc_layout = QVBoxLayout(roc_box)
        roc_layout.addWidget(self.roc_plot, 1)
        roc_layout.addWidget(self.roc_note)
        grid.addWidget(roc_box, 1, 0)
        grid.addWidget(self._box("Complexity: student vs teacher", self.complexity_table), 1, 1)
        grid.setColumnStretch(0, 1)
        grid.setColumnStretch(1, 1)
        grid.setRowStretch(0, 1)
        grid.setRowStretch(1, 1)

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addLayout(grid, 1)
        self.clear()

    @staticmethod
    def _table(headers: list[str]) -> QTableWidget:
        t = QTableWidget(0, len(headers))
        t.setHorizontalHeaderLabels(headers)
        t.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        t.verticalHeader().setVisible(False)
        t.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        t.horizontalHeader().setStretchLastSection(False)
        t.setVerticalScrollMode(QTableWidget.ScrollMode.ScrollPerPixel)
        return t

    @staticmethod
    def fit_rows(t: QTableWidget, max_rows: int = 14) -> None:
        """Make the table tall enough for all its rows (up to ``max_rows``): it showed 2.5 of them."""
        t.resizeRowsToContents()
        rows = sum(t.rowHeight(r) for r in range(min(t.rowCount(), max_rows)))
        scroll = t.horizontalScrollBar().sizeHint().height() if t.horizontalScrollBar().isVisible() else 0
        t.setMinimumHeight(t.horizontalHeader().height() + rows + 2 * t.frameWidth() + scroll + 2)

    def _set_bundle_text(self, text: str) -> None:
        self._bundle_text = text
        self.bundle_label.setToolTip(text)
        self.bundle_label.setVisible(bool(text))
        self._elide_bundle()

    def _elide_bundle(self) -> None:
        fm = self.bundle_label.fontMetrics()
        width = max(80, self.bundle_label.width())
        self.bundle_label.setText(fm.elidedText(self._bundle_text, Qt.TextElideMode.ElideMiddle, width))

    def resizeEvent(self, event: Any) -> None:
        super().resizeEvent(event)
        self._elide_bundle()

    @staticmethod
    def _box(title: str, widget: QWidget) -> QGroupBox:
        box = QGroupBox(title)
        lay = QVBoxLayout(box)
        lay.addWidget(widget)
        return box

    # -- filling -----------------------------------------------------------------------------------
    def clear(self) -> None:
        self.bundle_path = None
        self.summary.setText("No finished run yet.")
        self._set_bundle_text("")
        self.synthetic_note.hide()
        self.metrics_table.setRowCount(0)
        self.confusion_table.clear()
        self.confusion_table.setRowCount(0)
        self.confusion_table.setColumnCount(0)
        self.complexity_table.setRowCount(0)
        self.roc_plot.clear()
        self.roc_note.setText("")
        self.open_button.setEnabled(False)
        self.folder_button.setEnabled(False)
        self.html_button.setEnabled(False)
        self.html_report = None

    def show_run(self, events: list[dict[str, Any]]) -> None:
        """Fill the report from a run's events (live or replayed) and its bundle's evaluation.json."""
        self.clear()
        evals = [e for e in events if e.get("event") == "eval"]
        end = next((e for e in reversed(events) if e.get("event") == "run_end"), None)
        start = next((e for e in events if e.get("event") == "run_start"), None)

        def rank(e: dict[str, Any]) -> tuple[int, int]:  # the student's test evaluation first
            return (int(e.get("split") == "test"), int(e.get("stage") in (None, "student")))

        main_eval = max(evals, key=rank) if evals else None
        bundle = end.get("bundle") if end else None
        manifest, evaluation = self._read_bundle_files(bundle)
        self.bundle_path = bundle if bundle and Path(bundle).exists() else None
        self.html_report = None
        if self.bundle_path and (Path(self.bundle_path) / "report.html").is_file():
            self.html_report = str(Path(self.bundle_path) / "report.html")

        # One result per model on the reported split: {"metrics", "confusion_matrix", "roc_curves"}.
        split = None
        results: dict[str, dict[str, Any]] = {}
        if evaluation:
            split = evaluation.get("metrics_split") or (manifest or {}).get("metrics_split")
            for role in ("student", "teacher"):
                per_split = evaluation.get(role) or {}
                res = per_split.get(split) if split else None
                if res is None and per_split:
                    res = next(iter(per_split.values()))
                if isinstance(res, dict):
                    results[role] = res
        if not results and main_eval is not None:
            split = main_eval.get("split")
            results["student"] = main_eval
            teacher_eval = next(
                (e for e in evals if e.get("stage") == "teacher" and e.get("split") == split), None
            )
            if teacher_eval is not None and teacher_eval is not main_eval:
                results["teacher"] = teacher_eval
        if not results and (end or {}).get("metrics"):
            results["student"] = {"metrics": end["metrics"]}  # type: ignore[index]
        if not results and manifest and manifest.get("metrics"):
            results["student"] = {"metrics": manifest["metrics"]}
            split = manifest.get("metrics_split")

        names = (
            (results.get("student") or {}).get("class_names")
            or (manifest or {}).get("class_names")
            or ((start or {}).get("dataset") or {}).get("classes")
            or []
        )
        self._fill_metrics(results, split)
        self._fill_confusion((results.get("student") or {}).get("confusion_matrix"), list(names))
        self._fill_roc(results, end)
        complexity = (evaluation or {}).get("complexity") or (end or {}).get("complexity") or {}
        if not complexity and manifest:
            complexity = {
                m: {
                    "params": (manifest.get(m) or {}).get("params"),
                    "gflops": (manifest.get(m) or {}).get("gflops"),
                }
                for m in ("student", "teacher")
                if manifest.get(m)
            }
        self._fill_complexity(complexity)

        parts = []
        if end is None:
            last = events[-1].get("event") if events else None
            parts.append("Run did not finish" + (f" (last event: {last})" if last else "") + ".")
        else:
            elapsed = _num(end.get("elapsed_s"))
            parts.append("Run finished" + (f" in {elapsed / 60:.1f} min" if elapsed else "") + ".")
        if results:
            parts.append(f"Metrics on the {split or 'held-out'} split.")
        missing = "" if self.bundle_path else " (missing)"
        self._set_bundle_text(f"Bundle: {bundle}{missing}" if bundle else "")
        synthetic = bool((start and start.get("synthetic")) or (manifest or {}).get("synthetic_data"))
        self.synthetic_note.setVisible(synthetic)
        self.summary.setText(" ".join(parts))
        self.open_button.setEnabled(self.bundle_path is not None and self._open_bundle is not None)
        self.folder_button.setEnabled(self.bundle_path is not None)
        self.html_button.setEnabled(self.html_report is not None)

    @staticmethod
    def _read_bundle_files(bundle: str | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        if not bundle:
            return None, None
        root = Path(bundle)
        if not root.is_dir():  # zipped bundles: the events carry what we need
            return None, None
        out: list[dict[str, Any] | None] = []
        for name in ("manifest.json", "evaluation.json"):
            try:
                data = json.loads((root / name).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                data = None
            out.append(data if isinstance(data, dict) else None)
        return out[0], out[1]

    def _fill_metrics(self, results: dict[str, dict[str, Any]], split: str | None) -> None:
        student = flatten_metrics((results.get("student") or {}).get("metrics"))
        teacher = flatten_metrics((results.get("teacher") or {}).get("metrics"))
        names = list(student) + [n for n in teacher if n not in student]
        t = self.metrics_table
        headers = ["Metric", "Student", "95% CI"] + (["Teacher", "95% CI"] if teacher else [])
        t.setColumnCount(len(headers))
        t.setHorizontalHeaderLabels(headers)
        t.setRowCount(len(names))

        def cells(value: Any) -> tuple[str, str]:
            if isinstance(value, dict):
                v = _num(value.get("value"))
                lo, hi = _num(value.get("ci_low")), _num(value.get("ci_high"))
                ci = f"{lo:.2f}–{hi:.2f}" if lo is not None and hi is not None else ""  # compact: fits
            else:
                v, ci = _num(value), ""
            return (f"{v:.3f}" if v is not None else ("–" if value is not None else "")), ci

        for r, name in enumerate(names):
            texts = [name.replace("roc_auc", "AUC").replace("_", " "), *cells(student.get(name))]
            if teacher:
                texts += list(cells(teacher.get(name)))
            for c, text in enumerate(texts):
                item = QTableWidgetItem(text)
                if c > 0:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                t.setItem(r, c, item)
        self.metrics_box.setTitle(f"Metrics on the {split} split (bootstrap 95% CI)" if split else "Metrics")
        self.fit_rows(t)

    def _fill_confusion(self, matrix: Any, names: list[str]) -> None:
        t = self.confusion_table
        t.clear()
        ok = isinstance(matrix, list) and matrix and all(isinstance(r, list) for r in matrix)
        if not ok:
            t.setRowCount(1)
            t.setColumnCount(1)
            t.setItem(0, 0, QTableWidgetItem("no confusion matrix in this run"))
            t.horizontalHeader().setVisible(False)
            t.verticalHeader().setVisible(False)
            return
        t.horizontalHeader().setVisible(True)
        t.verticalHeader().setVisible(True)
        if all(isinstance(r, list) and r and isinstance(r[0], list) for r in matrix):
            # multi-label: one [[TN, FP], [FN, TP]] per label
            t.setRowCount(len(matrix))
            t.setColumnCount(4)
            t.setHorizontalHeaderLabels(["TN", "FP", "FN", "TP"])
            labels = (
                [str(n) for n in names] if len(names) == len(matrix) else [str(i) for i in range(len(matrix))]
            )
            t.setVerticalHeaderLabels(labels)
            for r, m in enumerate(matrix):
                flat = [m[0][0], m[0][1], m[1][0], m[1][1]] if len(m) == 2 and len(m[0]) == 2 else [None] * 4
                for c, v in enumerate(flat):
                    item = QTableWidgetItem("" if v is None else str(v))
                    item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
                    t.setItem(r, c, item)
            self.confusion_caption.setText("one 2×2 table per label (rows = labels)")
            t.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
            return
        n_rows, n_cols = len(matrix), max(len(r) for r in matrix)
        labels = [str(n) for n in names] if len(names) == n_cols else [str(i) for i in range(n_cols)]
        t.setRowCount(n_rows)
        t.setColumnCount(n_cols)
        t.setHorizontalHeaderLabels([f"→ {x}" for x in labels])
        t.setVerticalHeaderLabels(
            labels[:n_rows] if len(labels) >= n_rows else [str(i) for i in range(n_rows)]
        )
        for r, row in enumerate(matrix):
            total = sum(x for x in row if isinstance(x, (int, float))) or 1
            for c in range(n_cols):
                v = row[c] if c < len(row) else 0
                frac = (v / total) if isinstance(v, (int, float)) else 0.0
                item = QTableWidgetItem(f"{v}  ({100 * frac:.0f}%)")
                item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
                shade = int(255 - 150 * frac)
                color = QColor(shade, shade, 255) if r == c else QColor(255, shade, shade)
                item.setBackground(QBrush(color))
                item.setForeground(QBrush(QColor(0, 0, 0)))
                t.setItem(r, c, item)
        self.confusion_caption.setText("student; rows = true class, columns = predicted (row %)")
        t.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)

    def _fill_roc(self, results: dict[str, dict[str, Any]], end: dict[str, Any] | None) -> None:
        self.roc_plot.clear()
        legend = self.roc_plot.plotItem.legend or self.roc_plot.addLegend(offset=(-10, -10))
        legend.clear()
        self.roc_plot.plot([0, 1], [0, 1], pen=pg.mkPen((160, 160, 160), style=Qt.PenStyle.DashLine))
        drawn = 0
        for role, style in (("student", Qt.PenStyle.SolidLine), ("teacher", Qt.PenStyle.DashLine)):
            res = results.get(role) or {}
            metrics = flatten_metrics(res.get("metrics"))
            for i, (name, (fpr, tpr, auc)) in enumerate(roc_curves(res).items()):
                if auc is None:
                    m = metrics.get(f"roc_auc:{name}") or metrics.get("roc_auc") or metrics.get("auc")
                    auc = _num(m.get("value")) if isinstance(m, dict) else _num(m)
                label = f"{role} {name}" + (f" (AUC {auc:.3f})" if auc is not None else "")
                color = _ROC_COLORS[i % len(_ROC_COLORS)]
                self.roc_plot.plot(fpr, tpr, pen=pg.mkPen(color, width=2, style=style), name=label)
                drawn += 1
        if not drawn:
            for i, (name, (fpr, tpr, auc)) in enumerate(roc_curves(end).items()):
                label = f"{name}" + (f" (AUC {auc:.3f})" if auc is not None else "")
                self.roc_plot.plot(
                    fpr, tpr, pen=pg.mkPen(_ROC_COLORS[i % len(_ROC_COLORS)], width=2), name=label
                )
                drawn += 1
        if drawn:
            self.roc_note.setText("")
            return
        aucs = {
            k: v
            for k, v in flatten_metrics((results.get("student") or {}).get("metrics")).items()
            if "auc" in k.lower()
        }
        if aucs:
            text = "; ".join(f"{k} = {format_metric(v)}" for k, v in aucs.items())
            self.roc_note.setText(f"No ROC points were saved with this run. {text}")
        else:
            self.roc_note.setText("No ROC points or AUC in this run.")

    def _fill_complexity(self, complexity: Any) -> None:
        measures, models, cells = complexity_rows(complexity)
        cols = ["Measure", *models]
        has_pair = "student" in models and "teacher" in models
        if has_pair:
            cols.append("S / T")
        t = self.complexity_table
        t.setColumnCount(len(cols))
        t.setHorizontalHeaderLabels(cols)
        t.setRowCount(len(measures))
        for r, measure in enumerate(measures):
            t.setItem(r, 0, QTableWidgetItem(measure_label(measure)))
            for c, model in enumerate(models, start=1):
                item = QTableWidgetItem(_fmt_big(cells.get((measure, model))))
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                t.setItem(r, c, item)
            if has_pair:
                s, te = _num(cells.get((measure, "student"))), _num(cells.get((measure, "teacher")))
                ratio = f"{s / te:.2f}×" if s is not None and te else ""
                item = QTableWidgetItem(ratio)
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                t.setItem(r, len(cols) - 1, item)
        if not measures:
            t.setRowCount(1)
            t.setItem(0, 0, QTableWidgetItem("no complexity figures in this run"))
        self.fit_rows(t, max_rows=8)

    # -- actions -----------------------------------------------------------------------------------
    def open_in_viewer(self) -> None:
        if self.bundle_path and self._open_bundle is not None:
            self._open_bundle(self.bundle_path)

    def _show_html(self) -> None:
        if self.html_report:
            QDesktopServices.openUrl(QUrl.fromLocalFile(self.html_report))

    def _show_folder(self) -> None:
        if self.bundle_path:
            p = Path(self.bundle_path)
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(p if p.is_dir() else p.parent)))
