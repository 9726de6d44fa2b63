"""A folder (or list) of DICOM slices -> one volume `Study` (CT series).

Headers are read first (no pixels) to group files by SeriesInstanceUID; the largest series is
chosen (with a note when there were several). Slices are sorted by their position along the
slice normal (ImagePositionPatient projected on the normal of ImageOrientationPatient), falling
back to InstanceNumber, and stacked head-first. Each slice gets its own rescale (HU). Non-DICOM
files are skipped with a note; inconsistent slice sizes raise `SeriesError`.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from kdviewer.errors import ImageError, ImageTooLargeError, KDViewerError, SeriesError
from kdviewer.imaging.dicom import (
    as_floats,
    decode_frames,
    display_defaults,
    load_dicom,
    pixel_spacing,
    read_dataset,
    slice_normal,
)
from kdviewer.imaging.formats import (
    MAX_PIXELS,
    MAX_TOTAL_PIXELS,
    check_decode_bytes,
    check_geometry,
    decode_bytes,
    sniff,
)
from kdviewer.imaging.metadata import dicom_uids, split_metadata
from kdviewer.imaging.study import Study

log = logging.getLogger(__name__)

_HEADER_TAGS = [
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
]


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series found in a folder: its UIDs, a description and its files (sorted by name)."""

    series_uid: str
    study_uid: str
    modality: str
    description: str
    paths: tuple[Path, ...]
    rows: int | None = None
    columns: int | None = None
    number: str = ""

    @property
    def n_files(self) -> int:
        return len(self.paths)

    @property
    def label(self) -> str:
        """How messages name the series: modality and SeriesNumber, never the free-text description
        (it can hold patient identifiers, so it is shown only with the PHI)."""
        return f"{self.modality} series {self.number}".strip() if self.number else f"{self.modality} series"


@dataclass
class _Scan:
    series: list[SeriesInfo] = field(default_factory=list)
    not_dicom: int = 0
    no_image: int = 0
    unreadable: int = 0
    headers: dict[Path, Dataset] = field(default_factory=dict)


Source = str | os.PathLike[str] | Iterable[str | os.PathLike[str]]


def _files(source: Source) -> tuple[list[Path], Path | None]:
    if isinstance(source, str | os.PathLike):
        root = Path(source)
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
            return files, root
        return [root], root.parent
    paths = [Path(p) for p in source]
    return paths, (paths[0].parent if paths else None)


def _text(ds: Dataset, keyword: str) -> str:
    try:
        return str(ds.get(keyword, "") or "").strip()
    except Exception:
        return ""


