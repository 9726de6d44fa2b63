"""Single-case latency: deployed student (ONNX Runtime INT8) vs teacher (torch eager fp32), 2 threads.

One 224x224 grayscale case, preprocessing included on both sides (`preprocess_frame` with the same
manifest settings), timed round-robin so both see the same machine load. Without ``--model`` the
student is a ResNet-18 and the teacher a ResNet-50 with random weights of their real sizes (latency
does not depend on the weight values); the student is exported with the project's ONNX exporter and
statically quantized to INT8 (QDQ) on a few preprocessed phantoms.

Last line: ``RESULT latency_ratio <student_median / teacher_median>`` (goal <= 0.08).

    python benchmarks/latency.py [--model BUNDLE] [--runs 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
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
    student = OrtRuntime(int8_path, threads=args.threads)
    teacher.eval()
    study = Study(_case(224))
    frame = study.frames[0]

    def run_student() -> None:
        x = preprocess_frame(frame, pre, study)[None]
        logits, _ = student.predict(x)
        np.exp(logits - logits.max())

    def run_teacher() -> None:
        x = torch.from_numpy(preprocess_frame(frame, pre, study)[None])
        with torch.inference_mode():
            torch.softmax(teacher(x), dim=1)

    for _ in range(args.warmup):
        run_student()
        run_teacher()
    times: dict[str, list[float]] = {"student": [], "teacher": []}
    for _ in range(args.runs):
        for key, fn in (("student", run_student), ("teacher", run_teacher)):
            t0 = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - t0) * 1e3)
    s_med, t_med = statistics.median(times["student"]), statistics.median(times["teacher"])
    shape = f"{pre.channels}x{pre.input_size}x{pre.input_size}"
    print(f"threads: {args.threads}; runs: {args.runs}; input {shape}")
    print(f"student {names[0]}: median {s_med:.2f} ms (min {min(times['student']):.2f})")
    print(f"teacher {names[1]}: median {t_med:.2f} ms (min {min(times['teacher']):.2f})")
    print(f"RESULT latency_ratio {s_med / t_med:.4f}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
