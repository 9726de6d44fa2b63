"""Display transforms: modality values -> 8-bit grey levels for the screen.

Nothing here changes a `Study`; the model never sees these pixels. The window is linear
(DICOM PS3.3 C.11.2.1.3.2 "LINEAR_EXACT": low = center - width/2 maps to black, high =
center + width/2 to white), which also works for float data with windows narrower than 1.
"""

from __future__ import annotations

import math

import numpy as np

from kdviewer.imaging._arrays import percentiles
from kdviewer.imaging.study import Study, VoiLut, Window

#: Smallest window width accepted anywhere (avoids division by zero on flat images).
MIN_WIDTH = 1e-6

# auto_window looks at no more than about this many pixels (strided subsample) to stay fast.
_AUTO_SAMPLE = 1 << 18


def to_display(
    frame: np.ndarray, window: Window, invert: bool = False, voi_lut: VoiLut | None = None
) -> np.ndarray:
    """Map one 2-D frame in modality units to uint8 grey levels through `window`.

    With `voi_lut`, the LUT is applied first and `window` is read in LUT-output units (this is how
    `Study.window` is meant when `Study.voi_lut` is set). `invert` (MONOCHROME1) flips the result so
    that dense tissue is bright.
    """
    values = voi_lut.apply(frame) if voi_lut is not None else np.asarray(frame, dtype=np.float32)
    width = max(float(window.width), MIN_WIDTH)
    low = float(window.center) - width / 2.0
    scale = np.float32(255.0 / width)
    out = np.subtract(values, np.float32(low), dtype=np.float32)
    out *= scale
    np.clip(out, 0.0, 255.0, out=out)
    if invert:
        np.subtract(np.float32(255.0), out, out=out)
    out += np.float32(0.5)
    return out.astype(np.uint8)


def display_frame(study: Study, index: int = 0, window: Window | None = None) -> np.ndarray:
    """uint8 image of frame `index` of `study` as a radiologist expects to see it.

    `window=None` uses the study's default window (through its VOI LUT when it has one); another
    window is applied to the modality values directly. MONOCHROME1 studies are inverted.
    """
    if window is None or (study.voi_lut is not None and window == study.window):
        return to_display(study.frame(index), study.window, study.invert, study.voi_lut)
    return to_display(study.frame(index), window, study.invert, None)


def _finite_sample(frame: np.ndarray) -> np.ndarray:
    arr = np.asarray(frame)
    if arr.ndim == 3 and arr.shape[0] > 16:  # a volume: a spread of slices is enough
        arr = arr[:: arr.shape[0] // 16]
    if arr.ndim >= 2:
        step = max(1, math.isqrt(max(arr.size // _AUTO_SAMPLE, 1)))
        arr = arr[..., ::step, ::step]
    flat = arr.ravel().astype(np.float32, copy=False)
    if flat.size and np.isfinite(flat.min()) and np.isfinite(flat.max()):
        return flat  # no NaN / inf (min/max would show them): no mask, no copy
    return flat[np.isfinite(flat)]


def auto_window(frame: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> Window:
    """Robust window from the `low_pct`..`high_pct` percentiles of the (sub-sampled) pixel values."""
    sample = _finite_sample(frame)
    if sample.size == 0:
        return Window(0.5, 1.0, "auto")
    lo, hi = percentiles(sample, (low_pct, high_pct))
    if hi - lo <= MIN_WIDTH:
        lo, hi = float(sample.min()), float(sample.max())
    if hi - lo <= MIN_WIDTH:
        return Window(lo, 1.0, "auto")
    return Window((lo + hi) / 2.0, hi - lo, "auto")


def full_range_window(frame: np.ndarray) -> Window:
    """Window spanning min..max of the finite values of `frame` ("full range")."""
    arr = np.asarray(frame)
    if arr.size == 0:
        return Window(0.5, 1.0, "full range")
    lo, hi = float(arr.min()), float(arr.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):  # only then pay for a masked copy
        finite = arr[np.isfinite(arr)]
        if finite.size == 0:
            return Window(0.5, 1.0, "full range")
        lo, hi = float(finite.min()), float(finite.max())
    if hi - lo <= MIN_WIDTH:
        return Window(lo, 1.0, "full range")
    return Window((lo + hi) / 2.0, hi - lo, "full range")


def window_from_drag(window: Window, dx: float, dy: float, sensitivity: float = 1.0) -> Window:
    """The window after a right-button drag of (dx, dy) screen pixels since `window` was current.

    Radiology convention: horizontal motion changes the width (right = wider = less contrast),
    vertical motion the level (down = higher level = darker image). Steps scale with the current
    width, so the same gesture feels the same on 8-bit pictures and on CT in HU: a 256-pixel
    drag changes the width by a factor of 2**sensitivity, the level by width * sensitivity / 2.
    """
    width = max(float(window.width), MIN_WIDTH)
    new_width = max(width * 2.0 ** (dx * sensitivity / 256.0), MIN_WIDTH)
    new_center = float(window.center) + dy * sensitivity * width / 512.0
    return Window(center=new_center, width=new_width, name="custom")
