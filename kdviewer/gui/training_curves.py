"""Live pyqtgraph curves fed by the engine's events: loss per step, validation per epoch, learning rate.

The x axis of the step plots is a running step count across stages (teacher fine-tune, then
distillation), with a labelled vertical line where each stage starts; the validation plot places epochs
the same way but *numbers* them per stage (the student's first epoch is 1, not the teacher's count + 1).
Legends sit in their own column to the right of each plot, never over the curves; the learning rate has
its own logarithmic axis (1e-3 is not a flat line at 0 on a +-0.4 scale).
"""

from __future__ import annotations

import math
from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QVBoxLayout, QWidget

_PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)

# Validation metrics worth a curve (0..1 scale); the validation loss gets its own dashed curve.
_VAL_PREFERRED = ("accuracy", "auc", "macro_auc", "f1", "balanced_accuracy", "sensitivity", "specificity")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Series:
    def __init__(
        self,
        plot: pg.PlotItem,
        name: str,
        color: tuple[int, int, int],
        *,
        width: float = 1.5,
        dashed: bool = False,
        symbol: str | None = None,
    ) -> None:
        style = Qt.PenStyle.DashLine if dashed else Qt.PenStyle.SolidLine
        pen = pg.mkPen(color=color, width=width, style=style)
        kw: dict[str, Any] = {"pen": pen, "name": name, "connect": "finite"}
        if symbol:
            kw.update(symbol=symbol, symbolSize=6, symbolBrush=color, symbolPen=None)
        self.item = plot.plot([], [], **kw)
        self.x: list[float] = []
        self.y: list[float] = []
        self.dirty = False

    def add(self, x: float, y: float) -> None:
        self.x.append(x)
        self.y.append(y)
        self.dirty = True

    def flush(self) -> None:
        if self.dirty:
            self.item.setData(self.x, self.y)
            self.dirty = False


class StageEpochAxis(pg.AxisItem):
    """Bottom axis of the validation plot: ticks at running positions, labelled with the epoch number
    within their stage (positions after a stage start at ``offset`` read ``x - offset``)."""

    def __init__(self) -> None:
        super().__init__("bottom")
        self.offsets: list[float] = [0.0]

    def epoch_label(self, x: float) -> str:
        start = max((o for o in self.offsets if o < x), default=0.0)
        v = x - start
        return f"{v:g}" if abs(v - round(v)) < 1e-6 else ""

    def tickStrings(self, values: list[float], scale: float, spacing: float) -> list[str]:
        return [self.epoch_label(v * scale) for v in values]


class LrAxis(pg.AxisItem):
    """Left axis of the learning-rate plot (log mode): labels at 1, 2 and 5 x 10^k only, so the minor
    ticks of a narrow range do not pile up into unreadable text."""

    def logTickStrings(self, values: list[float], scale: float, spacing: float) -> list[str]:
        out = []
        for v in values:
            x = 10 ** (v * scale)
            mantissa = x / 10 ** math.floor(math.log10(x)) if x > 0 else 0.0
            keep = any(abs(mantissa - m) < 1e-6 * m for m in (1.0, 2.0, 5.0))
            out.append(f"{x:g}" if keep else "")
        return out


