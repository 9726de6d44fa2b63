"""Synthetic chest phantoms for tests, demos and benchmarks — labelled SYNTHETIC wherever they appear.

Two kinds:

* ``cxr``: a frontal chest radiograph phantom (body outline, lungs, heart, ribs, spine, clavicles,
  diaphragm domes, exposure variation, quantum noise). Classes ``normal`` / ``pneumonia``;
  pneumonia cases carry patchy consolidations strictly inside the lungs.
* ``ct``: axial chest CT slices in Hounsfield units (air -1000, lung ~-850 with vessels, fat ~-100,
  soft tissue ~40, bone ~700, table) written as real CT DICOM. Classes ``mild`` / ``severe``: severe
  cases carry ground-glass (~-500 HU) and consolidation (~30 HU); mild cases have a small lesion or none.

``difficulty`` in [0, 1] makes lesions fainter and smaller and anatomy/noise more variable, so model
comparisons are not trivially 100 %.

Output of `generate` (an image-folder dataset)::

    OUT/<class>/<case_id>.png | .dcm         (ct with series_slices > 1: OUT/<class>/<case_id>/slice_NNN.dcm)
    OUT/masks/<case_id>.png                  binary lesion mask (0/255), same geometry; all zero if none
    OUT/labels.csv                           path,label,patient_id,bbox_x0,bbox_y0,bbox_x1,bbox_y1,mask_path
    OUT/SYNTHETIC.txt                        states that every image here is synthetic

``path``/``mask_path`` are POSIX paths relative to OUT; the bbox (pixels, inclusive-exclusive) is the
union of lesions and empty when there is none. Everything is deterministic per seed: no timestamps go
into the files, so the same arguments give byte-identical output.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from scipy import ndimage

CXR_CLASSES = ("normal", "pneumonia")
CT_CLASSES = ("mild", "severe")
PATIENT_NAME = "SYNTHETIC^PHANTOM"
_UID_ROOT = "1.2.826.0.1.3680043.10.1178."  # a fixed prefix for deterministic synthetic UIDs


# ----------------------------------------------------------------------------------------------- shapes
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) coordinates in [-1, 1], y pointing down (image convention)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(c, c, indexing="ij")


def _ellipse(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float, rot: float = 0.0):
    cr, sr = np.cos(rot), np.sin(rot)
    yy, xx = y - cy, x - cx
    u, v = xx * cr + yy * sr, -xx * sr + yy * cr
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field."""
    f = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma)
    return (f - f.mean()) / (f.std() + 1e-6)


def _blobs(rng: np.random.Generator, region: np.ndarray, n: int, radius_px: float, size: int) -> np.ndarray:
    """Patchy lesion field in [0, 1]: a few textured blobs seeded inside ``region``."""
    field = np.zeros((size, size), np.float32)
    ys, xs = np.nonzero(ndimage.binary_erosion(region, iterations=max(1, int(radius_px * 0.6))))
    if len(ys) == 0:
        ys, xs = np.nonzero(region)
    if len(ys) == 0:
        return field
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(n):
        i = rng.integers(len(ys))
        r = radius_px * rng.uniform(0.7, 1.3)
        field += np.exp(-(((yy - ys[i]) ** 2 + (xx - xs[i]) ** 2) / (2 * r * r)))
    texture = 0.6 + 0.4 * np.clip(_smooth_noise(rng, size, max(1.0, radius_px / 4)), -1.5, 1.5) / 1.5
    field = np.clip(field * texture, 0.0, 1.0) * region
    return field.astype(np.float32)


