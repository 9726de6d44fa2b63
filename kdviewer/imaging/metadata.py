"""DICOM header -> display strings, split into safe fields and protected health information.

`safe` holds what can be shown by default (acquisition and image description); `phi` holds
identifiers and quasi-identifiers (names, IDs, dates, age/sex, institution, ...), hidden unless the
user asks. Keys are DICOM keywords, plus "TransferSyntax" and "SOPClass" (their UID names). Every
value is a display string; a value that cannot be decoded is skipped, never fatal.
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

log = logging.getLogger(__name__)

#: Fields shown by default (no patient identifiers).
SAFE_KEYWORDS: tuple[str, ...] = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "ImageLaterality",
    "Laterality",
    "PatientPosition",
    "PatientOrientation",
    "ImageType",
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PhotometricInterpretation",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "EstimatedRadiographicMagnificationFactor",
    "SliceThickness",
    "SpacingBetweenSlices",
    "SliceLocation",
    "ImageOrientationPatient",
    "KVP",
    "Exposure",
    "ExposureTime",
    "XRayTubeCurrent",
    "ConvolutionKernel",
    "ContrastBolusAgent",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "VOILUTFunction",
    "PresentationIntentType",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "BurnedInAnnotation",
    "SeriesNumber",
    "InstanceNumber",
)

#: Identifiers and quasi-identifiers: hidden unless asked for.
PHI_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "EthnicGroup",
    "Occupation",
    "PatientComments",
    "OtherPatientIDs",
    "OtherPatientNames",
    "MedicalRecordLocator",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "DeviceSerialNumber",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "StudyDate",
    "StudyTime",
    "SeriesDate",
    "SeriesTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "AcquisitionDateTime",
    "ContentDate",
    "ContentTime",
    "InstanceCreationDate",
    "InstanceCreationTime",
    # free text typed at the scanner: seen holding "CXR DOE JANE MRN ..."; hidden with the identifiers
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
)

UID_KEYWORDS: tuple[str, ...] = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
)


def _fmt_scalar(value: Any, vr: str) -> str:
    text = str(value).strip()
    if vr == "DA" and len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    if vr == "TM" and len(text) >= 6 and text[:6].isdigit():
        return f"{text[:2]}:{text[2:4]}:{text[4:6]}"
    if isinstance(value, float):
        return f"{value:g}"
    return text


def display_value(ds: Dataset, keyword: str) -> str | None:
    """The value of `keyword` in `ds` as a display string, or None if absent, empty or undecodable."""
    try:
        elem = ds.data_element(keyword)
        if elem is None or elem.VR == "SQ" or elem.is_empty:
            return None
        value = elem.value
        if isinstance(value, bytes):
            return None
        if isinstance(value, MultiValue | list | tuple):
            text = ", ".join(_fmt_scalar(v, elem.VR) for v in value)
        else:
            text = _fmt_scalar(value, elem.VR)
    except Exception as exc:  # a malformed value must never stop loading
        log.debug("cannot format %s: %s", keyword, exc)
        return None
    text = text.replace("\x00", "").strip()
    return text or None


def uid_name(uid: object) -> str:
    """Human name of a DICOM UID (e.g. "RT Plan Storage"), or the UID itself when unknown."""
    if not uid:
        return ""
    try:
        u = UID(str(uid))
        return str(u.name or u)
    except Exception:
        return str(uid)


def split_metadata(ds: Dataset) -> tuple[dict[str, str], dict[str, str]]:
    """(safe, phi) display dictionaries for one DICOM data set."""
    safe: dict[str, str] = {}
    phi: dict[str, str] = {}
    for kw in SAFE_KEYWORDS:
        v = display_value(ds, kw)
        if v is not None:
            safe[kw] = v
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if ts:
        safe["TransferSyntax"] = uid_name(ts)
    sop = ds.get("SOPClassUID")
    if not sop and meta is not None:
        sop = getattr(meta, "MediaStorageSOPClassUID", None)
    if sop:
        safe["SOPClass"] = uid_name(sop)
    for kw in PHI_KEYWORDS:
        v = display_value(ds, kw)
        if v is not None:
            phi[kw] = v
    return safe, phi


def dicom_uids(ds: Dataset) -> dict[str, str]:
    """Study / series / instance / frame-of-reference UIDs present in `ds`."""
    out: dict[str, str] = {}
    for kw in UID_KEYWORDS:
        v = display_value(ds, kw)
        if v is not None:
            out[kw] = v
    return out
