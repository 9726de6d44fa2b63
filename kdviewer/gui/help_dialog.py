"""Keyboard-shortcut help, built from the same table the actions use (`logic.SHORTCUTS`)."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QIcon, QResizeEvent, QShowEvent
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QHeaderView,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from kdviewer.gui.logic import MOUSE_HELP, SHORTCUTS


class ShortcutHelp(QDialog):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Keyboard and mouse")
        self.resize(680, 660)
        lay = QVBoxLayout(self)
        rows = [(k, d) for _id, k, d in SHORTCUTS] + list(MOUSE_HELP)
        self.table = QTableWidget(len(rows), 2)
        self.table.setHorizontalHeaderLabels(["Key / mouse", "Action"])
        self.table.verticalHeader().hide()
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setWordWrap(True)  # long descriptions wrap instead of being cut ("...higher leve...")
        self.table.setTextElideMode(Qt.TextElideMode.ElideNone)
        for i, (k, d) in enumerate(rows):
            self.table.setItem(i, 0, QTableWidgetItem(k))
            self.table.setItem(i, 1, QTableWidgetItem(d))
        lay.addWidget(self.table)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        self.close_button = buttons.button(QDialogButtonBox.StandardButton.Close)
        self.close_button.setIcon(QIcon())  # the style's icon is dark on the dark theme: text only
        lay.addWidget(buttons)

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        self.fit_rows()

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        self.fit_rows()

    def fit_rows(self) -> None:
        """Row heights follow the wrapped text at the current width."""
        self.table.resizeRowsToContents()
