"""DICOM loading and CT series assembly on DICOM files written here with pydicom (no mocks)."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space, get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    MPEG2MPML,
    UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    RTPlanStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from kdviewer.errors import (
    CorruptImageError,
    ImageTooLargeError,
    NoPixelDataError,
    SeriesError,
    UnsupportedImageError,
)
from kdviewer.imaging import CT_PRESETS, display_frame, is_supported_file, load, load_series, scan_series

STUDY_UID = generate_uid()


def write_dicom(
    path: Path,
    pixels: np.ndarray | None,
    *,
    modality: str = "CT",
    photometric: str = "MONOCHROME2",
    sop: str = CTImageStorage,
    bits_stored: int | None = None,
    series_uid: str | None = None,
    **attrs: object,
) -> Path:
    """Write a small but complete DICOM file (with PHI-like fields) and return its path."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-0042"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = "20240102"
    ds.InstitutionName = "General Hospital"
    ds.Manufacturer = "ACME"
    ds.BodyPartExamined = "CHEST"
    if pixels is not None:
        bits = bits_stored or pixels.dtype.itemsize * 8
        ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=False)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(h: int = 32, w: int = 48, dtype: type = np.uint16) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % 4000).astype(dtype)


# ------------------------------------------------------------------------------------------------
# single files


def test_ct_rescale_to_hu_and_metadata_split(tmp_path: Path) -> None:
    raw = ramp()
    path = write_dicom(
        tmp_path / "ct.dcm", raw, RescaleIntercept=-1024, RescaleSlope=1, PixelSpacing=[0.7, 0.8]
    )
    study = load(path)
    assert study.modality == "CT"
    assert study.frames.shape == (1, 32, 48) and study.frames.dtype == np.float32
    np.testing.assert_array_equal(study.frames[0], raw.astype(np.float32) - 1024)
    assert study.pixel_spacing == (0.7, 0.8)
    # no window in the file: mediastinum preset is the default, all CT presets offered
    assert study.window == CT_PRESETS["mediastinum"]
    for name in CT_PRESETS:
        assert study.windows[name] == CT_PRESETS[name]
    assert not study.invert and study.voi_lut is None
    # metadata split: identifiers only in phi
    assert study.phi["PatientName"] == "Doe^Jane"
    assert study.phi["PatientID"] == "PID-0042"
    assert study.phi["StudyDate"] == "2024-01-02"
    assert study.phi["InstitutionName"] == "General Hospital"
    assert study.phi["PatientSex"] == "F"
    assert not set(study.phi) & set(study.metadata)
    assert "Doe" not in " ".join(study.metadata.values())
    assert study.metadata["Modality"] == "CT"
    assert study.metadata["Manufacturer"] == "ACME"
    assert study.metadata["SOPClass"] == "CT Image Storage"
    assert study.metadata["TransferSyntax"] == "Explicit VR Little Endian"
    assert study.uids["StudyInstanceUID"] == STUDY_UID
    assert "SOPInstanceUID" in study.uids and "SeriesInstanceUID" in study.uids


def test_signed_ct_with_slope(tmp_path: Path) -> None:
    raw = (ramp(dtype=np.int16) - 2000).astype(np.int16)
    path = write_dicom(tmp_path / "ct.dcm", raw, RescaleIntercept=-10, RescaleSlope=2)
    study = load(path)
    np.testing.assert_allclose(study.frames[0], raw * 2.0 - 10)


def test_multi_valued_window_with_explanations(tmp_path: Path) -> None:
    path = write_dicom(
        tmp_path / "ct.dcm",
        ramp(),
        RescaleIntercept=-1024,
        RescaleSlope=1,
        WindowCenter=[40, -600],
        WindowWidth=[400, 1500],
        WindowCenterWidthExplanation=["SOFT TISSUE", "LUNG"],
    )
    study = load(path)
    assert study.window.center == 40 and study.window.width == 400
    assert study.window.name == "SOFT TISSUE"
    assert study.windows["LUNG"].center == -600 and study.windows["LUNG"].width == 1500
    names = list(study.windows)
    assert names[:2] == ["SOFT TISSUE", "LUNG"]  # the file's own windows first
    assert {"lung", "mediastinum", "bone"} <= set(names)  # then the CT presets


