# ruff: noqa: F811 - pytest fixtures imported from test_gui_support are re-declared as arguments
"""Trust rules on every GUI surface: the modality gate (a CT series given to an X-ray bundle gets no class)
and the OOD display ("no reliable answer", the probabilities one click away) in the viewer's prediction
panel, the saliency panel, `render` and the batch table with its tooltips. Real bundles (the tiny trained
one, its manifest narrowed to CR/DX or its OOD threshold set to 0 so that the real guard fires), real
files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from test_gui_support import (  # noqa: F401 - fixtures
    gui_data,
    load_bundle_and_wait,
    open_and_wait,
    settings,
    tiny_bundle,
    window,
)

pytestmark = pytest.mark.gui

REASON = "this model reads chest radiographs (CR, DX); this image is CT"


def _variant(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    for key, value in changes.items():
        if key == "ood_threshold":
            m["ood"]["threshold"] = value
        else:
            m[key] = value
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.fixture()
def xray_bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    """The tiny bundle declaring what a chest X-ray model reads: CR and DX only."""
    return _variant(tiny_bundle, tmp_path / "xray", modality=["CR", "DX"])


@pytest.fixture()
def ood_bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    """The tiny bundle with an OOD threshold of 0: the real guard flags every case."""
    return _variant(tiny_bundle, tmp_path / "ood", ood_threshold=0.0)


def test_viewer_refuses_a_ct_series_with_an_xray_bundle(qtbot, window, gui_data, xray_bundle) -> None:
    load_bundle_and_wait(window, xray_bundle)
    window.saliency_panel.enabled.setChecked(True)
    open_and_wait(qtbot, window, gui_data["ct"])
    panel = window.predictions
    pred = window.result.prediction
    assert pred.refused == REASON and pred.label == ""
    assert panel.headline.text() == "No answer for this image"
    assert REASON in panel.subline.text()
    assert not panel.details_shown and panel.details_toggle.isHidden()  # no bars, nothing to expand
    assert panel.slice_strip.isHidden() and panel.ood_box.isHidden() and panel.badge.isHidden()
    assert "%" not in panel.headline.text()
    assert "No saliency map" in window.saliency_panel.status.text()
    # the same window, a radiograph: answered as usual
    open_and_wait(qtbot, window, gui_data["dicom"])
    pred = window.result.prediction
    assert pred.refused is None and panel.details_shown == (not pred.ood_flag)


def test_viewer_ood_says_no_reliable_answer_and_keeps_probabilities_one_click_away(
    qtbot, window, gui_data, ood_bundle
) -> None:
    load_bundle_and_wait(window, ood_bundle)
    open_and_wait(qtbot, window, gui_data["png"])
    panel = window.predictions
    pred = window.result.prediction
    assert pred.ood_flag and pred.refused is None
    assert panel.headline.text() == "No reliable answer"
    assert pred.label not in panel.headline.text() and "%" not in panel.headline.text()
    assert not panel.ood_box.isHidden() and "no reliable answer" in panel.ood_box.text()
    assert not panel.details_shown and not panel.details_toggle.isHidden()
    qtbot.mouseClick(panel.details_toggle, Qt.MouseButton.LeftButton)
    assert panel.details_shown
    shown = [bar.value for _l, bar, _t in panel.rows]
    assert shown == pytest.approx([float(p) for p in pred.probabilities], abs=1e-6)
    qtbot.mouseClick(panel.details_toggle, Qt.MouseButton.LeftButton)
    assert not panel.details_shown
    # the next flagged case starts collapsed again
    open_and_wait(qtbot, window, gui_data["dicom"])
    assert not panel.details_shown and panel.headline.text() == "No reliable answer"


def test_render_says_the_same(qtbot, gui_data, xray_bundle, ood_bundle, tmp_path) -> None:
    from kdviewer.gui.render import render_case

    answer: dict[str, str] = {}
    render_case(str(gui_data["ct"]), str(tmp_path / "ct.png"), str(xray_bundle), answer=answer)
    assert answer["headline"] == "No answer for this image" and REASON in answer["detail"]
    assert answer["refused"] == REASON
    answer = {}
    render_case(str(gui_data["png"]), str(tmp_path / "png.png"), str(ood_bundle), answer=answer)
    assert answer["headline"] == "No reliable answer" and answer["ood_flag"] == "true"
    assert (tmp_path / "png.png").is_file()


def _batch_csv(folder: Path, bundle: Path, out: Path) -> Path:
    from kdviewer.batch import run_batch

    run_batch(folder, bundle, out, workers=0)
    return out


def test_batch_table_answer_first_refusal_and_ood_rows(
    qtbot, gui_data, xray_bundle, ood_bundle, tmp_path
) -> None:
    from kdviewer.gui.batch_model import REFUSED_LABEL
    from kdviewer.gui.batch_panel import BatchPanel

    folder = tmp_path / "in"
    shutil.copytree(gui_data["ct"], folder / "ct")
    shutil.copy(gui_data["dicom"], folder / "radiograph.dcm")
    panel = BatchPanel()
    qtbot.addWidget(panel)
    panel.folder.setText(str(folder))
    panel.show()

    # X-ray bundle: the CT series is refused, the radiograph answered
    panel.load_results(_batch_csv(folder, xray_bundle, tmp_path / "xray.csv"))
    model = panel.model
    cols = model.columns
    assert cols[:3] == ["path", "label", "refused"] and cols[3].startswith("prob_")
    assert cols[-3:] == ["study_uid", "series_uid", "sop_uid"]
    for uid in ("study_uid", "series_uid", "sop_uid"):
        assert panel.table.isColumnHidden(cols.index(uid))
    panel.set_column_shown("series_uid", True)
    assert not panel.table.isColumnHidden(cols.index("series_uid"))
    ct = next(r for r in range(model.rowCount()) if model.rows[r]["path"].endswith("ct"))
    label = model.index(ct, cols.index("label"))
    assert model.data(label) == REFUSED_LABEL
    assert REASON in model.data(label, Qt.ItemDataRole.ToolTipRole)
    assert model.data(model.index(ct, cols.index("prob_nodule"))) == ""
    assert REFUSED_LABEL in model.labels()

    # every case flagged by the OOD guard: the label column says so, probabilities bracketed, tooltip explains
    panel.load_results(_batch_csv(folder, ood_bundle, tmp_path / "ood.csv"))
    model = panel.model
    cols = model.columns
    for r in range(model.rowCount()):
        raw = model.rows[r]
        assert raw["ood_flag"] == "true" and raw["label"] in ("normal", "nodule")
        assert model.data(model.index(r, cols.index("label"))) == "no reliable answer"
        p = model.data(model.index(r, cols.index("prob_nodule")))
        assert p.startswith("(") and p.endswith(")")
        tip = model.data(model.index(r, cols.index("label")), Qt.ItemDataRole.ToolTipRole)
        assert "No reliable answer" in tip and raw["label"] in tip
    assert model.labels() == ["no reliable answer"]
    panel.label_filter.setCurrentIndex(panel.label_filter.findData("no reliable answer"))
    assert panel.proxy.rowCount() == model.rowCount()
