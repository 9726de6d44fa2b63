"""The GPU in the training panel: the Device list names each CUDA GPU (name, memory) or MPS, a GPU is
the default when present, CPU-only machines show the CPU only, and the live view shows GPU memory.

The device enumeration (`device_choices`) takes what the probe found, so the form's rendering of a
machine with GPUs is tested here on a CPU-only machine with a given list; the probe subprocess itself
runs for real in test_panel_training's `test_device_probe_lists_auto_and_cpu`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from kdviewer.events import EventWriter, parse_event

pytestmark = pytest.mark.gui

H200 = {"cuda": [{"index": 0, "name": "NVIDIA H200", "memory_mb": 143771}], "mps": False}
TWO = {
    "cuda": [
        {"index": 0, "name": "NVIDIA A100-SXM4-80GB", "memory_mb": 81920},
        {"index": 1, "name": "NVIDIA A100-SXM4-80GB", "memory_mb": 81920},
    ],
    "mps": False,
}
CPU_ONLY = {"cuda": [], "mps": False}


def _panel(qtbot):
    from kdviewer.gui.training_panel import TrainingPanel

    panel = TrainingPanel(probe_devices=False)
    qtbot.addWidget(panel)
    panel.resize(1500, 950)
    return panel


def _items(combo) -> list[tuple[str, str]]:
    return [(combo.itemText(i), combo.itemData(i)) for i in range(combo.count())]


def test_device_choices_name_each_gpu() -> None:
    from kdviewer.gui.training_process import device_choices

    assert device_choices(H200) == [
        ("Auto (GPU 0: NVIDIA H200)", "auto"),
        ("GPU 0: NVIDIA H200, 140 GB", "cuda:0"),
        ("CPU", "cpu"),
    ]
    assert [v for _l, v in device_choices(TWO)] == ["auto", "cuda:0", "cuda:1", "cpu"]
    assert device_choices({"cuda": [], "mps": True})[:2] == [
        ("Auto (Apple GPU (MPS))", "auto"),
        ("Apple GPU (MPS)", "mps"),
    ]
    assert device_choices(CPU_ONLY) == [("Auto (CPU)", "auto"), ("CPU", "cpu")]
    assert device_choices({"error": "No module named 'torch'"}) == [("Auto (CPU)", "auto"), ("CPU", "cpu")]


def test_form_defaults_to_the_gpu_and_keeps_a_hand_picked_device(qtbot) -> None:
    from kdviewer.gui.training_form import set_combo
    from kdviewer.gui.training_process import device_choices

    panel = _panel(qtbot)
    f = panel.form
    f.set_devices(device_choices(H200))
    assert _items(f.device)[1] == ("GPU 0: NVIDIA H200, 140 GB", "cuda:0")
    assert f.device.currentData() == "cuda:0" and f.device.currentText().startswith("GPU 0: NVIDIA H200")
    assert f.config()["runtime"]["device"] == "cuda:0"
    # a recipe saying "auto" runs on the GPU too; one naming the CPU keeps it
    assert panel.load_preset("002_resnet34_resnet18")
    assert f.config()["runtime"]["device"] == "cuda:0"
    f.load_config({**f.config(), "runtime": {"device": "cpu"}})
    assert f.config()["runtime"]["device"] == "cpu"
    # the user picks Auto by hand: a later device list does not override the choice
    set_combo(f.device, "auto")
    f.device.activated.emit(f.device.currentIndex())
    f.set_devices(device_choices(TWO))
    assert f.device.currentData() == "auto"


def test_cpu_only_machine_shows_the_cpu_only(qtbot) -> None:
    from kdviewer.gui.training_process import device_choices

    panel = _panel(qtbot)
    f = panel.form
    f.set_devices(device_choices(CPU_ONLY))
    assert _items(f.device) == [("Auto (CPU)", "auto"), ("CPU", "cpu")]
    assert f.config()["runtime"]["device"] == "auto" and f.gpu_default() is None


def _events(*records: tuple[str, dict]) -> list[dict]:
    buf = io.StringIO()
    writer = EventWriter("gpu-run", [buf])
    for kind, fields in records:
        writer.emit(kind, **fields)
    return [e for e in map(parse_event, buf.getvalue().splitlines()) if e]


def test_live_view_shows_gpu_memory(qtbot) -> None:
    panel = _panel(qtbot)
    start = {"device": "cuda:0", "gpu": {"name": "NVIDIA H200", "memory_mb": 143771}, "amp": "bfloat16",
             "world_size": 1, "stages": ["student"], "total_steps": 40, "output_dir": "runs/x"}
    step = {"stage": "student", "epoch": 1, "step": 10, "lr": 1e-3, "loss": 0.5, "components": {},
            "images_per_s": 2100.0, "eta_s": 12.0, "gpu_mem_mb": 7168.0}
    for ev in _events(("run_start", start), ("stage_start", {"stage": "student", "epochs": 4,
                                                              "steps_per_epoch": 10}), ("step", step)):
        panel.apply_event(ev, live=True)
    assert panel.device_label.text().startswith("device cuda:0 (NVIDIA H200)")
    assert panel.gpu_label.text() == "GPU memory 7,168 MB peak of 140 GB (5 %)"
    # a CPU run: no GPU line
    panel._reset_live()
    cpu_step = {**step, "gpu_mem_mb": None}
    for ev in _events(("run_start", {**start, "device": "cpu", "gpu": None}), ("step", cpu_step)):
        panel.apply_event(ev, live=True)
    assert panel.gpu_label.text() == "" and panel.device_label.text().startswith("device cpu")


def test_screenshot_of_the_device_list_and_gpu_memory(qtbot, tmp_path: Path) -> None:
    """The panel as it looks with a GPU listed (given list) and a GPU run's memory line, saved for a
    look (KD_SCREENSHOT_DIR, else tmp)."""
    from kdviewer.gui.training_process import device_choices

    panel = _panel(qtbot)
    panel.form.set_devices(device_choices(H200))
    start = {"device": "cuda:0", "gpu": {"name": "NVIDIA H200", "memory_mb": 143771}, "amp": "bfloat16",
             "world_size": 1, "stages": ["student"], "total_steps": 40, "output_dir": str(tmp_path)}
    step = {"stage": "student", "epoch": 2, "step": 15, "lr": 1e-3, "loss": 0.41, "components": {},
            "images_per_s": 2100.0, "eta_s": 12.0, "gpu_mem_mb": 7168.0}
    for ev in _events(("run_start", start), ("stage_start", {"stage": "student", "epochs": 4,
                                                              "steps_per_epoch": 10}), ("step", step)):
        panel.apply_event(ev, live=True)
    panel.show()
    qtbot.waitExposed(panel)
    from PySide6.QtWidgets import QScrollArea

    panel.findChild(QScrollArea).ensureWidgetVisible(panel.form.device)  # the Device row in view
    out = Path(os.environ.get("KD_SCREENSHOT_DIR") or tmp_path) / "training_panel_gpu_device.png"
    assert panel.grab().save(str(out))
    assert out.stat().st_size > 10_000
