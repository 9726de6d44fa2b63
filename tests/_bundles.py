"""Real tiny bundles for the inference / batch / CLI tests (owned by the inference room).

A student (ResNet-18) and a teacher (MobileNetV3-small) are trained for a few seconds on synthetic chest
phantoms (bright nodules inside the lung fields; masks kept for the pointing game), exported to ONNX
(fp32 + static INT8) with the project's exporter, with OOD statistics from their training features.

Built once per test process (memoised), in a temporary folder removed at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import binary_erosion
from torch import nn

from kdviewer.imaging.study import Study
from kdviewer.inference.ood import fit_ood_stats, ood_scores, save_ood_stats, threshold_from_scores
from kdviewer.models.architectures import FeatureExtractor, build_model
from kdviewer.models.bundle import save_manifest
from kdviewer.models.manifest import Manifest, ModelSpec, OodSpec, Preprocessing
from kdviewer.models.onnx_export import export_onnx
from kdviewer.models.preprocess import preprocess_frame

CLASSES = ["normal", "nodule"]
ORIG = (144, 128)  # non-square originals (H, W): geometry mapping must not assume squares
INPUT = 64
#: CAM layer of the test student. ResNet-18 'layer2' (stride 8) gives an 8x8 map at 64 px, the resolution
#: 'layer4' gives at the deployed 224 px (7x7). 'layer4' at 64 px would be 2x2, too coarse to point with;
#: 'layer3' (4x4) is also behind two barely trained stages after a few seconds of training.
STUDENT_CAM_LAYER = "layer2"
STUDENT_STEPS = 30


# ------------------------------------------------------------------------------------------ phantoms


def cxr_phantom(rng: np.random.Generator, positive: bool, shape: tuple[int, int] = ORIG
                ) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (H, W), lesion mask bool (H, W)) of a crude frontal chest radiograph."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    y, x = yy / h - 0.5, xx / w - 0.5
    img = np.full((h, w), 20.0, np.float32)
    body = (x / 0.46) ** 2 + (y / 0.52) ** 2 < 1
    img[body] = rng.uniform(130, 160)
    lungs = np.zeros((h, w), bool)
    for side in (-1, 1):
        cx = side * rng.uniform(0.17, 0.21)
        lungs |= ((x - cx) / rng.uniform(0.13, 0.16)) ** 2 + ((y + 0.03) / rng.uniform(0.28, 0.33)) ** 2 < 1
    img[lungs] = rng.uniform(45, 70)
    ribs = 6 * np.sin(2 * np.pi * (y * rng.uniform(9, 12) + 0.3 * np.abs(x)) + rng.uniform(0, 6))
    img += np.where(lungs, ribs, 0)
    img[(np.abs(x) < 0.05) & body] += 50  # spine / mediastinum
    mask = np.zeros((h, w), bool)
    if positive:
        r = rng.uniform(0.10, 0.13) * w
        inner = binary_erosion(lungs, iterations=max(1, int(r)))  # the nodule lies inside a lung field
        ly, lx = np.nonzero(inner if inner.any() else lungs)
        k = rng.integers(len(ly))
        cy, cx = ly[k], lx[k]
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        img += rng.uniform(90, 120) * np.exp(-d2 / (2 * (r / 1.5) ** 2))
        mask = d2 <= r**2
    img += rng.normal(0, 7, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8), mask


def ct_volume(rng: np.random.Generator, n: int = 6, size: int = 96) -> np.ndarray:
    """(n, size, size) float32 HU volume: air, a body of soft tissue, two lungs at -850 HU."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    vol = np.full((n, size, size), -1000.0, np.float32)
    for i in range(n):
        body = (xx / 0.45) ** 2 + (yy / 0.33) ** 2 < 1
        s = vol[i]
        s[body] = 40
        for side in (-1, 1):
            s[((xx - side * 0.2) / 0.16) ** 2 + (yy / 0.24) ** 2 < 1] = -850
        s[(xx**2 + (yy - 0.2) ** 2) < 0.004] = 700  # vertebra
        s += rng.normal(0, 20, s.shape)
    return vol


