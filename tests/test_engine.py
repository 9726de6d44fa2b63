"""training.engine end to end on tiny synthetic phantoms: bundle, exact resume, graceful stop, events."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kdviewer.events import EVENTS_SCHEMA, EventWriter, parse_event
from training.config import config_from_dict
from training.engine import STOP_FILE, run

ROOT = Path(__file__).resolve().parents[1]

# The documented fields of each event type (kdviewer/events.py).
DOCUMENTED = {
    "run_start": {
        "config",
        "device",
        "amp",
        "world_size",
        "output_dir",
        "stages",
        "total_steps",
        "resumed_from",
        "dataset",
        "synthetic",
    },
    "stage_start": {"stage", "epochs", "steps_per_epoch"},
    "progress": {"stage", "substage", "index", "total", "elapsed_s"},
    "stage_end": {"stage", "elapsed_s"},
    "step": {"stage", "epoch", "step", "lr", "loss", "components", "images_per_s", "eta_s", "gpu_mem_mb"},
    "epoch_end": {"stage", "epoch", "train", "val", "lr", "best", "epoch_time_s"},
    "eval": {"stage", "split", "metrics", "confusion_matrix", "class_names"},
    "checkpoint": {"stage", "epoch", "path", "reason"},
    "stopped": {"stage", "epoch", "checkpoint"},
    "run_end": {"bundle", "metrics", "elapsed_s", "complexity"},
    "error": {"message", "type", "traceback", "checkpoint"},
    "log": {"level", "message"},
}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """Two-class synthetic chest phantoms (training.synth) with patient IDs in labels.csv."""
    from training.synth import generate

    out = tmp_path_factory.mktemp("phantoms")
    return Path(generate("cxr", 40, out, fmt="png", seed=0, size=48, patients=20))


class Recorder:
    """An event sink: keeps parsed events and runs a callback on each (to simulate kills and stops)."""

    def __init__(self, on_event=None) -> None:
        self.events: list[dict] = []
        self.on_event = on_event

    def write(self, line: str) -> None:
        ev = parse_event(line)
        if ev is not None:
            self.events.append(ev)
            if self.on_event is not None:
                self.on_event(ev)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]


def tiny(data_root: Path, out_dir: Path, /, **sections) -> dict:
    cfg = {
        "data": {"root": str(data_root), "split": "random", "val_fraction": 0.3},
        "preprocessing": {"input_size": 32, "resize": 32},
        "teacher": {"arch": "cxrnet_s", "epochs": 1},
        "student": {"arch": "cxrnet_s", "dropout": 0.3},
        "kd": {"methods": [{"name": "hinton", "T": 4, "alpha": 0.7}, {"name": "fitnets"}]},
        "optim": {"epochs": 2, "batch_size": 8, "lr": 0.003},
        "runtime": {"amp": "off", "deterministic": True, "threads": 1, "seed": 0},
        "output": {"dir": str(out_dir), "export": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def _run(raw: dict, resume: bool = False, on_event=None):
    rec = Recorder(on_event)
    result = run(config_from_dict(raw), EventWriter("test", [rec]), resume=resume)
    return result, rec


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(phantoms, tmp_path_factory):
    """An uninterrupted run; its student checkpoint after epoch 1 is kept as a 'killed' run's leftovers."""
    out = tmp_path_factory.mktemp("ref")
    saved = tmp_path_factory.mktemp("killed")

    def keep_epoch1(ev):
        if ev["event"] == "checkpoint" and ev["stage"] == "student" and ev["epoch"] == 1:
            shutil.copytree(out / "checkpoints", saved, dirs_exist_ok=True)

    result, rec = _run(tiny(phantoms, out), on_event=keep_epoch1)
    assert result.status == "completed"
    return result, rec, saved


def test_events_parse_and_carry_the_documented_fields(reference):
    result, rec, _ = reference
    kinds = [e["event"] for e in rec.events]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    for k in ("stage_start", "step", "epoch_end", "checkpoint", "eval", "stage_end"):
        assert k in kinds, k
    for ev in rec.events:
        assert ev["schema"] == EVENTS_SCHEMA and ev["run_id"] == "test"
        missing = DOCUMENTED[ev["event"]] - set(ev)
        assert not missing, f"{ev['event']} lacks {missing}"
    assert [e["stage"] for e in rec.of("stage_start")] == ["teacher", "student"]
    assert [e["stage"] for e in rec.of("stage_end")] == ["teacher", "student"]
    start = rec.of("run_start")[0]
    assert (
        start["dataset"]["classes"] and start["world_size"] == 1 and start["stages"] == ["teacher", "student"]
    )
    steps = rec.of("step")
    assert {"task", "hinton", "fitnets"} <= set(steps[-1]["components"])
    ends = rec.of("epoch_end")
    assert [(e["stage"], e["epoch"]) for e in ends] == [("teacher", 1), ("student", 1), ("student", 2)]
    assert {"loss", "accuracy", "auc"} <= set(ends[-1]["val"])
    assert (Path(result.output_dir) / "config.yaml").is_file()
    # every line is valid JSON (NaN never leaks into the stream)
    for ev in rec.events:
        json.loads(json.dumps(ev, allow_nan=False))


