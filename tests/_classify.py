"""Shared by the classify tests: reading a results CSV, and a `kdviewer classify` killed mid-run."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from pathlib import Path


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a results CSV (written as UTF-8 by `kdviewer.batch`)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def kill_after_rows(
    cmd: list[str], out: Path, env: dict[str, str], min_rows: int = 2, deadline_s: float = 300
) -> tuple[subprocess.Popen, int]:
    """Start ``cmd`` (a classify writing ``out``) in its own session and SIGKILL the whole process group
    (the CLI and its decoders or cluster client) once ``out`` holds ``min_rows`` rows, or the deadline
    passed. Returns the finished process and the number of rows written when it was killed."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    rows_at_kill = 0
    deadline = time.monotonic() + deadline_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists():
                rows_at_kill = max(0, out.read_bytes().count(b"\n") - 1)
                if rows_at_kill >= min_rows:
                    break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return proc, rows_at_kill
