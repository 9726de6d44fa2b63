"""`kdviewer render`: draw the real main window for one case offscreen and save it as a PNG.

The same widgets as the desktop app (not a re-implementation), laid out without being shown, waited on
until loading, inference and saliency have finished, then grabbed. Settings go to a throw-away file so
rendering never changes a user's preferences.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from PySide6.QtCore import QSettings, Qt

from kdviewer.errors import BundleError, ImageError, KDViewerError

RENDER_SIZE = (1600, 1000)


def render_case(
    case: str | os.PathLike,
    out: str | os.PathLike,
    bundle: str | os.PathLike | None = None,
    teacher: bool = False,
    saliency: str | None = None,
    timeout_s: float = 300.0,
    size: tuple[int, int] = RENDER_SIZE,
    answer: dict[str, str] | None = None,
    finding: str | None = None,
) -> Path:
    """Render ``case`` with ``bundle`` (default: the demo bundle) to ``out`` (PNG); returns the path.

    Raises the loading error (an `ImageError` / `BundleError`) when the case or the model cannot be
    opened, so scripts fail loudly instead of saving a picture of an error.

    ``answer``, when given, is filled with what the picture says in words: ``headline`` (the
    predictions panel's headline: the label, "No reliable answer" or "No answer for this image"),
    ``detail`` (the refusal reason / OOD warning / calibration line) and ``refused`` / ``ood_flag``.

    ``finding``: the class / finding the saliency map explains (default: the answer; multi-label: the
    finding furthest above its threshold).
    """
    from kdviewer.gui.app import ensure_app, initial_bundle
    from kdviewer.gui.main_window import MainWindow

    app = ensure_app()
    with tempfile.TemporaryDirectory(prefix="kdviewer-render-") as tmp:
        settings = QSettings(str(Path(tmp) / "render.ini"), QSettings.Format.IniFormat)
        win = MainWindow(settings=settings, restore=False, extra_tabs=False)
        win.setAttribute(Qt.WidgetAttribute.WA_DontShowOnScreen, True)
        win.warmup_models = False  # one case only: warming up would just double the work
        win.resize(*size)
        win.show()
        try:
            model = initial_bundle(str(bundle) if bundle else None, settings)
            if model is None:
                raise BundleError("no model bundle given and no demo bundle is installed")
            if saliency:
                panel = win.saliency_panel
                idx = panel.method.findText(saliency)
                if idx < 0:
                    raise KDViewerError(
                        f"unknown saliency method {saliency!r}; choose one of "
                        + ", ".join(panel.method.itemText(i) for i in range(panel.method.count()))
                    )
                panel.method.setCurrentIndex(idx)
                if teacher:
                    panel.set_mode("side")
                panel.enabled.setChecked(True)
            win.set_compare(teacher)
            win.load_bundle(model)
            if not win.wait_idle(timeout_s):
                raise KDViewerError(f"loading the model took longer than {timeout_s:.0f} s")
            if win.classifier is None:
                raise BundleError(win.last_error or f"could not load the model bundle {model}")
            if finding is not None and not win.saliency_panel.select_target(finding):
                raise KDViewerError(f"unknown finding {finding!r}; this model's classes: "
                                    + ", ".join(win.classifier.class_names))
            win.open_path(case)
            if not win.wait_idle(timeout_s):
                raise KDViewerError(f"rendering {case} took longer than {timeout_s:.0f} s")
            if win.study is None:
                raise ImageError(win.last_error or "could not open the case", None)
            app.processEvents()
            if answer is not None:
                panel = win.predictions
                pred = win.result.prediction if win.result is not None else None
                warn = panel.ood_box.text() if not panel.ood_box.isHidden() else ""
                answer.update(
                    headline=panel.headline.text(),
                    detail=warn or panel.subline.text(),
                    refused=(pred.refused or "") if pred is not None else "",
                    ood_flag="true" if pred is not None and pred.ood_flag else "false",
                )
            out_path = Path(out)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            if not win.grab().save(str(out_path), "PNG"):
                raise KDViewerError(f"could not write {out_path}")
            return out_path
        finally:
            win.runner.shutdown(3000)
            win.close()
            win.deleteLater()
            app.processEvents()
