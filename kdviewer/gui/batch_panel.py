"""The batch panel: classify every image of a folder with a model bundle, then sort and filter the results.

`kdviewer.batch.run_batch` does the work in a `QThread` (never on the GUI thread); it writes the output
CSV row by row, which is what makes Resume work (rerunning with the same output skips finished files)
and what this panel re-reads to fill the results table while the batch runs. Cancel sets the
`threading.Event` the batch function checks between images.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCore import QModelIndex, QPoint, Qt, QThread, QTimer, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMenu,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from kdviewer.gui.banner import MessageBar
from kdviewer.gui.batch_model import HIDDEN_BY_DEFAULT, PATH_ROLE, BatchFilterProxy, BatchResultsModel


def _default_bundle() -> str:
    try:
        from kdviewer.models.bundle import default_bundle_path

        return str(default_bundle_path())
    except Exception:  # no demo bundle on this install: the user picks one
        return ""


def progress_info(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Normalise the batch progress callback's argument (a `kdviewer.batch.BatchProgress`) to a dict."""
    obj: Any = args[0] if args else kwargs
    keys = ("done", "total", "skipped", "errors", "elapsed_s", "rate", "eta_s", "current")
    if isinstance(obj, dict):
        info = {k: obj.get(k) for k in keys}
    elif isinstance(obj, (int, float)):  # a plain (done, total) callback
        info = dict.fromkeys(keys)
        info["done"] = int(obj)
        info["total"] = int(args[1]) if len(args) > 1 else None
    else:
        info = {k: getattr(obj, k, None) for k in keys}
    return info


class BatchWorker(QThread):
    """Runs `kdviewer.batch.run_batch` off the GUI thread.

    Signals: ``progress(dict)`` (done, total, skipped, errors, elapsed_s, rate, eta_s, current),
    ``succeeded(summary)``, ``failed(message, traceback)``.
    """

    progress = Signal(dict)
    succeeded = Signal(object)
    failed = Signal(str, str)

    def __init__(
        self,
        folder: str,
        bundle: str,
        out_csv: str,
        *,
        teacher: bool = False,
        heatmaps_dir: str | None = None,
        workers: int = 2,
        batch_size: int = 16,
        cluster: str | None = None,
        parent: Any = None,
    ) -> None:
        super().__init__(parent)
        self.folder, self.bundle, self.out_csv = folder, bundle, out_csv
        self.cluster = cluster or None
        self.teacher, self.heatmaps_dir, self.workers, self.batch_size = (
            teacher,
            heatmaps_dir,
            workers,
            batch_size,
        )
        self.cancel_event = threading.Event()
        self.summary: Any = None

    def cancel(self) -> None:
        self.cancel_event.set()

    def _on_progress(self, *args: Any, **kwargs: Any) -> None:
        self.progress.emit(progress_info(args, kwargs))

    def run(self) -> None:
        try:
            from kdviewer.batch import run_batch

            self.summary = run_batch(
                self.folder,
                self.bundle,
                self.out_csv,
                teacher=self.teacher,
                heatmaps_dir=self.heatmaps_dir or None,
                workers=self.workers,
                batch_size=self.batch_size,
                progress=self._on_progress,
                cancel=self.cancel_event,
                cluster=self.cluster,
            )
        except Exception as exc:
            self.failed.emit(f"{type(exc).__name__}: {exc}", traceback.format_exc())
            return
        self.succeeded.emit(self.summary)


def _summary_text(summary: Any) -> str:
    if summary is None:
        return ""
    try:
        from kdviewer.batch import summary_lines

        return " ".join(line.rstrip(".") + "." for line in summary_lines(summary, shift=False)[:-1])
    except Exception:
        return ""


