"""End to end: PNG folders -> tiny student/teacher -> export_bundle -> viewer checks, eval, prune, report."""

from __future__ import annotations

import argparse
import json
import zipfile

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from test_export_tiny import ARCH, SIZE, single_thread, tiny_model, train_briefly  # noqa: F401

from kdviewer.inference.ood import load_ood_stats
from kdviewer.models.bundle import open_bundle, read_manifest
from kdviewer.models.manifest import Manifest, Preprocessing
from training import evaluate, prune, report
from training.evaluate import _array_loader, load_labelled_images
from training.export import export_bundle

CLASSES = ["normal", "pneumonia"]
PRE = Preprocessing(input_size=SIZE, resize=SIZE, channels=1)


def _write_pngs(root, n_per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            img = rng.normal(100, 25, (40, 40))
            img[0:20, 0:20] += 80 if c == 0 else 0
            img[20:40, 20:40] += 80 if c == 1 else 0
            img[0, 0], img[-1, -1] = 0, 255  # fixed range so minmax keeps the contrast
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{name}_{i}.png")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pngs")
    _write_pngs(root / "train", 40, 0)
    _write_pngs(root / "val", 24, 1)
    return root


@pytest.fixture(scope="module")
def bundle(data_dir, tmp_path_factory):
    tr = load_labelled_images(data_dir, PRE, CLASSES, split="train")
    va = load_labelled_images(data_dir, PRE, CLASSES, split="val")
    train = _array_loader(tr.images, tr.targets, 16, shuffle=True)
    val = _array_loader(va.images, va.targets, 16, shuffle=False)
    student = train_briefly(tiny_model(2, 1, dropout=0.2, seed=0), train, steps=15)
    teacher = train_briefly(tiny_model(2, 1, seed=1), train, steps=15)
    history = [
        {"stage": "student", "epoch": e, "train": {"loss": 1.0 / e}, "val": {"accuracy": 0.6 + 0.1 * e}}
        for e in (1, 2, 3)
    ]
    out = tmp_path_factory.mktemp("run") / "bundle"
    path = export_bundle(
        out,
        name="tiny-cxr",
        task="single-label",
        class_names=CLASSES,
        preprocessing=PRE,
        student=student,
        student_arch=ARCH,
        teacher=teacher,
        teacher_arch=ARCH,
        train_loader=train,
        val_loader=val,
        config={"lr": 3e-3, "note": "test", "data": {"root": "/data/hospital/DOE_JANE/cxr"}},
        history=history,
        data_fingerprint="sha256:test",
        synthetic=True,
        n_boot=200,
        latency_runs=3,
        threads=1,
    )
    return path, student


def test_bundle_files_and_manifest(bundle):
    path, student = bundle
    assert not path.with_name(path.name + ".tmp").exists()
    for f in (
        "manifest.json",
        "student.pt",
        "teacher.pt",
        "student.onnx",
        "student.int8.onnx",
        "ood.npz",
        "model_card.md",
        "report.html",
        "evaluation.json",
        "history.json",
    ):
        assert (path / f).is_file(), f
    m = Manifest.model_validate_json((path / "manifest.json").read_text())
    assert m.student.architecture == ARCH and m.student.onnx == "student.onnx"
    assert m.student.onnx_int8 == "student.int8.onnx" and m.student.weights == "student.pt"
    assert m.student.target_layer == "layer2" and m.student.params == sum(
        p.numel() for p in student.parameters()
    )
    assert m.student.gflops > 0 and m.teacher is not None and m.teacher.weights == "teacher.pt"
    assert m.metrics_split == "val" and m.synthetic_data and not m.demo
    assert m.positive_class == "pneumonia"
    for name in ("accuracy", "precision", "recall", "f1", "specificity", "roc_auc"):
        mv = m.metrics[name]
        assert mv.ci_low <= mv.value <= mv.ci_high
    assert m.metrics["accuracy"].value > 0.8
    assert m.calibration.temperature > 0 and m.calibration.ece_before is not None
    assert 0.1 <= m.disagreement_threshold <= 0.5
    assert m.ood is not None and m.ood.threshold > 0
    for key in ("max_abs_diff_prob", "mean_abs_diff_prob", "agreement", "latency_int8_ms", "recommended"):
        assert key in m.int8_parity
    assert m.int8_parity["agreement"] >= 0.9
    assert {"torch", "onnx", "onnxruntime", "kdviewer"} <= set(m.created_with)
    assert m.training["data_fingerprint"] == "sha256:test" and m.training["config"]["lr"] == 3e-3
    # a bundle travels: the training data's absolute path does not travel with it (issue 17 item 13)
    for f in path.iterdir():
        if f.suffix in (".json", ".md", ".html"):
            assert "DOE_JANE" not in f.read_text(encoding="utf-8"), f.name
    assert m.training["config"]["data"]["root"].startswith("cxr (path sha256:")
    assert m.training["student_dropout"] == pytest.approx(0.2)
    card = (path / "model_card.md").read_text()
    assert card.startswith("**SYNTHETIC DATA") and "95% CI" in card and "sha256:test" in card


