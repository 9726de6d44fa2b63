"""PNG / JPEG / TIFF loading and bad-input handling on files written here with Pillow (no mocks)."""

from __future__ import annotations

import gzip
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdviewer.errors import (
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
)
from kdviewer.imaging import MAX_PIXELS, SUPPORTED_SUFFIXES, is_supported_file, load, sniff


def gradient(h: int = 20, w: int = 30) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % 256).astype(np.uint8)


def test_png_8bit(tmp_path: Path) -> None:
    arr = gradient()
    Image.fromarray(arr).save(tmp_path / "a.png")
    study = load(tmp_path / "a.png")
    assert study.frames.shape == (1, 20, 30) and study.frames.dtype == np.float32
    np.testing.assert_array_equal(study.frames[0], arr)
    assert study.modality == "OT" and not study.invert
    assert (study.window.low, study.window.high) == (0.0, 255.0)
    assert study.metadata["BitDepth"] == "8"
    assert study.notes == []
    assert study.phi == {}


def test_png_16bit_keeps_values(tmp_path: Path) -> None:
    arr = (np.arange(40 * 50).reshape(40, 50) * 2 + 100).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode.startswith("I")
    study = load(tmp_path / "a.png")
    np.testing.assert_array_equal(study.frames[0], arr)
    assert study.window.low == pytest.approx(arr.min()) and study.window.high == pytest.approx(arr.max())


def test_jpeg_grayscale(tmp_path: Path) -> None:
    Image.fromarray(gradient(64, 64)).save(tmp_path / "a.jpg", quality=95)
    study = load(tmp_path / "a.jpg")
    assert study.shape == (64, 64)
    assert study.metadata["Format"] == "JPEG"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA", "CMYK", "1"])
def test_colour_modes_become_grayscale(tmp_path: Path, mode: str) -> None:
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 1] = 100
    rgb[:, 12:, 2] = 255
    im = Image.fromarray(rgb).convert(mode)
    suffix = ".jpg" if mode == "CMYK" else ".png"
    im.save(tmp_path / f"a{suffix}")
    study = load(tmp_path / f"a{suffix}")
    assert study.frames.shape == (1, 16, 24)
    if mode != "1":
        assert any("grayscale" in n or "alpha" in n for n in study.notes), study.notes
    if mode == "RGB":
        assert study.frames[0, 0, 0] == pytest.approx(0.299 * 200 + 0.587 * 100, abs=0.01)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    arr = gradient(20, 40)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    im.save(tmp_path / "a.png", exif=exif)
    study = load(tmp_path / "a.png")
    np.testing.assert_array_equal(study.frames[0], np.rot90(arr, k=-1))
    assert any("EXIF orientation 6" in n for n in study.notes)


def test_multipage_tiff(tmp_path: Path) -> None:
    pages = [Image.fromarray(np.full((10, 12), v, np.uint8)) for v in (10, 20, 30)]
    odd = Image.fromarray(np.zeros((5, 5), np.uint8))
    pages[0].save(tmp_path / "a.tif", save_all=True, append_images=[*pages[1:], odd])
    study = load(tmp_path / "a.tif")
    assert study.frames.shape == (3, 10, 12)
    assert [float(f[0, 0]) for f in study.frames] == [10, 20, 30]
    assert any("skipped" in n for n in study.notes)


def test_float_tiff_with_nan(tmp_path: Path) -> None:
    arr = np.linspace(-0.5, 0.5, 64, dtype=np.float32).reshape(8, 8)
    arr[0, 0] = np.nan
    Image.fromarray(arr).save(tmp_path / "a.tiff")
    study = load(tmp_path / "a.tiff")
    assert np.isfinite(study.frames).all()
    np.testing.assert_allclose(study.frames[0].ravel()[1:], arr.ravel()[1:])
    assert study.frames[0, 0, 0] == pytest.approx(np.nanmin(arr))
    assert study.window.width == pytest.approx(float(np.nanmax(arr) - np.nanmin(arr)))
    assert any("non-finite" in n for n in study.notes)