class _PathRow(QWidget):
    def __init__(self, caption: str, mode: str, filters: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.caption, self.mode, self.filters = caption, mode, filters
        self.edit = QLineEdit()
        h = QHBoxLayout(self)
        h.setContentsMargins(0, 0, 0, 0)
        h.addWidget(self.edit, 1)
        b = QPushButton("Browse…")
        b.clicked.connect(self._browse)
        h.addWidget(b)

    def text(self) -> str:
        return self.edit.text().strip()

    def setText(self, t: str) -> None:
        self.edit.setText(t)

    def _browse(self) -> None:
        if self.mode == "dir":
            d = QFileDialog.getExistingDirectory(self, self.caption, self.text())
        elif self.mode == "save":
            d, _ = QFileDialog.getSaveFileName(self, self.caption, self.text(), self.filters)
        else:
            d, _ = QFileDialog.getOpenFileName(self, self.caption, self.text(), self.filters)
        if d:
            self.edit.setText(d)


class BatchPanel(QWidget):
    """Classify a folder; results table with sort, filters, double-click to open, CSV export."""

    state_changed = Signal(str)
    progressed = Signal(dict)  # the batch's progress info (see `progress_info`)
    batch_finished = Signal(str)  # "finished" | "cancelled" | "failed"

    def __init__(
        self,
        open_case: Callable[[str], None] | QWidget | None = None,
        open_bundle: Callable[[str], None] | None = None,
        parent: QWidget | None = None,
    ) -> None:
        if isinstance(open_case, QWidget):  # built as Panel(main_window): use its public API
            parent, window = open_case, open_case
            open_case = getattr(window, "open_path", None)
            open_bundle = open_bundle or getattr(window, "load_bundle", None)
        super().__init__(parent)
        self.open_case = open_case
        self.open_bundle = open_bundle
        self.worker: BatchWorker | None = None
        self.state = "idle"
        self.outcome: str | None = None
        self.last_error: str | None = None
        self.summary: Any = None
        self._started = 0.0
        self._csv_mtime = 0.0
        self._suggested = ""

        # -- inputs ---------------------------------------------------------------------------------
        self.folder = _PathRow("Folder of images", "dir")
        self.bundle = _PathRow("Model bundle", "file", "Bundles (*.zip manifest.json);;All files (*)")
        self.bundle.setText(_default_bundle())
        self.output = _PathRow("Output CSV", "save", "CSV (*.csv)")
        self.teacher = QCheckBox("compare with the teacher (slower)")
        self.heatmaps = _PathRow("Heatmaps folder (optional)", "dir")
        self.heatmaps.edit.setPlaceholderText("no heatmaps")
        self.workers = QSpinBox()
        self.workers.setRange(1, 16)
        self.workers.setValue(2)
        self.workers.setToolTip("Decoder processes of the built-in pool")
        self.cluster = QLineEdit()
        self.cluster.setPlaceholderText("empty = built-in pool on this computer")
        self.cluster.setToolTip(
            "Run on Dask instead of the built-in pool: local:4 (4 worker processes here) or the address of "
            "a running scheduler, tcp://HOST:8786, whose workers see the same files (pip install "
            "'kdviewer[cluster]' on every machine)"
        )
        self.cluster.textChanged.connect(
            lambda t: self.workers.setEnabled(self.state == "idle" and not t.strip()))
        self.folder.edit.textChanged.connect(self._suggest_output)
        form = QFormLayout()
        form.addRow("Folder", self.folder)
        form.addRow("Model", self.bundle)
        form.addRow("Output CSV", self.output)
        form.addRow("Options", self.teacher)
        form.addRow("Heatmaps", self.heatmaps)
        form.addRow("Readers", self.workers)
        self.cluster.setMaximumWidth(420)
        cluster_row = QHBoxLayout()
        cluster_row.setContentsMargins(0, 0, 0, 0)
        cluster_row.addWidget(self.cluster)
        cluster_hint = QLabel("Dask: local:N (N processes here) or tcp://HOST:8786 (shared files)")
        cluster_hint.setStyleSheet("color: palette(mid);")
        cluster_row.addWidget(cluster_hint, 1)
        form.addRow("Cluster", cluster_row)
        self.start_button = QPushButton("Start")
        self.cancel_button = QPushButton("Cancel")
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("Continue into the same output CSV, skipping files already done")
        self.start_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.resume_button.clicked.connect(self.resume)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.resume_button)
        buttons.addStretch(1)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel("Choose a folder and a model.")
        self.status.setWordWrap(True)
        self.workers.setMaximumWidth(80)
        setup = QGroupBox("Batch classification")
        sv = QVBoxLayout(setup)
        top = QHBoxLayout()
        form_box = QWidget()
        form_box.setLayout(form)
        form_box.setMaximumWidth(1000)
        top.addWidget(form_box, 3)
        top.addStretch(1)
        sv.addLayout(top)
        sv.addLayout(buttons)
        sv.addWidget(self.progress)
        sv.addWidget(self.status)
        # set-level OOD check of the whole folder (kdviewer.inference.ood.DomainShift)
        self.shift_bar = MessageBar(self)
        sv.addWidget(self.shift_bar)

        # -- results --------------------------------------------------------------------------------
        self.model = BatchResultsModel(self)
        self.proxy = BatchFilterProxy(self)
        self.proxy.setSourceModel(self.model)
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.setSelectionBehavior(QTableView.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QTableView.EditTrigger.NoEditTriggers)
        self.table.setAlternatingRowColors(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.table.horizontalHeader().setStretchLastSection(False)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(22)
        self.table.doubleClicked.connect(self._double_clicked)
        # Columns hidden by default (DICOM UIDs) can be shown from the header's context menu.
        self.shown_columns: set[str] = set()
        header = self.table.horizontalHeader()
        header.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        header.customContextMenuRequested.connect(self._column_menu)
        header.setToolTip("Right-click to show or hide columns (DICOM UIDs are hidden by default)")
        self.label_filter = QComboBox()
        self.label_filter.addItem("all labels", None)
        self.min_prob = QDoubleSpinBox()
        self.min_prob.setRange(0.0, 1.0)
        self.min_prob.setSingleStep(0.05)
        self.min_prob.setDecimals(2)
        self.min_prob.setPrefix("P ≥ ")
        self.only_disagree = QCheckBox("disagreement")
        self.only_ood = QCheckBox("OOD")
        self.error_filter = QComboBox()
        for text, value in (("all rows", "all"), ("errors only", "only"), ("hide errors", "hide")):
            self.error_filter.addItem(text, value)
        self.text_filter = QLineEdit()
        self.text_filter.setPlaceholderText("search path / error text")
        self.text_filter.setClearButtonEnabled(True)
        self.export_button = QPushButton("Export CSV…")
        self.export_button.clicked.connect(self.export_dialog)
        for w in (self.label_filter, self.error_filter):
            w.currentIndexChanged.connect(self.apply_filters)
        self.min_prob.valueChanged.connect(self.apply_filters)
        self.only_disagree.toggled.connect(self.apply_filters)
        self.only_ood.toggled.connect(self.apply_filters)
        self.text_filter.textChanged.connect(self.apply_filters)
        filters = QHBoxLayout()
        filters.addWidget(QLabel("Show"))
        for w in (self.label_filter, self.min_prob, self.only_disagree, self.only_ood, self.error_filter):
            filters.addWidget(w)
        filters.addWidget(self.text_filter, 1)
        filters.addWidget(self.export_button)
        self.count_label = QLabel("")
        results = QGroupBox("Results (double-click a row to open the case)")
        rv = QVBoxLayout(results)
        rv.addLayout(filters)
        rv.addWidget(self.table, 1)
        rv.addWidget(self.count_label)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(setup)
        layout.addWidget(results, 1)

        self._refresh_timer = QTimer(self)
        self._refresh_timer.setInterval(1500)
        self._refresh_timer.timeout.connect(self._refresh_while_running)
        self._set_state("idle")

    # -- state ---------------------------------------------------------------------------------------
    def is_running(self) -> bool:
        return self.worker is not None and self.worker.isRunning()

    def _set_state(self, state: str) -> None:
        self.state = state
        idle = state == "idle"
        for w in (self.folder, self.bundle, self.output, self.teacher, self.heatmaps, self.cluster):
            w.setEnabled(idle)
        self.workers.setEnabled(idle and not self.cluster.text().strip())
        self.start_button.setEnabled(idle)
        self.cancel_button.setEnabled(state == "running")
        out = self.output.text()
        self.resume_button.setEnabled(
            idle and bool(out) and Path(out).is_file() and self.outcome in ("cancelled", "failed")
        )
        self.state_changed.emit(state)

    def _suggest_output(self, folder: str) -> None:
        if folder and (not self.output.text() or self.output.text() == self._suggested):
            from kdviewer.batch import default_output

            # outside the input folder (a results file inside it would be scanned by the next run)
            self._suggested = str(default_output(folder, Path.home()))
            self.output.setText(self._suggested)

    # -- run -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start a fresh batch (an existing output CSV is replaced, after asking)."""
        if self.state != "idle" or not self._inputs_ok():
            return
        out = Path(self.output.text())
        if out.exists():
            answer = QMessageBox.question(
                self,
                "Output exists",
                f"{out} already exists.\n\nReplace it (Yes), or continue it with Resume (No)?",
                QMessageBox.StandardButton.Yes
                | QMessageBox.StandardButton.No
                | QMessageBox.StandardButton.Cancel,
                QMessageBox.StandardButton.Cancel,
            )
            if answer == QMessageBox.StandardButton.Cancel:
                return
            if answer == QMessageBox.StandardButton.No:
                self._launch()
                return
            out.unlink()
            sidecar = out.with_suffix(".json")
            if sidecar.exists():
                sidecar.unlink()
        self.model.clear()
        self._launch()

    def resume(self) -> None:
        """Continue into the same output CSV; files already in it are skipped by the batch."""
        if self.state != "idle" or not self._inputs_ok():
            return
        self._launch()

    def cancel(self) -> None:
        if self.worker is not None and self.is_running():
            self.worker.cancel()
            self.status.setText("Cancelling after the images in flight…")
            self.cancel_button.setEnabled(False)

    def _inputs_ok(self) -> bool:
        problems = []
        if not self.folder.text() or not Path(self.folder.text()).is_dir():
            problems.append("Choose a folder of images that exists.")
        if not self.bundle.text() or not Path(self.bundle.text()).exists():
            problems.append("Choose a model bundle (a folder or .zip).")
        if not self.output.text():
            problems.append("Choose where to write the results CSV.")
        if self.cluster.text().strip():
            from kdviewer.batch_cluster import ClusterError, parse_cluster  # Dask itself is not imported

            try:
                parse_cluster(self.cluster.text())
            except ClusterError as exc:
                problems.append(str(exc))
        if problems:
            self.status.setText(" ".join(problems))
            self.status.setStyleSheet("color: #b00020;")
            return False
        self.status.setStyleSheet("")
        return True

    def _launch(self) -> None:
        out = self.output.text()
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        self.outcome = None
        self.last_error = None
        self.worker = BatchWorker(
            self.folder.text(),
            self.bundle.text(),
            out,
            teacher=self.teacher.isChecked(),
            heatmaps_dir=self.heatmaps.text() or None,
            workers=self.workers.value(),
            cluster=self.cluster.text().strip() or None,
            parent=self,
        )
        self.worker.progress.connect(self._on_progress)
        self.worker.succeeded.connect(self._on_succeeded)
        self.worker.failed.connect(self._on_failed)
        self.worker.finished.connect(self._on_thread_finished)
        self._started = time.monotonic()
        self.progress.setRange(0, 0)  # busy until the first progress report
        self.status.setText("Starting (loading the model" + (
            f", connecting to the Dask cluster {self.worker.cluster})…" if self.worker.cluster else ")…"))
        self.shift_bar.dismiss()
        self._set_state("running")
        self.worker.start()
        self._refresh_timer.start()

    def _on_progress(self, info: dict) -> None:
        done = int(info.get("done") or 0)
        total = info.get("total")
        skipped = int(info.get("skipped") or 0)
        if isinstance(total, int) and total + skipped > 0:
            self.progress.setRange(0, total + skipped)
            self.progress.setValue(min(done + skipped, total + skipped))
        rate = info.get("rate")
        if not isinstance(rate, (int, float)) or rate <= 0:
            elapsed = time.monotonic() - self._started
            rate = done / elapsed if elapsed > 0.2 and done else None
        text = f"{done}" + (f" / {total}" if isinstance(total, int) else "") + " cases"
        if skipped:
            text += f" (+{skipped} already done)"
        if rate:
            text += f" · {rate:.1f} images/s"
        eta = info.get("eta_s")
        if not isinstance(eta, (int, float)) and rate and isinstance(total, int):
            eta = (total - done) / rate
        if isinstance(eta, (int, float)):
            text += f" · ETA {int(eta // 60)}:{int(eta % 60):02d}"
        if info.get("errors"):
            text += f" · {info['errors']} unreadable"
        self.status.setText(text)
        current = info.get("current")
        self.status.setToolTip(str(current) if current else "")
        self.progressed.emit(info)

    def _on_succeeded(self, summary: Any) -> None:
        self.summary = summary
        cancelled = bool(getattr(summary, "cancelled", False)) or (
            self.worker is not None and self.worker.cancel_event.is_set()
        )
        self.outcome = "cancelled" if cancelled else "finished"
        extra = _summary_text(summary)
        elapsed = time.monotonic() - self._started
        word = "Cancelled" if cancelled else "Done"
        cluster = self.worker.cluster if self.worker is not None else None
        where = f" on the Dask cluster {cluster}" if cluster else ""
        self.status.setText(
            f"{word}{where} in {elapsed:.1f} s. {extra}".strip()
            + (" Press Resume to continue." if cancelled else "")
        )
        shift = getattr(summary, "shift", None)
        if shift is not None and shift.shifted:
            self.shift_bar.show_message(
                shift.message(),
                "warning",
                details=(
                    "The OOD guard flags about 1% of cases that are like the model's training data (its "
                    "threshold is the 99th percentile of validation scores). Many more flags in one folder "
                    "mean the folder as a whole comes from a different population, scanner or task than "
                    "the model was trained on, even where single cases are not flagged. The p-value is the "
                    "binomial probability of this many flags by chance."
                ),
            )

    def _on_failed(self, message: str, tb: str) -> None:
        self.outcome = "failed"
        self.last_error = message
        self.status.setText(f"Batch failed: {message}")
        self.status.setStyleSheet("color: #b00020;")
        self.status.setToolTip(tb)

    def _on_thread_finished(self) -> None:
        self._refresh_timer.stop()
        if self.outcome is None:
            self.outcome = "failed"
        if self.progress.maximum() == 0:
            self.progress.setRange(0, 1)
        self.load_results()
        self._set_state("idle")
        self.batch_finished.emit(self.outcome)

    def _refresh_while_running(self) -> None:
        out = Path(self.output.text())
        try:
            mtime = out.stat().st_mtime
        except OSError:
            return
        if mtime != self._csv_mtime:
            self.load_results()

    # -- results -------------------------------------------------------------------------------------
    def load_results(self, path: str | Path | None = None) -> int:
        """(Re)load the results table from the output CSV; keeps the current sort and filters."""
        out = Path(path or self.output.text())
        if not out.is_file():
            return 0
        try:
            self._csv_mtime = out.stat().st_mtime
            n = self.model.load_csv(out, root=self.folder.text() or None)
        except (OSError, UnicodeError) as exc:
            self.status.setText(f"Cannot read {out}: {exc}")
            return 0
        current = self.label_filter.currentData()
        self.label_filter.blockSignals(True)
        self.label_filter.clear()
        self.label_filter.addItem("all labels", None)
        for label in self.model.labels():
            self.label_filter.addItem(label, label)
        idx = self.label_filter.findData(current)
        self.label_filter.setCurrentIndex(max(0, idx))
        self.label_filter.blockSignals(False)
        self.apply_filters()
        self._apply_column_visibility()
        self.table.resizeColumnsToContents()
        for c in range(self.model.columnCount()):
            if self.table.columnWidth(c) > 420:
                self.table.setColumnWidth(c, 420)
        return n

    def column_hidden_by_choice(self, name: str) -> bool:
        return name in HIDDEN_BY_DEFAULT and name not in self.shown_columns

    def _apply_column_visibility(self) -> None:
        empty = set(self.model.empty_columns()) if self.model.rowCount() else set()
        for c, name in enumerate(self.model.columns):
            self.table.setColumnHidden(c, c in empty or self.column_hidden_by_choice(name))

    def set_column_shown(self, name: str, shown: bool) -> None:
        if shown:
            self.shown_columns.add(name)
        else:
            self.shown_columns.discard(name)
        self._apply_column_visibility()
        self.table.resizeColumnsToContents()

    def _column_menu(self, pos: QPoint) -> None:
        menu = QMenu(self)
        for name in self.model.columns:
            if name not in HIDDEN_BY_DEFAULT:
                continue
            act = menu.addAction(f"show {name.replace('_', ' ')}")
            act.setCheckable(True)
            act.setChecked(name in self.shown_columns)
            act.toggled.connect(lambda on, n=name: self.set_column_shown(n, on))
        if not menu.isEmpty():
            menu.exec(self.table.horizontalHeader().mapToGlobal(pos))

    def apply_filters(self) -> None:
        self.proxy.set_filters(
            label=self.label_filter.currentData(),
            min_prob=self.min_prob.value(),
            only_disagreement=self.only_disagree.isChecked(),
            only_ood=self.only_ood.isChecked(),
            errors=self.error_filter.currentData() or "all",
            text=self.text_filter.text(),
        )
        total = self.model.rowCount()
        errors = sum(1 for r in range(total) if self.model.has_error(r))
        shown = self.proxy.rowCount()
        self.count_label.setText(f"{shown} of {total} rows shown · {errors} file(s) could not be classified")

    def _double_clicked(self, index: QModelIndex) -> None:
        path = self.proxy.data(index, PATH_ROLE)
        if path and self.open_case is not None:
            self.open_case(str(path))

    def export_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export the shown rows", "", "CSV (*.csv)")
        if path:
            n = self.export_csv(path)
            self.status.setText(f"Exported {n} rows to {path}.")

    def export_csv(self, path: str | Path) -> int:
        """Write the rows currently shown (filters and sort applied)."""
        return self.proxy.export_csv(path)

    # -- closing -------------------------------------------------------------------------------------
    def confirm_close(self) -> bool:
        """For the main window's closeEvent: cancels a running batch (it can be resumed later)."""
        if not self.is_running():
            return True
        answer = QMessageBox.question(
            self,
            "Batch is running",
            "A batch classification is running. Cancel it and close? (Resume continues it later.)",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel,
            QMessageBox.StandardButton.Cancel,
        )
        if answer != QMessageBox.StandardButton.Yes:
            return False
        self.shutdown()
        return True

    def shutdown(self, wait_ms: int = 30000) -> None:
        if self.worker is not None and self.worker.isRunning():
            self.worker.cancel()
            self.worker.wait(wait_ms)