@dataclass
class PhantomSet:
    images: np.ndarray  # (N, H, W) uint8
    masks: np.ndarray  # (N, H, W) bool
    labels: np.ndarray  # (N,) int64


def phantom_set(n: int, seed: int) -> PhantomSet:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    rng.shuffle(labels)
    pairs = [cxr_phantom(rng, bool(lab)) for lab in labels]
    images, masks = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    return PhantomSet(images, masks, labels.astype(np.int64))


def preprocessing() -> Preprocessing:
    return Preprocessing(input_size=INPUT, resize=INPUT, channels=1, intensity="minmax")


def to_inputs(images: np.ndarray, pre: Preprocessing) -> np.ndarray:
    return np.stack([preprocess_frame(im.astype(np.float32), pre, Study(im)) for im in images])


# ------------------------------------------------------------------------------------------ training


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, steps: int, seed: int, lr: float = 2e-3,
          batch: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    g = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        idx = torch.from_numpy(g.choice(len(x), batch, replace=False))
        xb = xt[idx]
        if g.random() < 0.5:
            xb = torch.flip(xb, dims=[3])
        loss = nn.functional.cross_entropy(model(xb), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    recalibrate_bn(model, x)
    return model


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: np.ndarray) -> None:
    """Recompute BatchNorm running statistics with the final weights (a few dozen steps of training
    leave the running averages far behind the weights, and eval mode would then be at chance)."""
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average
    model.train()
    for i in range(0, len(x), 64):
        model(torch.from_numpy(x[i : i + 64]))
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.momentum = 0.1
    model.eval()


