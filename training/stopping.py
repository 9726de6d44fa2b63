"""Graceful stop of a run: SIGINT / SIGTERM handlers and the ``STOP`` file in ``output.dir``.

`StopMonitor.requested` is polled once per training step; a stage that sees it writes ``last.pt`` and
raises `StopRequested`, which `training.engine.run` turns into a ``stopped`` event (CLI exit code 3).
A second SIGINT aborts at once (KeyboardInterrupt). Work without steps (the export) runs inside
`StopMonitor.interrupting`, where a stop request raises `StopNow` at once.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

#: Code an asynchronous exception must not unwind through: torch.export / dynamo / the ONNX exporter
#: install global hooks and modes (an interrupted ``torch.onnx.export`` hung the interpreter at exit).
_FRAGILE = (
    "/torch/onnx/", "/torch/_dynamo/", "/torch/export/", "/torch/_export/", "/torch/fx/",
    "/torch/_subclasses/", "/torch/_functorch/", "/torch/_higher_order_ops/", "/torch/_prims",
    "/onnxscript/", "/onnx_ir/", "/onnx/",
    "<frozen importlib",  # a module half imported stays broken (and hung the interpreter at exit)
)


def _in_fragile_code(frame: FrameType | None) -> bool:
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if any(part in name for part in _FRAGILE):
            return True
        frame = frame.f_back
    return False

STOP_FILE = "STOP"


class StopNow(BaseException):
    """Raised inside `StopMonitor.interrupting` (the export) as soon as a stop is requested.

    A BaseException, like KeyboardInterrupt: the export's ``except Exception`` fallbacks (INT8,
    complexity, report are optional) must not swallow it."""


class StopRequested(Exception):
    """Internal: unwinds a stage after a graceful stop was checkpointed."""

    def __init__(self, checkpoint: Path, stage: str, epoch: int) -> None:
        super().__init__(str(checkpoint))
        self.checkpoint, self.stage, self.epoch = checkpoint, stage, epoch



class StopMonitor:
    """SIGINT/SIGTERM handlers + the STOP file; ``requested`` is polled once per training step."""

    def __init__(self, stop_file: Path) -> None:
        self.stop_file = stop_file
        self.flag = False
        self.reason = ""
        self._previous: dict[int, Any] = {}
        self._interrupt = False  # inside `interrupting`: a stop raises StopNow at once
        self._retrying = False  # a re-delivered stop is not a second Ctrl-C

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

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.flag and signum == signal.SIGINT and not self._retrying:
            self.uninstall()
            raise KeyboardInterrupt  # second Ctrl-C: abort now
        if not self.flag:  # (the watcher re-delivers a pending stop as SIGTERM: keep the first reason)
            self.reason = signal.Signals(signum).name
        self.flag = True
        if self._interrupt and not _in_fragile_code(frame):
            self._interrupt = False
            raise StopNow(self.reason)
        # inside torch's export machinery (or outside `interrupting`): the watcher thread re-delivers
        # the stop every poll until the main thread is somewhere an exception can safely unwind

    @property
    def requested(self) -> bool:
        if not self.flag and self.stop_file.exists():  # a stat() per step: microseconds
            self.flag = True
            self.reason = "STOP file"
        return self.flag

    @contextlib.contextmanager
    def interrupting(self, poll_s: float = 0.25) -> Iterator[None]:
        """A block that a stop request ends at once (raising `StopNow`) instead of at the next poll.

        For work without steps to poll between (the export: ONNX export, INT8 calibration, bootstrap,
        latency runs). SIGINT/SIGTERM raise from the signal handler; the STOP file is watched by a
        thread that interrupts the main thread the same way. A signal that lands inside torch's
        tracing/export machinery (`_in_fragile_code`: unwinding there left the interpreter hanging at
        exit) is re-delivered every ``poll_s`` until it lands elsewhere. Off the main thread (no
        handlers) only the polls of ``requested`` between the block's parts apply.
        """
        if self.requested:
            raise StopNow(self.reason)
        done = threading.Event()
        watcher = None
        if self._previous and threading.current_thread() is threading.main_thread():

            def watch() -> None:
                while not done.wait(poll_s):
                    if not self.flag and self.stop_file.exists():
                        self.flag, self.reason = True, "STOP file"
                    if self.flag and self._interrupt:
                        self._retrying = True
                        _thread.interrupt_main(signal.SIGTERM)  # runs _handler in the main thread

            watcher = threading.Thread(target=watch, name="kd-stop-watch", daemon=True)
        self._interrupt = True
        if watcher is not None:
            watcher.start()
        try:
            yield
        finally:
            self._interrupt = False
            self._retrying = False
            done.set()
            if watcher is not None:
                watcher.join(timeout=1.0)

