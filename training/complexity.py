"""Model complexity: parameters, GFLOPs, activation memory, file sizes and latency (torch / ORT / INT8).

Definitions (so numbers from different runs compare):

* ``params``: number of parameter elements (buffers such as BatchNorm running stats excluded).
* ``gflops``: FLOPs of ONE forward pass at batch 1 and the manifest input size, counted by
  ``torch.utils.flop_counter.FlopCounterMode``, divided by 1e9. The counter counts a
  multiply-add as 2 FLOPs (ResNet-18 at 3x224x224 = 3.63 GFLOPs = 2 x 1.82 GMACs) and counts only
  matmul/convolution-type ops (BatchNorm, ReLU, pooling are not counted).
* ``activation_mb``: sum of the output tensor sizes of every leaf module in one batch-1 fp32
  forward pass (forward hooks), in MiB: an upper-bound style estimate of activation memory for
  inference without buffer reuse (training keeps roughly this much per image for backward).
* ``state_dict_mb`` / ``onnx_mb`` / ``int8_mb``: bytes on disk of the weights / ONNX files.
* latency: median wall time in milliseconds of ``runs`` batch-1 forward passes after ``warmup``
  passes, with ``threads`` intra-op threads for both torch (``torch.set_num_threads``) and ONNX
  Runtime. All runtimes (and student and teacher) are timed round-robin — one pass of each in turn
  — so background load on a shared machine hits them equally; ratios are more trustworthy than
  absolute times.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

MIB = 1024.0 * 1024.0


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _example(model: nn.Module, channels: int, input_size: int) -> torch.Tensor:
    """A batch-1 input where ``model`` is (`training.placement`)."""
    from training.placement import Placement

    return Placement.of(model).inputs(torch.randn(1, channels, input_size, input_size))


def count_flops(model: nn.Module, input_size: int, channels: int) -> int:
    """FLOPs (multiply-add = 2) of one batch-1 forward pass in eval mode."""
    return _forward_counts(model, input_size, channels, activations=False)[0]


def activation_bytes(model: nn.Module, input_size: int, channels: int) -> int:
    """Sum of output tensor bytes of all leaf modules in one batch-1 forward pass (eval mode)."""
    return _forward_counts(model, input_size, channels, flops=False)[1]


def _forward_counts(
    model: nn.Module, input_size: int, channels: int, *, flops: bool = True, activations: bool = True
) -> tuple[int, int]:
    """(FLOPs, activation bytes) of one batch-1 forward pass in eval mode: both from the same pass.

    Shapes are all they depend on: a copy on the meta device computes nothing (a ResNet-50 forward took
    over a second on a busy machine); the model itself only when a layer cannot run on meta."""
    try:
        meta = copy.deepcopy(model).to("meta")
        example = torch.empty(1, channels, input_size, input_size, device="meta")
        return _count_pass(meta, example, flops, activations)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        log.debug("counting on the meta device failed (%s); counting on the model itself", exc)
    return _count_pass(model, _example(model, channels, input_size), flops, activations)


def _count_pass(net: nn.Module, example: torch.Tensor, flops: bool, activations: bool) -> tuple[int, int]:
    from torch.utils.flop_counter import FlopCounterMode

    total = 0

    def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
        nonlocal total
        outs = out if isinstance(out, (tuple, list)) else [out]
        for t in outs:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    leaves = [m for m in net.modules() if not list(m.children())] if activations else []
    handles = [m.register_forward_hook(hook) for m in leaves]
    counter = FlopCounterMode(display=False) if flops else contextlib.nullcontext()
    was_training = net.training
    net.eval()
    try:
        with counter, torch.no_grad():
            net(example)
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    return (int(counter.get_total_flops()) if flops else 0), int(total)  # type: ignore[union-attr]


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the weights and buffers (what ``torch.save`` of the state dict writes, less its few
    kilobytes of pickle framing), counted without serialising them."""
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values()
                   if isinstance(t, torch.Tensor)))


