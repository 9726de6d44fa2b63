"""File > Export result as DICOM...: the viewer writes the SR and SC `kdviewer predict --dicom-out` writes."""

# ruff: noqa: F811 - pytest fixtures imported from test_gui_support are re-declared as arguments
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from test_gui_support import (  # noqa: F401 - fixtures
    load_bundle_and_wait,
    open_and_wait,
    settings,
    tiny_bundle,
    window,
)

from kdviewer.cli import main

pytestmark = [pytest.mark.gui, pytest.mark.timeout(600)]


def flat_tree(ds: Any) -> list[tuple[str, str, Any]]:
    """(value type, concept, value) of every content item, depth first; UIDREFs (new per export) left out."""
    out: list[tuple[str, str, Any]] = []
    for item in ds.get("ContentSequence", []) or []:
        name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
        concept = f"{name.CodingSchemeDesignator}:{name.CodeValue}:{name.CodeMeaning}" if name else ""
        vt = item.ValueType
        if vt == "NUM":
            value: Any = float(item.MeasuredValueSequence[0].NumericValue)
        elif vt == "TEXT":
            value = item.TextValue
        elif vt == "CODE":
            value = item.ConceptCodeSequence[0].CodeMeaning
        elif vt == "IMAGE":
            value = item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        else:
            value = ""
        if vt != "UIDREF":
            out.append((vt, concept, value))
        out.extend(flat_tree(item))
    return out


def test_viewer_export_writes_the_same_objects_as_the_cli(qtbot, window, tiny_bundle, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from training.synth import generate

    case = next(generate("cxr", 1, tmp_path / "dx", fmt="dicom", size=128, seed=11).rglob("*.dcm"))
    load_bundle_and_wait(window, tiny_bundle)
    act = window.actions_by_id["export_dicom"]
    assert act.text().startswith("&Export result as DICOM")
    open_and_wait(qtbot, window, case)
    assert window.result is not None, window.last_error

    gui_dir = tmp_path / "gui"
    with qtbot.waitSignal(window.dicom_exported, timeout=300_000) as blocker:
        window.export_dicom(gui_dir)
    done = blocker.args[0]
    assert "Exported as DICOM" in window.message_bar.text()

    cli_dir = tmp_path / "cli"
    assert main(["predict", str(case), "--model", str(tiny_bundle), "--dicom-out", str(cli_dir)]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in gui_dir.iterdir()) == sorted(p.name for p in cli_dir.iterdir())

    gui_sr, cli_sr = pydicom.dcmread(done.sr_path), pydicom.dcmread(cli_dir / done.sr_path.name)
    gui_tree, cli_tree = flat_tree(gui_sr), flat_tree(cli_sr)
    assert len(gui_tree) == len(cli_tree) > 20
    for g, c in zip(gui_tree, cli_tree, strict=True):
        assert g[:2] == c[:2]
        if isinstance(g[2], float):
            assert g[2] == pytest.approx(c[2], rel=1e-4, abs=1e-6), g[1]
        else:
            assert g[2] == c[2], g[1]
    src = pydicom.dcmread(case, stop_before_pixels=True)
    for obj in (gui_sr, cli_sr):
        assert obj.StudyInstanceUID == src.StudyInstanceUID and obj.PatientID == src.PatientID
    assert gui_sr.SOPInstanceUID != cli_sr.SOPInstanceUID  # two exports, two instances

    gui_sc, cli_sc = pydicom.dcmread(done.sc_path), pydicom.dcmread(cli_dir / done.sc_path.name)
    assert gui_sc.pixel_array.shape == cli_sc.pixel_array.shape
    diff = np.abs(gui_sc.pixel_array.astype(np.int16) - cli_sc.pixel_array.astype(np.int16))
    assert float(diff.mean()) < 0.5  # same rendering, overlay and legend (float noise at most)
    assert gui_sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID


def test_export_without_a_result_explains_why(qtbot, window, tmp_path: Path) -> None:
    window.export_dicom(tmp_path / "nothing")
    assert "wait for the model's answer" in window.message_bar.text()
    assert not (tmp_path / "nothing").exists()
