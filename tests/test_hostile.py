"""Hostile inputs (issue 17): a corpus built at run time, as an attacker would build it.

The corpus is deterministic (seeded): fuzzed PNG and DICOM headers and bytes, the specific files of
the issue (an RLE DICOM whose Columns lies, a 74-byte PNG claiming 1 x 100,000,000 pixels, file names
with runs of spaces, tabs, newlines and spreadsheet formulas, a CT series with a damaged slice, PHI and
escape sequences in free-text tags) and hostile bundles (NaN/inf/denormal numbers, duplicate class
names, absurd sizes, deep nesting, lying .npy headers, foreign OOD statistics, zip tricks).

What must hold: one row per file, only typed errors, no traceback, no file changed outside the
output, the bad numbers refused with a `BundleError` naming the field.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from _bundles import ct_volume, cxr_bundle, cxr_phantom, write_ct_series, write_dicom, write_png
from _classify import read_rows

from kdviewer.errors import BundleError, CorruptImageError, ImageError, ImageTooLargeError

pytestmark = [pytest.mark.timeout(1200), pytest.mark.filterwarnings("ignore::UserWarning")]

ROOT = Path(__file__).resolve().parents[1]
SEED = 17
FORMULA_NAMES = ('=HYPERLINK("evil","click").png', "+cmd.png", "@SUM(A1).png", "-2+3.png")
SPACE_NAMES = ("two  spaces.png", "tab\tname.png", "new\nline.png", " leading.png")
PHI_TEXT = "CXR DOE JANE MRN 12345"
ANSI = "\x1b[2J\x1b[31mRED"


# ------------------------------------------------------------------------------------------ builders


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def tall_png(path: Path, width: int = 1, height: int = 100_000_000) -> Path:
    """A tiny PNG whose header says ``width`` x ``height`` (the 74-byte file of the issue)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00\x00"))
    path.write_bytes(data + _png_chunk(b"IEND", b""))
    return path


