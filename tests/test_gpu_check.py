"""scripts/gpu_check.sh without a GPU: it parses, refuses quickly and clearly where there is no CUDA
device or no torch, and its dry run (CPU smoke mode) lists a check for every recipe, torchrun and the
GPU benchmark. The real checks need a CUDA machine (see the script's header)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(tmp_path: Path, *args: str, python: str = sys.executable, **env: str):
    full = {k: v for k, v in os.environ.items() if not k.startswith("KD_GPU_CHECK")}
    full.update(PYTHON=python, KD_GPU_CHECK_OUT=str(tmp_path / "work"), **env)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full,
                          cwd=tmp_path, timeout=240)


def test_script_parses() -> None:
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_no_cuda_device_says_so_and_exits_nonzero(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    r = _run(tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no CUDA device" in r.stdout + r.stderr
    assert not (tmp_path / "work").exists()  # nothing was run


def test_a_python_without_torch_is_named(tmp_path: Path) -> None:
    bare = shutil.which("python3", path="/usr/bin:/bin")
    if bare is None or subprocess.run([bare, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("no interpreter without torch here")
    r = _run(tmp_path, python=bare)
    assert r.returncode == 3 and "cannot import torch" in r.stdout + r.stderr


def test_dry_run_lists_every_recipe_torchrun_and_the_benchmark(tmp_path: Path) -> None:
    r = _run(tmp_path, "--dry-run", KD_GPU_CHECK_DEVICE="cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("DRY ")]
    recipes = sorted(p.stem for p in (ROOT / "training" / "recipes").glob("*.yaml"))
    assert [ln.split()[1] for ln in lines] == [f"recipe:{n}" for n in recipes] + [
        "torchrun:1proc",
        "benchmark:train_throughput",
    ]
    for ln in lines[: len(recipes)]:
        assert "--set runtime.device=cpu" in ln and "--set output.export=true" in ln and "--events -" in ln
    assert "--nproc_per_node=1" in lines[-2] and "runs/torchrun-1" in lines[-2]
    assert "--device cpu" in lines[-1]
    assert "dry run, nothing was run" in r.stdout
