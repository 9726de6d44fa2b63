"""DICOM files -> `Study`, through pydicom (and the pylibjpeg plugins for compressed data).

Pixels leave here as float32 in modality units: the Modality LUT (RescaleSlope/Intercept, or a
Modality LUT Sequence, or the per-frame values of enhanced multi-frame objects) is applied, so CT
is in HU. The VOI (WindowCenter/Width, several of them, or a VOI LUT Sequence) becomes the default
display window; MONOCHROME1 sets `invert`; colour (RGB, YBR_*, PALETTE COLOR) becomes grayscale
with a note. The header is read first and the pixel-count caps are checked before anything is
decoded. Every failure leaves as one of the typed errors of `kdviewer.errors`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    MPEGTransferSyntaxes,
    RLETransferSyntaxes,
)

from kdviewer.errors import (
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    NoPixelDataError,
    UnsupportedImageError,
)
from kdviewer.imaging._arrays import replace_non_finite, rgb_to_gray
from kdviewer.imaging.formats import (
    MAX_PIXELS,
    MAX_TOTAL_PIXELS,
    check_decode_bytes,
    check_geometry,
    decode_bytes,
    sniff,
)
from kdviewer.imaging.metadata import dicom_uids, split_metadata, uid_name
from kdviewer.imaging.study import CT_PRESETS, Study, VoiLut, Window
from kdviewer.imaging.windowing import auto_window, full_range_window

log = logging.getLogger(__name__)

# Elements larger than this are read only when used (the pixel data, mostly).
_DEFER_SIZE = "256 KB"

#: Modalities of projection radiography, whose ImagerPixelSpacing may stand in for PixelSpacing.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "RF", "XA", "IO", "PX", "RG", "DF", "DR"})

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"


def _decoder_hint(ts: UID) -> str:
    if ts in JPEGTransferSyntaxes or ts in JPEGLSTransferSyntaxes:
        return "install the JPEG plugins: pip install pylibjpeg pylibjpeg-libjpeg"
    if ts in JPEG2000TransferSyntaxes or "HTJ2K" in (ts.name or ""):
        return "install the JPEG 2000 plugin: pip install pylibjpeg pylibjpeg-openjpeg"
    if ts in RLETransferSyntaxes:
        return "install the RLE plugin: pip install pylibjpeg pylibjpeg-rle"
    return "install pylibjpeg and its plugins (pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle)"


# ---------------------------------------------------------------------------------------------
# reading


def read_dataset(
    path: str | os.PathLike[str],
    *,
    stop_before_pixels: bool = False,
    specific_tags: list[str] | None = None,
) -> Dataset:
    """Read a DICOM file (with or without preamble) with large elements deferred.

    Raises:
        CorruptImageError: empty, truncated or malformed header.
        UnsupportedImageError: not DICOM, or the file cannot be opened.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UnsupportedImageError(f"cannot open the file ({exc.strerror or exc})", path) from exc
    if size == 0:
        raise CorruptImageError("the file is empty (0 bytes); copy it again from its source", path)
    try:
        return pydicom.dcmread(
            path,
            defer_size=_DEFER_SIZE,
            stop_before_pixels=stop_before_pixels,
            force=True,
            specific_tags=specific_tags,  # type: ignore[arg-type]
        )
    except InvalidDicomError as exc:
        raise UnsupportedImageError(f"not a readable DICOM file ({exc})", path) from exc
    except PermissionError as exc:
        raise UnsupportedImageError(f"cannot open the file ({exc.strerror or exc})", path) from exc
    except MemoryError as exc:
        raise ImageTooLargeError("not enough memory to read this DICOM header", path) from exc
    except Exception as exc:
        raise CorruptImageError(
            f"the DICOM header is damaged or truncated and cannot be read ({type(exc).__name__}: {exc})", path
        ) from exc


