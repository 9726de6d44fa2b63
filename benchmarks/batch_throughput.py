"""Folder throughput: `run_batch` (what ``kdviewer classify`` runs) vs a naive one-image-at-a-time loop.

Same folder (1024x1024 PNG and DICOM files), same student network (ResNet-18, 224 px, 1 channel;
random weights unless ``--model``):

* naive: PIL / pydicom open -> torchvision transforms (resize, centre crop, tensor, normalise) -> torch
  eager fp32, one image at a time;
* kdviewer: ``run_batch`` = decoding + manifest preprocessing in worker processes, ONNX Runtime (the
  bundle's deployed student; INT8 when recommended) on batches, CSV written row by row. Its time
  includes opening the bundle and starting the worker pool.

Last line: ``RESULT batch_speedup <kdviewer images/s / naive images/s>`` (goal >= 3).

    python benchmarks/batch_throughput.py [--files 48] [--model BUNDLE] [--workers 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _phantom(rng: np.random.Generator, size: int = 1024) -> np.ndarray:
    """A 1024x1024 chest-like 12-bit frame."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    img = np.full((size, size), 200.0, np.float32)
    img[(xx / 0.46) ** 2 + (yy / 0.5) ** 2 < 1] = rng.uniform(2000, 2600)
    for side in (-1, 1):
        cx = side * rng.uniform(0.17, 0.21)
        img[((xx - cx) / 0.14) ** 2 + ((yy + 0.03) / 0.3) ** 2 < 1] = rng.uniform(700, 1000)
    img += rng.normal(0, 60, img.shape).astype(np.float32)
    return np.clip(img, 0, 4095)


def make_folder(folder: Path, n: int, seed: int = 0) -> None:
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = _phantom(rng)
        if i % 2 == 0:
            Image.fromarray((img / 16).astype(np.uint8)).save(folder / f"cxr{i:03d}.png")
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.Modality = "DX"
        ds.Rows, ds.Columns = img.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = img.astype(np.uint16).tobytes()
        ds.save_as(folder / f"cxr{i:03d}.dcm", enforce_file_format=True)


def make_bundle(out: Path) -> Path:
    import torch

    from kdviewer.models.architectures import build_model
    from kdviewer.models.bundle import save_manifest
    from kdviewer.models.manifest import Manifest, ModelSpec, Preprocessing
    from kdviewer.models.onnx_export import export_onnx
    from kdviewer.models.preprocess import preprocess_frame
    from training.quantize import quantize_onnx

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model("resnet18", 2, 1).eval()
    torch.save(model.state_dict(), out / "student.pt")
    export_onnx(model, out / "student.onnx", 1, 224)
    pre = Preprocessing(input_size=224, resize=224, channels=1, intensity="minmax")
    rng = np.random.default_rng(1)
    calib = np.stack([preprocess_frame(_phantom(rng, 256), pre) for _ in range(16)])
    quantize_onnx(out / "student.onnx", out / "student.int8.onnx", calib)
    save_manifest(out, Manifest(
        name="benchmark-random-resnet18",
        class_names=["normal", "abnormal"],
        preprocessing=pre,
        student=ModelSpec(architecture="resnet18", weights="student.pt", onnx="student.onnx",
                          onnx_int8="student.int8.onnx", target_layer="layer4"),
        int8_parity={"recommended": 1.0},
    ))
    return out


def naive_loop(files: list[Path], model: object, threads: int) -> float:
    """PIL/pydicom open + torchvision transforms + torch eager, one image at a time; returns seconds."""
    import pydicom
    import torch
    from PIL import Image
    from torchvision import transforms as T

    torch.set_num_threads(threads)
    tf = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.5], [0.25])])
    t0 = time.perf_counter()
    with torch.inference_mode():
        for f in files:
            if f.suffix == ".dcm":
                arr = pydicom.dcmread(f).pixel_array.astype(np.float32)
                img = Image.fromarray((arr / max(float(arr.max()), 1.0) * 255).astype(np.uint8))
            else:
                img = Image.open(f).convert("L")
            torch.softmax(model(tf(img)[None]), dim=1)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=48)
    ap.add_argument("--model", help="bundle to use (default: a random-weight ResNet-18 bundle)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)

    from kdviewer.batch import run_batch
    from kdviewer.models.bundle import open_bundle

    with tempfile.TemporaryDirectory(prefix="kd-batch-bench-") as tmp:
        tmpd = Path(tmp)
        folder = tmpd / "cases"
        make_folder(folder, args.files)
        bundle_path = Path(args.model) if args.model else make_bundle(tmpd / "bundle")
        files = sorted(p for p in folder.iterdir())
        model = open_bundle(bundle_path).build_torch("student")

        naive_loop(files[:2], model, args.threads)  # warm the torch kernels
        t_naive = naive_loop(files, model, args.threads)
        t0 = time.perf_counter()
        summary = run_batch(folder, bundle_path, tmpd / "out.csv", workers=args.workers,
                            batch_size=args.batch_size, threads=args.threads)
        t_kd = time.perf_counter() - t0
        assert summary.processed == len(files) and summary.errors == 0, summary
    naive_rate, kd_rate = len(files) / t_naive, len(files) / t_kd
    print(f"{len(files)} files (1024x1024, PNG + DICOM); workers {args.workers}, threads {args.threads}")
    print(f"naive loop (PIL/pydicom + torchvision + torch eager fp32, one at a time): {naive_rate:.2f} img/s")
    print(f"kdviewer classify (run_batch: worker decode + ORT batches): {kd_rate:.2f} img/s")
    print(f"RESULT batch_speedup {kd_rate / naive_rate:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
