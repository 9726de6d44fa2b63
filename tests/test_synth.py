"""training.synth: SYNTHETIC phantom datasets are consistent, anatomically sane, exact and deterministic."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from kdviewer.imaging import load
from training.synth import generate, render_ct_slice, render_cxr, write_ct_dicom


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "labels.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_cxr_dataset_layout_masks_and_labels(tmp_path: Path) -> None:
    root = generate("cxr", 12, tmp_path / "cxr", seed=3, size=96)
    rows = _rows(root)
    assert len(rows) == 12
    assert {r["label"] for r in rows} == {"normal", "pneumonia"}
    assert "SYNTHETIC" in (root / "SYNTHETIC.txt").read_text()
    assert len({r["patient_id"] for r in rows}) == 6  # default n // 2 patients: splits must be patient-wise
    for r in rows:
        img = np.asarray(Image.open(root / r["path"]))
        mask = np.asarray(Image.open(root / r["mask_path"])) > 0
        assert img.shape == mask.shape == (96, 96)
        assert Path(r["path"]).parts[0] == r["label"]
        if r["label"] == "pneumonia":
            assert mask.any() and r["bbox_x0"] != ""
            x0, y0, x1, y1 = (int(r[k]) for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"))
            assert mask[y0:y1, x0:x1].sum() == mask.sum()
        else:
            assert not mask.any() and r["bbox_x0"] == ""


def test_cxr_lesions_lie_inside_the_lungs_and_are_brighter() -> None:
    for seed in range(5):
        img, mask = render_cxr(np.random.default_rng(seed), difficulty=0.3, size=128, lesion=True)
        clean, _ = render_cxr(np.random.default_rng(seed), difficulty=0.3, size=128, lesion=False)
        assert mask.sum() > 10
        # same seed -> same anatomy; the lesion region is denser (brighter) than without it
        assert img[mask].mean() > clean[mask].mean() + 0.02
        # lungs are dark in a radiograph: lesion-free lung pixels at the lesion site are well below bone
        assert clean[mask].mean() < 0.5


def test_difficulty_makes_lesions_fainter() -> None:
    def contrast(d: float) -> float:
        vals = []
        for seed in range(6):
            a, m = render_cxr(np.random.default_rng(seed), difficulty=d, size=128, lesion=True)
            b, _ = render_cxr(np.random.default_rng(seed), difficulty=d, size=128, lesion=False)
            vals.append(float((a[m] - b[m]).mean()))
        return float(np.mean(vals))

    assert contrast(0.1) > 1.5 * contrast(0.9)


def test_ct_hounsfield_ranges_per_tissue() -> None:
    hu, mask = render_ct_slice(np.random.default_rng(0), difficulty=0.2, size=192, lesion=True, severe=True)
    assert hu[0, 0] < -950  # air outside the body
    assert mask.any()
    assert np.median(hu[mask]) > -650  # ground glass / consolidation is denser than lung
    yy, xx = np.mgrid[0:192, 0:192]
    lung_probe = hu[(np.abs(yy - 96) < 10) & (np.abs(xx - 50) < 6)]
    assert np.median(lung_probe) < -600
    assert hu.max() > 500  # bone


def test_ct_dicom_round_trip_is_exact_through_pydicom_and_our_loader(tmp_path: Path) -> None:
    hu, _ = render_ct_slice(np.random.default_rng(5), 0.5, 64, lesion=True, z_mm=12.5)
    path = tmp_path / "slice.dcm"
    write_ct_dicom(path, hu, study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5",
                   patient_id="SYN-1", z_mm=12.5, instance=1)
    expected = np.clip(np.rint(hu), -1024, None)
    ds = pydicom.dcmread(path)
    assert ds.Modality == "CT" and ds.RescaleIntercept == -1024 and "SYNTHETIC" in str(ds.PatientName)
    hu_pydicom = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(hu_pydicom, expected)
    study = load(path)
    np.testing.assert_array_equal(study.frames[0], expected)
    assert study.modality == "CT" and study.pixel_spacing == (0.7, 0.7)


def test_generated_ct_dataset_reads_back_as_ct(tmp_path: Path) -> None:
    root = generate("ct", 4, tmp_path / "ct", fmt="dicom", seed=1, size=64)
    for r in _rows(root):
        study = load(root / r["path"])
        assert study.modality == "CT" and -1024 <= study.frames.min() < -900


def test_ct_series_shares_a_series_uid_and_sorts_by_position(tmp_path: Path) -> None:
    root = generate("ct", 2, tmp_path / "ct", fmt="dicom", seed=2, size=48, series_slices=5)
    case = root / _rows(root)[0]["path"]
    files = sorted(case.glob("*.dcm"))
    assert len(files) == 5
    assert len({pydicom.dcmread(f).SeriesInstanceUID for f in files}) == 1
    study = load(case)
    assert study.n_frames == 5 and study.slice_spacing == pytest.approx(5.0)


def test_generation_is_deterministic_per_seed(tmp_path: Path) -> None:
    def digest(root: Path) -> str:
        h = hashlib.sha256()
        for f in sorted(root.rglob("*")):
            if f.is_file():
                h.update(f.relative_to(root).as_posix().encode())
                h.update(f.read_bytes())
        return h.hexdigest()

    a = generate("cxr", 4, tmp_path / "a", fmt="dicom", seed=7, size=48)
    b = generate("cxr", 4, tmp_path / "b", fmt="dicom", seed=7, size=48)
    c = generate("cxr", 4, tmp_path / "c", fmt="dicom", seed=8, size=48)
    assert digest(a) == digest(b) != digest(c)
