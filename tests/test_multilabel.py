"""Multi-label bundles on every surface: per-finding thresholds from the manifest, the findings above them,
saliency of a chosen finding, one CSV column per finding; and the data side of the NIH recipe (dropped
findings, the stratified patient split) and the thresholds chosen on val.

The bundle is the shared tiny trained one (`_bundles.cxr_bundle`) declared multi-label with two findings
and thresholds set from its own probabilities on a case, so that a threshold, not 0.5, decides."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from _bundles import copy_bundle, cxr_bundle, cxr_phantom, write_png

from kdviewer.imaging import load
from kdviewer.inference.predict import NO_FINDING_LABEL, Classifier
from kdviewer.models.manifest import Manifest

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = ["Effusion", "Nodule"]


def _multilabel(dst: Path, thresholds: dict[str, float] | None = None) -> Path:
    return copy_bundle(cxr_bundle().path, dst, task="multi-label", class_names=FINDINGS, positive_class=None,
                       thresholds=thresholds or {}, threshold_rule="test: set by hand")


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ml_cases")
    rng = np.random.default_rng(3)
    for i in range(3):
        write_png(root / "cases" / f"case{i}.png", cxr_phantom(rng, positive=bool(i % 2))[0])
    return root / "cases"


@pytest.fixture(scope="module")
def probs(case: Path, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """The multi-label student's probabilities on case0 (thresholds 0.5)."""
    b = _multilabel(tmp_path_factory.mktemp("ml0") / "b")
    return Classifier(b, use_int8=False).predict(load(case / "case0.png")).probabilities


