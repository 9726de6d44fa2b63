"""`export_case`: one result -> an SR and an SC file, the single path the CLI and the viewer both take."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from kdviewer.dicom_out.capture import Overlay, render
from kdviewer.dicom_out.identity import MANUFACTURER, ModelIdentity
from kdviewer.dicom_out.report import build_content, coding_scheme_identification
from kdviewer.dicom_out.sources import SourceImage, SourceInfo, describe_source
from kdviewer.errors import DicomExportError
from kdviewer.imaging.study import Study

if TYPE_CHECKING:
    from kdviewer.models.bundle import Bundle

log = logging.getLogger(__name__)

SC_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
SERIES_DESCRIPTION = "kdviewer AI result - decision support, not a diagnosis"


@dataclass(frozen=True)
class ExportedCase:
    """The two files written for one case and the UIDs that link them."""

    sr_path: Path
    sc_path: Path
    study_uid: str
    sr_series_uid: str
    sc_series_uid: str
    sr_sop_uid: str
    sc_sop_uid: str
    source_is_dicom: bool


def output_stem(case: str | os.PathLike[str]) -> str:
    """``<name>.<8 hex>`` for a case path (the hash of its absolute path keeps names apart)."""
    text = str(case)
    base, _, series = text.partition("#")
    full = os.path.abspath(base) + (f"#{series}" if series else "")
    tag = hashlib.sha1(full.encode("utf-8")).hexdigest()[:8]
    return f"{Path(base).stem or 'case'}.{tag}"


def as_overlay(saliency: Any) -> Overlay | None:
    """A `kdviewer.inference.saliency.SaliencyMap` (or an `Overlay`) as the capture's overlay."""
    if saliency is None or isinstance(saliency, Overlay):
        return saliency
    from kdviewer.inference.saliency import METHOD_LABELS

    return Overlay(np.asarray(saliency.heatmap, np.float32), int(saliency.frame),
                   METHOD_LABELS.get(saliency.method, saliency.method), str(saliency.class_name))


def _secondary_capture(
    pixels: np.ndarray, source: SourceInfo, study_uid: str, series_uid: str, frame: int, model: ModelIdentity,
    shown: SourceImage | None,
) -> hd.sc.SCImage:
    common: dict[str, Any] = dict(
        pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        series_instance_uid=series_uid, series_number=SC_SERIES_NUMBER, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),  # replaced below: highdicom insists, the truth may be unknown
    )
    if source.reference is not None:
        sc = hd.sc.SCImage.from_ref_dataset(source.reference, **common)
    else:
        sc = hd.sc.SCImage(study_instance_uid=study_uid, **common)
    sc.PatientOrientation = source.patient_orientation or ""
    if source.body_part:  # e.g. CHEST: an unpaired structure, so no Laterality
        sc.BodyPartExamined = source.body_part
    if source.laterality in ("R", "L"):
        sc.Laterality = source.laterality
    elif not source.body_part:  # General Series Laterality, Type 2C: empty = "actually unknown"
        sc.Laterality = ""
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = SERIES_DESCRIPTION
    sc.SoftwareVersions = model.software
    sc.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    sc.DerivationDescription = (
        "kdviewer rendering of the source in its default window with a saliency overlay and a burned-in "
        "legend of the model's answer"
    )[:1024]
    sc.LossyImageCompression = "00"
    if shown is not None:  # the instance (and frame) the capture shows
        ref = Dataset()
        ref.ReferencedSOPClassUID = shown.sop_class_uid
        ref.ReferencedSOPInstanceUID = shown.sop_instance_uid
        if shown.frame_numbers:
            ref.ReferencedFrameNumber = frame + 1
        sc.SourceImageSequence = [ref]
    return sc


def _shown_index(prediction: Any, frame: int) -> int:
    """Position of study frame ``frame`` among the referenced images (series read in part)."""
    frames = list(getattr(prediction, "frames", []) or [])
    return frames.index(frame) if frame in frames else 0


def _save(ds: Dataset, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DicomExportError(f"cannot write {path}: {exc.strerror or exc}") from exc


def export_case(
    study: Study,
    prediction: Any,
    out_dir: str | os.PathLike[str],
    *,
    bundle: Bundle | None = None,
    model: ModelIdentity | None = None,
    comparison: Any | None = None,
    saliency: Any | None = None,
    files: list[str | os.PathLike[str]] | None = None,
    case: str | os.PathLike[str] | None = None,
) -> ExportedCase:
    """Write ``<case>.<hash>.SR.dcm`` and ``.SC.dcm`` into ``out_dir`` for one result.

    Args:
        study: the case as loaded (DICOM sources are re-read for their headers only).
        prediction: the student's `Prediction` (``comparison.student`` when compared).
        bundle / model: the model bundle (or its `ModelIdentity`, computed once per bundle).
        comparison: the teacher `Comparison`, when the teacher ran.
        saliency: a `SaliencyMap` (or `Overlay`) to blend into the capture; see
            `kdviewer.inference.saliency.explain`.
        files: the source files, when the study is not simply ``study.source`` (a series in part of a
            folder); case: the case path that names the output (default ``study.source``).

    Raises:
        DicomExportError: the source cannot be re-read, or the output cannot be written.
    """
    if model is None:
        if bundle is None:
            raise ValueError("export_case needs the bundle or its ModelIdentity")
        model = ModelIdentity.from_bundle(bundle)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DicomExportError(f"cannot create the output folder {out}: {exc.strerror or exc}") from exc
    frames = list(getattr(prediction, "frames", []) or []) or None
    source = describe_source(study, frames, files)
    overlay = as_overlay(saliency)
    from kdviewer.inference.saliency import answer_frame

    frame = answer_frame(study, prediction)
    pixels = render(study, prediction, model, source, comparison, overlay, frame)
    study_uid = source.study_instance_uid or str(generate_uid())
    shown = None
    if source.images:
        shown = source.images[_shown_index(prediction, frame)] if len(source.images) > 1 else source.images[0]
    sc = _secondary_capture(pixels, source, study_uid, str(generate_uid()), frame, model, shown)
    content = build_content(prediction, model, source, comparison)
    evidence = source.evidence() if source.is_dicom else [sc]
    try:
        sr = hd.sr.ComprehensiveSR(
            evidence=evidence, content=content, series_instance_uid=str(generate_uid()),
            series_number=SR_SERIES_NUMBER, sop_instance_uid=str(generate_uid()), instance_number=1,
            manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise DicomExportError(f"the Structured Report could not be built: {exc}") from exc
    sr.SeriesDescription = SERIES_DESCRIPTION
    sr.SoftwareVersions = model.software
    sr.CodingSchemeIdentificationSequence = [coding_scheme_identification()]
    now = datetime.now()
    for ds in (sr, sc):
        ds.InstanceCreationDate = now.strftime("%Y%m%d")
        ds.InstanceCreationTime = now.strftime("%H%M%S")
    stem = output_stem(case if case is not None else (study.source or "case"))
    sr_path, sc_path = out / f"{stem}.SR.dcm", out / f"{stem}.SC.dcm"
    _save(sc, sc_path)
    _save(sr, sr_path)
    log.info("wrote %s and %s", sr_path, sc_path)
    return ExportedCase(sr_path, sc_path, str(sr.StudyInstanceUID), str(sr.SeriesInstanceUID),
                        str(sc.SeriesInstanceUID), str(sr.SOPInstanceUID), str(sc.SOPInstanceUID),
                        source.is_dicom)
