"""The batch panel on a real folder (good PNGs + corrupt files) with a real tiny model bundle."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PySide6.QtCore import Qt

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (untrained) ResNet-18 student bundle at 32 px: manifest.json + student.onnx + student.pt."""
    torch = pytest.importorskip("torch")
    from kdviewer.models.architectures import build_model
    from kdviewer.models.bundle import save_manifest
    from kdviewer.models.manifest import Manifest, ModelSpec, Preprocessing
    from kdviewer.models.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("bundle") / "tiny"
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=2, in_channels=1).eval()
    export_onnx(model, root / "student.onnx", channels=1, input_size=32)
    torch.save(model.state_dict(), root / "student.pt")
    manifest = Manifest(
        name="tiny-test",
        class_names=["normal", "pneumonia"],
        preprocessing=Preprocessing(input_size=32, resize=32, channels=1),
        student=ModelSpec(
            architecture="resnet18", weights="student.pt", onnx="student.onnx", target_layer="layer4"
        ),
        synthetic_data=True,
    )
    save_manifest(root, manifest)
    return root


def _make_folder(root: Path, n_good: int = 8) -> tuple[Path, list[Path], list[Path]]:
    folder = root / "cases"
    folder.mkdir()
    rng = np.random.default_rng(1)
    good = []
    for i in range(n_good):
        arr = (rng.random((48, 48)) * 255).astype(np.uint8)
        arr[10 + i : 30, 12:36] = 230  # some structure so the images differ
        p = folder / f"case_{i:02d}.png"
        Image.fromarray(arr).save(p)
        good.append(p)
    bad = [folder / "broken.png", folder / "empty.dcm"]
    bad[0].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)  # PNG signature, damaged body
    bad[1].write_bytes(b"")
    (folder / "notes.txt").write_text("not an image at all\n")  # skipped: not a case, not an error
    return folder, good, bad


def _run(qtbot, panel, button) -> None:
    with qtbot.waitSignal(panel.batch_finished, timeout=120_000) as blocker:
        qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
    assert blocker.args[0] == "finished", panel.status.text()


