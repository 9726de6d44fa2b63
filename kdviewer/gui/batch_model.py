"""Table model and filter proxy for the batch panel's results (one row per file of the output CSV).

Columns are whatever the batch CSV holds (path, label, prob_<class>..., teacher_label, disagreement,
divergence, ood_score, ood_flag, error, timings); numbers sort as numbers, empty cells sort last.

The table shows the answer first: path, label, refused, the probabilities and the flags, then the
details; DICOM UIDs come last (and the panel hides them by default, see `HIDDEN_BY_DEFAULT`). Trust
rules: a row refused by the modality gate reads "no answer" with the reason as tooltip; an OOD-flagged
row reads "no reliable answer" in the label column, its probabilities in brackets, and the model's
raw output in the tooltip.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, QSortFilterProxyModel, Qt
from PySide6.QtGui import QBrush, QColor

from kdviewer.batch import NO_RELIABLE_ANSWER

SORT_ROLE = Qt.ItemDataRole.UserRole + 1
PATH_ROLE = Qt.ItemDataRole.UserRole + 2

_Index = QModelIndex | QPersistentModelIndex
_TRUE = {"1", "true", "yes", "y", "t"}
#: Label shown (and filtered on) for a row the modality gate refused.
REFUSED_LABEL = "no answer (modality)"
#: Columns the panel hides until the user asks for them (header context menu).
HIDDEN_BY_DEFAULT = frozenset({"study_uid", "series_uid", "sop_uid"})
_ANSWER = ("path", "label", "refused")
_FLAGS = ("ood_flag", "disagreement", "teacher_label")
_LAST = ("error", "n_frames", "case_type", "ood_score", "divergence", "heatmap", "t_decode_ms", "t_infer_ms")
_UIDS = ("study_uid", "series_uid", "sop_uid")


def display_order(columns: list[str]) -> list[str]:
    """The CSV's columns, answer first (path, label, refused, P(class)..., flags), UIDs last."""
    def rank(c: str) -> tuple[int, int]:
        if c in _ANSWER:
            return 0, _ANSWER.index(c)
        if c.startswith("prob_"):
            return 1, 0
        if c in _FLAGS:
            return 2, _FLAGS.index(c)
        if c.startswith("teacher_prob_"):
            return 3, 0
        if c in _UIDS:
            return 6, _UIDS.index(c)
        if c in _LAST:
            return 5, _LAST.index(c)
        return 4, 0

    return sorted(columns, key=rank)  # stable: classes keep their order


