"""The source of a result as DICOM needs it: which instances were read, and the minimum to link to them.

PHI rule: from a DICOM source only the attributes the standard needs to file a new object in the same
patient and study are copied — the Patient module (name, ID, issuer, birth date, sex) and the General
Study module (UIDs, date, time, ID, accession number, referring physician) — and only into the DICOM
objects. Nothing else of the source header travels (no institution, operators, device serials, ...).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from kdviewer.errors import DicomExportError, ImageError
from kdviewer.imaging.study import Study

log = logging.getLogger(__name__)

#: Patient module, Type 1/2 and the issuer (an ID without its issuer may match another patient).
PATIENT_KEYWORDS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
#: General Study module, Type 1/2 only.
STUDY_KEYWORDS = ("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                  "AccessionNumber")
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


@dataclass(frozen=True)
class SourceImage:
    """One referenced instance (and the frames of it the model read, for multi-frame objects)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    frame_numbers: tuple[int, ...] | None = None  # 1-based, multi-frame objects only


@dataclass
class SourceInfo:
    """Where a result came from, ready for the SR and the SC."""

    is_dicom: bool
    description: str  # "DICOM CT series, 6 slices", "PNG file (not DICOM)"
    file_name: str  # base name of the file or folder (the DICOM objects only)
    modality: str
    reference: Dataset | None = None  # minimal patient + study + first referenced instance
    images: list[SourceImage] = field(default_factory=list)  # the instances the model read, in order
    patient_orientation: list[str] | None = None
    body_part: str = ""  # BodyPartExamined of the source (not an identifier)
    laterality: str = ""  # Laterality / ImageLaterality of the source
    unlinked: str = ""  # why a DICOM source cannot be linked to (missing UIDs); then is_dicom is False

    @property
    def study_instance_uid(self) -> str | None:
        return None if self.reference is None else str(self.reference.StudyInstanceUID)

    def evidence(self) -> list[Dataset]:
        """Minimal data sets, one per referenced instance (the SR's evidence)."""
        out = []
        for img in self.images:
            ds = _copy(self.reference)  # type: ignore[arg-type]
            ds.SOPClassUID = img.sop_class_uid
            ds.SOPInstanceUID = img.sop_instance_uid
            ds.SeriesInstanceUID = img.series_instance_uid
            out.append(ds)
        return out


def _copy(ds: Dataset) -> Dataset:
    return copy.deepcopy(ds)


def minimal_reference(ds: Dataset) -> Dataset:
    """The patient and study attributes of ``ds`` (Type 2 ones empty when absent) and its identity."""
    ref = Dataset()
    if "SpecificCharacterSet" in ds:
        ref.SpecificCharacterSet = ds.SpecificCharacterSet
    for kw in PATIENT_KEYWORDS + STUDY_KEYWORDS:
        if kw in ds:
            ref.add(ds.data_element(kw))
        elif kw in _TYPE2:
            setattr(ref, kw, "")
    for kw in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality"):
        if kw in ds:
            ref.add(ds.data_element(kw))
    return ref


def _sop_class(ds: Dataset) -> str:
    uid = str(ds.get("SOPClassUID", "") or "").strip()
    meta = getattr(ds, "file_meta", None)
    return uid or str(getattr(meta, "MediaStorageSOPClassUID", "") or "").strip()


def _wanted_uids(study: Study) -> list[str]:
    if study.uids.get("SOPInstanceUIDs"):
        return study.uids["SOPInstanceUIDs"].split("\\")
    if study.uids.get("SOPInstanceUID"):
        return [study.uids["SOPInstanceUID"]]
    return []


def _candidate_files(study: Study, files: list[str | os.PathLike[str]] | None) -> list[Path]:
    if files:
        return [Path(f) for f in files]
    src = Path(study.source) if study.source is not None else None
    if src is None:
        return []
    if src.is_file():
        return [src]
    if src.is_dir():
        return sorted(p for p in src.rglob("*") if p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(src).parts))
    return []


def _read_headers(paths: list[Path], wanted: set[str]) -> dict[str, Dataset]:
    from kdviewer.imaging.dicom import read_dataset
    from kdviewer.imaging.formats import sniff

    found: dict[str, Dataset] = {}
    for p in paths:
        try:
            if len(paths) > 1 and sniff(p) != "dicom":
                continue
            ds = read_dataset(p, stop_before_pixels=True)
        except ImageError as exc:
            log.debug("not a source header: %s", exc)
            continue
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid in wanted and uid not in found:
            found[uid] = ds
    return found


def describe_source(
    study: Study,
    frames: list[int] | None = None,
    files: list[str | os.PathLike[str]] | None = None,
) -> SourceInfo:
    """The `SourceInfo` of ``study``; ``frames`` = the frame indices the model read (default: all);
    ``files`` = the files the study was loaded from when it is not simply ``study.source``.

    Raises:
        DicomExportError: a DICOM study whose source files cannot be found or read any more.
    """
    src = Path(study.source) if study.source is not None else None
    name = src.name if src is not None else ""
    wanted = _wanted_uids(study)
    if not wanted:  # PNG / JPEG / TIFF: nothing to link to
        kind = (src.suffix.lstrip(".").upper() or "image") if src is not None and src.is_file() else "image"
        return SourceInfo(False, f"{kind} file (not DICOM)", name, study.modality)
    headers = _read_headers(_candidate_files(study, files), set(wanted))
    missing = [u for u in wanted if u not in headers]
    if missing:
        raise DicomExportError(
            f"{len(missing)} of the {len(wanted)} source DICOM instance(s) of {name or 'this study'} could "
            "not be read again (moved or deleted?); open the case again and export from there"
        )
    frames = list(range(study.n_frames)) if frames is None else [int(i) for i in frames]
    lacking = sorted({kw for ds in headers.values() for kw in ("StudyInstanceUID", "SeriesInstanceUID")
                      if not str(ds.get(kw, "") or "").strip()}
                     | {"SOPClassUID" for ds in headers.values() if not _sop_class(ds)})
    if lacking:
        modality = str(next(iter(headers.values())).get("Modality", "") or study.modality)
        return SourceInfo(False, f"DICOM {modality} file that cannot be linked to", name, modality,
                          unlinked=f"the source lacks {', '.join(lacking)}")
    images: list[SourceImage] = []
    if len(wanted) == 1:
        ds = headers[wanted[0]]
        n = int(ds.get("NumberOfFrames", 1) or 1)
        numbers = tuple(i + 1 for i in frames) if n > 1 else None
        images.append(SourceImage(_sop_class(ds), wanted[0], str(ds.SeriesInstanceUID), numbers))
    else:
        for i in frames:
            ds = headers[wanted[i]]
            images.append(SourceImage(_sop_class(ds), wanted[i], str(ds.SeriesInstanceUID)))
    first = headers[images[0].sop_instance_uid]
    modality = str(first.get("Modality", "") or study.modality)
    if len(wanted) > 1:
        description = f"DICOM {modality} series, {len(wanted)} slices"
    else:
        description = f"DICOM {modality} image" + (f", {study.n_frames} frames" if study.n_frames > 1 else "")
    orientation: Any = first.get("PatientOrientation")
    reference = minimal_reference(first)
    reference.SOPClassUID = images[0].sop_class_uid
    return SourceInfo(
        True, description, name, modality, reference, images,
        [str(v) for v in orientation] if orientation else None,
        str(first.get("BodyPartExamined", "") or "").strip()[:16],
        str(first.get("Laterality", "") or first.get("ImageLaterality", "") or "").strip().upper(),
    )
