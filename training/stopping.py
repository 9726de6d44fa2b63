"""Graceful stop of a run: SIGINT / SIGTERM handlers and the ``STOP`` file in ``output.dir``.

`StopMonitor.requested` is polled once per training step; a stage that sees it writes ``last.pt`` and
raises `StopRequested`, which `training.engine.run` turns into a ``stopped`` event (CLI exit code 3).
A second SIGINT aborts at once (KeyboardInterrupt).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Any

STOP_FILE = "STOP"


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

