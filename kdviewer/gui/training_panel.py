"""The training panel: a form over the engine's config, a live view of a run, its report and history.

The engine runs as a separate process (``python -m training run CONFIG --events -``, see
`kdviewer.gui.training_process`); this panel only writes the YAML config, starts/stops that process and
draws the JSON-lines events it prints (`kdviewer.events`). It knows nothing about how training works
and never imports ``training`` or torch. Nothing here blocks the Qt event loop: validation, device
discovery and the run itself are all asynchronous subprocesses.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from PySide6.QtCore import QEventLoop, Qt, QTimer, Signal
from PySide6.QtGui import QFont, QTextCursor
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from kdviewer.gui.run_history import RunHistoryWidget, RunRecord, load_events
from kdviewer.gui.training_curves import TrainingCurves
from kdviewer.gui.training_form import TrainingForm, get_path, load_presets
from kdviewer.gui.training_process import ConfigCheck, DeviceProbe, EngineProcess
from kdviewer.gui.training_report import TrainingReport

PANEL_CONFIG_NAME = "panel_config.yaml"


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "–"
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


class TrainingPanel(QWidget):
    """Launch a distillation run, watch it live, read its report, reopen past runs.

    ``open_bundle(path)`` is called by "Open in viewer"; ``open_case`` is accepted for symmetry with
    the batch panel. ``state`` is one of idle | checking | running | stopping.
    """

    state_changed = Signal(str)
    run_finished = Signal(str, object)  # outcome ("finished" | "stopped" | "failed"), bundle path or None

    def __init__(
        self,
        open_case: Callable[[str], None] | QWidget | None = None,
        open_bundle: Callable[[str], None] | None = None,
        parent: QWidget | None = None,
        *,
        probe_devices: bool = True,
    ) -> None:
        if isinstance(open_case, QWidget):  # built as Panel(main_window): use its public API
            parent, window = open_case, open_case
            open_case = getattr(window, "open_path", None)
            open_bundle = open_bundle or getattr(window, "load_bundle", None)
        super().__init__(parent)
        self.open_case = open_case
        self.open_bundle = open_bundle
        self.state = "idle"
        self.events: list[dict[str, Any]] = []
        self.config_path: Path | None = None
        self.run_dir: Path | None = None
        self.last_checkpoint: str | None = None
        self.bundle_path: str | None = None
        self.outcome: str | None = None
        self._pending_resume = False
        self._stage_totals: dict[str, int] = {}
        self._stage_order: list[str] = []
        self._stage_epochs: dict[str, int] = {}
        self._total_steps = 0
        self._gpu_total_mb: float | None = None  # the run's GPU memory (from run_start), for the label
        self._run_started = 0.0
        self._written_config: dict[str, Any] | None = None
        self._start_after_check = False
        self._preset_folders: dict[str, str] = {}  # data/output folders as the last recipe set them

        self.engine = EngineProcess(self)
        self.engine.event.connect(self._on_event)
        self.engine.output.connect(lambda line: self._log(line))
        self.engine.stderr.connect(lambda line: self._log(line, kind="stderr"))
        self.engine.finished.connect(self._on_finished)
        self.checker = ConfigCheck(self)
        self.checker.checked.connect(self._on_checked)

        # -- left: presets + form + buttons --------------------------------------------------------
        self.form = TrainingForm()
        self.presets = load_presets()
        self.preset_combo = QComboBox()
        self.preset_combo.addItem("(choose a recipe)", None)
        for name in self.presets:
            self.preset_combo.addItem(name, name)
        self.preset_combo.activated.connect(self._preset_chosen)
        self.preset_combo.setToolTip("Recipes of the seed papers (training/recipes/*.yaml)")
        preset_row = QHBoxLayout()
        preset_row.addWidget(QLabel("Preset"))
        preset_row.addWidget(self.preset_combo, 1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.form)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.check_button = QPushButton("Check")
        self.check_button.setToolTip("Validate the settings with the engine (nothing is trained)")
        self.start_button = QPushButton("Start")
        self.start_button.setDefault(True)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Finish the current step, save a checkpoint and stop")
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("Continue the last run from its checkpoint")
        self.check_button.clicked.connect(self.check)
        self.start_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        self.resume_button.clicked.connect(self.resume)
        buttons = QHBoxLayout()
        for b in (self.check_button, self.start_button, self.stop_button, self.resume_button):
            buttons.addWidget(b)
        self.form_status = QLabel("")
        self.form_status.setWordWrap(True)
        left = QWidget()
        lv = QVBoxLayout(left)
        lv.addLayout(preset_row)
        lv.addWidget(scroll, 1)
        lv.addWidget(self.form_status)
        lv.addLayout(buttons)

        # -- right: live / report / history tabs ---------------------------------------------------
        self.banner = QLabel("")
        self.banner.setWordWrap(True)
        self.banner.setVisible(False)
        self.banner.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.stage_label = QLabel("No run yet.")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("%p%")
        self.eta_label = QLabel("ETA –")
        self.rate_label = QLabel("– images/s")
        self.device_label = QLabel("device –")
        self.gpu_label = QLabel("")
        stats = QHBoxLayout()
        for w in (self.stage_label, self.eta_label, self.rate_label, self.device_label, self.gpu_label):
            stats.addWidget(w)
        stats.addStretch(1)
        self.curves = TrainingCurves()
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(5000)
        self.log_view.setFont(QFont("monospace", 9))
        live_split = QSplitter(Qt.Orientation.Vertical)
        live_split.addWidget(self.curves)
        live_split.addWidget(self.log_view)
        live_split.setStretchFactor(0, 4)
        live_split.setStretchFactor(1, 1)
        live = QWidget()
        lv2 = QVBoxLayout(live)
        lv2.addWidget(self.banner)
        lv2.addLayout(stats)
        lv2.addWidget(self.progress)
        lv2.addWidget(live_split, 1)
        self.report = TrainingReport(open_bundle=self._open_bundle_clicked)
        self.history = RunHistoryWidget()
        self.history.open_requested.connect(self.open_run)
        self.history.resume_requested.connect(self.resume_run)
        self.tabs = QTabWidget()
        self.tabs.addTab(live, "Live")
        self.tabs.addTab(self.report, "Report")
        self.tabs.addTab(self.history, "History")
        self.tabs.currentChanged.connect(self._tab_changed)

        # The form must be readable without horizontal scrolling: the left pane is at least its width.
        left.setMinimumWidth(
            self.form.sizeHint().width() + scroll.verticalScrollBar().sizeHint().width() + 24
        )
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(left)
        split.addWidget(self.tabs)
        split.setStretchFactor(0, 2)
        split.setStretchFactor(1, 5)
        split.setSizes([440, 1100])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(split)

        self.form.output_dir.changed.connect(self._output_changed)
        self._history_timer = QTimer(self)
        self._history_timer.setSingleShot(True)
        self._history_timer.setInterval(600)
        self._history_timer.timeout.connect(
            lambda: self.history.set_root(self.form.output_dir.text() or None)
        )
        self.device_probe: DeviceProbe | None = None
        if probe_devices:
            self.device_probe = DeviceProbe(self)
            self.device_probe.found.connect(self.form.set_devices)
            self.device_probe.start()
        self._set_state("idle")

    # -- state ---------------------------------------------------------------------------------------
    def is_running(self) -> bool:
        return self.engine.is_running()

    def _set_state(self, state: str) -> None:
        self.state = state
        busy = state in ("running", "stopping")
        self.form.set_editable(state == "idle")
        self.preset_combo.setEnabled(state == "idle")
        self.check_button.setEnabled(state == "idle")
        self.start_button.setEnabled(state == "idle")
        self.stop_button.setEnabled(state == "running")
        self.resume_button.setEnabled(state == "idle" and self._can_resume())
        self.history.setEnabled(not busy)
        self.state_changed.emit(state)

    def _can_resume(self) -> bool:
        return (
            self.config_path is not None
            and self.config_path.is_file()
            and self.outcome in ("stopped", "failed")
            and bool(self.last_checkpoint)
        )

    # -- presets / form ------------------------------------------------------------------------------
    def _preset_chosen(self, index: int) -> None:
        name = self.preset_combo.itemData(index)
        if name and name in self.presets:
            # Folders the user chose are kept across recipes; folders that came from the previous recipe
            # follow the new one (the output folder stayed runs/pneumoniamnist after choosing 002).
            keep = {
                "data": self.form.data_path.text(),
                "out": self.form.output_dir.text(),
            }
            from_preset = self._preset_folders
            self.form.load_config(copy.deepcopy(self.presets[name][1]))
            if keep["data"] and keep["data"] != from_preset.get("data"):
                self.form.data_path.setText(keep["data"])
            if keep["out"] and keep["out"] != from_preset.get("out"):
                self.form.output_dir.setText(keep["out"])
            self._preset_folders = {"data": self.form.data_path.text(), "out": self.form.output_dir.text()}
            self.form_status.setText(f"Loaded recipe {self.presets[name][0].name}.")

    def load_preset(self, stem: str) -> bool:
        """Select the recipe whose file stem is ``stem`` (e.g. "tiny"); False when there is none."""
        for i in range(self.preset_combo.count()):
            name = self.preset_combo.itemData(i)
            if name and self.presets[name][0].stem == stem:
                self.preset_combo.setCurrentIndex(i)
                self._preset_chosen(i)
                return True
        return False

    def _output_changed(self) -> None:
        self._history_timer.start()

    def _tab_changed(self, index: int) -> None:
        if self.tabs.widget(index) is self.history and self.state == "idle":
            self.history.set_root(self.form.output_dir.text() or None)

    # -- validation and start ------------------------------------------------------------------------
    def write_config(self) -> Path:
        """Write the form's config as ``<run folder>/panel_config.yaml`` (the history finds it there).

        A fresh start never reuses a folder that already holds a run: the run name gets a suffix.
        """
        base_name = self.form.run_name.text().strip()
        run_dir = self.form.run_dir()
        assert run_dir is not None
        n = 2
        while (run_dir / "events.jsonl").exists() or (run_dir / PANEL_CONFIG_NAME).exists():
            self.form.run_name.setText(f"{base_name}-{n}")
            run_dir = self.form.run_dir()
            assert run_dir is not None
            n += 1
        cfg = self.form.config()
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / PANEL_CONFIG_NAME
        path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        self._written_config = cfg
        return path

    def check(self) -> None:
        """Validate with the engine without starting (messages appear next to the fields)."""
        self._validate(start_after=False)

    def start(self) -> None:
        """Validate, then start a fresh run if the engine accepts the config."""
        self._validate(start_after=True)

    def _validate(self, *, start_after: bool) -> None:
        if self.state != "idle":
            return
        local = self.form.local_errors()
        if local:
            self.form.show_errors(local)
            self.form_status.setText("Fix the highlighted fields first.")
            return
        self.form.clear_errors()
        try:
            self.config_path = self.write_config()
        except OSError as exc:
            self.form.show_errors([{"loc": ["output", "dir"], "msg": f"cannot write there: {exc}"}])
            return
        self._start_after_check = start_after
        self.form_status.setText("Checking the settings with the engine…")
        self._set_state("checking")
        self.checker.start(self.config_path)

    def _on_checked(self, ok: bool, errors: list) -> None:
        self._set_state("idle")
        if not ok:
            self.form.show_data_summary(self.checker.summary)  # e.g. the labels found when none matched
            placed = self.form.show_errors(errors, self._written_config)
            n = len(errors)
            self.form_status.setText(
                f"The engine found {n} problem{'s' if n != 1 else ''}"
                + (" — see the highlighted fields." if placed else ".")
            )
            return
        self.form.clear_errors()
        self.form.show_data_summary(self.checker.summary)
        counts = self.checker.summary.get("counts") or {}
        classes = ", ".join(self.checker.summary.get("classes") or [])
        found = (
            f" Data: {classes} — {counts.get('train', 0)} train / {counts.get('val', 0)} val / "
            f"{counts.get('test', 0)} test images."
            if counts else ""
        )
        self.form_status.setText("Settings are valid." + found)
        if self._start_after_check and self.config_path is not None:
            self._launch(self.config_path, resume=False)

    def _launch(self, config_path: Path, *, resume: bool) -> None:
        self.config_path = Path(config_path)
        cfg = _read_yaml(self.config_path)
        out = get_path(cfg, ("output", "dir"))
        guess = Path(out) if out else self.config_path.parent
        if not resume:
            self._reset_live()
            self.outcome = None
        else:
            self.banner.setVisible(False)
            self._log(f"--- resuming from the last checkpoint of {self.run_dir or guess} ---", kind="info")
        self._pending_resume = resume
        argv = self.engine.start(self.config_path, resume=resume, output_dir=self.run_dir or guess)
        self._run_started = time.monotonic()
        self._log("$ " + " ".join(argv), kind="info")
        self.stage_label.setText("Starting the engine…")
        self.tabs.setCurrentIndex(0)
        self._set_state("running")

    def stop(self) -> None:
        """Graceful stop: the engine finishes its step, writes a checkpoint and exits."""
        if self.state != "running":
            return
        self.engine.stop()
        self._log("Stop requested: finishing the current step and saving a checkpoint…", kind="info")
        self.stage_label.setText("Stopping after this step…")
        self._set_state("stopping")

    def resume(self) -> None:
        """Rerun the last config with --resume (continues from its checkpoint)."""
        if self.state != "idle" or not self._can_resume() or self.config_path is None:
            return
        self._launch(self.config_path, resume=True)

    def resume_run(self, rec: RunRecord) -> None:
        """Resume a run from the history list."""
        if self.state != "idle" or rec.config_path is None:
            return
        self.open_run(rec)
        self.run_dir = rec.path
        self.config_path = rec.config_path
        self._launch(rec.config_path, resume=True)

    # -- closing -------------------------------------------------------------------------------------
    def confirm_close(self, wait_s: float = 120.0) -> bool:
        """For the main window's closeEvent: True when it is fine to close.

        While a run is active, asks; on "Stop and close" it stops the run gracefully (checkpoint kept,
        resumable later) and waits for the engine to exit, keeping the event loop alive.
        """
        if not self.is_running():
            self._end_helpers()
            return True
        answer = QMessageBox.question(
            self,
            "Training is running",
            "A training run is still active.\n\nStop it (the engine saves a checkpoint you can resume "
            "later) and close?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel,
            QMessageBox.StandardButton.Cancel,
        )
        if answer != QMessageBox.StandardButton.Yes:
            return False
        self.shutdown(wait_s)
        return True

    def _end_helpers(self) -> None:
        """End the short helper processes (device probe, config check) if they are still going."""
        if self.device_probe is not None:
            self.device_probe.kill()
        self.checker.kill()

    def shutdown(self, wait_s: float = 120.0) -> None:
        """Stop any active run and wait (event loop alive) up to ``wait_s`` before killing it."""
        self._end_helpers()
        if not self.is_running():
            return
        if self.state == "running":
            self.stop()
        loop = QEventLoop()
        self.engine.finished.connect(loop.quit)
        QTimer.singleShot(int(wait_s * 1000), loop.quit)
        if self.is_running():
            loop.exec()
        if self.is_running():
            self.engine.kill()

    # -- events --------------------------------------------------------------------------------------
    def _reset_live(self) -> None:
        self.events = []
        self.curves.reset()
        self.report.clear()
        self.log_view.clear()
        self.banner.setVisible(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("%p%")
        self.stage_label.setText("No run yet.")
        for lbl, text in (
            (self.eta_label, "ETA –"),
            (self.rate_label, "– images/s"),
            (self.device_label, "device –"),
            (self.gpu_label, ""),
        ):
            lbl.setText(text)
        self._stage_totals, self._stage_order, self._stage_epochs = {}, [], {}
        self._total_steps = 0
        self._gpu_total_mb = None
        self.last_checkpoint = None
        self.bundle_path = None
        self.run_dir = None

    def _on_event(self, ev: dict[str, Any]) -> None:
        self.events.append(ev)
        self.apply_event(ev, live=True)

    def apply_event(self, ev: dict[str, Any], *, live: bool = False) -> None:
        """Draw one event (live or replayed from a log)."""
        kind = ev.get("event")
        self.curves.handle_event(ev)
        if kind == "run_start":
            if ev.get("output_dir"):
                self.run_dir = Path(ev["output_dir"])
            self._total_steps = int(ev.get("total_steps") or 0)
            dev = ev.get("device") or "?"
            amp = ev.get("amp")
            ws = ev.get("world_size") or 1
            gpu = ev.get("gpu") if isinstance(ev.get("gpu"), dict) else {}
            total = gpu.get("memory_mb")
            self._gpu_total_mb = float(total) if isinstance(total, (int, float)) and total > 0 else None
            self.device_label.setText(
                f"device {dev}"
                + (f" ({gpu['name']})" if gpu.get("name") else "")
                + (f" · AMP {amp}" if amp else "")
                + (f" · {ws} processes" if ws and ws > 1 else "")
            )
            ds = ev.get("dataset") or {}
            if isinstance(ds, dict) and ds:
                classes = ds.get("classes") or []
                self._log(
                    f"data: train {ds.get('train')}, val {ds.get('val')}, test {ds.get('test')}; "
                    f"classes {', '.join(map(str, classes))}",
                    kind="info",
                )
            if ev.get("resumed_from"):
                self._log(f"resumed from {ev['resumed_from']}", kind="info")
            if ev.get("synthetic"):
                self._log("training on SYNTHETIC data", kind="info")
            if self._total_steps:
                self.progress.setRange(0, self._total_steps)
        elif kind == "stage_start" and ev.get("substages"):
            self._on_substage_stage(ev)
        elif kind == "progress":
            self._on_substage(ev)
        elif kind == "stage_end":
            self._on_stage_end(ev)
        elif kind == "stage_start":
            stage = str(ev.get("stage") or "stage")
            epochs = int(ev.get("epochs") or 0)
            spe = int(ev.get("steps_per_epoch") or 0)
            if stage not in self._stage_order:
                self._stage_order.append(stage)
            self._stage_totals[stage] = epochs * spe
            self._stage_epochs[stage] = epochs
            if not self._total_steps:
                self.progress.setRange(0, max(1, sum(self._stage_totals.values())))
            self.stage_label.setText(f"{stage}: starting ({epochs} epochs × {spe} steps)")
            self._log(f"stage {stage}: {epochs} epochs × {spe} steps", kind="info")
        elif kind == "step":
            self._on_step(ev)
        elif kind == "epoch_end":
            val = ev.get("val") or {}
            parts = [f"{k} {v:.4f}" for k, v in val.items() if isinstance(v, (int, float))][:5]
            best = " (best)" if ev.get("best") else ""
            self._log(f"[{ev.get('stage')}] epoch {ev.get('epoch')}: val " + ", ".join(parts) + best)
        elif kind == "eval":
            self._log(f"[{ev.get('stage')}] evaluated on {ev.get('split')}", kind="info")
        elif kind == "checkpoint":
            self.last_checkpoint = ev.get("path")
            self._log(f"checkpoint ({ev.get('reason')}): {ev.get('path')}", kind="info")
        elif kind == "stopped":
            self.last_checkpoint = ev.get("checkpoint") or self.last_checkpoint
            self.outcome = "stopped"
            where = "during the export" if ev.get("stage") == "export" else f"at epoch {ev.get('epoch')}"
            self._log(f"stopped {where}; checkpoint {self.last_checkpoint}", kind="info")
        elif kind == "error":
            self.outcome = "failed"
            self.last_checkpoint = ev.get("checkpoint") or self.last_checkpoint
            self._log(f"ERROR {ev.get('type')}: {ev.get('message')}", kind="error")
            tb = ev.get("traceback")
            if tb:
                self._log(str(tb).rstrip(), kind="stderr")
            self._show_failure(str(ev.get("message") or "the engine failed"), ev.get("type"))
        elif kind == "log":
            level = ev.get("level", "info")
            self._log(f"{level}: {ev.get('message')}", kind="warning" if level == "warning" else "log")
        elif kind == "run_end":
            self.outcome = "finished"
            self.bundle_path = ev.get("bundle")
            self.progress.setValue(self.progress.maximum())
            self.eta_label.setText("ETA done")
            self._log(f"finished; bundle: {self.bundle_path}", kind="info")
            if live:
                self.report.show_run(self.events)
                self.tabs.setCurrentWidget(self.report)

    def _on_substage_stage(self, ev: dict[str, Any]) -> None:
        """A stage made of named substages (the export): the bar counts substages from here on."""
        stage = str(ev.get("stage") or "stage")
        subs = [str(s) for s in ev.get("substages") or []]
        self.progress.setRange(0, max(1, len(subs)))
        self.progress.setValue(0)
        self.progress.setFormat(f"{stage}: %v/%m done")
        self.eta_label.setText("ETA –")
        self.rate_label.setText("")
        self.stage_label.setText(f"{stage}: starting")
        self._log(f"stage {stage}: {', '.join(subs)}", kind="info")

    def _on_substage(self, ev: dict[str, Any]) -> None:
        stage, sub = str(ev.get("stage") or ""), str(ev.get("substage") or "")
        index, total = int(ev.get("index") or 0), int(ev.get("total") or 0)
        if total and self.progress.maximum() != total:
            self.progress.setRange(0, total)
            self.progress.setFormat(f"{stage}: %v/%m done")
        self.progress.setValue(max(0, min(index - 1, self.progress.maximum())))
        elapsed = ev.get("elapsed_s")
        self.stage_label.setText(
            f"{stage} · {sub} ({index}/{total})"
            + (f" · {format_duration(elapsed)}" if isinstance(elapsed, (int, float)) else "")
        )

    def _on_stage_end(self, ev: dict[str, Any]) -> None:
        stage = str(ev.get("stage") or "stage")
        elapsed = ev.get("elapsed_s")
        timings = ev.get("timings") or {}
        detail = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items() if isinstance(v, (int, float)))
        took = f"{elapsed:.1f} s" if isinstance(elapsed, (int, float)) else "?"
        self._log(f"stage {stage} done in {took}" + (f" ({detail})" if detail else ""), kind="info")
        if timings:
            self.progress.setValue(self.progress.maximum())

    def _on_step(self, ev: dict[str, Any]) -> None:
        stage = str(ev.get("stage") or "")
        step = int(ev.get("step") or 0)
        done = step
        for s in self._stage_order:
            if s == stage:
                break
            done += self._stage_totals.get(s, 0)
        if self.progress.maximum() <= 1 and self._stage_totals:
            self.progress.setRange(0, max(1, sum(self._stage_totals.values())))
        self.progress.setValue(min(done, self.progress.maximum()))
        epochs = self._stage_epochs.get(stage)
        total = self._stage_totals.get(stage)
        self.stage_label.setText(
            f"{stage} · epoch {ev.get('epoch')}"
            + (f"/{epochs}" if epochs else "")
            + f" · step {step}"
            + (f"/{total}" if total else "")
        )
        eta = ev.get("eta_s")
        if not isinstance(eta, (int, float)) and done > 0 and self.progress.maximum() > 1:
            elapsed = time.monotonic() - self._run_started
            eta = elapsed / done * (self.progress.maximum() - done)
        self.eta_label.setText(f"ETA {format_duration(eta if isinstance(eta, (int, float)) else None)}")
        ips = ev.get("images_per_s")
        if isinstance(ips, (int, float)):
            self.rate_label.setText(f"{ips:,.1f} images/s")
        self.gpu_label.setText(self.gpu_memory_text(ev.get("gpu_mem_mb")))

    def gpu_memory_text(self, mem: Any) -> str:
        """"GPU memory 3,210 MB peak of 140 GB" from a step's ``gpu_mem_mb`` (empty off a GPU)."""
        if not isinstance(mem, (int, float)):
            return ""
        total = self._gpu_total_mb
        of = f" of {total / 1024:,.0f} GB ({100 * mem / total:.0f} %)" if total else ""
        return f"GPU memory {mem:,.0f} MB peak{of}"

    def _on_finished(self, code: int, crashed: bool) -> None:
        resumed = self._pending_resume
        self._pending_resume = False
        if self.outcome == "finished" and code == 0:
            self.stage_label.setText("Finished.")
        elif self.outcome == "stopped" or (self.engine.stop_requested and self.outcome != "failed"):
            self.outcome = "stopped"
            self.stage_label.setText("Stopped — press Resume to continue from the checkpoint.")
        else:
            if self.outcome != "failed":
                tail = "\n".join(list(self.engine.stderr_tail)[-12:])
                why = "crashed" if crashed else f"exited with code {code}"
                self._show_failure(f"The engine {why} without reporting an error.\n{tail}".rstrip(), None)
            self.outcome = "failed"
            self.stage_label.setText("Failed.")
        self._log(f"engine exited (code {code}{', crashed' if crashed else ''})", kind="info")
        if self.outcome != "finished" and self.events:
            self.report.show_run(self.events)
        self._set_state("idle")
        self.history.set_root(self.form.output_dir.text() or None)
        self.run_finished.emit(self.outcome, self.bundle_path)
        _ = resumed

    def _show_failure(self, message: str, kind: Any) -> None:
        where = f" The last checkpoint is kept: {self.last_checkpoint}." if self.last_checkpoint else ""
        resume = " Press Resume to continue from it." if self.last_checkpoint else ""
        self.banner.setText(f"Training failed{f' ({kind})' if kind else ''}: {message}{where}{resume}")
        self.banner.setStyleSheet("background: #fde7e9; color: #7a0010; padding: 6px; border-radius: 4px;")
        self.banner.setVisible(True)

    def _log(self, text: str, kind: str = "log") -> None:
        colors = {"stderr": "#666666", "error": "#b00020", "warning": "#a05a00", "info": "#1f4e99"}
        color = colors.get(kind)
        if color is None:
            self.log_view.appendPlainText(text)
        else:
            from html import escape

            self.log_view.appendHtml(f'<span style="color:{color}; white-space:pre">{escape(text)}</span>')
        self.log_view.moveCursor(QTextCursor.MoveOperation.End)

    # -- history -------------------------------------------------------------------------------------
    def open_run(self, rec: RunRecord) -> None:
        """Replay a past run's event log into the curves and the report."""
        if self.state != "idle" or rec.events_path is None:
            return
        events = load_events(rec.events_path)
        self._reset_live()
        self.events = events
        for ev in events:
            self.apply_event(ev)
        self.curves.flush()
        self.run_dir = rec.path
        self.report.show_run(events)
        cfg = None
        if rec.config_path is not None:
            cfg = _read_yaml(rec.config_path)
            self.config_path = rec.config_path
        else:
            start = next((e for e in events if e.get("event") == "run_start"), None)
            cfg = (start or {}).get("config")
        if isinstance(cfg, dict) and cfg:
            self.form.load_config(cfg)
        self.outcome = (
            rec.status
            if rec.status in ("finished", "stopped", "failed")
            else ("stopped" if rec.status == "incomplete" else None)
        )
        self.stage_label.setText(f"Replayed {rec.name} ({rec.status}).")
        self.tabs.setCurrentWidget(self.report if rec.status == "finished" else self.tabs.widget(0))
        self._set_state("idle")

    def _open_bundle_clicked(self, path: str) -> None:
        if self.open_bundle is not None:
            self.open_bundle(path)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}