def test_resume_after_a_kill_gives_identical_weights(reference, phantoms, tmp_path):
    result, _, saved = reference
    shutil.copytree(saved, tmp_path / "checkpoints")
    resumed, rec = _run(tiny(phantoms, tmp_path), resume=True)
    assert resumed.status == "completed"
    assert rec.of("run_start")[0]["resumed_from"].endswith("last.pt")
    assert [e["epoch"] for e in rec.of("epoch_end")] == [2]  # only the missing epoch was trained
    assert _states_equal(result.student.state_dict(), resumed.student.state_dict())
    a = torch.load(Path(result.output_dir) / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert _states_equal(a["module"], b["module"])  # student + FitNets regressor
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert all(
        torch.equal(a["optimizer"]["state"][k]["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])
        for k in a["optimizer"]["state"]
    )


def test_stop_file_mid_epoch_then_resume_is_exact(reference, phantoms, tmp_path):
    result, _, _ = reference

    def stop_in_student_epoch_2(ev):
        if ev["event"] == "step" and ev["stage"] == "student" and ev["epoch"] == 2:
            (tmp_path / STOP_FILE).touch()

    stopped, rec = _run(tiny(phantoms, tmp_path), on_event=stop_in_student_epoch_2)
    assert stopped.status == "stopped"
    ev = rec.of("stopped")[0]
    assert ev["stage"] == "student" and ev["epoch"] == 2 and Path(ev["checkpoint"]).is_file()
    assert rec.of("checkpoint")[-1]["reason"] == "stop"
    assert not (tmp_path / STOP_FILE).exists()  # consumed
    ck = torch.load(ev["checkpoint"], weights_only=True)
    assert ck["step_in_epoch"] >= 1  # stopped inside the epoch, after finishing a step
    resumed, _ = _run(tiny(phantoms, tmp_path), resume=True)
    assert resumed.status == "completed"
    assert _states_equal(result.student.state_dict(), resumed.student.state_dict())


def test_teacher_cache_equals_recomputation(phantoms):
    from kdviewer.models.manifest import Preprocessing
    from training.config import DataConfig, KDConfig
    from training.data import build_datasets, discover
    from training.losses import FeatureHooks, build_combiner
    from training.teacher_cache import build_teacher_cache, teacher_record
    from training.zoo import create_model

    pre = Preprocessing(input_size=32, resize=32)
    splits = discover(DataConfig(root=phantoms, split="random"), seed=0)
    ds = build_datasets(splits, pre, DataConfig(root=phantoms))["train"]
    teacher = create_model("resnet18", 2, 1).eval()
    student = create_model("cxrnet_s", 2, 1)
    kd = KDConfig(methods=[{"name": "hinton"}, {"name": "at"}, {"name": "rkd"}, {"name": "sp"}])
    comb = build_combiner(kd, "single-label", 0.3, student, teacher, 1, 32)
    cache = build_teacher_cache(teacher, comb, ds, device=torch.device("cpu"), batch_size=7)
    idx = torch.randperm(len(ds))[:9]
    with FeatureHooks(teacher, comb.teacher_layers(), embedding=comb.needs_embedding) as hooks:
        live = teacher_record(teacher, comb, hooks, ds.cache[idx].float(), None)
    cached = cache.take(idx, torch.device("cpu"))
    assert (
        live.keys()
        == cached.keys()
        == {"logits", "embedding", "at:layer1", "at:layer2", "at:layer3", "at:layer4", "sp:layer4"}
    )
    for k in live:
        assert torch.allclose(live[k], cached[k], atol=1e-5, rtol=1e-5), k


def test_multilabel_with_augmentation_and_early_stopping(phantoms, tmp_path):
    with open(phantoms / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(tmp_path / "multi.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id"])
        for i, r in enumerate(rows):
            w.writerow([r["path"], r["label"] + ("|extra" if i % 3 == 0 else ""), r["patient_id"]])
    raw = tiny(
        phantoms,
        tmp_path / "out",
        task="multi-label",
        data={"csv": str(tmp_path / "multi.csv"), "split": "patient"},
        teacher={"arch": "cxrnet_s", "epochs": 0},
        kd={"methods": [{"name": "at"}, {"name": "hinton", "T": 2, "alpha": 0.5}]},
        preprocessing={"augment": {"rotation": 15, "hflip": True}},
        optim={"epochs": 6, "early_stopping": {"patience": 1, "min_delta": 2.0}, "monitor": "accuracy"},
    )
    result, rec = _run(raw)
    assert result.status == "completed"
    ends = rec.of("epoch_end")
    assert len(ends) == 2  # accuracy cannot improve by 2: patience 1 stops after epoch 2 of 6
    assert any("early stopping" in e["message"] for e in rec.of("log"))
    assert not any("cached" in e["message"] and "teacher" in e["message"] for e in rec.of("log"))


def test_config_error_exit_code(tmp_path, capsys):
    from training.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"data": {"root": str(tmp_path / "absent")}, "student": {"arch": "resnet18"}})
    )
    assert main(["run", str(bad)]) == 2
    assert "data.root" in capsys.readouterr().err


