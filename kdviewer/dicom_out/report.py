"""The Structured Report: TID 1500 "Imaging Measurement Report" in a Comprehensive SR (see the package doc).

Content tree (``99KDV`` = kdviewer's local coding scheme, declared in CodingSchemeIdentificationSequence)::

    CONTAINER Imaging Measurement Report (TID 1500)
      Language; Observer = Device (UID from the bundle hash, name "kdviewer X", model = bundle name)
      Procedure reported = Plain chest X-ray | CT of chest | Imaging procedure (by source modality)
      CONTAINER Imaging Measurements
        CONTAINER Measurement Group (TID 1501)            -- the student (the deployed model)
          Tracking Identifier "kdviewer student classification" + Tracking UID
          Algorithm Name / Version (sha256:...) / Parameters (TID 4019)
          NUM  Probability of <class>  (one per class; absent when the modality gate refused)
          NUM  Out-of-distribution score / threshold; NUM Number of frames read
          CODE Predicted class = <class> (99KDV); multi-label: one per positive label
          CODE Unlike the training data = Yes | No
          CODE Modality gate = Model answered | Refused
          IMAGE Source (one per referenced instance; DICOM sources only)
          TEXT Modality gate reason / Series aggregate / Source / Note ("decision support, not a diagnosis")
        CONTAINER Measurement Group (TID 1501)            -- the teacher, when compared
          ... probabilities, predicted class, NUM Total variation distance to the student,
          NUM Disagreement threshold, CODE Disagrees with the student = Yes | No

`read_result` turns such an SR back into the values of a ``kdviewer classify`` CSV row.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from kdviewer.dicom_out.identity import MANUFACTURER, ModelIdentity
from kdviewer.dicom_out.sources import SourceInfo

SCHEME = "99KDV"
SCHEME_NAME = "kdviewer local codes"
DECISION_SUPPORT = (
    "Decision support only, not a diagnosis: produced by a machine-learning model without review by a "
    "physician. Not validated for clinical use."
)
NON_DICOM_NOTE = (
    "Non-DICOM source: the result refers to an ordinary picture file, not to a DICOM instance. This is a new "
    "study; its patient module is empty because the source carried no patient or study identifiers."
)
UNLINKED_NOTE = (
    "Unlinked DICOM source: {why}, so the result cannot be filed with it. This is a new study; its patient "
    "module is left empty so that it cannot be filed under the wrong patient."
)
UNIT = hd.sr.CodedConcept("1", "UCUM", "no units")
YES = hd.sr.CodedConcept(*codes.SCT.Yes[:3])
NO = hd.sr.CodedConcept(*codes.SCT.No[:3])


def local(value: str, meaning: str) -> hd.sr.CodedConcept:
    """A concept of the 99KDV scheme (code value <= 16 characters, meaning <= 64)."""
    return hd.sr.CodedConcept(value[:16], SCHEME, meaning[:64])


PREDICTED_CLASS = local("LABEL", "Predicted class")
OOD_SCORE = local("OOD-SCORE", "Out-of-distribution score")
OOD_THRESHOLD = local("OOD-THRESHOLD", "Out-of-distribution threshold")
OOD_FLAG = local("OOD-FLAG", "Unlike the training data")
GATE = local("GATE", "Modality gate")
GATE_ANSWERED = local("GATE-ANSWERED", "Model answered")
GATE_REFUSED = local("GATE-REFUSED", "Refused: modality not read by the model")
GATE_REASON = local("GATE-REASON", "Modality gate reason")
N_FRAMES = local("N-FRAMES", "Number of frames read")
AGGREGATE = local("AGGREGATE", "Series aggregate")
DIVERGENCE = local("TV-STUDENT", "Total variation distance to the student")
JS_DIVERGENCE = local("JS-STUDENT", "Jensen-Shannon divergence to the student")
DIS_THRESHOLD = local("TV-THRESHOLD", "Disagreement threshold")
DISAGREE = local("DISAGREE", "Disagrees with the student")
SOURCE = local("SOURCE", "Source")
NOTE = local("NOTE", "Note")
PROB_PREFIX = "Probability of "
TRACKING = {"student": "kdviewer student classification", "teacher": "kdviewer teacher classification"}


def class_code(name: str) -> str:
    """A stable code value (<= 14 characters) for a class name."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").upper()
    if slug and len(slug) <= 14 and slug == name.upper().replace(" ", "_"):
        return slug
    return (slug[:6] + "_" if slug else "C") + hashlib.sha1(name.encode("utf-8")).hexdigest()[:7]


def class_concept(name: str) -> hd.sr.CodedConcept:
    return local(class_code(name), name)


