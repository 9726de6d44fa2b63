"""Study list: the cases of an opened folder, with thumbnails, stepped through with the keyboard."""

from __future__ import annotations

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QIcon, QImage, QPixmap
from PySide6.QtWidgets import QLabel, QListWidget, QListWidgetItem, QVBoxLayout, QWidget

from kdviewer.gui.logic import Case

THUMB = 72


class StudyList(QWidget):
    case_activated = Signal(int)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("StudyList")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        self.title = QLabel("Cases")
        self.title.setObjectName("Dim")
        lay.addWidget(self.title)
        self.list = QListWidget()
        self.list.setIconSize(QSize(THUMB, THUMB))
        self.list.setUniformItemSizes(True)
        self.list.setSpacing(2)
        self.list.setWordWrap(True)
        lay.addWidget(self.list, 1)
        self.cases: list[Case] = []
        self.list.currentRowChanged.connect(self._on_row)
        self._silent = False

    def set_cases(self, cases: list[Case], folder: str = "") -> None:
        self._silent = True
        self.cases = list(cases)
        self.list.clear()
        placeholder = QPixmap(THUMB, THUMB)
        placeholder.fill(Qt.GlobalColor.black)
        for c in cases:
            item = QListWidgetItem(QIcon(placeholder), c.label)
            item.setToolTip(str(c.path))
            item.setSizeHint(QSize(THUMB + 120, THUMB + 8))
            self.list.addItem(item)
        self.title.setText(f"{len(cases)} case(s)" + (f" in {folder}" if folder else ""))
        self._silent = False

    def set_thumbnail(self, index: int, image: QImage) -> None:
        if 0 <= index < self.list.count():
            pm = QPixmap.fromImage(image).scaled(
                THUMB, THUMB, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation
            )
            self.list.item(index).setIcon(QIcon(pm))

    def current(self) -> int:
        return self.list.currentRow()

    def select(self, index: int, emit: bool = True) -> None:
        if not 0 <= index < self.list.count():
            return
        self._silent = not emit
        self.list.setCurrentRow(index)
        self._silent = False

    def step(self, delta: int) -> None:
        if not self.cases:
            return
        row = self.list.currentRow()
        self.select(max(0, min(len(self.cases) - 1, (row if row >= 0 else -1) + delta)))

    def _on_row(self, row: int) -> None:
        if not self._silent and row >= 0:
            self.case_activated.emit(row)