@pytest.fixture(scope="module")
def bundle(probs: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Thresholds that put case0's first finding just above its threshold and the second just below."""
    t = {FINDINGS[0]: float(probs[0]) - 0.01 if probs[0] > 0.02 else 1e-3,
         FINDINGS[1]: min(float(probs[1]) + 0.01, 0.999)}
    return _multilabel(tmp_path_factory.mktemp("ml") / "b", t)


# ---------------------------------------------------------------------------------------------- manifest


def test_manifest_thresholds_are_checked() -> None:
    base = json.loads((cxr_bundle().path / "manifest.json").read_text())
    base.update(task="multi-label", class_names=FINDINGS, positive_class=None)
    m = Manifest.model_validate({**base, "thresholds": {"Nodule": 0.3}})
    assert m.threshold_of("Nodule") == 0.3 and m.threshold_of("Effusion") == 0.5
    for bad in ({"Mass": 0.3}, {"Nodule": 0.0}, {"Nodule": 1.0}, {"Nodule": float("nan")}):
        with pytest.raises(ValueError):
            Manifest.model_validate({**base, "thresholds": bad})
    single = json.loads((cxr_bundle().path / "manifest.json").read_text())
    with pytest.raises(ValueError, match="multi-label"):
        Manifest.model_validate({**single, "thresholds": {"nodule": 0.3}})


# ------------------------------------------------------------------------------------------- inference


def test_findings_are_decided_by_their_own_thresholds(bundle: Path, case: Path, probs: np.ndarray) -> None:
    clf = Classifier(bundle, use_int8=False)
    pred = clf.predict(load(case / "case0.png"))
    assert np.allclose(pred.probabilities, probs, atol=1e-6)
    t = clf.manifest.thresholds
    assert pred.thresholds == pytest.approx([t[n] for n in FINDINGS])
    assert pred.positives == ["Effusion"]  # above its threshold; Nodule just below its own
    assert pred.label == "Effusion" and pred.label_index == 0
    d = pred.to_dict()
    assert d["thresholds"] == pytest.approx(t) and d["positives"] == ["Effusion"]
    # no threshold reached: the label says so, and label_index is the finding closest to its threshold
    none = _multilabel(bundle.parent / "none", {n: 0.999 for n in FINDINGS})
    p2 = Classifier(none, use_int8=False).predict(load(case / "case0.png"))
    assert p2.positives == [] and p2.label == NO_FINDING_LABEL
    assert p2.label_index == int(np.argmax(p2.probabilities - 0.999))


def test_saliency_explains_the_chosen_finding(bundle: Path, case: Path) -> None:
    from kdviewer.inference.saliency import explain, saliency

    clf = Classifier(bundle, use_int8=False)
    study = load(case / "case0.png")
    pred = clf.predict(study)
    default = saliency(clf, study, "gradcam")
    assert default.target_class == pred.label_index and default.class_name == "Effusion"
    chosen = explain(clf, study, pred, target="Nodule")
    assert chosen.class_name == "Nodule" and chosen.target_class == 1
    assert chosen.score != pytest.approx(default.score)  # a different logit was explained
    with pytest.raises(ValueError, match="unknown class"):
        explain(clf, study, pred, target="Mass")


# -------------------------------------------------------------------------------------------------- CLI


def test_predict_lists_findings_with_thresholds_and_saves_a_finding_heatmap(
    bundle: Path, case: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kdviewer.cli import main

    heat = tmp_path / "nodule.png"
    code = main(["predict", str(case / "case0.png"), "--model", str(bundle), "--fp32", "--heatmap", str(heat),
                 "--finding", "Nodule"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Effusion (1 of 2 findings at or above their thresholds)" in out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ") and ln.split()}
    assert lines["Effusion"].rstrip().endswith("ABOVE") and "ABOVE" not in lines["Nodule"]
    assert "Grad-CAM of Nodule" in out and heat.is_file()
    assert main(["predict", str(case / "case0.png"), "--model", str(bundle), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["positives"] == ["Effusion"] and set(d["thresholds"]) == set(FINDINGS)
    assert main(["predict", str(case / "case0.png"), "--model", str(bundle), "--heatmap", str(heat),
                 "--finding", "Mass"]) != 0
    assert "unknown finding 'Mass'" in capsys.readouterr().err


def test_classify_csv_has_a_column_per_finding_and_heatmaps_of_the_chosen_one(
    bundle: Path, case: Path, tmp_path: Path
) -> None:
    from kdviewer.batch import BatchError, csv_columns, run_batch

    out = tmp_path / "res.csv"
    run_batch(case, bundle, out, workers=0, heatmaps_dir=tmp_path / "heat", heatmap_target="Nodule",
              use_int8=False)
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == csv_columns(FINDINGS, False, multi_label=True)
    t = json.loads((bundle / "manifest.json").read_text())["thresholds"]
    clf = Classifier(bundle, use_int8=False)
    for r in rows:
        pred = clf.predict(load(r["path"]))
        for k, n in enumerate(FINDINGS):
            assert float(r[f"prob_{n}"]) == pytest.approx(float(pred.probabilities[k]), abs=1e-5)
            assert r[f"above_{n}"] == str(int(float(r[f"prob_{n}"]) >= t[n]))
        assert r["label"] == pred.label
        assert Path(r["heatmap"]).is_file()
    with pytest.raises(BatchError, match="unknown finding"):
        run_batch(case, bundle, tmp_path / "x.csv", workers=0, heatmaps_dir=tmp_path / "h2",
                  heatmap_target="Mass")


# -------------------------------------------------------------------------------------------------- GUI


@pytest.mark.gui
def test_viewer_shows_one_bar_per_finding_with_its_threshold(qtbot, settings, bundle, case) -> None:
    from PySide6.QtCore import Qt

    from kdviewer.gui.main_window import MainWindow

    win = MainWindow(settings=settings, extra_tabs=False)
    qtbot.addWidget(win)
    win.resize(1400, 900)
    win.show()
    win.load_bundle(bundle)
    assert win.wait_idle(120) and win.classifier is not None, win.last_error
    assert win.saliency_panel.target_label.text() == "Finding"
    win.open_path(case / "case0.png")
    assert win.wait_idle(120)
    panel = win.predictions
    pred = win.result.prediction
    assert panel.headline.text() == "Student: Effusion"
    assert "1 of 2 findings at or above their own thresholds" in panel.subline.text()
    t = json.loads((bundle / "manifest.json").read_text())["thresholds"]
    for (lab, bar, _tb), name, p in zip(panel.rows, FINDINGS, pred.probabilities, strict=True):
        assert lab.text() == name and bar.threshold == pytest.approx(t[name])
        assert bar.value == pytest.approx(float(p)) and bar.highlight == (name == "Effusion")
    # a click on a finding's name: its saliency map, overlay switched on
    qtbot.mouseClick(panel.rows[1][0], Qt.MouseButton.LeftButton)
    assert win.saliency_panel.is_on() and win.saliency_panel.target_class() == 1
    assert win.wait_idle(120)
    qtbot.waitUntil(lambda: win.saliency_result is not None, timeout=60000)
    assert win.saliency_result.maps["student"].class_name == "Nodule"


@pytest.fixture()
def settings(tmp_path: Path):
    from PySide6.QtCore import QSettings

    return QSettings(str(tmp_path / "kdviewer.ini"), QSettings.Format.IniFormat)


# ------------------------------------------------------------------------------------ data and thresholds


def _labels_csv(root: Path) -> Path:
    """24 patients, 2-4 images each; findings A (common), B (rarer), Rare (one patient)."""
    rng = np.random.default_rng(0)
    rows = ["path,findings,patient_id"]
    k = 0
    for pid in range(24):
        for _ in range(int(rng.integers(2, 5))):
            labs = [n for n, p in (("A", 0.4), ("B", 0.2)) if rng.random() < p]
            if pid == 5:
                labs.append("Rare")
            write_png(root / "images" / f"{k}.png", rng.integers(0, 255, (16, 16), dtype=np.uint8))
            rows.append(f"images/{k}.png,{'|'.join(labs) or 'No Finding'},{pid}")
            k += 1
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def test_dropped_findings_keep_their_images_and_the_split_is_patient_wise_and_stratified(tmp_path) -> None:
    from training.config import DataConfig
    from training.data import discover

    labels = _labels_csv(tmp_path)
    cfg = DataConfig(csv=labels, label_column="findings", split="patient", stratify_patients=True,
                     val_fraction=0.25, classes=["A", "B"], negative_labels=["No Finding"],
                     drop_labels=["Rare"])
    s = discover(cfg, "multi-label", 0)
    n_rows = len(labels.read_text().splitlines()) - 1
    assert len(s.train) + len(s.val) == n_rows  # images with a dropped finding are kept
    assert not {x.patient for x in s.train} & {x.patient for x in s.val}
    for k in range(2):
        total = sum(k in x.target for x in s.train + s.val)
        in_val = sum(k in x.target for x in s.val)
        assert abs(in_val - 0.25 * total) <= 4, (k, in_val, total)  # whole patients: a few images off
    # without drop_labels, an image with a finding outside `classes` is left out (and said so)
    plain = discover(DataConfig(csv=labels, label_column="findings", split="patient", val_fraction=0.25,
                                classes=["A", "B"], negative_labels=["No Finding"]), "multi-label", 0)
    assert len(plain.train) + len(plain.val) < n_rows and plain.skipped


def _script():
    spec = importlib.util.spec_from_file_location("make_nih_bundle", ROOT / "scripts" / "make_nih_bundle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_f1_threshold_on_val() -> None:
    f1_threshold = _script().f1_threshold
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.35])
    y = np.array([0, 0, 0, 1, 1, 1])
    t = f1_threshold(p, y)
    assert 0.3 < t <= 0.35  # every positive called, no negative: F1 = 1
    # one positive far below the negatives: calling it costs three false alarms, so it is given up
    p2 = np.array([0.05, 0.2, 0.3, 0.4, 0.8, 0.9])
    y2 = np.array([1, 0, 0, 0, 1, 1])
    assert 0.4 < f1_threshold(p2, y2) <= 0.8
    with pytest.raises(ValueError):
        f1_threshold(p, np.zeros(6))
