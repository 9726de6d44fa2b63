"""Display windowing: modality values -> uint8, auto window, right-drag helper."""

from __future__ import annotations

import numpy as np
import pytest

from kdviewer.imaging import (
    CT_PRESETS,
    Study,
    VoiLut,
    Window,
    auto_window,
    display_frame,
    to_display,
    window_from_drag,
)


def test_linear_window_endpoints() -> None:
    w = Window(center=50.0, width=350.0)
    frame = np.array([[w.low - 100, w.low, 50.0, w.high, w.high + 100]], np.float32)
    out = to_display(frame, w)
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 0, 128, 255, 255]]


def test_invert() -> None:
    frame = np.array([[0.0, 255.0]], np.float32)
    assert to_display(frame, Window(127.5, 255.0), invert=True).tolist() == [[255, 0]]


def test_lung_window_on_hu() -> None:
    hu = np.array([[-1000.0, -600.0, 40.0, 700.0]], np.float32)
    out = to_display(hu, CT_PRESETS["lung"])
    assert out[0, 0] < out[0, 1] < out[0, 2] < out[0, 3] == 255
    assert 120 <= out[0, 1] <= 135  # -600 is the lung level


def test_tiny_width_on_float_data() -> None:
    frame = np.array([[0.0, 0.0005, 0.001]], np.float32)
    assert to_display(frame, Window(0.0005, 0.001)).tolist() == [[0, 128, 255]]
    # zero width does not divide by zero: it thresholds at the centre
    assert to_display(frame[:, ::2], Window(0.0005, 0.0)).tolist() == [[0, 255]]


def test_voi_lut_then_window() -> None:
    lut = VoiLut(lut=np.array([0, 10, 20, 30], np.float32), first_mapped=100)
    frame = np.array([[50.0, 100.0, 101.0, 103.0, 500.0]], np.float32)
    np.testing.assert_array_equal(lut.apply(frame), [[0, 0, 10, 30, 30]])
    out = to_display(frame, Window(15.0, 30.0), voi_lut=lut)
    assert out.tolist() == [[0, 0, 85, 255, 255]]


def test_display_frame_uses_voi_lut_only_for_default_window() -> None:
    lut = VoiLut(lut=np.array([0, 255], np.float32), first_mapped=0)
    default = Window(127.5, 255.0, "VOI LUT")
    study = Study(frames=np.array([[0.0, 1.0, 1000.0]], np.float32), window=default, voi_lut=lut)
    assert display_frame(study).tolist() == [[0, 255, 255]]
    assert display_frame(study, window=Window(500.0, 1000.0)).tolist() == [[0, 0, 255]]


def test_auto_window_ignores_outliers() -> None:
    rng = np.random.default_rng(0)
    frame = rng.normal(100.0, 10.0, (512, 512)).astype(np.float32)
    frame[0, 0] = 1e6
    frame[1, 1] = np.nan
    w = auto_window(frame)
    assert 60 < w.low < 80 and 120 < w.high < 140
    flat = auto_window(np.full((4, 4), 7.0, np.float32))
    assert flat.center == 7.0 and flat.width > 0


def test_window_from_drag_directions() -> None:
    w = Window(50.0, 350.0, "mediastinum")
    wider = window_from_drag(w, dx=100, dy=0)
    assert wider.width > w.width and wider.center == w.center
    narrower = window_from_drag(w, dx=-100, dy=0)
    assert 0 < narrower.width < w.width
    darker = window_from_drag(w, dx=0, dy=50)
    assert darker.center > w.center and darker.width == w.width
    assert window_from_drag(w, dx=256, dy=0).width == pytest.approx(700.0)
    assert window_from_drag(w, dx=-1e6, dy=0).width > 0
    assert window_from_drag(w, dx=256, dy=0, sensitivity=2).width == pytest.approx(1400.0)


def test_to_display_speed_on_large_frame() -> None:
    import time

    frame = np.random.default_rng(0).normal(0, 500, (2048, 2048)).astype(np.float32)
    to_display(frame, CT_PRESETS["lung"])
    start = time.perf_counter()
    out = to_display(frame, CT_PRESETS["lung"], invert=True)
    assert time.perf_counter() - start < 0.5
    assert out.shape == (2048, 2048)


def test_imaging_room_imports_no_torch_or_qt() -> None:
    import subprocess
    import sys

    code = (
        "import sys, kdviewer.imaging; "
        "bad = [m for m in ('torch', 'PySide6', 'onnxruntime') if m in sys.modules]; "
        "sys.exit(f'imaging imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_histogram_percentiles_are_numpys_bit_for_bit() -> None:
    """The fast (histogram) path of `percentiles` must give exactly np.percentile's numbers: the model
    input of every bundle depends on them (minmax intensity)."""
    from kdviewer.imaging._arrays import percentiles

    rng = np.random.default_rng(0)
    for i in range(600):
        n = int(rng.integers(1, 5000))
        kind = i % 6
        if kind == 0:
            a = rng.integers(0, 256, n).astype(np.float32)
        elif kind == 1:
            a = rng.integers(-1024, 3072, n).astype(np.float32)  # HU
        elif kind == 2:
            a = rng.integers(0, 65536, n).astype(np.uint16)
        elif kind == 3:
            a = rng.normal(0, 3, n).round().astype(np.float32)
        elif kind == 4:
            a = rng.integers(0, 3, n).astype(np.uint8)  # many ties
        else:
            a = rng.normal(0, 1, n).astype(np.float32)  # not integers: numpy's own path
        qs = (0.5, 99.5) if i % 2 else tuple(float(q) for q in rng.uniform(0, 100, 3))
        assert percentiles(a, qs) == tuple(float(v) for v in np.percentile(a, list(qs))), (kind, n, qs)
    with_nan = np.array([1.0, np.nan, 3.0], np.float32)
    assert np.isnan(percentiles(with_nan, (50,))[0])
