# ruff: noqa: F811 - pytest fixtures imported from test_gui_support are re-declared as arguments
"""Side panels with a real (tiny, trained) bundle: predictions, teacher comparison, saliency, model card,
tags/PHI, errors, settings and help."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QSettings, Qt
from test_gui_support import (  # noqa: F401 - fixtures
    gui_data,
    load_bundle_and_wait,
    open_and_wait,
    settings,
    tiny_bundle,
    window,
)

from kdviewer.gui.main_window import MainWindow

pytestmark = pytest.mark.gui


def test_tag_panel_hides_phi_until_clicked(qtbot, window, gui_data) -> None:
    open_and_wait(qtbot, window, gui_data["dicom"])
    panel = window.tag_panel
    values = " ".join(v for _k, v in panel.rows())
    assert "PHANTOM-0042" not in values and "hidden" in values
    qtbot.mouseClick(panel.phi_button, Qt.MouseButton.LeftButton)
    values = " ".join(v for _k, v in panel.rows())
    assert "PHANTOM-0042" in values
    assert panel.phi_button.text() == "Hide PHI"
    panel.filter.setText("modality")
    assert all("modality" in k.lower() for k, _v in panel.rows())
    # a new case hides PHI again
    open_and_wait(qtbot, window, gui_data["dicom"])
    assert not panel.phi_visible
    assert "PHANTOM-0042" not in " ".join(v for _k, v in panel.rows())


def test_predictions_and_teacher_comparison(qtbot, window, gui_data, tiny_bundle) -> None:
    load_bundle_and_wait(window, tiny_bundle)
    assert "DEMO MODEL" in window.banner.flags_text()
    assert "SYNTHETIC TRAINING DATA" in window.banner.flags_text()
    with qtbot.waitSignal(window.analysis_shown, timeout=60000) as blocker:
        window.open_path(gui_data["dicom"])
    result = blocker.args[0]
    panel = window.predictions
    pred = result.prediction
    assert result.comparison is None
    assert len(panel.rows) == 2
    shown = [bar.value for _l, bar, _t in panel.rows]
    np.testing.assert_allclose(shown, pred.probabilities, atol=1e-6)
    if pred.ood_flag:  # the trust rule: no label in the headline when the OOD guard fired
        assert panel.headline.text() == "No reliable answer"
        panel.details_toggle.setChecked(True)
    else:
        assert pred.label in panel.headline.text()
    assert panel.details_shown
    assert "Inference:" in panel.timing.text() and "student" in panel.timing.text()
    assert panel.badge.isHidden()
    assert "student" in window.status_timing.text()

    with qtbot.waitSignal(window.analysis_shown, timeout=120000) as blocker:
        qtbot.mouseClick(panel.compare_box, Qt.MouseButton.LeftButton)
    comp = blocker.args[0].comparison
    assert comp is not None and window.compare_enabled
    teacher_shown = [bar.value for _l, _s, bar in panel.rows]
    np.testing.assert_allclose(teacher_shown, comp.teacher.probabilities, atol=1e-6)
    assert not panel.badge.isHidden()
    assert ("DISAGREE" in panel.badge.text()) == bool(comp.disagree)
    assert panel.disagree_box.isHidden() != bool(comp.disagree)
    assert "teacher" in panel.timing.text()
    assert panel.ood_box.isHidden() != bool(pred.ood_flag)


def test_ct_per_slice_strip_follows_slices(qtbot, window, gui_data, tiny_bundle) -> None:
    load_bundle_and_wait(window, tiny_bundle)
    open_and_wait(qtbot, window, gui_data["ct"])
    panel = window.predictions
    assert window.result is not None and window.result.prediction.per_slice is not None
    assert len(panel.slice_strip.values) == 6
    window.canvas.set_frame(0)
    assert panel.slice_strip.current == 0
    assert panel.slice_label.text().startswith("Slice 1:")


def test_saliency_overlay_toggle_method_and_side_by_side(qtbot, window, gui_data, tiny_bundle) -> None:
    load_bundle_and_wait(window, tiny_bundle)
    open_and_wait(qtbot, window, gui_data["png"])
    sp = window.saliency_panel
    with qtbot.waitSignal(window.saliency_shown, timeout=120000) as blocker:
        qtbot.keyClick(window.canvas, Qt.Key.Key_S)
    res = blocker.args[0]
    assert sp.is_on() and res.method == "gradcam"
    panes = window.canvas.panes
    assert len(panes) == 1 and panes[0].heatmap is not None
    assert panes[0].heatmap.shape == window.study.shape  # original frame geometry
    # method change recomputes
    with qtbot.waitSignal(window.saliency_shown, timeout=120000) as blocker:
        sp.method.setCurrentText("eigencam")
    assert blocker.args[0].method == "eigencam"
    # opacity and colour map only restyle
    gen = window.runner.generation("saliency")
    sp.opacity.setValue(80)
    sp.cmap.setCurrentText("inferno")
    assert window.canvas.opacity == pytest.approx(0.8) and window.canvas.cmap == "inferno"
    assert window.runner.generation("saliency") == gen
    # side by side: student and teacher panes + an agreement score
    with qtbot.waitSignal(window.saliency_shown, timeout=120000) as blocker:
        sp.set_mode("side")
    res = blocker.args[0]
    assert set(res.maps) == {"student", "teacher"}
    assert [p.title for p in window.canvas.panes] == ["Student", "Teacher"]
    assert res.agreement is not None and "student vs teacher" in sp.agreement.text()
    # target class
    with qtbot.waitSignal(window.saliency_shown, timeout=120000) as blocker:
        sp.target.setCurrentIndex(1)  # first class
    assert all(m.target_class == 0 for m in blocker.args[0].maps.values())
    # toggle off removes the overlay
    qtbot.keyClick(window.canvas, Qt.Key.Key_S)
    assert not sp.is_on()
    assert len(window.canvas.panes) == 1 and window.canvas.panes[0].heatmap is None


def test_canvas_paints_a_heatmap_overlay(qtbot, window, gui_data) -> None:
    from kdviewer.gui.canvas import Pane

    open_and_wait(qtbot, window, gui_data["png"])
    c = window.canvas
    c.set_overlay_style(0.6, "jet")
    before = c.grab().toImage()
    heat = np.zeros(window.study.shape, np.float32)
    heat[100:160, 100:160] = 1.0
    c.set_panes([Pane("Student", heat, "test")])
    after = c.grab().toImage()
    x, y = c.transform.image_to_view(130, 130, *c.pane_size())
    px_before, px_after = before.pixelColor(int(x), int(y)), after.pixelColor(int(x), int(y))
    assert px_after != px_before
    assert px_after.red() > px_after.blue()  # hot end of jet


def test_model_card_and_recent_models(qtbot, window, tiny_bundle) -> None:
    load_bundle_and_wait(window, tiny_bundle)
    html = window.model_card_html()
    for needle in (
        "tiny-test-bundle",
        "DEMO MODEL",
        "SYNTHETIC DATA",
        "Intended use",
        "95% CI",
        "accuracy",
        "mobilenet_v3_small",
        "resnet18",
        "Tiny bundle for GUI tests",
    ):
        assert needle in html
    dlg = window.show_model_card()
    qtbot.addWidget(dlg)
    assert "Intended use" in dlg.browser.toPlainText()
    assert window.model_panel.card_btn.isEnabled()
    assert not window.model_panel.demo_chip.isHidden()
    assert str(tiny_bundle) in window.recent("recent/models")
    assert window.model_panel.recent.count() >= 1


def test_bad_bundle_is_reported_and_old_model_kept(qtbot, window, tiny_bundle, tmp_path) -> None:
    load_bundle_and_wait(window, tiny_bundle)
    bad = tmp_path / "bad_bundle"
    bad.mkdir()
    (bad / "manifest.json").write_text('{"schema_version": "9.0", "name": "x"}')
    window.load_bundle(bad)
    assert window.wait_idle(60)
    assert window.classifier is not None and window.classifier.manifest.name == "tiny-test-bundle"
    assert window.message_bar.isVisible() and "bad_bundle" in window.message_bar.label.text()


def test_corrupt_file_shows_readable_error_and_app_survives(qtbot, window, gui_data) -> None:
    with qtbot.waitSignal(window.error_shown, timeout=30000) as blocker:
        window.open_path(gui_data["corrupt"])
    assert window.wait_idle(30)
    msg = blocker.args[0]
    assert "broken.png" in msg and "Traceback" not in msg
    assert window.message_bar.isVisible()
    assert window.canvas.message_is_error and "broken.png" in window.canvas.message
    assert window.study is None
    # missing file, too
    window.open_path(gui_data["root"] / "does_not_exist.dcm")
    assert "Not found" in window.message_bar.label.text()
    # and the app still opens a good file afterwards; the error bar goes away
    open_and_wait(qtbot, window, gui_data["png"])
    assert window.study is not None and not window.message_bar.isVisible()


def test_settings_persist_between_windows(qtbot, tmp_path, gui_data) -> None:
    path = str(tmp_path / "persist.ini")
    s1 = QSettings(path, QSettings.Format.IniFormat)
    w1 = MainWindow(settings=s1, extra_tabs=False)
    qtbot.addWidget(w1)
    w1.saliency_panel.cmap.setCurrentText("viridis")
    w1.saliency_panel.opacity.setValue(70)
    w1.saliency_panel.method.setCurrentText("gradcam++")
    w1.actions_by_id["compare"].setChecked(True)
    w1.open_path(gui_data["png"])
    assert w1.wait_idle(60)
    w1.close()
    s2 = QSettings(path, QSettings.Format.IniFormat)
    w2 = MainWindow(settings=s2, extra_tabs=False)
    qtbot.addWidget(w2)
    assert w2.saliency_panel.cmap_name() == "viridis"
    assert w2.saliency_panel.opacity.value() == 70
    assert w2.saliency_panel.method_name() == "gradcam++"
    assert w2.compare_enabled and w2.predictions.compare_box.isChecked()
    assert str(gui_data["png"]) in w2.recent("recent/files")
    assert w2.recent_files_menu.actions()[0].text() == str(gui_data["png"])
    w2.runner.shutdown()


def test_help_dialog_lists_every_shortcut(qtbot, window) -> None:
    from kdviewer.gui.logic import SHORTCUTS

    dlg = window.show_help()
    qtbot.addWidget(dlg)
    keys = {dlg.table.item(r, 0).text() for r in range(dlg.table.rowCount())}
    assert {k for _i, k, _d in SHORTCUTS} <= keys
    for ident, key, _d in SHORTCUTS:
        assert window.actions_by_id[ident].shortcut().toString() != "", (ident, key)


def test_no_model_state_is_explicit(qtbot, window, gui_data) -> None:
    open_and_wait(qtbot, window, gui_data["png"])
    assert "NO MODEL LOADED" in window.banner.flags_text()
    assert "No model loaded" in window.predictions.headline.text()
    assert window.banner.text.text() == "Decision support only — not a diagnosis"


def test_help_rows_fit_title_once_and_n_p_with_one_case(qtbot, window, gui_data, tmp_path) -> None:
    """F1 rows are not cut and the Close button has no dark icon; the title names the app once; N/P with
    a single case say so in the status bar."""
    import shutil

    from PySide6.QtCore import QRect

    dlg = window.show_help()
    qtbot.addWidget(dlg)
    dlg.show()
    qtbot.waitExposed(dlg)
    t = dlg.table
    fm = t.fontMetrics()
    for r in range(t.rowCount()):
        text = t.item(r, 1).text()
        need = fm.boundingRect(QRect(0, 0, t.columnWidth(1) - 10, 10_000), Qt.TextFlag.TextWordWrap, text)
        assert t.rowHeight(r) >= need.height(), (r, text)
    assert dlg.close_button.icon().isNull()
    dlg.close()

    only = Path(shutil.copy(gui_data["png"], tmp_path / "only.png"))
    open_and_wait(qtbot, window, only)
    assert window.windowTitle() == "only.png"  # Qt adds " — kdviewer" itself: the name appears once
    window.statusBar().clearMessage()
    window.actions_by_id["next_case"].trigger()
    assert "Only one case is open" in window.statusBar().currentMessage()
    window.actions_by_id["prev_case"].trigger()
    assert "N / P step through" in window.statusBar().currentMessage()


def test_a_note_about_one_case_goes_away_with_the_next_case(qtbot, window, gui_data, tmp_path) -> None:
    from PIL import Image

    colour = tmp_path / "colour.png"
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = np.arange(64, dtype=np.uint8)[None, :] * 3
    Image.fromarray(rgb).save(colour)
    open_and_wait(qtbot, window, colour)
    assert window.message_bar.isVisible() and "grayscale" in window.message_bar.label.text()
    open_and_wait(qtbot, window, gui_data["png"])  # a grayscale case: the colour note was about the last one
    assert not window.message_bar.isVisible()
