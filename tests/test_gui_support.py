"""Real files for the GUI tests: a PNG, a DICOM radiograph with PHI, a CT series, a corrupt file and a
tiny *trained* model bundle (student + teacher) — generated once per session, no mocks.

Imported by the other tests/test_gui*.py modules (fixtures are re-exported with `from ... import`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

CLASSES = ["normal", "nodule"]
INPUT = 32
BUNDLE_VERSION = "tiny-v1"


def blob_image(rng: np.random.Generator, size: int, lesion: bool) -> np.ndarray:
    """A chest-like phantom: two dark lungs on a bright body, plus a bright round 'nodule' when lesion."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = 0.75 - 0.1 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    for cx in (0.32, 0.68):
        lung = ((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
        img[lung] = 0.25
    if lesion:
        cx, cy = rng.uniform(0.25, 0.75), rng.uniform(0.3, 0.7)
        r = rng.uniform(0.05, 0.08)
        img[((xx - cx) ** 2 + (yy - cy) ** 2) < r * r] = 0.95
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def write_png(path: Path, size: int = 256, seed: int = 0, lesion: bool = True) -> Path:
    from PIL import Image

    img = blob_image(np.random.default_rng(seed), size, lesion)
    Image.fromarray((img * 255).astype(np.uint8)).save(path)
    return path


def _base_dataset(modality: str, rows: int, cols: int, name: str) -> object:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    sop_class = "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(name, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName = "SYNTHETIC^PHANTOM"
    ds.PatientID = "PHANTOM-0042"
    ds.PatientBirthDate = "19700101"
    ds.StudyDescription = "SYNTHETIC TEST STUDY"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12 if modality != "CT" else 16
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0 if modality != "CT" else 1
    ds.PixelSpacing = [0.5, 0.5] if modality == "CT" else [0.2, 0.2]
    del pydicom  # silence unused
    return ds


def write_dicom_radiograph(path: Path, size: int = 256, seed: int = 1, lesion: bool = True) -> Path:
    ds = _base_dataset("DX", size, size, str(path))
    img = blob_image(np.random.default_rng(seed), size, lesion)
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelData = (img * 4095).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ct_series(folder: Path, n: int = 6, size: int = 96, seed: int = 2) -> Path:
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    series, study = generate_uid(), generate_uid()
    for i in range(n):
        ds = _base_dataset("CT", size, size, str(folder / f"slice_{i:03d}.dcm"))
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series, study
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(-i * 2.5)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = 2.5
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        img = blob_image(rng, size, lesion=(i == n // 2))
        hu = (img - 0.25) / 0.5 * 1000 - 800  # lungs ~ -800 HU, body ~ +200 HU
        ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"slice_{i:03d}.dcm", enforce_file_format=True)
    return folder


def write_corrupt(path: Path) -> Path:
    """A file that claims to be a PNG but is truncated after the header."""
    data = Path(write_png(path.with_suffix(".tmp.png"))).read_bytes()
    path.write_bytes(data[:80])
    path.with_suffix(".tmp.png").unlink()
    return path


def build_tiny_bundle(out: Path, seed: int = 0, steps: int = 12) -> Path:
    """Train a small student (mobilenet_v3_small) and teacher (resnet18) for a few steps on phantoms and
    write a complete bundle: manifest, student.onnx, student.pt, teacher.pt, ood.npz."""
    import torch
    from torch import nn

    from kdviewer.inference.ood import fit_ood_stats, save_ood_stats
    from kdviewer.models.architectures import FeatureExtractor, build_model
    from kdviewer.models.bundle import save_manifest
    from kdviewer.models.manifest import Manifest, MetricWithCI, ModelSpec, OodSpec, Preprocessing
    from kdviewer.models.onnx_export import export_onnx
    from kdviewer.models.preprocess import preprocess_frame

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # two spinning threads are many times slower on a shared 2-core machine
    rng = np.random.default_rng(seed)
    pre = Preprocessing(input_size=INPUT, resize=INPUT, channels=1)
    n = 64
    labels = np.arange(n) % 2
    x = np.stack([preprocess_frame(blob_image(rng, 64, bool(lab)), pre) for lab in labels])
    xt, yt = torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))
    out.mkdir(parents=True, exist_ok=True)
    models = {}
    for role, arch in (("teacher", "resnet18"), ("student", "mobilenet_v3_small")):
        model = build_model(arch, 2, 1, 0.0)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        model.train()
        for _step in range(steps):
            idx = torch.from_numpy(rng.choice(n, 8, replace=False))
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        torch.save(model.state_dict(), out / f"{role}.pt")
        models[role] = model
    export_onnx(models["student"], out / "student.onnx", 1, INPUT, check=False)
    with torch.no_grad():
        logits, feats = FeatureExtractor(models["student"])(xt)
    acc = float((logits.argmax(1) == yt).float().mean())
    stats = fit_ood_stats(feats.numpy())
    save_ood_stats(out / "ood.npz", stats)
    from kdviewer.inference.ood import ood_scores

    thr = float(np.percentile(ood_scores(feats.numpy(), stats), 99)) * 1.5
    manifest = Manifest(
        name="tiny-test-bundle",
        class_names=CLASSES,
        positive_class="nodule",
        modality=["CR", "DX", "CT", "OT"],
        preprocessing=pre,
        student=ModelSpec(architecture="mobilenet_v3_small", weights="student.pt", onnx="student.onnx"),
        teacher=ModelSpec(architecture="resnet18", weights="teacher.pt"),
        ood=OodSpec(threshold=thr),
        metrics={
            "accuracy": MetricWithCI(value=acc, ci_low=max(0.0, acc - 0.1), ci_high=min(1.0, acc + 0.1))
        },
        metrics_split="train (test fixture)",
        training={"data": "test phantoms", "steps": steps},
        demo=True,
        synthetic_data=True,
    )
    save_manifest(out, manifest)
    (out / "model_card.md").write_text("Tiny bundle for GUI tests.\n", encoding="utf-8")
    json.loads((out / "manifest.json").read_text())
    return out


@pytest.fixture(scope="session")
def gui_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gui_data")
    folder = root / "cases"
    folder.mkdir()
    return {
        "png": write_png(folder / "cxr_phantom_synthetic.png"),
        "dicom": write_dicom_radiograph(folder / "radiograph.dcm"),
        "ct": write_ct_series(root / "ct_series"),
        "corrupt": write_corrupt(root / "broken.png"),
        "folder": folder,
        "root": root,
    }


@pytest.fixture(scope="session")
def tiny_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained once, then reused from pytest's cache folder across runs (keyed by BUNDLE_VERSION)."""
    cache = getattr(request.config, "cache", None)
    if cache is None:  # -p no:cacheprovider
        return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")
    import hashlib
    import os
    import shutil
    import tempfile

    # keyed by the code that shapes it (this file, the architectures, exporter, manifest, OOD), so an edit
    # never reuses a stale bundle; built in a private folder and renamed into place (concurrent runs)
    src = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(BUNDLE_VERSION.encode())
    for rel in ("tests/test_gui_support.py", "kdviewer/models/architectures.py",
                "kdviewer/models/manifest.py", "kdviewer/models/onnx_export.py",
                "kdviewer/models/preprocess.py", "kdviewer/inference/ood.py"):
        h.update((src / rel).read_bytes())
    base = Path(cache.mkdir("kdviewer-gui"))
    root = base / f"{BUNDLE_VERSION}-{h.hexdigest()[:12]}"
    if not (root / "manifest.json").is_file():
        tmp = Path(tempfile.mkdtemp(dir=base, prefix="partial-"))
        build_tiny_bundle(tmp / "tiny")
        try:
            os.rename(tmp / "tiny", root)
        except OSError:  # another run won the race: use its (equivalent) bundle
            if not (root / "manifest.json").is_file():
                raise
        shutil.rmtree(tmp, ignore_errors=True)
    return root


@pytest.fixture()
def settings(tmp_path: Path):
    from PySide6.QtCore import QSettings

    return QSettings(str(tmp_path / "kdviewer.ini"), QSettings.Format.IniFormat)


@pytest.fixture()
def window(qtbot, settings):
    from kdviewer.gui.main_window import MainWindow

    win = MainWindow(settings=settings, extra_tabs=False)
    qtbot.addWidget(win)
    win.resize(1400, 900)
    win.show()
    qtbot.waitExposed(win)
    yield win
    win.runner.shutdown(5000)


def open_and_wait(qtbot, win, path: Path, timeout_s: float = 60.0) -> None:
    win.open_path(path)
    assert win.wait_idle(timeout_s)


def load_bundle_and_wait(win, path: Path, timeout_s: float = 120.0) -> None:
    win.load_bundle(path)
    assert win.wait_idle(timeout_s)
    assert win.classifier is not None, win.last_error
