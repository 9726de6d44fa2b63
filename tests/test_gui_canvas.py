# ruff: noqa: F811 - pytest fixtures imported from test_gui_support are re-declared as arguments
"""Canvas and case navigation: real files, real widgets (pytest-qt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDragMoveEvent, QDropEvent, QWheelEvent
from PySide6.QtWidgets import QApplication
from test_gui_support import (  # noqa: F401 - fixtures
    gui_data,
    load_bundle_and_wait,
    open_and_wait,
    settings,
    tiny_bundle,
    window,
)

from kdviewer.imaging.study import CT_PRESETS
from kdviewer.models.preprocess import preprocess_study

pytestmark = pytest.mark.gui


def wheel(widget, pos: QPointF, dy: int, mods=Qt.KeyboardModifier.NoModifier) -> None:
    ev = QWheelEvent(
        pos,
        widget.mapToGlobal(pos),
        QPoint(0, 0),
        QPoint(0, dy),
        Qt.MouseButton.NoButton,
        mods,
        Qt.ScrollPhase.NoScrollPhase,
        False,
    )
    QApplication.sendEvent(widget, ev)


def test_open_png_shows_image_and_overlays(qtbot, window, gui_data) -> None:
    open_and_wait(qtbot, window, gui_data["png"])
    c = window.canvas
    assert window.study is not None and c.study is window.study
    assert window.study.shape == (256, 256)
    arr = c.display_array()
    assert arr is not None and arr.dtype == np.uint8 and arr.std() > 10
    assert c.synthetic  # file name says synthetic -> SYNTHETIC label on the canvas
    assert "SYNTHETIC IMAGE" in window.banner.flags_text()
    assert not window.slice_row.isVisible()  # single image: no slice slider
    assert c.paint_count > 0


def test_dicom_window_level_drag_changes_display_not_model_input(
    qtbot, window, gui_data, tiny_bundle
) -> None:
    load_bundle_and_wait(window, tiny_bundle)
    open_and_wait(qtbot, window, gui_data["dicom"])
    c = window.canvas
    study = window.study
    assert study.modality == "DX" and study.pixel_spacing == (0.2, 0.2)
    pre = window.classifier.pre
    before_input = preprocess_study(study, pre)
    before_display = c.display_array().copy()
    before_window = c.window
    predict_gen = window.runner.generation("predict")

    centre = QPoint(c.width() // 2, c.height() // 2)
    qtbot.mousePress(c, Qt.MouseButton.RightButton, pos=centre)
    qtbot.mouseMove(c, centre + QPoint(80, 40))
    qtbot.mouseRelease(c, Qt.MouseButton.RightButton, pos=centre + QPoint(80, 40))

    assert c.window != before_window
    assert c.window.width > before_window.width  # drag right = wider window (radiology convention)
    assert c.window.center > before_window.center  # drag down = higher level
    assert not np.array_equal(c.display_array(), before_display)
    np.testing.assert_array_equal(preprocess_study(window.study, pre), before_input)
    assert window.runner.generation("predict") == predict_gen  # no re-inference for a display change
    window.reset_window()
    assert c.window == study.window


def test_ct_series_presets_slices_zoom_invert(qtbot, window, gui_data) -> None:
    open_and_wait(qtbot, window, gui_data["ct"])
    c = window.canvas
    study = window.study
    assert study.is_volume and study.n_frames == 6
    assert window.slice_row.isVisible()
    assert window.slice_slider.maximum() == 5
    start = c.frame_index

    # presets (menu action and keyboard shortcut Ctrl+1 for lung)
    window.apply_preset("mediastinum")
    assert c.window == CT_PRESETS["mediastinum"]
    c.setFocus()
    qtbot.keyClick(c, Qt.Key.Key_1, Qt.KeyboardModifier.ControlModifier)
    assert c.window == CT_PRESETS["lung"]

    # slices: Shift+wheel, PageDown, slider
    wheel(c, QPointF(100, 100), -120, Qt.KeyboardModifier.ShiftModifier)
    assert c.frame_index == start + 1
    qtbot.keyClick(c, Qt.Key.Key_PageUp)
    assert c.frame_index == start
    window.slice_slider.setValue(0)
    assert c.frame_index == 0
    qtbot.keyClick(c, Qt.Key.Key_Down)
    assert c.frame_index == 1 and window.slice_slider.value() == 1
    assert window.slice_label.text() == "2 / 6"

    # zoom around the cursor keeps the image point under the cursor fixed
    t = c.transform
    pw, ph = c.pane_size()
    pos = QPointF(pw * 0.3, ph * 0.4)
    before = t.view_to_image(pos.x(), pos.y(), pw, ph)
    z0 = t.zoom
    wheel(c, pos, 240)
    assert c.transform.zoom == pytest.approx(z0 * 1.25**2)
    after = c.transform.view_to_image(pos.x(), pos.y(), pw, ph)
    assert after == pytest.approx(before, abs=1e-6)
    window.actions_by_id["one_to_one"].trigger()
    assert c.transform.zoom == 1.0
    window.actions_by_id["fit"].trigger()
    assert c.transform.fitted

    # invert
    d0 = c.display_array().astype(int)
    qtbot.keyClick(c, Qt.Key.Key_I)
    assert c.user_invert
    assert np.abs(c.display_array().astype(int) - (255 - d0)).max() <= 1  # rounding
    assert window.actions_by_id["invert"].isChecked()

    # pan with the left button
    qtbot.mousePress(c, Qt.MouseButton.LeftButton, pos=QPoint(50, 50))
    qtbot.mouseMove(c, QPoint(90, 70))
    qtbot.mouseRelease(c, Qt.MouseButton.LeftButton, pos=QPoint(90, 70))
    assert (c.transform.pan_x, c.transform.pan_y) == pytest.approx((40, 20))


def test_scale_bar_and_corner_text_use_safe_fields(qtbot, window, gui_data) -> None:
    from kdviewer.gui import logic

    open_and_wait(qtbot, window, gui_data["dicom"])
    c = window.canvas
    text = logic.corner_text(c.study, c.frame_index, c.window, c.transform.zoom, False)
    blob = " ".join(line for lines in text.values() for line in lines)
    assert "PHANTOM-0042" not in blob and "19700101" not in blob  # PHI never on the image
    assert "Spacing 0.2 x 0.2 mm" in blob
    px, label = logic.scale_bar(0.2, c.transform.zoom)
    assert px > 0 and label.endswith(("mm", "cm"))


def drop_paths(widget, paths: list[Path]) -> None:
    """A real drag-enter, drag-move and drop sequence with file URLs, as a file manager sends it."""
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    a, b, m = Qt.DropAction.CopyAction, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    enter = QDragEnterEvent(QPoint(20, 20), a, mime, b, m)
    QApplication.sendEvent(widget, enter)
    assert enter.isAccepted()
    QApplication.sendEvent(widget, QDragMoveEvent(QPoint(22, 22), a, mime, b, m))
    QApplication.sendEvent(widget, QDropEvent(QPointF(22, 22), a, mime, b, m))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_drag_and_drop_opens_file(qtbot, window, gui_data) -> None:
    drop_paths(window.canvas, [gui_data["png"]])
    assert window.wait_idle(60)
    assert window.study is not None and window.study_path == Path(gui_data["png"])
    drop_paths(window.canvas, [gui_data["ct"]])  # a folder works too
    assert window.wait_idle(60)
    assert window.study is not None and window.study.n_frames == 6


def test_folder_study_list_navigates_with_keys(qtbot, window, gui_data, tmp_path) -> None:
    import shutil

    folder = tmp_path / "worklist"
    shutil.copytree(gui_data["ct"], folder / "a_ct_series")
    shutil.copy(gui_data["corrupt"], folder / "b_broken.png")
    shutil.copy(gui_data["png"], folder / "c_phantom.png")
    shutil.copy(gui_data["dicom"], folder / "d_radiograph.dcm")
    window.open_path(folder)
    assert window.wait_idle(60)
    labels = [c.label for c in window.cases]
    assert labels == ["a_ct_series  (6 slices)", "b_broken.png", "c_phantom.png", "d_radiograph.dcm"]
    assert window.study_list.isVisible()
    assert window.study is not None and window.study.n_frames == 6  # first case opened
    first = window.study_path
    window.actions_by_id["next_case"].trigger()
    assert window.wait_idle(60)
    assert window.study_list.current() == 1
    assert window.study is None and "b_broken.png" in window.message_bar.label.text()  # corrupt case
    window.actions_by_id["next_case"].trigger()
    assert window.wait_idle(60)
    assert window.study_list.current() == 2 and window.study is not None
    window.study_list.list.setFocus()
    qtbot.keyClick(window.study_list.list, Qt.Key.Key_Down)
    assert window.wait_idle(60)
    assert window.study_path == folder / "d_radiograph.dcm"
    qtbot.keyClick(window.study_list.list, Qt.Key.Key_Home)
    assert window.wait_idle(60)
    assert window.study_path == first and window.study_list.current() == 0
    # thumbnails were made in the background for the readable cases
    assert not window.study_list.list.item(2).icon().isNull()


def test_ct_series_folder_opens_as_one_case(qtbot, window, gui_data) -> None:
    open_and_wait(qtbot, window, gui_data["ct"])
    assert not window.study_list.isVisible()
    assert window.study.n_frames == 6


def test_series_with_a_damaged_slice_warns_in_the_viewer(qtbot, window, tmp_path: Path) -> None:
    """Issue 17 item 7: a slice that cannot be decoded is left out with a warning (not a quiet note)."""
    from test_gui_support import write_ct_series

    folder = write_ct_series(tmp_path / "ct", n=5, size=48)
    bad = folder / "slice_002.dcm"
    bad.write_bytes(bad.read_bytes()[:-1000])  # header intact, pixels cut short
    open_and_wait(qtbot, window, folder)
    assert window.study is not None and window.study.n_frames == 4 and window.study.n_found == 5
    bar = window.message_bar
    assert bar.level == "warning"
    assert "1 of 5 slices could not be read" in bar.text()