def prob_concept(name: str) -> hd.sr.CodedConcept:
    return local("P_" + class_code(name), PROB_PREFIX + name)


def procedure_for(modality: str) -> hd.sr.CodedConcept:
    mod = modality.upper()
    if mod == "CT":
        return hd.sr.CodedConcept("169069000", "SCT", "Computed tomography of chest")
    if mod in ("CR", "DX", "RG"):
        return hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
    return hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(float(x))


def _text(name: hd.sr.CodedConcept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type="CONTAINS")


def _group(
    role: str,
    pred: Any,
    model: ModelIdentity,
    source: SourceInfo,
    comparison: Any | None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    refused = getattr(pred, "refused", None)
    arch = model.student if role == "student" else (model.teacher or "teacher")
    params = [
        f"bundle sha256 {model.bundle_sha256}",
        f"role {role}: {arch}" + (f" on {pred.runtime}" if getattr(pred, "runtime", "") else ""),
        f"task {pred.task}; classes {', '.join(pred.class_names)}",
        (f"calibrated, temperature {pred.temperature:g}" if pred.calibrated else "not calibrated"),
        f"training data: {model.data_source}",
        f"reads modalities {', '.join(model.modalities) or 'any'}",
        f"intended use: {model.intended_use}",
        f"software {model.software}",
        *model.tags,
    ]
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"{model.name} ({role})"[:64], version=model.version, parameters=params,
        manufacturer=MANUFACTURER,
    )
    measurements: list[hd.sr.Measurement] = []
    evaluations: list[hd.sr.QualitativeEvaluation] = []
    if refused is None:
        for name, p in zip(pred.class_names, np.asarray(pred.probabilities, np.float64), strict=True):
            measurements.append(hd.sr.Measurement(name=prob_concept(name), value=float(p), unit=UNIT))
        if role == "student" and _finite(pred.ood_score):
            measurements.append(hd.sr.Measurement(name=OOD_SCORE, value=float(pred.ood_score), unit=UNIT))
            if _finite(pred.ood_threshold):
                measurements.append(
                    hd.sr.Measurement(name=OOD_THRESHOLD, value=float(pred.ood_threshold), unit=UNIT))
    if role == "student" and pred.frames:
        measurements.append(hd.sr.Measurement(name=N_FRAMES, value=len(pred.frames), unit=UNIT))
    if role == "teacher" and comparison is not None and refused is None:
        measurements.append(hd.sr.Measurement(name=DIVERGENCE, value=float(comparison.divergence), unit=UNIT))
        measurements.append(
            hd.sr.Measurement(name=JS_DIVERGENCE, value=float(comparison.js_divergence), unit=UNIT))
        measurements.append(
            hd.sr.Measurement(name=DIS_THRESHOLD, value=float(comparison.threshold), unit=UNIT))
    if refused is None:
        if pred.task == "multi-label":
            for name in pred.positives:
                evaluations.append(hd.sr.QualitativeEvaluation(PREDICTED_CLASS, class_concept(name)))
        elif pred.label:
            evaluations.append(hd.sr.QualitativeEvaluation(PREDICTED_CLASS, class_concept(pred.label)))
    if role == "student" and pred.ood_flag is not None and refused is None:
        evaluations.append(hd.sr.QualitativeEvaluation(OOD_FLAG, YES if pred.ood_flag else NO))
    if role == "student":
        evaluations.append(hd.sr.QualitativeEvaluation(GATE, GATE_REFUSED if refused else GATE_ANSWERED))
    if role == "teacher" and comparison is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(DISAGREE, YES if comparison.disagree else NO))
    images = [
        hd.sr.SourceImageForMeasurementGroup(
            img.sop_class_uid, img.sop_instance_uid,
            referenced_frame_numbers=list(img.frame_numbers) if img.frame_numbers else None,
        )
        for img in source.images
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=TRACKING[role]),
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
        source_images=images or None,
    )
    extra = group[0].ContentSequence
    if role == "student":
        if refused:
            extra.append(_text(GATE_REASON, str(refused)))
        if pred.aggregate:
            extra.append(_text(AGGREGATE, f"{pred.aggregate} over {len(pred.frames)} frames "
                                          "(see kdviewer.inference.predict)"))
        extra.append(_text(SOURCE, f"{source.description}: {source.file_name}" if source.file_name
                           else source.description))
        if source.unlinked:
            extra.append(_text(NOTE, UNLINKED_NOTE.format(why=source.unlinked)))
        elif not source.is_dicom:
            extra.append(_text(NOTE, NON_DICOM_NOTE))
        if pred.ood_flag and refused is None:
            extra.append(_text(NOTE, "No reliable answer: this image is unlike the model's training data "
                                     "(out-of-distribution score above the threshold)."))
        extra.append(_text(NOTE, DECISION_SUPPORT))
    return group


