"""Recognising image files by their content (magic bytes), never by their extension.

`sniff(path)` reads at most a few hundred bytes and says which loader should open the file:
"dicom", "png", "jpeg", "tiff" or None. `is_supported_file` is the cheap yes/no used when a
folder is scanned for a batch. The pixel-count caps that guard every loader live here too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

Kind = Literal["dicom", "png", "jpeg", "tiff"]

#: Largest single frame (rows x columns) any loader will decode (decompression-bomb guard).
MAX_PIXELS: int = 100_000_000
#: Largest total pixel count of one Study (all frames / slices together): 2**28 float32 = 1 GiB.
MAX_TOTAL_PIXELS: int = 2**28
#: Largest ratio of the long to the short side of a frame: a 1 x 100,000,000 "image" is a hostile
#: header, and its model-input resize / heatmap would need gigabytes.
MAX_ASPECT_RATIO: float = 20.0
#: Largest memory one decode may need, every copy counted (the decoder's own buffer, the stored
#: samples, the float32 frames and the temporaries of the conversion to grayscale). With the default
#: two decoder processes and the main process, a classify run stays under 2.5 GB.
MAX_DECODE_BYTES: int = 640 * 1024**2


def decode_bytes(
    pixels: int, samples: int = 1, bytes_per_sample: int = 1, encoded: int = 0, frames_only: bool = False
) -> int:
    """Estimated peak bytes to decode ``pixels`` pixels (all frames) into float32 grayscale frames.

    Counts the encoded input held in memory (``encoded``), the decoder's output (``samples`` x
    ``bytes_per_sample`` per pixel), the float32 result, and one float32 temporary of the grayscale
    conversion for colour images. ``frames_only``: only the float32 result (a series filled slice
    by slice into one preallocated volume).
    """
    out = 4 * pixels
    if frames_only:
        return out
    stored = samples * bytes_per_sample * pixels
    temp = 4 * pixels if samples > 1 else 0
    return encoded + stored + out + temp


def check_geometry(rows: int, cols: int, what: str, path: object) -> None:
    """Refuse frames whose shape is absurd (one side more than `MAX_ASPECT_RATIO` times the other)."""
    from kdviewer.errors import ImageTooLargeError

    if rows > 0 and cols > 0 and max(rows, cols) > MAX_ASPECT_RATIO * min(rows, cols):
        raise ImageTooLargeError(
            f"{what} is {cols} x {rows} pixels: one side is more than {MAX_ASPECT_RATIO:g} times the "
            "other, which no radiograph or CT slice is; the header is damaged or hostile",
            path,
        )


def check_decode_bytes(needed: int, what: str, path: object) -> None:
    """Refuse a decode whose estimated peak memory (`decode_bytes`) exceeds `MAX_DECODE_BYTES`."""
    from kdviewer.errors import ImageTooLargeError

    if needed > MAX_DECODE_BYTES:
        raise ImageTooLargeError(
            f"{what} would need about {needed / 1024**2:.0f} MiB of memory to decode, above the "
            f"{MAX_DECODE_BYTES / 1024**2:.0f} MiB safety cap; downscale it or split it before opening",
            path,
        )

#: File-name suffixes of the formats we read. Only a hint for file dialogs: loading dispatches on
#: content, and DICOM files often have no suffix at all (use `is_supported_file` when scanning).
SUPPORTED_SUFFIXES: tuple[str, ...] = (
    ".dcm",
    ".dicom",
    ".dic",
    ".ima",
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
)

_SNIFF_BYTES = 512

# Explicit-VR value representations (used to recognise DICOM written without the 128-byte preamble).
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST".split()
    + b"SV TM UC UI UL UN UR US UT UV".split()
)


def _looks_like_raw_dicom(head: bytes, size: int) -> bool:
    """DICOM without preamble / "DICM": a plausible first tag in group 0002..0028, either byte order."""
    if len(head) < 8:
        return False
    for order in ("little", "big"):
        group = int.from_bytes(head[0:2], order)  # type: ignore[arg-type]
        element = int.from_bytes(head[2:4], order)  # type: ignore[arg-type]
        if group % 2 or not 0x0002 <= group <= 0x0028 or element > 0x1FFF:
            continue
        if head[4:6] in _VRS:  # explicit VR
            return True
        if order == "little":  # implicit VR is always little endian
            length = int.from_bytes(head[4:8], "little")
            if length == 0xFFFFFFFF or length <= max(size - 8, 0):
                # the next element (if within reach) must also look like a tag of the same or a later group
                nxt = 8 + length if length != 0xFFFFFFFF else None
                if nxt is None or nxt + 4 > len(head):
                    return length != 0xFFFFFFFF and length < 1024
                next_group = int.from_bytes(head[nxt : nxt + 2], "little")
                return next_group >= group and next_group % 2 == 0 and next_group <= 0x7FE0
    return False


def sniff_bytes(head: bytes, size: int | None = None) -> Kind | None:
    """The kind of image whose file starts with `head` (at least the first 132 bytes), or None."""
    size = len(head) if size is None else size
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if _looks_like_raw_dicom(head, size):
        return "dicom"
    return None


def sniff(path: str | os.PathLike[str]) -> Kind | None:
    """The kind of image in the file at `path` judged from its first bytes, or None (also for
    unreadable files, folders and empty files)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return None
    return sniff_bytes(head, size)


def is_supported_file(path: str | os.PathLike[str]) -> bool:
    """Cheap check (reads <= 512 bytes) whether `load` would try to open this file as an image.

    True for DICOM (with or without preamble; whether it holds pixels is only known on load), PNG,
    JPEG and TIFF; False for folders, empty or unreadable files and anything else.
    """
    p = Path(path)
    return p.is_file() and sniff(p) is not None