def test_window_without_explanation_and_bad_width(tmp_path: Path) -> None:
    path = write_dicom(
        tmp_path / "mr.dcm", ramp(), modality="MR", WindowCenter=[100, 50], WindowWidth=[0, 200]
    )
    study = load(path)
    assert study.window.center == 50 and study.window.width == 200  # width 0 ignored
    assert any("width" in n for n in study.notes)
    assert "lung" not in study.windows  # presets only for CT


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    raw = np.zeros((16, 16), np.uint16)
    raw[:, 8:] = 1000
    path = write_dicom(
        tmp_path / "cr.dcm",
        raw,
        modality="CR",
        photometric="MONOCHROME1",
        WindowCenter=500,
        WindowWidth=1000,
        ImagerPixelSpacing=[0.15, 0.15],
    )
    study = load(path)
    assert study.invert and study.photometric == "MONOCHROME1"
    shown = display_frame(study)
    assert shown[0, 0] == 255 and shown[0, 15] == 0  # low stored value shown bright
    assert study.pixel_spacing == (0.15, 0.15)
    assert any("ImagerPixelSpacing" in n for n in study.notes)


def test_voi_lut_sequence(tmp_path: Path) -> None:
    raw = np.arange(256, dtype=np.uint16).reshape(16, 16) * 4
    lut_values = [min(4095, int(v)) for v in (np.arange(512) ** 1.5 / 3)]
    item = Dataset()
    item.LUTDescriptor = [512, 100, 12]
    item.LUTData = np.asarray(lut_values, "<u2").tobytes()  # OW, as most writers store it
    item.LUTExplanation = "GAMMA"
    path = write_dicom(
        tmp_path / "dx.dcm",
        raw,
        modality="DX",
        sop=DigitalXRayImageStorageForPresentation,
        VOILUTSequence=Sequence([item]),
    )
    study = load(path)
    assert study.voi_lut is not None
    assert study.voi_lut.first_mapped == 100
    assert len(study.voi_lut.lut) == 512
    assert study.voi_lut.explanation == "GAMMA"
    assert study.window.name == "VOI LUT: GAMMA"
    lut = np.asarray(lut_values, np.float32)
    assert study.window.low == pytest.approx(lut.min()) and study.window.high == pytest.approx(lut.max())
    # the LUT maps values below first_mapped to lut[0], above to lut[-1]
    mapped = study.voi_lut.apply(study.frames[0])
    assert mapped[0, 0] == lut[0] and mapped[-1, -1] == lut[-1]
    shown = display_frame(study)
    assert shown.dtype == np.uint8 and shown[0, 0] == 0 and shown[-1, -1] == 255


def test_multi_frame(tmp_path: Path) -> None:
    frames = np.stack([np.full((8, 10), i * 100, np.uint16) for i in range(5)])
    path = write_dicom(tmp_path / "mf.dcm", frames, modality="XA")
    study = load(path)
    assert study.frames.shape == (5, 8, 10)
    assert [float(f[0, 0]) for f in study.frames] == [0, 100, 200, 300, 400]


def test_enhanced_functional_groups(tmp_path: Path) -> None:
    frames = np.stack([np.full((8, 8), 1000 + i, np.uint16) for i in range(3)])
    shared = Dataset()
    pvt = Dataset()
    pvt.RescaleIntercept = -1024
    pvt.RescaleSlope = 1
    pvt.RescaleType = "HU"
    shared.PixelValueTransformationSequence = Sequence([pvt])
    measures = Dataset()
    measures.PixelSpacing = [0.5, 0.5]
    measures.SliceThickness = 2
    shared.PixelMeasuresSequence = Sequence([measures])
    orient = Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = Sequence([orient])
    per_frame = []
    for i in range(3):
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [0, 0, 10.0 - 3 * i]
        item.PlanePositionSequence = Sequence([pos])
        per_frame.append(item)
    path = write_dicom(
        tmp_path / "enh.dcm",
        frames,
        SharedFunctionalGroupsSequence=Sequence([shared]),
        PerFrameFunctionalGroupsSequence=Sequence(per_frame),
    )
    study = load(path)
    assert [float(f[0, 0]) for f in study.frames] == [-24, -23, -22]
    assert study.pixel_spacing == (0.5, 0.5)
    assert study.slice_positions == [10.0, 7.0, 4.0]
    assert study.slice_spacing == pytest.approx(3.0)