def _int_or_none(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _scan(paths: list[Path]) -> _Scan:
    scan = _Scan()
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in paths:
        if sniff(path) != "dicom":
            scan.not_dicom += 1
            continue
        try:
            ds = read_dataset(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except KDViewerError as exc:
            log.info("skipping %s: %s", path, exc)
            scan.unreadable += 1
            continue
        if _int_or_none(ds, "Rows") is None:  # RT plan, SR, DICOMDIR, ... (no image)
            scan.no_image += 1
            continue
        groups.setdefault(_text(ds, "SeriesInstanceUID"), []).append((path, ds))
        scan.headers[path] = ds
    infos = []
    for uid, members in groups.items():
        first = members[0][1]
        infos.append(
            SeriesInfo(
                series_uid=uid,
                study_uid=_text(first, "StudyInstanceUID"),
                modality=_text(first, "Modality").upper() or "OT",
                description=_text(first, "SeriesDescription"),
                paths=tuple(sorted(p for p, _ in members)),
                rows=_int_or_none(first, "Rows"),
                columns=_int_or_none(first, "Columns"),
                number=_text(first, "SeriesNumber"),
            )
        )
    infos.sort(key=lambda s: (-s.n_files, s.series_uid))
    scan.series = infos
    return scan


def scan_series(source: Source) -> list[SeriesInfo]:
    """Group the DICOM image files of a folder (searched recursively) or of a list of paths by
    SeriesInstanceUID, reading headers only. Largest series first; non-DICOM files and DICOM
    objects without an image are left out."""
    paths, _ = _files(source)
    return _scan(paths).series


def _order(datasets: list[Dataset], notes: list[str]) -> tuple[list[int], list[float] | None]:
    """Indices of the slices head-first, and their positions along the slice normal (mm)."""
    normal = slice_normal(datasets[0].get("ImageOrientationPatient"))
    positions: list[float] = []
    if normal is not None:
        for ds in datasets:
            ipp = as_floats(ds.get("ImagePositionPatient"))
            if len(ipp) != 3:
                break
            positions.append(float(np.dot(normal, ipp)))
    if normal is not None and len(positions) == len(datasets):
        order = sorted(range(len(datasets)), key=lambda i: positions[i])
        if normal[2] > 1e-3:  # along +z (towards the head): head-first is descending
            order.reverse()
        for ds in datasets[1:]:
            other = slice_normal(ds.get("ImageOrientationPatient"))
            if other is None or abs(float(np.dot(other, normal))) < 0.999:
                notes.append("slices do not all share one orientation; sorted along the first slice's normal")
                break
        return order, [positions[i] for i in order]
    numbers = [_int_or_none(ds, "InstanceNumber") for ds in datasets]
    if all(n is not None for n in numbers):
        notes.append("no usable ImagePositionPatient/Orientation: slices sorted by InstanceNumber")
        return sorted(range(len(datasets)), key=lambda i: numbers[i]), None  # type: ignore[arg-type,return-value]
    notes.append("no slice positions or instance numbers: slices kept in file-name order")
    return list(range(len(datasets))), None


def load_series(source: Source) -> Study:
    """Load a folder (searched recursively) or a list of DICOM slice files as one volume.

    Raises:
        SeriesError: no DICOM image in the folder, slices of different sizes, or a mix of
            multi-frame objects and slices.
        ImageTooLargeError: the volume exceeds the total pixel cap (checked before decoding).
        NoPixelDataError / CorruptImageError / UnsupportedImageError: when the only file fails.
    """
    paths, root = _files(source)
    where = str(root) if root is not None else "the given files"
    scan = _scan(paths)
    notes: list[str] = []
    skipped = []
    if scan.not_dicom:
        skipped.append(f"{scan.not_dicom} non-DICOM file(s)")
    if scan.no_image:
        skipped.append(f"{scan.no_image} DICOM object(s) without an image")
    if scan.unreadable:
        skipped.append(f"{scan.unreadable} unreadable file(s)")
    if not scan.series:
        detail = f" (skipped: {', '.join(skipped)})" if skipped else ""
        raise SeriesError(f"no DICOM images found{detail}; choose a folder of DICOM slices", where)
    if skipped:
        notes.append(f"skipped {', '.join(skipped)}")
    chosen = scan.series[0]
    if len(scan.series) > 1:
        others = "; ".join(f"{s.label} ({s.n_files})" for s in scan.series[1:6])
        notes.append(
            f"{len(scan.series)} series found; showing the largest: "
            f"{chosen.label} ({chosen.n_files} images). Others: {others}"
        )
    if chosen.n_files == 1:
        study = load_dicom(chosen.paths[0])
        study.notes[:0] = notes
        return study
    return _load_volume(chosen, [scan.headers[p] for p in chosen.paths], notes, root)


def _load_volume(info: SeriesInfo, headers: list[Dataset], notes: list[str], root: Path | None) -> Study:
    found = len(headers)
    paths = list(info.paths)
    shapes = [(_int_or_none(ds, "Rows"), _int_or_none(ds, "Columns"), _int_or_none(ds, "NumberOfFrames") or 1)
              for ds in headers]
    main, main_n = Counter(shapes).most_common(1)[0]
    failed: list[tuple[str, str]] = []
    if len(set(shapes)) > 1 and main_n * 2 > found and main[2] == 1:
        # a few slices whose header disagrees with the rest (damaged, or stray files): left out, each
        # with its reason, rather than losing the whole series
        for path, shape in zip(paths, shapes, strict=True):
            if shape != main:
                why = (f"its header says {shape[0]} x {shape[1]} pixels, {shape[2]} frame(s); the other "
                       f"slices of the series are {main[0]} x {main[1]}")
                failed.append((str(path), why))
        keep = [i for i, shape in enumerate(shapes) if shape == main]
        headers, paths = [headers[i] for i in keep], [paths[i] for i in keep]
    sizes = {(_int_or_none(ds, "Rows"), _int_or_none(ds, "Columns")) for ds in headers}
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c}" for r, c in sorted(sizes, key=str))
        raise SeriesError(
            f"{info.label} mixes slice sizes ({listed}); "
            "it cannot be stacked into one volume — open a single slice instead",
            root,
        )
    if any((_int_or_none(ds, "NumberOfFrames") or 1) > 1 for ds in headers):
        raise SeriesError(
            "series mixes multi-frame objects and single slices; open the files one by one", root
        )
    rows, cols = next(iter(sizes))
    rows, cols = rows or 0, cols or 0
    n = len(headers)
    if rows * cols > MAX_PIXELS or rows * cols * n > MAX_TOTAL_PIXELS:
        raise ImageTooLargeError(
            f"{n} slices of {rows}x{cols} ({n * rows * cols / 1e6:.0f} Mpixel) exceed the "
            f"{MAX_TOTAL_PIXELS / 1e6:.0f} Mpixel safety cap for one volume",
            root,
        )
    check_geometry(rows, cols, "each slice", root)
    # the volume is filled slice by slice (one float32 copy), plus one slice being decoded
    check_decode_bytes(
        decode_bytes(n * rows * cols, frames_only=True) + decode_bytes(rows * cols, 1, 2),
        f"the series ({n} slices of {rows} x {cols})",
        root,
    )
    order, positions = _order(headers, notes)

    slice_notes: list[str] = []
    volume = np.empty((n, rows, cols), np.float32)
    kept = 0
    kept_positions: list[float] = []
    datasets: list[Dataset] = []
    for rank, index in enumerate(order):
        path = paths[index]
        try:
            ds = read_dataset(path)
            frame = decode_frames(ds, path, slice_notes)
        except ImageError as exc:
            log.warning("slice %s left out: %s", path, exc)
            reason = str(exc).removeprefix(f"{path}: ")
            failed.append((str(path), reason))
            continue
        if frame.shape != (1, rows, cols):
            failed.append((str(path), f"decoded to {frame.shape[-2]} x {frame.shape[-1]} pixels "
                                      f"({frame.shape[0]} frame(s)), not one {rows} x {cols} slice"))
            continue
        volume[kept] = frame[0]
        kept += 1
        del frame
        for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):  # only the header is kept
            if kw in ds:
                delattr(ds, kw)
        datasets.append(ds)
        if positions is not None:
            kept_positions.append(positions[rank])
    if not kept:
        raise SeriesError(f"none of the {found} slices of the series could be decoded", root)
    if failed:
        shown = ", ".join(Path(p).name for p, _ in failed[:5]) + (" ..." if len(failed) > 5 else "")
        notes.append(
            f"{len(failed)} of {found} slices could not be decoded and are left out: {shown}; a finding on "
            "those slices cannot be seen"
        )
    for note in dict.fromkeys(slice_notes):
        notes.append(note)

    volume = volume[:kept]
    mid = datasets[len(datasets) // 2]
    modality = _text(mid, "Modality").upper() or info.modality
    photometric = _text(mid, "PhotometricInterpretation").upper() or "MONOCHROME2"
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2")
    window, windows, voi_lut = display_defaults(mid, volume, modality, notes, colour=colour)
    spacing = pixel_spacing(mid, modality, notes)

    slice_positions: list[float] | None = kept_positions if positions is not None else None
    slice_spacing: float | None = None
    if slice_positions is not None and len(slice_positions) > 1:
        diffs = np.abs(np.diff(slice_positions))
        median = float(np.median(diffs))
        slice_spacing = median if median > 0 else None
        if np.any(diffs < 1e-3):
            shared = int(np.sum(diffs < 1e-3))
            notes.append(f"{shared} slice(s) share a position with another (repeated scan?)")
        elif median > 0 and float(diffs.max()) > 1.5 * median:
            gap = float(diffs.max())
            notes.append(f"uneven slice spacing (median {median:.2f} mm, largest gap {gap:.2f} mm)")
    else:
        for kw in ("SpacingBetweenSlices", "SliceThickness"):
            value = as_floats(mid.get(kw))
            if value and value[0] > 0:
                slice_spacing = value[0]
                notes.append(f"slice spacing taken from {kw} (no slice positions)")
                break

    safe, phi = split_metadata(mid)
    safe["Slices"] = str(volume.shape[0])
    safe.pop("InstanceNumber", None)
    safe.pop("SliceLocation", None)
    uids = dicom_uids(mid)
    uids.pop("SOPInstanceUID", None)
    uids["SOPInstanceUIDs"] = "\\".join(_text(ds, "SOPInstanceUID") for ds in datasets)
    if photometric == "MONOCHROME1":
        notes.append("MONOCHROME1: displayed inverted so that dense tissue is bright")
    return Study(
        frames=volume,
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
        source=root,
        uids=uids,
        slice_positions=slice_positions,
        voi_lut=voi_lut,
        dropped=failed,
        n_found=found,
    )
