"""Atomic, weights-only checkpoints and the RNG state that makes ``--resume`` exact.

`AsyncSaver` writes in a background thread so training does not wait for the disk: the caller hands
over a *snapshot* (`snapshot` clones every tensor, so later optimizer steps cannot change what is being
written); at most one write is in flight, and a new one first waits for the previous.

A checkpoint is a plain dict of tensors and Python primitives written with `torch.save` to a temporary
file in the same folder, flushed to disk and moved over the old one with `os.replace` (atomic on POSIX
and Windows): a run killed while saving leaves the previous checkpoint intact. Reading uses
``torch.load(weights_only=True)``; nothing but tensors, numbers, strings, lists and dicts goes in
(the numpy RNG state is stored as a tensor, the Python one as lists).
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

LAST = "last.pt"
TEACHER = "teacher.pt"


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete every ``.NAME.tmpPID`` file in ``folder`` whose writer is gone (a run killed mid-write)."""
    for old in Path(folder).glob(".*.tmp*"):
        name = old.name[1:]
        stem, _, pid = name.rpartition(".tmp")
        if stem and pid.isdigit():
            _remove_stale_temporaries(old.with_name(stem))


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.NAME.tmpPID`` files of ``path`` left by a run killed mid-write (their PID is gone)."""
    prefix = f".{path.name}.tmp"
    for old in path.parent.glob(f"{prefix}*"):
        try:
            pid = int(old.name[len(prefix):])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # a live process is still writing it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        old.unlink(missing_ok=True)


def atomic_save(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch (CPU + every CUDA device) generator states, weights_only-safe."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    out: dict[str, Any] = {
        "python": {"version": version, "state": list(state), "gauss": gauss},
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np_s = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np_s["key"].numpy().astype(np.uint32), "pos": np_s["pos"]},
            "has_gauss": np_s["has_gauss"],
            "gauss": np_s["gauss"],
        }
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a state dict (safe to keep while training continues)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def snapshot(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples whose tensors are cloned to the CPU (detached)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [snapshot(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(snapshot(v) for v in obj)
    return obj


class AsyncSaver:
    """Background `atomic_save` of snapshots; completed writes are reported by `poll` / `wait`."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._done: list[Any] = []
        self._error: BaseException | None = None

    def submit(self, items: list[tuple[Any, Path]], meta: Any = None, sync: bool = False) -> None:
        """Write ``items`` ([(snapshot, path)], in order); ``meta`` is returned by `poll` when done."""
        self.join()

        def work() -> None:
            try:
                for obj, path in items:
                    atomic_save(obj, path)
                with self._lock:
                    self._done.append(meta)
            except BaseException as exc:  # reported on the training thread by join()
                self._error = exc

        if sync:
            work()
            self._raise()
            return
        self._thread = threading.Thread(target=work, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()

    def poll(self) -> list[Any]:
        with self._lock:
            done, self._done = self._done, []
        return done

    def wait(self) -> list[Any]:
        self.join()
        return self.poll()
