"""Single-case latency: deployed student (ONNX Runtime INT8) vs teacher (torch eager fp32), 2 threads.

One 224x224 grayscale case, preprocessing included on both sides (`preprocess_frame` with the same
manifest settings), timed round-robin so both see the same machine load. Without ``--model`` the
student is a ResNet-18 and the teacher a ResNet-50 with random weights of their real sizes (latency
does not depend on the weight values); the student is exported with the project's ONNX exporter and
statically quantized to INT8 (QDQ) on a few preprocessed phantoms.

Last line: ``RESULT latency_ratio <student_median / teacher_median>`` (goal <= 0.08).

``--teacher-onnx`` also times the teacher as the student is deployed, in ONNX Runtime: exported fp32 and
statically quantized to INT8 (every layer, calibrated on 16 phantoms: for its speed, not its answers), in
the same round-robin, with a ``RESULT latency_ratio_vs_teacher_ort_fp32`` / ``..._int8`` line each: how much
of the ratio is the smaller network and how much the runtime. Every ONNX Runtime session then sleeps
between operators instead of spin-waiting (``spin=False``): three spinning thread pools in one process
take the cores from whichever model runs next (the student's median doubled at 2 threads).

    python benchmarks/latency.py [--model BUNDLE] [--runs 40] [--threads 2] [--teacher-onnx]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _case(size: int = 224, seed: int = 0) -> np.ndarray:
    """A 224x224 chest-like frame (uint8 range, float32)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    img = np.full((size, size), 20.0, np.float32)
    img[(xx / 0.46) ** 2 + (yy / 0.5) ** 2 < 1] = 140
    for side in (-1, 1):
        img[((xx - side * 0.19) / 0.14) ** 2 + (yy / 0.3) ** 2 < 1] = 60
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.float32)


def _random_models(tmp: Path, channels: int, size: int) -> tuple[Path, object]:
    import torch

    from kdviewer.models.architectures import build_model
    from kdviewer.models.manifest import Preprocessing
    from kdviewer.models.onnx_export import export_onnx
    from kdviewer.models.preprocess import preprocess_frame
    from training.quantize import quantize_onnx

    torch.manual_seed(0)
    student = build_model("resnet18", 2, channels).eval()
    teacher = build_model("resnet50", 2, channels).eval()
    fp32 = export_onnx(student, tmp / "student.onnx", channels, size)
    pre = Preprocessing(input_size=size, resize=size, channels=channels)
    calib = np.stack([preprocess_frame(_case(size, s), pre) for s in range(16)])
    int8 = quantize_onnx(fp32, tmp / "student.int8.onnx", calib)
    return int8, teacher


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="bundle with a student ONNX and teacher.pt (default: random weights)")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--teacher-onnx", action="store_true",
                    help="also time the teacher in ONNX Runtime, fp32 and INT8 (see above)")
    args = ap.parse_args(argv)

    import torch

    from kdviewer.imaging.study import Study
    from kdviewer.models.manifest import Preprocessing
    from kdviewer.models.preprocess import preprocess_frame
    from kdviewer.models.runtime import OrtRuntime

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="kd-latency-")
    if args.model:
        from kdviewer.models.bundle import open_bundle

        bundle = open_bundle(args.model)
        pre = bundle.manifest.preprocessing
        # the student as the viewer deploys it: INT8 when the bundle ships it, else its fp32 ONNX
        int8_path = bundle.onnx_path(int8=True) or bundle.onnx_path()
        if int8_path is None:
            raise SystemExit("the bundle has no student ONNX file")
        kind = "INT8" if int8_path == bundle.onnx_path(int8=True) else "fp32"
        teacher = bundle.build_torch("teacher")
        m = bundle.manifest
        names = (f"{m.student.architecture} {kind} (ORT)", f"{m.teacher.architecture} fp32 (torch eager)")  # type: ignore[union-attr]
    else:
        pre = Preprocessing(input_size=224, resize=224, channels=1)
        int8_path, teacher = _random_models(Path(tmp.name), 1, 224)
        names = ("resnet18 INT8 (ORT)", "resnet50 fp32 (torch eager)")
    spin = not args.teacher_onnx  # see the module docstring
    teacher.eval()
    study = Study(_case(224))
    frame = study.frames[0]

    def ort_runner(path: Path) -> Callable[[], None]:
        rt = OrtRuntime(path, threads=args.threads, spin=spin)

        def run() -> None:
            logits, _ = rt.predict(preprocess_frame(frame, pre, study)[None])
            np.exp(logits - logits.max())

        return run

    def run_teacher() -> None:
        x = torch.from_numpy(preprocess_frame(frame, pre, study)[None])
        with torch.inference_mode():
            torch.softmax(teacher(x), dim=1)

    runners = {"student": ort_runner(int8_path), "teacher": run_teacher}
    labels = {"student": names[0], "teacher": names[1]}
    if args.teacher_onnx:
        from kdviewer.models.onnx_export import export_onnx
        from training.quantize import quantize_onnx

        t32 = export_onnx(teacher, Path(tmp.name) / "teacher.onnx", pre.channels, pre.input_size)
        calib = np.stack([preprocess_frame(_case(pre.input_size, s), pre) for s in range(16)])
        t8 = quantize_onnx(t32, Path(tmp.name) / "teacher.int8.onnx", calib)
        for key, path in (("teacher_ort_fp32", t32), ("teacher_ort_int8", t8)):
            runners[key] = ort_runner(path)
            labels[key] = f"{names[1].split()[0]} {'fp32' if key.endswith('fp32') else 'INT8'} (ORT)"

    for _ in range(args.warmup):
        for fn in runners.values():
            fn()
    times: dict[str, list[float]] = {key: [] for key in runners}
    for _ in range(args.runs):
        for key, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - t0) * 1e3)
    med = {key: statistics.median(v) for key, v in times.items()}
    shape = f"{pre.channels}x{pre.input_size}x{pre.input_size}"
    print(f"threads: {args.threads}; runs: {args.runs}; input {shape}")
    for key in runners:
        print(f"{key.split('_')[0]} {labels[key]}: median {med[key]:.2f} ms (min {min(times[key]):.2f})")
    for key in runners:
        if key.startswith("teacher_"):
            print(f"RESULT latency_ratio_vs_{key} {med['student'] / med[key]:.4f}")
    print(f"RESULT latency_ratio {med['student'] / med['teacher']:.4f}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