def test_onnx_and_ood_files_work_for_the_viewer(bundle):
    path, student = bundle
    m = read_manifest(path)
    x = np.random.default_rng(0).normal(size=(3, 1, SIZE, SIZE)).astype(np.float32)
    for name in ("student.onnx", "student.int8.onnx"):
        sess = ort.InferenceSession(str(path / name), providers=["CPUExecutionProvider"])
        logits, feats = sess.run(["logits", "features"], {"input": x})
        assert logits.shape == (3, 2) and feats.shape == (3, 32)
    stats = load_ood_stats(path / "ood.npz")
    assert stats["mean"].shape == (32,) and stats["precision"].shape == (32, 32)
    with open_bundle(path) as b:  # the viewer's reader accepts it and rebuilds both networks
        s = b.build_torch("student")
        t = b.build_torch("teacher")
        with torch.no_grad():
            torch.testing.assert_close(s(torch.from_numpy(x)), student.eval()(torch.from_numpy(x)))
        assert t(torch.from_numpy(x)).shape == (3, 2)
    assert m.name == "tiny-cxr"


def test_evaluation_and_history_feed_the_report(bundle):
    path, _ = bundle
    ev = json.loads((path / "evaluation.json").read_text())
    assert set(ev["student"]) == {"val"} and set(ev["teacher"]) == {"val"}
    assert ev["student"]["val"]["confusion_matrix"] and ev["student"]["val"]["roc_curves"]["pneumonia"]["fpr"]
    assert set(ev["complexity"]["student"]["latency_ms"]) == {"torch_fp32", "ort_fp32", "ort_int8"}
    # the teacher is timed as the viewer runs it (torch); the export no longer converts and quantizes
    # it only for two table cells (issue 12: most of a ResNet-50 -> ResNet-18 export's time)
    assert set(ev["complexity"]["teacher"]["latency_ms"]) == {"torch_fp32"}
    assert ev["complexity"]["ratios"]["deployed_latency_ratio"] > 0
    assert ev["ood"]["val_scores"]["flagged_fraction"] <= 0.05
    assert len(json.loads((path / "history.json").read_text())) == 3


def test_report_has_every_section(bundle):
    path, _ = bundle
    html = (path / "report.html").read_text()
    for heading in (
        "Data",
        "Training curves",
        "Metrics (bootstrap 95% CI)",
        "Confusion matrix",
        "ROC curves",
        "Complexity",
        "INT8 parity (val images)",
        "Calibration",
        "Out-of-distribution guard",
    ):
        assert f">{heading}<" in html, heading
    assert "SYNTHETIC DATA" in html and html.count("data:image/png;base64,") >= 5
    assert 'src="http' not in html  # self-contained


