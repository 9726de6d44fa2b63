"""`load(path)`: the one entry point from a file or folder on disk to a `Study`.

The loader is chosen from the file's content (magic bytes), never from its extension: a PNG
named `.dcm` opens as a PNG, a DICOM without suffix or preamble opens as DICOM. A folder is
loaded as a DICOM series. Only typed `kdviewer.errors.ImageError`s leave this function.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kdviewer.errors import CorruptImageError, ImageError, ImageTooLargeError, UnsupportedImageError
from kdviewer.imaging.dicom import load_dicom
from kdviewer.imaging.formats import sniff
from kdviewer.imaging.raster import load_raster
from kdviewer.imaging.series import load_series
from kdviewer.imaging.study import Study

log = logging.getLogger(__name__)

_OTHER_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "a gzip archive; unpack it first"),
    (b"PK\x03\x04", "a ZIP archive; unpack it first"),
    (b"%PDF", "a PDF document, not an image"),
    (b"GIF8", "a GIF picture; save it as PNG"),
    (b"BM", "a BMP picture; save it as PNG"),
    (b"RIFF", "a RIFF (WebP/AVI) file; save it as PNG"),
    (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 picture; save it as PNG or TIFF"),
)


def _describe_unknown(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError:
        head = b""
    for magic, what in _OTHER_SIGNATURES:
        if head.startswith(magic):
            return f"this file is {what}"
    return "not an image this viewer can read (expected DICOM, PNG, JPEG or TIFF content)"


def load(path: str | os.PathLike[str]) -> Study:
    """Load an image file (DICOM, PNG, JPEG, TIFF; chosen by content) or a folder of DICOM slices.

    Raises (all `kdviewer.errors.ImageError`):
        UnsupportedImageError: missing file, not an image, no decoder for its compression
            (NoPixelDataError for DICOM objects without an image, ImageTooLargeError above the caps).
        CorruptImageError: empty, truncated or undecodable file.
        SeriesError: a folder that cannot be assembled into one volume.
    """
    p = Path(path)
    try:
        if p.is_dir():
            return load_series(p)
        if not p.exists():
            raise UnsupportedImageError("no such file (was it moved or deleted?)", p)
        if not p.is_file():
            raise UnsupportedImageError("not a regular file", p)
        if p.stat().st_size == 0:
            raise CorruptImageError("the file is empty (0 bytes); copy it again from its source", p)
        kind = sniff(p)
        if kind == "dicom":
            return load_dicom(p)
        if kind in ("png", "jpeg", "tiff"):
            return load_raster(p)
        raise UnsupportedImageError(_describe_unknown(p), p)
    except ImageError:
        raise
    except MemoryError as exc:
        raise ImageTooLargeError("not enough memory to load this image", p) from exc
    except PermissionError as exc:
        raise UnsupportedImageError(f"cannot open the file ({exc.strerror or exc})", p) from exc
    except Exception as exc:  # last line of defence: nothing untyped leaves `load`
        log.debug("unexpected error loading %s", p, exc_info=True)
        raise CorruptImageError(f"the file could not be read ({type(exc).__name__}: {exc})", p) from exc
