"""Screenshots of the real, shown main window for the docs (run under Xvfb or on a desktop).

    xvfb-run -s "-screen 0 1600x1000x24" python -m kdviewer.gui.screenshots docs/screenshots

Writes ``cxr_saliency_teacher.png`` (DICOM radiograph, student vs teacher, side-by-side Grad-CAM),
``ct_lung_window.png`` (CT series, lung window, per-slice strip), ``error_state.png`` (a damaged file)
and ``dicom_sc_reopened.png`` (the radiograph's result exported with File > Export result as DICOM...,
its Secondary Capture opened back in the viewer) using the demo bundle and the shipped samples (or
--bundle / --cxr / --ct); ``--only NAME ...`` takes some of them.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from PySide6.QtCore import QSettings

from kdviewer.gui import logic


def _shoot(win, path: Path) -> Path:
    from PySide6.QtWidgets import QApplication

    for _ in range(5):
        QApplication.processEvents()
    win.grab().save(str(path), "PNG")
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="docs/screenshots")
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--cxr", default=None, help="radiograph (default: the shipped DICOM sample)")
    ap.add_argument("--ct", default=None, help="CT series folder (default: the shipped sample)")
    ap.add_argument("--size", default="1600x1000")
    ap.add_argument("--only", nargs="+", metavar="NAME", default=None,
                    help="cxr_saliency_teacher, ct_lung_window, error_state and/or dicom_sc_reopened")
    args = ap.parse_args(argv)
    wanted = set(args.only or ["cxr_saliency_teacher", "ct_lung_window", "error_state", "dicom_sc_reopened"])

    from PySide6.QtWidgets import QApplication

    from kdviewer.gui.app import ensure_app, initial_bundle
    from kdviewer.gui.main_window import MainWindow

    app = ensure_app(offscreen_if_headless=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = logic.resources_dir() / "samples"
    cxr = Path(args.cxr) if args.cxr else samples / "cxr_synthetic.dcm"
    ct = Path(args.ct) if args.ct else samples / "ct_synthetic"
    tmp = Path(tempfile.mkdtemp(prefix="kdviewer-shots-"))
    settings = QSettings(str(tmp / "shots.ini"), QSettings.Format.IniFormat)
    w, h = (int(v) for v in args.size.split("x"))
    win = MainWindow(settings=settings, restore=False)
    win.resize(w, h)
    win.show()
    bundle = initial_bundle(args.bundle, settings)
    if bundle:
        win.load_bundle(bundle)
        win.wait_idle(300)

    # 1. CXR with teacher comparison and side-by-side saliency
    if "cxr_saliency_teacher" in wanted:
        win.set_compare(True)
        win.saliency_panel.method.setCurrentText("gradcam")
        win.saliency_panel.set_mode("side")
        win.saliency_panel.enabled.setChecked(True)
        win.open_path(cxr)
        win.wait_idle(300)
        _shoot(win, out / "cxr_saliency_teacher.png")

    # 2. CT in the lung window, student saliency on the middle slice
    if "ct_lung_window" in wanted:
        win.saliency_panel.enabled.setChecked(True)
        win.saliency_panel.set_mode("student")
        win.open_path(ct)
        win.wait_idle(300)
        win.apply_preset("lung")
        win.wait_idle(300)
        _shoot(win, out / "ct_lung_window.png")

    # 3. An error state: a truncated PNG
    if "error_state" in wanted:
        broken = tmp / "damaged_scan.png"
        src = samples / "cxr_synthetic.png"
        broken.write_bytes(src.read_bytes()[:200] if src.is_file() else b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
        win.open_path(broken)
        win.wait_idle(60)
        _shoot(win, out / "error_state.png")

    # 4. The radiograph's result exported as DICOM (teacher compared), its Secondary Capture reopened
    if "dicom_sc_reopened" in wanted:
        win.saliency_panel.enabled.setChecked(False)
        win.set_compare(True)
        win.open_path(cxr)
        win.wait_idle(300)
        exported: list = []
        win.dicom_exported.connect(exported.append)
        win.export_dicom(tmp / "dicom")
        win.wait_idle(300)
        QApplication.processEvents()
        if not exported:
            raise SystemExit(f"the DICOM export failed: {win.last_error or win.message_bar.text()}")
        win.set_compare(False)
        win.open_path(exported[0].sc_path)
        win.wait_idle(300)
        _shoot(win, out / "dicom_sc_reopened.png")

    win.runner.shutdown()
    win.close()
    app.processEvents()
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
