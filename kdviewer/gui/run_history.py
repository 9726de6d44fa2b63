"""Past training runs found in an output folder: listing, summaries and event-log replay.

A run folder is any directory holding the engine's event log (``events.jsonl``) or its ``run.json``
summary. Reopening a run replays its saved event log through the same code path as a live run, so
the curves and the end-of-run report look exactly as they did.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from kdviewer.events import parse_event

EVENT_LOG_NAMES = ("events.jsonl", "events.log.jsonl")
RUN_SUMMARY_NAME = "run.json"
CONFIG_NAMES = ("panel_config.yaml", "config.yaml", "config.yml")


@dataclass
class RunRecord:
    """What the history list shows about one run folder."""

    path: Path
    name: str
    status: str = "unknown"  # finished | stopped | failed | incomplete | unknown
    started: float | None = None
    elapsed_s: float | None = None
    bundle: str | None = None
    device: str | None = None
    headline: str = ""  # e.g. "auc 0.91 [0.85, 0.96]"
    events_path: Path | None = None
    config_path: Path | None = None
    last_checkpoint: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def resumable(self) -> bool:
        return self.status in ("stopped", "failed", "incomplete") and self.config_path is not None


def event_log_of(run_dir: Path) -> Path | None:
    for name in EVENT_LOG_NAMES:
        p = run_dir / name
        if p.is_file():
            return p
    return None


def config_of(run_dir: Path) -> Path | None:
    for name in CONFIG_NAMES:
        p = run_dir / name
        if p.is_file():
            return p
    return None


def load_events(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Parse an event log (one JSON object per line; non-event lines are skipped)."""
    events: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            record = parse_event(line)
            if record is not None:
                events.append(record)
                if limit is not None and len(events) >= limit:
                    break
    return events


def headline_metric(metrics: dict[str, Any]) -> str:
    """A one-line summary of a metrics dict (AUC first, then accuracy, then whatever comes first)."""
    if not isinstance(metrics, dict) or not metrics:
        return ""
    keys = [k for k in ("auc", "macro_auc", "roc_auc", "accuracy", "f1") if k in metrics] or list(metrics)
    for key in keys:
        text = format_metric(metrics[key])
        if text:
            return f"{key} {text}"
    return ""


def format_metric(value: Any) -> str:
    """``0.912 [0.850, 0.960]`` for ``{"value", "ci_low", "ci_high"}`` dicts, ``0.912`` for floats."""
    if isinstance(value, dict):
        v = value.get("value")
        if not isinstance(v, (int, float)):
            return ""
        lo, hi = value.get("ci_low"), value.get("ci_high")
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
            return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
        return f"{v:.3f}"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return f"{value:.3f}" if isinstance(value, float) else str(value)
    return ""


def summarize_events(run_dir: Path, events: list[dict[str, Any]]) -> RunRecord:
    rec = RunRecord(path=run_dir, name=run_dir.name)
    if not events:
        return rec
    status = "incomplete"
    for ev in events:
        kind = ev.get("event")
        if kind == "run_start":
            rec.started = ev.get("time")
            rec.device = ev.get("device")
            status = "incomplete"
        elif kind == "checkpoint":
            rec.last_checkpoint = ev.get("path")
        elif kind == "stopped":
            status = "stopped"
            rec.last_checkpoint = ev.get("checkpoint") or rec.last_checkpoint
        elif kind == "error":
            status = "failed"
            rec.last_checkpoint = ev.get("checkpoint") or rec.last_checkpoint
        elif kind == "run_end":
            status = "finished"
            rec.bundle = ev.get("bundle")
            rec.elapsed_s = ev.get("elapsed_s")
            rec.headline = headline_metric(ev.get("metrics") or {})
    rec.status = status
    if rec.started is None:
        rec.started = events[0].get("time")
    return rec