def sop_class_name(ds: Dataset) -> str | None:
    """Name of the SOP class of `ds` (e.g. "CT Image Storage"), or None when the file does not say."""
    uid = ds.get("SOPClassUID")
    if not uid:
        meta = getattr(ds, "file_meta", None)
        uid = getattr(meta, "MediaStorageSOPClassUID", None) if meta is not None else None
    return uid_name(uid) or None


def has_pixel_data(ds: Dataset) -> bool:
    return any(kw in ds for kw in _PIXEL_KEYWORDS)


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return default
        return int(value)
    except (TypeError, ValueError):
        return default


def check_pixel_data(ds: Dataset, path: Path) -> tuple[int, int, int]:
    """(frames, rows, columns) after checking that `ds` has pixels within the caps (no decoding).

    Raises:
        NoPixelDataError: no Pixel Data element (RT plan, SR, DICOMDIR, ...).
        CorruptImageError: Pixel Data without a usable Rows / Columns.
        ImageTooLargeError: Rows x Columns (x frames) above the caps.
    """
    if not has_pixel_data(ds):
        sop = sop_class_name(ds)
        meta = getattr(ds, "file_meta", None)
        sop_uid = str(ds.get("SOPClassUID") or getattr(meta, "MediaStorageSOPClassUID", "") or "")
        if len(ds) == 0:
            raise CorruptImageError(
                "the DICOM file holds only its file-meta header and no data set: it is truncated or empty",
                path,
            )
        if (sop and "Image Storage" in sop) or "Rows" in ds:
            raise CorruptImageError(
                f"this '{sop or 'DICOM image'}' has no pixel data: the file is probably truncated (cut short "
                "during transfer or copy) or its pixels were stripped; fetch it again",
                path,
            )
        if sop_uid == _DICOMDIR_SOP:
            msg = "this is a DICOMDIR (the index of a DICOM disc), not an image; open its folder instead"
        elif sop:
            msg = f"this DICOM object is a '{sop}' and holds no image (no Pixel Data); open an image instead"
        else:
            msg = "this DICOM object holds no image (no Pixel Data, SOP class not stated)"
        raise NoPixelDataError(msg, path, sop_class=sop)
    rows, cols = _int(ds, "Rows", 0) or 0, _int(ds, "Columns", 0) or 0
    frames = _int(ds, "NumberOfFrames", 1) or 1
    if rows <= 0 or cols <= 0:
        raise CorruptImageError(
            "the DICOM file has pixel data but no valid image size (Rows/Columns missing or zero)", path
        )
    if rows * cols > MAX_PIXELS:
        raise ImageTooLargeError(
            f"the DICOM header claims {rows}x{cols} = {rows * cols / 1e6:.0f} Mpixel per frame, above the "
            f"{MAX_PIXELS / 1e6:.0f} Mpixel safety cap; the file is damaged or not meant for this viewer",
            path,
        )
    if rows * cols * frames > MAX_TOTAL_PIXELS:
        raise ImageTooLargeError(
            f"the DICOM header claims {frames} frames of {rows}x{cols} ({rows * cols * frames / 1e6:.0f} "
            f"Mpixel), above the {MAX_TOTAL_PIXELS / 1e6:.0f} Mpixel safety cap for one study",
            path,
        )
    check_geometry(rows, cols, "the DICOM image", path)
    samples = max(1, min(_int(ds, "SamplesPerPixel", 1) or 1, 4))
    bits = _int(ds, "BitsAllocated", 16) or 16
    per_sample = 8 if bits > 32 else max(1, (bits + 7) // 8)
    if bits == 1:
        per_sample = 1
    try:
        encoded = path.stat().st_size if isinstance(path, Path) else 0
    except OSError:
        encoded = 0
    what = f"the DICOM image ({frames} x {rows} x {cols}, {samples} sample(s) of {bits} bits)"
    check_decode_bytes(decode_bytes(rows * cols * frames, samples, per_sample, encoded), what, path)
    return frames, rows, cols


def _ensure_transfer_syntax(ds: Dataset, path: Path, notes: list[str]) -> UID:
    meta = ds.file_meta if hasattr(ds, "file_meta") else None
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if ts:
        return UID(str(ts))
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit is None:
        implicit = True
    if little is None:
        little = True
    explicit = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    guess = ImplicitVRLittleEndian if implicit else explicit
    if meta is None:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = guess
    notes.append(f"no transfer syntax in the file meta header; assumed {guess.name} from the encoding")
    return guess


def _check_decoder(ts: UID, path: Path) -> None:
    try:
        is_compressed = ts.is_compressed
    except ValueError as exc:
        raise UnsupportedImageError(
            f"unknown transfer syntax {ts}; convert the file to a standard transfer syntax "
            "(e.g. with dcmtk's dcmconv or gdcmconv)",
            path,
        ) from exc
    if not is_compressed:
        return
    name = ts.name or str(ts)
    if ts in MPEGTransferSyntaxes or "MPEG" in name or "HEVC" in name:
        raise UnsupportedImageError(
            f"the pixel data is a video ({name}); this viewer shows still images", path
        )
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise UnsupportedImageError(
            f"the pixel data is compressed with {name}, which no decoder available to this viewer can "
            "read; convert it to an uncompressed transfer syntax (e.g. gdcmconv --raw)",
            path,
        ) from exc
    if not decoder.is_available:
        raise UnsupportedImageError(
            f"the pixel data is compressed with {name}; no installed decoder can read it — "
            f"{_decoder_hint(ts)}",
            path,
        )


_SHORT_RE = re.compile(r"\((\d+) vs (\d+) bytes\)")


def is_decoder_panic(exc: BaseException) -> bool:
    """True for a panic of a Rust decoder plugin (pyo3's ``PanicException``, e.g. pylibjpeg-rle on
    an RLE frame whose header lies about its size). It derives from BaseException, so ``except
    Exception`` misses it; KeyboardInterrupt, SystemExit and GeneratorExit are never panics."""
    kind = type(exc)
    return any(k.__name__ == "PanicException" and k.__module__.startswith("pyo3") for k in kind.__mro__)


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _native_stderr_captured(active: bool) -> Iterator[list[bytes]]:
    """While active, file descriptor 2 goes to a temporary file: a Rust decoder that panics prints its
    panic message (and, with RUST_BACKTRACE set, a native backtrace) straight to fd 2 before Python sees
    the exception. The caller decides afterwards: dropped (logged at debug) on a panic, written back
    to the real stderr otherwise. Yields a list that receives the captured bytes."""
    captured: list[bytes] = []
    if not active:
        yield captured
        return
    # fd 2 is process-wide: two threads redirecting at once would restore each other's temp files
    with _STDERR_LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            yield captured
            return
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield captured
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                tmp.seek(0)
                captured.append(tmp.read(65536))


def _decode(ds: Dataset, ts: UID, path: Path) -> np.ndarray:
    # only the RLE plugin is Rust (pylibjpeg-rle); the JPEG plugins are C/C++ and raise normally
    error: BaseException | None = None
    arr: np.ndarray | None = None
    with _native_stderr_captured(ts in RLETransferSyntaxes) as captured:
        try:
            arr = _decode_pixels(ds, ts, path)
        except BaseException as exc:  # re-raised below, once stderr is restored
            error = exc
    text = captured[0] if captured else b""
    if text:
        if isinstance(error, CorruptImageError) and "decoder panic" in str(error):
            log.debug("decoder output for %s: %s", path, text[:4000].decode("utf-8", "replace"))
        else:
            with contextlib.suppress(OSError):
                os.write(2, text)
    if error is not None:
        raise error
    assert arr is not None
    return arr


def _decode_pixels(ds: Dataset, ts: UID, path: Path) -> np.ndarray:
    try:
        return ds.pixel_array
    except MemoryError as exc:
        raise ImageTooLargeError("not enough memory to decode this image", path) from exc
    except Exception as exc:
        text = str(exc)
        short = _SHORT_RE.search(text)
        if short and "less than expected" in text:
            raise CorruptImageError(
                f"the pixel data is truncated: {short.group(1)} of {short.group(2)} bytes are present; "
                "the file was cut short (incomplete transfer or copy) — fetch it again",
                path,
            ) from exc
        raise CorruptImageError(
            f"the pixel data ({ts.name or ts}) could not be decoded: it is damaged, or uses a feature the "
            f"installed decoders do not support ({type(exc).__name__}: {text})",
            path,
        ) from exc
    except BaseException as exc:
        if not is_decoder_panic(exc):  # KeyboardInterrupt, SystemExit...: not ours to swallow
            raise
        log.debug("decoder panic on %s: %s", path, exc)
        # `from None`: the panic object must not travel with the error (it cannot be pickled back
        # from a decoder process)
        raise CorruptImageError(
            f"the pixel data ({ts.name or ts}) could not be decoded: the decoder failed on data that "
            f"does not match the header (Rows/Columns/frames); the file is damaged (decoder panic: {exc})",
            path,
        ) from None


# ---------------------------------------------------------------------------------------------
# functional groups (enhanced multi-frame objects)


def _fg_items(ds: Dataset, seq_keyword: str, frame: int = 0) -> Dataset | None:
    """Item of `seq_keyword` for `frame` from the per-frame, else the shared functional groups."""
    sources = (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0))
    for group_kw, index in sources:
        groups = ds.get(group_kw)
        if not groups or len(groups) <= index:
            continue
        seq = groups[index].get(seq_keyword)
        if seq:
            return seq[0]
    return None