def test_sigterm_stops_gracefully_with_exit_code_3(phantoms, tmp_path):
    cfg = tiny(phantoms, tmp_path / "out", teacher={"epochs": 0}, optim={"epochs": 200})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "training", "run", str(path), "--events", "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    events = []
    try:
        for line in proc.stdout:
            ev = parse_event(line)
            if ev is None:
                continue
            events.append(ev)
            if ev["event"] == "step" and ev["stage"] == "student":
                proc.send_signal(signal.SIGTERM)
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    events += [e for e in map(parse_event, rest.splitlines()) if e]
    assert proc.returncode == 3, err
    stopped = [e for e in events if e["event"] == "stopped"]
    assert stopped and stopped[0]["reason"] == "SIGTERM"
    assert Path(stopped[0]["checkpoint"]).is_file()
    assert not any(e["event"] in ("error", "run_end") for e in events)


def test_end_to_end_teacher_student_bundle_eval(phantoms, tmp_path, capsys):
    from kdviewer.models.manifest import Manifest
    from training.cli import main

    raw = tiny(
        phantoms,
        tmp_path / "run",
        teacher={"arch": "resnet18", "epochs": 1},
        kd={"methods": [{"name": "hinton", "T": 4, "alpha": 0.7}, {"name": "at"}]},
        data={"test_fraction": 0.2, "val_fraction": 0.2},
        output={"export": True, "bootstrap": 20, "latency_runs": 2, "synthetic": True},
    )
    result, rec = _run(raw)
    assert result.status == "completed" and result.bundle is not None
    bundle = Path(result.bundle)
    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text())
    assert manifest.student.architecture == "cxrnet_s" and manifest.teacher.architecture == "resnet18"
    assert manifest.synthetic_data and manifest.preprocessing.input_size == 32
    for name in ("student.onnx", "student.pt", "teacher.pt"):
        assert (bundle / name).is_file(), name
    end = rec.of("run_end")[0]
    assert end["bundle"] == str(bundle) and end["complexity"]["student_params"] > 0
    assert {(e["stage"], e["split"]) for e in rec.of("eval")} >= {("student", "val"), ("student", "test")}
    capsys.readouterr()
    assert main(["eval", str(bundle), str(phantoms / "labels.csv"), "--json", "--n-boot", "10"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert "accuracy" in metrics


def test_crash_emits_an_error_event_and_exit_code_1(phantoms, tmp_path):
    from training.cli import main

    bad_weights = tmp_path / "teacher.pt"
    bad_weights.write_bytes(b"this is not a state dict")
    cfg = tiny(phantoms, tmp_path / "out", teacher={"weights": str(bad_weights), "epochs": 0})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "events.jsonl"
    assert main(["run", str(path), "--events", str(log)]) == 1
    events = [e for e in map(parse_event, log.read_text().splitlines()) if e]
    err = events[-1]
    assert err["event"] == "error" and err["type"] == "WeightsUnavailableError"
    assert "teacher.pt" in err["message"] and "Traceback" in err["traceback"] and err["checkpoint"] is None
    assert (tmp_path / "out" / "events.jsonl").read_text().strip().splitlines()[
        -1
    ] == log.read_text().strip().splitlines()[-1]


def test_resume_a_finished_run_with_more_epochs(reference, phantoms, tmp_path):
    result, _, _ = reference
    shutil.copytree(Path(result.output_dir) / "checkpoints", tmp_path / "checkpoints")
    raw = tiny(phantoms, tmp_path, optim={"epochs": 3})
    more, rec = _run(raw, resume=True)
    assert [(e["stage"], e["epoch"]) for e in rec.of("epoch_end")] == [("student", 3)]
    assert len(more.history) == 4  # teacher 1 + student 1, 2 (from the checkpoint) + student 3
    t0 = time.perf_counter()
    same, rec2 = _run(tiny(phantoms, tmp_path, optim={"epochs": 3}), resume=True)
    took = time.perf_counter() - t0
    assert not rec2.of("epoch_end") and same.status == "completed"  # nothing left to train
    # ... and nothing redone: no data decoding, no evaluation/export, just the finished record
    assert not rec2.of("run_start") and took < 5, took
    logs = [e["message"] for e in rec2.of("log")]
    assert any("already finished" in m and "nothing to resume" in m for m in logs), logs
    assert rec2.of("run_end")[0]["metrics"] == more.metrics
    # a new run (no --resume) in the same folder trains again and replaces the record
    assert (tmp_path / "finished.json").is_file()
