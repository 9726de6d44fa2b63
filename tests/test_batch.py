"""Batch classification: mixed folders, error rows, resume after a kill, cancel, teacher + heatmaps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from _bundles import (
    ct_reading_bundle,
    ct_volume,
    cxr_bundle,
    cxr_phantom,
    write_ct_png,
    write_ct_series,
    write_dicom,
    write_png,
)
from _classify import kill_after_rows, read_rows
from PIL import Image

from kdviewer.batch import BatchError, BatchProgress, csv_columns, run_batch, scan

# The first test builds the shared trained bundle (~20 s on an idle machine, minutes on a loaded one).
pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good PNG/JPEG/DICOM files, a CT series, a corrupt DICOM, a text file and a 0-byte file."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for i in range(3):
        write_png(root / "png" / f"case{i}.png", cxr_phantom(rng, positive=bool(i % 2))[0])
    Image.fromarray(cxr_phantom(rng, True)[0]).save(root / "png" / "photo.jpg", quality=92)
    write_dicom(root / "dicom" / "cr1.dcm", cxr_phantom(rng, False)[0].astype(np.uint16) * 8)
    write_ct_series(root / "ct" / "series1", ct_volume(rng, n=4, size=64))
    good = (root / "dicom" / "cr1.dcm").read_bytes()
    (root / "dicom" / "corrupt.dcm").write_bytes(good[: len(good) // 3])  # header fine, pixels cut
    (root / "notes.txt").write_text("not an image\n")
    (root / "empty.png").write_bytes(b"")
    (root / ".hidden.png").write_bytes(b"skipped")
    return root


def test_scan_groups_series_and_reports_non_images(mixed: Path) -> None:
    cases = scan(mixed)
    by_type = Counter(c.case_type for c in cases)
    assert by_type == {"image": 6, "series": 1, "error": 1, "skipped": 1}
    series = next(c for c in cases if c.case_type == "series")
    assert series.path == str(mixed / "ct" / "series1") and len(series.files) == 4
    errors = {Path(c.path).name: c.error for c in cases if c.case_type == "error"}
    assert "0 bytes" in errors["empty.png"]  # meant to be an image: an error
    assert [Path(c.path).name for c in cases if c.case_type == "skipped"] == ["notes.txt"]  # not an image
    assert not any(".hidden" in c.path for c in cases)


def test_run_batch_mixed_folder_then_resume(mixed: Path, tmp_path: Path) -> None:
    out, js = tmp_path / "res.csv", tmp_path / "res.json"
    seen: list[BatchProgress] = []
    s = run_batch(mixed, cxr_bundle().path, out, json_out=js, workers=2, batch_size=4, progress=seen.append)
    rows = read_rows(out)
    assert list(rows[0]) == csv_columns(["normal", "nodule"], teacher=False)
    assert len(rows) == 8 == s.total_cases == s.processed and s.skipped == 0
    by_name = {Path(r["path"].split("#")[0]).name: r for r in rows}
    for bad in ("corrupt.dcm", "empty.png"):
        assert by_name[bad]["error"] and by_name[bad]["case_type"] == "error" and not by_name[bad]["label"]
    assert s.errors == 2 and "notes.txt" not in by_name and s.skipped_files == [str(mixed / "notes.txt")]
    for good in ("case0.png", "case1.png", "case2.png", "photo.jpg", "cr1.dcm"):
        r = by_name[good]
        assert not r["error"] and r["label"] in ("normal", "nodule")
        assert abs(float(r["prob_normal"]) + float(r["prob_nodule"]) - 1) < 1e-4
        assert r["ood_score"] and r["ood_flag"] in ("true", "false")
        assert float(r["t_decode_ms"]) > 0 and float(r["t_infer_ms"]) >= 0
    assert by_name["series1"]["case_type"] == "series" and by_name["series1"]["n_frames"] == "4"
    assert by_name["series1"]["series_uid"] and by_name["series1"]["study_uid"]
    assert by_name["cr1.dcm"]["sop_uid"] and by_name["cr1.dcm"]["series_uid"]
    # a CT series given to an X-ray model: refused by the modality gate, never scored
    ct = by_name["series1"]
    assert ct["refused"] and ct["label"] == "" and not ct["error"]
    assert by_name["series1"]["ood_flag"] == "" and s.refused == 1
    data = json.loads(js.read_text())
    assert len(data) == 8 and isinstance(data[0]["prob_normal"], float | type(None))
    assert seen and seen[-1].done == 8 and seen[-1].total == 8 and seen[-1].rate > 0
    # the set-level OOD check counts every scored row (errors have no score)
    flags = [r["ood_flag"] for r in rows if r["ood_flag"]]
    assert s.shift is not None and s.shift.scored == len(flags) == 5
    assert s.shift.flagged == flags.count("true") == s.ood_flagged
    # restart with the same output: nothing is redone, nothing duplicated
    before = out.read_bytes()
    s2 = run_batch(mixed, cxr_bundle().path, out, workers=0)
    assert s2.processed == 0 and s2.skipped == 8
    assert s2.shift == s.shift  # the set-level OOD check also counts the rows of earlier runs
    assert out.read_bytes() == before


def test_a_folder_unlike_the_training_data_is_a_domain_shift(tmp_path: Path) -> None:
    """CT series given to an X-ray model that (wrongly) declares CT: flagged one by one, and the folder as a
    whole is shifted."""
    from kdviewer.batch import summary_lines

    folder = tmp_path / "ct"
    for i in range(3):
        write_ct_series(folder / f"series{i}", ct_volume(np.random.default_rng(i), n=3, size=64))
    s = run_batch(folder, ct_reading_bundle(), tmp_path / "ct.csv", workers=0)
    assert s.processed == 3 and s.shift is not None and s.shift.scored == 3
    assert s.shift.flagged == 3 and s.shift.shifted
    assert any(line.startswith("DOMAIN SHIFT: 3 of 3") for line in summary_lines(s))
    assert not any("DOMAIN SHIFT" in line for line in summary_lines(s, shift=False))
    assert s.to_dict()["shift"]["shifted"] is True


def test_torn_last_line_is_repaired_on_resume(mixed: Path, tmp_path: Path) -> None:
    out = tmp_path / "res.csv"
    cases = scan(mixed)
    run_batch(mixed, cxr_bundle().path, out, workers=0, cases=cases[:4])
    text = out.read_text()
    out.write_text(text + text.splitlines()[-1][:17])  # a half-written row after a kill
    run_batch(mixed, cxr_bundle().path, out, workers=0)
    paths = [r["path"] for r in read_rows(out)]
    assert len(paths) == len(set(paths)) == 8


def test_cancel_then_resume(mixed: Path, tmp_path: Path) -> None:
    out = tmp_path / "res.csv"
    stop = threading.Event()

    def progress(p: BatchProgress) -> None:
        if p.done >= 4:
            stop.set()

    s = run_batch(mixed, cxr_bundle().path, out, workers=0, batch_size=1, progress=progress, cancel=stop)
    assert s.cancelled and 4 <= s.processed < 8
    s2 = run_batch(mixed, cxr_bundle().path, out, workers=0)
    assert s2.skipped == s.processed and s.processed + s2.processed == 8
    paths = [r["path"] for r in read_rows(out)]
    assert len(paths) == len(set(paths)) == 8


def test_teacher_columns_heatmaps_and_jsonl(mixed: Path, tmp_path: Path) -> None:
    out, heat, jl = tmp_path / "t.csv", tmp_path / "heat", tmp_path / "t.jsonl"
    s = run_batch(mixed, cxr_bundle().path, out, teacher=True, heatmaps_dir=heat, json_out=jl, workers=0)
    rows = read_rows(out)
    assert "teacher_prob_nodule" in rows[0]
    good = [r for r in rows if not r["error"] and not r["refused"]]
    assert len(good) == 5
    refused = next(r for r in rows if r["refused"])  # the CT series: no teacher answer, no heatmap either
    assert refused["teacher_label"] == "" and refused["heatmap"] == "" and refused["disagreement"] == ""
    for r in good:
        assert r["teacher_label"] in ("normal", "nodule") and r["disagreement"] in ("true", "false")
        assert 0.0 <= float(r["divergence"]) <= 1.0
        assert r["heatmap"] and Path(r["heatmap"]).is_file()
        png = np.asarray(Image.open(r["heatmap"]))
        assert png.ndim == 3 and png.shape[2] == 3
    assert s.disagreements == sum(r["disagreement"] == "true" for r in good)
    assert len(jl.read_text().splitlines()) == 8
    with pytest.raises(BatchError, match="different columns"):
        run_batch(mixed, cxr_bundle().path, out, teacher=False, workers=0)


def test_missing_folder_is_a_run_failure(tmp_path: Path) -> None:
    with pytest.raises(BatchError, match="not found"):
        run_batch(tmp_path / "nope", cxr_bundle().path, tmp_path / "x.csv")


def test_killed_classify_resumes_with_each_file_once(tmp_path: Path) -> None:
    """`kdviewer classify` in a subprocess, SIGKILLed after a few rows, then rerun to completion."""
    folder = tmp_path / "cases"
    rng = np.random.default_rng(1)
    n = 60
    phantoms = [Image.fromarray(cxr_phantom(rng, bool(i % 2))[0]) for i in range(4)]
    base = [np.asarray(p.resize((512, 576))) for p in phantoms]
    for i in range(n):
        noisy = np.clip(base[i % 4] + rng.integers(0, 3, base[0].shape), 0, 255).astype(np.uint8)
        write_png(folder / f"{i:03d}.png", noisy)
    out = tmp_path / "res.csv"
    cmd = [sys.executable, "-m", "kdviewer.cli", "classify", str(folder), "-o", str(out),
           "--model", str(cxr_bundle().path), "--batch-size", "1", "--workers", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc, rows_at_kill = kill_after_rows(cmd, out, env, deadline_s=240)  # the CLI and its decoder process
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert 2 <= rows_at_kill < n
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "already in res.csv" in done.stdout
    paths = [Path(r["path"]).name for r in read_rows(out)]
    assert sorted(paths) == sorted(f"{i:03d}.png" for i in range(n))  # each file exactly once
    assert all(r["label"] and not r["error"] for r in read_rows(out))


def test_real_chest_xrays(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "real-cxr"
    if not folder.is_dir():
        pytest.skip("../shared/data/real-cxr is absent")
    cases = scan(folder)
    images = [c for c in cases if c.case_type == "image"][:6]
    others = [c for c in cases if c.case_type == "error"]
    out = tmp_path / "real.csv"
    s = run_batch(folder, cxr_bundle().path, out, workers=2, cases=images + others)
    rows = read_rows(out)
    assert len(rows) == len(images) + len(others) == s.processed
    assert all(not r["error"] and r["label"] for r in rows if r["case_type"] == "image")
    assert all(r["error"] for r in rows if r["case_type"] == "error")  # e.g. labels.csv


def test_modality_gate_and_ood_rows(tmp_path: Path) -> None:
    """A CT series given to the X-ray bundle gets no class (empty label, the reason in 'refused', no
    probabilities); a CT slice saved as PNG passes the gate and is OOD-flagged, and the summary counts it
    as "no reliable answer", not as a label."""
    from kdviewer.batch import NO_RELIABLE_ANSWER, summary_lines

    folder = tmp_path / "in"
    write_ct_series(folder / "ct", ct_volume(np.random.default_rng(0), n=3, size=64))
    write_ct_png(folder / "ct_slice.png", ct_volume(np.random.default_rng(1), n=1, size=64)[0])
    out = tmp_path / "res.csv"
    s = run_batch(folder, cxr_bundle().path, out, workers=0)
    rows = {Path(r["path"]).name: r for r in read_rows(out)}
    ct = rows["ct"]
    assert ct["case_type"] == "series" and ct["label"] == "" and not ct["error"]
    assert ct["refused"] == "this model reads chest radiographs (CR, DX); this image is CT"
    assert ct["prob_normal"] == ct["prob_nodule"] == "" and ct["ood_flag"] == ""
    png = rows["ct_slice.png"]
    assert png["refused"] == "" and png["label"] and png["ood_flag"] == "true"
    assert s.refused == 1 and s.errors == 0 and s.label_counts == {NO_RELIABLE_ANSWER: 1}
    text = "\n".join(summary_lines(s))
    assert "1 case(s) refused by the modality gate" in text and "labels: no reliable answer: 1" in text


def test_default_output_is_outside_the_folder_and_own_outputs_are_never_cases(tmp_path: Path) -> None:
    """Results and heatmaps written into the folder (as an earlier default did) are not classified by the
    next run; labels.csv / notes.txt are skipped and named in the summary, not 'could not be read'."""
    from kdviewer.batch import default_output, summary_lines

    folder = tmp_path / "study"
    rng = np.random.default_rng(7)
    for i in range(2):
        write_png(folder / f"case{i}.png", cxr_phantom(rng, positive=bool(i))[0])
    (folder / "labels.csv").write_text("path,label\ncase0.png,normal\n")
    (folder / "notes.txt").write_text("seen by Dr X\n")

    out = default_output(folder, base=tmp_path)
    assert out == default_output(folder, base=tmp_path)  # stable: the same command resumes
    assert out.parent == tmp_path / "kdviewer-results" and out.name.startswith("study-")
    inside = default_output(folder, base=folder / "sub")  # run from inside the folder: next to it
    assert folder.resolve() not in inside.parents and inside.parent == tmp_path.resolve() / "kdviewer-results"
    assert default_output(tmp_path / "other" / "study", base=tmp_path) != out  # same name, other folder

    # an earlier run that wrote its CSV and heatmaps *inside* the folder
    s1 = run_batch(folder, cxr_bundle().path, folder / "results.csv", heatmaps_dir=folder / "heat", workers=0)
    assert s1.processed == 2 and s1.errors == 0
    assert sorted(Path(p).name for p in s1.skipped_files) == ["labels.csv", "notes.txt"]
    assert len(list((folder / "heat").glob("*.png"))) == 2
    # the next run, elsewhere: the old CSV and heatmaps are skipped, not cases or errors
    s2 = run_batch(folder, cxr_bundle().path, out, workers=0)
    assert s2.processed == 2 and s2.errors == 0
    assert sorted(Path(p).name for p in s2.skipped_files) == sorted(
        ["labels.csv", "notes.txt", "results.csv"] + [p.name for p in (folder / "heat").glob("*.png")])
    text = "\n".join(summary_lines(s2))
    assert "could not be read" not in text and "5 file(s) skipped, not images" in text
    assert {Path(r["path"]).name for r in read_rows(out)} == {"case0.png", "case1.png"}


def test_batch_and_predict_give_the_same_answer(mixed: Path, tmp_path: Path) -> None:
    """The viewer / ``predict`` (load -> Classifier.predict on the Study) and the batch (worker decode +
    batched ORT) see the same model input for the same file, so they print the same probabilities."""
    from kdviewer.imaging import load
    from kdviewer.inference.predict import Classifier

    out = tmp_path / "res.csv"
    run_batch(mixed, cxr_bundle().path, out, workers=2, batch_size=4)
    rows = {Path(r["path"]).name: r for r in read_rows(out)}
    clf = Classifier(cxr_bundle().path)
    for name in ("case0.png", "case1.png", "photo.jpg", "cr1.dcm"):
        path = next(mixed.rglob(name))
        pred = clf.predict(load(path))
        for c, p in zip(clf.class_names, pred.probabilities, strict=True):
            assert abs(float(rows[name][f"prob_{c}"]) - float(p)) < 1e-5, (name, c)
        assert rows[name]["label"] == pred.label


def test_decoders_fork_from_the_main_thread_and_spawn_from_others(mixed: Path, tmp_path: Path) -> None:
    """The command line's decoders are forked (they start with the modules loaded); a batch run from
    another thread (the GUI's QThread in a Qt process, which must not be forked) spawns them, and both
    give the same rows."""
    from kdviewer.batch import _decoder_context

    expected = "fork" if sys.platform.startswith("linux") else "spawn"
    assert _decoder_context().get_start_method() == expected
    seen: dict[str, str] = {}
    side: dict[str, object] = {}

    def in_thread() -> None:
        seen["method"] = _decoder_context().get_start_method()
        side["summary"] = run_batch(mixed, cxr_bundle().path, tmp_path / "thread.csv", workers=2)

    t = threading.Thread(target=in_thread)
    t.start()
    t.join(600)
    assert seen["method"] == "spawn"
    run_batch(mixed, cxr_bundle().path, tmp_path / "main.csv", workers=2)

    def answers(path: Path) -> dict[str, tuple[str, str]]:
        return {r["path"]: (r["label"], r["error"]) for r in read_rows(path)}

    assert answers(tmp_path / "thread.csv") == answers(tmp_path / "main.csv")
    assert len(answers(tmp_path / "main.csv")) == 8


def test_batch_inference_does_not_spin_beside_its_decoders(mixed: Path) -> None:
    from kdviewer.inference.predict import Classifier

    def spinning(clf: Classifier) -> str:
        opts = clf.student.session.get_session_options()  # type: ignore[attr-defined]
        try:
            return opts.get_session_config_entry("session.intra_op.allow_spinning")
        except Exception:  # not set: ORT's default, spinning
            return "1"

    assert spinning(Classifier(cxr_bundle().path)) == "1"  # the viewer: ORT's default
    assert spinning(Classifier(cxr_bundle().path, spin=False)) == "0"
