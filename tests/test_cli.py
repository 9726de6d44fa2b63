"""The `kdviewer` command line: classify, predict, info, usage errors, the default subcommand."""

from __future__ import annotations

import csv
import json
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

from kdviewer.cli import _with_default_command, build_parser, main

# The first test builds the shared trained bundle (~20 s on an idle machine, minutes on a loaded one).
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(2)
    return {
        "png": write_png(root / "cases" / "a.png", cxr_phantom(rng, True)[0]),
        "png2": write_png(root / "cases" / "b.png", cxr_phantom(rng, False)[0]),
        "dcm": write_dicom(root / "cases" / "c.dcm", cxr_phantom(rng, False)[0].astype(np.uint16) * 8),
        "txt": (root / "cases" / "readme.txt").write_text("x") and root / "cases" / "readme.txt",
        "ct": write_ct_series(root / "ct", ct_volume(rng, n=3, size=64))[0].parent,
        "ct_png": write_ct_png(root / "ct_slice.png", ct_volume(rng, n=1, size=64)[0]),
        "root": root,
    }


def test_classify(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = files["root"] / "res.csv"
    js = files["root"] / "res.json"
    code = main(["classify", str(files["root"] / "cases"), "-o", str(out), "--model", str(cxr_bundle().path),
                 "--json", str(js), "--workers", "0", "--no-progress", "--fp32"])
    assert code == 0
    text = capsys.readouterr().out
    assert "classified" in text and "1 file(s) skipped, not images: readme.txt" in text
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and sum(bool(r["error"]) for r in rows) == 0
    assert len(json.loads(js.read_text())) == 3


def test_classify_default_output_lies_outside_the_folder(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdviewer.batch import default_output

    monkeypatch.chdir(files["root"] / "cases")  # run from inside the folder being classified
    assert main(["classify", ".", "--model", str(cxr_bundle().path), "--workers", "0", "--no-progress"]) == 0
    cap = capsys.readouterr()
    expected = default_output(files["root"] / "cases")
    assert expected.is_file() and expected.parent == files["root"].resolve() / "kdviewer-results"
    assert f"results go to {expected}" in cap.err and str(expected) in cap.out
    assert not list((files["root"] / "cases").glob("*.csv"))


def test_predict_json_and_text(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model = str(cxr_bundle().path)
    assert main(["predict", str(files["png"]), "--model", model, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["label"] in ("normal", "nodule") and d["bundle"]["synthetic_data"] is True
    assert main(["predict", str(files["dcm"]), "--model", model, "--teacher"]) == 0
    text = capsys.readouterr().out
    assert "teacher:" in text and "not a diagnosis" in text and "OOD score" in text
    assert main(["predict", str(files["ct"]), "--model", str(ct_reading_bundle()), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["per_slice"]) == 3 and d["aggregate"] == "max-nodule" and d["ood_flag"] is True


def test_predict_follows_the_trust_rules(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """A CT series given to the X-ray bundle: no class (modality gate); a CT slice as PNG: the OOD guard
    fires and the first line says there is no reliable answer instead of a confident number."""
    model = str(cxr_bundle().path)
    assert main(["predict", str(files["ct"]), "--model", model, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["label"] == "" and d["label_index"] == -1 and d["probabilities"] == {}
    assert d["refused"] == "this model reads chest radiographs (CR, DX); this image is CT"
    assert main(["predict", str(files["ct"]), "--model", model]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "no answer" in first and "this image is CT" in first and "%" not in first
    assert main(["predict", str(files["ct_png"]), "--model", model]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "no reliable answer" in lines[0] and "%" not in lines[0]
    assert any("not reliable" in line for line in lines)  # the output stays available, labelled


def test_info_image_dicom_and_bundle(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(files["png"])]) == 0
    assert "size: 128 x 144 px" in capsys.readouterr().out
    assert main(["info", str(files["dcm"])]) == 0
    text = capsys.readouterr().out
    assert "modality: CR" in text and "SOPInstanceUID" in text
    assert "Phantom" not in text and "TEST-0001" not in text  # no patient identifiers
    assert main(["info", str(files["ct"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == 3
    assert main(["info", str(cxr_bundle().path)]) == 0
    assert "bundle: test-cxr" in capsys.readouterr().out


def test_errors_are_one_line_with_exit_codes(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["classify"]) == 2  # the folder is required (-o is not: it has a default)
    assert "required" in capsys.readouterr().err
    assert main(["classify", str(files["root"]), "-o", "x.csv", "--workers", "-1"]) == 2
    capsys.readouterr()
    assert main(["predict", str(files["png"]), "--model", str(files["root"] / "nope")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdviewer: error:") and "not found" in err and len(err.splitlines()) == 1
    assert main(["predict", str(files["txt"]), "--model", str(cxr_bundle().path)]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["info", str(files["root"] / "missing.png")]) == 1
    assert main(["--version"]) == 0


def test_gui_is_the_default_subcommand() -> None:
    assert _with_default_command([]) == ["gui"]
    assert _with_default_command(["scan.dcm", "--model", "b"]) == ["gui", "scan.dcm", "--model", "b"]
    assert _with_default_command(["-v", "x.png"]) == ["-v", "gui", "x.png"]
    assert _with_default_command(["classify", "f", "-o", "x"])[0] == "classify"
    args = build_parser().parse_args(_with_default_command(["a.png", "b.png", "--model", "m"]))
    assert args.command == "gui" and args.paths == ["a.png", "b.png"] and args.model == "m"
