"""benchmarks/latency.py on a small bundle: the student as deployed against the teacher in torch and, with
``--teacher-onnx``, in ONNX Runtime fp32 and INT8 — every ratio a number from the same round-robin."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from _bundles import cxr_bundle

ROOT = Path(__file__).resolve().parents[1]


def _latency_module():
    spec = importlib.util.spec_from_file_location("latency_benchmark", ROOT / "benchmarks" / "latency.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latency_benchmark_also_times_the_teacher_in_onnx_runtime(capsys):
    bench = _latency_module()
    args = ["--model", str(cxr_bundle().path), "--runs", "3", "--warmup", "1", "--threads", "1"]
    assert bench.main([*args, "--teacher-onnx"]) == 0
    out = capsys.readouterr().out
    results = dict(re.findall(r"^RESULT (\S+) ([0-9.]+)$", out, re.M))
    ratios = {"latency_ratio", "latency_ratio_vs_teacher_ort_fp32", "latency_ratio_vs_teacher_ort_int8"}
    assert set(results) == ratios, out
    assert all(float(v) > 0 for v in results.values())
    assert re.search(r"^teacher \S+ INT8 \(ORT\): median [0-9.]+ ms", out, re.M), out

    assert bench.main(args) == 0  # without the flag: the viewer's pair only
    assert re.findall(r"^RESULT (\S+)", capsys.readouterr().out, re.M) == ["latency_ratio"]
