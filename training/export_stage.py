"""The end of a run: export the bundle (or evaluate without one), ``run_end``, and the finished record.

`finish_run` is what `training.engine.run` calls on rank 0 once the student stage is over: it moves
student and teacher to the CPU in fp32, writes the bundle with ``training.export.export_bundle``
(``output.export: true``) or computes the metrics itself (``false``), emits the ``eval`` events and
``run_end``, and writes ``finished.json`` so that ``run --resume`` of a finished run returns in
seconds (`finished_run`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdviewer.events import EventWriter
from training.checkpoint import LAST
from training.config import RunConfig
from training.placement import Placement
from training.run_context import RunContext, RunResult
from training.stage import _progress
from training.stopping import StopNow, StopRequested
from training.validation import bundle_eval_events, own_eval_events
from training.zoo import count_parameters

#: Written (atomically) into <output.dir> when a run completed: ``run --resume`` then says so and returns
#: in seconds instead of redoing the evaluation and export; a new run (without --resume) removes it.
FINISHED_FILE = "finished.json"


def finish_run(
    ctx: RunContext, student: nn.Module, teacher: nn.Module | None
) -> tuple[Path | None, dict[str, Any], dict[str, Any]]:
    """Export (or evaluate), emit ``run_end``, write ``finished.json``; -> (bundle, metrics, complexity).

    Raises `StopRequested` (stage "export") when a stop is requested during the export: the bundle
    being written is discarded, the trained checkpoints stay, ``run --resume`` exports again.
    """
    cfg, events = ctx.cfg, ctx.events
    out, t0 = ctx.out, ctx.t0
    bundle = None
    metrics: dict[str, Any] = {}
    student_cpu = Placement.cpu().model(student).eval()
    teacher_cpu = Placement.cpu().model(teacher).eval() if teacher is not None else None
    complexity: dict[str, Any] = {"student_params": count_parameters(student_cpu)}
    if teacher_cpu is not None:
        complexity["teacher_params"] = count_parameters(teacher_cpu)
    if cfg.output.export:
        bundle = export_stage(ctx, student_cpu, teacher_cpu)
        bundle_eval_events(ctx, bundle)
        metrics, complexity = _bundle_summary(bundle, complexity)
    else:
        own = own_eval_events(ctx, student_cpu, "student")
        split = "test" if "test" in own else "val"
        metrics = {k_: v for k_, v in own[split]["metrics"].items()} if own else {}
    events.emit(
        "run_end",
        bundle=str(bundle) if bundle else None,
        metrics=metrics,
        elapsed_s=time.time() - t0,
        complexity=complexity,
    )
    _write_finished(out / FINISHED_FILE, cfg, bundle, metrics, complexity, time.time() - t0, events.run_id)
    return bundle, metrics, complexity


def export_threads(cfg: RunConfig) -> int:
    """Threads of every torch and ONNX Runtime computation of the export: ``runtime.threads`` when set,
    else what torch uses (its default: the cores of this machine)."""
    return int(cfg.runtime.threads or torch.get_num_threads())


def export_stage(ctx: RunContext, student: nn.Module, teacher: nn.Module | None) -> Path:
    """The export as a stage: ``stage_start`` (with its substages), one ``progress`` event per
    substage, ``stage_end`` (with each substage's seconds); a stop request ends it at once."""
    from training.export import EXPORT_PHASES, export_bundle

    cfg, events, splits, loaders = ctx.cfg, ctx.events, ctx.splits, ctx.loaders
    t_stage = time.time()
    total = len(EXPORT_PHASES)
    events.emit("stage_start", stage="export", epochs=0, steps_per_epoch=0, substages=list(EXPORT_PHASES))
    bar = _progress(total, "export")
    started: dict[str, float] = {}  # substage -> time it started

    def progress(name: str) -> None:
        if ctx.stop.requested:  # between substages (and at once, from inside one: `interrupting`)
            raise StopNow(ctx.stop.reason)
        started[name] = time.time()
        index = EXPORT_PHASES.index(name) + 1 if name in EXPORT_PHASES else total
        events.emit(
            "progress",
            stage="export",
            substage=name,
            index=index,
            total=total,
            elapsed_s=time.time() - t_stage,
        )
        if bar is not None:
            bar.n = index - 1
            bar.set_postfix_str(name)
            bar.refresh()

    _import_export_modules()  # outside the interruptible block: a stop never lands mid-import
    threads = export_threads(cfg)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with ctx.stop.interrupting():
            bundle = export_bundle(
                ctx.out / "bundle",
                name=cfg.output.name,
                task=cfg.task,
                class_names=splits.class_names,
                preprocessing=cfg.preprocessing.to_manifest(),
                student=student,
                student_arch=cfg.student.arch,
                teacher=teacher,
                teacher_arch=cfg.teacher.arch if cfg.teacher is not None else None,
                train_loader=loaders["train_eval"],
                val_loader=loaders["val"],
                test_loader=loaders.get("test"),
                config=cfg.model_dump(mode="json"),
                history=ctx.history,
                data_fingerprint=splits.fingerprint,
                demo=cfg.output.demo,
                synthetic=cfg.synthetic,
                device="cpu",
                quantize=cfg.output.quantize,
                int8_fp32_through=cfg.output.int8_fp32_through,
                parity_size=cfg.output.parity_images,
                threads=threads,
                n_boot=cfg.output.bootstrap,
                latency_runs=cfg.output.latency_runs,
                progress=progress,
            )
    except StopNow:
        last = ctx.history[-1]["epoch"] if ctx.history else 0
        checkpoint = ctx.last_checkpoint or ctx.ckpt_dir / LAST
        raise StopRequested(checkpoint, "export", int(last)) from None
    finally:
        torch.set_num_threads(old_threads)
        if bar is not None:
            bar.close()
    ends = [*list(started.values())[1:], time.time()]
    timings = {name: round(end - t, 2) for (name, t), end in zip(started.items(), ends, strict=True)}
    events.emit("stage_end", stage="export", elapsed_s=time.time() - t_stage, timings=timings)
    return Path(bundle)


def _import_export_modules() -> None:
    import importlib

    for name in (
        "onnx",
        "onnxruntime",
        "onnxruntime.quantization",
        "onnxruntime.quantization.shape_inference",
        "sklearn.metrics",
        "kdviewer.models.onnx_export",
        "kdviewer.inference.ood",
        "training.calibration",
        "training.complexity",
        "training.evaluate",
        "training.metrics",
        "training.quantize",
        "training.report",
    ):
        importlib.import_module(name)


def _write_finished(path: Path, cfg: RunConfig, bundle: Path | str | None, metrics: dict[str, Any],
                    complexity: dict[str, Any], elapsed_s: float, run_id: str) -> None:
    record = {
        "run_id": run_id,
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "elapsed_s": round(elapsed_s, 1),
        "bundle": str(bundle) if bundle else None,
        "metrics": metrics,
        "complexity": complexity,
        "config": cfg.model_dump(mode="json"),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def finished_run(path: Path, cfg: RunConfig, events: EventWriter, dist: Any, t0: float) -> RunResult | None:
    """``--resume`` of a run that already completed with this same configuration: say so, emit
    ``run_end`` again, return at once. None (resume normally) when the record is unreadable, its bundle
    is gone, or the configuration changed (e.g. more epochs: the resume continues training)."""

    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    bundle = Path(rec["bundle"]) if rec.get("bundle") else None
    if bundle is not None and not (bundle / "manifest.json").is_file():
        return None
    if json.loads(json.dumps(cfg.model_dump(mode="json"), default=str)) != rec.get("config"):
        return None
    if dist.is_main:
        events.emit(
            "log",
            level="info",
            message=(
                f"this run already finished on {rec.get('finished_at', '?')} "
                f"({float(rec.get('elapsed_s') or 0):.0f} s); nothing to resume"
                + (f"; its bundle is {bundle}" if bundle else "")
                + " (run without --resume to train again)"
            ),
        )
        events.emit("run_end", bundle=str(bundle) if bundle else None, metrics=rec.get("metrics") or {},
                    elapsed_s=time.time() - t0, complexity=rec.get("complexity") or {}, already_finished=True)
    return RunResult("completed", path.parent, bundle, None, rec.get("metrics") or {}, [])


def _bundle_summary(bundle: Path, complexity: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:

    try:
        manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}, complexity
    for role in ("student", "teacher"):
        spec = manifest.get(role) or {}
        for key in ("params", "gflops"):
            if spec.get(key) is not None:
                complexity[f"{role}_{key}"] = spec[key]
    return manifest.get("metrics", {}), complexity