def other_cpu_cores(window_s: float = 0.15) -> float | None:
    """How many cores other processes kept busy over the next ``window_s`` seconds (Linux: /proc/stat
    minus this process's own CPU time); None where that cannot be read. A training run of this same
    process does not count, unlike in the load average."""
    def sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat", encoding="ascii") as fh:
                fields = [float(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        if len(fields) < 5:
            return None
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait, in clock ticks
        own = os.times()
        return busy, own.user + own.system, time.perf_counter()

    first = sample()
    if first is None:
        return None
    time.sleep(window_s)
    second = sample()
    if second is None:
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    wall = second[2] - first[2]
    others = (second[0] - first[0]) / ticks - (second[1] - first[1])
    return max(0.0, others / wall) if wall > 0 else None


#: Other processes keeping at least this many cores busy make the latency runs a busy-machine measurement.
BUSY_CORES = 0.5


def round_robin_latency(
    fns: dict[str, Callable[[], Any]],
    runs: int = 30,
    warmup: int = 5,
    budget_s: float | None = None,
    min_runs: int = 5,
) -> dict[str, float]:
    """Median milliseconds per call of each function, timed one call of each in turn.

    ``budget_s`` bounds the timed rounds: once that much wall time has gone into them, the rounds stop
    (after at least ``min_runs``), so a slow model or a busy machine costs seconds, not minutes.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for i in range(max(1, runs)):
        if budget_s is not None and i >= min_runs and time.perf_counter() - start > budget_s:
            break
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v) * 1000.0) for k, v in times.items()}


def _torch_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    model = copy.deepcopy(model).to("cpu").float().eval()
    x = x.to("cpu")

    def run() -> Any:
        with torch.inference_mode():
            return model(x)

    return run


def _ort_runner(path: str | Path, x: np.ndarray, threads: int) -> Callable[[], Any]:
    from kdviewer.models.onnx_export import ort_session

    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    feed = {name: x}
    return lambda: sess.run(None, feed)


def static_complexity(model: nn.Module, input_size: int, channels: int) -> dict[str, float]:
    """Params, GFLOPs, activation memory and weight size (no timing)."""
    flops, act = _forward_counts(model, input_size, channels)
    return {
        "params": count_params(model),
        "gflops": flops / 1e9,
        "activation_mb": act / MIB,
        "state_dict_mb": state_dict_bytes(model) / MIB,
    }


def measure_complexity(
    models: dict[str, nn.Module],
    *,
    input_size: int,
    channels: int,
    onnx: dict[str, str | Path] | None = None,
    onnx_int8: dict[str, str | Path] | None = None,
    threads: int = 2,
    runs: int = 30,
    warmup: int = 5,
    static: dict[str, dict[str, float]] | None = None,
    budget_s: float | None = None,
    min_runs: int = 5,
) -> dict[str, dict[str, Any]]:
    """Complexity of each named model (e.g. {"student": s, "teacher": t}), latencies timed together.

    ``onnx`` / ``onnx_int8`` map the same names to exported files; runtimes without a file are
    skipped; ``static`` holds `static_complexity` results already computed (not computed again);
    ``budget_s`` bounds the timed runs (`round_robin_latency`). Returns {name: {params, gflops,
    activation_mb, state_dict_mb, onnx_mb?, int8_mb?, latency_ms: {"torch_fp32", "ort_fp32"?, "ort_int8"?}}}.
    """
    onnx, onnx_int8 = dict(onnx or {}), dict(onnx_int8 or {})
    x = torch.randn(1, channels, input_size, input_size)
    x_np = x.numpy()
    out: dict[str, dict[str, Any]] = {}
    fns: dict[str, Callable[[], Any]] = {}
    for name, model in models.items():
        known = (static or {}).get(name)
        out[name] = dict(known) if known else static_complexity(model, input_size, channels)
        fns[f"{name}/torch_fp32"] = _torch_runner(model, x)
        if onnx.get(name):
            out[name]["onnx_mb"] = Path(onnx[name]).stat().st_size / MIB
            fns[f"{name}/ort_fp32"] = _ort_runner(onnx[name], x_np, threads)
        if onnx_int8.get(name):
            out[name]["int8_mb"] = Path(onnx_int8[name]).stat().st_size / MIB
            fns[f"{name}/ort_int8"] = _ort_runner(onnx_int8[name], x_np, threads)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        lat = round_robin_latency(fns, runs=runs, warmup=warmup, budget_s=budget_s, min_runs=min_runs)
    finally:
        torch.set_num_threads(old_threads)
    for key, ms in lat.items():
        name, runtime = key.split("/", 1)
        out[name].setdefault("latency_ms", {})[runtime] = ms
    return out


def compare_student_teacher(
    student: nn.Module,
    teacher: nn.Module | None,
    *,
    input_size: int,
    channels: int,
    student_onnx: str | Path | None = None,
    student_int8: str | Path | None = None,
    teacher_onnx: str | Path | None = None,
    teacher_int8: str | Path | None = None,
    calibration: np.ndarray | None = None,
    export_missing: bool = True,
    threads: int = 2,
    runs: int = 30,
    warmup: int = 5,
    static: dict[str, dict[str, float]] | None = None,
    budget_s: float | None = None,
    adapt_to_load: bool = False,
) -> dict[str, Any]:
    """The complexity table of a run: student vs teacher, torch eager vs ORT fp32 vs ORT INT8.

    ``adapt_to_load``: when other processes keep >= `BUSY_CORES` cores busy (`other_cpu_cores`), the
    latencies are a busy-machine measurement whatever is done; they are then taken with 1 thread (several
    threads of two processes on the same cores wait on each other at every layer: a ResNet-50 batch-1
    forward took ~1 s instead of ~60 ms), 1 warm-up and at least 2 rounds, and ``settings`` says so
    (``busy_machine``, ``other_cpu_cores``), so the export stays seconds long on a shared machine.

    With ``export_missing`` the student/teacher ONNX files that were not given are exported into a
    temporary folder (and INT8-quantized when ``calibration`` training images are given), so that
    every cell of the table is measured. Returns {"student": {...}, "teacher": {...}?,
    "ratios": {...}, "settings": {...}} where ratios are teacher/student (GFLOPs, params, each
    latency) and ``deployed_latency_ratio`` = student deployed (ORT, INT8 if faster) / teacher
    (fastest runtime), the number the "student <= 1/4 of the teacher" goal refers to.
    """
    from kdviewer.models.onnx_export import export_onnx

    models = {"student": student} if teacher is None else {"student": student, "teacher": teacher}
    onnx = {"student": student_onnx, "teacher": teacher_onnx}
    int8 = {"student": student_int8, "teacher": teacher_int8}
    with tempfile.TemporaryDirectory(prefix="kd-complexity-") as tmp:
        if export_missing:
            for name, model in models.items():
                if not onnx.get(name):
                    # only timed, never shipped: no torch-vs-ORT verification pass
                    path = Path(tmp) / f"{name}.onnx"
                    onnx[name] = export_onnx(model, path, channels, input_size, check=False)
                if not int8.get(name) and calibration is not None:
                    from training.quantize import quantize_onnx

                    try:
                        int8[name] = quantize_onnx(onnx[name], Path(tmp) / f"{name}.int8.onnx", calibration)
                    except Exception as exc:  # a missing INT8 cell is reported, not fatal
                        log.warning("could not quantize %s for timing: %s", name, exc)
        others = other_cpu_cores() if adapt_to_load else None
        busy = others is not None and others >= BUSY_CORES
        if busy:
            log.info("latency on a busy machine (others use %.1f cores): 1 thread, fewer rounds", others)
            threads, warmup = 1, min(warmup, 1)
        table = measure_complexity(
            models,
            input_size=input_size,
            channels=channels,
            onnx={k: v for k, v in onnx.items() if v and k in models},
            onnx_int8={k: v for k, v in int8.items() if v and k in models},
            threads=threads,
            runs=runs,
            warmup=warmup,
            static=static,
            budget_s=budget_s,
            min_runs=2 if busy else 5,
        )
    result: dict[str, Any] = dict(table)
    result["settings"] = {
        "input_size": input_size,
        "channels": channels,
        "threads": threads,
        "runs": runs,
        "latency_budget_s": budget_s,
        "warmup": warmup,
        "batch": 1,
        "flops_note": "GFLOPs of one batch-1 forward; a multiply-add counts as 2 FLOPs",
    }
    if others is not None:
        result["settings"]["other_cpu_cores"] = round(others, 2)
        result["settings"]["busy_machine"] = busy
    if "teacher" in table:
        s, t = table["student"], table["teacher"]
        ratios: dict[str, float] = {
            "params_teacher_over_student": t["params"] / max(1, s["params"]),
            "gflops_teacher_over_student": t["gflops"] / max(1e-12, s["gflops"]),
        }
        for runtime, ms in s.get("latency_ms", {}).items():
            if runtime in t.get("latency_ms", {}):
                ratios[f"latency_student_over_teacher_{runtime}"] = ms / t["latency_ms"][runtime]
        s_lat = s.get("latency_ms", {})
        t_lat = t.get("latency_ms", {})
        s_deployed = (
            min(v for k, v in s_lat.items() if k.startswith("ort"))
            if any(k.startswith("ort") for k in s_lat)
            else s_lat.get("torch_fp32")
        )
        t_best = min(t_lat.values()) if t_lat else None
        if s_deployed and t_best:
            ratios["deployed_latency_ratio"] = s_deployed / t_best
        result["ratios"] = ratios
    return result


def complexity_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten a `compare_student_teacher` result into table rows (one per model)."""
    rows = []
    for name in ("student", "teacher"):
        if name not in result:
            continue
        r = result[name]
        lat = r.get("latency_ms", {})
        rows.append(
            {
                "model": name,
                "params_m": r["params"] / 1e6,
                "gflops": r["gflops"],
                "activation_mb": r["activation_mb"],
                "state_dict_mb": r["state_dict_mb"],
                "torch_fp32_ms": lat.get("torch_fp32"),
                "ort_fp32_ms": lat.get("ort_fp32"),
                "ort_int8_ms": lat.get("ort_int8"),
            }
        )
    return rows