def test_eval_cli_prints_the_metrics_table(bundle, data_dir, capsys):
    path, _ = bundle
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    evaluate.add_cli(sub)
    args = parser.parse_args(["eval", str(path), str(data_dir), "--split", "val", "--n-boot", "100"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "95% CI" in out and "roc_auc" in out and "confusion matrix" in out
    args = parser.parse_args(["eval", str(path), str(data_dir / "val"), "--int8", "--json", "--n-boot", "50"])
    assert args.func(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 48 and res["metrics"]["accuracy"]["value"] > 0.8 and "INT8" in res["model"]
    args = parser.parse_args(["eval", str(path), str(data_dir), "--teacher", "--json", "--n-boot", "0"])
    assert args.func(args) == 0
    assert "teacher" in json.loads(capsys.readouterr().out)["model"]


def test_eval_reads_a_csv_with_unknown_labels(bundle, data_dir, tmp_path):
    path, _ = bundle
    files = sorted(data_dir.glob("val/*/*.png"))
    rows = ["path,label"] + [f"{p.relative_to(data_dir)},{p.parent.name}" for p in files]
    rows.append("val/normal/normal_0.png,unlabeled")
    (data_dir / "labels_test.csv").write_text("\n".join(rows) + "\n")
    res = evaluate.evaluate_bundle(path, data_dir / "labels_test.csv", n_boot=0)
    assert res["n"] == 48 and res["skipped"] == {"unlabeled": 1}


def test_prune_cli_with_and_without_data(bundle, data_dir, tmp_path, capsys):
    path, _ = bundle
    parser = argparse.ArgumentParser()
    prune.add_cli(parser.add_subparsers())
    args = parser.parse_args(["prune", str(path), "--ratio", "0.5", "--out", str(tmp_path / "p0")])
    assert args.func(args) == 0
    m0 = read_manifest(tmp_path / "p0")
    assert m0.student.params < read_manifest(path).student.params
    assert m0.metrics == {} and m0.training["pruned_channels"]["layer1.0.conv1"] == 8
    # A pruned bundle can be pruned again: its student is rebuilt from the recorded channel config.
    prune.prune_bundle(tmp_path / "p0", 0.5, tmp_path / "p00")
    assert read_manifest(tmp_path / "p00").training["pruned_channels"]["layer1.0.conv1"] == 4
    args = parser.parse_args(
        [
            "prune",
            str(path),
            "--ratio",
            "0.3",
            "--out",
            str(tmp_path / "p1"),
            "--data",
            str(data_dir),
            "--finetune-epochs",
            "1",
        ]
    )
    assert args.func.__name__ == "_cli"
    prune.prune_bundle(  # what the CLI runs, minus the slow complexity table and report
        path,
        0.3,
        tmp_path / "p1",
        data=data_dir,
        finetune_epochs=args.finetune_epochs,
        export_options={"complexity": False, "report": False, "n_boot": 50, "threads": 1},
    )
    m1 = read_manifest(tmp_path / "p1")
    assert "accuracy" in m1.metrics and m1.training["pruned_channels"]["layer1.0.conv1"] == 11
    assert "prun" in m1.name
    assert (tmp_path / "p1" / "student.int8.onnx").is_file()
    capsys.readouterr()


def test_report_cli_on_a_run_dir_with_events_and_ablation(bundle, tmp_path):
    path, _ = bundle
    run = path.parent
    (path / "history.json").rename(path / "history.json.bak")
    try:
        events = [
            {
                "event": "epoch_end",
                "schema": "1.0",
                "stage": "teacher",
                "epoch": e,
                "train": {"loss": 2.0 / e},
                "val": {"accuracy": 0.5 + 0.1 * e, "auc": 0.6 + 0.1 * e},
            }
            for e in (1, 2)
        ]
        (run / "events.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\nnot json\n")
        (run / "ablation.json").write_text(
            json.dumps(
                [
                    {
                        "name": "no KD",
                        "metrics": {"accuracy": {"value": 0.8, "ci_low": 0.7, "ci_high": 0.9}},
                        "seed": 0,
                    },
                    {
                        "name": "Hinton KD",
                        "metrics": {"accuracy": {"value": 0.85, "ci_low": 0.75, "ci_high": 0.92}},
                        "seed": 0,
                    },
                ]
            )
        )
        (run / "ood_results.json").write_text(
            json.dumps(
                [
                    {
                        "name": "adult CXR",
                        "n": 3,
                        "scores": [500.0, 600.0, 700.0],
                        "median_score": 600.0,
                        "flagged_fraction": 1.0,
                        "expected": "flagged",
                        "verdict": "as expected",
                    }
                ]
            )
        )
        parser = argparse.ArgumentParser()
        report.add_cli(parser.add_subparsers())
        args = parser.parse_args(["report", str(run), "--out", str(tmp_path / "r.html")])
        assert args.func(args) == 0
        html = (tmp_path / "r.html").read_text()
        assert ">Ablation<" in html and "Hinton KD" in html and "no KD" in html
        assert "teacher: loss" not in html  # plots are images; check the section exists instead
        assert ">Training curves<" in html and "No training history" not in html
        assert "adult CXR" in html and "as expected" in html
    finally:
        (path / "history.json.bak").rename(path / "history.json")


def test_ood_results_on_other_images(bundle, tmp_path):
    path, _ = bundle
    rng = np.random.default_rng(5)
    (tmp_path / "other").mkdir()
    for i in range(6):  # smooth gradients: nothing like the training images
        img = (np.outer(np.linspace(0, 255, 64), np.ones(48)) * rng.uniform(0.2, 1)).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / "other" / f"o{i}.png")
    res = report.ood_results(path, tmp_path / "other", name="gradients")
    assert res["n"] == 6 and len(res["scores"]) == 6 and res["threshold"] > 0
    assert res["verdict"].startswith(("as expected", "partly", "NOT")) and 0 <= res["shift_p_value"] <= 1


def test_a_zipped_bundle_opens(bundle, tmp_path):
    path, _ = bundle
    z = tmp_path / "b.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in path.iterdir():
            zf.write(f, f.name)
    with open_bundle(z) as b:
        assert b.onnx_path(int8=True).is_file()


def test_eval_listing_ignores_annotation_folders(tmp_path):
    """The synthetic datasets keep lesion masks in masks/: that folder is not an unknown class."""
    from PIL import Image

    from training.evaluate import list_labelled_files

    for sub, n in (("normal", 2), ("PNEUMONIA", 3), ("masks", 4), ("lateral", 1)):
        (tmp_path / sub).mkdir()
        for i in range(n):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / sub / f"{i}.png")
    items, skipped = list_labelled_files(tmp_path, ["normal", "pneumonia"])
    assert len(items) == 5 and {c for _p, c in items} == {"normal", "pneumonia"}
    assert skipped == {"lateral": 1}  # a real unknown label is still reported; masks/ is not