def build_content(
    prediction: Any, model: ModelIdentity, source: SourceInfo, comparison: Any | None = None
) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree of one result (student, and teacher when ``comparison`` is given)."""
    device = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["kdviewer model", model.bundle_sha256]),
            name=model.software,
            manufacturer_name=MANUFACTURER,
            model_name=model.name[:64],
        ),
    )
    groups = [_group("student", prediction, model, source, comparison)]
    if comparison is not None:
        groups.append(_group("teacher", comparison.teacher, model, source, comparison))
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=procedure_for(source.modality),
        imaging_measurements=groups,
    )


def coding_scheme_identification() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    return item


# ------------------------------------------------------------------------------------------ reading


def _items(seq: Any) -> list[Dataset]:
    return list(seq or [])


def _walk(ds: Dataset) -> list[Dataset]:
    out = []
    for item in _items(ds.get("ContentSequence")):
        out.append(item)
        out.extend(_walk(item))
    return out


def _name(item: Dataset) -> tuple[str, str, str]:
    c = item.ConceptNameCodeSequence[0]
    return str(c.CodeValue), str(c.CodingSchemeDesignator), str(c.CodeMeaning)


def _groups(sr: Dataset) -> dict[str, Dataset]:
    out: dict[str, Dataset] = {}
    for item in _walk(sr):
        if item.ValueType == "CONTAINER" and _name(item)[0] == "125007":  # Measurement Group
            for child in _items(item.get("ContentSequence")):
                if child.ValueType == "TEXT" and _name(child)[0] == "112039":  # Tracking Identifier
                    role = next((r for r, t in TRACKING.items() if t == child.TextValue), "")
                    if role:
                        out[role] = item
    return out


def read_result(sr: Dataset) -> dict[str, Any]:
    """The values of a ``kdviewer classify`` CSV row held by a kdviewer SR (missing ones absent).

    Keys: study_uid, series_uid / sop_uid (of the source), label, refused, prob_<class>, ood_score,
    ood_flag, n_frames, teacher_label, teacher_prob_<class>, divergence, disagreement.
    """
    out: dict[str, Any] = {"study_uid": str(sr.StudyInstanceUID)}
    for role, group in _groups(sr).items():
        prefix = "" if role == "student" else "teacher_"
        labels: list[str] = []
        multi = False
        for item in _items(group.get("ContentSequence")):
            value, scheme, meaning = _name(item)
            if item.ValueType == "NUM":
                number = float(item.MeasuredValueSequence[0].NumericValue)
                if meaning.startswith(PROB_PREFIX):
                    out[f"{prefix}prob_{meaning[len(PROB_PREFIX):]}"] = number
                elif value == "OOD-SCORE":
                    out["ood_score"] = number
                elif value == "N-FRAMES":
                    out["n_frames"] = int(number)
                elif value == "TV-STUDENT":
                    out["divergence"] = number
            elif item.ValueType == "CODE":
                code = item.ConceptCodeSequence[0]
                if value == "LABEL" and scheme == SCHEME:
                    labels.append(str(code.CodeMeaning))
                elif value == "OOD-FLAG":
                    out["ood_flag"] = code.CodeValue == YES.value
                elif value == "DISAGREE":
                    out["disagreement"] = code.CodeValue == YES.value
            elif item.ValueType == "TEXT" and value == "GATE-REASON":
                out["refused"] = str(item.TextValue)
            elif item.ValueType == "TEXT" and value == "111002" and "task multi-label" in str(item.TextValue):
                multi = True
            elif item.ValueType == "IMAGE" and role == "student":
                ref = item.ReferencedSOPSequence[0]
                out.setdefault("source_sop_uids", []).append(str(ref.ReferencedSOPInstanceUID))
        if multi:
            out[f"{prefix}label"] = ", ".join(labels) if labels else "no finding above its threshold"
        else:
            out[f"{prefix}label"] = labels[0] if labels else ""
    uids = out.get("source_sop_uids") or []
    if len(uids) == 1:
        out["sop_uid"] = uids[0]
    evidence = _items(sr.get("CurrentRequestedProcedureEvidenceSequence"))
    series = [s for e in evidence for s in _items(e.get("ReferencedSeriesSequence"))]
    if len(series) == 1 and uids:
        out["series_uid"] = str(series[0].SeriesInstanceUID)
    return out
