"""Qt wrappers around the training engine's command line: run, check, device probe.

The training panel never imports ``training`` (nor torch): it talks to the engine only through
``python -m training ...`` subprocesses started with `QProcess`, and reads the JSON-lines event stream
with `kdviewer.events.parse_event`. Everything here is asynchronous: nothing waits on a process in the
GUI thread; results come back as Qt signals.
"""

from __future__ import annotations

import json
import os
import sys
from collections import deque
from pathlib import Path
from typing import Any

from PySide6.QtCore import QCoreApplication, QObject, QProcess, QProcessEnvironment, QTimer, Signal

from kdviewer.events import parse_event

#: Seconds to wait after writing the STOP file before asking the OS to terminate the engine, and
#: after that before killing it.
STOP_TERMINATE_AFTER_S = 90.0
STOP_KILL_AFTER_S = 30.0


def python_executable() -> str:
    """The interpreter used for engine subprocesses (``KDVIEWER_PYTHON`` overrides, for frozen apps)."""
    return os.environ.get("KDVIEWER_PYTHON") or sys.executable


def _environment() -> QProcessEnvironment:
    env = QProcessEnvironment.systemEnvironment()
    env.insert("PYTHONUNBUFFERED", "1")
    env.insert("PYTHONIOENCODING", "utf-8")
    # Make `python -m training` importable from a source checkout even when not pip-installed.
    root = str(Path(__file__).resolve().parents[2])
    old = env.value("PYTHONPATH", "")
    if (Path(root) / "training").is_dir() and root not in old.split(os.pathsep):
        env.insert("PYTHONPATH", root + (os.pathsep + old if old else ""))
    return env


class _LineReader:
    """Splits a byte stream into text lines, keeping an incomplete tail for the next chunk."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[str]:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        return [ln.decode("utf-8", errors="replace").rstrip("\r") for ln in lines]

    def flush(self) -> list[str]:
        tail, self._buf = self._buf, b""
        text = tail.decode("utf-8", errors="replace").strip()
        return [text] if text else []


class EngineProcess(QObject):
    """One ``python -m training run CONFIG --events -`` process.

    Signals: ``event(dict)`` per parsed stdout line, ``output(str)`` for stdout lines that are not
    events, ``stderr(str)`` per stderr line, ``finished(int, bool)`` (exit code, crashed),
    ``started()``.

    Stop is graceful: `stop` writes a ``STOP`` file into the run's output folder (the engine checks it
    between steps, finishes the step and checkpoints; this also works on Windows), and only if the
    process is still alive after ``terminate_after_s`` does it call `QProcess.terminate`
    (SIGTERM, also handled gracefully by the engine), then `QProcess.kill`.
    """

    event = Signal(dict)
    output = Signal(str)
    stderr = Signal(str)
    started = Signal()
    finished = Signal(int, bool)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._proc: QProcess | None = None
        self._out = _LineReader()
        self._err = _LineReader()
        self.stderr_tail: deque[str] = deque(maxlen=60)
        self.output_dir: Path | None = None
        self.stop_requested = False
        self.terminate_after_s = STOP_TERMINATE_AFTER_S
        self.kill_after_s = STOP_KILL_AFTER_S
        self._stop_timer = QTimer(self)
        self._stop_timer.setSingleShot(True)
        self._stop_timer.timeout.connect(self._escalate)
        self._escalation = 0

    # -- state ---------------------------------------------------------------------------------
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.state() != QProcess.ProcessState.NotRunning

    def pid(self) -> int:
        return int(self._proc.processId()) if self._proc is not None else 0

    # -- control -------------------------------------------------------------------------------
    def start(
        self,
        config_path: str | Path,
        *,
        resume: bool = False,
        overrides: list[str] | None = None,
        output_dir: str | Path | None = None,
    ) -> list[str]:
        """Start the engine; returns the argument list (for the log)."""
        if self.is_running():
            raise RuntimeError("a training run is already active")
        args = ["-m", "training", "run", str(config_path), "--events", "-"]
        if resume:
            args.append("--resume")
        for item in overrides or []:
            args += ["--set", item]
        self.output_dir = Path(output_dir) if output_dir else None
        self.stop_requested = False
        self._escalation = 0
        self.stderr_tail.clear()
        self._out, self._err = _LineReader(), _LineReader()
        if self.output_dir is not None:
            (self.output_dir / "STOP").unlink(missing_ok=True)
        proc = QProcess(self)
        proc.setProcessEnvironment(_environment())
        proc.readyReadStandardOutput.connect(self._read_stdout)
        proc.readyReadStandardError.connect(self._read_stderr)
        proc.finished.connect(self._on_finished)
        proc.errorOccurred.connect(self._on_error)
        proc.started.connect(self.started)
        self._proc = proc
        proc.start(python_executable(), args)
        return [python_executable(), *args]

    def set_output_dir(self, path: str | Path) -> None:
        """Called when the engine's ``run_start`` event names the run folder (where STOP goes)."""
        self.output_dir = Path(path)
        if self.stop_requested:
            self._write_stop_file()

    def stop(self) -> None:
        """Ask the engine to stop gracefully (STOP file; SIGTERM after a timeout; kill after another)."""
        if not self.is_running():
            return
        self.stop_requested = True
        if not self._write_stop_file():
            # No run folder known yet: fall back to the signal straight away.
            self._escalation = 1
            self._proc.terminate()  # type: ignore[union-attr]
            self._stop_timer.start(int(self.kill_after_s * 1000))
            return
        self._stop_timer.start(int(self.terminate_after_s * 1000))

    def kill(self) -> None:
        if self.is_running():
            self._proc.kill()  # type: ignore[union-attr]

    def _write_stop_file(self) -> bool:
        if self.output_dir is None:
            return False
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "STOP").write_text("stop requested by kdviewer\n", encoding="utf-8")
        except OSError:
            return False
        return True

    def _escalate(self) -> None:
        if not self.is_running():
            return
        if self._escalation == 0:
            self._escalation = 1
            self._proc.terminate()  # type: ignore[union-attr]
            self._stop_timer.start(int(self.kill_after_s * 1000))
        else:
            self._proc.kill()  # type: ignore[union-attr]

    # -- I/O -----------------------------------------------------------------------------------
    def _handle_stdout_line(self, line: str) -> None:
        record = parse_event(line)
        if record is None:
            if line.strip():
                self.output.emit(line)
            return
        if record.get("event") == "run_start" and record.get("output_dir"):
            self.set_output_dir(record["output_dir"])
        self.event.emit(record)

    def _read_stdout(self) -> None:
        if self._proc is None:
            return
        for line in self._out.feed(bytes(self._proc.readAllStandardOutput().data())):
            self._handle_stdout_line(line)

    def _read_stderr(self) -> None:
        if self._proc is None:
            return
        for line in self._err.feed(bytes(self._proc.readAllStandardError().data())):
            self.stderr_tail.append(line)
            self.stderr.emit(line)

    def _on_finished(self, code: int, status: QProcess.ExitStatus) -> None:
        self._read_stdout()
        self._read_stderr()
        for line in self._out.flush():
            self._handle_stdout_line(line)
        for line in self._err.flush():
            self.stderr_tail.append(line)
            self.stderr.emit(line)
        self._stop_timer.stop()
        if self.output_dir is not None:
            (self.output_dir / "STOP").unlink(missing_ok=True)
        self.finished.emit(int(code), status == QProcess.ExitStatus.CrashExit)

    def _on_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            msg = f"could not start {python_executable()} -m training: {self._proc.errorString()}"  # type: ignore[union-attr]
            self.stderr_tail.append(msg)
            self.stderr.emit(msg)
            self.finished.emit(-1, True)


