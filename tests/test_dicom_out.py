"""DICOM output: SR + SC per case for a DICOM radiograph, a CT series and a PNG, checked against the CSV.

The sources are the project's own synthetic DICOM (training.synth: a Digital X-Ray for presentation and a
CT series with HU rescale) and a PNG phantom; the model is the shared tiny trained test bundle (a copy
that also reads CT, so that the series is answered whether or not the modality gate is in place).
Every object is read back with pydicom, its content tree is walked *here* (independently of
`kdviewer.dicom_out.report.read_result`) and compared with the row ``kdviewer classify`` wrote for the
same case, its UIDs are checked against the source files, and dciodvfy (dicom3tools) must report no
error on it.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from _bundles import copy_bundle, cxr_bundle, cxr_phantom, write_png

from kdviewer.cli import main
from kdviewer.dicom_out import ModelIdentity, export_case, output_stem, read_result
from kdviewer.imaging import load
from kdviewer.inference.predict import Classifier, Prediction

pytestmark = pytest.mark.timeout(900)

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


# -------------------------------------------------------------------------------------------- helpers


def dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; .ci/run installs it")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


def walk(ds: Any) -> list[Any]:
    out = []
    for item in ds.get("ContentSequence", []) or []:
        out.append(item)
        out.extend(walk(item))
    return out


def tree_values(sr: Any) -> dict[str, dict[str, Any]]:
    """{role: {concept meaning: value}} per measurement group, roles from the tracking identifier."""
    groups: dict[str, dict[str, Any]] = {}
    for item in walk(sr):
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType != "CONTAINER" or name != "Measurement Group":
            continue
        values: dict[str, Any] = {"Predicted class": []}
        role = ""
        for child in item.ContentSequence:
            meaning = child.ConceptNameCodeSequence[0].CodeMeaning
            if child.ValueType == "TEXT" and meaning == "Tracking Identifier":
                role = child.TextValue.split()[1]  # "kdviewer student classification"
            elif child.ValueType == "NUM":
                values[meaning] = float(child.MeasuredValueSequence[0].NumericValue)
            elif child.ValueType == "CODE" and meaning == "Predicted class":
                values[meaning].append(child.ConceptCodeSequence[0].CodeMeaning)
            elif child.ValueType == "CODE":
                values[meaning] = child.ConceptCodeSequence[0].CodeMeaning
            elif child.ValueType == "TEXT":
                values.setdefault(meaning, []).append(child.TextValue)
            elif child.ValueType == "IMAGE":
                ref = child.ReferencedSOPSequence[0]
                values.setdefault("images", []).append(ref.ReferencedSOPInstanceUID)
        groups[role] = values
    return groups


def assert_tree_matches_row(sr: Any, row: dict[str, str], classes: list[str]) -> None:
    groups = tree_values(sr)
    student = groups["student"]
    if row.get("refused"):
        assert student["Modality gate"] == "Refused: modality not read by the model"
        assert row["refused"] in student["Modality gate reason"]
        assert not any(k.startswith("Probability of") for k in student)
        return
    assert student["Modality gate"] == "Model answered"
    assert ", ".join(student["Predicted class"]) == row["label"]
    for c in classes:  # the CSV keeps 6 significant digits
        assert student[f"Probability of {c}"] == pytest.approx(float(row[f"prob_{c}"]), rel=1e-5, abs=1e-6)
    assert student["Out-of-distribution score"] == pytest.approx(float(row["ood_score"]), rel=1e-5)
    assert student["Unlike the training data"] == ("Yes" if row["ood_flag"] == "true" else "No")
    assert int(student["Number of frames read"]) == int(row["n_frames"])
    teacher = groups["teacher"]
    assert ", ".join(teacher["Predicted class"]) == row["teacher_label"]
    for c in classes:
        assert teacher[f"Probability of {c}"] == pytest.approx(float(row[f"teacher_prob_{c}"]), rel=1e-5,
                                                               abs=1e-6)
    assert teacher["Total variation distance to the student"] == pytest.approx(float(row["divergence"]),
                                                                                rel=1e-5, abs=1e-6)
    assert teacher["Disagrees with the student"] == ("Yes" if row["disagreement"] == "true" else "No")
    assert any("not a diagnosis" in t for t in student["Note"])


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared test bundle, declared to read CT too (the series must get an answer)."""
    dst = tmp_path_factory.mktemp("b") / "cxr_ct"
    return copy_bundle(cxr_bundle().path, dst, modality=["CR", "DX", "CT"])


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from training.synth import generate

    root = tmp_path_factory.mktemp("dicom-out")
    cases = root / "cases"
    dx = generate("cxr", 1, root / "dx", fmt="dicom", size=96, seed=3)
    ct = generate("ct", 1, root / "ct", fmt="dicom", size=64, series_slices=3, seed=4)
    dx_file = next(dx.rglob("*.dcm"))
    ct_dir = next(p.parent for p in ct.rglob("slice_*.dcm"))
    cases.mkdir()
    shutil.copy(dx_file, cases / "radiograph.dcm")
    shutil.copytree(ct_dir, cases / "ct_series")
    write_png(cases / "picture.png", cxr_phantom(np.random.default_rng(5), True)[0])
    return {"root": root, "cases": cases, "dx": cases / "radiograph.dcm", "ct": cases / "ct_series",
            "png": cases / "picture.png"}


