"""Acceptance for `kdviewer.imaging.load` on real files.

* Every `.dcm` file shipped inside the installed pydicom package (its `data/` folder: test_files,
  charset_files, palettes; found at run time, never downloaded) -> a `Study` or one of our typed
  errors, never another exception, each in under 2 s. The extension-less files of
  `data/test_files` (DICOMDIR trees, README ...) get the same check.
* ../shared/data/real-cxr and a few pneumoniamnist PNGs (skipped when ../shared is absent).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image

from kdviewer.errors import KDViewerError
from kdviewer.imaging import Study, display_frame, is_supported_file, load

PYDICOM_DATA = Path(pydicom.data.__file__).resolve().parent
DCM_FILES = sorted(PYDICOM_DATA.rglob("*.dcm"))
NO_SUFFIX_FILES = sorted(
    p for p in (PYDICOM_DATA / "test_files").rglob("*") if p.is_file() and p.suffix == ""
)
MAX_SECONDS = 2.0


def _id(path: Path) -> str:
    return path.relative_to(PYDICOM_DATA).as_posix()


def _check(path: Path) -> Study | KDViewerError:
    start = time.perf_counter()
    try:
        result: Study | KDViewerError = load(path)
    except KDViewerError as exc:  # typed: fine; anything else fails the test
        assert str(exc), "typed errors carry a message a person can act on"
        result = exc
    elapsed = time.perf_counter() - start
    assert elapsed < MAX_SECONDS, f"{path.name} took {elapsed:.2f} s"
    if isinstance(result, Study):
        assert result.frames.ndim == 3 and result.frames.dtype == np.float32
        assert np.isfinite(result.frames).all()
        assert result.window.width > 0
        shown = display_frame(result, result.n_frames // 2)
        assert shown.dtype == np.uint8 and shown.shape == result.shape
    return result


def test_pydicom_ships_test_files() -> None:
    assert len(DCM_FILES) >= 50, f"expected pydicom's bundled test files under {PYDICOM_DATA}"


@pytest.mark.parametrize("path", DCM_FILES, ids=_id)
def test_every_pydicom_dcm_file(path: Path) -> None:
    _check(path)


@pytest.mark.parametrize("path", NO_SUFFIX_FILES, ids=_id)
def test_every_pydicom_file_without_suffix(path: Path) -> None:
    _check(path)


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "JPEG2000.dcm",
        "JPGExtended.dcm",
        "693_J2KI.dcm",
        "rtdose.dcm",
    ],
)
def test_known_good_files_match_pydicom(name: str) -> None:
    path = PYDICOM_DATA / "test_files" / name
    if not path.exists():
        pytest.skip(f"{name} not shipped with this pydicom")
    ds = pydicom.dcmread(path)
    expected = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    study = load(path)
    np.testing.assert_allclose(study.frames.reshape(expected.shape), expected, rtol=1e-6)
    assert study.modality == ds.Modality


def test_ct_small_is_in_hounsfield_units() -> None:
    study = load(PYDICOM_DATA / "test_files" / "CT_small.dcm")
    assert study.modality == "CT"
    assert study.frames.min() < -500  # air / lung present after RescaleIntercept
    assert study.pixel_spacing is not None
    assert {"lung", "mediastinum", "bone"} <= set(study.windows)


def test_colour_and_palette_files_note_conversion() -> None:
    for name in ("SC_rgb.dcm", "SC_rgb_jpeg_dcmtk.dcm", "examples_palette.dcm", "examples_ybr_color.dcm"):
        path = PYDICOM_DATA / "test_files" / name
        if not path.exists():
            continue
        study = load(path)
        assert any("grayscale" in n for n in study.notes), (name, study.notes)


def test_rt_plan_named() -> None:
    from kdviewer.errors import NoPixelDataError

    with pytest.raises(NoPixelDataError) as info:
        load(PYDICOM_DATA / "test_files" / "rtplan.dcm")
    assert info.value.sop_class == "RT Plan Storage"


# ------------------------------------------------------------------------------------------------
# ../shared/data


def test_real_cxr(shared_data: Path) -> None:
    folder = shared_data / "real-cxr"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    with open(folder / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows
    for row in rows:
        path = folder / row["path"]
        assert is_supported_file(path)
        study = load(path)
        with Image.open(path) as im:
            width, height = im.size
        assert study.shape == (height, width)
        assert max(study.shape) == 1024
        assert study.n_frames == 1 and study.modality == "OT"
        assert study.frames.min() >= 0 and study.frames.max() <= 255
        assert study.frames.std() > 5  # real anatomy, not a blank image
        assert (study.window.low, study.window.high) == (0.0, 255.0)
        auto = study.windows["auto"]
        assert 0 <= auto.low < auto.high <= 255


def test_pneumoniamnist_pngs(shared_data: Path) -> None:
    folder = shared_data / "pneumoniamnist"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    paths = sorted(folder.glob("val/*/*.png"))[:8] + sorted(folder.glob("train/*/*.png"))[:4]
    assert paths
    for path in paths:
        study = load(path)
        assert study.shape == (28, 28)
        assert study.frames.dtype == np.float32
