# ruff: noqa: F811 - pytest fixtures imported from test_gui_support are re-declared as arguments
"""`render_case` (headless PNG of the real window), the worker runner's supersede/cancel rules, and the
Qt-free viewer logic."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_gui_support import gui_data, tiny_bundle  # noqa: F401 - fixtures

from kdviewer.gui import logic
from kdviewer.models.bundle import demo_bundle_path

pytestmark = pytest.mark.gui


def test_render_case_writes_png_with_teacher_and_saliency(qtbot, gui_data, tiny_bundle, tmp_path) -> None:
    from PIL import Image

    from kdviewer.gui.render import RENDER_SIZE, render_case

    out = render_case(
        str(gui_data["dicom"]), str(tmp_path / "out.png"), str(tiny_bundle), teacher=True, saliency="gradcam"
    )
    assert out.is_file()
    img = Image.open(out)
    assert img.size == RENDER_SIZE
    assert np.asarray(img.convert("L")).std() > 5


def test_render_case_raises_readable_error_for_corrupt_file(qtbot, gui_data, tiny_bundle, tmp_path) -> None:
    from kdviewer.errors import KDViewerError
    from kdviewer.gui.render import render_case

    with pytest.raises(KDViewerError, match=r"broken\.png"):
        render_case(str(gui_data["corrupt"]), str(tmp_path / "x.png"), str(tiny_bundle))
    assert not (tmp_path / "x.png").exists()


def test_runner_drops_stale_results_and_cancels(qtbot) -> None:
    from kdviewer.gui.workers import TaskRunner

    runner = TaskRunner()
    got: list[str] = []
    release = threading.Event()

    def slow(token):
        release.wait(5)
        return "old"

    runner.submit("predict", slow, got.append)
    runner.submit("predict", lambda t: "new", got.append)  # supersedes the first
    release.set()
    assert runner.wait_idle(10)
    assert got == ["new"]

    # cooperative cancellation: the job stops at its next check and reports nothing
    steps: list[int] = []

    def long(token):
        for i in range(200):
            token.check()
            steps.append(i)
            time.sleep(0.01)
        return "done"

    runner.submit("saliency", long, got.append)
    time.sleep(0.1)
    runner.cancel("saliency")
    assert runner.wait_idle(10)
    assert "done" not in got and len(steps) < 200

    errors = []
    runner.submit("load", lambda t: 1 / 0, got.append, errors.append)
    assert runner.wait_idle(10)
    assert errors and errors[0].message.startswith("ZeroDivisionError")
    runner.shutdown()


def test_view_transform_zoom_keeps_point_fixed() -> None:
    t = logic.ViewTransform(image_w=2048, image_h=2048)
    t.fit(800, 600)
    assert t.zoom == pytest.approx(600 / 2048 * 0.98)
    p = t.view_to_image(123, 456, 800, 600)
    t.zoom_at(1.7, 123, 456, 800, 600)
    assert t.view_to_image(123, 456, 800, 600) == pytest.approx(p)
    assert not t.fitted


@pytest.mark.parametrize(("spacing", "zoom"), [(0.2, 0.3), (0.7, 1.0), (0.14, 2.5), (1.0, 0.05)])
def test_scale_bar_is_nice_and_true(spacing: float, zoom: float) -> None:
    px, label = logic.scale_bar(spacing, zoom, 160)
    assert 0 < px <= 160
    value = float(label.split()[0]) * (10 if label.endswith("cm") else 1)
    assert value * zoom / spacing == pytest.approx(px)
    mantissa = value / 10 ** np.floor(np.log10(value))
    assert round(mantissa, 6) in (1, 2, 5)
    assert logic.scale_bar(None, 1.0) == (0.0, "")


def test_heatmap_rgba_transparent_when_cold() -> None:
    h = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    rgba = logic.heatmap_rgba(h, "jet")
    assert rgba.shape == (10, 10, 4) and rgba.dtype == np.uint8
    assert rgba[0, 0, 3] == 0 and rgba[-1, -1, 3] == 255


def test_list_cases_finds_files_and_series(gui_data) -> None:
    cases = logic.list_cases(gui_data["root"])
    kinds = {c.label.split()[0]: c.kind for c in cases}
    assert kinds["ct_series"] == "series"
    assert kinds["broken.png"] == "file"
    only = logic.list_cases(gui_data["ct"])
    assert len(only) == 1 and only[0].kind == "series" and only[0].path == Path(gui_data["ct"])


def test_push_recent_dedupes_and_limits() -> None:
    items = [str(i) for i in range(10)]
    out = logic.push_recent(items, "5", limit=4)
    assert out == ["5", "0", "1", "2"]


def test_main_gui_without_arguments_opens_demo_model_and_sample(
    qtbot, tiny_bundle, tmp_path, monkeypatch
) -> None:
    """`kdviewer` with no arguments: the shipped sample case with the demo model (here: $KDVIEWER_BUNDLE
    when the repository's demo bundle has not been generated)."""
    from PySide6.QtCore import QSettings, QTimer
    from PySide6.QtWidgets import QApplication

    from kdviewer.gui.app import main_gui
    from kdviewer.gui.main_window import MainWindow

    sample = logic.sample_case_path()
    if sample is None:
        pytest.skip("resources/samples not generated (python scripts/make_demo_assets.py)")
    if demo_bundle_path() is None:
        monkeypatch.setenv("KDVIEWER_BUNDLE", str(tiny_bundle))
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path))
    seen: dict[str, object] = {}

    def check() -> None:
        wins = [w for w in QApplication.topLevelWidgets() if isinstance(w, MainWindow) and w.isVisible()]
        if not wins:
            QTimer.singleShot(50, check)
            return
        win = wins[-1]
        win.wait_idle(120)
        seen["study"] = win.study_path
        seen["model"] = win.classifier.manifest.name if win.classifier else None
        seen["settings"] = win.settings.fileName()
        # Closing the last window ends app.exec(); an extra quit() would stay queued and end the
        # *next* event loop at once (every later qtbot.waitSignal would time out immediately).
        win.close()

    QTimer.singleShot(0, check)
    assert main_gui([], None) == 0
    assert seen["study"] == sample
    assert seen["model"] is not None
    assert str(seen["settings"]).startswith(str(tmp_path))  # the test never touched the user's settings