def read_run(run_dir: Path) -> RunRecord | None:
    """Summarise one run folder, or None when it holds neither an event log nor run.json."""
    run_dir = Path(run_dir)
    log = event_log_of(run_dir)
    summary_file = run_dir / RUN_SUMMARY_NAME
    if log is None and not summary_file.is_file():
        return None
    rec = summarize_events(run_dir, load_events(log)) if log else RunRecord(path=run_dir, name=run_dir.name)
    rec.events_path = log
    rec.config_path = config_of(run_dir)
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            summary = {}
        if isinstance(summary, dict):
            rec.summary = summary
            rec.bundle = rec.bundle or summary.get("bundle")
            if rec.status in ("unknown", "incomplete") and summary.get("status"):
                rec.status = str(summary["status"])
            if not rec.headline:
                rec.headline = headline_metric(summary.get("metrics") or {})
            rec.started = rec.started or summary.get("started") or summary.get("time")
    if rec.started is None:
        with contextlib.suppress(OSError):
            rec.started = run_dir.stat().st_mtime
    return rec


def find_runs(root: str | Path, depth: int = 2) -> list[RunRecord]:
    """Run folders at ``root`` or up to ``depth`` levels below it, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found: list[RunRecord] = []
    frontier = [root]
    for level in range(depth + 1):
        nxt: list[Path] = []
        for d in frontier:
            rec = read_run(d)
            if rec is not None:
                found.append(rec)
                continue  # a run folder's subfolders (checkpoints, bundle) are not runs
            if level < depth:
                try:
                    nxt.extend(sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")))
                except OSError:
                    continue
        frontier = nxt
    found.sort(key=lambda r: r.started or 0.0, reverse=True)
    return found


class RunHistoryWidget(QWidget):
    """A table of the runs under an output folder with Open (replay) and Resume buttons.

    Signals: ``open_requested(RunRecord)``, ``resume_requested(RunRecord)``.
    """

    open_requested = Signal(object)
    resume_requested = Signal(object)

    COLUMNS = ("Run", "Status", "Started", "Result", "Device", "Folder")

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.root: Path | None = None
        self.records: list[RunRecord] = []
        self.title = QLabel("No output folder chosen yet.")
        self.table = QTableWidget(0, len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels(list(self.COLUMNS))
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QTableWidget.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        self.table.itemDoubleClicked.connect(lambda _item: self._open())
        self.table.itemSelectionChanged.connect(self._update_buttons)
        self.refresh_button = QPushButton("Refresh")
        self.open_button = QPushButton("Open report")
        self.resume_button = QPushButton("Resume run")
        self.refresh_button.clicked.connect(self.refresh)
        self.open_button.clicked.connect(self._open)
        self.resume_button.clicked.connect(self._resume)
        buttons = QHBoxLayout()
        buttons.addWidget(self.refresh_button)
        buttons.addStretch(1)
        buttons.addWidget(self.open_button)
        buttons.addWidget(self.resume_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.title)
        layout.addWidget(self.table, 1)
        layout.addLayout(buttons)
        self._update_buttons()

    def set_root(self, root: str | Path | None) -> None:
        self.root = Path(root) if root else None
        self.refresh()

    def refresh(self) -> None:
        self.records = find_runs(self.root) if self.root else []
        if self.root is None:
            self.title.setText("No output folder chosen yet.")
        else:
            self.title.setText(f"{len(self.records)} run(s) in {self.root}")
        self.table.setRowCount(len(self.records))
        for row, rec in enumerate(self.records):
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(rec.started)) if rec.started else ""
            values = (rec.name, rec.status, started, rec.headline, rec.device or "", str(rec.path))
            for col, text in enumerate(values):
                item = QTableWidgetItem(text)
                item.setData(Qt.ItemDataRole.UserRole, row)
                self.table.setItem(row, col, item)
        self._update_buttons()

    def selected(self) -> RunRecord | None:
        rows = {i.row() for i in self.table.selectedItems()}
        if len(rows) != 1:
            return None
        row = rows.pop()
        return self.records[row] if 0 <= row < len(self.records) else None

    def select_path(self, path: str | Path) -> bool:
        target = Path(path).resolve()
        for row, rec in enumerate(self.records):
            if rec.path.resolve() == target:
                self.table.selectRow(row)
                return True
        return False

    def _update_buttons(self) -> None:
        rec = self.selected()
        self.open_button.setEnabled(rec is not None and rec.events_path is not None)
        self.resume_button.setEnabled(rec is not None and rec.resumable)

    def _open(self) -> None:
        rec = self.selected()
        if rec is not None and rec.events_path is not None:
            self.open_requested.emit(rec)

    def _resume(self) -> None:
        rec = self.selected()
        if rec is not None and rec.resumable:
            self.resume_requested.emit(rec)