@torch.no_grad()
def features_of(model: nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fx = FeatureExtractor(model).eval()
    logits, feats = [], []
    for i in range(0, len(x), 64):
        lo, fe = fx(torch.from_numpy(x[i : i + 64]))
        logits.append(lo.numpy())
        feats.append(fe.numpy())
    return np.concatenate(logits), np.concatenate(feats)


# ------------------------------------------------------------------------------------------- bundles


@dataclass
class TestBundle:
    path: Path
    val: PhantomSet
    val_inputs: np.ndarray
    val_accuracy: float
    teacher_accuracy: float
    build_s: float


def write_bundle(out: Path, student: nn.Module, teacher: nn.Module | None, pre: Preprocessing,
                 x_train: np.ndarray, x_val: np.ndarray, *, int8: bool = True, name: str = "test-cxr"
                 ) -> Path:
    """Minimal bundle writer: manifest + state dicts + ONNX (fp32, INT8) + ood.npz."""
    out.mkdir(parents=True, exist_ok=True)
    torch.save(student.state_dict(), out / "student.pt")
    export_onnx(student, out / "student.onnx", pre.channels, pre.input_size)
    onnx_int8 = None
    parity: dict[str, float] = {}
    if int8:
        from training.quantize import quantize_onnx

        quantize_onnx(out / "student.onnx", out / "student.int8.onnx", x_train[:64])
        onnx_int8 = "student.int8.onnx"
        parity = {"recommended": 1.0, "agreement": 1.0}
    _, f_train = features_of(student, x_train)
    _, f_val = features_of(student, x_val)
    stats = fit_ood_stats(f_train)
    save_ood_stats(out / "ood.npz", stats)
    threshold = threshold_from_scores(ood_scores(f_val, stats), 99)
    tspec = None
    if teacher is not None:
        torch.save(teacher.state_dict(), out / "teacher.pt")
        tspec = ModelSpec(architecture=teacher.kd_spec.name, weights="teacher.pt",
                          target_layer=teacher.kd_spec.target_layer)
    manifest = Manifest(
        name=name,
        class_names=CLASSES,
        positive_class="nodule",
        preprocessing=pre,
        student=ModelSpec(architecture=student.kd_spec.name, weights="student.pt", onnx="student.onnx",
                          onnx_int8=onnx_int8, target_layer=STUDENT_CAM_LAYER,
                          params=sum(p.numel() for p in student.parameters())),
        teacher=tspec,
        ood=OodSpec(method="mahalanobis", stats="ood.npz", threshold=threshold),
        synthetic_data=True,
        int8_parity=parity,
        training={"note": "tests/_bundles.py: a few seconds on synthetic phantoms"},
    )
    save_manifest(out, manifest)
    return out


_ROOT: Path | None = None
_CACHE: dict[str, TestBundle] = {}


def scratch() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="kdviewer-test-bundles-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


#: Sources whose change invalidates a cached test bundle: this helper and every module the builder
#: imports, directly or not (models, imaging, the OOD statistics, the quantizer, the error types).
_KEY_GLOBS = (
    "tests/_bundles.py",
    "kdviewer/__init__.py",
    "kdviewer/errors.py",
    "kdviewer/models/*.py",
    "kdviewer/imaging/*.py",
    "kdviewer/inference/__init__.py",
    "kdviewer/inference/ood.py",
    "training/__init__.py",
    "training/quantize.py",
)


def _cache_dir() -> Path | None:
    """Where built bundles are kept between test runs (KDVIEWER_TEST_CACHE=0 turns this off).

    Safe under concurrent runs: the key hashes every source file that can shape the bundle plus the
    torch/onnxruntime/numpy versions and the thread count it is trained with; a bundle is built in a
    private folder and renamed into place in one step (a loser of the race keeps its own copy); and
    `_cached_ok` checks the files' hashes recorded at build time before a cached bundle is used.
    """
    import hashlib
    import os

    setting = os.environ.get("KDVIEWER_TEST_CACHE", "")
    if setting == "0":
        return None
    import onnxruntime

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(f"{torch.__version__} {onnxruntime.__version__} {np.__version__} {THREADS}".encode())
    for pattern in _KEY_GLOBS:
        for p in sorted(root.glob(pattern)):
            if "__pycache__" not in p.parts:
                h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    base = Path(setting) if setting else Path(tempfile.gettempdir()) / "kdviewer-test-cache"
    return base / h.hexdigest()[:16]


#: torch threads the shared bundle is trained with (part of the cache key: results depend on it).
THREADS = 2


def _file_hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != "info.json"}


def _cached_ok(done: Path) -> dict | None:
    """info.json of a complete cached bundle whose files still hash as recorded, else None."""
    try:
        info = json.loads((done / "info.json").read_text())
        return info if info.get("files") == _file_hashes(done) else None
    except (OSError, ValueError):
        return None


def cxr_bundle() -> TestBundle:
    """The shared trained CXR bundle (student ResNet-18 + teacher MobileNetV3-small)."""
    if "cxr" in _CACHE:
        return _CACHE["cxr"]
    t0 = time.perf_counter()
    pre = preprocessing()
    va = phantom_set(96, seed=2)
    x_va = to_inputs(va.images, pre)
    cache = _cache_dir()
    done = cache / "cxr" if cache is not None else None
    info = _cached_ok(done) if done is not None else None
    if info is not None:
        _CACHE["cxr"] = TestBundle(done, va, x_va, info["acc"], info["tacc"], time.perf_counter() - t0)
        return _CACHE["cxr"]
    torch.set_num_threads(THREADS)
    tr = phantom_set(256, seed=1)
    x_tr = to_inputs(tr.images, pre)
    # Seed *before* building: the initial weights come from torch's global generator, whose state
    # otherwise depends on which tests ran earlier in this process (the pointing game then swung from
    # 27/32 to 14/32 between a bundle built early in one run and one built later in another).
    torch.manual_seed(0)
    student = train(build_model("resnet18", 2, 1), x_tr, tr.labels, steps=STUDENT_STEPS, seed=0, lr=1e-3)
    torch.manual_seed(1)
    teacher = train(build_model("mobilenet_v3_small", 2, 1), x_tr, tr.labels, steps=12, seed=1, lr=3e-3)
    acc = float((features_of(student, x_va)[0].argmax(1) == va.labels).mean())
    tacc = float((features_of(teacher, x_va)[0].argmax(1) == va.labels).mean())
    path = write_bundle(scratch() / "cxr", student, teacher, pre, x_tr, x_va)
    (path / "info.json").write_text(json.dumps({"acc": acc, "tacc": tacc, "files": _file_hashes(path)}))
    if done is not None:
        try:
            done.parent.mkdir(parents=True, exist_ok=True)
            if done.exists() and _cached_ok(done) is None:  # damaged or half-copied by hand: replace it
                stale = Path(tempfile.mkdtemp(dir=done.parent, prefix="stale-"))
                os.rename(done, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(dir=done.parent))
            shutil.copytree(path, tmp / "cxr")
            os_replace_dir(tmp / "cxr", done)
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
    _CACHE["cxr"] = TestBundle(path, va, x_va, acc, tacc, time.perf_counter() - t0)
    return _CACHE["cxr"]


