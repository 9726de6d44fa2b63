"""The distillation engine: (optional) teacher fine-tuning, student distillation, checkpoints, export.

`run(cfg, events, resume)` is the whole pipeline behind ``kd-train run`` and the training panel:

1. data: discover + split (``training.data``), decode + preprocess once into memory caches;
2. stage "teacher" (``teacher.epochs`` > 0): fine-tune the teacher on the labels; otherwise the teacher
   is used as loaded (``teacher.weights``: ImageNet/SwAV/file/bundle);
3. stage "student": distil with the configured KD methods (``training.losses``); the frozen teacher's
   per-image outputs are computed once and cached when augmentation is off (``runtime.teacher_cache``);
4. export: ``training.export.export_bundle`` writes ``<output.dir>/bundle`` (ONNX, INT8, metrics...).

Every epoch ends with a validation pass, best-epoch tracking (``optim.monitor``), early stopping and an
atomic checkpoint (``checkpoints/last.pt``: model, optimizer, scheduler, grad scaler, FitNets
regressors, RNG states, history). ``--resume`` continues from it exactly: batch order and augmentation
are functions of (seed, epoch, step), and the RNG states are restored, so the final weights equal
those of an uninterrupted run (on the same machine, ``runtime.deterministic: true``).

Graceful stop: SIGINT / SIGTERM or a file named ``STOP`` in ``output.dir`` (what the GUI uses on
Windows). The engine finishes the current step, writes ``last.pt`` (mid-epoch position included),
emits ``checkpoint`` and ``stopped`` and returns ``RunResult(status="stopped")`` — the CLI then exits
with code 3; ``--resume`` continues from that step. A second SIGINT aborts at once.

Errors: an ``error`` event with the traceback is emitted and the exception re-raised (CLI exit 1);
the last checkpoint stays usable for ``--resume``.

Output folder: ``config.yaml`` (resolved), ``events.jsonl`` (written by the CLI),
``checkpoints/{last,teacher,best_teacher,best_student}.pt``, ``bundle/``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from kdviewer.events import EventWriter
from kdviewer.models.architectures import spec_of
from training import distributed as ddp
from training.amp import gpu_facts
from training.amp import resolve_for_run as resolve_amp
from training.checkpoint import (
    LAST,
    TEACHER,
    AsyncSaver,
    atomic_save,
    capture_rng,
    cpu_state_dict,
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng,
    snapshot,
)
from training.config import ConfigError, OptimConfig, RunConfig
from training.data import BatchLoader, DataSplits, ImageDataset, build_datasets, discover
from training.losses import FeatureHooks, KDCombiner, build_combiner, task_loss
from training.zoo import count_parameters, create_model

log = logging.getLogger(__name__)

STOP_FILE = "STOP"
#: Written (atomically) into <output.dir> when a run completed: ``run --resume`` then says so and returns
#: in seconds instead of redoing the evaluation and export; a new run (without --resume) removes it.
FINISHED_FILE = "finished.json"
STEP_EVENT_INTERVAL_S = 0.2  # at most ~5 step events per second (plus each epoch's last step)


@dataclass
class RunResult:
    status: str  # "completed" | "stopped"
    output_dir: Path
    bundle: Path | None = None
    checkpoint: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    student: nn.Module | None = field(default=None, repr=False)
    teacher: nn.Module | None = field(default=None, repr=False)


class StopRequested(Exception):
    """Internal: unwinds a stage after a graceful stop was checkpointed."""

    def __init__(self, checkpoint: Path, stage: str, epoch: int) -> None:
        super().__init__(str(checkpoint))
        self.checkpoint, self.stage, self.epoch = checkpoint, stage, epoch


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


# ---------------------------------------------------------------------------------------------- stop


class StopMonitor:
    """SIGINT/SIGTERM handlers + the STOP file; ``requested`` is polled once per training step."""

    def __init__(self, stop_file: Path) -> None:
        self.stop_file = stop_file
        self.flag = False
        self.reason = ""
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled on the main thread; the STOP file still works
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, OSError):
                self._previous[sig] = signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler)
        self._previous.clear()

    def _handler(self, signum: int, _frame: object) -> None:
        if self.flag and signum == signal.SIGINT:
            self.uninstall()
            raise KeyboardInterrupt  # second Ctrl-C: abort now
        self.flag = True
        self.reason = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        if not self.flag and self.stop_file.exists():  # a stat() per step: microseconds
            self.flag = True
            self.reason = "STOP file"
        return self.flag


# ------------------------------------------------------------------------------------- train module


class TrainModule(nn.Module):
    """The trainable part of a stage: the network plus the loss's own parameters (FitNets regressors).

    ``forward(x, y, teacher_record)`` returns ``(total loss, components)``; it is what DDP wraps, so the
    regressors' gradients are synchronised across ranks like the network's.
    """

    def __init__(self, model: nn.Module, combiner: KDCombiner) -> None:
        super().__init__()
        self.model = model
        self.combiner = combiner
        self.hooks = FeatureHooks(model, combiner.student_layers(), embedding=combiner.needs_embedding)
        self.hooks.attach()

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, teacher: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = self.hooks.outputs(self.model(x))
        return self.combiner(outputs, teacher, y)


class TeacherCache:
    """Frozen-teacher records for every training image, computed once (valid only without augmentation)."""

    def __init__(self, records: dict[str, torch.Tensor]) -> None:
        self.records = records

    def take(self, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        return {k: v[idx].to(device, non_blocking=True) for k, v in self.records.items()}


@dataclass
class _Ctx:
    cfg: RunConfig
    events: EventWriter
    device: torch.device
    amp: torch.dtype | None
    channels_last: bool
    dist: ddp.DistEnv
    out: Path
    ckpt_dir: Path
    stop: StopMonitor
    splits: DataSplits
    sets: dict[str, ImageDataset]
    loaders: dict[str, BatchLoader]
    history: list[dict[str, Any]]
    t0: float
    stage_steps: dict[str, int]
    resume_state: dict[str, Any] | None = None
    last_checkpoint: Path | None = None
    saver: AsyncSaver = field(default_factory=AsyncSaver)


# --------------------------------------------------------------------------------------------- helpers


def _autocast(ctx: _Ctx) -> contextlib.AbstractContextManager[Any]:
    if ctx.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=ctx.amp)


def _to_input(x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if ctx.channels_last else x


def make_optimizer(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW, using the fused (single-kernel) implementation where torch has one.

    Fused Adam on a CPU is ~7x faster per step than the default loop over parameters, which is about
    15 % of a ResNet-18 training step at 64 px.
    """
    params = list(params)
    if cfg.name == "sgd":
        cls: type[torch.optim.Optimizer] = torch.optim.SGD
        kwargs: dict[str, Any] = {"momentum": cfg.momentum, "nesterov": cfg.nesterov}
    else:
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        kwargs = {}
    try:
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device / dtype
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)