def parse_number(text: Any) -> float | None:
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text) if math.isfinite(text) else None
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def truthy(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    if isinstance(text, (int, float)):
        return text != 0
    return isinstance(text, str) and text.strip().lower() in _TRUE


def read_results_csv(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a batch CSV; a file being written concurrently yields its complete rows."""
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        rows = []
        for row in reader:
            if None in row:  # a partly written last line can have surplus fields
                row.pop(None, None)
            rows.append({k: (v if v is not None else "") for k, v in row.items()})
    # A final line cut mid-write has too few fields: drop it if its last column is missing.
    if rows and header and rows[-1].get(header[-1]) in (None, "") and len(rows[-1]) < len(header):
        rows.pop()
    return header, rows


# (background, text) of rows that need attention: dark tints with light text, readable on the dark theme
ROW_TINTS = {
    "error": ("#4a161c", "#ffc2c8"),
    "ood": ("#473a12", "#ffe296"),
    "disagree": ("#4e2c10", "#ffcda0"),
}


class BatchResultsModel(QAbstractTableModel):
    """Rows of the batch CSV. ``root`` resolves relative paths (double-click opens the case)."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.columns: list[str] = []
        self.rows: list[dict[str, str]] = []
        self.root: Path | None = None
        self._numbers: list[dict[str, float | None]] = []

    # -- loading -------------------------------------------------------------------------------------
    def set_rows(
        self, columns: list[str], rows: list[dict[str, str]], root: str | Path | None = None
    ) -> None:
        self.beginResetModel()
        self.columns = display_order(list(columns))
        self.rows = list(rows)
        self.root = Path(root) if root else None
        self._numbers = [{c: parse_number(r.get(c)) for c in self.columns} for r in self.rows]
        self.endResetModel()

    def load_csv(self, path: str | Path, root: str | Path | None = None) -> int:
        columns, rows = read_results_csv(path)
        self.set_rows(columns, rows, root)
        return len(rows)

    def clear(self) -> None:
        self.set_rows([], [])

    # -- helpers -------------------------------------------------------------------------------------
    def prob_columns(self) -> list[str]:
        return [c for c in self.columns if c.startswith("prob_")]

    def shown_label(self, row: int) -> str:
        """What the label column says: the reason-free "no answer" / "no reliable answer", or the label."""
        r = self.rows[row]
        if r.get("refused", "").strip():
            return REFUSED_LABEL
        if r.get("label") and truthy(r.get("ood_flag")):
            return NO_RELIABLE_ANSWER
        return r.get("label", "")

    def is_unreliable(self, row: int) -> bool:
        return truthy(self.rows[row].get("ood_flag"))

    def labels(self) -> list[str]:
        return sorted({lab for i in range(len(self.rows)) if (lab := self.shown_label(i))})

    def full_path(self, row: int) -> str:
        p = self.rows[row].get("path", "").split("#", 1)[0]  # "folder#SeriesUID" for a CT series
        if not p:
            return ""
        path = Path(p)
        if not path.is_absolute() and self.root is not None:
            path = self.root / path
        return str(path)

    def display_path(self, raw: str) -> str:
        """A path relative to the batch folder when it lies inside it (the full path is the tooltip)."""
        if self.root is not None and raw:
            try:
                return str(Path(raw).relative_to(self.root))
            except ValueError:
                pass
        return raw

    def empty_columns(self) -> list[int]:
        """Columns with no value in any row (e.g. DICOM UIDs for a folder of PNGs)."""
        return [
            c for c, name in enumerate(self.columns) if not any(r.get(name, "").strip() for r in self.rows)
        ]

    def max_prob(self, row: int) -> float | None:
        vals = [self._numbers[row].get(c) for c in self.prob_columns()]
        vals = [v for v in vals if v is not None]
        return max(vals) if vals else None

    def has_error(self, row: int) -> bool:
        return bool(self.rows[row].get("error", "").strip())

    # -- Qt model ------------------------------------------------------------------------------------
    def rowCount(self, parent: _Index = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent: _Index = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.columns)

    def headerData(
        self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole
    ) -> Any:
        if role != Qt.ItemDataRole.DisplayRole:
            return None
        if orientation == Qt.Orientation.Horizontal and 0 <= section < len(self.columns):
            name = self.columns[section]
            if name.startswith("prob_"):
                return f"P({name[5:]})"
            if name.startswith("teacher_prob_"):
                return f"teacher P({name[13:]})"
            return name.replace("_", " ")
        if orientation == Qt.Orientation.Vertical:
            return section + 1
        return None

    def answer_tooltip(self, r: int) -> str | None:
        """The label's/probabilities' tooltip: the refusal reason, or why an OOD answer is not one."""
        row = self.rows[r]
        if row.get("refused", "").strip():
            return f"No class: {row['refused']}. The model was not run on this case."
        if self.is_unreliable(r) and row.get("label"):
            nums = self._numbers[r]
            probs = ", ".join(
                f"{c[5:]} {nums[c]:.3f}" for c in self.prob_columns() if nums.get(c) is not None
            )
            score = row.get("ood_score", "")
            return (
                "No reliable answer: this image is unlike the model's training data"
                + (f" (OOD score {score})" if score else "")
                + f". The model's output anyway: {row['label']} ({probs})."
            )
        return None

    def row_tint(self, r: int) -> tuple[str, str] | None:
        """Colours of row ``r``: error, else OOD flag, else disagreement (see ROW_TINTS); None = plain."""
        if self.has_error(r):
            return ROW_TINTS["error"]
        if truthy(self.rows[r].get("ood_flag")) or self.rows[r].get("refused", "").strip():
            return ROW_TINTS["ood"]
        if truthy(self.rows[r].get("disagreement")):
            return ROW_TINTS["disagree"]
        return None

    def data(self, index: _Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        r, c = index.row(), index.column()
        col = self.columns[c]
        raw = self.rows[r].get(col, "")
        num = self._numbers[r].get(col)
        if role == Qt.ItemDataRole.DisplayRole:
            if col == "path":
                return self.display_path(raw)
            if col == "label":
                return self.shown_label(r)
            if num is not None and col.startswith("prob_") and self.is_unreliable(r):
                return f"({num:.3f})"  # the model's output, bracketed: not an answer
            if col in ("ood_flag", "disagreement") and raw.strip().lower() in _TRUE | {
                "false",
                "0",
                "no",
                "f",
            }:
                return "yes" if truthy(raw) else ""
            if num is not None and ("prob_" in col or not float(num).is_integer()):
                return f"{num:.3f}"
            return raw
        if role == SORT_ROLE:
            if num is not None:
                return num
            if col in ("ood_flag", "disagreement"):
                return 1.0 if truthy(raw) else 0.0
            return raw.lower()
        if role == PATH_ROLE:
            return self.full_path(r)
        if role == Qt.ItemDataRole.ToolTipRole:
            if col in ("error", "path") and raw:
                return self.full_path(r) if col == "path" else raw
            return self.answer_tooltip(r) if col in ("label", "refused") or col.startswith("prob_") else None
        if role == Qt.ItemDataRole.TextAlignmentRole and num is not None:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role in (Qt.ItemDataRole.BackgroundRole, Qt.ItemDataRole.ForegroundRole):
            tint = self.row_tint(r)
            if tint is not None:
                return QBrush(QColor(tint[0 if role == Qt.ItemDataRole.BackgroundRole else 1]))
        return None


class BatchFilterProxy(QSortFilterProxyModel):
    """Sorts numerically and filters by label, min probability, disagreement, OOD and error text."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.setSortRole(SORT_ROLE)
        self.label: str | None = None
        self.min_prob = 0.0
        self.only_disagreement = False
        self.only_ood = False
        self.errors = "all"  # all | only | hide
        self.text = ""

    def lessThan(self, left: _Index, right: _Index) -> bool:
        """Numbers compare as numbers, text as text; empty cells always sort after filled ones."""
        a, b = left.data(SORT_ROLE), right.data(SORT_ROLE)
        a_empty, b_empty = a in (None, ""), b in (None, "")
        if a_empty or b_empty:
            if a_empty and b_empty:
                return False
            # Qt reverses the comparison for descending order: keep empties at the bottom either way.
            last = self.sortOrder() == Qt.SortOrder.AscendingOrder
            return b_empty if last else a_empty
        if isinstance(a, float) != isinstance(b, float):
            return isinstance(a, float)  # numbers before text
        return a < b

    def set_filters(
        self,
        *,
        label: str | None = None,
        min_prob: float = 0.0,
        only_disagreement: bool = False,
        only_ood: bool = False,
        errors: str = "all",
        text: str = "",
    ) -> None:
        new_api = hasattr(self, "beginFilterChange")  # Qt >= 6.9
        if new_api:
            self.beginFilterChange()
        self.label = label or None
        self.min_prob = float(min_prob)
        self.only_disagreement = only_disagreement
        self.only_ood = only_ood
        self.errors = errors
        self.text = text.strip().lower()
        if new_api:
            self.endFilterChange()
        else:
            self.invalidateFilter()

    def filterAcceptsRow(self, source_row: int, source_parent: _Index) -> bool:
        m = self.sourceModel()
        if not isinstance(m, BatchResultsModel) or source_row >= len(m.rows):
            return True
        row = m.rows[source_row]
        err = m.has_error(source_row)
        if self.errors == "only" and not err:
            return False
        if self.errors == "hide" and err:
            return False
        if self.label and m.shown_label(source_row) != self.label:
            return False
        if self.min_prob > 0:
            p = m.max_prob(source_row)
            if p is None or p < self.min_prob:
                return False
        if self.only_disagreement and not truthy(row.get("disagreement")):
            return False
        if self.only_ood and not truthy(row.get("ood_flag")):
            return False
        if self.text:
            hay = (row.get("path", "") + "\n" + row.get("error", "")).lower()
            if self.text not in hay:
                return False
        return True

    def visible_rows(self) -> list[dict[str, str]]:
        m = self.sourceModel()
        assert isinstance(m, BatchResultsModel)
        return [m.rows[self.mapToSource(self.index(r, 0)).row()] for r in range(self.rowCount())]

    def export_csv(self, path: str | Path) -> int:
        """Write the visible rows, in the current sort order, with every column; returns the count."""
        m = self.sourceModel()
        assert isinstance(m, BatchResultsModel)
        rows = self.visible_rows()
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=m.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        return len(rows)
