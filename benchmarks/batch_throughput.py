"""Folder throughput: `run_batch` (what ``kdviewer classify`` runs) vs a naive one-image-at-a-time loop.

Same folders (1024x1024 PNG + DICOM, and a JPEG folder), same student network (ResNet-18, 224 px, 1
channel; random weights unless ``--model``):

* naive: PIL / pydicom open -> torchvision transforms (resize, centre crop, tensor, normalise) -> torch
  eager fp32, one image at a time;
* kdviewer: ``run_batch`` = decoding + manifest preprocessing in worker processes, ONNX Runtime (the
  bundle's deployed student; INT8 when recommended) on batches, CSV written row by row. Its time
  includes opening the bundle and starting the worker pool;
* kdviewer on Dask: the same with ``cluster="local:N"`` (N = ``--workers``), its time including the
  start of the LocalCluster; skipped with ``--no-cluster`` or when dask is not installed. The pool and
  the cluster run ``--pairs`` times in turn (pool, cluster, pool, ...): this machine's speed drifts
  by 15-45% between minutes, so each pair gives one ratio and the median of them is the result.

First it prints where one file's time goes in kdviewer's pipeline (read, decode to a `Study`,
preprocess to the model input, infer; median ms per file over a sample, one process), with the naive
loop's stages beside them.

Lines ``RESULT jpeg_speedup`` (kdviewer / naive on the JPEG folder) and ``RESULT cluster_vs_pool``
(Dask local cluster / built-in pool images/s on the PNG + DICOM folder, goal >= 0.9), then last
``RESULT batch_speedup <kdviewer images/s / naive images/s>`` on the PNG + DICOM folder (goal >= 3).

    python benchmarks/batch_throughput.py [--files 48] [--model BUNDLE] [--workers 2] [--threads 2]
                                          [--no-cluster] [--no-naive] [--pairs 3]
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


def make_folder(folder: Path, n: int, seed: int = 0, jpeg: bool = False) -> None:
    """``n`` phantoms: alternately PNG (8-bit) and DICOM (12-bit), or all JPEG (8-bit, quality 90)."""
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = _phantom(rng)
        if jpeg:
            Image.fromarray((img / 16).astype(np.uint8)).save(folder / f"cxr{i:03d}.jpg", quality=90)
            continue
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


def _naive_open(f: Path) -> object:
    import pydicom
    from PIL import Image

    if f.suffix == ".dcm":
        arr = pydicom.dcmread(f).pixel_array.astype(np.float32)
        return Image.fromarray((arr / max(float(arr.max()), 1.0) * 255).astype(np.uint8))
    return Image.open(f).convert("L")


def stage_costs(files: list[Path], bundle_path: Path, model: object, threads: int, batch_size: int) -> None:
    """Median ms per file of each stage, one process, kdviewer's pipeline and the naive loop's."""
    import torch
    from torchvision import transforms as T

    from kdviewer.imaging import load
    from kdviewer.inference.predict import Classifier
    from kdviewer.models.preprocess import preprocess_frame

    clf = Classifier(bundle_path, threads=threads)
    tf = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.5], [0.25])])
    by_kind: dict[str, dict[str, list[float]]] = {}
    inputs = []
    for f in files:
        st = by_kind.setdefault(f.suffix.lstrip(".").upper(), {})

        def clock(name: str, fn, st=st):
            t0 = time.perf_counter()
            out = fn()
            st.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)
            return out

        clock("read", f.read_bytes)
        study = clock("decode", lambda f=f: load(f))
        x = clock("preprocess", lambda study=study: preprocess_frame(study.frames[0], clf.pre, study))
        inputs.append(x)
        img = clock("naive open+decode", lambda f=f: _naive_open(f))
        t = clock("naive transforms", lambda img=img: tf(img)[None])
        with torch.inference_mode():
            clock("naive torch fp32", lambda t=t: model(t))
    clf.predict_batch(inputs[:batch_size])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(inputs), batch_size):
        clf.predict_batch(inputs[i : i + batch_size])
    infer = (time.perf_counter() - t0) * 1e3 / len(inputs)
    print(f"per-file stage costs, median ms (one process; kdviewer infers with ORT "
          f"{'INT8' if clf.int8 else 'fp32'}, {threads} threads, batches of {batch_size}):")
    for kind, st in sorted(by_kind.items()):
        med = {k: float(np.median(v)) for k, v in st.items()}
        ours = med["decode"] + med["preprocess"] + infer
        naive = med["naive open+decode"] + med["naive transforms"] + med["naive torch fp32"]
        print(f"  {kind:5s} kdviewer: read {med['read']:.1f} (in decode) | decode {med['decode']:.1f} | "
              f"preprocess {med['preprocess']:.1f} | infer {infer:.1f} | total {ours:.1f}")
        print(f"  {kind:5s} naive:    open+decode {med['naive open+decode']:.1f} | transforms "
              f"{med['naive transforms']:.1f} | torch fp32 {med['naive torch fp32']:.1f} | total {naive:.1f}")


def naive_loop(files: list[Path], model: object, threads: int) -> float:
    """PIL/pydicom open + torchvision transforms + torch eager, one image at a time; returns seconds."""
    import torch
    from torchvision import transforms as T

    torch.set_num_threads(threads)
    tf = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.5], [0.25])])
    t0 = time.perf_counter()
    with torch.inference_mode():
        for f in files:
            torch.softmax(model(tf(_naive_open(f))[None]), dim=1)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=48)
    ap.add_argument("--model", help="bundle to use (default: a random-weight ResNet-18 bundle)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-cluster", action="store_true", help="skip the Dask --cluster local:N variant")
    ap.add_argument("--pairs", type=int, default=3,
                    help="pool/cluster runs in turn; RESULT cluster_vs_pool is the median of their ratios")
    ap.add_argument("--no-naive", action="store_true",
                    help="skip stage costs, naive loop and JPEG folder: built-in pool vs cluster only")
    args = ap.parse_args(argv)

    from kdviewer.batch import run_batch
    from kdviewer.models.bundle import open_bundle

    try:
        import distributed  # noqa: F401

        cluster = not args.no_cluster
    except ImportError:
        print("dask distributed is not installed: the --cluster variant is skipped")
        cluster = False

    def kd_run(folder: Path, out: Path, spec: str | None = None) -> tuple[float, float]:
        """(images/s over the whole run, images/s from the first row to the last)."""
        stamps: list[float] = []
        t0 = time.perf_counter()
        summary = run_batch(folder, bundle_path, out, workers=args.workers, batch_size=args.batch_size,
                            threads=args.threads, cluster=spec,
                            progress=lambda p: stamps.append(time.perf_counter()))
        wall = time.perf_counter() - t0
        n = summary.processed
        assert n == len(list(folder.iterdir())) and summary.errors == 0, summary
        steady = (n - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else 0.0
        return n / wall, steady

    with tempfile.TemporaryDirectory(prefix="kd-batch-bench-") as tmp:
        tmpd = Path(tmp)
        folder, jfolder = tmpd / "cases", tmpd / "jpeg"
        make_folder(folder, args.files)
        make_folder(jfolder, args.files, seed=1, jpeg=True)
        bundle_path = Path(args.model) if args.model else make_bundle(tmpd / "bundle")
        files = sorted(p for p in folder.iterdir())
        jfiles = sorted(p for p in jfolder.iterdir())
        model = open_bundle(bundle_path).build_torch("student")

        if not args.no_naive:
            stage_costs(files[:8] + jfiles[:4], bundle_path, model, args.threads, args.batch_size)
            naive_loop(files[:2], model, args.threads)  # warm the torch kernels
            t_naive = naive_loop(files, model, args.threads)
        kd_rate, kd_steady = kd_run(folder, tmpd / "out.csv")
        pairs: list[tuple[float, float, float, float]] = []  # pool rate, steady, cluster rate, steady
        for i in range(max(1, args.pairs) if cluster else 0):
            pool = (kd_rate, kd_steady) if i == 0 else kd_run(folder, tmpd / f"out{i}.csv")
            pairs.append((*pool, *kd_run(folder, tmpd / f"out_dask{i}.csv", f"local:{args.workers}")))
        if not args.no_naive:
            t_naive_j = naive_loop(jfiles, model, args.threads)
            kd_rate_j, _ = kd_run(jfolder, tmpd / "out_j.csv")
    print(f"{len(files)} files (1024x1024, PNG + DICOM) and {len(jfiles)} JPEG; workers {args.workers}, "
          f"threads {args.threads}")
    for pool_rate, pool_steady, dk_rate, dk_steady in pairs:
        print(f"kdviewer classify: built-in pool {pool_rate:.2f} img/s (first to last row "
              f"{pool_steady:.2f}), --cluster local:{args.workers} (Dask, cluster start included) "
              f"{dk_rate:.2f} img/s (first to last row {dk_steady:.2f}): ratio {dk_rate / pool_rate:.3f}")
    if pairs:
        ratios = [dk / pool for pool, _, dk, _ in pairs]
        print(f"RESULT cluster_vs_pool {statistics.median(ratios):.3f} (median of {len(ratios)} pairs)")
    if args.no_naive:
        return 0
    naive_rate, naive_rate_j = len(files) / t_naive, len(jfiles) / t_naive_j
    print(f"naive loop (PIL/pydicom + torchvision + torch eager fp32, one at a time): {naive_rate:.2f} img/s"
          f"; "
          f"JPEG {naive_rate_j:.2f}")
    print(f"kdviewer classify (run_batch: worker decode + ORT batches): {kd_rate:.2f} img/s "
          f"(first to last row {kd_steady:.2f}); JPEG {kd_rate_j:.2f}")
    print(f"RESULT jpeg_speedup {kd_rate_j / naive_rate_j:.3f}")
    print(f"RESULT batch_speedup {kd_rate / naive_rate:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
