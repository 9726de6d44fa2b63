"""Open-to-answer latency of the real viewer window on a 2048 x 2048 DICOM radiograph.

Measures, in the real `MainWindow` (offscreen Qt unless a display is set), the wall time from
`open_path()` until the student's and the teacher's predictions and the student's Grad-CAM overlay
have been *painted* (their result signals fired, then a synchronous repaint of the window finished).
The model bundle is loaded (and warmed up) before timing, as it is in a running app.

Compares, in the same run, the full answer (student + teacher + Grad-CAM) with the student alone and
prints the ratio. Also reports resident memory (RSS) with the demo student + teacher loaded.

    python benchmarks/open_to_answer.py [--bundle PATH] [--repeats 5]

Last line: ``RESULT open_to_answer_s <median seconds>``. Goal: <= 1.0 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def write_dicom(path: Path, size: int = 2048, seed: int = 0) -> Path:
    """A 2048 x 2048 12-bit DX radiograph (a synthetic chest phantom, labelled SYNTHETIC)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    try:
        from training.synth import render_cxr

        img, _mask = render_cxr(np.random.default_rng(seed), 0.5, size, True)
    except Exception:  # phantom generator unavailable: a smooth chest-like picture
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        img = 0.7 - 0.4 * np.exp(-(((xx - 0.33) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
        img -= 0.4 * np.exp(-(((xx - 0.67) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
        img += np.random.default_rng(seed).normal(0, 0.02, img.shape).astype(np.float32)
    img = np.clip(np.asarray(img, np.float32), 0, 1)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "DX", "SYNTHETIC^PHANTOM", "SYNTH-0001"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.175, 0.175]
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = (img * 4095).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


LAST_MARKS: dict[str, float] = {}


def time_open(win, path: Path, need_teacher: bool, need_saliency: bool, timeout_s: float = 120.0) -> float:
    from PySide6.QtCore import QCoreApplication, QEventLoop

    state = {"analysis": False, "saliency": not need_saliency}
    marks: dict[str, float] = {}

    def on_loaded(_study) -> None:
        marks["loaded"] = time.perf_counter() - t0

    def on_analysis(res) -> None:
        state["analysis"] = (res.comparison is not None) or not need_teacher
        marks["prediction shown"] = time.perf_counter() - t0

    def on_saliency(_res) -> None:
        state["saliency"] = True
        marks["saliency shown"] = time.perf_counter() - t0

    win.study_loaded.connect(on_loaded)
    win.analysis_shown.connect(on_analysis)
    win.saliency_shown.connect(on_saliency)
    app = QCoreApplication.instance()
    c0 = time.process_time()
    t0 = time.perf_counter()
    win.open_path(path)
    while not (state["analysis"] and state["saliency"]):
        app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 5)
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"no answer within {timeout_s} s ({state})")
        time.sleep(0.0005)
    win.repaint()  # synchronous paint of the whole window with the results
    elapsed = time.perf_counter() - t0
    marks["painted"] = elapsed
    marks["cpu"] = time.process_time() - c0  # all threads: contention-independent cost
    LAST_MARKS.clear()
    LAST_MARKS.update(marks)
    win.study_loaded.disconnect(on_loaded)
    win.analysis_shown.disconnect(on_analysis)
    win.saliency_shown.disconnect(on_saliency)
    win.wait_idle(timeout_s)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None, help="model bundle (default: the demo bundle)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=2048)
    args = ap.parse_args(argv)

    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from PySide6.QtCore import QSettings

    from kdviewer.gui.app import ensure_app, initial_bundle
    from kdviewer.gui.main_window import MainWindow

    rss0 = rss_mb()
    app = ensure_app()
    tmp = Path(tempfile.mkdtemp(prefix="kdviewer-bench-"))
    cases = [write_dicom(tmp / f"case{i}.dcm", args.size, seed=i) for i in range(args.repeats + 1)]
    settings = QSettings(str(tmp / "bench.ini"), QSettings.Format.IniFormat)
    win = MainWindow(settings=settings, restore=False, extra_tabs=False)
    win.resize(1600, 1000)
    win.show()
    bundle = initial_bundle(args.bundle, settings)
    if bundle is None:
        print("no bundle: pass --bundle or run scripts/make_demo_assets.py", file=sys.stderr)
        return 2
    win.set_compare(True)
    win.saliency_panel.method.setCurrentText("gradcam")
    win.saliency_panel.set_mode("student")
    win.saliency_panel.enabled.setChecked(True)
    t = time.perf_counter()
    win.load_bundle(bundle)
    win.wait_idle(300)
    if win.classifier is None:
        print(f"could not load {bundle}: {win.last_error}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t
    rss_models = rss_mb()
    print(
        f"bundle {bundle}: loaded + warmed up in {load_s:.2f} s; student {win.classifier.student.name}, "
        f"teacher {win.classifier.manifest.teacher.architecture if win.classifier.has_teacher else '-'}"
    )

    full: list[float] = []
    cpu: list[float] = []
    for c in cases:
        full.append(time_open(win, c, True, True))
        print("  open: " + ", ".join(f"{k} {v:.3f} s" for k, v in LAST_MARKS.items()), flush=True)
        cpu.append(LAST_MARKS["cpu"])
    cold, warm = full[0], full[1:]
    rss_full = rss_mb()
    win.set_compare(False)
    win.saliency_panel.enabled.setChecked(False)
    win.wait_idle(60)
    student_only = [time_open(win, c, False, False) for c in cases[1:]]

    med_full = statistics.median(warm)
    med_student = statistics.median(student_only)
    print(f"image {args.size}x{args.size} DICOM, {args.repeats} repeats (+1 first open)")
    print(f"first open (student + teacher + Grad-CAM):   {cold:.3f} s")
    spread = f"(min {min(warm):.3f}, max {max(warm):.3f})"
    print(f"median open (student + teacher + Grad-CAM):  {med_full:.3f} s  {spread}")
    print(f"median open (student only):                  {med_student:.3f} s")
    print(f"ratio full / student-only:                   {med_full / med_student:.2f}x")
    print(
        f"CPU time per full open (all threads):        {statistics.median(cpu[1:]):.3f} s "
        f"(machine load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    )
    print(f"timings of the last full open: {win.status_timing.text()}")
    print(
        f"RSS: interpreter+Qt {rss0:.0f} MB -> models loaded {rss_models:.0f} MB -> "
        f"after runs {rss_full:.0f} MB"
    )
    print(f"RESULT rss_mb {rss_full:.0f}")
    win.runner.shutdown()
    win.close()
    app.processEvents()
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"RESULT open_to_answer_s {med_full:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
