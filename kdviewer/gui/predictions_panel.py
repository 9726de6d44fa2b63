"""Predictions panel: student probabilities per class, teacher beside them, agreement, OOD and timings.

Reads `kdviewer.inference.predict.Prediction` / `Comparison` objects (attributes only) and paints them;
it computes nothing itself.

Multi-label bundles: every finding has its own bar with its decision threshold drawn on it (a white tick;
the thresholds come from the bundle, chosen on val); the findings at or above their thresholds are
highlighted and listed in the headline. Clicking a finding's name asks for its saliency map
(`finding_chosen`).

Trust rules: a study refused by the modality gate (``Prediction.refused``) shows the reason and no class
or bars at all. When the OOD guard fires, the headline says there is no reliable answer and the
probabilities are collapsed behind a "show the model's output anyway" toggle (one click away), never a
big confident number.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QRectF, QSize, Qt, Signal
from PySide6.QtGui import QColor, QFont, QPainter, QPaintEvent, QPen
from PySide6.QtWidgets import (
    QCheckBox,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from kdviewer.gui.logic import format_ms

STUDENT_COLOR = QColor(80, 160, 255)
TEACHER_COLOR = QColor(190, 140, 255)


class ProbabilityBar(QWidget):
    """A horizontal bar 0..1 with the value printed; bold/brighter when it is the predicted label."""

    def __init__(self, color: QColor, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.value: float | None = None
        self.color = color
        self.highlight = False
        self.threshold: float | None = None  # multi-label: the finding's decision threshold (a tick)
        self.setMinimumHeight(18)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def sizeHint(self) -> QSize:
        return QSize(120, 18)

    def set_value(self, value: float | None, highlight: bool = False, threshold: float | None = None) -> None:
        self.value, self.highlight, self.threshold = value, highlight, threshold
        self.setToolTip("" if threshold is None else f"threshold {threshold * 100:.1f}% (chosen on val)")
        self.update()

    def paintEvent(self, _e: QPaintEvent) -> None:
        p = QPainter(self)
        r = QRectF(self.rect()).adjusted(0, 2, -1, -2)
        p.fillRect(r, QColor(38, 42, 50))
        if self.value is not None:
            v = max(0.0, min(1.0, float(self.value)))
            c = QColor(self.color)
            if not self.highlight:
                c.setAlpha(150)
            p.fillRect(QRectF(r.x(), r.y(), r.width() * v, r.height()), c)
            if self.threshold is not None:
                x = r.x() + r.width() * max(0.0, min(1.0, float(self.threshold)))
                p.fillRect(QRectF(x - 1.0, r.y() - 2.0, 2.0, r.height() + 4.0), QColor(255, 255, 255))
            p.setPen(QPen(QColor(245, 247, 250)))
            f = QFont(self.font())
            f.setBold(self.highlight)
            p.setFont(f)
            p.drawText(
                r.adjusted(6, 0, -6, 0),
                int(Qt.AlignmentFlag.AlignVCenter | Qt.AlignmentFlag.AlignRight),
                f"{v * 100:.1f}%",
            )
        else:
            p.setPen(QColor(110, 116, 126))
            p.drawText(r, Qt.AlignmentFlag.AlignCenter, "–")
        p.end()


class SliceStrip(QWidget):
    """Per-slice probability of the positive class for a CT series; the current slice is outlined."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.values: list[float] = []
        self.current = -1
        self.setFixedHeight(34)

    def set_values(self, values: list[float], current: int) -> None:
        self.values, self.current = values, current
        self.update()

    def paintEvent(self, _e: QPaintEvent) -> None:
        p = QPainter(self)
        r = QRectF(self.rect()).adjusted(0, 1, -1, -1)
        p.fillRect(r, QColor(30, 33, 40))
        n = len(self.values)
        if n:
            w = r.width() / n
            for i, v in enumerate(self.values):
                h = r.height() * max(0.0, min(1.0, v))
                c = QColor(255, 120, 90) if v >= 0.5 else QColor(80, 160, 255)
                p.fillRect(QRectF(r.x() + i * w + 1, r.bottom() - h, max(1.0, w - 2), h), c)
            if 0 <= self.current < n:
                p.setPen(QPen(QColor(255, 255, 255), 1.5))
                p.drawRect(QRectF(r.x() + self.current * w, r.y(), w, r.height()))
            p.setPen(QPen(QColor(200, 200, 200, 90), 1, Qt.PenStyle.DashLine))
            p.drawLine(r.left(), r.center().y(), r.right(), r.center().y())
        p.end()


