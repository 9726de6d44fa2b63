"""Cold start of the viewer: launch -> the student's first answer (and the first Grad-CAM) on screen.

Each variant runs in a fresh interpreter (a cold start is about imports), opening the demo bundle and
the sample DICOM in the real window (offscreen Qt unless a display is set):

* ``student-first`` (what ships): the bundle loads without torch (the deployed student is ONNX Runtime);
  torch and grad-cam are imported by a background job after the first answer;
* ``eager``: torch and grad-cam imported before the bundle is loaded, as the viewer did before — the
  first answer waits for them.

Last line: ``RESULT first_answer_speedup <eager seconds / student-first seconds>`` (medians).

    python benchmarks/startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, time
t0 = time.perf_counter()
if sys.argv[1] == "eager":
    import torch, pytorch_grad_cam  # noqa: F401
from PySide6.QtCore import QSettings
from kdviewer.gui.app import ensure_app
from kdviewer.gui.main_window import MainWindow
from kdviewer.models.bundle import default_bundle_path
app = ensure_app()
win = MainWindow(settings=QSettings(sys.argv[2], QSettings.Format.IniFormat), restore=False)
win.resize(1600, 1000)
win.show()
marks = {}
win.analysis_shown.connect(lambda r: marks.setdefault("answer", time.perf_counter() - t0))
win.saliency_shown.connect(lambda r: marks.setdefault("saliency", time.perf_counter() - t0))
win.saliency_panel.enabled.setChecked(True)
win.load_bundle(default_bundle_path())
win.open_path(sys.argv[3])
while len(marks) < 2 and time.perf_counter() - t0 < 300:
    app.processEvents()
    time.sleep(0.005)
win.runner.shutdown()
print("MARKS " + __import__("json").dumps(marks))
"""


def run_variant(variant: str, tmp: Path) -> dict[str, float]:
    env = dict(os.environ)
    if not (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY")):
        env.setdefault("QT_QPA_PLATFORM", "offscreen")
    sample = ROOT / "resources" / "samples" / "cxr_synthetic.dcm"
    out = subprocess.run(
        [sys.executable, "-c", CHILD, variant, str(tmp / f"{variant}.ini"), str(sample)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False,
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("MARKS ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[6:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {"student-first": [], "eager": []}
    with tempfile.TemporaryDirectory(prefix="kdviewer-startup-") as tmp_:
        for _ in range(args.repeats):  # alternate, so a drift in the machine's load hits both
            for variant in runs:
                marks = run_variant(variant, Path(tmp_))
                runs[variant].append(marks)
                a, s = marks["answer"], marks["saliency"]
                print(f"{variant:>13}: answer {a:.2f} s, Grad-CAM {s:.2f} s", flush=True)
    keys = ("answer", "saliency")
    med = {v: {k: statistics.median(m[k] for m in r) for k in keys} for v, r in runs.items()}
    for v, m in med.items():
        print(f"median {v:>13}: first answer {m['answer']:.2f} s, first Grad-CAM {m['saliency']:.2f} s")
    print(f"RESULT first_answer_speedup {med['eager']['answer'] / med['student-first']['answer']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