def ct_reading_bundle() -> Path:
    """The shared CXR bundle declaring CT among the modalities it reads (for series-aggregate tests; the
    real CXR bundle refuses CT through the modality gate)."""
    if "cxr-ct" not in _CACHE:
        path = copy_bundle(cxr_bundle().path, scratch() / "cxr-ct", modality=["CR", "DX", "CT"])
        _CACHE["cxr-ct"] = TestBundle(path, *list(vars(cxr_bundle()).values())[1:])
    return _CACHE["cxr-ct"].path


def write_ct_png(path: Path, slice_hu: np.ndarray) -> Path:
    """A CT slice saved as an ordinary picture (lung window, no DICOM modality: the gate lets it through,
    the OOD guard judges it)."""
    lo, hi = -1350.0, 150.0
    return write_png(path, (np.clip((slice_hu - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8))


def os_replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place atomically (another process may have won the race)."""
    import os

    try:
        os.rename(src, dst)
    except OSError:
        if not (dst / "info.json").is_file():
            raise


def copy_bundle(src: Path, dst: Path, **manifest_changes: object) -> Path:
    """Copy a bundle folder and patch top-level manifest fields (JSON values)."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m.update(manifest_changes)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


# ---------------------------------------------------------------------------------------------- files


def write_png(path: Path, image: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    modality: str = "CR",
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    position_z: float | None = None,
    instance: int = 1,
    rescale: tuple[float, float] | None = None,
) -> Path:
    """A minimal valid DICOM image (uint16, MONOCHROME2). CT: pass HU pixels and ``rescale``."""
    from pydicom.dataset import Dataset as DcmDataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    sop_class = CTImageStorage if modality == "CT" else "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DcmDataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.PatientName = "Phantom^Test"
    ds.PatientID = "TEST-0001"
    ds.InstanceNumber = instance
    ds.SeriesDescription = "synthetic phantom"
    arr = np.asarray(pixels, np.float64)
    if rescale is not None:
        slope, intercept = rescale
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        arr = (arr - intercept) / slope
    stored = np.clip(np.round(arr), 0, 65535).astype(np.uint16)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing = [0.7, 0.7]
    if position_z is not None:
        ds.ImagePositionPatient = [0.0, 0.0, float(position_z)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceThickness = 2.5
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ct_series(folder: Path, volume_hu: np.ndarray) -> list[Path]:
    """One CT series (one file per slice, HU via rescale -1024) in ``folder``."""
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    return [
        write_dicom(folder / f"slice{i:03d}.dcm", s, "CT", study_uid=study, series_uid=series,
                    position_z=-2.5 * i, instance=i + 1, rescale=(1.0, -1024.0))
        for i, s in enumerate(volume_hu)
    ]
