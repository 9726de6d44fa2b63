"""Background work for the viewer: every load, inference and saliency job runs here, off the GUI thread.

`TaskRunner` owns thread pools: "io" (file loading, thumbnails; 2 threads), "model" (bundle loading
and prediction; 1 thread) and "saliency" (1 thread). Prediction and saliency of one case run in
parallel; `kdviewer.gui.analysis.model_lock` keeps two jobs from using one torch network at once.
Jobs are submitted on a *channel* ("load", "predict", "saliency", ...): a new job on a channel
supersedes the previous one — its token is cancelled, it is taken off the queue if it has not started,
and if it still finishes its result is dropped (stale-result dropping by generation number). Results
and errors come back to the GUI thread through queued Qt signals, so callbacks may touch widgets.

A job is ``fn(token) -> result``; long jobs call ``token.check()`` between steps to stop early.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import (
    QCoreApplication,
    QElapsedTimer,
    QEventLoop,
    QObject,
    QRunnable,
    QThreadPool,
    Signal,
    Slot,
)

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """Raised inside a job by `CancelToken.check` once the job has been superseded or cancelled."""


class CancelToken:
    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled()


@dataclass
class TaskError:
    """What an error callback receives: the exception, a one-line message and the traceback text."""

    channel: str
    exception: BaseException
    message: str
    details: str


class _Signals(QObject):
    done = Signal(str, int, object, float)  # channel, generation, result, seconds
    failed = Signal(str, int, object)  # channel, generation, TaskError
    dropped = Signal(str, int)  # channel, generation (cancelled before/while running)


class _Job(QRunnable):
    def __init__(
        self, channel: str, gen: int, fn: Callable[[CancelToken], Any], token: CancelToken, signals: _Signals
    ) -> None:
        super().__init__()
        self.setAutoDelete(False)  # the runner keeps a reference until the job reports back
        self.channel, self.gen, self.fn, self.token, self.signals = channel, gen, fn, token, signals

    def run(self) -> None:
        if self.token.cancelled or self.fn is None:
            self.signals.dropped.emit(self.channel, self.gen)
            return
        t0 = time.perf_counter()
        try:
            result = self.fn(self.token)  # type: ignore[misc]
        except Cancelled:
            self.signals.dropped.emit(self.channel, self.gen)
        except BaseException as exc:
            err = TaskError(self.channel, exc, describe_error(exc), traceback.format_exc())
            self.signals.failed.emit(self.channel, self.gen, err)
        else:
            self.signals.done.emit(self.channel, self.gen, result, time.perf_counter() - t0)
        finally:
            self.fn = None  # the closure holds studies/models; Qt may keep this wrapper alive
            release_memory()


_libc: Any = None


def release_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps per-thread arenas of big image temporaries)."""
    global _libc
    if _libc is False or not sys.platform.startswith("linux"):
        return
    try:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        _libc = False