class FindingLabel(QLabel):
    """A class / finding name in the grid; a click asks for that finding's saliency map."""

    clicked = Signal()

    def mousePressEvent(self, event: Any) -> None:
        if event.button() == Qt.MouseButton.LeftButton:
            self.clicked.emit()
        super().mousePressEvent(event)


class PredictionsPanel(QGroupBox):
    compare_toggled = Signal(bool)
    finding_chosen = Signal(int)  # index of a class / finding whose name was clicked

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Prediction", parent)
        self.setObjectName("PredictionsPanel")
        lay = QVBoxLayout(self)
        lay.setSpacing(6)
        self.headline = QLabel("No case")
        self.headline.setObjectName("Headline")
        self.headline.setWordWrap(True)
        lay.addWidget(self.headline)
        self.subline = QLabel("")
        self.subline.setObjectName("Dim")
        self.subline.setWordWrap(True)
        lay.addWidget(self.subline)

        # With the OOD flag the probabilities are hidden behind this toggle (one click away).
        self.details_toggle = QToolButton()
        self.details_toggle.setObjectName("DetailsToggle")
        self.details_toggle.setCheckable(True)
        self.details_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.details_toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.details_toggle.setText("Show the model's output anyway (not reliable)")
        self.details_toggle.toggled.connect(self._details_toggled)
        self.details_toggle.hide()
        lay.addWidget(self.details_toggle)

        self.grid_host = QWidget()
        self.grid = QGridLayout(self.grid_host)
        self.grid.setContentsMargins(0, 0, 0, 0)
        self.grid.setHorizontalSpacing(8)
        self.grid.setVerticalSpacing(3)
        lay.addWidget(self.grid_host)
        self.rows: list[tuple[QLabel, ProbabilityBar, ProbabilityBar]] = []
        self.col_student = QLabel("Student")
        self.col_teacher = QLabel("Teacher")
        for lab in (self.col_student, self.col_teacher):
            lab.setObjectName("Dim")

        self.slice_label = QLabel("")
        self.slice_label.setObjectName("Dim")
        self.slice_label.setWordWrap(True)
        self.slice_strip = SliceStrip()
        lay.addWidget(self.slice_label)
        lay.addWidget(self.slice_strip)
        self.slice_label.hide()
        self.slice_strip.hide()

        row = QHBoxLayout()
        self.compare_box = QCheckBox("Compare with teacher")
        self.compare_box.setToolTip("Run the large teacher network on the same input (T)")
        self.compare_box.toggled.connect(self.compare_toggled)
        row.addWidget(self.compare_box)
        row.addStretch(1)
        self.badge = QLabel("")
        self.badge.setObjectName("Badge")
        self.badge.hide()
        row.addWidget(self.badge)
        lay.addLayout(row)

        self.disagree_box = self._warning_frame("DisagreeWarning")
        self.ood_box = self._warning_frame("OodWarning")
        lay.addWidget(self.disagree_box)
        lay.addWidget(self.ood_box)
        self.timing = QLabel("")
        self.timing.setObjectName("Dim")
        self.timing.setWordWrap(True)
        lay.addWidget(self.timing)
        self.prediction: Any = None
        self.comparison: Any = None
        self.frame_index: int | None = None

    @staticmethod
    def _warning_frame(name: str) -> QLabel:
        lab = QLabel()
        lab.setObjectName(name)
        lab.setWordWrap(True)
        lab.hide()
        return lab

    # -- states ------------------------------------------------------------------------------------

    def _set_classes(self, names: list[str], teacher: bool) -> None:
        if [r[0].text() for r in self.rows] != names:
            while self.grid.count():
                item = self.grid.takeAt(0)
                w = item.widget()
                if w is not None and w not in (self.col_student, self.col_teacher):
                    w.deleteLater()
            self.rows = []
            self.grid.addWidget(self.col_student, 0, 1)
            self.grid.addWidget(self.col_teacher, 0, 2)
            for i, n in enumerate(names, start=1):
                lab = FindingLabel(n)
                lab.setCursor(Qt.CursorShape.PointingHandCursor)
                lab.setToolTip(f"Show where the model looks for {n}")
                lab.clicked.connect(lambda k=i - 1: self.finding_chosen.emit(k))
                sb, tb = ProbabilityBar(STUDENT_COLOR), ProbabilityBar(TEACHER_COLOR)
                self.grid.addWidget(lab, i, 0)
                self.grid.addWidget(sb, i, 1)
                self.grid.addWidget(tb, i, 2)
                self.rows.append((lab, sb, tb))
            self.grid.setColumnStretch(1, 1)
            self.grid.setColumnStretch(2, 1)
        self.col_teacher.setVisible(teacher)
        for _lab, _sb, tb in self.rows:
            tb.setVisible(teacher)
        self.grid.setColumnStretch(2, 1 if teacher else 0)

    def _details_toggled(self, on: bool) -> None:
        self.details_toggle.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)
        self._apply_visibility()

    def _apply_visibility(self) -> None:
        """Bars and slice strip: hidden when refused; behind the toggle when OOD-flagged."""
        student = self.comparison.student if self.comparison is not None else self.prediction
        refused = student is not None and student.refused is not None
        flagged = student is not None and not refused and bool(student.ood_flag)
        show = not refused and (not flagged or self.details_toggle.isChecked())
        self.details_toggle.setVisible(flagged)
        self.grid_host.setVisible(show)
        has_slices = student is not None and bool(student.per_slice)
        self.slice_label.setVisible(show and has_slices)
        self.slice_strip.setVisible(show and has_slices)

    @property
    def details_shown(self) -> bool:
        """True when the probability bars are on screen."""
        return not self.grid_host.isHidden()

    def clear(self, text: str = "No case") -> None:
        self.prediction = self.comparison = None
        self.details_toggle.blockSignals(True)
        self.details_toggle.setChecked(False)
        self.details_toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.details_toggle.blockSignals(False)
        self.details_toggle.hide()
        self.grid_host.show()
        self.headline.setText(text)
        self.headline.setProperty("state", "")
        self._repolish(self.headline)
        self.subline.setText("")
        for lab, sb, tb in self.rows:
            sb.set_value(None)
            tb.set_value(None)
            lab.setProperty("winner", False)
            self._repolish(lab)
        self.badge.hide()
        self.disagree_box.hide()
        self.ood_box.hide()
        self.timing.setText("")
        self.slice_label.hide()
        self.slice_strip.hide()

    def set_pending(self, text: str = "Analysing…") -> None:
        self.headline.setText(text)
        self.headline.setProperty("state", "pending")
        self._repolish(self.headline)

    def set_error(self, text: str) -> None:
        self.clear("Prediction failed")
        self.headline.setProperty("state", "error")
        self._repolish(self.headline)
        self.subline.setText(text)

    @staticmethod
    def _repolish(w: QWidget) -> None:
        w.style().unpolish(w)
        w.style().polish(w)

    def show_result(self, prediction: Any, comparison: Any = None, frame_index: int | None = None) -> None:
        """Show a student `Prediction` (and a `Comparison` when the teacher ran)."""
        self.prediction, self.comparison = prediction, comparison
        self.frame_index = frame_index
        student = comparison.student if comparison is not None else prediction
        teacher = comparison.teacher if comparison is not None else None
        if student.refused is not None:
            self._show_refused(student)
            return
        names = list(student.class_names)
        self._set_classes(names, teacher is not None)
        probs = [float(v) for v in student.probabilities]
        multi = student.task == "multi-label"
        thresholds = list(student.thresholds or [0.5] * len(names)) if multi else [None] * len(names)

        def chosen(pred: Any, i: int) -> bool:
            return names[i] in pred.positives if multi else i == pred.label_index

        for i, (lab, sb, tb) in enumerate(self.rows):
            sb.set_value(probs[i], highlight=chosen(student, i), threshold=thresholds[i])
            if teacher is not None:
                tb.set_value(float(teacher.probabilities[i]), highlight=chosen(teacher, i),
                             threshold=thresholds[i])
            else:
                tb.set_value(None)
            lab.setProperty("winner", chosen(student, i))
            self._repolish(lab)
        series = student.per_slice is not None and len(student.frames) > 1
        scope = f" (series of {len(student.frames)})" if series else ""
        if student.ood_flag:
            self.headline.setText(f"No reliable answer{scope}")
            self.headline.setProperty("state", "unreliable")
        elif multi:
            found = ", ".join(student.positives) if student.positives else "no finding above its threshold"
            self.headline.setText(f"Student: {found}{scope}")
            self.headline.setProperty("state", "result")
        else:
            self.headline.setText(f"Student: {student.label}  {student.probability * 100:.0f}%{scope}")
            self.headline.setProperty("state", "result")
        self._repolish(self.headline)
        cal = (
            f"calibrated (T = {student.temperature:.2f})"
            if student.calibrated
            else "uncalibrated probabilities"
        )
        if multi:
            self.subline.setText(
                f"{len(student.positives)} of {len(names)} findings at or above their own thresholds "
                f"(white tick on each bar, chosen on val) · {cal} · {student.runtime}"
            )
        else:
            self.subline.setText(f"{cal} · {student.runtime}")

        if teacher is not None:
            agree = not comparison.disagree
            self.badge.setText(
                f"AGREE  TV {comparison.divergence:.2f}"
                if agree
                else f"DISAGREE  TV {comparison.divergence:.2f}"
            )
            self.badge.setProperty("agree", agree)
            self._repolish(self.badge)
            self.badge.show()
            if agree:
                self.disagree_box.hide()
            else:
                if not comparison.agreement and multi:
                    what = f"student finds {student.label}, teacher finds {teacher.label}"
                elif not comparison.agreement:
                    what = f"student says {student.label}, teacher says {teacher.label}"
                elif multi:
                    what = (
                        f"same findings but a finding's probability differs by {comparison.divergence:.2f} "
                        f"> {comparison.threshold:.2f}"
                    )
                else:
                    what = (
                        f"same label ({student.label}) but the probabilities differ by "
                        f"{comparison.divergence:.2f} > {comparison.threshold:.2f}: student "
                        f"{student.probability * 100:.0f}%, teacher {teacher.probability * 100:.0f}%"
                    )
                self.disagree_box.setText(
                    f"⚠ Student and teacher disagree — {what}. Treat the student's answer as unreliable "
                    "for this case."
                )
                self.disagree_box.show()
        else:
            self.badge.hide()
            self.disagree_box.hide()

        if student.ood_flag:
            self.ood_box.setText(
                f"⚠ This image looks unlike the model's training data (OOD score {student.ood_score:.1f} > "
                f"{student.ood_threshold:.1f}), so the model has no reliable answer for it. Its output "
                "is behind “Show the model's output anyway”, for reference only."
            )
            self.ood_box.show()
        else:
            self.ood_box.hide()

        t = student.timings
        parts = [f"student {format_ms(t.get('inference_ms', 0) / 1000)}"]
        if "preprocess_ms" in t:
            parts.insert(0, f"preprocess {format_ms(t['preprocess_ms'] / 1000)}")
        if teacher is not None:
            parts.append(f"teacher {format_ms(teacher.timings.get('inference_ms', 0) / 1000)}")
        if student.ood_score is not None and not student.ood_flag:
            parts.append(f"OOD score {student.ood_score:.1f} (ok)")
        self.timing.setText("Inference: " + " · ".join(parts))
        self._update_slices()
        self._apply_visibility()

    def _show_refused(self, student: Any) -> None:
        """The modality gate refused the study: the reason, no class, no bars."""
        self.headline.setText("No answer for this image")
        self.headline.setProperty("state", "refused")
        self._repolish(self.headline)
        self.subline.setText(f"Not classified: {student.refused}. The model was not run on it.")
        for lab, sb, tb in self.rows:
            sb.set_value(None)
            tb.set_value(None)
            lab.setProperty("winner", False)
            self._repolish(lab)
        self.badge.hide()
        self.disagree_box.hide()
        self.ood_box.hide()
        self.timing.setText("")
        self._apply_visibility()

    def set_frame(self, index: int) -> None:
        self.frame_index = index
        self._update_slices()

    def _update_slices(self) -> None:
        student = self.comparison.student if self.comparison is not None else self.prediction
        if student is None or not student.per_slice or student.refused is not None:
            self.slice_label.hide()
            self.slice_strip.hide()
            return
        names = list(student.class_names)
        pos = names.index(student.class_names[1]) if len(names) == 2 else student.label_index
        if len(names) == 2 and student.aggregate and student.aggregate.startswith("max-"):
            pos = names.index(student.aggregate[4:]) if student.aggregate[4:] in names else pos
        values = [float(s["probabilities"][pos]) for s in student.per_slice]
        indices = [int(s["index"]) for s in student.per_slice]
        cur = indices.index(self.frame_index) if self.frame_index in indices else -1
        self.slice_strip.set_values(values, cur)
        if cur >= 0:
            s = student.per_slice[cur]
            self.slice_label.setText(
                f"Slice {self.frame_index + 1}: {s['label']}, P({names[pos]}) {values[cur] * 100:.0f}%. "
                f"P({names[pos]}) per slice:"
            )
        else:
            self.slice_label.setText(f"Per-slice P({names[pos]}):")
        self.slice_label.show()
        self.slice_strip.show()
        self._apply_visibility()
