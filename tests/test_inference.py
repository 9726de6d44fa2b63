"""Predict / compare on real files: synthetic chest phantoms (PNG, DICOM) and a CT series."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _bundles import (
    copy_bundle,
    ct_reading_bundle,
    ct_volume,
    cxr_bundle,
    cxr_phantom,
    write_ct_png,
    write_ct_series,
    write_dicom,
    write_png,
)

from kdviewer.errors import BundleError, InferenceError
from kdviewer.imaging import load
from kdviewer.imaging.study import Study
from kdviewer.inference.compare import js_divergence, total_variation
from kdviewer.inference.predict import Classifier, Prediction, modality_refusal, softmax

# The first test builds the shared trained bundle (~20 s on an idle machine, minutes on a loaded one).
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def clf() -> Classifier:
    return Classifier(cxr_bundle().path, use_int8=False)


def test_predict_png_file(clf: Classifier, tmp_path: Path) -> None:
    img, _ = cxr_phantom(np.random.default_rng(5), positive=True)
    study = load(write_png(tmp_path / "case.png", img))
    pred = clf.predict(study)
    assert isinstance(pred, Prediction)
    assert pred.class_names == ["normal", "nodule"]
    assert pred.probabilities.shape == (2,) and abs(float(pred.probabilities.sum()) - 1) < 1e-5
    assert pred.label == pred.class_names[int(np.argmax(pred.probabilities))]
    assert pred.frames == [0] and pred.per_slice is None and pred.aggregate is None
    assert set(pred.timings) >= {"preprocess_ms", "inference_ms", "total_ms"}
    assert pred.ood_score is not None and pred.ood_flag is not None
    assert not pred.calibrated and pred.temperature == 1.0
    assert "fp32" in pred.runtime
    d = json.loads(json.dumps(pred.to_dict()))
    assert d["label"] == pred.label and set(d["probabilities"]) == {"normal", "nodule"}


def test_accuracy_through_the_viewer_path_matches_training(clf: Classifier, tmp_path: Path) -> None:
    """PNG/DICOM files -> imaging.load -> Classifier: same accuracy as the training-time inputs."""
    tb = cxr_bundle()
    correct = 0
    n = 24
    for i in range(n):
        img = tb.val.images[i]
        path = write_png(tmp_path / f"{i}.png", img) if i % 2 else write_dicom(
            tmp_path / f"{i}.dcm", img.astype(np.uint16) * 16 + 100)
        correct += clf.predict(load(path)).label_index == tb.val.labels[i]
    assert correct / n >= tb.val_accuracy - 0.15
    assert tb.val_accuracy >= 0.75, f"test student under-trained: {tb.val_accuracy:.2f}"


def test_int8_auto_and_explicit(tmp_path: Path) -> None:
    tb = cxr_bundle()
    auto = Classifier(tb.path)  # the test bundle recommends INT8
    assert auto.int8 and "int8" in auto.student.name
    fp32 = Classifier(tb.path, use_int8=False)
    s = Study(tb.val.images[0].astype(np.float32))
    assert abs(auto.predict(s).probability - fp32.predict(s).probability) < 0.15
    d = copy_bundle(tb.path, tmp_path / "b", int8_parity={"recommended": 0.0, "agreement": 0.9})
    assert not Classifier(d).int8
    m = json.loads((d / "manifest.json").read_text())
    m["student"]["onnx_int8"] = None
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="no INT8"):
        Classifier(d, use_int8=True)


def test_temperature_calibration(tmp_path: Path) -> None:
    tb = cxr_bundle()
    d = copy_bundle(tb.path, tmp_path / "t", calibration={"temperature": 3.0})
    hot = Classifier(d, use_int8=False)
    cold = Classifier(tb.path, use_int8=False)
    s = Study(tb.val.images[1].astype(np.float32))
    p_hot, p_cold = hot.predict(s), cold.predict(s)
    assert p_hot.calibrated and p_hot.temperature == 3.0
    assert np.allclose(p_hot.probabilities, softmax(p_cold.logits[0], 3.0), atol=1e-5)
    assert p_hot.label == p_cold.label
    assert abs(p_hot.probability - 0.5) <= abs(p_cold.probability - 0.5) + 1e-6


def test_ct_series_per_slice_and_aggregate(tmp_path: Path) -> None:
    clf = Classifier(ct_reading_bundle(), use_int8=False)  # a bundle that declares CT among its modalities
    vol = ct_volume(np.random.default_rng(0), n=5, size=64)
    write_ct_series(tmp_path / "ct", vol)
    study = load(tmp_path / "ct")
    assert study.is_volume and study.n_frames == 5
    pred = clf.predict(study)
    assert pred.frames == [0, 1, 2, 3, 4]
    assert pred.per_slice is not None and len(pred.per_slice) == 5
    slice_pos = np.array([s["probabilities"][1] for s in pred.per_slice])
    # binary task: the positive class of the series is the max over slices
    assert pred.aggregate == "max-nodule"
    assert pred.probabilities[1] == pytest.approx(slice_pos.max(), abs=1e-6)
    assert pred.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    assert all(s["ood_score"] is not None for s in pred.per_slice)
    assert pred.ood_score == pytest.approx(float(np.median([s["ood_score"] for s in pred.per_slice])))
    middle = clf.predict(study, frames="middle")
    assert middle.frames == [2] and middle.per_slice is None
    assert clf.predict(study, frames=[1, 3]).frames == [1, 3]
    with pytest.raises(InferenceError, match="outside"):
        clf.predict(study, frames=[9])


def test_compare_student_and_teacher(clf: Classifier) -> None:
    tb = cxr_bundle()
    agree = 0
    for i in range(8):
        c = clf.compare(Study(tb.val.images[i].astype(np.float32)))
        assert c.student.role == "student" and c.teacher.role == "teacher"
        assert c.teacher.ood_score is None  # the OOD statistics belong to the student's features
        assert c.agreement == (c.student.label == c.teacher.label)
        tv = 0.5 * np.abs(c.student.probabilities - c.teacher.probabilities).sum()
        assert c.divergence == pytest.approx(tv, abs=1e-6)
        assert 0.0 <= c.js_divergence <= 1.0
        assert c.disagree == ((not c.agreement) or c.divergence > c.threshold)
        assert c.threshold == clf.manifest.disagreement_threshold
        agree += c.agreement
        json.dumps(c.to_dict())
    assert "torch" in c.teacher.runtime


def test_divergence_measures() -> None:
    p, q = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    assert total_variation(p, q) == 1.0 and js_divergence(p, q) == pytest.approx(1.0)
    assert total_variation(p, p) == 0.0 and js_divergence(p, p) == pytest.approx(0.0)
    a, b = np.array([0.9, 0.2]), np.array([0.6, 0.25])
    assert total_variation(a, b, multi_label=True) == pytest.approx(0.3)
    assert 0 < js_divergence(a, b, multi_label=True) < 1


def test_predict_batch_equals_predict(clf: Classifier) -> None:
    tb = cxr_bundle()
    studies = [Study(tb.val.images[i].astype(np.float32)) for i in range(5)]
    singles = [clf.predict(s) for s in studies]
    inputs = [clf.preprocess(s)[0][0] for s in studies]
    batched = clf.predict_batch(inputs)
    for a, b in zip(singles, batched, strict=True):
        assert np.allclose(a.probabilities, b.probabilities, atol=1e-5)
        assert a.ood_score == pytest.approx(b.ood_score, rel=1e-4)
    comps = clf.compare_batch(inputs)
    assert len(comps) == 5 and all(c.teacher.role == "teacher" for c in comps)
    assert clf.predict_batch([]) == []


def test_multi_label_bundle_uses_sigmoid(tmp_path: Path) -> None:
    d = copy_bundle(cxr_bundle().path, tmp_path / "ml", task="multi-label")
    c = Classifier(d, use_int8=False)
    pred = c.predict(Study(cxr_bundle().val.images[0].astype(np.float32)))
    assert pred.task == "multi-label"
    assert np.allclose(pred.probabilities, 1 / (1 + np.exp(-pred.logits[0])), atol=1e-5)
    pairs = sorted(zip(pred.class_names, pred.probabilities, strict=True), key=lambda np_: -np_[1])
    assert pred.positives == [n for n, p in pairs if p >= 0.5]  # no thresholds in the manifest: 0.5 each
    assert pred.thresholds == [0.5, 0.5]


def test_bundle_written_by_the_training_exporter(tmp_path: Path) -> None:
    """Integration: `training.export.export_bundle` output opens and runs in the viewer's inference."""
    export = pytest.importorskip("training.export")
    import torch

    from kdviewer.inference.saliency import saliency
    from kdviewer.models.bundle import open_bundle

    tb = cxr_bundle()
    src = open_bundle(tb.path)
    student, teacher = src.build_torch("student"), src.build_torch("teacher")
    x = torch.from_numpy(tb.val_inputs)
    y = torch.from_numpy(tb.val.labels)
    train = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 64, 32)]
    val = [(x[i : i + 32], y[i : i + 32]) for i in range(32, 96, 32)]
    out = export.export_bundle(
        tmp_path / "exported", name="exported-test", task="single-label", class_names=["normal", "nodule"],
        preprocessing=src.manifest.preprocessing, student=student, student_arch="resnet18",
        teacher=teacher, teacher_arch="mobilenet_v3_small", train_loader=train, val_loader=val,
        config={}, history=[], data_fingerprint="test", synthetic=True, n_boot=20, complexity=False,
        latency_runs=3, calibration_size=32, report=False,
    )
    b = open_bundle(out)
    assert b.is_synthetic and b.has_teacher and b.manifest.ood is not None
    clf = Classifier(b)
    assert clf.int8 == (b.manifest.int8_parity.get("recommended", 0.0) >= 1.0)
    study = Study(tb.val.images[0].astype(np.float32))
    c = clf.compare(study)
    assert c.student.calibrated == (b.manifest.calibration.temperature != 1.0 or
                                    b.manifest.calibration.ece_after is not None)
    assert c.threshold == b.manifest.disagreement_threshold
    assert c.student.ood_score is not None
    assert saliency(clf, study, "gradcam").heatmap.shape == study.shape