def make_scheduler(
    opt: torch.optim.Optimizer, cfg: OptimConfig
) -> torch.optim.lr_scheduler.LRScheduler | None:
    s = cfg.schedule
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=s.step_size, gamma=s.gamma)
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs), eta_min=s.min_lr)
    return None


def _auc(y: np.ndarray, p: np.ndarray, task: str) -> float:
    from sklearn.metrics import roc_auc_score

    try:
        if task == "multi-label":
            cols = [k for k in range(y.shape[1]) if 0 < y[:, k].sum() < len(y)]
            return float(np.mean([roc_auc_score(y[:, k], p[:, k]) for k in cols])) if cols else float("nan")
        if p.shape[1] == 2:
            return float(roc_auc_score(y == 1, p[:, 1])) if 0 < (y == 1).sum() < len(y) else float("nan")
        if len(np.unique(y)) < p.shape[1]:
            return float("nan")
        return float(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    except ValueError:
        return float("nan")


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: BatchLoader,
    task: str,
    device: torch.device,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Loss, accuracy and macro AUC of ``model`` on ``loader`` (plus ``probs``/``targets`` arrays)."""
    was_training = model.training
    model.eval()
    logits_l, targets_l = [], []
    try:
        for _, x, y in loader.iter_batches(0, 0, device):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                out = model(x)
            logits_l.append(out.float().cpu())
            targets_l.append(y.cpu())
    finally:
        model.train(was_training)
    logits = torch.cat(logits_l)
    targets = torch.cat(targets_l)
    multi = task == "multi-label"
    loss = float(task_loss(logits, targets, multi))
    if multi:
        probs = torch.sigmoid(logits).numpy()
        y = targets.numpy()
        acc = float(((probs >= 0.5) == (y >= 0.5)).mean())
    else:
        probs = torch.softmax(logits, 1).numpy()
        y = targets.numpy()
        acc = float((probs.argmax(1) == y).mean())
    return {"loss": loss, "accuracy": acc, "auc": _auc(y, probs, task), "probs": probs, "targets": y}


def _monitor_name(cfg: OptimConfig, task: str) -> str:
    if cfg.monitor != "auto":
        return cfg.monitor
    return "auc" if task == "multi-label" else "accuracy"


def _improved(value: float, best: float | None, name: str, min_delta: float) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return best is None
    if best is None or (isinstance(best, float) and math.isnan(best)):
        return True
    if name == "loss":
        return value < best - min_delta
    return value > best + min_delta


# ------------------------------------------------------------------------------------------- stages


def teacher_record(
    teacher: nn.Module, combiner: KDCombiner, hooks: FeatureHooks, x: torch.Tensor, amp: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """The frozen teacher's per-sample record for a batch (the one code path for cached and live)."""
    with (
        torch.no_grad(),
        torch.autocast(x.device.type, dtype=amp) if amp is not None else contextlib.nullcontext(),
    ):
        return combiner.teacher_record(hooks.outputs(teacher(x)))


def build_teacher_cache(
    teacher: nn.Module,
    combiner: KDCombiner,
    dataset: ImageDataset,
    *,
    device: torch.device,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
    batch_size: int = 64,
    max_bytes: int | None = None,
) -> TeacherCache | None:
    """Teacher records for every image of ``dataset`` (in order), or None if over ``max_bytes``."""
    order = BatchLoader(dataset, batch_size)
    records: dict[str, torch.Tensor] = {}
    teacher.eval()
    with FeatureHooks(teacher, combiner.teacher_layers(), embedding=combiner.needs_embedding) as hooks:
        for idx, x, _ in order.iter_batches(0, 0, device):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            rec = teacher_record(teacher, combiner, hooks, x, amp)
            if not records:
                per_item = sum(v[0].numel() * 4 for v in rec.values())
                if max_bytes is not None and per_item * len(dataset) > max_bytes:
                    return None
                records = {
                    k: torch.empty((len(dataset), *v.shape[1:]), dtype=torch.float32) for k, v in rec.items()
                }
            for k, v in rec.items():
                records[k][idx] = v.detach().float().cpu()
    return TeacherCache(records)


def _teacher_cache_for(
    ctx: _Ctx, teacher: nn.Module, combiner: KDCombiner, loader: BatchLoader
) -> TeacherCache | None:
    policy = ctx.cfg.runtime.teacher_cache
    if policy == "off" or not combiner.needs_teacher:
        return None
    if loader.augment is not None:
        if policy == "on" and ctx.dist.is_main:
            ctx.events.emit(
                "log",
                level="warning",
                message=("teacher cache disabled: augmentation changes the teacher's input every epoch"),
            )
        return None
    t0 = time.time()
    budget = None if policy == "on" else ctx.cfg.runtime.teacher_cache_max_mb * 2**20
    cache = build_teacher_cache(
        teacher,
        combiner,
        loader.dataset,
        device=ctx.device,
        amp=ctx.amp,
        channels_last=ctx.channels_last,
        batch_size=ctx.cfg.runtime.eval_batch_size or 2 * ctx.cfg.optim.batch_size,
        max_bytes=budget,
    )
    if ctx.dist.is_main:
        if cache is None:
            ctx.events.emit(
                "log",
                level="info",
                message=("teacher outputs exceed runtime.teacher_cache_max_mb: recomputing them every step"),
            )
        else:
            mb = sum(v.numel() * 4 for v in cache.records.values()) / 2**20
            ctx.events.emit(
                "log",
                level="info",
                message=(
                    f"teacher outputs cached for {len(loader.dataset)} images "
                    f"({mb:.1f} MB, {time.time() - t0:.1f} s): "
                    "the frozen teacher runs once instead of every epoch"
                ),
            )
    return cache


def _step_event(ctx: _Ctx, **fields: Any) -> None:
    gpu = None
    if ctx.device.type == "cuda":
        gpu = torch.cuda.max_memory_allocated(ctx.device) / 2**20
    ctx.events.emit("step", gpu_mem_mb=gpu, **fields)


def _save(
    ctx: _Ctx,
    state: dict[str, Any],
    reason: str,
    stage: str,
    epoch: int,
    extra: tuple[tuple[Any, Path], ...] = (),
    sync: bool = False,
) -> Path:
    """Write ``last.pt`` (after ``extra`` files) in the background; ``sync`` waits for it."""
    path = ctx.ckpt_dir / LAST
    if ctx.dist.is_main:
        meta = {"stage": stage, "epoch": epoch, "path": str(path), "reason": reason}
        ctx.saver.submit([*extra, (state, path)], meta, sync=sync)
        _drain(ctx)
    else:
        ctx.last_checkpoint = path
    return path


def _drain(ctx: _Ctx, wait: bool = False) -> None:
    """Emit ``checkpoint`` events for the writes that have completed (all of them with ``wait``)."""
    for meta in ctx.saver.wait() if wait else ctx.saver.poll():
        ctx.last_checkpoint = Path(meta["path"])
        ctx.events.emit("checkpoint", **meta)


def _progress(total: int, desc: str, initial: int = 0) -> Any:
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


def train_stage(
    ctx: _Ctx,
    stage: str,
    model: nn.Module,
    combiner: KDCombiner,
    optim_cfg: OptimConfig,
    teacher: nn.Module | None = None,
) -> nn.Module:
    """Train ``model`` for one stage; returns it holding its best (or last) weights. Raises StopRequested."""
    cfg = ctx.cfg
    train_loader = ctx.loaders["train"]
    train_loader.batch_size = optim_cfg.batch_size
    module = TrainModule(model, combiner).to(ctx.device)
    if ctx.channels_last:
        module = module.to(memory_format=torch.channels_last)
    opt = make_optimizer([p for p in module.parameters() if p.requires_grad], optim_cfg)
    sched = make_scheduler(opt, optim_cfg)
    scaler = torch.amp.GradScaler("cuda") if ctx.amp == torch.float16 and ctx.device.type == "cuda" else None
    monitor = _monitor_name(optim_cfg, cfg.task)
    best: float | None = None
    best_epoch = 0
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs = 0
    start_epoch, start_step = 1, 0
    accum: dict[str, float] = {}
    done = False

    resume = ctx.resume_state if ctx.resume_state and ctx.resume_state.get("stage") == stage else None
    if resume is not None:
        module.load_state_dict(resume["module"])
        opt.load_state_dict(resume["optimizer"])
        if sched is not None and resume.get("scheduler") is not None:
            sched.load_state_dict(resume["scheduler"])
        if scaler is not None and resume.get("scaler") is not None:
            scaler.load_state_dict(resume["scaler"])
        best, best_epoch, bad_epochs = resume["best"], resume["best_epoch"], resume["bad_epochs"]
        best_state = resume.get("best_state")
        if resume.get("best_is_current"):
            best_state = cpu_state_dict(model)
        patience = optim_cfg.early_stopping.patience
        stopped_early = patience is not None and bad_epochs >= patience
        # finished, unless the run file now asks for more epochs than the finished stage had
        done = bool(resume.get("done")) and (resume["epoch"] >= optim_cfg.epochs or stopped_early)
        start_epoch, start_step = resume["epoch"] + 1, resume["step_in_epoch"]
        if start_step:
            start_epoch -= 1  # stopped inside epoch `resume["epoch"]`: continue that epoch
        accum = dict(resume.get("accum") or {})
        ctx.resume_state = None
    if done:  # the stage had finished; only what follows it was interrupted
        if optim_cfg.select_best and best_state is not None:
            model.load_state_dict(best_state)
        module.hooks.remove()
        restore_rng(resume["rng"])
        return model

    teacher_cache = None
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if ctx.channels_last:
            teacher.to(memory_format=torch.channels_last)
        teacher_cache = _teacher_cache_for(ctx, teacher, combiner, train_loader)
    if resume is not None:
        restore_rng(resume["rng"])

    trainable = ddp.wrap(module, ctx.dist, ctx.device)
    steps_per_epoch = len(train_loader.batches(1))
    epochs = optim_cfg.epochs
    total_steps = steps_per_epoch * epochs
    if ctx.dist.is_main:
        ctx.events.emit("stage_start", stage=stage, epochs=epochs, steps_per_epoch=steps_per_epoch)
    later_steps = sum(v for k, v in ctx.stage_steps.items() if k == "student" and stage == "teacher")
    t_hooks = (
        FeatureHooks(teacher, combiner.teacher_layers(), embedding=combiner.needs_embedding)
        if teacher is not None and teacher_cache is None
        else None
    )
    if t_hooks is not None:
        t_hooks.attach()
    sec_per_step: float | None = None
    try:
        for epoch in range(start_epoch, epochs + 1):
            trainable.train()
            t_epoch = time.time()
            first = start_step if epoch == start_epoch else 0
            if first == 0:
                accum = {}
            bar = _progress(steps_per_epoch, f"{stage} {epoch}/{epochs}", first)
            last_emit = 0.0
            window_images, window_t = 0, time.time()
            t_prev = time.time()
            for step, (idx, x, y) in enumerate(train_loader.iter_batches(epoch, first, ctx.device), first):
                x = _to_input(x, ctx)
                record = None
                if teacher is not None:
                    if teacher_cache is not None:
                        record = teacher_cache.take(idx, ctx.device)
                    else:
                        assert t_hooks is not None
                        record = teacher_record(teacher, combiner, t_hooks, x, ctx.amp)
                with _autocast(ctx):
                    loss, parts = trainable(x, y, record)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if optim_cfg.grad_clip:
                        scaler.unscale_(opt)
                        nn.utils.clip_grad_norm_(module.parameters(), optim_cfg.grad_clip)
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    if optim_cfg.grad_clip:
                        nn.utils.clip_grad_norm_(module.parameters(), optim_cfg.grad_clip)
                    opt.step()
                n = len(x)
                loss_v = float(loss.detach())
                comp_v = {k: float(v.detach()) for k, v in parts.items()}
                accum["n"] = accum.get("n", 0.0) + n
                accum["loss"] = accum.get("loss", 0.0) + loss_v * n
                for k, v in comp_v.items():
                    accum[k] = accum.get(k, 0.0) + v * n
                window_images += n
                dt, t_prev = time.time() - t_prev, time.time()  # includes loading the batch
                sec_per_step = dt if sec_per_step is None else 0.9 * sec_per_step + 0.1 * dt
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_v:.4f}")
                now = time.time()
                last_step = step == steps_per_epoch - 1
                if ctx.dist.is_main and (
                    last_step or now - last_emit >= STEP_EVENT_INTERVAL_S or step == first
                ):
                    global_step = (epoch - 1) * steps_per_epoch + step + 1
                    remaining = (total_steps - global_step) + later_steps
                    _step_event(
                        ctx,
                        stage=stage,
                        epoch=epoch,
                        step=global_step,
                        lr=opt.param_groups[0]["lr"],
                        loss=loss_v,
                        components=comp_v,
                        images_per_s=window_images * ctx.dist.world_size / max(now - window_t, 1e-9),
                        eta_s=remaining * sec_per_step if sec_per_step else None,
                    )
                    last_emit, window_images, window_t = now, 0, now
                if ctx.dist.is_main:
                    _drain(ctx)  # checkpoint events of background writes that have finished
                if ddp.any_flag(ctx.stop.requested, ctx.dist, ctx.device) and not last_step:
                    state = _stage_state(
                        module,
                        opt,
                        sched,
                        scaler,
                        stage,
                        epoch - 1,
                        step + 1,
                        best,
                        best_epoch,
                        bad_epochs,
                        best_state,
                        accum,
                        ctx,
                    )
                    state["epoch"] = epoch
                    ckpt = _save(ctx, state, "stop", stage, epoch, sync=True)
                    raise StopRequested(ckpt, stage, epoch)
            if bar is not None:
                bar.close()
            start_step = 0
            if sched is not None:
                sched.step()
            val = evaluate(module.model, ctx.loaders["val"], cfg.task, ctx.device, ctx.amp, ctx.channels_last)
            value = val[monitor]
            improved = _improved(value, best, monitor, optim_cfg.early_stopping.min_delta)
            if improved:
                best, best_epoch, bad_epochs = value, epoch, 0
                best_state = cpu_state_dict(model)
            else:
                bad_epochs += 1
            n_seen = max(accum.get("n", 1.0), 1.0)
            train_stats = {k: v / n_seen for k, v in accum.items() if k != "n"}
            epoch_time = time.time() - t_epoch
            train_stats["images_per_s"] = accum.get("n", 0.0) * ctx.dist.world_size / max(epoch_time, 1e-9)
            record_ = {
                "stage": stage,
                "epoch": epoch,
                "train": train_stats,
                "val": {k: val[k] for k in ("loss", "accuracy", "auc")},
                "lr": opt.param_groups[0]["lr"],
                "best": improved,
                "epoch_time_s": epoch_time,
                "monitor": monitor,
            }
            ctx.history.append(record_)
            if ctx.dist.is_main:
                ctx.events.emit("epoch_end", **record_)
            patience = optim_cfg.early_stopping.patience
            stop_early = patience is not None and bad_epochs >= patience
            finished = stop_early or epoch == epochs
            stop_now = ddp.any_flag(ctx.stop.requested, ctx.dist, ctx.device) and not finished
            best_file = ((best_state, ctx.ckpt_dir / f"best_{stage}.pt"),) if improved else ()
            if finished or stop_now or epoch % cfg.output.checkpoint_every == 0:
                state = _stage_state(
                    module,
                    opt,
                    sched,
                    scaler,
                    stage,
                    epoch,
                    0,
                    best,
                    best_epoch,
                    bad_epochs,
                    None if improved else best_state,  # improved: the best weights are "module"
                    {},
                    ctx,
                )
                state["best_is_current"] = improved
                state["done"] = finished
                ckpt = _save(
                    ctx, state, "stop" if stop_now else "epoch", stage, epoch, best_file, sync=stop_now
                )
            elif best_file and ctx.dist.is_main:
                ctx.saver.submit(list(best_file))
            if stop_early and ctx.dist.is_main:
                ctx.events.emit(
                    "log",
                    level="info",
                    message=(
                        f"early stopping: no {monitor} improvement for {patience} epochs "
                        f"(best epoch {best_epoch})"
                    ),
                )
            if stop_now:
                raise StopRequested(ckpt, stage, epoch)
            if finished:
                break
    finally:
        if t_hooks is not None:
            t_hooks.remove()
        module.hooks.remove()
    _drain(ctx, wait=True)
    if optim_cfg.select_best and best_state is not None:
        model.load_state_dict(best_state)
    return model


