"""training.complexity: params, FLOPs (multiply-add = 2), activation memory, latency table."""

from __future__ import annotations

import pytest
import torch
from test_export_tiny import SIZE, single_thread, tiny_model  # noqa: F401
from torch import nn

from kdviewer.models.architectures import ArchSpec
from training.complexity import (
    activation_bytes,
    compare_student_teacher,
    complexity_rows,
    count_flops,
    count_params,
    round_robin_latency,
)


def test_flops_and_params_of_a_single_conv_by_hand():
    conv = nn.Conv2d(2, 4, kernel_size=3, padding=1, bias=False)
    assert count_params(conv) == 4 * 2 * 3 * 3
    # 8x8 output, 4 filters, 2*3*3 MACs each -> 2 FLOPs per MAC.
    assert count_flops(conv, 8, 2) == 2 * (8 * 8) * 4 * (2 * 3 * 3)


def test_activation_bytes_sums_leaf_outputs():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    expected = 4 * (4 * 8 * 8 + 4 * 8 * 8 + 4 * 8 * 8 + 3)  # conv, relu, flatten, linear outputs (fp32)
    assert activation_bytes(net, 8, 1) == expected
    assert net.training  # mode restored


def test_round_robin_latency_returns_medians():
    out = round_robin_latency({"a": lambda: None, "b": lambda: sum(range(1000))}, runs=5, warmup=1)
    assert set(out) == {"a", "b"} and all(v >= 0 for v in out.values())


def test_student_vs_teacher_table(tmp_path):
    student = tiny_model(2, 1)
    teacher = tiny_model(2, 1)
    # A wider teacher: same builder, more channels in the head input is not needed; double the stem.
    teacher.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
    teacher.layer1[0].conv1 = nn.Conv2d(16, 64, 3, padding=1, bias=False)
    teacher.layer1[0].bn1 = nn.BatchNorm2d(64)
    teacher.layer1[0].conv2 = nn.Conv2d(64, 16, 3, padding=1, bias=False)
    teacher.kd_spec = ArchSpec("wide", "layer2", "fc", ("layer1", "layer2"))
    cal = torch.randn(16, 1, SIZE, SIZE).numpy()
    res = compare_student_teacher(
        student, teacher, input_size=SIZE, channels=1, calibration=cal, runs=3, warmup=1, threads=1
    )
    for role in ("student", "teacher"):
        r = res[role]
        assert r["params"] == count_params(student if role == "student" else teacher)
        assert r["gflops"] > 0 and r["activation_mb"] > 0 and r["state_dict_mb"] > 0
        assert set(r["latency_ms"]) == {"torch_fp32", "ort_fp32", "ort_int8"}
    assert res["teacher"]["gflops"] > res["student"]["gflops"]
    assert res["ratios"]["gflops_teacher_over_student"] > 1
    assert "deployed_latency_ratio" in res["ratios"]
    assert res["settings"]["threads"] == 1
    rows = complexity_rows(res)
    assert [r["model"] for r in rows] == ["student", "teacher"]
    assert rows[0]["ort_int8_ms"] is not None


@pytest.mark.parametrize("teacher", [None])
def test_student_only_without_export(teacher):
    res = compare_student_teacher(
        tiny_model(), teacher, input_size=SIZE, channels=1, export_missing=False, runs=2
    )
    assert set(res["student"]["latency_ms"]) == {"torch_fp32"}
    assert "ratios" not in res


def test_flops_and_activations_on_the_meta_device_match_a_real_forward(monkeypatch):
    """Counted on a meta copy (no arithmetic); the same numbers as on the model itself, which is used
    when a layer cannot run on meta, and the model keeps its weights and device."""
    import training.complexity as cx
    from kdviewer.models.architectures import build_model

    model = build_model("resnet18", 2, 1)
    weight = model.conv1.weight.detach().clone()
    on_meta = cx._forward_counts(model, 64, 1)
    assert model.conv1.weight.device.type == "cpu" and torch.equal(model.conv1.weight, weight)

    real_copy = cx.copy.deepcopy

    def no_meta(obj, *a, **k):  # a copy whose .to("meta") fails: the real forward counts
        out = real_copy(obj, *a, **k)
        out.to = lambda *_a, **_k: (_ for _ in ()).throw(NotImplementedError("no meta"))
        return out

    monkeypatch.setattr(cx.copy, "deepcopy", no_meta)
    assert cx._forward_counts(model, 64, 1) == on_meta
    assert on_meta[0] > 0 and on_meta[1] > 0


def test_latency_on_a_busy_machine_takes_one_thread_and_fewer_rounds(monkeypatch):
    import training.complexity as cx

    student = tiny_model(2, 1)
    calls: list[dict] = []
    real = cx.round_robin_latency

    def spy(fns, **kw):
        calls.append(kw)
        return real(fns, **kw)

    monkeypatch.setattr(cx, "round_robin_latency", spy)
    monkeypatch.setattr(cx, "other_cpu_cores", lambda: 1.8)
    res = compare_student_teacher(student, None, input_size=SIZE, channels=1, export_missing=False,
                                  runs=20, warmup=3, threads=2, adapt_to_load=True)
    assert res["settings"]["busy_machine"] is True and res["settings"]["threads"] == 1
    assert calls[-1]["warmup"] == 1 and calls[-1]["min_runs"] == 2
    monkeypatch.setattr(cx, "other_cpu_cores", lambda: 0.1)
    res = compare_student_teacher(student, None, input_size=SIZE, channels=1, export_missing=False,
                                  runs=5, warmup=1, threads=2, adapt_to_load=True)
    assert res["settings"]["busy_machine"] is False and res["settings"]["threads"] == 2


def test_other_cpu_cores_sees_another_busy_process():
    import subprocess
    import sys

    from training.complexity import other_cpu_cores

    if other_cpu_cores() is None:
        pytest.skip("no /proc/stat here")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        assert other_cpu_cores(0.5) >= 0.5
    finally:
        busy.kill()
        busy.wait()
