"""The export as a stage: its events in order, a stop during it, ``kd-train export``, resume after it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_engine import ROOT, Recorder, tiny
from test_quantize import convs_by_weight_precision

from kdviewer.events import EventWriter, parse_event
from training.config import config_from_dict
from training.engine import run
from training.export import EXPORT_PHASES


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from training.synth import generate

    out = tmp_path_factory.mktemp("phantoms")
    return Path(generate("cxr", 30, out, fmt="png", seed=3, size=40, patients=15))


def _raw(phantoms: Path, out: Path, export: bool) -> dict:
    return tiny(
        phantoms,
        out,
        teacher={"epochs": 0},
        kd={"methods": [{"name": "hinton", "T": 4, "alpha": 0.7}]},
        optim={"epochs": 1},
        output={"export": export, "bootstrap": 20, "latency_runs": 2},
    )


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory) -> Path:
    """A run whose training finished, exported nothing (``output.export: false``)."""
    out = tmp_path_factory.mktemp("trained")
    result = run(config_from_dict(_raw(phantoms, out, export=False)), EventWriter("t", []))
    assert result.status == "completed" and result.bundle is None
    return out


def _copy(trained: Path, dst: Path) -> Path:
    shutil.copytree(trained, dst, ignore=shutil.ignore_patterns("events.jsonl"))
    return dst


def test_resume_of_trained_run_exports_with_stage_events_in_order(phantoms, trained, tmp_path):
    out = _copy(trained, tmp_path / "run")
    rec = Recorder()
    result = run(config_from_dict(_raw(phantoms, out, export=True)), EventWriter("t", [rec]), resume=True)
    assert result.status == "completed" and result.bundle is not None
    assert (result.bundle / "manifest.json").is_file() and (result.bundle / "student.int8.onnx").is_file()
    kinds = [e["event"] for e in rec.events]
    assert "step" not in kinds and "epoch_end" not in kinds  # nothing retrained
    assert rec.of("run_start")[0]["stages"] == ["student", "export"]
    at = {(e["event"], e.get("stage")): i for i, e in enumerate(rec.events)}
    start, end = at[("stage_start", "export")], at[("stage_end", "export")]
    assert rec.events[start]["substages"] == list(EXPORT_PHASES)
    progress = rec.of("progress")
    assert [e["substage"] for e in progress] == list(EXPORT_PHASES)
    assert [e["index"] for e in progress] == list(range(1, len(EXPORT_PHASES) + 1))
    assert all(start < rec.events.index(e) < end for e in progress)
    times = [e["elapsed_s"] for e in progress]
    assert times == sorted(times)
    timings = rec.events[end]["timings"]
    assert list(timings) == list(EXPORT_PHASES) and all(v >= 0 for v in timings.values())
    assert kinds.index("eval") > end and kinds[-1] == "run_end"
    # the latencies of the INT8 parity are those of the complexity table: measured once
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    evaluation = json.loads((result.bundle / "evaluation.json").read_text())
    lat = evaluation["complexity"]["student"]["latency_ms"]
    assert manifest["int8_parity"]["latency_int8_ms"] == pytest.approx(lat["ort_int8"])
    assert manifest["int8_parity"]["recommended"] in (0.0, 1.0)
    assert list(evaluation["complexity"]["teacher"]["latency_ms"]) == ["torch_fp32"]  # as the viewer runs it


def test_stop_file_during_export_then_kd_train_export_then_resume_says_finished(phantoms, trained, tmp_path):
    from training.cli import main

    out = _copy(trained, tmp_path / "run")
    raw = _raw(phantoms, out, export=True)
    stop_at: list[float] = []

    def stop_in_int8(ev: dict) -> None:
        if ev["event"] == "progress" and ev["substage"] == "int8":
            (out / "STOP").write_text("stop\n")
            stop_at.append(time.monotonic())

    rec = Recorder(stop_in_int8)
    result = run(config_from_dict(raw), EventWriter("t", [rec]), resume=True)
    took = time.monotonic() - stop_at[0]
    assert result.status == "stopped" and took < 15, took
    stopped = rec.of("stopped")[0]
    assert stopped["stage"] == "export" and stopped["reason"] == "STOP file"
    assert Path(stopped["checkpoint"]).is_file() and (out / "checkpoints" / "best_student.pt").is_file()
    assert not (out / "bundle").exists() and not (out / "bundle.tmp").exists()  # no half bundle
    assert "parity" not in [e["substage"] for e in rec.of("progress")]
    assert not rec.of("run_end") and not (out / "STOP").exists()

    # kd-train export RUN_DIR: the bundle from the checkpoints, no training
    log = tmp_path / "export.jsonl"
    assert main(["export", str(out), "--events", str(log)]) == 0
    events = [e for e in map(parse_event, log.read_text().splitlines()) if e]
    kinds = [e["event"] for e in events]
    assert "step" not in kinds and "epoch_end" not in kinds and kinds[-1] == "run_end"
    assert (out / "bundle" / "manifest.json").is_file() and events[-1]["bundle"] == str(out / "bundle")

    # run --resume on the now finished run: says so, in seconds
    t0 = time.monotonic()
    again = Recorder()
    done = run(config_from_dict(raw), EventWriter("t", [again]), resume=True)
    assert done.status == "completed" and time.monotonic() - t0 < 5
    assert any("already finished" in e["message"] for e in again.of("log"))
    assert not again.of("stage_start")


def test_sigterm_during_export_exits_3_within_15_s(trained, tmp_path):
    out = _copy(trained, tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "training", "export", str(out), "--events", "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    events = []
    sent = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            ev = parse_event(line)
            if ev is None:
                continue
            events.append(ev)
            if ev["event"] == "progress" and ev["substage"] == "onnx":
                proc.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                break
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sent is not None, err
    took = time.monotonic() - sent
    events += [e for e in map(parse_event, rest.splitlines()) if e]
    assert proc.returncode == 3, err
    assert took < 15, took
    stopped = [e for e in events if e["event"] == "stopped"]
    assert stopped and stopped[0]["stage"] == "export" and stopped[0]["reason"] == "SIGTERM"
    assert (out / "checkpoints" / "last.pt").is_file() and not (out / "bundle").exists()


def test_export_of_an_unfinished_run_is_refused(phantoms, tmp_path, capsys):
    from training.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(_raw(phantoms, out, export=False)))
    assert main(["export", str(out)]) == 2
    assert "has not finished" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing")]) == 2


def test_kd_train_export_can_keep_the_first_layers_fp32_and_refuses_other_settings(trained, tmp_path, capsys):
    from training.cli import main

    out = _copy(trained, tmp_path / "run")  # student cxrnet_s: stem, layer1 .. layer4, head
    assert main(["export", str(out), "--set", "output.int8_fp32_through=layer1",
                 "--set", "output.parity_images=8"]) == 0
    bundle = out / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["training"]["int8_fp32_through"] == "layer1"
    assert manifest["int8_parity"]["n"] <= 8
    convs = convs_by_weight_precision(bundle / manifest["student"]["onnx_int8"])
    first = ("/model/stem/", "/model/layer1/")
    assert convs["fp32"] and all(n.startswith(first) for n in convs["fp32"])
    assert convs["int8"] and not [n for n in convs["int8"] if n.startswith(first)]
    assert "`layer1` kept in fp32" in (bundle / "model_card.md").read_text()

    # a layer the student does not have: the export fails, the bundle already there is kept
    before = (bundle / "manifest.json").read_bytes()
    assert main(["export", str(out), "--set", "output.int8_fp32_through=layer9"]) != 0
    assert (bundle / "manifest.json").read_bytes() == before
    # export writes the bundle of the trained checkpoints: training settings are refused
    assert main(["export", str(out), "--set", "optim.lr=0.1"]) == 2
    assert "output.* settings only" in capsys.readouterr().err