class _OneShot(QObject):
    """Runs ``python ARGS`` once, collects stdout/stderr, emits ``done(code, stdout, stderr)``."""

    done = Signal(int, str, str)

    def __init__(self, args: list[str], parent: QObject | None = None, timeout_s: float = 120.0) -> None:
        super().__init__(parent)
        self._proc = QProcess(self)
        self._proc.setProcessEnvironment(_environment())
        self._proc.finished.connect(self._finished)
        self._proc.errorOccurred.connect(self._error)
        self._args = args
        self._emitted = False
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._timeout)
        self._timeout_s = timeout_s
        app = QCoreApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.kill)

    def kill(self) -> None:
        """End the helper process (e.g. when the app quits before it answered)."""
        if self.is_running():
            self._emitted = True
            self._proc.kill()
            self._proc.waitForFinished(2000)

    def start(self) -> None:
        self._proc.start(python_executable(), self._args)
        self._timer.start(int(self._timeout_s * 1000))

    def is_running(self) -> bool:
        return self._proc.state() != QProcess.ProcessState.NotRunning

    def _emit(self, code: int, out: str, err: str) -> None:
        if self._emitted:
            return
        self._emitted = True
        self._timer.stop()
        self.done.emit(code, out, err)

    def _finished(self, code: int, _status: QProcess.ExitStatus) -> None:
        out = bytes(self._proc.readAllStandardOutput().data()).decode("utf-8", errors="replace")
        err = bytes(self._proc.readAllStandardError().data()).decode("utf-8", errors="replace")
        self._emit(int(code), out, err)

    def _error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            self._emit(-1, "", self._proc.errorString())

    def _timeout(self) -> None:
        if self.is_running():
            self._proc.kill()
        self._emit(-2, "", f"timed out after {self._timeout_s:.0f} s")


