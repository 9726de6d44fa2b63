"""The main window: wires the canvas and panels to background jobs; holds no image or model logic itself.

Layout: an always-visible disclaimer banner and an inline message bar on top, then a tab widget whose
first tab is the viewer (study list | canvas + slice slider | side panels). Extra tabs (batch,
training...) are registered in `EXTRA_TABS` as ``(module, class, title)``: each class is built as
``cls(window)`` and may call `open_path`, `load_bundle`, `current_bundle_path` and `show_message`.

Request flow (all jobs in `TaskRunner`, newer requests supersede older ones per channel):
open_path -> "load" (io pool) -> canvas/tags -> "predict" (model pool) -> predictions panel
-> "saliency" (model pool) -> canvas panes. A window/level change only repaints: the model input is
computed by the inference room from the Study, never from screen pixels.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

from PySide6.QtCore import QByteArray, QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QCloseEvent, QDragEnterEvent, QDropEvent, QIcon, QImage, QKeySequence
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMenu,
    QPushButton,
    QScrollArea,
    QSlider,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from kdviewer.gui import analysis, logic
from kdviewer.gui.banner import DisclaimerBanner, MessageBar
from kdviewer.gui.canvas import ImageCanvas, Pane
from kdviewer.gui.help_dialog import ShortcutHelp
from kdviewer.gui.model_panel import ModelCardDialog, ModelPanel, bundle_card_html
from kdviewer.gui.predictions_panel import PredictionsPanel
from kdviewer.gui.saliency_panel import SaliencyPanel
from kdviewer.gui.study_list import StudyList
from kdviewer.gui.tag_panel import TagPanel
from kdviewer.gui.workers import Cancelled, TaskError, TaskRunner
from kdviewer.imaging.study import CT_PRESETS, Study

log = logging.getLogger(__name__)

#: Optional tabs: (module, class name, tab title). A missing module is skipped silently; a module that
#: exists but fails to import or build is reported in the message bar.
EXTRA_TABS: list[tuple[str, str, str]] = [
    ("kdviewer.gui.batch_panel", "BatchPanel", "Batch"),
    ("kdviewer.gui.training_panel", "TrainingPanel", "Training"),
]

MAX_RECENT = 10


def _mod_name(exc: ImportError) -> str:
    return getattr(exc, "name", "") or ""


class MainWindow(QMainWindow):
    study_loaded = Signal(object)  # Study
    analysis_shown = Signal(object)  # AnalysisResult, after the predictions panel was updated
    saliency_shown = Signal(object)  # SaliencyResult, after the canvas got the maps
    bundle_loaded = Signal(object)  # Classifier
    error_shown = Signal(str)
    dicom_exported = Signal(object)  # kdviewer.dicom_out.ExportedCase

    def __init__(
        self, settings: QSettings | None = None, restore: bool = True, extra_tabs: bool = True
    ) -> None:
        super().__init__()
        self.setObjectName("MainWindow")
        self.setWindowTitle("kdviewer")
        icon = logic.resources_dir() / "icons" / "kdviewer.svg"
        if icon.is_file():
            self.setWindowIcon(QIcon(str(icon)))
        self.setAcceptDrops(True)
        self.settings = settings if settings is not None else default_settings()
        self.runner = TaskRunner(self)
        self.threads = analysis.thread_count()  # torch itself is configured (and imported) in a worker
        self.study: Study | None = None
        self.study_path: Path | None = None
        self.classifier: Any = None
        self.bundle_path: str | None = None
        self.result: analysis.AnalysisResult | None = None
        self.saliency_result: analysis.SaliencyResult | None = None
        self._saliency_cache: dict = {}
        self.cases: list[logic.Case] = []
        self.timings: dict[str, float] = {}
        self.last_error: str = ""
        self.warmup_models = True  # warm the runtimes up when a bundle loads (render turns this off)
        self._bundle_loading: str | None = None  # path of a bundle being loaded

        self._build_ui()
        self._build_actions()
        self._build_status()
        self._connect()
        if extra_tabs:
            self._add_extra_tabs()
        if restore:
            self._restore_settings()
        self._refresh_recent_menus()
        self._update_banner()

    # ------------------------------------------------------------------------------------------------
    # UI
    # ------------------------------------------------------------------------------------------------

    def _build_ui(self) -> None:
        central = QWidget()
        outer = QVBoxLayout(central)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(0)
        self.banner = DisclaimerBanner()
        self.message_bar = MessageBar()
        outer.addWidget(self.banner)
        outer.addWidget(self.message_bar)
        self.tabs = QTabWidget()
        self.tabs.setObjectName("MainTabs")
        self.tabs.setDocumentMode(True)
        self.tabs.setTabBarAutoHide(True)
        outer.addWidget(self.tabs, 1)
        self.setCentralWidget(central)

        viewer = QWidget()
        vlay = QHBoxLayout(viewer)
        vlay.setContentsMargins(0, 0, 0, 0)
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        vlay.addWidget(self.splitter)

        self.study_list = StudyList()
        self.study_list.setMinimumWidth(170)
        self.splitter.addWidget(self.study_list)

        center = QWidget()
        clay = QVBoxLayout(center)
        clay.setContentsMargins(0, 0, 0, 0)
        clay.setSpacing(0)
        self.canvas = ImageCanvas()
        clay.addWidget(self.canvas, 1)
        srow = QHBoxLayout()
        srow.setContentsMargins(8, 2, 8, 2)
        self.slice_label = QLabel("")
        self.slice_label.setObjectName("Dim")
        self.slice_slider = QSlider(Qt.Orientation.Horizontal)
        self.slice_slider.setObjectName("SliceSlider")
        self.slice_slider.setToolTip("Slice (PageUp / PageDown, Shift+wheel)")
        srow.addWidget(QLabel("Slice"))
        srow.addWidget(self.slice_slider, 1)
        srow.addWidget(self.slice_label)
        self.slice_row = QWidget()
        self.slice_row.setLayout(srow)
        self.slice_row.hide()
        clay.addWidget(self.slice_row)
        self.splitter.addWidget(center)

        side = QWidget()
        side.setObjectName("SidePanel")
        slay = QVBoxLayout(side)
        slay.setContentsMargins(6, 6, 6, 6)
        slay.setSpacing(8)
        self.model_panel = ModelPanel()
        self.predictions = PredictionsPanel()
        self.saliency_panel = SaliencyPanel()
        self.side_tabs = QTabWidget()
        self.side_tabs.setObjectName("SideTabs")
        self.tag_panel = TagPanel()
        self.side_tabs.addTab(self.tag_panel, "Tags")
        slay.addWidget(self.model_panel)
        slay.addWidget(self.predictions)
        slay.addWidget(self.saliency_panel)
        slay.addWidget(self.side_tabs, 1)
        scroll = _FitWidthScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(side)
        scroll.setMinimumWidth(380)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.side_scroll = scroll
        self.splitter.addWidget(scroll)
        self.splitter.setStretchFactor(0, 0)
        self.splitter.setStretchFactor(1, 1)
        self.splitter.setStretchFactor(2, 0)
        self.splitter.setSizes([190, 900, 400])
        self.study_list.hide()
        self.viewer_tab = viewer
        self.tabs.addTab(viewer, "Viewer")
        self.resize(1500, 940)

    def add_tab(self, widget: QWidget, title: str) -> int:
        """Add a panel as a tab beside the viewer (used for the batch and training panels)."""
        return self.tabs.addTab(widget, title)

    def _add_extra_tabs(self) -> None:
        for module, cls_name, title in EXTRA_TABS:
            try:
                mod = importlib.import_module(module)
            except ImportError as exc:
                if _mod_name(exc) == module:
                    continue
                self.show_message(f"The {title} panel could not be loaded: {exc}", "warning")
                continue
            try:
                self.add_tab(getattr(mod, cls_name)(self), title)
            except Exception as exc:  # a broken optional panel must not stop the viewer
                log.exception("building %s failed", cls_name)
                self.show_message(f"The {title} panel could not be built: {exc}", "warning")

    def _action(self, ident: str, text: str, slot: Any, checkable: bool = False) -> QAction:
        act = QAction(text, self)
        act.setObjectName(f"action_{ident}")
        key = next((k for i, k, _d in logic.SHORTCUTS if i == ident), None)
        if key:
            act.setShortcut(QKeySequence(key))
            act.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
        act.setCheckable(checkable)
        if checkable:
            act.toggled.connect(slot)
        else:
            act.triggered.connect(lambda _=False: slot())
        self.addAction(act)
        self.actions_by_id[ident] = act
        return act

    def _build_actions(self) -> None:
        self.actions_by_id: dict[str, QAction] = {}
        a = self._action
        mb = self.menuBar()
        m_file = mb.addMenu("&File")
        m_file.addAction(a("open_file", "&Open image…", self.open_file_dialog))
        m_file.addAction(a("open_folder", "Open &folder…", self.open_folder_dialog))
        self.recent_files_menu = QMenu("Recent cases", self)
        m_file.addMenu(self.recent_files_menu)
        m_file.addSeparator()
        m_file.addAction(a("export_dicom", "&Export result as DICOM…", self.export_dicom_dialog))
        m_file.addSeparator()
        m_file.addAction(a("quit", "&Quit", self.close))

        m_view = mb.addMenu("&View")
        m_view.addAction(a("fit", "&Fit", self.canvas.fit))
        m_view.addAction(a("one_to_one", "1:1", self.canvas.one_to_one))
        m_view.addAction(a("invert", "&Invert", lambda on: self.canvas.set_invert(on), checkable=True))
        m_view.addAction(a("reset_window", "&Reset window", self.reset_window))
        self.window_menu = QMenu("Window presets", self)
        m_view.addMenu(self.window_menu)
        for name in CT_PRESETS:
            m_view.addAction(a(f"preset_{name}", f"CT {name}", lambda n=name: self.apply_preset(n)))
        m_view.addSeparator()
        m_view.addAction(a("next_slice", "Next slice", lambda: self.canvas.step_frame(1)))
        m_view.addAction(a("prev_slice", "Previous slice", lambda: self.canvas.step_frame(-1)))
        m_view.addAction(a("next_case", "Next case", lambda: self.step_case(1)))
        m_view.addAction(a("prev_case", "Previous case", lambda: self.step_case(-1)))

        m_model = mb.addMenu("&Model")
        m_model.addAction(a("load_bundle", "&Load bundle…", self.load_bundle_dialog))
        self.recent_models_menu = QMenu("Recent models", self)
        m_model.addMenu(self.recent_models_menu)
        m_model.addAction(a("model_card", "Model &card…", self.show_model_card))
        m_model.addSeparator()
        m_model.addAction(a("compare", "Compare with &teacher", self.set_compare, checkable=True))
        m_model.addAction(
            a("saliency", "&Saliency overlay", self.saliency_panel.enabled.setChecked, checkable=True)
        )
        m_model.addAction(a("cancel", "Cancel running work", self.cancel_work))

        m_help = mb.addMenu("&Help")
        m_help.addAction(a("help", "&Keyboard shortcuts", self.show_help))
        m_help.addAction(
            a(
                "phi",
                "Show / hide PHI",
                lambda: self.tag_panel.set_phi_visible(not self.tag_panel.phi_visible),
            )
        )

    def _build_status(self) -> None:
        sb = self.statusBar()
        self.status_device = QLabel("CPU")
        self.status_model = QLabel("no model")
        self.status_timing = QLabel("")
        self.status_activity = QLabel("")
        self.status_activity.setObjectName("Dim")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setObjectName("CancelButton")
        self.cancel_button.hide()
        sb.addWidget(self.status_device)
        sb.addWidget(self.status_model)
        sb.addWidget(self.status_timing, 1)
        sb.addPermanentWidget(self.status_activity)
        sb.addPermanentWidget(self.cancel_button)
        self.status_device.setText(
            f"Device: CPU · {os.cpu_count() or 1} cores · {self.threads} thread(s) per job"
        )

    def _connect(self) -> None:
        c = self.canvas
        c.paths_dropped.connect(self._on_dropped)
        c.frame_changed.connect(self._on_frame_changed)
        c.window_changed.connect(lambda _w: self._update_window_menu())
        c.invert_changed.connect(self.actions_by_id["invert"].setChecked)
        self.slice_slider.valueChanged.connect(c.set_frame)
        self.study_list.case_activated.connect(self._on_case_activated)
        self.predictions.compare_toggled.connect(self.actions_by_id["compare"].setChecked)
        self.predictions.finding_chosen.connect(self.show_saliency_for)
        self.actions_by_id["compare"].toggled.connect(self.predictions.compare_box.setChecked)
        self.saliency_panel.enabled.toggled.connect(self.actions_by_id["saliency"].setChecked)
        self.saliency_panel.changed.connect(self.request_saliency)
        self.saliency_panel.style_changed.connect(self._apply_overlay_style)
        self.model_panel.load_requested.connect(self.load_bundle_dialog)
        self.model_panel.switch_requested.connect(self.load_bundle)
        self.model_panel.card_requested.connect(self.show_model_card)
        self.runner.activity.connect(self._on_activity)
        self.cancel_button.clicked.connect(self.cancel_work)
        self.message_bar.closed.connect(lambda: setattr(self, "last_error", ""))

    # ------------------------------------------------------------------------------------------------
    # Public API (used by panels, the CLI, render and tests)
    # ------------------------------------------------------------------------------------------------

    def open_path(self, path: str | os.PathLike) -> None:
        """Open a file, a CT series folder, or a folder of cases (shown in the study list)."""
        p = Path(path).expanduser()
        if not p.exists():
            self._show_load_error(f"Not found: {p}", p)
            return
        if p.is_dir():
            self.runner.submit(
                "cases",
                lambda t: logic.list_cases(p),
                lambda cases: self._on_cases(p, cases),
                lambda e: self._show_load_error(e.message, p, e.details),
                pool="io",
                description="scanning folder",
            )
        else:
            self._set_cases([], None)
            self._load_case(p)

    def load_bundle(self, path: str | os.PathLike) -> None:
        """Load a model bundle (folder or .zip) in the background and switch to it."""
        path = str(path)
        self._bundle_loading = path
        self.model_panel.set_loading(path)
        self.status_model.setText(f"loading {Path(path).name}…")
        self.runner.cancel("predict")
        self.runner.cancel("saliency")
        self.runner.submit(
            "bundle",
            lambda t: analysis.load_classifier(
                path, load_teacher=self.compare_enabled, warmup=self.warmup_models, token=t
            ),
            lambda clf: self._on_bundle(path, clf),
            lambda e: self._on_bundle_error(path, e),
            pool="model",
            description="loading model",
        )

    def current_bundle_path(self) -> str | None:
        return self.bundle_path

    def step_case(self, delta: int) -> None:
        """N / P: the next / previous case of the list; the status bar says why when there is none."""
        n = len(self.study_list.cases)
        row = self.study_list.list.currentRow()
        if n <= 1:
            self.statusBar().showMessage(
                ("Only one case is open" if n or self.study is not None else "No case is open")
                + ": N / P step through the cases of a folder or of several files (File ▸ Open folder)",
                6000,
            )
        elif (delta > 0 and row >= n - 1) or (delta < 0 and row <= 0):
            end, which = ("Last", "next") if delta > 0 else ("First", "previous")
            self.statusBar().showMessage(f"{end} case of {n}: no {which} case", 4000)
        else:
            self.study_list.step(delta)

    def show_message(self, text: str, level: str = "error", details: str | None = None) -> None:
        self.message_bar.show_message(text, level, details)
        if level == "error":
            self.last_error = text
            self.error_shown.emit(text)

    @property
    def compare_enabled(self) -> bool:
        return self.actions_by_id["compare"].isChecked()

    def set_compare(self, on: bool) -> None:
        if self.actions_by_id["compare"].isChecked() != on:
            self.actions_by_id["compare"].setChecked(on)
            return
        self.settings.setValue("view/compare", on)
        if self.classifier is not None and self.study is not None:
            if on and self.result is not None and self.result.comparison is not None:
                return
            self.request_analysis()

    def wait_idle(self, timeout_s: float = 60.0) -> bool:
        return self.runner.wait_idle(timeout_s)

    def cancel_work(self) -> None:
        self.runner.cancel()
        self.status_activity.setText("cancelled")

    def apply_preset(self, name: str) -> None:
        if self.study is None:
            return
        win = CT_PRESETS.get(name) or logic.window_presets(self.study).get(name)
        if win is not None:
            self.canvas.set_window(win)

    def reset_window(self) -> None:
        if self.study is not None:
            self.canvas.set_window(self.study.window)

    # ------------------------------------------------------------------------------------------------
    # Loading cases
    # ------------------------------------------------------------------------------------------------

    def _load_case(self, path: Path) -> None:
        self.runner.cancel("predict")
        self.runner.cancel("saliency")
        self.canvas.set_message(f"Loading {path.name}…")
        self.predictions.set_pending(f"Loading {path.name}…")
        self.runner.submit(
            "load",
            lambda t: analysis.load_for_display(path, t),
            lambda r: self._on_study(path, r[0], r[1]),
            lambda e: self._show_load_error(e.message, path, e.details),
            pool="io",
            description=f"loading {path.name}",
        )

    def _on_cases(self, folder: Path, cases: list[logic.Case]) -> None:
        if not cases:
            self._show_load_error(
                "This folder holds no image or DICOM series that kdviewer can read.", folder
            )
            return
        self._remember_recent("recent/files", str(folder))
        if len(cases) == 1 and cases[0].kind == "series":
            self._set_cases([], None)
            self._load_case(cases[0].path)
            return
        self._set_cases(cases, folder)
        self.study_list.select(0)

    def _set_cases(self, cases: list[logic.Case], folder: Path | None) -> None:
        self.cases = cases
        self.runner.cancel("thumbs")
        self.study_list.set_cases(cases, folder.name if folder else "")
        self.study_list.setVisible(bool(cases))
        if cases:
            self._request_thumbnails()

    def _request_thumbnails(self) -> None:
        cases = list(self.cases)

        def job(token: Any) -> list[tuple[int, Any]]:
            out = []
            for i, c in enumerate(cases[:200]):
                token.check()
                try:
                    out.append((i, analysis.thumbnail(c.path, 96, token)))
                except Cancelled:
                    raise
                except Exception:  # a bad file gets no thumbnail; opening it shows the error
                    continue
            return out

        def done(thumbs: list[tuple[int, Any]]) -> None:
            from kdviewer.gui.canvas import gray_qimage

            for i, arr in thumbs:
                self.study_list.set_thumbnail(i, gray_qimage(arr))

        self.runner.submit("thumbs", job, done, None, pool="io", description="thumbnails")

    def _on_case_activated(self, index: int) -> None:
        if 0 <= index < len(self.cases):
            self._load_case(self.cases[index].path)

    def _on_dropped(self, paths: list[str]) -> None:
        if paths:
            self.open_path(paths[0])

    def _on_study(self, path: Path, study: Study, display: Any = None) -> None:
        self.study = study
        self.study_path = path
        self.result = None
        self.saliency_result = None
        self._saliency_cache = {}
        self.timings = {"load": self.runner.last_seconds.get("load", 0.0)}
        self.canvas.set_study(study, display=display)
        self.request_analysis()  # first: the workers start while the widgets below are filled in
        self.actions_by_id["invert"].setChecked(False)
        self.tag_panel.set_study(study)
        n = study.n_frames
        self.slice_slider.blockSignals(True)
        self.slice_slider.setRange(0, max(0, n - 1))
        self.slice_slider.setValue(self.canvas.frame_index)
        self.slice_slider.blockSignals(False)
        self.slice_row.setVisible(n > 1)
        self._update_slice_label()
        self._update_window_menu()
        if self.message_bar.level in ("error", "warning", "info"):  # about the previous case: not this one
            self.message_bar.dismiss()
        if study.dropped:  # a finding on a dropped slice cannot be seen: a warning, not a note
            head = (f"{len(study.dropped)} of {study.n_found} slices could not be read and are left out; the "
                    "series answer cannot see a finding on them")
            details = "\n".join(f"{p}: {why}" for p, why in study.dropped)
            others = [n for n in study.notes if "could not be decoded and are left out" not in n]
            self.show_message("; ".join([head, *others]), "warning", details)
        elif study.notes:
            self.show_message("; ".join(study.notes), "info")
        self._remember_recent("recent/files", str(path)) if not self.cases else None
        self.setWindowTitle(path.name)  # Qt appends the application name ("… — kdviewer")
        self._update_banner()
        self._update_status()
        self.study_loaded.emit(study)

    def _show_load_error(self, message: str, path: Path, details: str | None = None) -> None:
        self.study = None
        self.study_path = None
        self.result = None
        self.saliency_result = None
        self.runner.cancel("predict")
        self.runner.cancel("saliency")
        # Our errors start with the path; the bar already names the file.
        for prefix in (f"{path}: ", f"{path.name}: "):
            if message.startswith(prefix):
                message = message[len(prefix) :]
        self.canvas.set_study(None)
        self.canvas.set_message(f"Could not open {path.name}\n\n{message}", error=True)
        self.tag_panel.set_study(None)
        self.predictions.clear("No case")
        self.saliency_panel.status.setText("")
        self.saliency_panel.set_agreement(None)
        self.timings = {}
        self._update_status()
        self.slice_row.hide()
        self.setWindowTitle("kdviewer")
        self.show_message(f"Could not open {path.name}: {message}", "error", details)
        self._update_banner()

    # ------------------------------------------------------------------------------------------------
    # Model + analysis
    # ------------------------------------------------------------------------------------------------

    def _on_bundle(self, path: str, clf: Any) -> None:
        self._bundle_loading = None
        old = self.classifier
        self.classifier = clf
        self.result = None  # the old model's answer: never exported under the new model's identity
        self.bundle_path = path
        self._saliency_cache = {}
        runtime = getattr(clf.student, "name", "")
        self.model_panel.set_bundle(clf.bundle, runtime)
        self.status_model.setText(f"Model: {clf.manifest.name} ({runtime})")
        self.saliency_panel.set_classes(list(clf.class_names), clf.has_teacher, clf.multi_label)
        self.predictions.compare_box.setEnabled(clf.has_teacher)
        self._remember_recent("recent/models", path)
        self.settings.setValue("model/last", path)
        self._refresh_recent_menus()
        self._update_banner()
        if old is not None and old is not clf:
            close = getattr(getattr(old, "bundle", None), "close", None)
            if close is not None:
                QTimer.singleShot(0, close)
        self.bundle_loaded.emit(clf)
        if self.study is not None:
            self.request_analysis()
        if self.warmup_models:  # torch + grad-cam for saliency and the teacher, after the first answer
            self.runner.submit(
                "warm",
                lambda t: analysis.warm_torch(clf, t),
                lambda _r: None,
                lambda e: log.warning("preparing saliency failed: %s", e.message),
                pool="saliency",
                description="preparing saliency",
            )

    def _on_bundle_error(self, path: str, err: TaskError) -> None:
        self._bundle_loading = None
        self.model_panel.set_bundle(
            self.classifier.bundle if self.classifier else None, error=f"Could not load {Path(path).name}"
        )
        self.status_model.setText(
            f"Model: {self.classifier.manifest.name}" if self.classifier else "no model"
        )
        self.show_message(
            f"Could not load the model bundle {Path(path).name}: {err.message}", "error", err.details
        )

    def request_analysis(self) -> None:
        """(Re)classify the current study with the current model; supersedes any running request."""
        if self.study is None:
            return
        if self.classifier is None:
            if self._bundle_loading:
                self.predictions.set_pending(f"Loading the model {Path(self._bundle_loading).name}…")
            else:
                self.predictions.clear("No model loaded — load a bundle to classify (Ctrl+M)")
            return
        study, clf, compare = self.study, self.classifier, self.compare_enabled
        self.predictions.set_pending("Analysing…" if not compare else "Analysing (student + teacher)…")
        self.runner.submit(
            "predict",
            lambda t: analysis.analyse(clf, study, compare, t),
            lambda r: self._on_analysis(study, r),
            self._on_analysis_error,
            description="classifying",
        )
        self.request_saliency()

    def _on_analysis(self, study: Study, result: analysis.AnalysisResult) -> None:
        if study is not self.study:
            return
        self.result = result
        self.predictions.show_result(result.prediction, result.comparison, self.canvas.frame_index)
        t = result.prediction.timings
        self.timings["student"] = t.get("inference_ms", 0.0) / 1000
        self.timings["preprocess"] = t.get("preprocess_ms", 0.0) / 1000
        if result.comparison is not None:
            self.timings["teacher"] = result.comparison.teacher.timings.get("inference_ms", 0.0) / 1000
        else:
            self.timings.pop("teacher", None)
        self._update_status()
        self._update_banner()
        self.analysis_shown.emit(result)

    def _on_analysis_error(self, err: TaskError) -> None:
        self.predictions.set_error(err.message)
        self.show_message(f"Classification failed: {err.message}", "error", err.details)

    def show_saliency_for(self, index: int) -> None:
        """A finding's name was clicked in the predictions panel: its saliency map, overlay on."""
        panel = self.saliency_panel
        k = panel.target.findData(int(index))
        if k < 0:
            return
        panel.target.setCurrentIndex(k)  # emits `changed` -> request_saliency when the overlay is on
        if not panel.is_on():
            panel.enabled.setChecked(True)

    def request_saliency(self) -> None:
        panel = self.saliency_panel
        self.settings.setValue("saliency/enabled", panel.is_on())
        self.settings.setValue("saliency/method", panel.method_name())
        self.settings.setValue("saliency/mode", panel.mode())
        self.runner.cancel("saliency_agree")
        if not panel.is_on() or self.study is None or self.classifier is None:
            self.runner.cancel("saliency")
            self.saliency_result = None
            self.canvas.set_panes([Pane()])
            panel.status.setText("")
            panel.set_agreement(None)
            return
        clf, study = self.classifier, self.study
        reason = clf.refusal(study)
        if reason is not None:  # the modality gate: no class, so no map of a class either
            self.runner.cancel("saliency")
            self.saliency_result = None
            self.canvas.set_panes([Pane()])
            panel.status.setText(f"No saliency map: the model gives no class for this image ({reason}).")
            panel.set_agreement(None)
            return
        mode = panel.mode()
        # Only the maps on screen are computed first; the other model's map (for the agreement score)
        # follows in a second job so the overlay appears as early as possible.
        roles = {"student": ["student"], "teacher": ["teacher"], "side": ["student", "teacher"]}[mode]
        if not clf.has_teacher:
            roles = ["student"]
        method, target, frame = panel.method_name(), panel.target_class(), self.canvas.frame_index
        cache = self._saliency_cache
        panel.status.setText(f"Computing {method}…")
        self.runner.submit(
            "saliency",
            lambda t: analysis.compute_saliency(clf, study, method, target, roles, frame, t, cache),
            lambda r: self._on_saliency(study, r),
            self._on_saliency_error,
            pool="saliency",
            description=f"saliency ({method})",
        )

    def _panes_for(self, res: analysis.SaliencyResult) -> list[Pane]:
        mode = self.saliency_panel.mode()
        method = res.method

        def caption(role: str) -> str:
            cls = getattr(res.maps[role], "class_name", "")
            return f"{method} → {cls}" if cls else method

        if mode == "side" and "teacher" in res.maps:
            return [
                Pane("Student", analysis.heatmap_of(res.maps["student"]), caption("student")),
                Pane("Teacher", analysis.heatmap_of(res.maps["teacher"]), caption("teacher")),
            ]
        role = "teacher" if mode == "teacher" and "teacher" in res.maps else "student"
        return [Pane(role.capitalize(), analysis.heatmap_of(res.maps[role]), caption(role))]

    def _on_saliency(self, study: Study, res: analysis.SaliencyResult) -> None:
        if study is not self.study or res.frame != self.canvas.frame_index or not self.saliency_panel.is_on():
            return
        self.saliency_result = res
        self._apply_overlay_style()
        self.canvas.set_panes(self._panes_for(res))
        self.timings["saliency"] = res.seconds
        if res.agreement is not None:
            self.saliency_panel.set_agreement(res.agreement)
        else:
            self.saliency_panel.set_agreement(None, "compare with the teacher or choose side by side")
        classes = {r: getattr(m, "class_name", "") for r, m in res.maps.items()}
        if len(set(classes.values())) > 1:
            status = f"{res.method}: " + ", ".join(f"{r} → '{c}'" for r, c in classes.items())
        else:
            cls = next(iter(classes.values()), "")
            status = f"{res.method} for class '{cls}'" if cls else res.method
        if study.n_frames > 1:
            status += f" · slice {res.frame + 1}"
        empty = [r for r, m in res.maps.items() if float(analysis.heatmap_of(m).max()) <= 0.0]
        if empty:
            which = " and ".join(empty) + (" maps are" if len(empty) > 1 else " map is")
            status += f" · the {which} empty (no positive evidence for this class; try another method)"
        self.saliency_panel.status.setText(status)
        self._update_status()
        self.saliency_shown.emit(res)
        if res.agreement is None and self.compare_enabled and self.classifier is not None:
            self._request_saliency_agreement(study, res)

    def _request_saliency_agreement(self, study: Study, res: analysis.SaliencyResult) -> None:
        """The other model's map on the same frame, only to report how much the two maps agree."""
        clf, cache = self.classifier, self._saliency_cache
        if not clf.has_teacher:
            return
        method, target, frame = res.method, res.target, res.frame
        self.saliency_panel.set_agreement(None, "computing…")

        def done(full: analysis.SaliencyResult) -> None:
            if study is self.study and full.frame == self.canvas.frame_index and full.method == method:
                self.saliency_panel.set_agreement(full.agreement)

        self.runner.submit(
            "saliency_agree",
            lambda t: analysis.compute_saliency(
                clf, study, method, target, ["student", "teacher"], frame, t, cache
            ),
            done,
            lambda e: self.saliency_panel.set_agreement(None, f"not available ({e.message})"),
            pool="saliency",
            description="saliency agreement",
        )

    def _on_saliency_error(self, err: TaskError) -> None:
        self.saliency_panel.status.setText(f"Saliency failed: {err.message}")
        self.show_message(f"Saliency failed: {err.message}", "warning", err.details)

    def _apply_overlay_style(self) -> None:
        panel = self.saliency_panel
        self.canvas.set_overlay_style(panel.opacity_value(), panel.cmap_name())
        self.settings.setValue("saliency/opacity", panel.opacity.value())
        self.settings.setValue("saliency/cmap", panel.cmap_name())

    def _on_frame_changed(self, index: int) -> None:
        self.slice_slider.blockSignals(True)
        self.slice_slider.setValue(index)
        self.slice_slider.blockSignals(False)
        self._update_slice_label()
        self.predictions.set_frame(index)
        if self.saliency_panel.is_on():
            self.request_saliency()

    # ------------------------------------------------------------------------------------------------
    # Dialogs
    # ------------------------------------------------------------------------------------------------

    def _start_dir(self, key: str) -> str:
        return str(self.settings.value(key, "") or Path.home())

    def open_file_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self,
            "Open image",
            self._start_dir("dialogs/open_dir"),
            "Images (*.dcm *.dicom *.png *.jpg *.jpeg *.tif *.tiff);;All files (*)",
        )
        if path:
            self.settings.setValue("dialogs/open_dir", str(Path(path).parent))
            self.open_path(path)

    def open_folder_dialog(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open folder", self._start_dir("dialogs/open_dir"))
        if path:
            self.settings.setValue("dialogs/open_dir", path)
            self.open_path(path)

    def export_dicom_dialog(self) -> None:
        if self._export_blocked():
            return
        path = QFileDialog.getExistingDirectory(
            self, "Export result as DICOM (Structured Report + Secondary Capture) into…",
            self._start_dir("dialogs/dicom_dir"),
        )
        if path:
            self.settings.setValue("dialogs/dicom_dir", path)
            self.export_dicom(path)

    def _export_blocked(self) -> bool:
        if self.study is None or self.classifier is None or self.result is None:
            self.show_message("Open a case and wait for the model's answer before exporting it as DICOM.",
                              "warning")
            return True
        return False

    def export_dicom(self, out_dir: str | os.PathLike) -> None:
        """Write the current result as a DICOM SR + SC into ``out_dir`` (in a worker; the same objects as
        ``kdviewer predict CASE --dicom-out DIR``)."""
        if self._export_blocked():
            return
        clf, study, result, case = self.classifier, self.study, self.result, self.study_path
        self.runner.submit(
            "dicom_export",
            lambda t: analysis.export_dicom(clf, study, result, Path(out_dir), case, t),
            self._on_dicom_exported,
            lambda e: self.show_message(f"DICOM export failed: {e.message}", "error", e.details),
            pool="saliency",
            description="exporting DICOM",
        )

    def _on_dicom_exported(self, done: Any) -> None:
        self.show_message(
            f"Exported as DICOM: {done.sr_path.name} (Structured Report) and {done.sc_path.name} "
            f"(Secondary Capture) in {done.sr_path.parent}", "info",
        )
        self.dicom_exported.emit(done)

    def load_bundle_dialog(self) -> None:
        dlg = QFileDialog(
            self,
            "Load model bundle (a folder with manifest.json, or a .zip)",
            self._start_dir("dialogs/bundle_dir"),
        )
        dlg.setNameFilters(["Model bundles (manifest.json *.zip)", "All files (*)"])
        dlg.setFileMode(QFileDialog.FileMode.ExistingFile)
        if dlg.exec():
            files = dlg.selectedFiles()
            if files:
                p = Path(files[0])
                target = p.parent if p.name == "manifest.json" else p
                self.settings.setValue("dialogs/bundle_dir", str(target.parent))
                self.load_bundle(target)

    def model_card_html(self) -> str:
        if self.classifier is None:
            return "<p>No model loaded.</p>"
        return bundle_card_html(self.classifier.bundle)

    def show_model_card(self) -> ModelCardDialog | None:
        if self.classifier is None:
            self.show_message("No model loaded: load a bundle first (Ctrl+M).", "info")
            return None
        dlg = ModelCardDialog(self.model_card_html(), self.classifier.manifest.name, self)
        dlg.setModal(False)
        dlg.show()
        self._card_dialog = dlg
        return dlg

    def show_help(self) -> ShortcutHelp:
        dlg = ShortcutHelp(self)
        dlg.setModal(False)
        dlg.show()
        self._help_dialog = dlg
        return dlg

    # ------------------------------------------------------------------------------------------------
    # Status, banner, menus, settings
    # ------------------------------------------------------------------------------------------------

    def _update_slice_label(self) -> None:
        if self.study is not None and self.study.n_frames > 1:
            self.slice_label.setText(f"{self.canvas.frame_index + 1} / {self.study.n_frames}")

    def _update_window_menu(self) -> None:
        self.window_menu.clear()
        if self.study is None:
            return
        for name, win in logic.window_presets(self.study).items():
            act = self.window_menu.addAction(f"{name}  ({logic.format_window(win)})")
            act.triggered.connect(lambda _=False, w=win: self.canvas.set_window(w))

    def _update_status(self) -> None:
        parts = []
        for key, label in (
            ("load", "open"),
            ("preprocess", "preprocess"),
            ("student", "student"),
            ("teacher", "teacher"),
            ("saliency", "saliency"),
        ):
            if key in self.timings:
                parts.append(f"{label} {logic.format_ms(self.timings[key])}")
        self.status_timing.setText("  ·  ".join(parts))

    def _update_banner(self) -> None:
        m = self.classifier.manifest if self.classifier is not None else None
        self.banner.set_flags(
            model_loaded=m is not None,
            demo=bool(m and m.demo),
            synthetic_model=bool(m and m.synthetic_data),
            synthetic_image=bool(self.study is not None and logic.is_synthetic(self.study)),
        )

    def _on_activity(self, text: str) -> None:
        self.status_activity.setText(f"{text}…" if text else "")
        self.cancel_button.setVisible(bool(text) and text != "thumbnails")

    def _remember_recent(self, key: str, value: str) -> None:
        items = self.settings.value(key, []) or []
        if isinstance(items, str):
            items = [items]
        self.settings.setValue(key, logic.push_recent(items, value, MAX_RECENT))
        self._refresh_recent_menus()

    def recent(self, key: str) -> list[str]:
        items = self.settings.value(key, []) or []
        return [items] if isinstance(items, str) else list(items)

    def _refresh_recent_menus(self) -> None:
        self.recent_files_menu.clear()
        for p in self.recent("recent/files"):
            act = self.recent_files_menu.addAction(p)
            act.triggered.connect(lambda _=False, q=p: self.open_path(q))
        self.recent_models_menu.clear()
        models = self.recent("recent/models")
        for p in models:
            act = self.recent_models_menu.addAction(p)
            act.triggered.connect(lambda _=False, q=p: self.load_bundle(q))
        self.model_panel.set_recent(models, self.bundle_path)

    def _restore_settings(self) -> None:
        s = self.settings
        # Read everything first: applying a value fires signals that write settings back.
        geo, split = s.value("window/geometry"), s.value("window/splitter")
        method, cmap, opacity = (
            s.value("saliency/method"),
            s.value("saliency/cmap"),
            s.value("saliency/opacity"),
        )
        mode = s.value("saliency/mode")
        enabled = _as_bool(s.value("saliency/enabled", False))
        compare = _as_bool(s.value("view/compare", False))
        if isinstance(geo, QByteArray):
            self.restoreGeometry(geo)
        if isinstance(split, QByteArray):
            self.splitter.restoreState(split)
        panel = self.saliency_panel
        if method and panel.method.findText(str(method)) >= 0:
            panel.method.setCurrentText(str(method))
        if cmap and panel.cmap.findText(str(cmap)) >= 0:
            panel.cmap.setCurrentText(str(cmap))
        if opacity is not None:
            panel.opacity.setValue(int(opacity))
        if mode:
            panel.set_mode(str(mode))
        panel.enabled.setChecked(enabled)
        self.actions_by_id["compare"].setChecked(compare)
        self.save_settings(geometry=False)

    def save_settings(self, geometry: bool = True) -> None:
        s = self.settings
        if geometry:
            s.setValue("window/geometry", self.saveGeometry())
            s.setValue("window/splitter", self.splitter.saveState())
        s.setValue("view/compare", self.compare_enabled)
        s.setValue("saliency/enabled", self.saliency_panel.is_on())
        s.setValue("saliency/method", self.saliency_panel.method_name())
        s.setValue("saliency/cmap", self.saliency_panel.cmap_name())
        s.setValue("saliency/opacity", self.saliency_panel.opacity.value())
        s.setValue("saliency/mode", self.saliency_panel.mode())
        s.sync()

    def closeEvent(self, event: QCloseEvent) -> None:
        # A running training or batch job asks first (its panel stops it gracefully on "yes").
        for i in range(self.tabs.count()):
            panel = self.tabs.widget(i)
            if hasattr(panel, "confirm_close") and not panel.confirm_close():
                event.ignore()
                return
        self.save_settings()
        self.runner.shutdown(3000)
        super().closeEvent(event)

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:
        paths = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if paths:
            event.acceptProposedAction()
            self._on_dropped(paths)

    def grab_image(self) -> QImage:
        return self.grab().toImage()


class _FitWidthScrollArea(QScrollArea):
    """A vertical-only scroll area whose content always takes exactly the viewport's width."""

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        w = self.widget()
        if w is not None:
            w.setFixedWidth(self.viewport().width())


def default_settings() -> QSettings:
    """The user's kdviewer settings (QSettings.setDefaultFormat / setPath redirect them, e.g. in tests)."""
    return QSettings(QSettings.defaultFormat(), QSettings.Scope.UserScope, "kdviewer", "kdviewer")


def _as_bool(v: object) -> bool:
    if isinstance(v, str):
        return v.lower() in ("1", "true", "yes", "on")
    return bool(v)