def test_batch_panel_runs_sorts_filters_opens_and_exports(qtbot, tmp_path: Path, tiny_bundle: Path) -> None:
    from kdviewer.gui.batch_panel import BatchPanel

    folder, good, bad = _make_folder(tmp_path)
    opened: list[str] = []
    panel = BatchPanel(open_case=opened.append)
    qtbot.addWidget(panel)
    panel.folder.setText(str(folder))
    panel.bundle.setText(str(tiny_bundle))
    out_csv = tmp_path / "out" / "results.csv"
    panel.output.setText(str(out_csv))
    panel.workers.setValue(1)
    panel.show()

    _run(qtbot, panel, panel.start_button)
    assert out_csv.is_file()
    model, proxy = panel.model, panel.proxy
    assert model.rowCount() == len(good) + len(bad), [r["path"] for r in model.rows]
    errors = [r for r in model.rows if r.get("error")]
    assert len(errors) == len(bad)
    assert {Path(r["path"]).name for r in errors} == {p.name for p in bad}
    assert "file(s) could not be classified" in panel.count_label.text()
    assert "1 file(s) skipped, not images: notes.txt" in panel.status.text()
    assert panel.progress.value() == panel.progress.maximum()

    # Errors only / hide errors.
    panel.error_filter.setCurrentIndex(panel.error_filter.findData("only"))
    assert proxy.rowCount() == len(bad)
    panel.error_filter.setCurrentIndex(panel.error_filter.findData("hide"))
    assert proxy.rowCount() == len(good)
    # Error-text search (no rows match nonsense; the corrupt PNG matches its own name).
    panel.error_filter.setCurrentIndex(panel.error_filter.findData("all"))
    panel.text_filter.setText("broken")
    assert proxy.rowCount() == 1
    panel.text_filter.setText("")

    # Sort by the first probability column, numerically, both ways.
    prob_col = model.columns.index(model.prob_columns()[0])
    panel.error_filter.setCurrentIndex(panel.error_filter.findData("hide"))
    panel.table.sortByColumn(prob_col, Qt.SortOrder.AscendingOrder)
    vals = [float(proxy.index(r, prob_col).data()) for r in range(proxy.rowCount())]
    assert vals == sorted(vals)
    panel.table.sortByColumn(prob_col, Qt.SortOrder.DescendingOrder)
    vals = [float(proxy.index(r, prob_col).data()) for r in range(proxy.rowCount())]
    assert vals == sorted(vals, reverse=True)

    # Unreadable files (no probabilities) stay at the bottom in both sort orders.
    panel.error_filter.setCurrentIndex(panel.error_filter.findData("all"))
    for order in (Qt.SortOrder.AscendingOrder, Qt.SortOrder.DescendingOrder):
        panel.table.sortByColumn(prob_col, order)
        tail = proxy.visible_rows()[-len(bad) :]
        assert all(r["error"] for r in tail), order

    # Min probability: every shown row has a max class probability >= the threshold.
    panel.min_prob.setValue(0.99)
    kept = proxy.rowCount()
    panel.min_prob.setValue(0.5)  # with two classes every row qualifies
    assert proxy.rowCount() == len(good) >= kept
    panel.min_prob.setValue(0.0)

    # Label filter offers the predicted labels and narrows to them.
    labels = model.labels()
    assert labels and set(labels) <= {"normal", "pneumonia"}
    panel.label_filter.setCurrentIndex(panel.label_filter.findData(labels[0]))
    assert 0 < proxy.rowCount() <= len(good)
    assert all(row["label"] == labels[0] for row in proxy.visible_rows())
    panel.label_filter.setCurrentIndex(0)

    # OOD filter only keeps flagged rows (this bundle has no OOD statistics: none are flagged).
    panel.only_ood.setChecked(True)
    assert all(row.get("ood_flag") == "true" for row in proxy.visible_rows())
    panel.only_ood.setChecked(False)

    # Double-click opens the case through the callback.
    panel.error_filter.setCurrentIndex(panel.error_filter.findData("all"))
    index = proxy.index(0, 0)
    rect = panel.table.visualRect(index)
    # (Qt needs the press/release of a first click before a double-click event counts.)
    qtbot.mouseClick(panel.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    qtbot.mouseDClick(panel.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert len(opened) == 1 and Path(opened[0]).exists()

    # Export writes exactly the shown rows, in the shown order.
    panel.error_filter.setCurrentIndex(panel.error_filter.findData("hide"))
    exported = tmp_path / "export.csv"
    assert panel.export_csv(exported) == len(good)
    with open(exported, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == [r["path"] for r in proxy.visible_rows()]


def test_batch_panel_cancel_then_resume_completes_each_file_once(
    qtbot, tmp_path: Path, tiny_bundle: Path
) -> None:
    from kdviewer.gui.batch_panel import BatchPanel

    folder, good, bad = _make_folder(tmp_path, n_good=30)
    panel = BatchPanel()
    qtbot.addWidget(panel)
    panel.folder.setText(str(folder))
    panel.bundle.setText(str(tiny_bundle))
    out_csv = tmp_path / "results.csv"
    panel.output.setText(str(out_csv))
    panel.workers.setValue(1)

    # Cancel as soon as the first case is done.
    def cancel_on_first(info: dict) -> None:
        if (info.get("done") or 0) >= 1:
            panel.cancel()

    panel.progressed.connect(cancel_on_first)
    with qtbot.waitSignal(panel.batch_finished, timeout=120_000) as blocker:
        panel.start()
    assert blocker.args[0] == "cancelled", panel.status.text()
    first = panel.model.rowCount()
    assert 1 <= first < len(good) + len(bad)
    assert panel.resume_button.isEnabled()
    panel.progressed.disconnect(cancel_on_first)

    with qtbot.waitSignal(panel.batch_finished, timeout=120_000) as blocker:
        qtbot.mouseClick(panel.resume_button, Qt.MouseButton.LeftButton)
    assert blocker.args[0] == "finished", panel.status.text()
    paths = [r["path"] for r in panel.model.rows]
    assert len(paths) == len(good) + len(bad) == len(set(paths))
    assert not panel.resume_button.isEnabled()


def test_batch_panel_refuses_missing_inputs(qtbot, tmp_path: Path) -> None:
    from kdviewer.gui.batch_panel import BatchPanel

    panel = BatchPanel()
    qtbot.addWidget(panel)
    panel.folder.setText(str(tmp_path / "nope"))
    panel.bundle.setText(str(tmp_path / "no-bundle"))
    panel.start()
    assert panel.state == "idle" and panel.worker is None
    assert "folder" in panel.status.text() and "bundle" in panel.status.text()


def test_batch_panel_warns_of_a_domain_shift(qtbot, tmp_path: Path) -> None:
    """CT slices saved as pictures (no DICOM modality, so the modality gate lets them through) given to the
    trained X-ray test model: a visible domain-shift warning."""
    from _bundles import ct_volume, cxr_bundle, write_ct_png

    from kdviewer.gui.batch_panel import BatchPanel

    folder = tmp_path / "ct"
    for i in range(3):
        write_ct_png(folder / f"slice{i}.png", ct_volume(np.random.default_rng(i), n=1, size=64)[0])
    panel = BatchPanel()
    qtbot.addWidget(panel)
    panel.folder.setText(str(folder))
    panel.bundle.setText(str(cxr_bundle().path))
    panel.output.setText(str(tmp_path / "ct.csv"))
    panel.workers.setValue(1)
    panel.show()
    _run(qtbot, panel, panel.start_button)
    assert panel.shift_bar.isVisible() and panel.shift_bar.level == "warning"
    assert panel.shift_bar.label.text().startswith("DOMAIN SHIFT: 3 of 3")
    assert "DOMAIN SHIFT" not in panel.status.text()  # said once, in the bar
    panel.output.setText(str(tmp_path / "again.csv"))
    with qtbot.waitSignal(panel.batch_finished, timeout=120_000):
        panel.start()
        assert not panel.shift_bar.isVisible()  # a new run clears the old warning
    assert panel.shift_bar.isVisible()  # ... and the same folder warns again


def test_attention_rows_keep_readable_contrast(qtbot) -> None:
    """Tinted rows (error / OOD / disagreement) set both colours, with a large luminance contrast."""
    from PySide6.QtCore import Qt

    from kdviewer.gui.batch_model import BatchResultsModel

    model = BatchResultsModel()
    model.set_rows(
        ["path", "label", "ood_flag", "disagreement", "error"],
        [
            {"path": "a.png", "label": "x", "ood_flag": "true", "disagreement": "", "error": ""},
            {"path": "b.png", "label": "x", "ood_flag": "", "disagreement": "true", "error": ""},
            {"path": "c.png", "label": "", "ood_flag": "", "disagreement": "", "error": "corrupt"},
            {"path": "d.png", "label": "x", "ood_flag": "false", "disagreement": "false", "error": ""},
        ],
    )

    def lum(brush) -> float:
        c = brush.color()
        return 0.2126 * c.redF() + 0.7152 * c.greenF() + 0.0722 * c.blueF()

    for r in range(3):
        idx = model.index(r, 0)
        bg = model.data(idx, Qt.ItemDataRole.BackgroundRole)
        fg = model.data(idx, Qt.ItemDataRole.ForegroundRole)
        assert bg is not None and fg is not None
        assert lum(fg) - lum(bg) > 0.5
    assert model.data(model.index(3, 0), Qt.ItemDataRole.BackgroundRole) is None


def test_batch_panel_cluster_field_runs_on_dask(qtbot, tmp_path: Path, tiny_bundle: Path) -> None:
    """Empty Cluster = the built-in pool (Readers enabled); a scheduler address runs the batch on Dask
    (a LocalCluster inside this process) and gives the same rows; a malformed one is refused up front."""
    distributed = pytest.importorskip("distributed")
    from kdviewer.gui.batch_panel import BatchPanel

    folder, good, bad = _make_folder(tmp_path)
    panel = BatchPanel(open_case=lambda p: None)
    qtbot.addWidget(panel)
    panel.folder.setText(str(folder))
    panel.bundle.setText(str(tiny_bundle))
    panel.show()
    assert panel.cluster.text() == "" and panel.workers.isEnabled()
    panel.cluster.setText("somewhere:8786")
    assert not panel.workers.isEnabled()  # the pool's readers do not apply to a cluster
    panel.output.setText(str(tmp_path / "bad.csv"))
    qtbot.mouseClick(panel.start_button, Qt.MouseButton.LeftButton)
    assert panel.state == "idle" and "scheduler address" in panel.status.text()
    assert not (tmp_path / "bad.csv").exists()

    panel.cluster.setText("")
    panel.output.setText(str(tmp_path / "pool.csv"))
    _run(qtbot, panel, panel.start_button)
    with distributed.LocalCluster(n_workers=2, processes=False, dashboard_address=":0") as lc:
        panel.cluster.setText(lc.scheduler_address)
        panel.output.setText(str(tmp_path / "dask.csv"))
        _run(qtbot, panel, panel.start_button)
    assert panel.model.rowCount() == len(good) + len(bad)

    def rows(name: str) -> dict[str, dict[str, str]]:
        with open(tmp_path / name, newline="") as fh:
            return {r["path"]: {k: v for k, v in r.items() if not k.startswith("t_")}
                    for r in csv.DictReader(fh)}

    assert rows("dask.csv") == rows("pool.csv")
