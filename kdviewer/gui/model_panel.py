"""Model manager: which bundle is loaded, its DEMO/SYNTHETIC marks, load / switch / recent, the model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from kdviewer.gui.banner import chip
from kdviewer.gui.modelcard import model_card_html


def bundle_card_html(bundle: Any) -> str:
    """HTML model card for an opened `Bundle`, including its model_card.md when it ships one."""
    extra = None
    try:
        if bundle.has_file("model_card.md"):
            extra = bundle.path("model_card.md").read_text(encoding="utf-8", errors="replace")
    except Exception:
        extra = None
    return model_card_html(bundle.manifest, str(bundle.source), extra)


class ModelCardDialog(QDialog):
    def __init__(self, html: str, title: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("ModelCardDialog")
        self.setWindowTitle(f"Model card — {title}")
        self.resize(720, 760)
        lay = QVBoxLayout(self)
        self.browser = QTextBrowser()
        self.browser.setOpenExternalLinks(False)
        self.browser.setHtml(html)
        lay.addWidget(self.browser)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        lay.addWidget(buttons)


class ModelPanel(QGroupBox):
    load_requested = Signal()  # open a file dialog
    switch_requested = Signal(str)  # path of a recent bundle
    card_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Model", parent)
        self.setObjectName("ModelPanel")
        lay = QVBoxLayout(self)
        lay.setSpacing(4)
        top = QHBoxLayout()
        self.name = QLabel("No model loaded")
        self.name.setObjectName("ModelName")
        self.name.setWordWrap(True)
        top.addWidget(self.name, 1)
        self.demo_chip = chip("DEMO", "DemoChip")
        self.synth_chip = chip("SYNTHETIC", "SyntheticChip")
        top.addWidget(self.demo_chip)
        top.addWidget(self.synth_chip)
        self.demo_chip.hide()
        self.synth_chip.hide()
        lay.addLayout(top)
        self.details = QLabel("Load a bundle (Ctrl+M) to classify images.")
        self.details.setObjectName("Dim")
        self.details.setWordWrap(True)
        lay.addWidget(self.details)
        row = QHBoxLayout()
        self.recent = QComboBox()
        self.recent.setToolTip("Switch to a recently used model")
        self.recent.setMinimumContentsLength(12)
        self.recent.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        row.addWidget(self.recent, 1)
        self.load_btn = QPushButton("Load…")
        self.card_btn = QPushButton("Model card")
        self.card_btn.setEnabled(False)
        row.addWidget(self.load_btn)
        row.addWidget(self.card_btn)
        lay.addLayout(row)
        self.load_btn.clicked.connect(self.load_requested)
        self.card_btn.clicked.connect(self.card_requested)
        self.recent.activated.connect(self._on_recent)
        self._updating = False

    def _on_recent(self, index: int) -> None:
        if self._updating:
            return
        path = self.recent.itemData(index)
        if path:
            self.switch_requested.emit(str(path))

    def set_recent(self, paths: list[str], current: str | None) -> None:
        self._updating = True
        self.recent.clear()
        for p in paths:
            self.recent.addItem(Path(p).name or p, p)
            self.recent.setItemData(self.recent.count() - 1, p, 3)  # tooltip role
        if current in paths:
            self.recent.setCurrentIndex(paths.index(current))
        self._updating = False

    def set_loading(self, path: str) -> None:
        self.name.setText(f"Loading {Path(path).name}…")
        self.details.setText(str(path))

    def set_bundle(self, bundle: Any | None, runtime: str = "", error: str | None = None) -> None:
        if bundle is None:
            self.name.setText("No model loaded")
            self.details.setText(error or "Load a bundle (Ctrl+M) to classify images.")
            self.demo_chip.hide()
            self.synth_chip.hide()
            self.card_btn.setEnabled(False)
            return
        m = bundle.manifest
        self.name.setText(m.name)
        self.demo_chip.setVisible(bool(m.demo))
        self.synth_chip.setVisible(bool(m.synthetic_data))
        lines = [f"student {m.student.architecture}" + (f" ({runtime})" if runtime else "")]
        lines.append(f"teacher {m.teacher.architecture}" if m.teacher is not None else "no teacher")
        key = next(iter(m.metrics), None)
        if key is not None:
            mv = m.metrics[key]
            ci = (
                f" [{mv.ci_low:.2f}–{mv.ci_high:.2f}]"
                if mv.ci_low is not None and mv.ci_high is not None
                else ""
            )
            lines.append(f"{key} {mv.value:.3f}{ci}")
        lines.append("classes: " + ", ".join(m.class_names))
        self.details.setText(" · ".join(lines))
        self.card_btn.setEnabled(True)
