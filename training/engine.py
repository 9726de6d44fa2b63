"""The distillation engine: (optional) teacher fine-tuning, student distillation, checkpoints, export.

`run(cfg, events, resume)` is the whole pipeline behind ``kd-train run`` and the training panel:

1. data: discover + split (``training.data``), decode + preprocess once into memory caches;
2. stage "teacher" (``teacher.epochs`` > 0): fine-tune the teacher on the labels; otherwise the teacher
   is used as loaded (``teacher.weights``: ImageNet/SwAV/file/bundle);
3. stage "student": distil with the configured KD methods (``training.losses``); the frozen teacher's
   per-image outputs are computed once and cached when augmentation is off (``runtime.teacher_cache``);
4. stage "export" (rank 0; the other ranks of a DDP run leave once training is over):
   ``training.export.export_bundle`` writes ``<output.dir>/bundle`` (ONNX, INT8, metrics...), with a
   ``progress`` event per substage (``training.export.EXPORT_PHASES``) and ``stage_end``.

Every epoch ends with a validation pass, best-epoch tracking (``optim.monitor``), early stopping and an
atomic checkpoint (``checkpoints/last.pt``: model, optimizer, scheduler, grad scaler, FitNets
regressors, RNG states, history). ``--resume`` continues from it exactly: batch order and augmentation
are functions of (seed, epoch, step), and the RNG states are restored, so the final weights equal
those of an uninterrupted run (on the same machine, ``runtime.deterministic: true``).

Graceful stop: SIGINT / SIGTERM or a file named ``STOP`` in ``output.dir`` (what the GUI uses on
Windows). The engine finishes the current step, writes ``last.pt`` (mid-epoch position included),
emits ``checkpoint`` and ``stopped`` and returns ``RunResult(status="stopped")`` — the CLI then exits
with code 3; ``--resume`` continues from that step. A second SIGINT aborts at once. During the export
a stop ends it at once (the half-written bundle is discarded, the trained checkpoints stay; ``stopped``
has stage "export"); ``--resume`` then exports without training, and so does
``kd-train export RUN_DIR`` (``run(..., export_only=True)``) on any run whose training finished.

Errors: an ``error`` event with the traceback is emitted and the exception re-raised (CLI exit 1);
the last checkpoint stays usable for ``--resume``.

Where things are (one reason to change per module):

- ``training.engine`` (this file): `run` — data, models, the order of the stages, the run's events and
  errors; the device selection (`select_device`; AMP is decided in `training.amp`);
- ``training.stage``: the stage loop (`train_stage`: steps, validation, best epoch, checkpoints, stop);
- ``training.teacher_cache``: the frozen teacher's cached per-image records;
- ``training.validation``: the per-epoch evaluation and the ``eval`` events;
- ``training.export_stage``: the end of a run (bundle export, ``run_end``, ``finished.json``);
- ``training.stopping``: SIGINT/SIGTERM/STOP-file handling; ``training.run_context``: what the stages share;
- ``training.placement``: where a network and its batches run (device, autocast dtype, layout).

Output folder: ``config.yaml`` (resolved), ``events.jsonl`` (written by the CLI),
``checkpoints/{last,teacher,best_teacher,best_student}.pt``, ``bundle/``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from kdviewer.events import EventWriter
from kdviewer.models.architectures import spec_of
from training import distributed as ddp
from training.amp import gpu_facts
from training.amp import resolve_for_run as resolve_amp
from training.checkpoint import (
    LAST,
    TEACHER,
    atomic_save,
    cpu_state_dict,
    load_checkpoint,
    remove_stale_temporaries,
)
from training.config import ConfigError, RunConfig
from training.data import BatchLoader, build_datasets, discover
from training.export_stage import FINISHED_FILE, finish_run, finished_run
from training.losses import build_combiner
from training.run_context import RunContext, RunResult
from training.stage import _drain, train_stage
from training.stopping import STOP_FILE, StopMonitor, StopRequested
from training.validation import evaluate
from training.zoo import create_model

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- devices


def select_device(pref: str) -> torch.device:
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(pref)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            [{"loc": "runtime.device", "msg": "CUDA was requested but no CUDA GPU is available"}]
        )
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ConfigError([{"loc": "runtime.device", "msg": "MPS was requested but is not available"}])
    return device


# ---------------------------------------------------------------------------------------------- run


def _generate_if_needed(cfg: RunConfig, dist: ddp.DistEnv, events: EventWriter) -> RunConfig:
    gen = cfg.data.generate
    if gen is None:
        return cfg
    assert cfg.data.root is not None
    root = cfg.data.root
    labels = root / "labels.csv"
    if dist.is_main and not labels.is_file():
        from training.synth import generate

        events.emit(
            "log", level="info", message=f"generating {gen.n} synthetic '{gen.kind}' phantoms in {root}"
        )
        generate(
            gen.kind,
            gen.n,
            root,
            fmt=gen.fmt,
            seed=gen.seed,
            difficulty=gen.difficulty,
            size=gen.size,
            series_slices=gen.series_slices,
            patients=gen.patients,
        )
    ddp.barrier(dist)
    if cfg.data.csv is None and labels.is_file():
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"csv": labels})})
    return cfg


def _check_trained(state: dict[str, Any] | None, cfg: RunConfig, last: Path) -> None:
    """``export_only``: the checkpoint must hold a finished student stage."""
    if state is not None and state.get("stage") == "student" and state.get("done"):
        return
    where = (
        f"its checkpoint {last} is at stage {state.get('stage')!r}, epoch {state.get('epoch')}"
        if state is not None
        else f"{last} does not exist"
    )
    raise ConfigError(
        [
            {
                "loc": "output.dir",
                "msg": f"the training of {cfg.output.dir} has not finished ({where}); "
                "finish it with `kd-train run CONFIG --resume` (which exports at the end)",
            }
        ]
    )


def _write_config(cfg: RunConfig, out: Path) -> None:
    data = cfg.model_dump(mode="json")
    tmp = out / ".config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    os.replace(tmp, out / "config.yaml")


def _set_seed(seed: int, deterministic: bool) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def run(cfg: RunConfig, events: EventWriter, resume: bool = False, export_only: bool = False) -> RunResult:
    """Train (teacher, then student), checkpoint, and export the bundle. See the module docstring.

    ``export_only`` (``kd-train export RUN_DIR``): no training — the run's checkpoints must say that
    its student stage finished; the bundle is written again from the best student (and the teacher).
    """
    resume = resume or export_only
    t0 = time.time()
    out = Path(cfg.output.dir)
    ckpt_dir = out / "checkpoints"
    stop = StopMonitor(out / STOP_FILE)
    dist = ddp.DistEnv()
    ctx: RunContext | None = None
    try:
        device = select_device(cfg.runtime.device)
        dist = ddp.init(device)
        device = ddp.rank_device(device, dist)
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        precision = resolve_amp(cfg, device)  # auto: timed probe on a CPU (training.amp)
        amp, channels_last = precision.dtype, precision.channels_last
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(ckpt_dir)  # half-written checkpoints of a run killed with -9
            if (out / STOP_FILE).exists():
                (out / STOP_FILE).unlink()
        ddp.barrier(dist)
        resume_state = None
        last = ckpt_dir / LAST
        finished = out / FINISHED_FILE
        if resume and not export_only and finished.is_file():
            done = finished_run(finished, cfg, events, dist, t0)
            if done is not None:
                return done
        if dist.is_main and finished.exists():
            finished.unlink()
        if resume:
            if last.is_file():
                resume_state = load_checkpoint(last)
                events.run_id = str(resume_state.get("run_id") or events.run_id)
            if export_only:
                _check_trained(resume_state, cfg, last)
            elif resume_state is None and dist.is_main:
                events.emit(
                    "log", level="warning", message=f"nothing to resume in {ckpt_dir}: starting afresh"
                )
        elif last.is_file() and dist.is_main:
            events.emit(
                "log", level="warning", message=f"starting a new run in {out}: old checkpoints are replaced"
            )
        stop.install()
        _set_seed(cfg.runtime.seed, cfg.runtime.deterministic)

        cfg = _generate_if_needed(cfg, dist, events)
        if dist.is_main and not export_only:
            _write_config(cfg, out)
        splits = discover(cfg.data, cfg.task, cfg.runtime.seed)
        if resume_state is not None and resume_state.get("fingerprint") != splits.fingerprint:
            raise ConfigError(
                [
                    {
                        "loc": "data",
                        "msg": "the data changed since the checkpoint was written "
                        "(different files, sizes or labels); cannot resume exactly. Run without --resume.",
                    }
                ]
            )
        pre = cfg.preprocessing.to_manifest()
        k = len(splits.class_names)
        c = pre.channels
        stage_steps: dict[str, int] = {}
        teacher_train = cfg.teacher is not None and cfg.teacher.epochs > 0
        n_train = math.ceil(len(splits.train) / dist.world_size)
        if teacher_train:
            assert cfg.teacher is not None
            stage_steps["teacher"] = cfg.teacher.epochs * math.ceil(n_train / cfg.teacher_optim().batch_size)
        stage_steps["student"] = cfg.optim.epochs * math.ceil(n_train / cfg.optim.batch_size)
        if dist.is_main:
            events.emit(
                "run_start",
                config=cfg.model_dump(mode="json"),
                device=str(device),
                gpu=gpu_facts(device),
                amp=None if amp is None else str(amp).replace("torch.", ""),
                world_size=dist.world_size,
                output_dir=str(out.resolve()),
                stages=[*stage_steps, *(["export"] if cfg.output.export else [])],
                total_steps=sum(stage_steps.values()),
                resumed_from=str(last) if resume_state is not None else None,
                dataset=splits.counts(),
                synthetic=cfg.synthetic,
                channels_last=channels_last,
                data_fingerprint=splits.fingerprint,
            )
            events.emit("log", level="info", message=precision.message)
            for note in splits.skipped[:20]:
                events.emit("log", level="warning", message=note)
        t_cache = time.time()
        last_note = [0.0]

        def cache_progress(split: str, done: int, total: int) -> None:
            now = time.time()
            if dist.is_main and (done == total or now - last_note[0] > 5.0):
                last_note[0] = now
                events.emit("log", level="info", message=f"decoding {split} images: {done}/{total}")

        sets = build_datasets(splits, pre, cfg.data, cfg.runtime.num_workers, progress=cache_progress)
        for name, ds in sets.items():
            for msg in ds.failed[:20]:
                if dist.is_main:
                    events.emit("log", level="warning", message=f"{name}: skipped unreadable image {msg}")
        cached = all(ds.cache is not None for ds in sets.values())
        if dist.is_main:
            events.emit(
                "log",
                level="info",
                message=(
                    f"data: {len(sets['train'])} train / {len(sets['val'])} val / "
                    f"{len(sets['test']) if 'test' in sets else 0} test images, "
                    f"{'cached in memory' if cached else 'decoded every epoch'} "
                    f"({time.time() - t_cache:.1f} s)"
                ),
            )
        seed = cfg.runtime.seed
        eval_bs = cfg.runtime.eval_batch_size or 2 * cfg.optim.batch_size
        loaders = {
            "train": BatchLoader(
                sets["train"],
                cfg.optim.batch_size,
                shuffle=True,
                seed=seed,
                augment=cfg.preprocessing.augment,
                rank=dist.rank,
                world_size=dist.world_size,
                num_workers=cfg.runtime.num_workers,
            ),
            "train_eval": BatchLoader(sets["train"], eval_bs, num_workers=cfg.runtime.num_workers),
            "val": BatchLoader(sets["val"], eval_bs, num_workers=cfg.runtime.num_workers),
        }
        if "test" in sets:
            loaders["test"] = BatchLoader(sets["test"], eval_bs, num_workers=cfg.runtime.num_workers)
        ctx = RunContext(
            cfg,
            events,
            device,
            amp,
            channels_last,
            dist,
            out,
            ckpt_dir,
            stop,
            splits,
            sets,
            loaders,
            [],
            t0,
            stage_steps,
            resume_state,
        )
        if resume_state is not None:
            ctx.history = list(resume_state.get("history") or [])
            ctx.last_checkpoint = last

        # ---- teacher ------------------------------------------------------------------------
        teacher = None
        if cfg.teacher is not None:
            tc = cfg.teacher
            teacher = create_model(
                tc.arch, k, c, tc.dropout, tc.weights, role="teacher", freeze=tc.freeze,
                bn_momentum=tc.bn_momentum,
            ).to(device)
            teacher_file = ckpt_dir / TEACHER
            resumed_stage = resume_state.get("stage") if resume_state is not None else None
            if resumed_stage == "student":
                if not teacher_file.is_file():
                    raise RuntimeError(f"cannot resume: {teacher_file} is missing")
                teacher.load_state_dict(load_checkpoint(teacher_file))
            elif teacher_train:  # (a resumed teacher stage continues inside train_stage)
                if tc.weights.lower() == "none" and dist.is_main:
                    events.emit(
                        "log", level="info", message="the teacher starts from random weights (weights: none)"
                    )
                head = build_combiner(None, cfg.task, 1.0, teacher, None, c, pre.input_size)
                teacher = train_stage(ctx, "teacher", teacher, head, cfg.teacher_optim())
                if dist.is_main:  # last.pt already says stage "teacher", done (with the RNG state)
                    atomic_save(cpu_state_dict(teacher), teacher_file)
            else:
                if tc.weights.lower() == "none" and dist.is_main:
                    events.emit(
                        "log",
                        level="warning",
                        message=(
                            "the teacher is untrained (weights: none, epochs: 0): "
                            "distillation will teach noise"
                        ),
                    )
                if dist.is_main:
                    atomic_save(cpu_state_dict(teacher), teacher_file)
            teacher.eval()

        # ---- student ------------------------------------------------------------------------
        sc = cfg.student
        student = create_model(
            sc.arch, k, c, sc.dropout, sc.weights, role="student", freeze=sc.freeze,
            bn_momentum=sc.bn_momentum,
        ).to(device)
        if cfg.output.quantize and cfg.output.int8_fp32_through:
            from training.quantize import require_layer

            require_layer(student, cfg.output.int8_fp32_through)
        combiner = build_combiner(cfg.kd, cfg.task, cfg.task_weight(), student, teacher, c, pre.input_size)
        combiner.to(device)
        student = train_stage(ctx, "student", student, combiner, cfg.optim, teacher)

        # ---- export (rank 0 only: the other ranks leave once every rank has finished training) ----
        bundle: Path | None = None
        metrics: dict[str, Any] = {}
        ddp.barrier(dist)
        if dist.is_main:
            bundle, metrics, _ = finish_run(ctx, student, teacher)
        return RunResult(
            "completed",
            out,
            bundle,
            ctx.last_checkpoint,
            metrics,
            ctx.history,
            student,
            teacher,
        )
    except StopRequested as stopped:
        assert ctx is not None
        if dist.is_main:
            events.emit(
                "stopped",
                stage=stopped.stage,
                epoch=stopped.epoch,
                checkpoint=str(stopped.checkpoint),
                reason=stop.reason,
            )
            with contextlib.suppress(OSError):
                (out / STOP_FILE).unlink()
        return RunResult("stopped", out, None, stopped.checkpoint, {}, ctx.history)
    except BaseException as exc:
        if ctx is not None:
            with contextlib.suppress(BaseException):
                _drain(ctx, wait=True)  # let the checkpoint being written finish: it stays usable
        if dist.is_main:
            last_ckpt = ctx.last_checkpoint if ctx is not None else None
            events.emit(
                "error",
                message=str(exc) or type(exc).__name__,
                type=type(exc).__name__,
                traceback=traceback.format_exc(),
                checkpoint=str(last_ckpt) if last_ckpt else None,
            )
        raise
    finally:
        stop.uninstall()
        ddp.shutdown(dist)


def iter_events_file(path: Path) -> Iterator[dict[str, Any]]:
    """Parsed events of a run's ``events.jsonl`` (helper for tests and tools)."""
    from kdviewer.events import parse_event

    with open(path, encoding="utf-8") as fh:
        for line in fh:
            ev = parse_event(line)
            if ev is not None:
                yield ev


__all__ = [
    "FINISHED_FILE",
    "STOP_FILE",
    "RunResult",
    "evaluate",
    "iter_events_file",
    "run",
    "select_device",
    "spec_of",
    "train_stage",
]