def _stage_state(
    module: TrainModule,
    opt: torch.optim.Optimizer,
    sched: Any,
    scaler: Any,
    stage: str,
    epoch: int,
    step_in_epoch: int,
    best: float | None,
    best_epoch: int,
    bad_epochs: int,
    best_state: dict[str, torch.Tensor] | None,
    accum: dict[str, float],
    ctx: _Ctx,
) -> dict[str, Any]:
    return {
        "format": "kdviewer-checkpoint-1",
        "run_id": ctx.events.run_id,
        "stage": stage,
        "epoch": epoch,  # completed epochs (or the current one when step_in_epoch > 0)
        "step_in_epoch": step_in_epoch,
        "module": cpu_state_dict(module),
        "optimizer": snapshot(opt.state_dict()),  # cloned: written while training goes on
        "scheduler": snapshot(sched.state_dict()) if sched is not None else None,
        "scaler": snapshot(scaler.state_dict()) if scaler is not None else None,
        "best": best,
        "best_epoch": best_epoch,
        "bad_epochs": bad_epochs,
        "best_state": best_state,
        "accum": dict(accum),
        "rng": capture_rng(),
        "history": list(ctx.history),
        "fingerprint": ctx.splits.fingerprint,
        "class_names": list(ctx.splits.class_names),
        "done": False,
    }


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