class ConfigCheck(QObject):
    """``python -m training check CONFIG --json --data`` → ``checked(ok, errors)``.

    The same validation as a run's start, data discovery included (images and classes found);
    ``errors`` is a list of ``{"loc": [...], "msg": str}``; a process failure becomes one error with an
    empty ``loc`` carrying the stderr tail. ``summary`` holds what was found in the data (labels with
    their counts, the classes used, the split sizes) once ``checked`` fired.
    """

    checked = Signal(bool, list)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._job: _OneShot | None = None
        self.summary: dict[str, Any] = {}

    def is_running(self) -> bool:
        return self._job is not None and self._job.is_running()

    def kill(self) -> None:
        if self._job is not None:
            self._job.kill()

    def start(self, config_path: str | Path) -> None:
        self.summary = {}
        self._job = _OneShot(["-m", "training", "check", str(config_path), "--json", "--data"], self)
        self._job.done.connect(self._done)
        self._job.start()

    def _done(self, code: int, out: str, err: str) -> None:
        errors = parse_check_output(out, err, code)
        self.summary = parse_check_summary(out)
        self.checked.emit(code == 0 and not errors, errors)


def parse_check_summary(out: str) -> dict[str, Any]:
    """The ``data`` part of ``check --json --data`` output ({} when absent)."""
    for candidate in (out.strip(), *reversed(out.strip().splitlines())):
        try:
            payload = json.loads(candidate)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(payload, dict) and isinstance(payload.get("data"), dict):
            return payload["data"]
        return {}
    return {}


def parse_check_output(out: str, err: str, code: int) -> list[dict[str, Any]]:
    """Turn ``check --json`` output into ``[{"loc": [...], "msg": str}]`` (robust to extra prints)."""
    payload: Any = None
    text = out.strip()
    for candidate in (text, *reversed(text.splitlines())):
        try:
            payload = json.loads(candidate)
            break
        except (json.JSONDecodeError, ValueError):
            continue
    if isinstance(payload, dict):
        payload = payload.get("errors", [] if payload.get("ok", code == 0) else payload)
    errors: list[dict[str, Any]] = []
    if isinstance(payload, list):
        for item in payload:
            if isinstance(item, dict):
                loc = item.get("loc") or []
                if isinstance(loc, str):
                    loc = [p for p in loc.split(".") if p]
                errors.append({"loc": [str(p) for p in loc], "msg": str(item.get("msg", item))})
            else:
                errors.append({"loc": [], "msg": str(item)})
    if code != 0 and not errors:
        tail = "\n".join((err or out).strip().splitlines()[-8:])
        errors.append({"loc": [], "msg": tail or f"`training check` exited with code {code}"})
    return errors


DEVICE_PROBE = (
    "import json\n"
    "out = {'cuda': [], 'mps': False}\n"
    "try:\n"
    "    import torch\n"
    "    if torch.cuda.is_available():\n"
    "        for i in range(torch.cuda.device_count()):\n"
    "            p = torch.cuda.get_device_properties(i)\n"
    "            out['cuda'].append({'index': i, 'name': p.name, 'memory_mb': p.total_memory // 2**20})\n"
    "    mps = getattr(torch.backends, 'mps', None)\n"
    "    out['mps'] = bool(mps is not None and mps.is_available())\n"
    "except Exception as exc:\n"
    "    out['error'] = str(exc)\n"
    "print(json.dumps(out))\n"
)


class DeviceProbe(QObject):
    """Lists CUDA GPUs / MPS in a tiny background subprocess (the GUI process never imports torch).

    Emits ``found(list[tuple[label, value]])`` made by `device_choices`: always starting with the
    "auto" entry and ending with ("CPU", "cpu").
    """

    found = Signal(list)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._job = _OneShot(["-c", DEVICE_PROBE], self, timeout_s=60.0)
        self._job.done.connect(self._done)

    def start(self) -> None:
        self._job.start()

    def kill(self) -> None:
        self._job.kill()

    def _done(self, code: int, out: str, _err: str) -> None:
        try:
            info = json.loads(out.strip().splitlines()[-1]) if code == 0 and out.strip() else {}
        except (json.JSONDecodeError, IndexError):
            info = {}
        self.found.emit(device_choices(info if isinstance(info, dict) else {}))


def device_choices(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The Device list for what the probe found (``{"cuda": [{"index", "name", "memory_mb"}], "mps": bool}``).

    ("Auto (...)", "auto") first — its label says what auto will pick —, then each CUDA GPU by name and
    memory ("GPU 0: NVIDIA H200, 140 GB" -> ``cuda:0``), Apple's GPU ("mps"), and ("CPU", "cpu") last.
    A machine without a GPU gets Auto (CPU) and CPU only.
    """
    gpus: list[tuple[str, str]] = []
    for gpu in info.get("cuda") or []:
        if not isinstance(gpu, dict) or not isinstance(gpu.get("index"), int):
            continue
        mem = gpu.get("memory_mb")
        extra = f", {mem / 1024:.0f} GB" if isinstance(mem, (int, float)) and mem > 0 else ""
        gpus.append((f"GPU {gpu['index']}: {gpu.get('name') or 'CUDA'}{extra}", f"cuda:{gpu['index']}"))
    if info.get("mps"):
        gpus.append(("Apple GPU (MPS)", "mps"))
    auto = f"Auto ({gpus[0][0].split(',')[0]})" if gpus else "Auto (CPU)"
    return [(auto, "auto"), *gpus, ("CPU", "cpu")]
