"""Tag panel: the study's safe metadata, with protected health information hidden until asked for."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QHBoxLayout,
    QHeaderView,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from kdviewer.gui.logic import tag_rows
from kdviewer.imaging.study import Study


class TagPanel(QWidget):
    phi_toggled = Signal(bool)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("TagPanel")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        row = QHBoxLayout()
        self.filter = QLineEdit()
        self.filter.setPlaceholderText("Filter tags…")
        self.filter.setClearButtonEnabled(True)
        self.phi_button = QPushButton("Show PHI")
        self.phi_button.setCheckable(True)
        self.phi_button.setToolTip("Show protected health information (name, ID, birth date…) — Ctrl+H")
        row.addWidget(self.filter, 1)
        row.addWidget(self.phi_button)
        lay.addLayout(row)
        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["Tag", "Value"])
        self.table.verticalHeader().hide()
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setWordWrap(False)
        lay.addWidget(self.table, 1)
        self.study: Study | None = None
        self.phi_button.toggled.connect(self._on_phi)
        self.filter.textChanged.connect(lambda _t: self._fill())

    @property
    def phi_visible(self) -> bool:
        return self.phi_button.isChecked()

    def set_phi_visible(self, on: bool) -> None:
        self.phi_button.setChecked(on)

    def _on_phi(self, on: bool) -> None:
        self.phi_button.setText("Hide PHI" if on else "Show PHI")
        self._fill()
        self.phi_toggled.emit(on)

    def set_study(self, study: Study | None) -> None:
        self.study = study
        # PHI is hidden again for every new case: showing it is a per-case decision.
        if self.phi_button.isChecked():
            self.phi_button.blockSignals(True)
            self.phi_button.setChecked(False)
            self.phi_button.setText("Show PHI")
            self.phi_button.blockSignals(False)
        self._fill()

    def rows(self) -> list[tuple[str, str]]:
        return [
            (self.table.item(r, 0).text(), self.table.item(r, 1).text()) for r in range(self.table.rowCount())
        ]

    def _fill(self) -> None:
        self.table.setRowCount(0)
        if self.study is None:
            return
        needle = self.filter.text().strip().lower()
        rows = [
            r
            for r in tag_rows(self.study, self.phi_visible)
            if not needle
            or needle in r[0].lower()
            or (needle in r[1].lower() and (not r[2] or self.phi_visible))
        ]
        self.table.setRowCount(len(rows))
        for i, (name, value, is_phi) in enumerate(rows):
            a, b = QTableWidgetItem(name), QTableWidgetItem(value)
            b.setToolTip(value if (not is_phi or self.phi_visible) else "Hidden: click Show PHI")
            if is_phi:
                color = QColor(255, 170, 120) if self.phi_visible else QColor(140, 146, 156)
                a.setForeground(color)
                b.setForeground(color)
                a.setData(Qt.ItemDataRole.UserRole, "phi")
            self.table.setItem(i, 0, a)
            self.table.setItem(i, 1, b)