def _eval_events(ctx: _Ctx, bundle: Path) -> dict[str, Any]:
    import json

    path = bundle / "evaluation.json"
    if not path.is_file():
        return {}
    evaluation = json.loads(path.read_text(encoding="utf-8"))
    for role in ("teacher", "student"):
        for split, res in (evaluation.get(role) or {}).items():
            if isinstance(res, dict) and "metrics" in res:
                ctx.events.emit(
                    "eval",
                    stage=role,
                    split=split,
                    metrics=res["metrics"],
                    confusion_matrix=res.get("confusion_matrix"),
                    class_names=res.get("class_names"),
                )
    return evaluation


def _own_eval_events(ctx: _Ctx, model: nn.Module, stage: str) -> dict[str, Any]:
    """Metrics without a bundle (``output.export: false``): training.metrics on val (and test)."""
    from training.metrics import compute_metrics

    out = {}
    for split in ("val", "test"):
        if split not in ctx.loaders:
            continue
        res = evaluate(model, ctx.loaders[split], ctx.cfg.task, ctx.device, ctx.amp, ctx.channels_last)
        m = compute_metrics(
            res["targets"],
            res["probs"],
            ctx.splits.class_names,
            ctx.cfg.task,
            n_boot=ctx.cfg.output.bootstrap,
        )
        ctx.events.emit(
            "eval",
            stage=stage,
            split=split,
            metrics=m["metrics"],
            confusion_matrix=m.get("confusion_matrix"),
            class_names=ctx.splits.class_names,
        )
        out[split] = m
    return out


