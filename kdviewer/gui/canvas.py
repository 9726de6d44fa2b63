"""The image canvas: one `Study` frame through a display window, with zoom, pan, window/level and overlays.

A plain QWidget painted with QPainter (no scene graph: one image, a few overlays). It can show one
pane or two side by side (student | teacher saliency) sharing one view transform. Everything the
canvas computes (geometry, scale bar, corner text, colour maps) lives in `kdviewer.gui.logic`; pixels
for the screen come from `kdviewer.imaging.windowing.to_display`, never from the model input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import (
    QColor,
    QDragEnterEvent,
    QDropEvent,
    QFont,
    QFontMetrics,
    QImage,
    QKeyEvent,
    QMouseEvent,
    QPainter,
    QPaintEvent,
    QPen,
    QPixmap,
    QResizeEvent,
    QWheelEvent,
)
from PySide6.QtWidgets import QSizePolicy, QWidget

from kdviewer.gui import logic
from kdviewer.imaging.study import Study, Window
from kdviewer.imaging.windowing import to_display

#: Heatmaps are smooth (upsampled CAMs): colouring them at <= 768 px and letting the painter scale them
#: looks the same and costs a tenth of the time on a 2048^2 radiograph.
HEATMAP_MAX_SIDE = 768


@dataclass
class Pane:
    """One side of the canvas: a title and an optional saliency heatmap (frame geometry, [0, 1])."""

    title: str = ""
    heatmap: np.ndarray | None = None
    caption: str = ""


def gray_qimage(arr: np.ndarray) -> QImage:
    """uint8 (H, W) -> QImage that owns a copy of the pixels."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    h, w = arr.shape
    return QImage(arr.data, w, h, w, QImage.Format.Format_Grayscale8).copy()


def rgba_qimage(arr: np.ndarray) -> QImage:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    h, w, _ = arr.shape
    return QImage(arr.data, w, h, 4 * w, QImage.Format.Format_RGBA8888).copy()