class TrainingCurves(QWidget):
    """Three stacked plots: training loss (total + components), validation metrics, learning rate."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        pg.setConfigOptions(antialias=True)
        self.view = pg.GraphicsLayoutWidget()
        self.view.setBackground("w")
        self.epoch_axis = StageEpochAxis()
        self.loss_plot: pg.PlotItem = self.view.addPlot(row=0, col=0, title="Training loss (per step)")
        self.val_plot: pg.PlotItem = self.view.addPlot(
            row=1, col=0, title="Validation metrics (per epoch)", axisItems={"bottom": self.epoch_axis}
        )
        self.lr_plot: pg.PlotItem = self.view.addPlot(
            row=2, col=0, title="Learning rate (log scale)", axisItems={"left": LrAxis("left")}
        )
        self.legends: dict[int, pg.LegendItem] = {}
        for row, (plot, xlabel) in enumerate(
            ((self.loss_plot, "step"), (self.val_plot, "epoch of each stage"), (self.lr_plot, "step"))
        ):
            plot.showGrid(x=True, y=True, alpha=0.25)
            plot.setLabel("bottom", xlabel)
            # the legend gets its own column, beside the plot (it covered the curves inside it)
            legend = pg.LegendItem(labelTextSize="8pt", verSpacing=-4)
            self.view.addItem(legend, row=row, col=1)
            self.legends[id(plot)] = legend
        self.view.ci.layout.setColumnStretchFactor(0, 5)
        self.view.ci.layout.setColumnStretchFactor(1, 1)
        self.lr_plot.setLogMode(y=True)
        self.lr_plot.getAxis("left").enableAutoSIPrefix(False)  # ticks read 0.001, not "1 (x0.001)"
        self.lr_plot.setLabel("left", "lr")
        self.lr_plot.setXLink(self.loss_plot)
        self.val_plot.setYRange(0.0, 1.0, padding=0.03)  # accuracy, AUC, F1... all live in [0, 1]
        self.val_plot.enableAutoRange(axis="y", enable=False)
        self._flush_timer = QTimer(self)
        self._flush_timer.setSingleShot(True)
        self._flush_timer.setInterval(150)  # redraw at most ~7 times a second, however fast steps come
        self._flush_timer.timeout.connect(self.flush)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.view)
        self.reset()

    # -- state -----------------------------------------------------------------------------------
    def reset(self) -> None:
        for plot in (self.loss_plot, self.val_plot, self.lr_plot):
            plot.clear()
            self.legends[id(plot)].clear()
        self.epoch_axis.offsets = [0.0]
        self.loss: dict[str, _Series] = {}
        self.val: dict[str, _Series] = {}
        self.lr: dict[str, _Series] = {}
        self._step_offset = 0.0  # running step count where the current stage began
        self._epoch_offset = 0.0
        self._last_step = 0.0
        self._last_epoch = 0.0
        self._stage: str | None = None
        self._stage_first_step: float | None = None
        self._stage_first_epoch: float | None = None
        self._steps_per_epoch: int | None = None

    def point_count(self) -> dict[str, int]:
        """How many data points each plot holds (stage breaks not counted; for tests and status text)."""

        def count(table: dict[str, _Series]) -> int:
            return sum(sum(1 for y in s.y if math.isfinite(y)) for s in table.values())

        return {"loss": count(self.loss), "val": count(self.val), "lr": count(self.lr)}

    def _series(self, table: dict[str, _Series], plot: pg.PlotItem, name: str, **kw: Any) -> _Series:
        if name not in table:
            color = _PALETTE[len(table) % len(_PALETTE)]
            table[name] = _Series(plot, name, color, **kw)
            self.legends[id(plot)].addItem(table[name].item, name)
        return table[name]

    def _mark_stage(self, stage: str, x_step: float, x_epoch: float) -> None:
        for plot, x in ((self.loss_plot, x_step), (self.lr_plot, x_step), (self.val_plot, x_epoch)):
            line = pg.InfiniteLine(
                pos=x,
                angle=90,
                pen=pg.mkPen((120, 120, 120), style=Qt.PenStyle.DashLine),
                label=stage,
                labelOpts={"position": 0.92, "color": (90, 90, 90)},
            )
            plot.addItem(line)

    # -- events ----------------------------------------------------------------------------------
    def handle_event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "stage_start" and not ev.get("substages"):  # (the export has no steps to plot)
            self._begin_stage(str(ev.get("stage") or "stage"))
            spe = ev.get("steps_per_epoch")
            self._steps_per_epoch = int(spe) if _finite(spe) and spe > 0 else None
        elif kind == "step":
            self._on_step(ev)
        elif kind == "epoch_end":
            self._on_epoch(ev)

    def _begin_stage(self, stage: str) -> None:
        if stage == self._stage:
            return  # a resumed run re-announces its stage; keep counting where it left off
        self._step_offset = self._last_step
        self._epoch_offset = self._last_epoch
        # Lines do not run from one stage into the next (teacher CE and student KD losses differ).
        for table in (self.loss, self.lr, self.val):
            for series in table.values():
                if series.x and math.isfinite(series.y[-1]):
                    series.add(series.x[-1], math.nan)
        self._stage = stage
        if self._epoch_offset not in self.epoch_axis.offsets:
            self.epoch_axis.offsets.append(self._epoch_offset)
            self.epoch_axis.picture = None  # relabel the ticks
            self.epoch_axis.update()
        self._stage_first_step = None
        self._stage_first_epoch = None
        if self._last_step > 0 or self._last_epoch > 0 or stage != "student":
            self._mark_stage(stage, self._step_offset, self._epoch_offset)

    def _on_step(self, ev: dict[str, Any]) -> None:
        if ev.get("stage") and ev.get("stage") != self._stage:
            self._begin_stage(str(ev["stage"]))
        step = ev.get("step")
        x = self._step_offset + float(step) if _finite(step) else self._last_step + 1.0
        self._last_step = max(self._last_step, x)
        if _finite(ev.get("loss")):
            self._series(self.loss, self.loss_plot, "total", width=2.2).add(x, float(ev["loss"]))
        comps = ev.get("components") or {}
        if isinstance(comps, dict):
            for name, value in comps.items():
                if _finite(value) and name not in ("total", "loss"):
                    self._series(self.loss, self.loss_plot, str(name), width=1.2).add(x, float(value))
        if _finite(ev.get("lr")) and float(ev["lr"]) > 0:  # (log axis)
            self._series(self.lr, self.lr_plot, self._stage or "lr").add(x, float(ev["lr"]))
        self._schedule()

    def _on_epoch(self, ev: dict[str, Any]) -> None:
        if ev.get("stage") and ev.get("stage") != self._stage:
            self._begin_stage(str(ev["stage"]))
        epoch = ev.get("epoch")
        x = self._epoch_offset + float(epoch) if _finite(epoch) else self._last_epoch + 1.0
        self._last_epoch = max(self._last_epoch, x)
        # Epoch losses go on the step plot, at the step where the epoch ended (same scale as the steps).
        if _finite(epoch) and self._steps_per_epoch:
            x_step = self._step_offset + float(epoch) * self._steps_per_epoch
        else:
            x_step = self._last_step
        val = ev.get("val") or {}
        train = ev.get("train") or {}
        prefix = f"{self._stage}: " if self._stage and self._stage != "student" else ""
        if isinstance(val, dict):
            names = [k for k in _VAL_PREFERRED if _finite(val.get(k))]
            if not names:
                names = [k for k, v in val.items() if _finite(v) and "loss" not in k][:4]
            for name in names:
                series = self._series(self.val, self.val_plot, f"{prefix}{name}", symbol="o")
                series.add(x, float(val[name]))
            if _finite(val.get("loss")):
                series = self._series(self.loss, self.loss_plot, "val loss (epoch)", symbol="t", width=1.0)
                series.add(x_step, float(val["loss"]))
        if isinstance(train, dict) and _finite(train.get("loss")):
            series = self._series(self.loss, self.loss_plot, "train loss (epoch)", symbol="s", width=1.0)
            series.add(x_step, float(train["loss"]))
        self._schedule()

    def _schedule(self) -> None:
        if not self._flush_timer.isActive():
            self._flush_timer.start()

    def flush(self) -> None:
        for table in (self.loss, self.val, self.lr):
            for series in table.values():
                series.flush()
