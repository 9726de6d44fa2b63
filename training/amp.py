"""Mixed precision for ``runtime.amp: auto``: decided by timing both on this machine, not by CPU flags.

Whether bf16 autocast (with channels_last) makes a training step faster on a CPU depends on the CPU *and*
the network: on a 2-core AMD EPYC without AMX (avx512_bf16 only) a ResNet-18 step at 128-224 px was
2.0-2.3x faster in bf16 + channels_last, while on an Intel Xeon with AMX an EfficientNet-Lite (depthwise
convolutions) was slower in bf16. No flag in ``/proc/cpuinfo`` predicts both, so on a CPU ``auto`` runs
a short probe: a few forward + backward steps of the configured student at the configured input size,
in fp32 (contiguous) and in bf16 autocast (channels_last unless ``runtime.channels_last: off``),
alternated so a change in the machine's load hits both, and keeps bf16 only when it is clearly faster
(``BF16_MIN_GAIN``). The answer is cached (one taken on a busy machine only until a calm run, `busy_load`) in
a small JSON file (``$KDVIEWER_CACHE`` or ``$XDG_CACHE_HOME``/``~/.cache`` + ``kdviewer/amp_probe.json``)
keyed by CPU model name, torch version, machine architecture, thread count, network, channels, input
size and probe batch, so a machine pays for the probe once per configuration.

Elsewhere: an explicit ``amp`` (off / bf16 / fp16) is used as given without probing; on CUDA ``auto``
is bf16 where the GPU supports it, else fp16; on MPS ``auto`` is off. ``channels_last: auto`` follows
the decision (on for CUDA, on for CPU bf16). Under DDP on a CPU rank 0 probes and the other ranks take
its answer (one probe, not one per rank competing for the same cores).

Every decision comes with a one-line ``message`` (what was measured and what was chosen) that the
engine emits as a ``log`` event.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: bf16 is kept only when its step takes at most this fraction of the fp32 step (a small gain is not
#: worth the coarser arithmetic, and it is within the noise of a busy machine).
BF16_MIN_GAIN = 0.9
#: Probe batch: the configured batch, capped (the ratio settles at a few images; time does not).
PROBE_MAX_BATCH = 16
#: Wall-clock budget of the probe (warm-up included); each variant gets at least ``PROBE_MIN_STEPS``.
PROBE_BUDGET_S = 3.0
PROBE_MIN_STEPS = 2
PROBE_MAX_STEPS = 5
CACHE_VERSION = 1


@dataclass
class AmpDecision:
    """The autocast dtype (None: fp32), whether inputs/models go channels_last, and why."""

    dtype: torch.dtype | None
    channels_last: bool
    source: str  # "explicit" | "cuda" | "mps" | "probe" | "cache" | "fallback"
    message: str
    measured: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return "off" if self.dtype is None else str(self.dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------- cache


def cache_file() -> Path:
    """``$KDVIEWER_CACHE``/amp_probe.json, else ``$XDG_CACHE_HOME`` (or ~/.cache)/kdviewer/amp_probe.json."""
    env = os.environ.get("KDVIEWER_CACHE")
    if env:
        return Path(env).expanduser() / "amp_probe.json"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "kdviewer" / "amp_probe.json"


def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cache_key(arch: str, channels: int, input_size: int, batch: int, channels_last: bool) -> str:
    parts = [
        cpu_model_name(),
        f"torch {torch.__version__}",
        platform.machine(),
        f"{torch.get_num_threads()} threads",
        arch,
        f"{channels}ch",
        f"{input_size}px",
        f"batch {batch}",
        "channels_last" if channels_last else "contiguous",
    ]
    return " | ".join(parts)


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    entries = _read_cache(path)
    entries[key] = entry
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not stop a run: the probe just runs again next time
        log.warning("could not cache the amp probe in %s: %s", path, exc)
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- probe


def _step_time(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None
) -> float:
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False):
        out = model(x)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        loss = nn.functional.cross_entropy(logits.float(), y)
    loss.backward()
    return time.perf_counter() - t


def probe_cpu(
    model: nn.Module,
    channels: int,
    input_size: int,
    batch: int,
    channels_last: bool = True,
    budget_s: float = PROBE_BUDGET_S,
) -> dict[str, Any]:
    """Time a forward + backward step of ``model`` in fp32 (contiguous) and in bf16 autocast
    (``channels_last`` if asked) on random inputs; returns the best step time of each in ms.

    One untimed step of each first (oneDNN builds its kernels there), then the two alternate — fp32,
    bf16, bf16, fp32, ... — until each had ``PROBE_MIN_STEPS`` and ``budget_s`` is spent (at most
    ``PROBE_MAX_STEPS`` each). The minimum is the least disturbed by other processes. The model's
    gradients are cleared afterwards and its memory format restored; its weights are not changed.
    """
    was_training = model.training
    model.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, input_size, input_size, generator=g)
    y = torch.zeros(batch, dtype=torch.long)
    x_cl = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    # batch-norm running statistics move during the probe: keep and restore them
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}

    def fp32() -> float:
        model.to(memory_format=torch.contiguous_format)
        return _step_time(model, x, y, None)

    def bf16() -> float:
        if channels_last:
            model.to(memory_format=torch.channels_last)
        return _step_time(model, x_cl, y, torch.bfloat16)

    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    t_start = time.perf_counter()
    try:
        warm = {"fp32": fp32(), "bf16": bf16()}
        i = 0
        while True:
            pair = ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")
            for name in pair:
                times[name].append(fp32() if name == "fp32" else bf16())
            i += 1
            n = min(len(v) for v in times.values())
            if n >= PROBE_MAX_STEPS or (n >= PROBE_MIN_STEPS and time.perf_counter() - t_start > budget_s):
                break
    finally:
        model.zero_grad(set_to_none=True)
        model.to(memory_format=torch.contiguous_format)
        with torch.no_grad():
            state = model.state_dict()
            for k, v in buffers.items():
                state[k].copy_(v)
        model.train(was_training)
    return {
        "fp32_ms": 1000 * min(times["fp32"]),
        "bf16_ms": 1000 * min(times["bf16"]),
        "steps": len(times["fp32"]),
        "warmup_ms": {k: 1000 * v for k, v in warm.items()},
        "probe_s": time.perf_counter() - t_start,
    }


def machine_load() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def busy_load() -> float:
    """Above this load a probe's answer is kept only until a calm run measures again: on a 2-core Xeon
    with AMX under a load of ~15, bf16 steps measured 1.5x *slower* than fp32 (every extra cast waits
    for the busy cores) while on the idle machine they are 2.5x faster — a busy moment must not decide
    for good, nor should every run on a busy machine pay for a probe that takes minutes there."""
    return (os.cpu_count() or 1) + 1.0


def _decide(measured: dict[str, Any]) -> bool:
    return measured["bf16_ms"] <= BF16_MIN_GAIN * measured["fp32_ms"]


def _cpu_auto(
    arch: str,
    channels: int,
    input_size: int,
    batch_size: int,
    channels_last_pref: str,
    model_factory: Any,
    use_cache: bool,
) -> AmpDecision:
    batch = max(1, min(batch_size, PROBE_MAX_BATCH))
    cl = channels_last_pref != "off"
    key = cache_key(arch, channels, input_size, batch, cl)
    path = cache_file()
    entry = _read_cache(path).get(key) if use_cache else None
    load = machine_load()
    busy_now = load is not None and load > busy_load()
    usable = isinstance(entry, dict) and {"fp32_ms", "bf16_ms"} <= set(entry)
    # a measurement taken on a busy machine stands in while it stays busy; a calm moment measures again
    if usable and entry.get("busy") and not busy_now:
        usable = False
    source = "cache"
    if not usable:
        try:
            model = model_factory()
            measured = probe_cpu(model, channels, input_size, batch, channels_last=cl)
        except Exception as exc:  # e.g. an op without a bf16 CPU kernel: fp32 is always right
            msg = f"amp auto: bf16 probe of {arch} failed ({type(exc).__name__}: {exc}); using fp32"
            log.info(msg)
            return AmpDecision(None, channels_last_pref == "on", "fallback", msg)
        entry = {**measured, "decided": "bf16" if _decide(measured) else "off", "at": time.time(),
                 "load": load, "busy": busy_now}
        if use_cache:
            _write_cache(path, key, entry)
        source = "probe"
    assert isinstance(entry, dict)
    bf16 = _decide(entry)
    dtype = torch.bfloat16 if bf16 else None
    channels_last = bf16 if channels_last_pref == "auto" else channels_last_pref == "on"
    if source == "cache":
        how = f"cached measurement from {path}"
    else:
        how = f"measured {entry.get('steps', '?')} steps each in {entry.get('probe_s', 0):.1f} s"
    if entry.get("busy"):
        how += (f"; taken at load {entry.get('load') or 0:.1f} on {os.cpu_count()} cores: "
                "measured again when the machine is calm")
    variant = "bf16 + channels_last" if cl else "bf16"
    msg = (
        f"amp auto on {cpu_model_name()}: {arch} at {input_size} px, batch {batch}: fp32 "
        f"{entry['fp32_ms']:.0f} ms vs {variant} {entry['bf16_ms']:.0f} ms per step "
        f"({entry['fp32_ms'] / max(entry['bf16_ms'], 1e-9):.2f}x; {how}) -> "
        + ("bf16 autocast" if bf16 else "fp32")
        + (" + channels_last" if channels_last else "")
    )
    log.info(msg)
    return AmpDecision(dtype, channels_last, source, msg, dict(entry))


def resolve(
    pref: str,
    device: torch.device,
    *,
    arch: str,
    channels: int,
    input_size: int,
    batch_size: int,
    channels_last: str = "auto",
    model_factory: Any = None,
    use_cache: bool = True,
) -> AmpDecision:
    """The autocast dtype and memory format for ``runtime.amp`` = ``pref`` on ``device``.

    ``model_factory()`` builds the network the probe times (default: ``arch`` with random weights, two
    classes); it is only called when a CPU probe actually runs.
    """

    def fmt(default_cl: bool) -> bool:
        return default_cl if channels_last == "auto" else channels_last == "on"

    if pref != "auto":
        dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[pref]
        cl = fmt(device.type == "cuda" or (device.type == "cpu" and dtype == torch.bfloat16))
        return AmpDecision(dtype, cl, "explicit", f"amp {pref} (set explicitly): no probe")
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        name = str(dtype).replace("torch.", "")
        return AmpDecision(dtype, fmt(True), "cuda", f"amp auto on CUDA: {name} autocast")
    if device.type != "cpu":
        return AmpDecision(None, fmt(False), device.type, f"amp auto on {device.type}: fp32")
    if model_factory is None:

        def model_factory() -> nn.Module:
            from training.zoo import create_model

            return create_model(arch, 2, channels, 0.0, "none", role="student")

    return _cpu_auto(arch, channels, input_size, batch_size, channels_last, model_factory, use_cache)


def gpu_facts(device: torch.device) -> dict[str, Any] | None:
    """Name and total memory (MB) of a CUDA device, for ``run_start`` (the panel shows memory use
    against it); None elsewhere."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "memory_mb": props.total_memory // 2**20}


def resolve_for_run(cfg: Any, device: torch.device) -> AmpDecision:
    """`resolve` for a run's configuration (the student network, input size and batch it trains with).

    Under DDP (``torch.distributed`` initialised) on a CPU rank 0 probes and broadcasts its decision.
    """
    import torch.distributed as dist

    def decide() -> AmpDecision:
        return resolve(
            cfg.runtime.amp,
            device,
            arch=cfg.student.arch,
            channels=cfg.preprocessing.channels,
            input_size=cfg.preprocessing.input_size,
            batch_size=cfg.optim.batch_size,
            channels_last=cfg.runtime.channels_last,
        )

    probes = cfg.runtime.amp == "auto" and device.type == "cpu"
    if not (probes and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return decide()  # no probe (every rank gets the same answer) or a single process
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        d = decide()
        box[0] = (d.name, d.channels_last, d.source, d.message, d.measured)
    dist.broadcast_object_list(box, src=0)
    name, cl, source, message, measured = box[0]
    dtype = {"off": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    return AmpDecision(dtype, cl, source, message, measured)


__all__ = [
    "AmpDecision", "cache_file", "cpu_model_name", "gpu_facts", "probe_cpu", "resolve", "resolve_for_run"
]
