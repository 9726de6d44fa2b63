"""training.synth: SYNTHETIC phantom datasets are consistent, anatomically sane, exact and deterministic."""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from training.synth import (
    CSV_COLUMNS,
    CT_FOV_MM,
    SLICE_MM,
    add_cli,
    ct_case,
    cxr_phantom,
    generate,
    render_ct,
    render_ct_slice,
    render_cxr,
    write_ct_dicom,
    write_dx_dicom,
)


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "labels.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _bbox(row: dict[str, str]) -> tuple[int, int, int, int] | None:
    vals = [row[k] for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")]
    if all(v == "" for v in vals):
        return None
    x0, y0, x1, y1 = (int(v) for v in vals)
    return x0, y0, x1, y1


def _loader():
    """kdviewer.imaging.load, or skip while the imaging room does not provide it."""
    load = getattr(importlib.import_module("kdviewer.imaging"), "load", None)
    if load is None:
        pytest.skip("kdviewer.imaging.load is not available yet")
    return load


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- dataset
def test_cxr_dataset_layout_labels_masks_and_patients(tmp_path: Path) -> None:
    root = generate("cxr", 12, tmp_path / "cxr", seed=3, size=64)
    rows = _rows(root)
    assert len(rows) == 12 and tuple(rows[0]) == CSV_COLUMNS
    assert [r["label"] for r in rows].count("pneumonia") == 6  # balanced
    assert "SYNTHETIC" in (root / "SYNTHETIC.txt").read_text()
    names = sorted(p.name for p in root.iterdir())
    assert names == ["SYNTHETIC.txt", "labels.csv", "masks", "normal", "pneumonia"]
    assert len({r["patient_id"] for r in rows}) == 6  # default n // 2 patients: some have two cases
    for r in rows:
        assert "\\" not in r["path"] and not Path(r["path"]).is_absolute()
        assert Path(r["path"]).parts[0] == r["label"]
        im = Image.open(root / r["path"])
        assert im.mode == "L" and im.size == (64, 64)
        mask = np.asarray(Image.open(root / r["mask_path"])) > 0
        assert mask.shape == (64, 64)
        positive = r["label"] == "pneumonia"
        assert mask.any() == positive == (r["has_lesion"] == "1") == (_bbox(r) is not None)
        assert int(r["lesion_pixels"]) == int(mask.sum()) and r["slices"] == "1"
        if positive:
            x0, y0, x1, y1 = _bbox(r)  # type: ignore[misc]
            assert mask[y0:y1, x0:x1].sum() == mask.sum()  # x1/y1 exclusive, tight
            assert mask[y0, x0:x1].any() and mask[y1 - 1, x0:x1].any()
            assert mask[y0:y1, x0].any() and mask[y0:y1, x1 - 1].any()


def test_patients_option_and_validation(tmp_path: Path) -> None:
    rows = _rows(generate("cxr", 9, tmp_path / "a", size=32, patients=3))
    assert len({r["patient_id"] for r in rows}) == 3
    for bad in (
        dict(kind="mr"),
        dict(fmt="jpeg"),
        dict(n=0),
        dict(difficulty=1.5),
        dict(size=8),
        dict(series_slices=3),  # cxr has no series
        dict(patients=20),
    ):
        args = dict(kind="cxr", n=4, out=tmp_path / "bad", size=32) | bad
        with pytest.raises(ValueError):
            generate(**args)  # type: ignore[arg-type]


def test_refuses_foreign_folder_and_replaces_an_earlier_synthetic_one(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    (foreign / "normal").mkdir(parents=True)
    (foreign / "normal" / "mine.png").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        generate("cxr", 2, foreign, size=32)
    root = generate("cxr", 6, tmp_path / "s", size=32)
    generate("cxr", 2, root, size=32)  # a smaller set replaces the earlier one: no stale files
    assert len(list(root.rglob("*.png"))) == 2 * 2


def test_cli_subcommand_writes_a_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="kd-train")
    add_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    args = parser.parse_args(["synth", "--kind", "ct", "--n", "2", "--out", str(out), "--format", "dicom",
                              "--seed", "4", "--difficulty", "0.3", "--size", "32", "--series-slices", "2",
                              "--patients", "1"])
    assert args.func(args) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    assert len(list(out.rglob("*.dcm"))) == 4 and len({r["patient_id"] for r in _rows(out)}) == 1
    bad = parser.parse_args(["synth", "--kind", "cxr", "--n", "2", "--out", str(tmp_path / "x"),
                             "--series-slices", "3"])
    assert bad.func(bad) == 2


# ---------------------------------------------------------------------------------------------------- CXR
def test_cxr_lesions_lie_strictly_inside_the_lungs() -> None:
    for seed in range(4):
        sick = cxr_phantom(np.random.default_rng(seed), 0.4, 128, lesion=True)
        clean = cxr_phantom(np.random.default_rng(seed), 0.4, 128, lesion=False)
        assert sick.lesion.sum() > 10 and not clean.lesion.any()
        assert not (sick.lesion & ~sick.lungs).any()
        np.testing.assert_array_equal(sick.lungs, clean.lungs)  # same seed: same patient and exposure
        # the consolidation changes pixels only in and right next to the lungs (detector blur)
        near_lungs = ndimage.binary_dilation(sick.lungs, iterations=3)
        assert np.abs(sick.image - clean.image)[~near_lungs].max() < 1e-4  # float rounding only
        assert sick.image[sick.lesion].mean() > clean.image[sick.lesion].mean() + 0.02  # denser
        # a radiograph: lungs dark, mediastinum / abdomen bright, air outside the body darkest
        img = clean.image
        assert np.median(img[clean.lungs]) < np.median(img[96:, 48:80]) - 0.2
        assert img[:, :3].mean() < np.median(img[clean.lungs])


def test_difficulty_makes_cxr_lesions_fainter_and_smaller() -> None:
    def stats(d: float) -> tuple[float, float]:
        contrast, area = [], []
        for seed in range(8):
            a = cxr_phantom(np.random.default_rng(seed), d, 96, lesion=True)
            b = cxr_phantom(np.random.default_rng(seed), d, 96, lesion=False)
            contrast.append(float((a.image - b.image)[a.lesion].mean()))
            area.append(float(a.lesion.sum()))
        return float(np.mean(contrast)), float(np.mean(area))

    (c_easy, a_easy), (c_hard, a_hard) = stats(0.1), stats(0.9)
    assert c_easy > 2.5 * c_hard > 0
    assert a_easy > 1.5 * a_hard


def test_render_functions_are_deterministic_and_cover_sizes() -> None:
    for size in (16, 48, 200):
        a, ma = render_cxr(np.random.default_rng(1), 0.5, size, True)
        b, mb = render_cxr(np.random.default_rng(1), 0.5, size, True)
        assert a.shape == (size, size) and a.dtype == np.float32 and a.min() >= 0.0 and a.max() <= 1.0
        assert hashlib.sha256(a.tobytes()).digest() == hashlib.sha256(b.tobytes()).digest()
        np.testing.assert_array_equal(ma, mb)
    hu1, m1 = render_ct_slice(np.random.default_rng(2), 0.5, 64, True, 2.5)
    hu2, m2 = render_ct_slice(np.random.default_rng(2), 0.5, 64, True, 2.5)
    np.testing.assert_array_equal(hu1, hu2)
    np.testing.assert_array_equal(m1, m2)
    assert not np.array_equal(hu1, render_ct_slice(np.random.default_rng(3), 0.5, 64, True, 2.5)[0])


# ----------------------------------------------------------------------------------------------------- CT
def test_ct_hounsfield_units_per_tissue() -> None:
    sl = render_ct(ct_case(np.random.default_rng(0), 0.3, "none"), 128, 0.0, np.random.default_rng(1))
    hu = sl.hu
    assert sl.spacing_mm == pytest.approx(CT_FOV_MM / 128)
    assert np.array_equal(hu, np.rint(hu)) and hu.min() >= -1024 and hu.max() <= 3071
    assert np.median(hu[:4, :]) < -950  # air above the patient
    assert np.median(hu[sl.lungs]) < -700  # aerated lung
    assert np.median(hu[sl.spine]) > 300  # vertebral body
    assert hu.max() > 600  # cortical bone
    body = ndimage.binary_fill_holes(hu > -400) & ~sl.lungs
    assert np.mean((hu[body] > -160) & (hu[body] < -40)) > 0.05  # subcutaneous / mediastinal fat
    assert np.mean((hu[body] > 0) & (hu[body] < 100)) > 0.2  # muscle, heart, vessels
    assert not sl.lesion.any()


def test_ct_severe_lesions_are_ground_glass_or_consolidation_inside_the_lungs() -> None:
    sev = render_ct(ct_case(np.random.default_rng(5), 0.3, "severe"), 128, 0.0, np.random.default_rng(1))
    clean = render_ct(ct_case(np.random.default_rng(5), 0.3, "none"), 128, 0.0, np.random.default_rng(1))
    assert sev.lesion.sum() > 30 and not (sev.lesion & ~sev.lungs).any()
    assert -750 < np.median(sev.hu[sev.lesion]) < 100  # ground glass ~-500, consolidation ~30
    assert np.median(sev.hu[sev.lesion]) > np.median(clean.hu[clean.lungs]) + 150


def test_ct_dicom_round_trip_is_exact_through_pydicom_and_our_loader(tmp_path: Path) -> None:
    hu, _ = render_ct_slice(np.random.default_rng(5), 0.5, 64, lesion=True, z_mm=12.5)
    hu[0, 0], hu[0, 1] = -1024.0, 3071.0  # the extremes of the stored range survive too
    path = tmp_path / "slice.dcm"
    write_ct_dicom(path, hu, study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5", patient_id="SYN-1",
                   z_mm=12.5, instance=1)
    assert path.read_bytes()[128:132] == b"DICM"
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
    assert ds.PatientName == "SYNTHETIC^PHANTOM" and "SYNTHETIC" in ds.ImageComments
    assert ds.PixelRepresentation == 1 and ds.RescaleIntercept == -1024 and ds.RescaleSlope == 1
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(ds.SliceLocation) == 12.5 == float(ds.ImagePositionPatient[2])
    assert [float(v) for v in ds.WindowCenter] == [-600, 40]
    assert [float(v) for v in ds.WindowWidth] == [1500, 400]
    assert float(ds.PixelSpacing[0]) == pytest.approx(CT_FOV_MM / 64)
    hu_pydicom = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(hu_pydicom, hu)
    study = _loader()(path)
    np.testing.assert_array_equal(study.frames[0], hu)
    assert study.modality == "CT" and study.pixel_spacing == pytest.approx((CT_FOV_MM / 64,) * 2)


def test_dx_dicom_round_trip(tmp_path: Path) -> None:
    img, _ = render_cxr(np.random.default_rng(0), 0.5, 64, True)
    path = tmp_path / "cxr.dcm"
    write_dx_dicom(path, img, study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5",
                   patient_id="SYN-2")
    ds = pydicom.dcmread(path)
    assert ds.Modality == "DX" and ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 12
    expected = np.rint(img.astype(np.float64) * 4095)
    np.testing.assert_array_equal(ds.pixel_array, expected)
    study = _loader()(path)
    np.testing.assert_array_equal(study.frames[0], expected)
    assert not study.invert


def test_ct_series_slices_are_contiguous_and_share_one_series(tmp_path: Path) -> None:
    root = generate("ct", 3, tmp_path / "ct", fmt="dicom", seed=2, size=48, series_slices=4)
    rows = _rows(root)
    series_uids = []
    for r in rows:
        case = root / r["path"]
        files = sorted(case.glob("*.dcm"))
        assert [f.name for f in files] == [f"slice_{k:03d}.dcm" for k in range(4)] and r["slices"] == "4"
        dss = [pydicom.dcmread(f) for f in files]
        assert len({d.SeriesInstanceUID for d in dss}) == 1 and len({d.StudyInstanceUID for d in dss}) == 1
        assert len({d.FrameOfReferenceUID for d in dss}) == 1 and len({d.SOPInstanceUID for d in dss}) == 4
        assert all(d.PatientID == r["patient_id"] for d in dss)
        z = [float(d.ImagePositionPatient[2]) for d in dss]
        assert [float(d.SliceLocation) for d in dss] == z and np.allclose(np.diff(z), SLICE_MM)
        assert [int(d.InstanceNumber) for d in dss] == [1, 2, 3, 4]
        series_uids.append(dss[0].SeriesInstanceUID)
        slice_masks = [np.asarray(Image.open(root / "masks" / r["case_id"] / f"slice_{k:03d}.png")) > 0
                       for k in range(4)]
        union = np.asarray(Image.open(root / r["mask_path"])) > 0
        np.testing.assert_array_equal(union, np.logical_or.reduce(slice_masks))
        assert union.any() == (r["has_lesion"] == "1")
        if r["label"] == "severe":
            assert union.any()
        study = _loader()(case)
        assert study.n_frames == 4 and study.slice_spacing == pytest.approx(SLICE_MM)
        hu = np.stack([d.pixel_array.astype(np.float32) - 1024 for d in dss])
        # whichever way the loader orders the slices, it gives back exactly the stored HU
        by_position = {round(float(p), 3): i for i, p in enumerate(z)}
        order = [by_position[round(float(p), 3)] for p in (study.slice_positions or z)]
        np.testing.assert_array_equal(study.frames, hu[order])
    assert len(set(series_uids)) == 3


def test_ct_volume_is_consistent_across_slices() -> None:
    """Anatomy and lesions are 3-D: neighbouring slices look alike, distant ones less so."""
    case = ct_case(np.random.default_rng(8), 0.2, "severe", z_range=(0.0, 0.0))
    s0, s1, s9 = (render_ct(case, 96, z).hu for z in (0.0, 2.5, 60.0))
    assert np.abs(s0 - s1).mean() < np.abs(s0 - s9).mean()
    m0, m1 = (render_ct(case, 96, z).lesion for z in (0.0, 2.5))
    assert (m0 & m1).sum() > 0.5 * min(m0.sum(), m1.sum())


def test_ct_png_holds_hu_plus_1024(tmp_path: Path) -> None:
    root = generate("ct", 2, tmp_path / "ctpng", fmt="png", seed=1, size=48)
    for r in _rows(root):
        im = Image.open(root / r["path"])
        assert im.mode == "I;16"
        hu = np.asarray(im).astype(np.float32) - 1024
        assert hu.min() >= -1024 and np.median(hu[:3]) < -950 and hu.max() > 300


# ------------------------------------------------------------------------------------------- determinism
def test_generation_is_byte_identical_per_seed(tmp_path: Path) -> None:
    a = generate("cxr", 4, tmp_path / "a", fmt="dicom", seed=7, size=48)
    b = generate("cxr", 4, tmp_path / "b", fmt="dicom", seed=7, size=48)
    c = generate("cxr", 4, tmp_path / "c", fmt="dicom", seed=8, size=48)
    assert _tree_digest(a) == _tree_digest(b) != _tree_digest(c)
    d = generate("ct", 2, tmp_path / "d", fmt="dicom", seed=7, size=40, series_slices=2)
    e = generate("ct", 2, tmp_path / "e", fmt="dicom", seed=7, size=40, series_slices=2)
    assert _tree_digest(d) == _tree_digest(e)