def rle_dicom(path: Path, columns: int | None = None, rgb: bool = False, size: int = 64) -> Path:
    """An RLE Lossless DICOM (encoded by pydicom); ``columns`` then overwrites the header's Columns."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "MR"
    ds.Rows = ds.Columns = size
    if rgb:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        arr = np.random.default_rng(SEED).integers(0, 255, (size, size, 3), dtype=np.uint8)
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        arr = (np.arange(size * size).reshape(size, size) % 4096).astype(np.uint16)
    ds.PixelRepresentation = 0
    ds.PixelData = arr.tobytes()
    ds.compress(RLELossless)
    if columns is not None:
        ds.Columns = columns
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _dicom_with(path: Path, pixels: np.ndarray, **attrs: object) -> Path:
    import pydicom

    write_dicom(path, pixels)
    ds = pydicom.dcmread(path)
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(path)
    return path


def _fuzz_png(rng: np.random.Generator, good: bytes, i: int) -> bytes:
    kind = i % 3
    data = bytearray(good)
    if kind == 0:  # bytes flipped in the header and first chunk
        for _ in range(int(rng.integers(1, 6))):
            data[int(rng.integers(8, min(len(data), 80)))] = int(rng.integers(0, 256))
    elif kind == 1:  # truncated
        data = data[: int(rng.integers(9, len(data) - 1))]
    else:  # a header with hostile dimensions and a valid CRC
        w, h = (int(v) for v in rng.choice([0, 1, 3, 70_000, 2**31 - 1, 1_000_000], 2))
        ihdr = struct.pack(">IIBBBBB", w, h, int(rng.choice([1, 8, 16])), int(rng.choice([0, 2, 6])), 0, 0, 0)
        data = bytearray(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)) + data[33:]
    return bytes(data)


def _fuzz_dicom(rng: np.random.Generator, good: Path, out: Path, i: int) -> None:
    import pydicom

    kind = i % 3
    raw = bytearray(good.read_bytes())
    if kind == 0:  # bytes flipped in the header
        for _ in range(int(rng.integers(1, 8))):
            raw[int(rng.integers(132, 600))] = int(rng.integers(0, 256))
        out.write_bytes(bytes(raw))
    elif kind == 1:  # truncated anywhere
        out.write_bytes(bytes(raw[: int(rng.integers(140, len(raw) - 1))]))
    else:  # image attributes set to hostile values
        ds = pydicom.dcmread(good)
        field = ["Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames", "BitsStored"][i % 6]
        value = int(rng.choice([0, 1, 7, 3, 64, 65535]))
        setattr(ds, field, value)
        ds.save_as(out)


def build_corpus(root: Path) -> dict[str, Path]:
    """The hostile folder (deterministic); returns the notable files by name."""
    rng = np.random.default_rng(SEED)
    root.mkdir(parents=True, exist_ok=True)
    notable: dict[str, Path] = {}
    img = cxr_phantom(rng, positive=True)[0]
    notable["good_png"] = write_png(root / "good.png", img)
    notable["good_dcm"] = write_dicom(root / "good.dcm", img.astype(np.uint16) * 8)
    for name in (*SPACE_NAMES, *FORMULA_NAMES):
        write_png(root / name, cxr_phantom(rng, positive=False)[0])
    # Columns 1 (the file) is now refused from its header (1 x 64 pixels); Columns 8 still
    # reaches the decoder, whose Rust code panics on it
    notable["rle_col1"] = rle_dicom(root / "rle_columns1.dcm", columns=1)
    notable["rle_bad"] = rle_dicom(root / "rle_columns8.dcm", columns=8)
    notable["tall"] = tall_png(root / "tall.png")
    notable["phi"] = _dicom_with(root / "phi.dcm", img.astype(np.uint16), StudyDescription=PHI_TEXT,
                                 SeriesDescription=PHI_TEXT, Manufacturer=ANSI)
    slices = write_ct_series(root / "ct", ct_volume(rng, n=5, size=48))
    raw = slices[2].read_bytes()
    slices[2].write_bytes(raw[: len(raw) - 1000])  # header intact, pixels cut: a damaged slice
    notable["damaged_slice"] = slices[2]
    import pydicom

    ds = pydicom.dcmread(slices[4])
    ds.Rows = 40  # a header that disagrees with the rest of the series
    ds.save_as(slices[4])
    notable["odd_slice"] = slices[4]
    notable["ct"] = root / "ct"
    fuzz = root / "fuzz"
    fuzz.mkdir()
    good_png = notable["good_png"].read_bytes()
    for i in range(24):
        (fuzz / f"png{i:02d}.png").write_bytes(_fuzz_png(rng, good_png, i))
    for i in range(24):
        _fuzz_dicom(rng, notable["good_dcm"], fuzz / f"dcm{i:02d}.dcm", i)
    (root / "notes.txt").write_text("not an image\n")
    (root / "empty.png").write_bytes(b"")
    return notable


def _digests(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _cli(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "RUST_BACKTRACE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "kdviewer.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=full_env, timeout=timeout)


@pytest.fixture(scope="module")
def bundle() -> Path:
    return cxr_bundle().path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("hostile") / "corpus"
    return root, build_corpus(root)


# ---------------------------------------------------------------------------------- the whole corpus


def _check_run(
    corpus_root: Path, notable: dict[str, Path], out: Path, proc: subprocess.CompletedProcess
) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    rows = read_rows(out)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "a file has more than one row"
    files = [p for p in corpus_root.rglob("*") if p.is_file()]
    series_dir = notable["ct"]
    expected = {str(p) for p in files if series_dir not in p.parents} | {
        str(series_dir), str(notable["damaged_slice"]), str(notable["odd_slice"])}
    # one row per file (a series is one row, each slice it left out another); a file that does not even
    # claim to be an image (notes.txt) may be counted as skipped instead of getting an error row
    optional = {str(corpus_root / "notes.txt")}
    assert expected - optional <= set(paths) <= expected
    for r in rows:
        assert os.path.exists(r["path"]), f"the row names a file that does not exist: {r['path']!r}"
        for col, cell in r.items():
            assert "\x1b" not in cell and "Traceback" not in cell
            if cell[:1] in ("=", "+", "@") or (cell[:1] == "-" and col != "path"):
                pytest.fail(f"formula cell {col}={cell!r}")
        err = r["error"]
        for untyped in ("PicklingError", "PanicException", "RecursionError", "could not decode:",
                        "MemoryError"):
            assert untyped not in err, err
    by = {r["path"]: r for r in rows}
    assert "decoder" in by[str(notable["rle_bad"])]["error"]
    assert "times the other" in by[str(notable["rle_col1"])]["error"]
    assert "times the other" in by[str(notable["tall"])]["error"]
    ct = by[str(series_dir)]
    assert ct["case_type"] == "series" and ct["n_frames"] == "3" and ct["n_found"] == "5"
    assert "2 of 5 slices" in ct["warning"] and (ct["label"] or ct.get("refused"))
    for key in ("damaged_slice", "odd_slice"):
        assert by[str(notable[key])]["case_type"] == "error"
        assert "slice left out of its series" in by[str(notable[key])]["error"]
    assert "40 x 48" in by[str(notable["odd_slice"])]["error"]
    for name in SPACE_NAMES:
        assert str(corpus_root / name) in by and not by[str(corpus_root / name)]["error"]


def test_corpus_in_process_one_row_per_file_typed_errors_nothing_changed(
    corpus: tuple[Path, dict[str, Path]], bundle: Path, tmp_path: Path
) -> None:
    root, notable = corpus
    before = _digests(root)
    out = tmp_path / "out" / "res.csv"
    args = ("classify", str(root), "-o", str(out), "--model", str(bundle), "--workers", "0", "--no-progress",
            "--json", str(tmp_path / "out" / "res.jsonl"))
    proc = _cli(*args)
    _check_run(root, notable, out, proc)
    n = len(read_rows(out))
    again = _cli(*args)  # exactly once: a rerun finds every row, whitespace names included
    assert again.returncode == 0 and "Traceback" not in again.stderr
    assert len(read_rows(out)) == n
    jsonl = [json.loads(line) for line in (tmp_path / "out" / "res.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in jsonl) == sorted(r["path"] for r in read_rows(out))
    assert _digests(root) == before  # no file outside the output changed


def test_corpus_with_decoder_processes(
    corpus: tuple[Path, dict[str, Path]], bundle: Path, tmp_path: Path
) -> None:
    root, notable = corpus
    before = _digests(root)
    out = tmp_path / "res.csv"
    proc = _cli("classify", str(root), "-o", str(out), "--model", str(bundle), "--workers", "2",
                "--no-progress")
    _check_run(root, notable, out, proc)
    assert _digests(root) == before


# ------------------------------------------------------------------------- item 1: decoder panics


def test_rle_panic_reproduces_in_the_decoder_and_becomes_a_typed_error(tmp_path: Path) -> None:
    import pydicom

    from kdviewer.imaging import load

    bad = rle_dicom(tmp_path / "rle.dcm", columns=8)
    with pytest.raises(BaseException) as info:  # the precondition: pylibjpeg-rle panics
        _ = pydicom.dcmread(bad).pixel_array
    assert type(info.value).__name__ == "PanicException" and not isinstance(info.value, Exception)
    with pytest.raises(CorruptImageError, match="decoder"):
        load(bad)
    for cmd in (("info", str(bad)), ("predict", str(bad))):
        proc = _cli(*cmd)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        # nor the Rust panic message / native backtrace the plugin prints straight to fd 2
        assert "panicked at" not in proc.stderr and "stack backtrace" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
        assert proc.stderr.startswith("kdviewer: error:")


def test_panic_in_a_decoder_process_is_that_rows_error(bundle: Path, tmp_path: Path) -> None:
    from kdviewer.batch import run_batch

    folder = tmp_path / "in"
    rle_dicom(folder / "a_bad.dcm", columns=8)
    write_png(folder / "b_good.png", cxr_phantom(np.random.default_rng(1), False)[0])
    write_png(folder / "c_good.png", cxr_phantom(np.random.default_rng(2), True)[0])
    s = run_batch(folder, bundle, tmp_path / "r.csv", workers=2)
    rows = {Path(r["path"]).name: r for r in read_rows(tmp_path / "r.csv")}
    assert s.errors == 1 and len(rows) == 3
    assert "decoder failed" in rows["a_bad.dcm"]["error"] and "Pickling" not in rows["a_bad.dcm"]["error"]
    # the resume where the bad file is the last case left (in-process) no longer crashes
    out2 = tmp_path / "r2.csv"
    run_batch(folder, bundle, out2, workers=0, cases=None)
    assert len(read_rows(out2)) == 3


# ------------------------------------------------------------------ items 2 and 4: geometry, memory


def test_absurd_geometry_refused_at_load_and_a_heatmap_failure_costs_one_heatmap(
    bundle: Path, tmp_path: Path
) -> None:
    from kdviewer.batch import run_batch
    from kdviewer.imaging import load

    with pytest.raises(ImageTooLargeError, match="times the other"):
        load(tall_png(tmp_path / "tall.png"))
    folder = tmp_path / "in"
    folder.mkdir()
    tall_png(folder / "tall.png")
    good = write_png(folder / "good.png", cxr_phantom(np.random.default_rng(3), True)[0])
    other = write_png(folder / "other.png", cxr_phantom(np.random.default_rng(4), False)[0])
    heat = tmp_path / "heat"
    # the heatmap of good.png cannot be written (a folder is in the way): that row loses its heatmap only
    blocked = heat / f"good.png.{hashlib.sha1(str(good).encode()).hexdigest()[:8]}.png"
    blocked.mkdir(parents=True)
    s = run_batch(folder, bundle, tmp_path / "r.csv", heatmaps_dir=heat, workers=0)
    rows = {Path(r["path"]).name: r for r in read_rows(tmp_path / "r.csv")}
    assert s.processed == 3 and not s.cancelled
    assert rows["good.png"]["label"] and rows["good.png"]["heatmap"] == ""
    assert Path(rows["other.png"]["heatmap"]).is_file()
    assert "times the other" in rows["tall.png"]["error"]
    assert str(other) == rows["other.png"]["path"]


def test_decoded_bytes_are_capped_before_decoding(tmp_path: Path) -> None:
    import pydicom

    from kdviewer.imaging import load
    from kdviewer.imaging.formats import MAX_DECODE_BYTES, decode_bytes

    # an RLE RGB DICOM whose header claims 9000 x 9000 (81 Mpixel, under the pixel cap): refused from
    # the header, with the memory it would need, before the decoder allocates anything
    path = rle_dicom(tmp_path / "rgb.dcm", rgb=True)
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 9000
    ds.save_as(path)
    t0 = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="MiB"):
        load(path)
    assert time.perf_counter() - t0 < 5
    assert decode_bytes(9000 * 9000, 3, 1) > MAX_DECODE_BYTES
    # a 16-bit grayscale image of the same size fits: samples and copies are what is counted
    assert decode_bytes(9000 * 9000, 1, 2) < 2 * MAX_DECODE_BYTES
    # colour in a PNG: the same budget (Pillow's 4-byte pixels and the luma temporaries counted)
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("RGB", (7000, 7000)).save(big)
    with pytest.raises(ImageTooLargeError, match="MiB"):
        load(big)


def test_rgb_to_gray_allocates_no_float_copy_of_all_channels() -> None:
    import tracemalloc

    from kdviewer.imaging._arrays import LUMA, rgb_to_gray

    rgb = np.random.default_rng(0).integers(0, 255, (1000, 1000, 3), dtype=np.uint8)
    tracemalloc.start()
    gray = rgb_to_gray(rgb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= 2 * 4 * 1000 * 1000 + 65536  # output + one temporary, not 12 bytes per pixel
    np.testing.assert_allclose(gray, rgb.astype(np.float32) @ LUMA, rtol=1e-5, atol=1e-3)


# ------------------------------------------------------------------------ item 3: outputs not ours


@pytest.mark.parametrize("name", ["notes.txt", "image.png", "old.json"])
def test_output_that_is_not_ours_is_left_untouched(bundle: Path, tmp_path: Path, name: str) -> None:
    folder = tmp_path / "in"
    write_png(folder / "a.png", cxr_phantom(np.random.default_rng(5), True)[0])
    target = tmp_path / name
    if name.endswith(".png"):
        write_png(target, cxr_phantom(np.random.default_rng(6), True)[0])
    else:
        target.write_text('{"mine": "do not touch"}\n' if name.endswith("json") else "my notes\nline 2\n")
    before = target.read_bytes()
    args = ["classify", str(folder), "--model", str(bundle), "--no-progress"]
    if name.endswith("json"):
        args += ["-o", str(tmp_path / "r.csv"), "--json", str(target)]
    else:
        args += ["-o", str(target)]
    proc = _cli(*args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "not a kdviewer results file" in proc.stderr
    assert target.read_bytes() == before


# ------------------------------------------------------------------------- item 5 and 8: bundles


def _set(manifest: dict, dotted: str, value: object) -> None:
    keys = dotted.split(".")
    d = manifest
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


NAN, INF = float("nan"), float("inf")
BAD_MANIFEST_VALUES = [
    ("calibration.temperature", NAN, "temperature"),
    ("calibration.temperature", INF, "temperature"),
    ("calibration.temperature", 1e-320, "temperature"),
    ("ood.threshold", NAN, "threshold"),
    ("class_names", ["normal", "normal"], "unique"),
    ("class_names", ["normal", "\x1b[31mnodule"], "control"),
    ("name", ANSI, "control"),
    ("preprocessing.input_size", 60000, "input_size 60000 is outside"),
    ("preprocessing.input_size", 10**30, "is outside"),
    ("preprocessing.input_size", -5, "input_size -5 is outside"),
    ("preprocessing.intensity", "window", "window"),  # with window_width NaN below
    ("disagreement_threshold", NAN, "disagreement_threshold"),
    ("preprocessing.normalization.std", [0.0], "std"),
]


@pytest.mark.parametrize(("field", "value", "named"), BAD_MANIFEST_VALUES,
                         ids=[f"{f}={v!r}"[:40] for f, v, _ in BAD_MANIFEST_VALUES])
def test_bad_manifest_numbers_are_a_bundle_error_naming_the_field(
    bundle: Path, tmp_path: Path, field: str, value: object, named: str
) -> None:
    from kdviewer.inference.predict import Classifier

    d = tmp_path / "b"
    shutil.copytree(bundle, d)
    m = json.loads((d / "manifest.json").read_text())
    _set(m, field, value)
    if field == "preprocessing.input_size":  # resize follows, so only the size itself is wrong
        _set(m, "preprocessing.resize", value)
    if field == "preprocessing.intensity":
        _set(m, "preprocessing.window_center", 0.0)
        _set(m, "preprocessing.window_width", NAN)
    (d / "manifest.json").write_text(json.dumps(m))  # json writes NaN / Infinity literals
    with pytest.raises(BundleError, match=named):
        Classifier(d)


def test_deeply_nested_or_huge_manifest_is_refused(bundle: Path, tmp_path: Path) -> None:
    from kdviewer.models.bundle import open_bundle

    d = tmp_path / "b"
    shutil.copytree(bundle, d)
    m = {k: v for k, v in json.loads((d / "manifest.json").read_text()).items() if k != "training"}
    deep = "[" * 200_000 + "]" * 200_000
    (d / "manifest.json").write_text(json.dumps(m)[:-1] + ', "training": ' + deep + "}")
    with pytest.raises(BundleError, match="nested"):
        open_bundle(d)
    proc = _cli("info", str(d))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "nested" in proc.stderr


def _npz_with_header(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """An .npz whose .npy headers claim ``shapes`` (float32) but hold almost no data."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, shape in shapes.items():
            buf = io.BytesIO()
            header = {"descr": "<f4", "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(buf, header)
            zf.writestr(f"{name}.npy", buf.getvalue() + b"\x00" * 64)


@pytest.mark.parametrize("case", ["nan", "lying_header", "other_feature_size", "object"])
def test_bad_ood_statistics_are_refused(bundle: Path, tmp_path: Path, case: str) -> None:
    from kdviewer.inference.predict import Classifier

    d = tmp_path / "b"
    shutil.copytree(bundle, d)
    ood = d / json.loads((d / "manifest.json").read_text())["ood"]["stats"]
    with np.load(ood) as z:
        mean, prec = z["mean"], z["precision"]
    if case == "nan":
        mean = mean.copy()
        mean[0] = np.nan
        np.savez(ood, mean=mean, precision=prec)
    elif case == "lying_header":
        _npz_with_header(ood, {"mean": (10**12,), "precision": (10**12, 10**12)})
    elif case == "other_feature_size":
        k = mean.shape[0] // 2
        np.savez(ood, mean=mean[:k], precision=prec[:k, :k])
    else:
        np.savez(ood, mean=np.array([object()], dtype=object), precision=prec)
    t0 = time.perf_counter()
    with pytest.raises(BundleError, match=r"ood|OOD"):
        Classifier(d)
    assert time.perf_counter() - t0 < 30


# ----------------------------------------------------------------------------------- item 9: zips


def _zip_with_writestr(src: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(src.iterdir()):
            zf.writestr(p.name, p.read_bytes())  # permission bits without the regular-file type
    return out


def test_zip_bundles_cached_once_stale_extractions_cleaned_bombs_refused(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdviewer.models import bundle as bmod

    monkeypatch.setenv("KDVIEWER_CACHE", str(tmp_path / "cache"))
    z = _zip_with_writestr(bundle, tmp_path / "b.zip")
    assert all((i.external_attr >> 16) and not (i.external_attr >> 28) for i in zipfile.ZipFile(z).infolist())
    cache = tmp_path / "cache" / "bundles"
    cache.mkdir(parents=True)
    stale = cache / ".tmp-0123-999999-abc"  # left by an extraction killed with -9 (its PID is gone)
    stale.mkdir()
    (stale / "student.onnx").write_bytes(b"x" * 1000)
    b1 = bmod.open_bundle(z)
    assert not stale.exists()
    t0 = time.perf_counter()
    b2 = bmod.open_bundle(z)
    assert b2.root == b1.root and time.perf_counter() - t0 < 10
    assert len([p for p in cache.iterdir()]) == 1
    # a size cap: the least recently used extraction goes
    bmod.clean_cache(max_bytes=0)
    assert not b1.root.exists()
    # a zip bomb: 200 MB of zeros in a few hundred kB, refused before anything is written
    bomb = tmp_path / "bomb.zip"
    shutil.copy(z, bomb)
    with zipfile.ZipFile(bomb, "a", zipfile.ZIP_DEFLATED) as zf, zf.open("padding.bin", "w",
                                                                         force_zip64=True) as fh:
        chunk = b"\x00" * (1 << 20)
        for _ in range(200):
            fh.write(chunk)
    with pytest.raises(BundleError, match="zip bomb"):
        bmod.open_bundle(bomb)
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]


# ------------------------------------------------------------------------------- item 10: kills


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_kill_9_leaves_no_decoder_processes(bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    rng = np.random.default_rng(8)
    for i in range(120):
        write_png(folder / f"c{i:03d}.png", cxr_phantom(rng, bool(i % 2))[0])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "kdviewer.cli", "classify", str(folder), "-o",
                             str(tmp_path / "r.csv"), "--model", str(bundle), "--workers", "2",
                             "--no-progress"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        kids: list[int] = []
        while time.time() < deadline and len(kids) < 2:  # the decoders (and the resource tracker)
            kids = _children(proc.pid)
            time.sleep(0.1)
        assert len(kids) >= 2, "the decoder processes never started"
        time.sleep(0.5)
        kids = sorted(set(kids) | set(_children(proc.pid)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 15
        while time.time() < deadline and any(_alive(k) for k in kids):
            time.sleep(0.2)
        assert not [k for k in kids if _alive(k)], "processes outlived the killed classify"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_jsonl_catches_up_rows_written_to_the_csv_only(bundle: Path, tmp_path: Path) -> None:
    from kdviewer.batch import run_batch

    folder = tmp_path / "in"
    for i in range(3):
        write_png(folder / f"c{i}.png", cxr_phantom(np.random.default_rng(i), bool(i % 2))[0])
    out, jl = tmp_path / "r.csv", tmp_path / "r.jsonl"
    run_batch(folder, bundle, out, json_out=jl, workers=0)
    lines = jl.read_text().splitlines()
    jl.write_text("\n".join(lines[:-1]) + "\n")  # the kill came between the CSV and the JSONL write
    run_batch(folder, bundle, out, json_out=jl, workers=0)
    paths = [json.loads(x)["path"] for x in jl.read_text().splitlines()]
    assert sorted(paths) == sorted(r["path"] for r in read_rows(out)) and len(paths) == 3


def test_stale_checkpoint_temporaries_are_removed(tmp_path: Path) -> None:
    import torch

    from training.checkpoint import atomic_save

    stale = tmp_path / ".best_teacher.pt.tmp999999"  # no such process
    stale.write_bytes(b"partial")
    atomic_save({"w": torch.zeros(2)}, tmp_path / "best_teacher.pt")
    assert not stale.exists() and (tmp_path / "best_teacher.pt").is_file()
    # a run start sweeps the folder, whatever the next saves are
    from training.checkpoint import remove_stale_temporaries

    stale.write_bytes(b"partial")
    live = tmp_path / f".last.pt.tmp{os.getpid()}"  # a writer that is still alive keeps its file
    live.write_bytes(b"writing")
    remove_stale_temporaries(tmp_path)
    assert not stale.exists() and live.exists()


# ------------------------------------------------------------------------------- item 11: caps


def test_workers_and_threads_capped_at_the_cores(bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    from kdviewer.inference.predict import Classifier, cap_to_cores

    cores = os.cpu_count() or 1
    with caplog.at_level(logging.WARNING):
        assert cap_to_cores(cores + 30, "decoder processes (--workers)") == cores
        clf = Classifier(bundle, threads=300)
    assert clf.threads == cores
    assert any("300 inference threads" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------- items 12 and 13: output text


def test_info_prints_no_escape_sequences_and_no_free_text_phi(corpus: tuple[Path, dict[str, Path]]) -> None:
    _, notable = corpus
    proc = _cli("info", str(notable["phi"]))
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "RED" in proc.stdout  # the Manufacturer, made printable
    assert "DOE" not in proc.stdout and "MRN" not in proc.stdout
    from kdviewer.gui.logic import corner_text
    from kdviewer.imaging import load

    study = load(notable["phi"])
    assert study.phi.get("StudyDescription") == PHI_TEXT  # kept, but only with the PHI
    corners = corner_text(study, 0, study.window, 1.0, False)
    assert "DOE" not in " ".join(x for lines in corners.values() for x in lines)


def test_sanitizers() -> None:
    from kdviewer.sanitize import csv_path, csv_text, plain

    assert plain("a\x1b[31mb\x1b]0;title\x07c\td\ne\x00") == "abc d e"
    assert csv_text("=HYPERLINK(1)") == "'=HYPERLINK(1)" and csv_text("@x") == "'@x"
    assert csv_text("ok") == "ok"
    assert csv_path("=x.png") == "./=x.png" and csv_path("/abs/=x.png") == "/abs/=x.png"


def test_deidentify_relative_paths_and_consistent_pseudonyms(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pydicom

    from kdviewer.batch import run_batch

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    folder = tmp_path / "DOE_JANE"
    rng = np.random.default_rng(9)
    dcm = write_dicom(folder / "cr.dcm", cxr_phantom(rng, True)[0].astype(np.uint16) * 8)
    write_ct_series(folder / "ct", ct_volume(rng, n=3, size=48))
    uid = str(pydicom.dcmread(dcm).StudyInstanceUID)
    for out in ("a.csv", "b.csv"):
        run_batch(folder, bundle, tmp_path / out, workers=0, deidentify=True)
    a, b = read_rows(tmp_path / "a.csv"), read_rows(tmp_path / "b.csv")
    text = (tmp_path / "a.csv").read_text()
    assert uid not in text and str(folder) not in text and "DOE_JANE" not in text
    assert sorted(r["path"] for r in a) == ["cr.dcm", "ct"]
    assert [r["study_uid"] for r in a] == [r["study_uid"] for r in b]
    assert a[0]["study_uid"].startswith("2.25.")
    run_batch(folder, bundle, tmp_path / "a.csv", workers=0, deidentify=True)  # resume: nothing new
    assert len(read_rows(tmp_path / "a.csv")) == 2


def test_recorded_training_paths_are_redacted() -> None:
    from training.export import redact_paths

    cfg = {"data": {"root": "/data/hospital/DOE_JANE/cxr", "classes": ["a"]}, "out": "runs/x", "lr": 0.1}
    red = redact_paths(cfg)
    assert "DOE_JANE" not in json.dumps(red) and red["data"]["root"].startswith("cxr (path sha256:")
    assert red["out"] == "runs/x" and red["lr"] == 0.1 and red["data"]["classes"] == ["a"]


# ------------------------------------------------------------------ item 14: DICOM class folders


def test_kd_train_reads_dicom_class_folders(tmp_path: Path) -> None:
    from training.config import DataConfig
    from training.data import discover

    out = tmp_path / "syn"
    proc = subprocess.run([sys.executable, "-m", "training", "synth", "--kind", "cxr", "--n", "8", "--out",
                           str(out), "--format", "dicom", "--size", "48"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    splits = discover(DataConfig.model_validate({"root": str(out)}), "single-label", 0)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 8
    assert all(s.path.suffix == ".dcm" for s in splits.train)


def test_damaged_slice_in_predict_output(corpus: tuple[Path, dict[str, Path]], bundle: Path) -> None:
    _, notable = corpus
    proc = _cli("predict", str(notable["ct"]), "--model", str(bundle), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["slices_found"] == 5 and len(result["slices_dropped"]) == 2
    assert {d["path"] for d in result["slices_dropped"]} == {str(notable["damaged_slice"]),
                                                               str(notable["odd_slice"])}


def test_errors_carry_their_type(corpus: tuple[Path, dict[str, Path]]) -> None:
    """Every fuzzed file either loads or raises one of our typed errors (never anything else)."""
    from kdviewer.imaging import load

    root, _ = corpus
    for p in sorted((root / "fuzz").iterdir()):
        with contextlib.suppress(ImageError):
            load(p)


# --------------------------------------------------------------- what held, and must keep holding


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/hostname"])
def test_onnx_external_data_outside_the_bundle_is_refused(tmp_path: Path, location: str) -> None:
    """An ONNX model whose weights are 'external data' at a path outside its folder does not load (a
    bundle must never read a file outside itself), and the refusal is a typed error."""
    import onnx
    from onnx import TensorProto, helper

    from kdviewer.models.runtime import OrtRuntime

    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(4, np.float32).tobytes())
    bundle_dir = tmp_path / "bundle"
    bundle_dir.mkdir()
    shutil.copy(secret, bundle_dir / "w.bin")

    def model_with_weights_at(where: str, name: str) -> Path:
        weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
        weight.data_location = TensorProto.EXTERNAL
        for k, v in (("location", where), ("offset", "0"), ("length", "16")):
            entry = weight.external_data.add()
            entry.key, entry.value = k, v
        graph = helper.make_graph(
            [helper.make_node("Add", ["input", "w"], ["logits"])], "g",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 1, 4])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, 1, 4])],
            initializer=[weight],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        (bundle_dir / name).write_bytes(model.SerializeToString())
        assert onnx.load(str(bundle_dir / name), load_external_data=False)
        return bundle_dir / name

    # control: the same model with its weights inside the bundle loads and runs
    inside = OrtRuntime(model_with_weights_at("w.bin", "ok.onnx"), warmup=False)
    assert inside.predict(np.zeros((1, 1, 1, 4), np.float32))[0].ravel().tolist() == [1.0] * 4
    with pytest.raises(BundleError, match="cannot load"):
        OrtRuntime(model_with_weights_at(location, "student.onnx"), warmup=False)


@pytest.mark.parametrize("case", ["temperature_nan", "ood_lying_header"])
def test_hostile_bundles_through_every_command(bundle: Path, tmp_path: Path, case: str) -> None:
    """info, predict, classify and render on a hostile bundle: a one-line error, never a traceback."""
    d = tmp_path / "b"
    shutil.copytree(bundle, d)
    m = json.loads((d / "manifest.json").read_text())
    if case == "temperature_nan":
        _set(m, "calibration.temperature", NAN)
        (d / "manifest.json").write_text(json.dumps(m))
    else:
        _npz_with_header(d / m["ood"]["stats"], {"mean": (10**12,), "precision": (10**12, 10**12)})
    img = write_png(tmp_path / "in" / "a.png", cxr_phantom(np.random.default_rng(11), True)[0])
    runs = {
        "info": ("info", str(d)),
        "predict": ("predict", str(img), "--model", str(d)),
        "classify": ("classify", str(img.parent), "-o", str(tmp_path / "r.csv"), "--model", str(d),
                     "--no-progress", "--workers", "0"),
        "render": ("render", str(img), "-o", str(tmp_path / "r.png"), "--model", str(d)),
    }
    for name, args in runs.items():
        proc = _cli(*args, env={"QT_QPA_PLATFORM": "offscreen"})
        assert "Traceback" not in proc.stderr + proc.stdout, (name, proc.stderr)
        assert proc.returncode == 1, (name, proc.stdout, proc.stderr)
        err = proc.stderr.strip()
        assert err.startswith("kdviewer: error:") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r.csv").exists() or (tmp_path / "r.csv").stat().st_size == 0


def test_torn_tail_repair_respects_quoted_newlines(tmp_path: Path) -> None:
    """A killed run leaves a partial last row; a path holding a newline is one quoted record, so the cut
    must come after the last complete record, not at the newline inside the quotes."""
    from kdviewer.batch import _repair_torn_tail

    out = tmp_path / "r.csv"
    whole = 'path,error\n"/d/new\nline.png",\n"/d/two  spaces.png",\n'
    out.write_text(whole + '"/d/another\nname', encoding="utf-8")  # torn inside a quoted newline
    _repair_torn_tail(out)
    assert out.read_text(encoding="utf-8") == whole
    with open(out, newline="", encoding="utf-8") as fh:
        assert [r["path"] for r in csv.DictReader(fh)] == ["/d/new\nline.png", "/d/two  spaces.png"]