def as_floats(value: Any) -> list[float]:
    """Numbers of a (multi-)value as finite floats; [] when absent or any value is not a number."""
    if value is None or isinstance(value, bytes):
        return []
    if isinstance(value, str):
        values: list[Any] = [value] if value.strip() else []
    else:
        try:
            values = list(value)
        except TypeError:
            values = [value]
    out: list[float] = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            return []
        if not math.isfinite(f):
            return []
        out.append(f)
    return out


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    try:
        return [str(v) for v in value]
    except TypeError:
        return [str(value)]


# ---------------------------------------------------------------------------------------------
# pixels -> modality units


def _rescale(ds: Dataset, n_frames: int, notes: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-frame (slopes, intercepts), or None for identity."""
    slopes = np.ones(n_frames, dtype=np.float32)
    intercepts = np.zeros(n_frames, dtype=np.float32)
    found = False
    if ds.get("PerFrameFunctionalGroupsSequence") or ds.get("SharedFunctionalGroupsSequence"):
        for i in range(n_frames):
            item = _fg_items(ds, "PixelValueTransformationSequence", i)
            if item is None:
                continue
            s, b = as_floats(item.get("RescaleSlope")), as_floats(item.get("RescaleIntercept"))
            if s or b:
                found = True
                slopes[i] = s[0] if s else 1.0
                intercepts[i] = b[0] if b else 0.0
    if not found:
        s, b = as_floats(ds.get("RescaleSlope")), as_floats(ds.get("RescaleIntercept"))
        if ("RescaleSlope" in ds and not s) or ("RescaleIntercept" in ds and not b):
            notes.append("invalid RescaleSlope/RescaleIntercept ignored; values shown as stored")
        if s or b:
            found = True
            slopes[:] = s[0] if s else 1.0
            intercepts[:] = b[0] if b else 0.0
    if not found:
        return None
    if np.any(slopes == 0):
        notes.append("RescaleSlope of 0 ignored (would erase the image); slope 1 used")
        slopes[slopes == 0] = 1.0
    if np.all(slopes == 1) and np.all(intercepts == 0):
        return None
    return slopes, intercepts


def to_modality_units(ds: Dataset, arr: np.ndarray, notes: list[str]) -> np.ndarray:
    """(N, H, W) stored values -> float32 modality values (Modality LUT / rescale applied)."""
    n = arr.shape[0]
    if ds.get("ModalityLUTSequence"):
        try:
            return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
        except Exception as exc:
            notes.append(f"the Modality LUT could not be applied ({exc}); values shown as stored")
            return arr.astype(np.float32)
    params = _rescale(ds, n, notes)
    out = arr.astype(np.float32)
    if params is not None:
        slopes, intercepts = params
        out *= slopes[:, None, None]
        out += intercepts[:, None, None]
    return out


def decode_frames(ds: Dataset, path: str | os.PathLike[str], notes: list[str]) -> np.ndarray:
    """Decode all frames of `ds` to a (N, H, W) float32 array in modality units (grayscale).

    Colour images are converted to grayscale (luma) with a note. Caps and decoders are checked
    before decoding. Raises only typed `ImageError`s.
    """
    path = Path(path)
    check_pixel_data(ds, path)
    ts = _ensure_transfer_syntax(ds, path, notes)
    _check_decoder(ts, path)
    arr = _decode(ds, ts, path)
    samples = _int(ds, "SamplesPerPixel", 1) or 1
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if samples > 1:
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise CorruptImageError(f"decoded colour pixel data has an unexpected shape {arr.shape}", path)
        notes.append(
            f"{photometric or 'colour'} image converted to grayscale (ITU-R BT.601 luma)"
            + (" after YCbCr -> RGB conversion" if photometric.startswith("YBR") else "")
        )
        return replace_non_finite(rgb_to_gray(arr), notes)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise CorruptImageError(f"decoded pixel data has an unexpected shape {arr.shape}", path)
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)
        except Exception as exc:
            notes.append(f"the colour palette could not be applied ({exc}); palette indices shown")
            return arr.astype(np.float32)
        notes.append("PALETTE COLOR image converted to grayscale (ITU-R BT.601 luma)")
        return rgb_to_gray(rgb)
    return replace_non_finite(to_modality_units(ds, arr, notes), notes)


# ---------------------------------------------------------------------------------------------
# display defaults


def _parse_voi_lut(ds: Dataset, notes: list[str]) -> VoiLut | None:
    seq = ds.get("VOILUTSequence")
    if not seq:
        return None
    item = seq[0]
    try:
        desc = [int(v) for v in item.LUTDescriptor]
        n_entries = desc[0] or 65536
        first = desc[1]
        bits = desc[2]
        intercept = as_floats(ds.get("RescaleIntercept"))
        if first > 32767 and (_int(ds, "PixelRepresentation", 0) == 1 or (intercept and intercept[0] < 0)):
            first -= 65536  # the first mapped value is signed when modality values can be negative
        data = item.LUTData
        if isinstance(data, bytes):
            little = ds.original_encoding[1] is not False if hasattr(ds, "original_encoding") else True
            if bits <= 8 and len(data) == n_entries:
                lut = np.frombuffer(data, dtype=np.uint8)
            else:
                lut = np.frombuffer(data[: len(data) // 2 * 2], dtype="<u2" if little else ">u2")
        else:
            lut = np.asarray(as_floats(data) if not isinstance(data, int) else [data], dtype=np.float64)
        if lut.size < 2:
            raise ValueError("fewer than 2 entries")
        if lut.size < n_entries:
            notes.append(f"VOI LUT shorter than its descriptor ({lut.size} < {n_entries} entries)")
        lut = np.asarray(lut[:n_entries], dtype=np.float32)
    except Exception as exc:
        notes.append(f"the VOI LUT Sequence could not be read ({exc}); ignored")
        return None
    explanation = str(item.get("LUTExplanation", "") or "").strip()
    return VoiLut(lut=lut, first_mapped=first, explanation=explanation)


def _unique(name: str, taken: dict[str, Window]) -> str:
    if name not in taken:
        return name
    i = 2
    while f"{name} ({i})" in taken:
        i += 1
    return f"{name} ({i})"


def dicom_windows(ds: Dataset, notes: list[str]) -> list[Window]:
    """The windows stored in the file (WindowCenter/Width, several allowed, or the enhanced
    FrameVOILUTSequence), named by WindowCenterWidthExplanation when given."""
    source: Dataset = ds
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        item = _fg_items(ds, "FrameVOILUTSequence")
        if item is not None:
            source = item
    centers = as_floats(source.get("WindowCenter"))
    widths = as_floats(source.get("WindowWidth"))
    if not centers or not widths:
        if "WindowCenter" in source or "WindowWidth" in source:
            notes.append("unreadable WindowCenter/WindowWidth ignored")
        return []
    explanations = _strings(source.get("WindowCenterWidthExplanation"))
    count = min(len(centers), len(widths))
    if len(centers) != len(widths):
        notes.append(f"{len(centers)} window centres but {len(widths)} widths; {count} pairs used")
    out: list[Window] = []
    for i in range(count):
        if widths[i] <= 0:
            notes.append(f"window {i + 1} has width {widths[i]:g} <= 0; ignored")
            continue
        label = explanations[i].strip() if i < len(explanations) and explanations[i].strip() else ""
        name = label or ("DICOM" if count == 1 else f"DICOM {i + 1}")
        out.append(Window(center=centers[i], width=widths[i], name=name))
    function = str(source.get("VOILUTFunction", "") or "").strip().upper()
    if out and function and function not in ("LINEAR", "LINEAR_EXACT"):
        notes.append(f"VOI LUT function {function} shown as a linear window")
    return out


def display_defaults(
    ds: Dataset, data: np.ndarray, modality: str, notes: list[str], colour: bool = False
) -> tuple[Window, dict[str, Window], VoiLut | None]:
    """(default window, offered windows, VOI LUT) for a DICOM image whose modality values are `data`.

    Default: the VOI LUT Sequence when present (the window then spans the LUT output), else the
    file's first window, else the mediastinum preset for CT, else the full range of the data.
    """
    windows: dict[str, Window] = {}
    own = [] if colour else dicom_windows(ds, notes)
    voi_lut = None if colour else _parse_voi_lut(ds, notes)
    default: Window | None = None
    if voi_lut is not None:
        lo, hi = float(voi_lut.lut.min()), float(voi_lut.lut.max())
        name = f"VOI LUT: {voi_lut.explanation}" if voi_lut.explanation else "VOI LUT"
        default = Window((lo + hi) / 2.0, max(hi - lo, 1.0), name)
        windows[name] = default
    for w in own:
        name = _unique(w.name, windows)
        windows[name] = Window(w.center, w.width, name)
        if default is None:
            default = windows[name]
    if modality == "CT" and not colour:
        for name, preset in CT_PRESETS.items():
            windows.setdefault(name, preset)
        if default is None:
            default = CT_PRESETS["mediastinum"]
            notes.append("no window in the file; CT shown with the mediastinum preset (W350/L50)")
    full = full_range_window(data)
    windows.setdefault(full.name, full)
    auto = auto_window(data)
    windows.setdefault(auto.name, auto)
    if default is None:
        default = full
    return default, windows, voi_lut


# ---------------------------------------------------------------------------------------------
# geometry


def _spacing(value: Any) -> tuple[float, float] | None:
    vals = as_floats(value)
    if len(vals) >= 2 and vals[0] > 0 and vals[1] > 0:
        return vals[0], vals[1]
    return None


def pixel_spacing(ds: Dataset, modality: str, notes: list[str]) -> tuple[float, float] | None:
    """(row, column) spacing in mm: PixelSpacing (or the enhanced PixelMeasuresSequence), else
    ImagerPixelSpacing for projection radiographs (with a note), else None."""
    sp = _spacing(ds.get("PixelSpacing"))
    if sp is None:
        item = _fg_items(ds, "PixelMeasuresSequence")
        if item is not None:
            sp = _spacing(item.get("PixelSpacing"))
    if sp is not None:
        return sp
    imager = _spacing(ds.get("ImagerPixelSpacing"))
    if imager is not None and (modality in PROJECTION_MODALITIES or modality in ("", "OT")):
        notes.append(
            "pixel spacing taken from ImagerPixelSpacing (measured at the detector, not corrected "
            "for geometric magnification): distances are slightly overestimated"
        )
        return imager
    return None


def slice_normal(orientation: Any) -> np.ndarray | None:
    """Unit normal of the slice plane from ImageOrientationPatient (row and column cosines)."""
    iop = as_floats(orientation)
    if len(iop) != 6:
        return None
    normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
    norm = float(np.linalg.norm(normal))
    return None if norm < 1e-6 else normal / norm


def _frame_positions(ds: Dataset, n_frames: int) -> list[float] | None:
    if n_frames < 2 or not ds.get("PerFrameFunctionalGroupsSequence"):
        return None
    orient = _fg_items(ds, "PlaneOrientationSequence")
    normal = slice_normal(orient.get("ImageOrientationPatient")) if orient is not None else None
    if normal is None:
        return None
    positions: list[float] = []
    for i in range(n_frames):
        item = _fg_items(ds, "PlanePositionSequence", i)
        ipp = as_floats(item.get("ImagePositionPatient")) if item is not None else []
        if len(ipp) != 3:
            return None
        positions.append(float(np.dot(normal, ipp)))
    return positions


# ---------------------------------------------------------------------------------------------
# the loader


def study_from_dataset(ds: Dataset, path: str | os.PathLike[str]) -> Study:
    """Build a `Study` from an already read data set (pixels decoded here)."""
    path = Path(path)
    notes: list[str] = []
    data = decode_frames(ds, path, notes)
    modality = str(ds.get("Modality", "") or "").strip().upper() or "OT"
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper() or "MONOCHROME2"
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2")
    window, windows, voi_lut = display_defaults(ds, data, modality, notes, colour=colour)
    spacing = pixel_spacing(ds, modality, notes)
    positions = _frame_positions(ds, data.shape[0])
    slice_spacing = None
    if positions is not None:
        diffs = np.abs(np.diff(positions))
        med = float(np.median(diffs)) if diffs.size else 0.0
        slice_spacing = med if med > 0 else None
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        notes.append("burned-in annotation: the pixels themselves may show patient identifiers")
    if photometric == "MONOCHROME1":
        notes.append("MONOCHROME1: displayed inverted so that dense tissue is bright")
    safe, phi = split_metadata(ds)
    return Study(
        frames=data,
        modality=modality,
        photometric=photometric,
        invert=photometric == "MONOCHROME1",
        pixel_spacing=spacing,
        slice_spacing=slice_spacing,
        window=window,
        windows=windows,
        metadata=safe,
        phi=phi,
        notes=notes,
        source=path,
        uids=dicom_uids(ds),
        slice_positions=positions,
        voi_lut=voi_lut,
    )


def load_dicom(path: str | os.PathLike[str]) -> Study:
    """Load one DICOM file (single or multi-frame) as a `Study`.

    Raises:
        NoPixelDataError: the object has no image (RT plan, SR, DICOMDIR ...), naming its SOP class.
        ImageTooLargeError: Rows x Columns (x frames) above the caps (checked before decoding).
        UnsupportedImageError: not DICOM, or compressed with a codec no installed decoder reads.
        CorruptImageError: empty, truncated or undecodable file.
    """
    path = Path(path)
    if sniff(path) != "dicom":
        if path.is_file() and path.stat().st_size == 0:
            raise CorruptImageError("the file is empty (0 bytes); copy it again from its source", path)
        raise UnsupportedImageError("not a DICOM file (no DICM marker and no DICOM header found)", path)
    try:
        ds = read_dataset(path)
        return study_from_dataset(ds, path)
    except ImageError:
        raise
    except MemoryError as exc:
        raise ImageTooLargeError("not enough memory to load this image", path) from exc
    except Exception as exc:
        log.debug("unexpected error loading %s", path, exc_info=True)
        raise CorruptImageError(
            f"the DICOM file could not be interpreted ({type(exc).__name__}: {exc})", path
        ) from exc