@pytest.fixture(scope="module")
def classified(cases: dict[str, Path], bundle: Path) -> dict[str, Any]:
    """`kdviewer classify --teacher --dicom-out` over the three cases (one run)."""
    out_csv = cases["root"] / "results.csv"
    out_dir = cases["root"] / "dicom"
    code = main(["classify", str(cases["cases"]), "-o", str(out_csv), "--model", str(bundle), "--teacher",
                 "--workers", "0", "--no-progress", "--fp32", "--dicom-out", str(out_dir)])
    assert code == 0
    with open(out_csv, newline="", encoding="utf-8") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    return {"rows": rows, "dir": out_dir, "csv": out_csv}


def objects(classified: dict[str, Any], case: Path) -> tuple[Any, Any, Path, Path]:
    stem = output_stem(str(case))
    sr_path, sc_path = classified["dir"] / f"{stem}.SR.dcm", classified["dir"] / f"{stem}.SC.dcm"
    return pydicom.dcmread(sr_path), pydicom.dcmread(sc_path), sr_path, sc_path


CLASSES = ["normal", "nodule"]


# ---------------------------------------------------------------------------------------------- tests


def test_dicom_radiograph_sr_and_sc(cases: dict[str, Path], classified: dict[str, Any]) -> None:
    src = pydicom.dcmread(cases["dx"])
    sr, sc, sr_path, sc_path = objects(classified, cases["dx"])
    row = classified["rows"]["radiograph.dcm"]
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sc.SOPClassUID == SC_CLASS
    first = sr.ContentSequence[0].ConceptNameCodeSequence[0].CodeMeaning
    assert first == "Language of Content Item and Descendants"
    assert str(sr.ContentTemplateSequence[0].TemplateIdentifier) == "1500"
    assert_tree_matches_row(sr, row, CLASSES)
    # Linked to the source: same study and patient, new series (one each: SR and OT differ in Modality)
    for obj in (sr, sc):
        assert obj.StudyInstanceUID == src.StudyInstanceUID == row["study_uid"]
        assert obj.PatientID == src.PatientID and str(obj.PatientName) == str(src.PatientName)
        assert obj.SeriesInstanceUID != src.SeriesInstanceUID
        assert "InstitutionName" not in obj and "Manufacturer" in obj  # only patient/study modules copied
    assert sr.SeriesInstanceUID != sc.SeriesInstanceUID and sr.Modality == "SR" and sc.Modality == "OT"
    assert tree_values(sr)["student"]["images"] == [src.SOPInstanceUID] == [row["sop_uid"]]
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert ev.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    refs = ev.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [r.ReferencedSOPInstanceUID for r in refs] == [src.SOPInstanceUID]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
    rgb = sc.pixel_array
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and max(rgb.shape[:2]) >= 512
    assert float(np.abs(rgb[..., 0].astype(int) - rgb[..., 2]).mean()) > 1.0  # a colour overlay/legend
    assert read_result(sr)["label"] == row["label"]
    assert dciodvfy_errors(sr_path) == [] and dciodvfy_errors(sc_path) == []


def test_ct_series_sr_references_every_slice(cases: dict[str, Path], classified: dict[str, Any]) -> None:
    slices = sorted(cases["ct"].glob("*.dcm"))
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in slices]
    sr, sc, sr_path, sc_path = objects(classified, cases["ct"])
    row = classified["rows"]["ct_series"]
    assert row["case_type"] == "series" and int(row["n_frames"]) == len(slices)
    assert_tree_matches_row(sr, row, CLASSES)
    assert sr.StudyInstanceUID == sc.StudyInstanceUID == headers[0].StudyInstanceUID == row["study_uid"]
    assert set(tree_values(sr)["student"]["images"]) == {h.SOPInstanceUID for h in headers}
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in {h.SOPInstanceUID for h in headers}
    groups = tree_values(sr)["student"]
    assert any("max-" in t for t in groups["Series aggregate"])
    assert dciodvfy_errors(sr_path) == [] and dciodvfy_errors(sc_path) == []


