"""Always-visible disclaimer banner and the inline message bar (errors and warnings without modal dialogs)."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QPlainTextEdit, QPushButton, QVBoxLayout, QWidget

DISCLAIMER = "Decision support only — not a diagnosis"


def chip(text: str, name: str) -> QLabel:
    lab = QLabel(text)
    lab.setObjectName(name)
    lab.setProperty("chip", True)
    lab.setAlignment(Qt.AlignmentFlag.AlignCenter)
    return lab


class DisclaimerBanner(QFrame):
    """Top strip: the disclaimer, and DEMO MODEL / SYNTHETIC marks when the model or image is flagged."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("DisclaimerBanner")
        lay = QHBoxLayout(self)
        lay.setContentsMargins(12, 4, 12, 4)
        lay.setSpacing(8)
        self.text = QLabel(DISCLAIMER)
        self.text.setObjectName("DisclaimerText")
        lay.addWidget(self.text)
        lay.addStretch(1)
        self.demo_chip = chip("DEMO MODEL", "DemoChip")
        self.synth_model_chip = chip("SYNTHETIC TRAINING DATA", "SyntheticChip")
        self.synth_image_chip = chip("SYNTHETIC IMAGE", "SyntheticChip")
        self.no_model_chip = chip("NO MODEL LOADED", "NoModelChip")
        for c in (self.demo_chip, self.synth_model_chip, self.synth_image_chip, self.no_model_chip):
            lay.addWidget(c)
            c.hide()
        self.no_model_chip.show()

    def set_flags(
        self, *, model_loaded: bool, demo: bool, synthetic_model: bool, synthetic_image: bool
    ) -> None:
        self.no_model_chip.setVisible(not model_loaded)
        self.demo_chip.setVisible(model_loaded and demo)
        self.synth_model_chip.setVisible(model_loaded and synthetic_model)
        self.synth_image_chip.setVisible(synthetic_image)

    def flags_text(self) -> list[str]:
        return [
            c.text()
            for c in (self.demo_chip, self.synth_model_chip, self.synth_image_chip, self.no_model_chip)
            if not c.isHidden()
        ]


class MessageBar(QFrame):
    """An inline, dismissable message under the banner; errors stay until closed or replaced."""

    closed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("MessageBar")
        outer = QVBoxLayout(self)
        outer.setContentsMargins(10, 6, 10, 6)
        row = QHBoxLayout()
        outer.addLayout(row)
        self.icon = QLabel("!")
        self.icon.setObjectName("MessageIcon")
        self.icon.setFixedWidth(22)
        self.icon.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.details_btn = QPushButton("Details")
        self.details_btn.setCheckable(True)
        self.details_btn.setFlat(True)
        self.close_btn = QPushButton("✕")
        self.close_btn.setObjectName("MessageClose")
        self.close_btn.setFlat(True)
        self.close_btn.setFixedWidth(28)
        self.close_btn.setToolTip("Dismiss")
        row.addWidget(self.icon)
        row.addWidget(self.label, 1)
        row.addWidget(self.details_btn)
        row.addWidget(self.close_btn)
        self.details = QPlainTextEdit()
        self.details.setReadOnly(True)
        self.details.setMaximumHeight(140)
        self.details.hide()
        outer.addWidget(self.details)
        self.details_btn.toggled.connect(self.details.setVisible)
        self.close_btn.clicked.connect(self.dismiss)
        self.level = ""
        self.hide()

    def show_message(self, text: str, level: str = "error", details: str | None = None) -> None:
        self.level = level
        self.setProperty("level", level)
        self.style().unpolish(self)
        self.style().polish(self)
        self.icon.setText({"error": "!", "warning": "!", "info": "i"}.get(level, "!"))
        self.label.setText(text)
        self.details.setPlainText(details or "")
        self.details_btn.setVisible(bool(details))
        self.details_btn.setChecked(False)
        self.show()

    def dismiss(self) -> None:
        self.hide()
        self.level = ""
        self.closed.emit()

    def text(self) -> str:
        return self.label.text() if self.isVisible() or not self.isHidden() else ""