def test_16bit_tiff(tmp_path: Path) -> None:
    arr = (np.arange(100).reshape(10, 10) * 600).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "a.tif")
    np.testing.assert_array_equal(load(tmp_path / "a.tif").frames[0], arr)


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data never gets decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("size", [(11_000, 10_000), (40_000, 40_000)], ids=["above-cap", "pillow-bomb"])
def test_decompression_bomb(tmp_path: Path, size: tuple[int, int]) -> None:
    assert size[0] * size[1] > MAX_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_size(*size))
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError):
        load(path)
    assert time.perf_counter() - start < 1.0


def test_truncated_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (128, 128), dtype=np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptImageError):
        load(tmp_path / "a.png")


def test_truncated_jpeg(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (128, 128), dtype=np.uint8)).save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptImageError):
        load(tmp_path / "a.jpg")


def test_png_signature_only(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    with pytest.raises(CorruptImageError, match="PNG header"):
        load(tmp_path / "a.png")


def test_png_named_dcm_loads_by_content(tmp_path: Path) -> None:
    Image.fromarray(gradient()).save(tmp_path / "scan.dcm", format="PNG")
    study = load(tmp_path / "scan.dcm")
    assert study.metadata["Format"] == "PNG" and study.shape == (20, 30)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(CorruptImageError, match="empty"):
        load(tmp_path / "a.png")
    assert not is_supported_file(tmp_path / "a.png")


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes(tmp_path: Path, seed: int) -> None:
    data = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (tmp_path / "x.dcm").write_bytes(data)
    with pytest.raises(ImageError):
        load(tmp_path / "x.dcm")


def test_text_file(tmp_path: Path) -> None:
    (tmp_path / "notes.dcm").write_text("Patient notes: nothing to see here\n" * 20)
    with pytest.raises(UnsupportedImageError, match="not an image"):
        load(tmp_path / "notes.dcm")
    assert not is_supported_file(tmp_path / "notes.dcm")


def test_gzip_named_png(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(gzip.compress(b"hello" * 100))
    with pytest.raises(UnsupportedImageError, match="gzip"):
        load(tmp_path / "a.png")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedImageError, match="no such file"):
        load(tmp_path / "nope.png")


def test_is_supported_file_and_sniff(tmp_path: Path) -> None:
    Image.fromarray(gradient()).save(tmp_path / "a.png")
    Image.fromarray(gradient()).save(tmp_path / "b.jpg")
    Image.fromarray(gradient()).save(tmp_path / "c.tif")
    assert sniff(tmp_path / "a.png") == "png"
    assert sniff(tmp_path / "b.jpg") == "jpeg"
    assert sniff(tmp_path / "c.tif") == "tiff"
    assert all(is_supported_file(tmp_path / n) for n in ("a.png", "b.jpg", "c.tif"))
    assert not is_supported_file(tmp_path)
    assert ".dcm" in SUPPORTED_SUFFIXES and ".png" in SUPPORTED_SUFFIXES


@pytest.mark.parametrize("text_chunk", [False, True])
def test_png_fast_decoder_gives_pillows_samples(tmp_path: Path, text_chunk: bool) -> None:
    """8-bit grey PNGs go through libspng (pyspng) when installed: the same samples as Pillow's,
    and a PNG with text chunks (which may hold an EXIF/XMP orientation) still goes through Pillow."""
    from PIL import PngImagePlugin

    from kdviewer.imaging import raster

    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    info = PngImagePlugin.PngInfo()
    if text_chunk:
        info.add_text("Comment", "hello")
    p = tmp_path / "g.png"
    Image.fromarray(arr).save(p, pnginfo=info)
    study = load(p)
    assert study.frames.shape == (1, 37, 53)
    np.testing.assert_array_equal(study.frames[0], arr.astype(np.float32))
    with Image.open(p) as im:
        fast = raster._spng_gray8(p, im)
    pytest.importorskip("pyspng")
    if text_chunk:
        assert fast is None
    else:
        assert fast is not None
        np.testing.assert_array_equal(fast, arr.astype(np.float32))