def test_png_gets_a_new_study_without_patient(cases: dict[str, Path], classified: dict[str, Any]) -> None:
    sr, sc, sr_path, sc_path = objects(classified, cases["png"])
    row = classified["rows"]["picture.png"]
    assert_tree_matches_row(sr, row, CLASSES)
    assert row["study_uid"] == "" and sr.StudyInstanceUID == sc.StudyInstanceUID
    for obj in (sr, sc):
        assert str(obj.get("PatientName", "")) == "" and str(obj.get("PatientID", "")) == ""
    student = tree_values(sr)["student"]
    assert any(t.startswith("Non-DICOM source") for t in student["Note"])
    assert "images" not in student  # nothing to point at but the capture itself:
    ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sc.SOPInstanceUID
    assert "SourceImageSequence" not in sc
    assert dciodvfy_errors(sr_path) == [] and dciodvfy_errors(sc_path) == []


def test_no_phi_in_non_dicom_outputs(cases: dict[str, Path], classified: dict[str, Any]) -> None:
    src = pydicom.dcmread(cases["dx"])
    phi = [str(src.PatientName), str(src.PatientID)]
    assert all(p for p in phi)
    text = classified["csv"].read_text()
    assert not any(p in text for p in phi)
    names = " ".join(p.name for p in classified["dir"].iterdir())
    assert not any(p in names for p in phi)


