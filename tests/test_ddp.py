"""DDP smoke test: `torchrun --standalone --nproc_per_node=2 -m training run`, gloo, two CPU processes,
export on: rank 0 evaluates and exports while rank 1 leaves, and the run ends."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from kdviewer.events import parse_event

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_two_cpu_processes(tmp_path):
    from training.synth import generate

    data = Path(generate("cxr", 24, tmp_path / "data", seed=1, size=40, patients=12))
    out = tmp_path / "run"
    cfg = {
        "data": {"root": str(data), "split": "random", "val_fraction": 0.3},
        "preprocessing": {"input_size": 32, "resize": 32},
        "teacher": {"arch": "cxrnet_s", "epochs": 1},
        "student": {"arch": "cxrnet_s"},
        "kd": {"methods": [{"name": "hinton", "T": 4, "alpha": 0.7}, {"name": "fitnets"}]},
        "optim": {"epochs": 1, "batch_size": 4},
        "runtime": {"device": "cpu", "amp": "off", "threads": 1},
        "output": {"dir": str(out), "export": True, "bootstrap": 10, "latency_runs": 2},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--standalone", "--nproc_per_node=2", "-m", "training", "run", str(path), "--events", "-"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [e for e in map(parse_event, proc.stdout.splitlines()) if e]
    kinds = [e["event"] for e in events]
    assert kinds.count("run_start") == 1 and kinds.count("run_end") == 1  # rank 0 only
    assert kinds.count("stage_end") == 3 and kinds.index("run_end") == len(kinds) - 1
    assert [e["stage"] for e in events if e["event"] == "stage_start"] == ["teacher", "student", "export"]
    assert (out / "bundle" / "manifest.json").is_file() and (out / "finished.json").is_file()
    assert events[0]["world_size"] == 2
    # each rank saw half of the training set per epoch: steps per epoch = ceil(ceil(n / 2) / batch)
    n_train = events[0]["dataset"]["train"]
    stage = next(e for e in events if e["event"] == "stage_start" and e["stage"] == "student")
    per_rank = math.ceil(n_train / 2)
    assert stage["steps_per_epoch"] <= math.ceil(per_rank / 4) < math.ceil(n_train / 4)
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "events.jsonl").is_file()
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ck["stage"] == "student" and ck["done"]
    assert not any(k.startswith("module.module") for k in ck["module"])  # saved unwrapped