# ------------------------------------------------------------------------------------- modality gate


def test_modality_gate_rule() -> None:
    reason = modality_refusal(["CR", "DX"], "CT")
    assert reason == "this model reads chest radiographs (CR, DX); this image is CT"
    assert modality_refusal(["CR", "DX"], "dx") is None
    assert modality_refusal(["CR", "DX"], "OT") is None  # PNG/JPEG: no DICOM modality, the OOD guard judges
    assert modality_refusal(["CR", "DX"], "") is None and modality_refusal(["CR", "DX"], None) is None
    assert modality_refusal([], "MR") is None  # a bundle that declares nothing is not gated
    assert "this image is MR" in str(modality_refusal(["CT"], "MR"))


def test_ct_series_given_to_an_xray_bundle_gets_no_class(clf: Classifier, tmp_path: Path) -> None:
    assert clf.manifest.modality == ["CR", "DX"]
    write_ct_series(tmp_path / "ct", ct_volume(np.random.default_rng(3), n=4, size=64))
    study = load(tmp_path / "ct")
    assert study.modality == "CT"
    pred = clf.predict(study)
    assert pred.refused == "this model reads chest radiographs (CR, DX); this image is CT"
    assert pred.label == "" and pred.label_index == -1 and not pred.reliable
    assert np.isnan(pred.probability) and np.isnan(pred.probabilities).all()
    assert pred.per_slice is None and pred.ood_score is None and pred.runtime == ""  # the model never ran
    d = json.loads(json.dumps(pred.to_dict(), allow_nan=False))
    assert d["refused"] == pred.refused and d["probabilities"] == {} and d["label"] == ""
    comp = clf.compare(study)  # the teacher is not asked either
    assert comp.student.refused and comp.teacher.refused and not comp.disagree
    json.dumps(comp.to_dict(), allow_nan=False)
    # a single CT slice as DICOM: refused too; the same pixels as PNG pass the gate (the OOD guard judges)
    one = write_dicom(tmp_path / "one.dcm", ct_volume(np.random.default_rng(4), n=1, size=64)[0] + 1024, "CT")
    assert clf.predict(load(one)).refused is not None
    png = clf.predict(load(write_ct_png(tmp_path / "ct.png", ct_volume(np.random.default_rng(4), 1, 64)[0])))
    assert png.refused is None and png.label in clf.class_names
    # a radiograph DICOM (CR) is answered
    cr_pixels = cxr_phantom(np.random.default_rng(6), True)[0].astype(np.uint16) * 8
    cr = write_dicom(tmp_path / "cr.dcm", cr_pixels)
    assert clf.predict(load(cr)).refused is None