def describe_error(exc: BaseException) -> str:
    """A message a person can act on: our own errors speak for themselves, others get their type name."""
    from kdviewer.errors import KDViewerError

    text = str(exc).strip()
    if isinstance(exc, KDViewerError):
        return text or type(exc).__name__
    if isinstance(exc, MemoryError):
        return "Not enough memory for this image or model."
    if isinstance(exc, FileNotFoundError):
        return f"File not found: {exc.filename or text}"
    if isinstance(exc, PermissionError):
        return f"Permission denied: {exc.filename or text}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class TaskRunner(QObject):
    """Submits jobs per channel with supersede + stale-drop semantics; reports busy/idle."""

    busy_changed = Signal(bool)
    activity = Signal(str)  # human-readable description of what runs now ("" when idle)

    def __init__(self, parent: QObject | None = None, io_threads: int = 2) -> None:
        super().__init__(parent)
        self.pools = {"io": QThreadPool(self), "model": QThreadPool(self), "saliency": QThreadPool(self)}
        self.pools["io"].setMaxThreadCount(io_threads)
        self.pools["model"].setMaxThreadCount(1)
        self.pools["saliency"].setMaxThreadCount(1)
        self._gen: dict[str, int] = {}
        self._live: dict[tuple[str, int], tuple[_Job, str, Callable | None, Callable | None, str]] = {}
        self._signals = _Signals(self)
        self._signals.done.connect(self._on_done)
        self._signals.failed.connect(self._on_failed)
        self._signals.dropped.connect(self._on_dropped)
        self.last_seconds: dict[str, float] = {}

    # -- submitting ----------------------------------------------------------------------------------

    def submit(
        self,
        channel: str,
        fn: Callable[[CancelToken], Any],
        on_done: Callable[[Any], None] | None = None,
        on_error: Callable[[TaskError], None] | None = None,
        pool: str = "model",
        description: str = "",
    ) -> int:
        """Run ``fn(token)`` in ``pool``; supersedes the channel's previous job. Returns the generation."""
        self.cancel(channel)
        gen = self._gen.get(channel, 0) + 1
        self._gen[channel] = gen
        token = CancelToken()
        job = _Job(channel, gen, fn, token, self._signals)
        was_busy = self.busy
        self._live[(channel, gen)] = (job, pool, on_done, on_error, description or channel)
        self.pools[pool].start(job)
        if not was_busy:
            self.busy_changed.emit(True)
        self._emit_activity()
        return gen

    def cancel(self, channel: str | None = None) -> None:
        """Cancel the running/queued job(s) of ``channel`` (all channels when None)."""
        for (ch, gen), (job, pool, *_rest) in list(self._live.items()):
            if channel is not None and ch != channel:
                continue
            job.token.cancel()
            if self.pools[pool].tryTake(job):
                self._finish(ch, gen)
        if channel is None:
            for ch in self._gen:
                self._gen[ch] += 1  # anything still in flight is now stale
        elif channel in self._gen:
            self._gen[channel] += 1

    def generation(self, channel: str) -> int:
        return self._gen.get(channel, 0)

    @property
    def busy(self) -> bool:
        return bool(self._live)

    def pending(self, channel: str | None = None) -> int:
        return sum(1 for (ch, _g) in self._live if channel is None or ch == channel)

    def wait_idle(self, timeout_s: float = 60.0) -> bool:
        """Process events until no job is live (for render / tests / benchmarks). True when idle."""
        timer = QElapsedTimer()
        timer.start()
        app = QCoreApplication.instance()
        while self.busy:
            if timer.elapsed() > timeout_s * 1000:
                return False
            if app is not None:
                app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 20)
            time.sleep(0.002)
        if app is not None:
            app.processEvents()
        return True

    def shutdown(self, timeout_ms: int = 5000) -> None:
        self.cancel()
        for pool in self.pools.values():
            pool.clear()
            pool.waitForDone(timeout_ms)

    # -- results (GUI thread) ------------------------------------------------------------------------

    def _finish(self, channel: str, gen: int) -> tuple | None:
        entry = self._live.pop((channel, gen), None)
        if entry is not None:
            entry[0].fn = None
        if not self._live:
            self.busy_changed.emit(False)
        self._emit_activity()
        return entry

    def _emit_activity(self) -> None:
        names = [e[4] for e in self._live.values() if not e[0].token.cancelled]
        self.activity.emit(", ".join(dict.fromkeys(names)))

    @Slot(str, int, object, float)
    def _on_done(self, channel: str, gen: int, result: object, seconds: float) -> None:
        entry = self._finish(channel, gen)
        if entry is None or gen != self._gen.get(channel):
            return  # stale: a newer request superseded this one
        self.last_seconds[channel] = seconds
        on_done = entry[2]
        if on_done is not None:
            try:
                on_done(result)
            except Exception:  # a painting bug must not take the app down
                log.exception("result handler for %s failed", channel)

    @Slot(str, int, object)
    def _on_failed(self, channel: str, gen: int, err: TaskError) -> None:
        entry = self._finish(channel, gen)
        if entry is None or gen != self._gen.get(channel):
            return
        from kdviewer.errors import KDViewerError

        if isinstance(err.exception, KDViewerError):  # an expected, explained failure (bad file...)
            log.info("%s failed: %s", channel, err.message)
        else:
            log.warning("%s failed: %s\n%s", channel, err.message, err.details)
        on_error = entry[3]
        if on_error is not None:
            try:
                on_error(err)
            except Exception:
                log.exception("error handler for %s failed", channel)

    @Slot(str, int)
    def _on_dropped(self, channel: str, gen: int) -> None:
        self._finish(channel, gen)