def test_rgb_dicom_becomes_grayscale_with_note(tmp_path: Path) -> None:
    rgb = np.zeros((12, 12, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 1] = 100
    rgb[..., 2] = 50
    path = write_dicom(
        tmp_path / "sc.dcm", rgb, modality="OT", photometric="RGB", sop=SecondaryCaptureImageStorage
    )
    study = load(path)
    assert study.frames.shape == (1, 12, 12)
    assert study.frames[0, 0, 0] == pytest.approx(0.299 * 200 + 0.587 * 100 + 0.114 * 50, abs=0.01)
    assert any("grayscale" in n for n in study.notes)
    assert study.photometric == "RGB"


def test_ybr_full_dicom_converted_to_rgb_then_gray(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 180
    rgb[..., 1] = 90
    rgb[..., 2] = 30
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    path = write_dicom(
        tmp_path / "ybr.dcm", ybr, modality="OT", photometric="YBR_FULL", sop=SecondaryCaptureImageStorage
    )
    study = load(path)
    expected = 0.299 * 180 + 0.587 * 90 + 0.114 * 30
    assert study.frames[0, 0, 0] == pytest.approx(expected, abs=2.0)
    assert any("YBR_FULL" in n for n in study.notes)


ENCODED = [RLELossless, JPEG2000Lossless, JPEGLSLossless]


@pytest.mark.parametrize("ts", ENCODED, ids=[UID(t).name for t in ENCODED])
def test_compressed_roundtrip_is_exact(tmp_path: Path, ts: str) -> None:
    if not get_encoder(ts).is_available:
        pytest.skip(f"no encoder for {UID(ts).name} installed")
    raw = ramp(64, 64)
    path = tmp_path / "c.dcm"
    write_dicom(path, raw, bits_stored=12, RescaleIntercept=-1024, RescaleSlope=1)
    ds = pydicom.dcmread(path)
    ds.compress(ts, raw)
    ds.save_as(path)
    study = load(path)
    assert study.metadata["TransferSyntax"] == UID(ts).name
    np.testing.assert_array_equal(study.frames[0], raw.astype(np.float32) - 1024)


def test_rt_plan_without_pixels_names_sop_class(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "plan.dcm", None, modality="RTPLAN", sop=RTPlanStorage, RTPlanLabel="P1")
    with pytest.raises(NoPixelDataError) as info:
        load(path)
    assert info.value.sop_class == "RT Plan Storage"
    assert "RT Plan Storage" in str(info.value)


def test_truncated_pixel_data(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "ct.dcm", ramp(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 3000])
    with pytest.raises(CorruptImageError, match="truncated"):
        load(path)


@pytest.mark.parametrize("keep", [0, 60, 131, 200, 400])
def test_truncated_header(tmp_path: Path, keep: int) -> None:
    path = write_dicom(tmp_path / "ct.dcm", ramp(64, 64))
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises((CorruptImageError, UnsupportedImageError)):
        load(path)


def test_pixel_cap_checked_before_decoding(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "bomb.dcm", ramp(8, 8))
    ds = pydicom.dcmread(path)
    ds.Rows = 60000
    ds.Columns = 60000
    ds.save_as(path)
    with pytest.raises(ImageTooLargeError, match="safety cap"):
        load(path)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 512, 512, 5000
    ds.save_as(path)
    with pytest.raises(ImageTooLargeError):
        load(path)


def test_corrupt_compressed_data(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "rle.dcm", ramp(16, 16))
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([b"\x01\x00\x00\x00" + b"garbage!" * 20])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.save_as(path)
    with pytest.raises(CorruptImageError, match="could not be decoded"):
        load(path)


@pytest.mark.parametrize(
    ("ts", "match"), [(MPEG2MPML, "video"), ("1.2.840.10008.1.2.4.110", "transfer syntax")]
)
def test_undecodable_transfer_syntax(tmp_path: Path, ts: str, match: str) -> None:
    path = write_dicom(tmp_path / "x.dcm", ramp(16, 16))
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.save_as(path)
    # pydicom refuses to write a transfer syntax it does not know: patch the (same-length) UID bytes
    path.write_bytes(path.read_bytes().replace(MPEG2MPML.encode(), ts.encode(), 1))
    with pytest.raises(UnsupportedImageError, match=match):
        load(path)


def test_dicom_without_preamble_or_meta(tmp_path: Path) -> None:
    raw = ramp(16, 16)
    path = write_dicom(tmp_path / "x.dcm", raw, modality="MR")
    ds = pydicom.dcmread(path)
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    raw_path = tmp_path / "IM0001"  # no extension either
    ds.save_as(raw_path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert raw_path.read_bytes()[128:132] != b"DICM"
    assert is_supported_file(raw_path)
    study = load(raw_path)
    np.testing.assert_array_equal(study.frames[0], raw)
    assert any("transfer syntax" in n for n in study.notes)


def test_wrong_extension_dispatches_on_content(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "x.dcm", ramp(16, 16), modality="MR")
    renamed = path.rename(tmp_path / "picture.png")
    assert load(renamed).modality == "MR"


def test_empty_dicom_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    with pytest.raises(CorruptImageError, match="empty"):
        load(path)


# ------------------------------------------------------------------------------------------------
# series


def write_series(
    folder: Path, n: int = 6, spacing: float = 2.5, *, positions: bool = True, size: int = 16
) -> tuple[str, list[float]]:
    """n axial slices, z = 0, spacing, ...; slice k holds stored value 100*k and alternating intercepts."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    zs = [k * spacing for k in range(n)]
    order = list(range(n))
    random.Random(7).shuffle(order)
    for k in order:
        attrs: dict[str, object] = {
            "RescaleIntercept": -1024 if k % 2 == 0 else -1000,
            "RescaleSlope": 1,
            "InstanceNumber": n - k,
            "PixelSpacing": [0.6, 0.6],
            "SeriesDescription": "CHEST AXIAL",
        }
        if positions:
            attrs["ImagePositionPatient"] = [-100.0, -100.0, zs[k]]
            attrs["ImageOrientationPatient"] = [1, 0, 0, 0, 1, 0]
        write_dicom(
            folder / f"{uuid.uuid4().hex}.dcm",
            np.full((size, size), 100 * k + 1024, np.uint16),
            series_uid=series_uid,
            **attrs,
        )
    return series_uid, zs


def expected_hu(k: int) -> float:
    return 100 * k + 1024 + (-1024 if k % 2 == 0 else -1000)


def test_shuffled_series_sorted_head_first(tmp_path: Path) -> None:
    uid, zs = write_series(tmp_path / "s", n=6, spacing=2.5)
    (tmp_path / "s" / "notes.txt").write_text("not an image")
    study = load(tmp_path / "s")
    assert study.frames.shape == (6, 16, 16)
    assert study.is_volume
    # head-first: highest z first
    assert study.slice_positions == pytest.approx(sorted(zs, reverse=True))
    assert study.slice_spacing == pytest.approx(2.5)
    hu = [float(f[0, 0]) for f in study.frames]
    assert hu == [expected_hu(k) for k in reversed(range(6))]  # per-slice rescale applied
    assert study.uids["SeriesInstanceUID"] == uid
    assert len(study.uids["SOPInstanceUIDs"].split("\\")) == 6
    assert study.pixel_spacing == (0.6, 0.6)
    assert study.source == tmp_path / "s"
    assert any("non-DICOM" in n for n in study.notes)
    assert "lung" in study.windows and study.window == CT_PRESETS["mediastinum"]


def test_series_instance_number_fallback(tmp_path: Path) -> None:
    write_series(tmp_path / "s", n=4, positions=False)
    study = load_series(tmp_path / "s")
    # InstanceNumber = n - k: ascending instance number is descending k
    assert [float(f[0, 0]) for f in study.frames] == [expected_hu(k) for k in (3, 2, 1, 0)]
    assert study.slice_positions is None
    assert any("InstanceNumber" in n for n in study.notes)


def test_series_from_list_of_paths(tmp_path: Path) -> None:
    write_series(tmp_path / "s", n=3)
    paths = sorted((tmp_path / "s").iterdir())
    study = load_series(paths)
    assert study.n_frames == 3


def test_several_series_pick_largest(tmp_path: Path) -> None:
    big, _ = write_series(tmp_path / "s", n=5)
    small, _ = write_series(tmp_path / "s", n=2)
    infos = scan_series(tmp_path / "s")
    assert [(i.series_uid, i.n_files) for i in infos] == [(big, 5), (small, 2)]
    assert infos[0].rows == 16 and infos[0].modality == "CT"
    study = load(tmp_path / "s")
    assert study.n_frames == 5 and study.uids["SeriesInstanceUID"] == big
    assert any("2 series" in n for n in study.notes)


def test_series_inconsistent_sizes(tmp_path: Path) -> None:
    """One slice whose size differs from the rest is left out with its reason (issue 17 item 7: a
    damaged header must cost that slice, visibly, not the series); an even mix is no volume at all."""
    uid, _ = write_series(tmp_path / "s", n=3)
    odd = write_dicom(
        tmp_path / "s" / "odd.dcm",
        np.zeros((20, 20), np.uint16),
        series_uid=uid,
        ImagePositionPatient=[0, 0, 100],
        ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
    )
    study = load(tmp_path / "s")
    assert study.n_frames == 3 and study.n_found == 4
    assert [p for p, _ in study.dropped] == [str(odd)] and "20 x 20" in study.dropped[0][1]
    for z in (110, 120):
        write_dicom(
            tmp_path / "s" / f"odd{z}.dcm",
            np.zeros((20, 20), np.uint16),
            series_uid=uid,
            ImagePositionPatient=[0, 0, z],
            ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
        )
    with pytest.raises(SeriesError, match="20x20"):
        load(tmp_path / "s")


def test_series_skips_corrupt_slice(tmp_path: Path) -> None:
    write_series(tmp_path / "s", n=4, size=32)
    victim = sorted((tmp_path / "s").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:-1000])
    study = load(tmp_path / "s")
    assert study.n_frames == 3
    assert any("left out" in n for n in study.notes)


def test_empty_and_non_dicom_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SeriesError, match="no DICOM"):
        load(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hello")
    with pytest.raises(SeriesError, match="non-DICOM"):
        load(tmp_path / "text")


def test_folder_with_single_file(tmp_path: Path) -> None:
    write_series(tmp_path / "s", n=1)
    study = load(tmp_path / "s")
    assert study.n_frames == 1 and study.modality == "CT"
