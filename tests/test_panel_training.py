"""The training panel driving the real engine (``python -m training``) on tiny synthetic phantoms.

No mocks: the panel writes a real YAML config, the engine really trains (32 px, ~40 images, tiny
architectures, 1-3 epochs on the CPU) and the assertions read what the panel shows.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMessageBox

pytestmark = pytest.mark.gui

RUN_TIMEOUT_MS = 240_000


def _engine_available() -> bool:
    r = subprocess.run([sys.executable, "-m", "training", "--help"], capture_output=True, text=True)
    return r.returncode == 0 and "run" in r.stdout


@pytest.fixture(scope="module")
def engine() -> None:
    if not _engine_available():
        pytest.fail("the training engine (`python -m training`) is not available")


def _local_phantoms(out: Path, n: int = 40, size: int = 48) -> None:
    """Two-class chest-like phantoms (class folders): "pneumonia" images carry a bright opacity."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        label = ("normal", "pneumonia")[i % 2]
        img = 0.25 + 0.5 * np.exp(-(((xx - 0.3) / 0.18) ** 2 + ((yy - 0.5) / 0.35) ** 2))
        img += 0.5 * np.exp(-(((xx - 0.7) / 0.18) ** 2 + ((yy - 0.5) / 0.35) ** 2))
        if label == "pneumonia":
            cx, cy = rng.uniform(0.25, 0.75, 2)
            img += 0.6 * np.exp(-(((xx - cx) / 0.1) ** 2 + ((yy - cy) / 0.1) ** 2))
        img += rng.normal(0, 0.04, img.shape)
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"{label}_{i:03d}.png")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory, engine: None) -> Path:
    """40 small phantoms from the project's generator (``training synth``), or the test's own when the
    generator is not installed (the panel and engine are exercised the same way)."""
    out = tmp_path_factory.mktemp("phantoms") / "cxr"
    args = ["--kind", "cxr", "--n", "40", "--size", "48", "--out", str(out)]
    r = subprocess.run(
        [sys.executable, "-m", "training", "synth", *args], capture_output=True, text=True, timeout=180
    )
    if r.returncode != 0:
        print(f"`training synth` unavailable ({r.stderr.strip().splitlines()[-1:]}); using local phantoms")
        _local_phantoms(out)
    return out


def _panel(qtbot, **kw):
    from kdviewer.gui.training_panel import TrainingPanel

    panel = TrainingPanel(probe_devices=False, **kw)
    qtbot.addWidget(panel)
    panel.resize(1500, 950)
    return panel


def _fill_tiny(
    panel,
    data: Path,
    out: Path,
    *,
    epochs: int = 1,
    teacher_epochs: int = 1,
    name: str = "tiny",
    export: bool = True,
) -> None:
    from kdviewer.gui.training_form import set_combo

    f = panel.form
    # Start from the defaults, not from a paper's recipe; settings the form does not show (fewer
    # bootstrap resamples and latency runs, or no export at all) pass through to the engine untouched.
    f.load_config({"version": 1, "output": {"bootstrap": 50, "latency_runs": 2, "export": export}})
    f.data_path.setText(str(data))
    set_combo(f.split, "random")
    f.val_frac.setValue(0.25)
    f.test_frac.setValue(0.25)
    f.input_size.setValue(32)
    set_combo(f.teacher_source, "arch")
    set_combo(f.teacher_arch, "cxrnet_s")
    f.teacher_epochs.setValue(teacher_epochs)
    set_combo(f.student_arch, "cxrnet_s")
    for key, check in f.kd_checks.items():
        check.setChecked(key in ("hinton", "at"))
    f.temperature.setValue(4.0)
    f.epochs.setValue(epochs)
    f.batch_size.setValue(8)
    set_combo(f.optimizer, "adam")
    f.lr.setText("1e-3")
    set_combo(f.device, "cpu")
    set_combo(f.amp, "off")
    f.output_dir.setText(str(out))
    f.run_name.setText(name)