class ImageCanvas(QWidget):
    window_changed = Signal(object)  # Window
    frame_changed = Signal(int)
    invert_changed = Signal(bool)
    view_changed = Signal()
    paths_dropped = Signal(list)  # list[str]
    painted = Signal()  # after every paint (benchmarks wait for it)

    BG = QColor(8, 9, 11)
    TEXT = QColor(225, 228, 232)
    ACCENT = QColor(90, 170, 255)
    WARN = QColor(255, 170, 40)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("ImageCanvas")
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMinimumSize(320, 240)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setAcceptDrops(True)
        self.setMouseTracking(True)
        self.study: Study | None = None
        self.frame_index = 0
        self.window: Window = Window(127.5, 255.0)
        self.user_invert = False
        self.transform = logic.ViewTransform()
        self.panes: list[Pane] = [Pane()]
        self.opacity = 0.45
        self.cmap = "jet"
        self.show_overlay_text = True
        self.synthetic = False
        self.message = ""  # placeholder / error text shown when there is no image
        self.message_is_error = False
        self._pixmap: QPixmap | None = None
        self._scaled: tuple[float, QPixmap] | None = None  # (zoom, pixmap pre-scaled for that zoom)
        self._display_dirty = True
        self._heat_cache: dict[int, tuple[int, str, QImage]] = {}
        self._drag_mode: str | None = None
        self._drag_origin = QPointF()
        self._drag_window = self.window
        self._drag_pan = (0.0, 0.0)
        self.paint_count = 0

    # -- content -----------------------------------------------------------------------------------

    def set_study(
        self, study: Study | None, frame: int | None = None, display: np.ndarray | None = None
    ) -> None:
        """Show ``study`` (middle frame unless ``frame``); ``display`` = its uint8 pixels for the default
        window when a worker already computed them (keeps the GUI thread free for 2048^2 images)."""
        self.study = study
        self._scaled = None
        self.message = ""
        self._heat_cache.clear()
        self.panes = [Pane(self.panes[0].title if self.panes else "")]
        if study is None:
            self._pixmap = None
            self.update()
            return
        self.frame_index = study.middle_index() if frame is None else max(0, min(frame, study.n_frames - 1))
        self.window = study.window
        self.user_invert = False
        self.synthetic = logic.is_synthetic(study)
        h, w = study.shape
        self.transform = logic.ViewTransform(image_w=w, image_h=h)
        self._fit()
        self._display_dirty = True
        if display is not None and display.shape == study.shape and self.frame_index == study.middle_index():
            self._pixmap = QPixmap.fromImage(gray_qimage(display))
            self._display_dirty = False
        self.update()

    def set_message(self, text: str, error: bool = False) -> None:
        """Text shown centred when no image is loaded (placeholder, or why loading failed)."""
        self.message = text
        self.message_is_error = error
        self.update()

    def set_frame(self, index: int) -> None:
        if self.study is None:
            return
        index = max(0, min(int(index), self.study.n_frames - 1))
        if index == self.frame_index:
            return
        self.frame_index = index
        self._display_dirty = True
        self._heat_cache.clear()
        self.panes = [Pane(p.title) for p in self.panes]  # heatmaps belong to the old frame
        self.update()
        self.frame_changed.emit(index)

    def step_frame(self, delta: int) -> None:
        self.set_frame(self.frame_index + delta)

    def set_window(self, window: Window) -> None:
        if window == self.window:
            return
        self.window = window
        self._display_dirty = True
        self.update()
        self.window_changed.emit(window)

    def set_invert(self, on: bool) -> None:
        if on == self.user_invert:
            return
        self.user_invert = on
        self._display_dirty = True
        self.update()
        self.invert_changed.emit(on)

    def set_panes(self, panes: list[Pane]) -> None:
        """One pane (plain or with a heatmap) or two (side by side); heatmaps in frame geometry."""
        self.panes = panes or [Pane()]
        self._heat_cache.clear()
        if self.transform.fitted:
            self._fit()
        self.update()

    def set_overlay_style(self, opacity: float | None = None, cmap: str | None = None) -> None:
        if opacity is not None:
            self.opacity = float(min(1.0, max(0.0, opacity)))
        if cmap is not None and cmap != self.cmap:
            self.cmap = cmap
            self._heat_cache.clear()
        self.update()

    # -- view --------------------------------------------------------------------------------------

    def pane_size(self) -> tuple[float, float]:
        n = max(1, len(self.panes))
        return self.width() / n, float(self.height())

    def _fit(self) -> None:
        w, h = self.pane_size()
        self.transform.fit(w, h - 8)

    def fit(self) -> None:
        self._fit()
        self.update()
        self.view_changed.emit()

    def one_to_one(self) -> None:
        self.transform.one_to_one()
        self.update()
        self.view_changed.emit()

    def zoom_by(self, factor: float, at: QPointF | None = None) -> None:
        w, h = self.pane_size()
        if at is None:
            at = QPointF(w / 2, h / 2)
        local_x = at.x() % w if w > 0 else at.x()
        self.transform.zoom_at(factor, local_x, at.y(), w, h)
        self.update()
        self.view_changed.emit()

    def current_frame(self) -> np.ndarray | None:
        return None if self.study is None else self.study.frame(self.frame_index)

    def effective_invert(self) -> bool:
        return bool(self.study is not None and self.study.invert) != self.user_invert

    def display_array(self, step: int = 1) -> np.ndarray | None:
        """The uint8 pixels on screen for the current frame/window/invert (what the user sees);
        ``step`` > 1 windows every step-th pixel only (a preview while the window is being dragged)."""
        frame = self.current_frame()
        if frame is None or self.study is None:
            return None
        if step > 1:
            frame = frame[::step, ::step]
        lut = self.study.voi_lut if self.window == self.study.window else None
        return to_display(frame, self.window, self.effective_invert(), lut)

    def _ensure_pixmap(self) -> None:
        if not self._display_dirty and self._pixmap is not None:
            return
        # While right-dragging a large image shown small, window a subsample (screen resolution is all
        # that is visible); the full-resolution pixels come back on release.
        step = max(1, int(0.5 / self.transform.zoom)) if self._drag_mode == "window" else 1
        arr = self.display_array(step)
        self._pixmap = None if arr is None else QPixmap.fromImage(gray_qimage(arr))
        self._scaled = None
        self._display_dirty = step > 1

    def _pixmap_for_zoom(self) -> QPixmap | None:
        """Below 1:1, a copy scaled once per zoom level (smooth); painting it is then a plain blit."""
        pm = self._pixmap
        if pm is None or pm.width() == 0:
            return pm
        scale = self.transform.zoom * self.transform.image_w / pm.width()  # pixmap px -> screen px
        if scale >= 1.0:
            return pm
        if self._scaled is None or abs(self._scaled[0] - scale) > 1e-9:
            w, h = max(1, round(pm.width() * scale)), max(1, round(pm.height() * scale))
            scaled = pm.scaled(
                w, h, Qt.AspectRatioMode.IgnoreAspectRatio, Qt.TransformationMode.SmoothTransformation
            )
            self._scaled = (scale, scaled)
        return self._scaled[1]

    # -- painting ----------------------------------------------------------------------------------

    def _heat_image(self, i: int, heat: np.ndarray) -> QImage:
        cached = self._heat_cache.get(i)
        if cached is not None and cached[0] == id(heat) and cached[1] == self.cmap:
            return cached[2]
        step = max(1, int(np.ceil(max(heat.shape) / HEATMAP_MAX_SIDE)))
        img = rgba_qimage(logic.heatmap_rgba(heat[::step, ::step], self.cmap))
        self._heat_cache[i] = (id(heat), self.cmap, img)
        return img

    def paintEvent(self, _event: QPaintEvent) -> None:
        p = QPainter(self)
        p.fillRect(self.rect(), self.BG)
        if self.study is None:
            self._paint_message(p)
            p.end()
            self.painted.emit()
            return
        self._ensure_pixmap()
        n = max(1, len(self.panes))
        pw, ph = self.pane_size()
        for i, pane in enumerate(self.panes):
            p.save()
            p.translate(i * pw, 0)
            p.setClipRect(QRectF(0, 0, pw, ph))
            self._paint_pane(p, pane, i, pw, ph)
            p.restore()
            if i > 0:
                p.setPen(QPen(QColor(60, 64, 72), 2))
                p.drawLine(QPointF(i * pw, 0), QPointF(i * pw, ph))
        if n == 1 and self.show_overlay_text:
            self._paint_corners(p, self.width(), self.height())
        elif self.show_overlay_text:
            self._paint_corners(p, self.width(), self.height(), compact=True)
        self._paint_scale_bar(p, self.width(), self.height())
        if self.synthetic:
            self._paint_synthetic(p)
        p.end()
        self.paint_count += 1
        self.painted.emit()

    def _paint_pane(self, p: QPainter, pane: Pane, i: int, pw: float, ph: float) -> None:
        x, y, w, h = self.transform.image_rect(pw, ph)
        target = QRectF(x, y, w, h)
        pm = self._pixmap_for_zoom()
        p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, self.transform.zoom < 1.0)
        if pm is not None:
            p.drawPixmap(target, pm, QRectF(pm.rect()))
        if pane.heatmap is not None and self.opacity > 0:
            p.setOpacity(self.opacity)
            p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, True)
            p.drawImage(target, self._heat_image(i, pane.heatmap))
            p.setOpacity(1.0)
        if pane.title:
            f = QFont(self.font())
            f.setBold(True)
            f.setPointSizeF(max(9.0, f.pointSizeF() + 1))
            p.setFont(f)
            fm = QFontMetrics(f)
            text = pane.title + (f"  ·  {pane.caption}" if pane.caption else "")
            tw = fm.horizontalAdvance(text) + 16
            box = QRectF((pw - tw) / 2, ph - fm.height() - 40, tw, fm.height() + 8)
            p.fillRect(box, QColor(0, 0, 0, 170))
            p.setPen(self.ACCENT)
            p.drawText(box, Qt.AlignmentFlag.AlignCenter, text)

    def _text_block(
        self, p: QPainter, lines: list[str], x: float, y: float, align_right: bool, bottom: bool
    ) -> None:
        fm = QFontMetrics(p.font())
        lh = fm.height()
        if bottom:
            y = y - lh * len(lines)
        for j, line in enumerate(lines):
            tw = fm.horizontalAdvance(line)
            tx = x - tw if align_right else x
            ty = y + j * lh + fm.ascent()
            p.setPen(QColor(0, 0, 0, 220))
            p.drawText(QPointF(tx + 1, ty + 1), line)
            p.setPen(self.TEXT)
            p.drawText(QPointF(tx, ty), line)

    def _paint_corners(self, p: QPainter, w: float, h: float, compact: bool = False) -> None:
        assert self.study is not None
        f = QFont(self.font())
        f.setPointSizeF(max(8.0, f.pointSizeF() - 0.5))
        p.setFont(f)
        text = logic.corner_text(
            self.study, self.frame_index, self.window, self.transform.zoom, self.effective_invert()
        )
        margin = 10
        self._text_block(
            p,
            text["tl"][: 2 if compact else None],
            margin,
            margin + 22 if self.synthetic else margin,
            False,
            False,
        )
        self._text_block(p, text["tr"], w - margin, margin, True, False)
        self._text_block(p, text["bl"][-2:] if compact else text["bl"], margin, h - margin, False, True)

    def _paint_scale_bar(self, p: QPainter, w: float, h: float) -> None:
        if self.study is None or not self.study.pixel_spacing:
            return
        px, label = logic.scale_bar(
            self.study.pixel_spacing[1], self.transform.zoom, max_screen_px=min(180.0, w / 4)
        )
        if px <= 0:
            return
        x1, y = w - 16, h - 18
        x0 = x1 - px
        p.setPen(QPen(QColor(0, 0, 0, 200), 4))
        p.drawLine(QPointF(x0, y), QPointF(x1, y))
        p.setPen(QPen(self.TEXT, 2))
        p.drawLine(QPointF(x0, y), QPointF(x1, y))
        p.drawLine(QPointF(x0, y - 5), QPointF(x0, y + 3))
        p.drawLine(QPointF(x1, y - 5), QPointF(x1, y + 3))
        fm = QFontMetrics(p.font())
        self._text_block(p, [label], x1, y - 6 - fm.height(), True, False)

    def _paint_synthetic(self, p: QPainter) -> None:
        f = QFont(self.font())
        f.setBold(True)
        p.setFont(f)
        fm = QFontMetrics(f)
        text = "SYNTHETIC PHANTOM — not a patient"
        tw = fm.horizontalAdvance(text) + 14
        box = QRectF(10, 8, tw, fm.height() + 6)
        p.fillRect(box, QColor(120, 70, 0, 230))
        p.setPen(QColor(255, 220, 150))
        p.drawText(box, Qt.AlignmentFlag.AlignCenter, text)

    def _paint_message(self, p: QPainter) -> None:
        text = self.message or "Open an image or a CT series folder (Ctrl+O), or drop it here."
        f = QFont(self.font())
        f.setPointSizeF(f.pointSizeF() + 2)
        p.setFont(f)
        p.setPen(QColor(255, 120, 110) if self.message_is_error else QColor(150, 156, 166))
        r = self.rect().adjusted(40, 40, -40, -40)
        p.drawText(r, int(Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap), text)

    # -- interaction -------------------------------------------------------------------------------

    def resizeEvent(self, event: QResizeEvent) -> None:
        if self.transform.fitted:
            self._fit()
        super().resizeEvent(event)

    def wheelEvent(self, event: QWheelEvent) -> None:
        if self.study is None:
            return
        delta = event.angleDelta()
        dy = delta.y() if delta.y() != 0 else delta.x()  # Shift+wheel turns into x on some platforms
        if dy == 0:
            return
        mods = event.modifiers()
        if mods & (Qt.KeyboardModifier.ShiftModifier | Qt.KeyboardModifier.ControlModifier):
            if self.study.n_frames > 1:
                self.step_frame(-1 if dy > 0 else 1)
        else:
            self.zoom_by(logic.wheel_zoom_factor(dy), event.position())
        event.accept()

    def mousePressEvent(self, event: QMouseEvent) -> None:
        if self.study is None:
            return
        self.setFocus()
        self._drag_origin = event.position()
        if event.button() == Qt.MouseButton.LeftButton:
            self._drag_mode = "pan"
            self._drag_pan = (self.transform.pan_x, self.transform.pan_y)
            self.setCursor(Qt.CursorShape.ClosedHandCursor)
        elif event.button() == Qt.MouseButton.RightButton:
            self._drag_mode = "window"
            self._drag_window = self.window
            self.setCursor(Qt.CursorShape.SizeAllCursor)
        event.accept()

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        if self._drag_mode is None:
            return
        d = event.position() - self._drag_origin
        if self._drag_mode == "pan":
            self.transform.pan_x = self._drag_pan[0] + d.x()
            self.transform.pan_y = self._drag_pan[1] + d.y()
            self.transform.fitted = False
            self.update()
        elif self._drag_mode == "window":
            frame = self.current_frame()
            if frame is not None:
                self.set_window(logic.window_for_drag(self._drag_window, d.x(), d.y(), frame))
        event.accept()

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:
        if self._drag_mode == "pan":
            self.view_changed.emit()
        if self._drag_mode == "window":
            self._display_dirty = True  # full resolution again
            self.update()
        self._drag_mode = None
        self.unsetCursor()
        event.accept()

    def mouseDoubleClickEvent(self, event: QMouseEvent) -> None:
        if event.button() == Qt.MouseButton.LeftButton:
            self.fit()

    def keyPressEvent(self, event: QKeyEvent) -> None:
        key = event.key()
        if self.study is not None and key in (Qt.Key.Key_Up, Qt.Key.Key_Down):
            self.step_frame(-1 if key == Qt.Key.Key_Up else 1)
            event.accept()
            return
        super().keyPressEvent(event)

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:
        paths = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if paths:
            event.acceptProposedAction()
            self.paths_dropped.emit(paths)