def run(cfg: RunConfig, events: EventWriter, resume: bool = False) -> RunResult:
    """Train (teacher, then student), checkpoint, and export the bundle. See the module docstring."""
    t0 = time.time()
    out = Path(cfg.output.dir)
    ckpt_dir = out / "checkpoints"
    stop = StopMonitor(out / STOP_FILE)
    dist = ddp.DistEnv()
    ctx: _Ctx | None = None
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
        if resume and finished.is_file():
            done = _finished_run(finished, cfg, events, dist, t0)
            if done is not None:
                return done
        if dist.is_main and finished.exists():
            finished.unlink()
        if resume:
            if last.is_file():
                resume_state = load_checkpoint(last)
                events.run_id = str(resume_state.get("run_id") or events.run_id)
            elif dist.is_main:
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
        if dist.is_main:
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
                stages=list(stage_steps),
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
        ctx = _Ctx(
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
                tc.arch, k, c, tc.dropout, tc.weights, role="teacher", freeze=tc.freeze
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
            sc.arch, k, c, sc.dropout, sc.weights, role="student", freeze=sc.freeze
        ).to(device)
        combiner = build_combiner(cfg.kd, cfg.task, cfg.task_weight(), student, teacher, c, pre.input_size)
        combiner.to(device)
        student = train_stage(ctx, "student", student, combiner, cfg.optim, teacher)

        # ---- export -------------------------------------------------------------------------
        bundle = None
        metrics: dict[str, Any] = {}
        complexity: dict[str, Any] = {}
        if dist.is_main:
            student_cpu = student.float().to("cpu").eval().to(memory_format=torch.contiguous_format)
            teacher_cpu = (
                teacher.float().to("cpu").eval().to(memory_format=torch.contiguous_format)
                if teacher is not None
                else None
            )
            complexity = {"student_params": count_parameters(student_cpu)}
            if teacher_cpu is not None:
                complexity["teacher_params"] = count_parameters(teacher_cpu)
            if cfg.output.export:
                from training.export import export_bundle

                bundle = export_bundle(
                    out / "bundle",
                    name=cfg.output.name,
                    task=cfg.task,
                    class_names=splits.class_names,
                    preprocessing=pre,
                    student=student_cpu,
                    student_arch=sc.arch,
                    teacher=teacher_cpu,
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
                    threads=cfg.runtime.threads or torch.get_num_threads(),
                    n_boot=cfg.output.bootstrap,
                    latency_runs=cfg.output.latency_runs,
                )
                _eval_events(ctx, Path(bundle))
                metrics, complexity = _bundle_summary(Path(bundle), complexity)
            else:
                own = _own_eval_events(ctx, student_cpu, "student")
                split = "test" if "test" in own else "val"
                metrics = {k_: v for k_, v in own[split]["metrics"].items()} if own else {}
            events.emit(
                "run_end",
                bundle=str(bundle) if bundle else None,
                metrics=metrics,
                elapsed_s=time.time() - t0,
                complexity=complexity,
            )
            _write_finished(finished, cfg, bundle, metrics, complexity, time.time() - t0, events.run_id)
        ddp.barrier(dist)
        return RunResult(
            "completed",
            out,
            Path(bundle) if bundle else None,
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


def _write_finished(path: Path, cfg: RunConfig, bundle: Path | str | None, metrics: dict[str, Any],
                    complexity: dict[str, Any], elapsed_s: float, run_id: str) -> None:
    import json

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


def _finished_run(path: Path, cfg: RunConfig, events: EventWriter, dist: Any, t0: float) -> RunResult | None:
    """``--resume`` of a run that already completed with this same configuration: say so, emit
    ``run_end`` again, return at once. None (resume normally) when the record is unreadable, its bundle
    is gone, or the configuration changed (e.g. more epochs: the resume continues training)."""
    import json

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
    import json

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


def iter_events_file(path: Path) -> Iterator[dict[str, Any]]:
    """Parsed events of a run's ``events.jsonl`` (helper for tests and tools)."""
    from kdviewer.events import parse_event

    with open(path, encoding="utf-8") as fh:
        for line in fh:
            ev = parse_event(line)
            if ev is not None:
                yield ev


__all__ = [
    "STOP_FILE",
    "RunResult",
    "evaluate",
    "iter_events_file",
    "run",
    "select_device",
    "spec_of",
    "train_stage",
]
