"""training.report: sections, flags and graceful gaps, from hand-made bundle folders (no training)."""

from __future__ import annotations

import json

import numpy as np

from kdviewer.models.manifest import Manifest, ModelSpec, OodSpec, Preprocessing
from training.calibration import calibrate
from training.metrics import compute_metrics, manifest_metrics
from training.report import find_bundle, write_report


def _bundle(root, task: str = "single-label", demo: bool = False, with_eval: bool = True):
    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    n = 120
    logits = rng.normal(size=(n, 3)) * 3
    if task == "multi-label":
        y = (rng.random((n, 3)) < 1 / (1 + np.exp(-logits / 3))).astype(float)
        probs = 1 / (1 + np.exp(-logits))
    else:
        y = logits.argmax(1)
        y[:20] = rng.integers(0, 3, 20)
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    res = compute_metrics(y, probs, names, task, n_boot=100)
    root.mkdir(parents=True)
    m = Manifest(
        name="handmade",
        task=task,
        class_names=names,
        preprocessing=Preprocessing(input_size=64, resize=64),
        student=ModelSpec(architecture="resnet18", onnx="student.onnx", params=11_000_000, gflops=0.3),
        metrics=manifest_metrics(res),
        metrics_split="val",
        demo=demo,
        ood=OodSpec(threshold=30.0),
    )
    (root / "manifest.json").write_text(m.model_dump_json())
    if with_eval:
        ev = {
            "student": {"val": res},
            "metrics_split": "val",
            "calibration": calibrate(logits, y, task),
            "data": {"train": 500, "val": n, "test": None},
            "ood": {
                "threshold": 30.0,
                "n_train": 500,
                "val_scores": {"p50": 20.0, "flagged_fraction": 0.01},
                "val_scores_sample": rng.normal(20, 4, 100).tolist(),
            },
        }
        (root / "evaluation.json").write_text(json.dumps(ev))
    return root


def test_multilabel_demo_report(tmp_path):
    b = _bundle(tmp_path / "run" / "bundle", "multi-label", demo=True)
    out = write_report(tmp_path / "run")
    assert out == b / "report.html"
    html = out.read_text()
    assert "DEMO MODEL" in html and "SYNTHETIC DATA" not in html
    for heading in (
        "Data",
        "Training curves",
        "Metrics (bootstrap 95% CI)",
        "Confusion matrix",
        "Calibration",
        "Out-of-distribution guard",
        "Complexity",
    ):
        assert f">{heading}<" in html, heading
    assert "No training history" in html
    assert "roc_auc:b" in html and "[" in html  # per-label AUC with its CI
    assert html.count("data:image/png;base64,") >= 3  # confusion, reliability, OOD histogram


def test_report_without_evaluation_falls_back_to_the_manifest(tmp_path):
    b = _bundle(tmp_path / "b", with_eval=False)
    out = write_report(b, tmp_path / "x" / "r.html")
    html = out.read_text()
    assert ">Metrics (bootstrap 95% CI)<" in html and "accuracy" in html
    assert "11.00" in html  # params (M) from the manifest's student spec
    assert find_bundle(b / "manifest.json") == b


def test_find_bundle_errors_clearly(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="no model bundle"):
        find_bundle(tmp_path)


def test_latency_note_says_when_it_was_measured_on_a_busy_machine():
    from training.report import _section_complexity

    def note(settings: dict) -> str:
        student = {"params": 10, "gflops": 0.1, "latency_ms": {"torch_fp32": 2.0}}
        table = {"student": student, "settings": settings}
        return "".join(_section_complexity({"complexity": table}, {}))

    base = {"input_size": 64, "channels": 1, "threads": 2, "runs": 20, "warmup": 2, "latency_budget_s": 1.0}
    assert "at most 1.0 s" in note(base) and "busy machine" not in note(base)
    busy = note({**base, "threads": 1, "warmup": 1, "busy_machine": True, "other_cpu_cores": 1.8})
    assert "Measured on a busy machine</b> (other processes used 1.8 cores)" in busy and "1 threads" in busy
