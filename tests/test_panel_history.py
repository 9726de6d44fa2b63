"""Run history and replay: an event log written with the engine's own EventWriter is reopened by the panel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdviewer.events import EventWriter

pytestmark = pytest.mark.gui


def _write_run(run_dir: Path, *, finish: bool = True, bundle: Path | None = None) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "optim": {"epochs": 2, "lr": 0.001},
                "output": {"dir": str(run_dir.parent), "name": run_dir.name},
            }
        )
    )
    w = EventWriter.open("r1", None, log_file=run_dir / "events.jsonl")
    w.emit(
        "run_start",
        config={},
        device="cpu",
        amp=None,
        world_size=1,
        output_dir=str(run_dir),
        stages=["student"],
        total_steps=8,
        resumed_from=None,
        dataset={"train": 30, "val": 10, "test": 10, "classes": ["normal", "pneumonia"]},
        synthetic=True,
    )
    w.emit("stage_start", stage="student", epochs=2, steps_per_epoch=4)
    for step in range(1, 9):
        w.emit(
            "step",
            stage="student",
            epoch=(step - 1) // 4 + 1,
            step=step,
            lr=1e-3 / step,
            loss=2.0 / step,
            components={"ce": 1.0 / step, "hinton": 1.0 / step},
            images_per_s=50.0,
            eta_s=8 - step,
            gpu_mem_mb=None,
        )
        if step % 4 == 0:
            w.emit(
                "epoch_end",
                stage="student",
                epoch=step // 4,
                train={"loss": 1.0 / step},
                val={"accuracy": 0.5 + step / 40, "auc": 0.6 + step / 40, "loss": 0.7},
                lr=1e-3,
                best=True,
                epoch_time_s=1.0,
            )
            w.emit(
                "checkpoint", stage="student", epoch=step // 4, path=str(run_dir / "last.pt"), reason="epoch"
            )
    if finish:
        w.emit(
            "eval",
            stage="student",
            split="test",
            metrics={
                "accuracy": {"value": 0.8, "ci_low": 0.6, "ci_high": 0.9},
                "auc": {"value": 0.85, "ci_low": 0.7, "ci_high": 0.95},
            },
            confusion_matrix=[[4, 1], [1, 4]],
            class_names=["normal", "pneumonia"],
            roc={"pneumonia": {"fpr": [0, 0.2, 1], "tpr": [0, 0.8, 1], "auc": 0.85}},
        )
        w.emit(
            "run_end",
            bundle=str(bundle) if bundle else None,
            metrics={"accuracy": 0.8},
            elapsed_s=12.0,
            complexity={
                "student": {"params": 11_000_000, "gflops": 0.5, "latency_ms": 3.0},
                "teacher": {"params": 21_000_000, "gflops": 1.2, "latency_ms": 7.0},
            },
        )
    else:
        w.emit("stopped", stage="student", epoch=2, checkpoint=str(run_dir / "last.pt"))
    w.close()
    return run_dir


def test_find_runs_lists_finished_and_stopped(tmp_path: Path) -> None:
    from kdviewer.gui.run_history import find_runs

    _write_run(tmp_path / "a")
    _write_run(tmp_path / "b", finish=False)
    (tmp_path / "not-a-run").mkdir()
    runs = {r.name: r for r in find_runs(tmp_path)}
    assert set(runs) == {"a", "b"}
    assert runs["a"].status == "finished" and "accuracy" in runs["a"].headline
    assert runs["b"].status == "stopped" and runs["b"].resumable
    assert runs["b"].last_checkpoint and runs["b"].last_checkpoint.endswith("last.pt")


def test_history_replay_fills_curves_and_report(qtbot, tmp_path: Path) -> None:
    from kdviewer.gui.training_panel import TrainingPanel

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"class_names": ["normal", "pneumonia"]}))
    _write_run(tmp_path / "runs" / "finished-run", bundle=bundle)
    _write_run(tmp_path / "runs" / "stopped-run", finish=False)
    opened: list[str] = []
    panel = TrainingPanel(open_bundle=opened.append, probe_devices=False)
    qtbot.addWidget(panel)
    panel.form.output_dir.setText(str(tmp_path / "runs"))
    panel.tabs.setCurrentWidget(panel.history)
    assert panel.history.table.rowCount() == 2

    assert panel.history.select_path(tmp_path / "runs" / "finished-run")
    panel.history.open_button.click()
    counts = panel.curves.point_count()
    assert counts["loss"] == 8 * 3 + 2 * 2  # total + 2 components per step; train + val loss per epoch
    assert counts["lr"] == 8
    assert counts["val"] == 2 * 2  # accuracy and AUC per epoch
    assert panel.tabs.currentWidget() is panel.report
    report = panel.report
    metrics = {
        report.metrics_table.item(r, 0).text(): report.metrics_table.item(r, 2).text()
        for r in range(report.metrics_table.rowCount())
    }
    assert metrics["auc"] == "0.70–0.95"
    assert report.confusion_table.rowCount() == 2 and report.confusion_table.item(0, 0).text().startswith("4")
    cx = {
        report.complexity_table.item(r, 0).text(): report.complexity_table.item(r, 3).text()
        for r in range(report.complexity_table.rowCount())
    }
    assert cx["Parameters"].startswith("0.52")
    assert len(report.roc_plot.plotItem.listDataItems()) == 2  # chance line + one ROC curve
    assert report.open_button.isEnabled()
    report.open_button.click()
    assert opened == [str(bundle)]
    assert panel.form.epochs.value() == 2  # the run's config is shown in the form

    panel.history.select_path(tmp_path / "runs" / "stopped-run")
    assert panel.history.resume_button.isEnabled()
    panel.history.open_button.click()
    assert panel.outcome == "stopped" and panel.resume_button.isEnabled()
    assert "did not finish" in panel.report.summary.text()
