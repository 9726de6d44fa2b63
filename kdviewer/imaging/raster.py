"""Ordinary pictures (PNG, JPEG, TIFF) -> `Study`, through Pillow.

Grayscale 8/16/32-bit and float images keep their values; colour images (RGB, RGBA, palette,
LA, CMYK, ...) become grayscale (ITU-R BT.601 luma) with a note; the EXIF orientation is
applied; every page of a multi-page TIFF becomes a frame. The image size is checked against the
pixel caps before any pixel is decoded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kdviewer.errors import CorruptImageError, ImageError, ImageTooLargeError, UnsupportedImageError
from kdviewer.imaging._arrays import replace_non_finite, rgb_to_gray
from kdviewer.imaging.formats import (
    MAX_PIXELS,
    MAX_TOTAL_PIXELS,
    check_decode_bytes,
    check_geometry,
    sniff,
)
from kdviewer.imaging.study import Study, Window
from kdviewer.imaging.windowing import auto_window, full_range_window

log = logging.getLogger(__name__)


def _to_gray(page: Image.Image, notes: list[str]) -> tuple[np.ndarray, int | None]:
    """One Pillow page -> (2-D float32 array, bit depth when integer data else None)."""
    mode = page.mode
    if mode == "1":
        return np.asarray(page.convert("L"), dtype=np.float32), 8
    if mode == "L":
        return np.asarray(page, dtype=np.float32), 8
    if mode.startswith("I;16"):
        return np.asarray(page).astype(np.float32), 16
    if mode == "I":
        return np.asarray(page).astype(np.float32), 32
    if mode == "F":
        return np.asarray(page, dtype=np.float32), None
    if mode == "LA":
        note = "grayscale + alpha image: alpha channel dropped"
        if note not in notes:
            notes.append(note)
        return np.asarray(page.getchannel("L"), dtype=np.float32), 8
    if mode in ("I;16S", "I;32", "I;32S", "I;32B", "I;32BS"):
        return np.asarray(page.convert("I")).astype(np.float32), 32
    # colour: palette, RGB(A), CMYK, YCbCr, LAB, HSV, ...
    rgb_mode = "RGBA" if (mode in ("RGBA", "PA") or (mode == "P" and "transparency" in page.info)) else "RGB"
    rgb = np.asarray(page if mode == rgb_mode else page.convert(rgb_mode))  # uint8: no float copy
    note = f"{mode} colour image converted to grayscale (ITU-R BT.601 luma)"
    if rgb_mode == "RGBA":
        note += "; alpha channel dropped"
    if note not in notes:
        notes.append(note)
    return rgb_to_gray(rgb), 8


_GRAY_MODES = {"1": 1, "L": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4}


def _raster_decode_bytes(mode: str, pixels: int, encoded: int) -> int:
    """Peak bytes to decode ``pixels`` pixels of a Pillow ``mode`` image into float32 grayscale: the file,
    Pillow's own buffer (colour is stored as 4 bytes per pixel), a numpy copy of its samples, the
    float32 frame, and for colour the converted image and one float32 temporary of the luma sum."""
    if mode in _GRAY_MODES:
        return encoded + pixels * (_GRAY_MODES[mode] + _GRAY_MODES[mode] + 4)
    return encoded + pixels * (4 + 4 + 4 + 4 + 4)


#: PNG chunks that can carry an EXIF/XMP orientation (Pillow reads it from any of them) or more frames.
_PNG_ORIENTING_CHUNKS = frozenset({b"eXIf", b"tEXt", b"zTXt", b"iTXt", b"acTL"})


def _png_plain(data: bytes) -> bool:
    """True when no chunk of this PNG can hold an orientation or animation (walks the chunk headers)."""
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if kind in _PNG_ORIENTING_CHUNKS:
            return False
        if kind == b"IEND":
            return True
        pos += 12 + length
    return True


def _spng_gray8(path: Path, im: Image.Image) -> np.ndarray | None:
    """An 8-bit grayscale PNG decoded by libspng (pyspng), ~1.3x faster than Pillow's decoder and
    the same samples (``tests/test_imaging_raster.py`` compares them); None for anything else (other
    depths and colour types, a damaged file, pyspng not installed): Pillow decodes those."""
    if im.format != "PNG" or im.mode != "L":
        return None
    try:
        import pyspng
    except ImportError:
        return None
    try:
        data = path.read_bytes()
        # IHDR: bit depth 8, colour type 0 (grey); 1/2/4-bit grey is also mode "L" but spng would scale it
        if data[24] != 8 or data[25] != 0 or not _png_plain(data):
            return None
        arr = pyspng.load(data)
    except Exception:  # damaged data: Pillow decodes it again and names the error
        return None
    if arr.dtype != np.uint8 or arr.shape != (im.size[1], im.size[0]):
        return None
    return arr.astype(np.float32)


def load_raster(path: str | os.PathLike[str]) -> Study:
    """Load a PNG / JPEG / TIFF file as a `Study` (modality "OT").

    Raises:
        ImageTooLargeError: the image (or all pages together) exceeds the pixel caps.
        CorruptImageError: the file is truncated or its data cannot be decoded.
        UnsupportedImageError: Pillow does not recognise the file as an image.
    """
    path = Path(path)
    try:
        return _load(path)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(
            f"image is too large to open safely ({exc}); reduce its size or split it", path
        ) from exc
    except UnidentifiedImageError as exc:
        kind = sniff(path)
        if kind is not None:  # it has the signature, so the header behind it is broken
            msg = f"the {kind.upper()} header is damaged; the file cannot be read"
            raise CorruptImageError(msg, path) from exc
        raise UnsupportedImageError("not an image format this viewer can read", path) from exc
    except MemoryError as exc:
        raise ImageTooLargeError("not enough memory to decode this image", path) from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error ...
        raise CorruptImageError(
            f"the image data is damaged or truncated and cannot be decoded ({type(exc).__name__}: {exc})",
            path,
        ) from exc


def _load(path: Path) -> Study:
    notes: list[str] = []
    # Pillow itself raises DecompressionBombError above 2 x Image.MAX_IMAGE_PIXELS (mapped to
    # ImageTooLargeError by the caller); our own caps are checked below from the header alone.
    im = Image.open(path)
    with im:
        fmt = im.format or "image"
        width, height = im.size
        n_pages = int(getattr(im, "n_frames", 1) or 1)
        if width <= 0 or height <= 0:
            raise CorruptImageError(f"{fmt} header gives an empty image size {width}x{height}", path)
        if width * height > MAX_PIXELS:
            raise ImageTooLargeError(
                f"{fmt} image is {width}x{height} = {width * height / 1e6:.0f} Mpixel, above the "
                f"{MAX_PIXELS / 1e6:.0f} Mpixel safety cap; downscale it before opening",
                path,
            )
        if width * height * n_pages > MAX_TOTAL_PIXELS:
            raise ImageTooLargeError(
                f"{fmt} file has {n_pages} pages of {width}x{height}, above the "
                f"{MAX_TOTAL_PIXELS / 1e6:.0f} Mpixel safety cap for one study",
                path,
            )
        check_geometry(height, width, f"the {fmt} image", path)
        try:
            encoded = path.stat().st_size
        except OSError:
            encoded = 0
        check_decode_bytes(
            _raster_decode_bytes(im.mode, width * height * n_pages, encoded),
            f"the {fmt} image ({n_pages} x {width} x {height}, mode {im.mode})",
            path,
        )
        source_mode = im.mode
        frames: list[np.ndarray] = []
        depths: set[int | None] = set()
        skipped = 0
        exif_note = ""
        for index in range(n_pages):
            if n_pages > 1:
                im.seek(index)
            page = im
            # (Pillow's PNG getexif() decodes the whole image to look for an eXIf chunk after the
            # pixels: the fast path checks the chunk list itself and is taken only without one)
            fast = _spng_gray8(path, im) if n_pages == 1 else None
            if fast is not None:
                arr, depth = fast, 8
            else:
                orientation = page.getexif().get(0x0112, 1) if fmt in ("JPEG", "TIFF", "PNG", "MPO") else 1
                if orientation not in (None, 1):
                    page = ImageOps.exif_transpose(page)
                    exif_note = f"EXIF orientation {orientation} applied"
                page.load()
                arr, depth = _to_gray(page, notes)
            if frames and arr.shape != frames[0].shape:
                skipped += 1
                continue
            frames.append(arr)
            depths.add(depth)
        if exif_note:
            notes.append(exif_note)
        if skipped:
            notes.append(f"{skipped} of {n_pages} pages skipped: their size differs from the first page")
        if n_pages > 1:
            notes.append(f"multi-page {fmt}: {len(frames)} pages loaded as frames")

    data = np.stack(frames) if len(frames) > 1 else frames[0][None]
    if None in depths:  # only float samples can hold NaN / inf
        data = replace_non_finite(data, notes)

    depth = max((d for d in depths if d is not None), default=None) if None not in depths else None
    window = Window(127.5, 255.0, "full range") if depth == 8 else full_range_window(data)
    windows: dict[str, Window] = {window.name: window}
    auto = auto_window(data)
    windows.setdefault(auto.name, auto)

    h, w = data.shape[1:]
    metadata = {
        "Format": fmt,
        "ImageMode": source_mode,
        "Rows": str(h),
        "Columns": str(w),
        "Frames": str(data.shape[0]),
        "BitDepth": "float" if depth is None else str(depth),
    }
    log.debug("loaded %s %s %dx%dx%d", fmt, source_mode, data.shape[0], h, w)
    return Study(
        frames=data,
        modality="OT",
        photometric="MONOCHROME2",
        invert=False,
        window=window,
        windows=windows,
        metadata=metadata,
        notes=notes,
        source=path,
    )