# -------------------------------------------------------------------------------------------------- CXR
def render_cxr(
    rng: np.random.Generator, difficulty: float = 0.5, size: int = 256, lesion: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One frontal chest radiograph phantom: (image float32 in [0, 1], lesion mask bool).

    Bright = dense (bone, heart, consolidation), as a radiograph is displayed (MONOCHROME2).
    """
    d = float(np.clip(difficulty, 0.0, 1.0))
    y, x = _grid(size)
    jitter = 0.03 + 0.05 * d
    cx0, cy0 = rng.normal(0, jitter), rng.normal(0, jitter)
    scale = rng.uniform(0.9, 1.08)
    rot = rng.normal(0, 0.03 + 0.04 * d)
    cr, sr = np.cos(rot), np.sin(rot)
    xr = ((x - cx0) * cr + (y - cy0) * sr) / scale
    yr = (-(x - cx0) * sr + (y - cy0) * cr) / scale

    body = _ellipse(yr, xr, 0.15, 0.0, 1.05, 0.86)
    neck = (np.abs(xr) < 0.2) & (yr < -0.6)
    body |= neck
    # Lungs: patient's right lung on image left. Diaphragm domes bound them below.
    lung_r = _ellipse(yr, xr, -0.05, -0.36, 0.62, 0.27, 0.08)
    lung_l = _ellipse(yr, xr, -0.02, 0.36, 0.6, 0.26, -0.08)
    dome_r = yr < 0.42 + 0.18 * ((xr + 0.36) / 0.3) ** 2 - rng.uniform(0, 0.05)
    dome_l = yr < 0.48 + 0.18 * ((xr - 0.36) / 0.3) ** 2 - rng.uniform(0, 0.05)
    heart = _ellipse(yr, xr, 0.3, 0.12, 0.3, 0.26 * rng.uniform(0.9, 1.15), -0.3)
    lungs = ((lung_r & dome_r) | (lung_l & dome_l)) & ~heart
    spine = (np.abs(xr) < 0.07) & body
    mediastinum = (np.abs(xr) < 0.13) & (yr < 0.2) & (yr > -0.75)

    img = np.full((size, size), 0.04, np.float32)
    img[body] = 0.62
    img[mediastinum] = 0.7
    img[heart] = 0.74
    lung_density = 0.2 + 0.05 * _smooth_noise(rng, size, size / 40)
    # lung markings: fine vascular texture, denser towards the hila
    hila = np.exp(-((np.abs(xr) - 0.18) ** 2 + (yr - 0.05) ** 2) / 0.08)
    markings = np.clip(_smooth_noise(rng, size, 1.2), 0, None) * (0.04 + 0.06 * hila)
    img = np.where(lungs, lung_density + markings, img)
    img[spine] += 0.18
    # ribs: curved posterior arcs crossing both lungs
    ribs = np.zeros_like(img, dtype=bool)
    for k in range(9):
        y0 = -0.62 + k * 0.13 + rng.normal(0, 0.01)
        arc = y0 + 0.35 * xr**2
        ribs |= (np.abs(yr - arc) < 0.022) & (np.abs(xr) < 0.7) & (np.abs(xr) > 0.06)
    img[ribs & body] += 0.16
    clav = (np.abs(yr - (-0.7 + 0.25 * np.abs(xr))) < 0.03) & (np.abs(xr) > 0.08) & (np.abs(xr) < 0.6)
    img[clav] += 0.2

    mask = np.zeros((size, size), bool)
    if lesion:
        n = int(rng.integers(1, 4))
        radius = size * (0.07 - 0.035 * d) * rng.uniform(0.8, 1.2)
        lung_pick = lung_r & dome_r if rng.random() < 0.5 else lung_l & dome_l
        field = _blobs(rng, lung_pick & lungs, n, radius, size)
        contrast = (0.32 - 0.22 * d) * rng.uniform(0.8, 1.2)
        img += contrast * field
        mask = field > 0.25

    img = ndimage.gaussian_filter(img, 0.8)
    # exposure: smooth gradient, global gain and gamma; then quantum noise
    grad = 1.0 + (0.08 + 0.1 * d) * (rng.normal() * x + rng.normal() * y)
    img = np.clip(img * grad * rng.uniform(0.9, 1.1), 0, 1) ** rng.uniform(0.85, 1.15)
    img += rng.normal(0, 0.015 + 0.03 * d, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32), mask


# --------------------------------------------------------------------------------------------------- CT
def render_ct_slice(
    rng: np.random.Generator,
    difficulty: float = 0.5,
    size: int = 256,
    lesion: bool = False,
    z_mm: float = 0.0,
    severe: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One axial chest CT slice: (HU float32, lesion mask bool).

    ``z_mm`` moves the slice along the patient axis (lungs narrow towards the apex). For ``severe``
    lesions: ground glass plus consolidation; otherwise a single small ground-glass focus.
    """
    d = float(np.clip(difficulty, 0.0, 1.0))
    y, x = _grid(size)
    lung_scale = float(np.clip(1.0 - abs(z_mm) / 120.0, 0.55, 1.0))
    hu = np.full((size, size), -1000.0, np.float32)
    body = _ellipse(y, x, 0.02, 0.0, 0.62, 0.88)
    fat = body & ~_ellipse(y, x, 0.02, 0.0, 0.57, 0.82)
    hu[body] = 40.0
    hu[fat] = -100.0
    lung_r = _ellipse(y, x, -0.02, -0.4, 0.45 * lung_scale, 0.3 * lung_scale, 0.1)
    lung_l = _ellipse(y, x, -0.02, 0.4, 0.45 * lung_scale, 0.28 * lung_scale, -0.1)
    heart = _ellipse(y, x, -0.12, 0.08, 0.24, 0.26)
    lungs = (lung_r | lung_l) & ~heart
    parenchyma = -850.0 + 25.0 * _smooth_noise(rng, size, size / 50)
    hu = np.where(lungs, parenchyma, hu)
    vessels = (_smooth_noise(rng, size, 1.0) > 2.2) & lungs
    hu[ndimage.binary_dilation(vessels)] = -150.0
    hu[heart] = 40.0
    hu[_ellipse(y, x, 0.22, 0.1, 0.08, 0.08)] = 45.0  # descending aorta
    vertebra = _ellipse(y, x, 0.42, 0.0, 0.11, 0.1)
    hu[vertebra] = 300.0
    hu[vertebra & ~_ellipse(y, x, 0.42, 0.0, 0.085, 0.075)] = 700.0
    hu[_ellipse(y, x, -0.55, 0.0, 0.03, 0.1)] = 650.0  # sternum
    for k in range(10):  # ribs around the chest wall
        a = np.pi * (0.1 + 0.8 * k / 9)
        for side in (-1, 1):
            hu[_ellipse(y, x, 0.02 - 0.5 * np.cos(a), side * 0.76 * np.sin(a), 0.035, 0.03)] = 700.0
    hu[(y > 0.7) & (y < 0.74) & (np.abs(x) < 0.95)] = 150.0  # table

    mask = np.zeros((size, size), bool)
    if lesion:
        lung_pick = lung_r if rng.random() < 0.5 else lung_l
        region = lung_pick & lungs
        if severe:
            radius = size * (0.08 - 0.035 * d) * rng.uniform(0.8, 1.2)
            ggo = _blobs(rng, region, int(rng.integers(2, 4)), radius, size)
            hu = np.where(ggo > 0.2, hu + (ggo * (350.0 - 200.0 * d)), hu)
            core = _blobs(rng, region, 1, radius * 0.6, size)
            hu = np.where(core > 0.5, 30.0 + 20.0 * core, hu)
            mask = (ggo > 0.2) | (core > 0.5)
        else:
            radius = size * (0.03 - 0.01 * d)
            ggo = _blobs(rng, region, 1, radius, size)
            hu = np.where(ggo > 0.2, hu + ggo * (300.0 - 150.0 * d), hu)
            mask = ggo > 0.2
    hu = ndimage.gaussian_filter(hu, 0.7)
    hu += rng.normal(0, 12 + 25 * d, hu.shape).astype(np.float32)
    return np.clip(hu, -1024.0, 3000.0).astype(np.float32), mask


# ------------------------------------------------------------------------------------------------ DICOM
def _uid(*parts: object) -> str:
    digest = int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:24], 16)
    return (_UID_ROOT + str(digest))[:64]


