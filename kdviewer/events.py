"""The training engine's event stream: one JSON object per line, the only thing the training panel reads.

Lives in kdviewer (no torch, no Qt) so that the engine (`training`, which may import kdviewer) writes it
and the GUI panel (which must not import `training`) parses it with the same code.

Schema version ``EVENTS_SCHEMA`` ("MAJOR.MINOR"). Every event carries::

    {"event": <type>, "schema": "1.0", "time": <unix seconds>, "run_id": <str>, ...}

Event types and their extra fields:

``run_start``   config (dict), device (str), gpu ({"name": str, "memory_mb": int}|null: the CUDA
                device), amp (str|null), world_size (int), output_dir (str),
                stages (list[str]), total_steps (int), resumed_from (str|null),
                dataset ({"train": n, "val": n, "test": n, "classes": [...]}), synthetic (bool)
``stage_start`` stage ("teacher" | "student" | "finetune" | "export"), epochs (int), steps_per_epoch (int);
                the export stage has epochs 0 and ``substages`` (list[str], in the order they run)
``progress``    stage, substage (str), index (int, 1-based), total (int), elapsed_s (float, since the
                stage started): a substage of a stage without steps (export) has started
``stage_end``   stage, elapsed_s (float), timings ({substage: seconds}, export only)
``step``        stage, epoch (int, 1-based), step (int, global within stage), lr (float),
                loss (float, total), components ({name: float}), images_per_s (float),
                eta_s (float|null), gpu_mem_mb (float|null: peak CUDA memory allocated so far, MB)
``epoch_end``   stage, epoch, train ({"loss": f, ...}), val ({"accuracy": f, "auc": f, "loss": f,...}),
                lr, best (bool), epoch_time_s
``eval``        stage, split ("val" | "test"), metrics ({name: {"value","ci_low","ci_high"}}),
                confusion_matrix (list[list[int]]), class_names
``checkpoint``  stage, epoch, path (str), reason ("epoch" | "stop" | "best")
``stopped``     stage, epoch, checkpoint (str): a graceful stop after SIGINT/SIGTERM/stop file
``run_end``     bundle (str|null), metrics (dict), elapsed_s, complexity (dict)
``error``       message (str), type (str), traceback (str), checkpoint (str|null)
``log``         level ("info" | "warning"), message (str)

Readers must ignore unknown event types and unknown fields (minor bumps add them). 1.1 added
``progress`` and ``stage_end``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import IO, Any

EVENTS_SCHEMA = "1.1"
EVENT_TYPES = (
    "run_start",
    "stage_start",
    "progress",
    "stage_end",
    "step",
    "epoch_end",
    "eval",
    "checkpoint",
    "stopped",
    "run_end",
    "error",
    "log",
)


def _clean(value: Any) -> Any:
    """Make a value JSON-safe: NaN/inf -> None, numpy/tensor scalars -> Python numbers, paths -> str."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class EventWriter:
    """Writes events to any number of sinks (stdout, a log file); flushes every line."""

    def __init__(self, run_id: str, sinks: list[IO[str]] | None = None) -> None:
        self.run_id = run_id
        self.sinks: list[IO[str]] = list(sinks or [])

    @classmethod
    def open(cls, run_id: str, target: str | None, log_file: Path | None = None) -> EventWriter:
        sinks: list[IO[str]] = []
        if target == "-":
            sinks.append(sys.stdout)
        elif target:
            sinks.append(open(target, "a", encoding="utf-8"))  # noqa: SIM115 - closed in close()
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            sinks.append(open(log_file, "a", encoding="utf-8"))  # noqa: SIM115
        return cls(run_id, sinks)

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        if event not in EVENT_TYPES:
            raise ValueError(f"unknown event type {event!r}")
        record = {"event": event, "schema": EVENTS_SCHEMA, "time": time.time(), "run_id": self.run_id}
        record.update(_clean(fields))
        line = json.dumps(record, separators=(",", ":"))
        for sink in self.sinks:
            sink.write(line + "\n")
            sink.flush()
        return record

    def close(self) -> None:
        for sink in self.sinks:
            if sink is not sys.stdout and sink is not sys.stderr:
                sink.close()


def parse_event(line: str) -> dict[str, Any] | None:
    """Parse one line of the stream; returns None for blank or non-JSON lines (e.g. stray prints)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or "event" not in record:
        return None
    major = str(record.get("schema", EVENTS_SCHEMA)).split(".")[0]
    if major != EVENTS_SCHEMA.split(".")[0]:
        return None
    return record