def test_predict_dicom_out_json(cases: dict[str, Path], bundle: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", str(cases["ct"]), "--model", str(bundle), "--fp32", "--json",
                 "--dicom-out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    sr = pydicom.dcmread(result["dicom"]["sr"])
    assert Path(result["dicom"]["sc"]).is_file()
    values = read_result(sr)
    assert values["label"] == result["label"]
    for c in CLASSES:
        assert values[f"prob_{c}"] == pytest.approx(result["probabilities"][c], rel=1e-6)
    assert "teacher" not in tree_values(sr)  # no --teacher: no teacher group


def test_refused_study_says_so(cases: dict[str, Path], tmp_path: Path) -> None:
    """A study the modality gate refuses: no class, no probabilities, the reason in SR and capture."""
    clf = Classifier(cxr_bundle().path, use_int8=False, threads=1)  # reads CR, DX only
    study = load(cases["ct"])
    reason = "this model reads chest radiographs (CR, DX); this image is CT"
    if hasattr(clf, "refused_prediction"):  # the gate's own constructor, once merged
        pred = clf.refused_prediction(reason, list(range(study.n_frames)))
    else:
        pred = Prediction(class_names=clf.class_names, probabilities=np.full(2, np.nan, np.float32), label="",
                          label_index=-1, frames=list(range(study.n_frames)))
        pred.refused = reason  # type: ignore[attr-defined]
    done = export_case(study, pred, tmp_path, bundle=clf.bundle, case=cases["ct"])
    sr = pydicom.dcmread(done.sr_path)
    assert_tree_matches_row(sr, {"refused": reason}, CLASSES)
    assert read_result(sr)["refused"] == reason and read_result(sr)["label"] == ""
    assert dciodvfy_errors(done.sr_path) == [] and dciodvfy_errors(done.sc_path) == []


def test_model_identity_hash_follows_the_files(bundle: Path, tmp_path: Path) -> None:
    from kdviewer.models.bundle import open_bundle

    a = ModelIdentity.from_bundle(open_bundle(bundle))
    copy = copy_bundle(bundle, tmp_path / "copy")
    assert ModelIdentity.from_bundle(open_bundle(copy)).bundle_sha256 == a.bundle_sha256
    with open(copy / "ood.npz", "ab") as fh:
        fh.write(b"\0")
    changed = ModelIdentity.from_bundle(open_bundle(copy))
    assert changed.bundle_sha256 != a.bundle_sha256 and changed.version.startswith("sha256:")


def test_dicom_without_uids_gets_a_new_study(cases: dict[str, Path], bundle: Path, tmp_path: Path) -> None:
    """A DICOM file stripped of its study/series UIDs cannot be linked: new study, empty patient, a note."""
    ds = pydicom.dcmread(cases["dx"])
    del ds.StudyInstanceUID, ds.SeriesInstanceUID
    path = tmp_path / "stripped.dcm"
    ds.save_as(path)
    clf = Classifier(bundle, use_int8=False, threads=1)
    study = load(path)
    done = export_case(study, clf.predict(study), tmp_path / "out", bundle=clf.bundle, case=path)
    sr, sc = pydicom.dcmread(done.sr_path), pydicom.dcmread(done.sc_path)
    assert sr.StudyInstanceUID == sc.StudyInstanceUID and str(sr.get("PatientID", "")) == ""
    notes = tree_values(sr)["student"]["Note"]
    why = "Unlinked DICOM source: the source lacks SeriesInstanceUID, StudyInstanceUID"
    assert any(why in n for n in notes)
    assert dciodvfy_errors(done.sr_path) == [] and dciodvfy_errors(done.sc_path) == []


# ------------------------------------------------------------------------------------ C-STORE (--send)


@pytest.fixture()
def storage_scp() -> Any:
    """A pynetdicom storage SCP on 127.0.0.1 (free port) that keeps what it receives."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

    received: list[Any] = []

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    ae = AE(ae_title="TESTPACS")
    ae.add_supported_context(ComprehensiveSRStorage)
    ae.add_supported_context(SecondaryCaptureImageStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    port = server.server_address[1]
    yield {"port": port, "received": received}
    server.shutdown()


def test_send_stores_sr_and_sc_on_a_pacs(cases: dict[str, Path], bundle: Path, tmp_path: Path,
                                         storage_scp: Any, capsys: pytest.CaptureFixture[str]) -> None:
    port = storage_scp["port"]
    assert main(["predict", str(cases["dx"]), "--model", str(bundle), "--fp32", "--json", "--dicom-out",
                 str(tmp_path), "--send", f"127.0.0.1:{port}", "--aet", "TESTPACS"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dicom"]["stored"] == 2 and result["dicom"]["sent_to"] == f"TESTPACS@127.0.0.1:{port}"
    written = {pydicom.dcmread(result["dicom"][k]).SOPInstanceUID for k in ("sr", "sc")}
    assert {ds.SOPInstanceUID for ds in storage_scp["received"]} == written
    sr = next(ds for ds in storage_scp["received"] if ds.Modality == "SR")
    assert read_result(sr)["label"] == result["label"]

    folder = tmp_path / "batch"
    folder.mkdir()
    shutil.copy(cases["png"], folder / "one.png")
    shutil.copy(cases["dx"], folder / "two.dcm")
    assert main(["classify", str(folder), "-o", str(tmp_path / "r.csv"), "--model", str(bundle), "--workers",
                 "0", "--no-progress", "--dicom-out", str(tmp_path / "b"), "--send", f"127.0.0.1:{port}",
                 "--aet", "TESTPACS"]) == 0
    assert f"4 object(s) stored on TESTPACS@127.0.0.1:{port}" in capsys.readouterr().out
    assert len(storage_scp["received"]) == 2 + 4


def test_send_errors_are_one_line(cases: dict[str, Path], bundle: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from pynetdicom import AE
    from pynetdicom.sop_class import SecondaryCaptureImageStorage

    assert main(["predict", str(cases["dx"]), "--send", "127.0.0.1:104"]) == 2  # no --dicom-out
    assert "--send needs --dicom-out" in capsys.readouterr().err
    assert main(["predict", str(cases["dx"]), "--dicom-out", str(tmp_path), "--send", "nohost"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    assert main(["predict", str(cases["dx"]), "--model", str(bundle), "--fp32", "--dicom-out", str(tmp_path),
                 "--send", f"127.0.0.1:{dead}", "--aet", "TESTPACS"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not open a DICOM association with TESTPACS@127.0.0.1" in err[0]
    ae = AE(ae_title="SCONLY")  # a node that stores images but not structured reports
    ae.add_supported_context(SecondaryCaptureImageStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        assert main(["predict", str(cases["dx"]), "--model", str(bundle), "--fp32", "--dicom-out",
                     str(tmp_path), "--send", address, "--aet", "SCONLY"]) == 1
    finally:
        server.shutdown()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not accept" in err[0] and ".SR.dcm" in err[0], err


def test_dicom_out_room_imports_no_torch_or_qt() -> None:
    import sys

    code = (
        "import sys, kdviewer.dicom_out, kdviewer.dicom_out.send; "
        "bad = [m for m in ('torch', 'PySide6', 'pytorch_grad_cam') if m in sys.modules]; "
        "sys.exit(f'dicom_out imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