def _wait_end(qtbot, panel) -> tuple[str, object]:
    with qtbot.waitSignal(panel.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        pass
    return blocker.args[0], blocker.args[1]


def test_invalid_form_shows_messages_next_to_fields_and_does_not_start(
    qtbot, tmp_path: Path, engine: None
) -> None:
    panel = _panel(qtbot)
    panel.form.load_config({"version": 1})
    panel.form.data_path.setText("")
    panel.form.output_dir.setText("")
    qtbot.mouseClick(panel.start_button, Qt.MouseButton.LeftButton)
    errors = panel.form.visible_errors()
    assert "data" in errors and "output_dir" in errors
    assert panel.state == "idle" and not panel.is_running()

    # Now errors only the engine can find: a missing folder and a negative learning rate.
    panel.form.data_path.setText(str(tmp_path / "no-such-folder"))
    panel.form.output_dir.setText(str(tmp_path / "runs"))
    panel.form.lr.setText("-0.5")
    with qtbot.waitSignal(panel.checker.checked, timeout=120_000) as blocker:
        qtbot.mouseClick(panel.start_button, Qt.MouseButton.LeftButton)
    ok, reported = blocker.args
    assert not ok and reported
    errors = panel.form.visible_errors()
    assert "lr" in errors, errors
    assert "greater than 0" in errors["lr"]
    assert panel.form.fields["lr"].error.isVisible() or not panel.isVisible()
    assert panel.state == "idle" and not panel.is_running()
    assert not panel.events  # nothing was started
    assert "problem" in panel.form_status.text()

    # Fixing the lr removes its message on the next check; the folder message remains.
    panel.form.lr.setText("1e-3")
    with qtbot.waitSignal(panel.checker.checked, timeout=120_000):
        panel.check()
    errors = panel.form.visible_errors()
    assert "lr" not in errors
    assert "data" in errors and "does not exist" in errors["data"], errors


def test_tiny_distillation_run_draws_curves_and_ends_with_a_bundle(
    qtbot, tmp_path: Path, phantoms: Path
) -> None:
    opened: list[str] = []
    panel = _panel(qtbot, open_bundle=opened.append)
    _fill_tiny(panel, phantoms, tmp_path / "runs", epochs=2, teacher_epochs=1)
    panel.show()
    with qtbot.waitSignal(panel.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        qtbot.mouseClick(panel.start_button, Qt.MouseButton.LeftButton)
    outcome, bundle = blocker.args
    log = panel.log_view.toPlainText()
    assert outcome == "finished", log[-3000:]
    counts = panel.curves.point_count()
    assert counts["loss"] > 0 and counts["lr"] > 0 and counts["val"] > 0, counts
    assert {"total"} <= set(panel.curves.loss) and len(panel.curves.loss) >= 2  # total + components
    assert panel.progress.value() == panel.progress.maximum()
    kinds = {e["event"] for e in panel.events}
    assert {"run_start", "stage_start", "step", "epoch_end", "run_end", "progress", "stage_end"} <= kinds
    assert "stage export done in" in log  # the export is a stage the panel shows
    _check_plots_readable(qtbot, panel)

    assert bundle and Path(bundle).exists()
    assert panel.tabs.currentWidget() is panel.report
    assert panel.report.metrics_table.rowCount() > 0
    assert panel.report.complexity_table.rowCount() > 0
    _check_report_readable(qtbot, panel.report, bundle)
    qtbot.mouseClick(panel.report.open_button, Qt.MouseButton.LeftButton)
    assert opened == [bundle]
    from kdviewer.models.bundle import open_bundle

    with open_bundle(bundle) as b:
        assert b.manifest.class_names

    # The finished run is in the history and replays into the same curves.
    panel.tabs.setCurrentWidget(panel.history)
    assert panel.history.table.rowCount() == 1
    live_counts = counts
    panel.history.table.selectRow(0)
    panel.history.open_button.click()
    assert panel.curves.point_count() == live_counts
    assert panel.report.bundle_path == bundle


def test_export_stage_shows_each_substage(qtbot, tmp_path: Path) -> None:
    """The export's events (stage_start with substages, progress, stage_end) drive the bar and label;
    the curves get no stage marker for it."""
    panel = _panel(qtbot)
    panel.show()
    subs = ["predictions", "calibration", "bootstrap", "onnx", "int8", "parity", "ood", "latency", "report"]
    evs = [
        {"event": "run_start", "output_dir": str(tmp_path), "total_steps": 4, "device": "cpu"},
        {"event": "stage_start", "stage": "student", "epochs": 2, "steps_per_epoch": 2},
        {"event": "step", "stage": "student", "epoch": 2, "step": 4, "loss": 0.5, "lr": 0.01},
        {"event": "stage_end", "stage": "student", "elapsed_s": 3.0},
        {"event": "stage_start", "stage": "export", "epochs": 0, "steps_per_epoch": 0, "substages": subs},
    ]
    for ev in evs:
        panel.apply_event(ev, live=True)
    assert panel.progress.maximum() == len(subs) and panel.progress.value() == 0
    marks = panel.curves.point_count()
    for i, name in enumerate(subs[:3], 1):
        panel.apply_event(
            {"event": "progress", "stage": "export", "substage": name, "index": i, "total": 9, "elapsed_s": i}
        )
    assert panel.stage_label.text().startswith("export · bootstrap (3/9)")
    assert panel.progress.value() == 2 and panel.progress.text() == "export: 2/9 done"
    assert panel.curves.point_count() == marks
    qtbot.wait(50)
    panel.grab().save(str(tmp_path / "export_stage.png"))
    timings = {name: 0.5 for name in subs}
    panel.apply_event({"event": "stage_end", "stage": "export", "elapsed_s": 4.5, "timings": timings})
    assert panel.progress.value() == panel.progress.maximum()
    assert "stage export done in 4.5 s (predictions 0.5 s" in panel.log_view.toPlainText()
    panel.apply_event({"event": "stopped", "stage": "export", "epoch": 2, "checkpoint": "last.pt"})
    assert "stopped during the export" in panel.log_view.toPlainText()


def _check_plots_readable(qtbot, panel) -> None:
    """Legends beside (not over) the curves; the learning rate on a log axis; epochs numbered per stage
    (1 teacher epoch, then the student's epochs read 1, 2 — not 2, 3)."""
    c = panel.curves
    shown = panel.tabs.currentIndex()
    panel.tabs.setCurrentIndex(0)
    qtbot.wait(50)
    for plot in (c.loss_plot, c.val_plot, c.lr_plot):
        legend = c.legends[id(plot)]
        assert legend.items, "every curve is named in the legend"
        assert not legend.sceneBoundingRect().intersects(plot.vb.sceneBoundingRect())
    assert c.lr_plot.getAxis("left").logMode
    assert c.lr and all(y > 0 for s in c.lr.values() for y in s.y if y == y)
    assert c.epoch_axis.offsets == [0.0, 1.0]
    student_x = [x for name, s in c.val.items() if not name.startswith("teacher") for x in s.x]
    assert [c.epoch_axis.epoch_label(x) for x in sorted(set(student_x))] == ["1", "2"]
    assert c.epoch_axis.epoch_label(1.0) == "1"  # the teacher's epoch
    panel.tabs.setCurrentIndex(shown)


def _check_report_readable(qtbot, report, bundle: str) -> None:
    """Every metrics row fits without scrolling; the bundle path has its own (elided) line and never
    overlaps the SYNTHETIC note."""
    qtbot.wait(50)
    t = report.metrics_table
    needed = sum(t.rowHeight(r) for r in range(t.rowCount()))
    assert t.viewport().height() >= needed, (t.viewport().height(), needed)
    assert report.bundle_label.toolTip() == f"Bundle: {bundle}"
    import json

    synthetic = json.loads((Path(bundle) / "manifest.json").read_text())["synthetic_data"]
    assert report.synthetic_note.isHidden() != bool(synthetic)
    report.synthetic_note.show()  # the layout keeps the two on separate lines either way
    qtbot.wait(50)
    assert not report.bundle_label.geometry().intersects(report.synthetic_note.geometry())
    report.synthetic_note.setVisible(bool(synthetic))
    assert report.bundle_label.width() <= report.width()


def test_stop_then_resume_finishes_from_the_checkpoint(qtbot, tmp_path: Path, phantoms: Path) -> None:
    panel = _panel(qtbot)
    _fill_tiny(panel, phantoms, tmp_path / "runs", epochs=3, teacher_epochs=0, name="stoppable", export=False)
    steps: list[dict] = []

    def on_event(ev: dict) -> None:
        if ev.get("event") == "step":
            steps.append(ev)
            if len(steps) == 1:
                panel.stop()

    panel.engine.event.connect(on_event)
    with qtbot.waitSignal(panel.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        panel.start()
    outcome, bundle = blocker.args
    assert outcome == "stopped", panel.log_view.toPlainText()[-3000:]
    assert bundle is None
    assert any(e["event"] == "stopped" for e in panel.events)
    assert panel.last_checkpoint and Path(panel.last_checkpoint).exists()
    assert not (panel.run_dir / "STOP").exists()
    assert panel.resume_button.isEnabled()
    stopped_at = len(steps)
    panel.engine.event.disconnect(on_event)

    with qtbot.waitSignal(panel.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        qtbot.mouseClick(panel.resume_button, Qt.MouseButton.LeftButton)
    outcome, bundle = blocker.args
    assert outcome == "finished", panel.log_view.toPlainText()[-3000:]
    assert bundle is None  # export is off in this test: the run ends after the last epoch
    assert panel.report.metrics_table.rowCount() > 0  # the engine's own evaluation of the student
    start_events = [e for e in panel.events if e["event"] == "run_start"]
    assert len(start_events) == 2 and start_events[1].get("resumed_from")
    assert stopped_at >= 1
    assert not panel.resume_button.isEnabled()


def test_closing_while_running_asks_first(qtbot, tmp_path: Path, phantoms: Path, monkeypatch) -> None:
    panel = _panel(qtbot)
    _fill_tiny(panel, phantoms, tmp_path / "runs", epochs=3, teacher_epochs=0, name="closing", export=False)
    assert panel.confirm_close()  # nothing running: no question
    with qtbot.waitSignal(
        panel.engine.event, timeout=RUN_TIMEOUT_MS, check_params_cb=lambda ev: ev["event"] == "step"
    ):
        panel.start()
    asked: list[str] = []

    def answer(result):
        def ask(*args, **kwargs):
            asked.append(args[1])
            return result

        return ask

    monkeypatch.setattr(QMessageBox, "question", answer(QMessageBox.StandardButton.Cancel))
    assert panel.confirm_close() is False
    assert panel.is_running()
    monkeypatch.setattr(QMessageBox, "question", answer(QMessageBox.StandardButton.Yes))
    assert panel.confirm_close() is True
    assert not panel.is_running()
    assert len(asked) == 2
    assert panel.outcome == "stopped"
    assert any(e["event"] == "stopped" for e in panel.events)


def test_device_probe_lists_auto_and_cpu(qtbot) -> None:
    from kdviewer.gui.training_process import DeviceProbe

    probe = DeviceProbe()
    with qtbot.waitSignal(probe.found, timeout=120_000) as blocker:
        probe.start()
    devices = blocker.args[0]
    values = [v for _label, v in devices]
    assert values[0] == "auto" and values[-1] == "cpu"


def test_check_finds_images_and_classes_like_start_and_the_output_follows_the_recipe(
    qtbot, tmp_path: Path, phantoms: Path
) -> None:
    """The pneumoniamnist recipe names classes NORMAL, PNEUMONIA; the phantom folders are lower case.
    Check runs the engine's own data discovery: it finds the images (case does not matter), lists the
    labels found so the user can tick the classes, and a choice that cannot train is caught by Check,
    not after Start. Switching recipes moves the output folder with the recipe unless the user chose
    one."""
    from kdviewer.gui.training_form import set_combo

    panel = _panel(qtbot)
    assert panel.load_preset("pneumoniamnist")
    f = panel.form
    assert f.output_dir.text() == "runs/pneumoniamnist" and f.run_name.text() == "main"
    assert f.chosen_classes() == ["NORMAL", "PNEUMONIA"]
    assert panel.load_preset("002_resnet34_resnet18")
    assert f.output_dir.text() == "runs" and f.run_name.text() == "002-resnet34-resnet18"

    assert panel.load_preset("pneumoniamnist")
    f.data_path.setText(str(phantoms))
    set_combo(f.split, "random")
    f.output_dir.setText(str(tmp_path / "runs"))
    with qtbot.waitSignal(panel.checker.checked, timeout=120_000) as blocker:
        panel.check()
    ok, errors = blocker.args
    assert ok, errors
    found = panel.checker.summary["labels_found"]
    assert {k.lower() for k in found} == {"normal", "pneumonia"}
    assert panel.checker.summary["classes"] == ["NORMAL", "PNEUMONIA"]
    assert sum(panel.checker.summary["counts"][s] for s in ("train", "val", "test")) == sum(found.values())
    assert "Settings are valid. Data: NORMAL, PNEUMONIA" in panel.form_status.text()
    assert not f.found_list.isHidden() and f.found_list.count() == 2

    # untick one label: a single class cannot train, and Check (not Start) says so
    f.found_list.item(0).setCheckState(Qt.CheckState.Unchecked)
    assert f.chosen_classes() == [f.found_list.item(1).data(Qt.ItemDataRole.UserRole)]
    with qtbot.waitSignal(panel.checker.checked, timeout=120_000) as blocker:
        panel.check()
    assert not blocker.args[0]
    assert "two classes" in " ".join(f.visible_errors().values()), f.visible_errors()
    assert not panel.events  # nothing was started

    # classes that match nothing: the message names the labels that are there
    f.classes.setText("cat, dog")
    with qtbot.waitSignal(panel.checker.checked, timeout=120_000) as blocker:
        panel.check()
    assert not blocker.args[0]
    msg = " ".join(f.visible_errors().values())
    assert "match none of the labels found" in msg and "normal" in msg.lower(), msg

    # a folder the user chose stays when the recipe changes
    assert panel.load_preset("002_resnet34_resnet18")
    assert f.output_dir.text() == str(tmp_path / "runs") and f.data_path.text() == str(phantoms)
