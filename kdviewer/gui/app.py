"""Application start-up: the QApplication, the dark theme, and `main_gui` (called by `kdviewer.cli`)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from PySide6.QtCore import QSettings, QtMsgType, qInstallMessageHandler
from PySide6.QtGui import QFont, QIcon
from PySide6.QtWidgets import QApplication

from kdviewer.gui import logic

log = logging.getLogger(__name__)


def headless() -> bool:
    """True when no display is reachable (then Qt must use the offscreen platform)."""
    if sys.platform.startswith("linux"):
        return not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return False


_QUIET = ("propagateSizeHints",)  # harmless offscreen-platform chatter


def _qt_message(mode: QtMsgType, _context: object, message: str) -> None:
    if any(q in message for q in _QUIET):
        return
    level = {
        QtMsgType.QtDebugMsg: logging.DEBUG,
        QtMsgType.QtInfoMsg: logging.INFO,
        QtMsgType.QtWarningMsg: logging.WARNING,
    }.get(mode, logging.ERROR)
    log.log(level, "Qt: %s", message)


def stylesheet() -> str:
    qss = logic.resources_dir() / "qss" / "dark.qss"
    try:
        return qss.read_text(encoding="utf-8")
    except OSError:
        log.warning("theme %s not found; using the default look", qss)
        return ""


def ensure_app(offscreen_if_headless: bool = True) -> QApplication:
    """The running QApplication, or a new one with kdviewer's name, icon and theme."""
    app = QApplication.instance()
    if app is not None:
        return app  # type: ignore[return-value]
    if offscreen_if_headless and headless() and not os.environ.get("QT_QPA_PLATFORM"):
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
    qInstallMessageHandler(_qt_message)
    app = QApplication(sys.argv[:1])
    app.setApplicationName("kdviewer")
    app.setOrganizationName("kdviewer")
    app.setApplicationDisplayName("kdviewer")
    app.setStyle("Fusion")
    font = QFont(app.font())
    if font.pointSizeF() < 9.5:
        font.setPointSizeF(9.5)
    app.setFont(font)
    icon = logic.resources_dir() / "icons" / "kdviewer.svg"
    if icon.is_file():
        app.setWindowIcon(QIcon(str(icon)))
    app.setStyleSheet(stylesheet())
    return app


def initial_bundle(explicit: str | None, settings: QSettings) -> str | None:
    """--bundle, else the last model used (if it still exists), else the shipped default model (the
    real-data model, or the synthetic demo where that is not installed), else None."""
    if explicit:
        return explicit
    last = settings.value("model/last")
    if last and Path(str(last)).exists():
        return str(last)
    try:
        from kdviewer.models.bundle import default_bundle_path

        p = default_bundle_path()
        if p is not None and Path(p).exists():
            return str(p)
    except Exception:  # no bundled model installed: the window says "no model loaded"
        pass
    return None


def main_gui(paths: list[str] | list[Path], bundle: str | os.PathLike | None) -> int:
    """Open the viewer on ``paths`` (first one shown; several files become a case list) with ``bundle``.

    With no paths the shipped sample case is opened; with no bundle the last model or the demo model.
    Returns the application's exit code.
    """
    from kdviewer.gui.main_window import MainWindow

    app = ensure_app()
    win = MainWindow()
    model = initial_bundle(str(bundle) if bundle else None, win.settings)
    if model:
        win.load_bundle(model)
    else:
        win.show_message("No model bundle found: load one with Model ▸ Load bundle (Ctrl+M).", "warning")
    targets = [str(p) for p in paths if p]
    if not targets:
        sample = logic.sample_case_path()
        if sample is not None:
            targets = [str(sample)]
    if len(targets) > 1 and all(Path(t).is_file() for t in targets):
        cases = [logic.Case(Path(t), Path(t).name) for t in targets]
        win._set_cases(cases, None)
        win.study_list.select(0)
    elif targets:
        win.open_path(targets[0])
    win.show()
    return int(app.exec())
