"""Saliency controls: overlay on/off, method, target class, opacity, colour map, student/teacher/side by side.

The panel only holds choices and shows the student-teacher saliency agreement; the maps themselves are
computed by `kdviewer.inference.saliency` in a worker and painted by the canvas.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QRadioButton,
    QSlider,
    QWidget,
)

from kdviewer.gui.logic import COLORMAPS

MODES = (("student", "Student"), ("teacher", "Teacher"), ("side", "Side by side"))
FALLBACK_METHODS = ("gradcam", "gradcam++", "eigencam")


def available_methods() -> list[str]:
    try:
        from kdviewer.inference.saliency import METHODS
    except Exception:
        return list(FALLBACK_METHODS)
    return list(METHODS.keys() if isinstance(METHODS, dict) else METHODS)


PREDICTED = "Predicted class"
TOP_FINDING = "Top finding (furthest above its threshold)"


class SaliencyPanel(QGroupBox):
    changed = Signal()  # anything that needs new maps (toggle, method, target, mode)
    style_changed = Signal()  # opacity / colour map only: repaint, no recomputation

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Saliency", parent)
        self.setObjectName("SaliencyPanel")
        form = QFormLayout(self)
        form.setLabelAlignment(Qt.AlignmentFlag.AlignRight)
        self.enabled = QCheckBox("Show where the model looks (S)")
        form.addRow(self.enabled)
        self.method = QComboBox()
        self.method.addItems(available_methods())
        form.addRow("Method", self.method)
        self.target = QComboBox()
        self.target.addItem(PREDICTED, None)
        self.target_label = QLabel("Class")
        form.addRow(self.target_label, self.target)
        self.opacity = QSlider(Qt.Orientation.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(45)
        self.opacity_label = QLabel("45%")
        orow = QHBoxLayout()
        orow.addWidget(self.opacity, 1)
        orow.addWidget(self.opacity_label)
        form.addRow("Opacity", orow)
        self.cmap = QComboBox()
        self.cmap.addItems(list(COLORMAPS))
        form.addRow("Colours", self.cmap)
        mrow = QHBoxLayout()
        self.mode_group = QButtonGroup(self)
        self.mode_buttons: dict[str, QRadioButton] = {}
        for key, text in MODES:
            b = QRadioButton(text)
            self.mode_group.addButton(b)
            self.mode_buttons[key] = b
            mrow.addWidget(b)
        self.mode_buttons["student"].setChecked(True)
        form.addRow("Model", mrow)
        self.agreement = QLabel("–")
        self.agreement.setObjectName("Dim")
        self.agreement.setWordWrap(True)
        form.addRow("Agreement", self.agreement)
        self.status = QLabel("")
        self.status.setObjectName("Dim")
        self.status.setWordWrap(True)
        form.addRow(self.status)

        self.enabled.toggled.connect(self._on_enabled)
        self.method.currentIndexChanged.connect(lambda _i: self.changed.emit())
        self.target.currentIndexChanged.connect(lambda _i: self.changed.emit())
        self.mode_group.buttonToggled.connect(lambda _b, on: on and self.changed.emit())
        self.opacity.valueChanged.connect(self._on_opacity)
        self.cmap.currentIndexChanged.connect(lambda _i: self.style_changed.emit())
        self._on_enabled(False)

    def _on_enabled(self, on: bool) -> None:
        for w in (self.method, self.target, self.opacity, self.cmap, *self.mode_buttons.values()):
            w.setEnabled(on)
        self.changed.emit()

    def _on_opacity(self, v: int) -> None:
        self.opacity_label.setText(f"{v}%")
        self.style_changed.emit()

    # -- state -------------------------------------------------------------------------------------

    def set_classes(self, names: list[str], teacher_available: bool, multi_label: bool = False) -> None:
        """The classes a map can explain. Multi-label: one entry per finding, and the default is the
        finding furthest above its own threshold (the answer's top finding)."""
        current = self.target.currentData()
        self.target.blockSignals(True)
        self.target.clear()
        self.target.addItem(TOP_FINDING if multi_label else PREDICTED, None)
        self.target_label.setText("Finding" if multi_label else "Class")
        self.target.setToolTip("Grad-CAM target: the map shows what raises this finding's score"
                               if multi_label else "Grad-CAM target class")
        for i, n in enumerate(names):
            self.target.addItem(n, i)
        idx = self.target.findData(current) if current is not None else 0
        self.target.setCurrentIndex(max(0, idx))
        self.target.blockSignals(False)
        for key in ("teacher", "side"):
            self.mode_buttons[key].setEnabled(teacher_available and self.enabled.isChecked())
            self.mode_buttons[key].setToolTip("" if teacher_available else "This bundle has no teacher")
        if not teacher_available and self.mode() != "student":
            self.mode_buttons["student"].setChecked(True)

    def is_on(self) -> bool:
        return self.enabled.isChecked()

    def method_name(self) -> str:
        return self.method.currentText()

    def target_class(self) -> int | None:
        return self.target.currentData()

    def select_target(self, name: str | None) -> bool:
        """Explain ``name`` (a class / finding; None = the answer); False when the model has no such class."""
        idx = 0 if name is None else self.target.findText(name)
        if idx < 0 or (name is not None and self.target.itemData(idx) is None):
            return False
        self.target.setCurrentIndex(idx)
        return True

    def mode(self) -> str:
        for key, b in self.mode_buttons.items():
            if b.isChecked():
                return key
        return "student"

    def set_mode(self, key: str) -> None:
        if key in self.mode_buttons:
            self.mode_buttons[key].setChecked(True)

    def opacity_value(self) -> float:
        return self.opacity.value() / 100.0

    def cmap_name(self) -> str:
        return self.cmap.currentText()

    def set_agreement(self, value: float | None, note: str = "") -> None:
        if value is None:
            self.agreement.setText(note or "–")
        else:
            self.agreement.setText(f"{value:.2f} (student vs teacher maps{', ' + note if note else ''})")
