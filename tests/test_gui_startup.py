"""Start-up: the student's first answer needs neither torch nor grad-cam; they are prepared afterwards."""

# ruff: noqa: F811 - pytest fixtures imported from test_gui_support are re-declared as arguments
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_gui_support import load_bundle_and_wait, settings, tiny_bundle, window  # noqa: F401 - fixtures

pytestmark = pytest.mark.gui

ROOT = Path(__file__).resolve().parents[1]

# A fresh interpreter (this test process has imported torch long ago): open the demo bundle and the
# sample DICOM in the real window, and record which heavy modules were loaded when the answer was shown.
SCRIPT = r"""
import json, sys, time
from PySide6.QtCore import QSettings
from kdviewer.gui.app import ensure_app
from kdviewer.gui.main_window import MainWindow
from kdviewer.models.bundle import default_bundle_path

app = ensure_app()
win = MainWindow(settings=QSettings(sys.argv[1], QSettings.Format.IniFormat), restore=False,
                 extra_tabs=False)
win.warmup_models = False  # no torch warm-up job racing the check below
seen = {}
win.analysis_shown.connect(lambda r: seen.update(
    label=r.prediction.label, torch="torch" in sys.modules, gradcam="pytorch_grad_cam" in sys.modules))
win.load_bundle(default_bundle_path())
win.open_path(sys.argv[2])
t0 = time.time()
while "label" not in seen and time.time() - t0 < 120:
    app.processEvents()
    time.sleep(0.01)
win.wait_idle(60)
win.runner.shutdown()
print(json.dumps(seen))
"""


def test_first_answer_does_not_import_torch(tmp_path: Path) -> None:
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    sample = ROOT / "resources" / "samples" / "cxr_synthetic.dcm"
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "s.ini"), str(sample)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen.get("label"), seen
    assert seen["torch"] is False and seen["gradcam"] is False, seen


def test_loading_a_bundle_prepares_saliency_in_the_background(qtbot, window, tiny_bundle) -> None:
    load_bundle_and_wait(window, tiny_bundle)
    assert window.wait_idle(120)
    assert "student" in window.classifier._torch_models  # built by analysis.warm_torch