def _base_dataset(sop_class: str, sop_uid: str, study_uid: str, series_uid: str, patient_id: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = PATIENT_NAME
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20000101"
    ds.StudyID = "SYNTH"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "kdviewer synthetic phantom"
    ds.BodyPartExamined = "CHEST"
    ds.ImageComments = "SYNTHETIC phantom generated by kdviewer (training.synth); not a patient"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def write_ct_dicom(
    path: Path,
    hu: np.ndarray,
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    patient_id: str,
    z_mm: float,
    instance: int,
    spacing_mm: float = 0.7,
    thickness_mm: float = 5.0,
) -> None:
    """Write one CT slice (HU) as CT Image Storage: stored = HU + 1024 (uint16), RescaleIntercept -1024."""
    from pydicom.uid import CTImageStorage

    ds = _base_dataset(CTImageStorage, sop_uid, study_uid, series_uid, patient_id)
    ds.Modality = "CT"
    ds.SeriesDescription = "SYNTHETIC chest CT phantom"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    rows, cols = hu.shape
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [spacing_mm, spacing_mm]
    ds.SliceThickness = thickness_mm
    ds.SliceLocation = z_mm
    ds.ImagePositionPatient = [-spacing_mm * cols / 2, -spacing_mm * rows / 2, z_mm]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = _uid("for", study_uid)
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = [-600, 40]
    ds.WindowWidth = [1500, 400]
    ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
    stored = np.clip(np.rint(hu) + 1024, 0, 65535).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_dx_dicom(
    path: Path,
    img01: np.ndarray,
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    patient_id: str,
    spacing_mm: float = 1.4,
) -> None:
    """Write a radiograph phantom as Digital X-Ray (for presentation): 12 bits stored, MONOCHROME2."""
    from pydicom.uid import DigitalXRayImageStorageForPresentation

    ds = _base_dataset(DigitalXRayImageStorageForPresentation, sop_uid, study_uid, series_uid, patient_id)
    ds.Modality = "DX"
    ds.SeriesDescription = "SYNTHETIC chest radiograph phantom"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ViewPosition = "PA"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    rows, cols = img01.shape
    ds.Rows, ds.Columns = rows, cols
    ds.ImagerPixelSpacing = [spacing_mm, spacing_mm]
    ds.PixelSpacing = [spacing_mm, spacing_mm]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelData = np.clip(np.rint(img01 * 4095), 0, 4095).astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------------------------- dataset
def _bbox(mask: np.ndarray) -> list[str]:
    if not mask.any():
        return ["", "", "", ""]
    ys, xs = np.nonzero(mask)
    return [str(int(xs.min())), str(int(ys.min())), str(int(xs.max()) + 1), str(int(ys.max()) + 1)]


def generate(
    kind: Literal["cxr", "ct"],
    n: int,
    out: str | Path,
    fmt: Literal["png", "dicom"] = "png",
    seed: int = 0,
    difficulty: float = 0.5,
    size: int | None = None,
    series_slices: int = 1,
    patients: int | None = None,
) -> Path:
    """Write ``n`` synthetic cases as an image-folder dataset (see the module docstring); returns OUT.

    Classes alternate so the set is balanced; ``patients`` synthetic patients (default n // 2, so most
    patients have two cases and patient-wise splitting matters) are assigned deterministically.
    """
    if kind not in ("cxr", "ct"):
        raise ValueError(f"kind must be 'cxr' or 'ct', not {kind!r}")
    if fmt not in ("png", "dicom"):
        raise ValueError(f"fmt must be 'png' or 'dicom', not {fmt!r}")
    if n < 1:
        raise ValueError("n must be >= 1")
    if kind == "cxr" and series_slices != 1:
        raise ValueError("series_slices applies to ct only")
    out = Path(out)
    size = int(size or 256)
    classes = CXR_CLASSES if kind == "cxr" else CT_CLASSES
    n_patients = max(1, patients if patients is not None else n // 2)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for c in classes:
        (out / c).mkdir(parents=True, exist_ok=True)
    rows: list[list[str]] = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        label = classes[i % 2]
        positive = i % 2 == 1
        patient_id = f"SYN{seed:03d}-{kind.upper()}-P{(i * 7919) % n_patients:04d}"
        case_id = f"{kind}_{seed:03d}_{i:05d}"
        study_uid = _uid(seed, kind, "study", i)
        series_uid = _uid(seed, kind, "series", i)
        if kind == "cxr":
            img, mask = render_cxr(rng, difficulty, size, lesion=positive)
            if fmt == "png":
                rel = f"{label}/{case_id}.png"
                Image.fromarray(np.rint(img * 255).astype(np.uint8)).save(out / rel)
            else:
                rel = f"{label}/{case_id}.dcm"
                write_dx_dicom(
                    out / rel,
                    img,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    sop_uid=_uid(seed, kind, "sop", i, 0),
                    patient_id=patient_id,
                )
        else:
            # mild: a small focus in half of the cases or none; severe: always extensive disease
            lesion = positive or rng.random() < 0.5
            z0 = rng.uniform(-40, 40)
            masks = []
            k_slices = max(1, series_slices)
            for k in range(k_slices):
                z = z0 + 5.0 * (k - (k_slices - 1) / 2)
                # the same lesion geometry on every slice of a case: reseed per case, not per slice
                hu, m = render_ct_slice(
                    np.random.default_rng([seed, i, 1]), difficulty, size, lesion, z, positive
                )
                masks.append(m)
                if k_slices == 1:
                    rel_slice = f"{label}/{case_id}." + ("dcm" if fmt == "dicom" else "png")
                else:
                    rel_slice = f"{label}/{case_id}/slice_{k:03d}." + ("dcm" if fmt == "dicom" else "png")
                if fmt == "dicom":
                    write_ct_dicom(
                        out / rel_slice,
                        hu,
                        study_uid=study_uid,
                        series_uid=series_uid,
                        sop_uid=_uid(seed, kind, "sop", i, k),
                        patient_id=patient_id,
                        z_mm=float(z),
                        instance=k + 1,
                    )
                else:
                    (out / rel_slice).parent.mkdir(parents=True, exist_ok=True)
                    stored = np.clip(np.rint(hu) + 1024, 0, 65535).astype(np.uint16)
                    Image.fromarray(stored).save(out / rel_slice)  # 16-bit PNG: HU + 1024
            mask = np.logical_or.reduce(masks)
            rel = rel_slice if k_slices == 1 else f"{label}/{case_id}"
        mask_rel = f"masks/{case_id}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / mask_rel)
        rows.append([rel, label, patient_id, *_bbox(mask), mask_rel])
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "mask_path"])
        w.writerows(rows)
    (out / "SYNTHETIC.txt").write_text(
        "SYNTHETIC DATA. Every image in this folder is a computer-generated phantom made by kdviewer's\n"
        f"training.synth (kind={kind}, n={n}, seed={seed}, difficulty={difficulty}, size={size}).\n"
        "No patient data. Not for clinical use; model results on it say nothing about real patients.\n",
        encoding="utf-8",
    )
    return out


# ------------------------------------------------------------------------------------------------- CLI
def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``kd-train synth``."""
    p = subparsers.add_parser("synth", help="write a SYNTHETIC chest phantom dataset (cxr or ct)")
    p.add_argument("--kind", choices=["cxr", "ct"], required=True)
    p.add_argument("--n", type=int, required=True, help="number of cases")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--format", dest="fmt", choices=["png", "dicom"], default="png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--difficulty", type=float, default=0.5, help="0 easy .. 1 hard (fainter, smaller lesions)"
    )
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 256)")
    p.add_argument("--series-slices", type=int, default=1, help="ct: slices per case (a series folder)")
    p.add_argument("--patients", type=int, default=None, help="distinct synthetic patients (default n/2)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    out = generate(
        args.kind,
        args.n,
        args.out,
        args.fmt,
        args.seed,
        args.difficulty,
        args.size,
        args.series_slices,
        args.patients,
    )
    print(f"wrote {args.n} SYNTHETIC {args.kind} cases ({args.fmt}) to {out}")
    return 0
