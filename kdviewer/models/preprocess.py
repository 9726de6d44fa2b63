"""Study -> model input, exactly as a bundle's manifest says. numpy + Pillow only (no torch, no Qt).

Training (``training.data``) and inference (``kdviewer.inference``) both call `preprocess_frame`, so
what the model saw while learning is bit-for-bit what it sees in the viewer. Display windowing is a
different transform (`kdviewer.imaging.windowing`) and never feeds the model.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from kdviewer.imaging._arrays import percentiles
from kdviewer.imaging.study import Study
from kdviewer.models.manifest import Preprocessing


def intensity_range(
    frame: np.ndarray, pre: Preprocessing, study: Study | None = None
) -> tuple[np.ndarray, float, float]:
    """The modality-value interval mapped to [0, 1] per ``pre.intensity``: (frame, low, high).

    The returned frame is the input, or its VOI-LUT output when the 'voi' window refers to LUT units.
    """
    frame = np.asarray(frame, dtype=np.float32)
    if pre.intensity == "window":
        lo = pre.window_center - pre.window_width / 2.0  # type: ignore[operator]
        hi = pre.window_center + pre.window_width / 2.0  # type: ignore[operator]
    elif pre.intensity == "voi" and study is not None:
        # With a VOI LUT the default window is in LUT-output units: map the frame through it first.
        if study.voi_lut is not None:
            frame = study.voi_lut.apply(frame)
        lo, hi = study.window.low, study.window.high
    else:
        # Robust min/max: a few hot pixels or burned-in labels must not squash the anatomy. Large
        # frames are sampled on a regular grid (~256k pixels): the same grey levels, far cheaper.
        step = max(1, int(np.sqrt(frame.size / 262_144)))
        sample = frame[::step, ::step]
        lo, hi = percentiles(sample, (0.5, 99.5)) if sample.size > 64 else (frame.min(), frame.max())
    return frame, float(lo), float(hi)


def _map_unit(img: np.ndarray, lo: float, hi: float, invert: bool) -> np.ndarray:
    scale = hi - lo
    if not np.isfinite(scale) or scale <= 1e-6:
        out = np.zeros(img.shape, np.float32)
    else:
        out = (img - np.float32(lo)) * np.float32(1.0 / scale)
        np.clip(out, 0.0, 1.0, out=out)
    if invert:
        out = 1.0 - out
    return out.astype(np.float32, copy=False)


def to_unit_range(frame: np.ndarray, pre: Preprocessing, study: Study | None = None) -> np.ndarray:
    """Map modality values of one frame to float32 [0, 1] according to ``pre.intensity``."""
    frame, lo, hi = intensity_range(frame, pre, study)
    return _map_unit(frame, lo, hi, bool(study is not None and study.invert))


def resize_and_crop(img: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Resize the shorter side to ``pre.resize`` (bilinear, float) and centre-crop ``input_size``."""
    h, w = img.shape
    if pre.resize == pre.input_size:
        new_h = new_w = pre.input_size
    else:
        s = pre.resize / min(h, w)
        new_h, new_w = max(pre.input_size, round(h * s)), max(pre.input_size, round(w * s))
    if (new_h, new_w) != (h, w):
        # Reduce huge images in integer steps first (box filter) so 2048^2 -> 224 is both fast and
        # anti-aliased, then finish with bilinear to the exact size.
        pil = Image.fromarray(img, mode="F")
        factor = min(h // new_h, w // new_w)
        if factor >= 2:
            pil = pil.reduce(factor)
        img = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR), dtype=np.float32)
    top = (img.shape[0] - pre.input_size) // 2
    left = (img.shape[1] - pre.input_size) // 2
    return img[top : top + pre.input_size, left : left + pre.input_size]


def crop_box(shape: tuple[int, int], pre: Preprocessing) -> tuple[int, int, int, int]:
    """The region (top, left, height, width) of the *original* frame that the model input covers.

    Used to map saliency maps back onto the original image geometry.
    """
    h, w = shape
    if pre.resize == pre.input_size:
        return 0, 0, h, w
    s = pre.resize / min(h, w)
    new_h, new_w = max(pre.input_size, round(h * s)), max(pre.input_size, round(w * s))
    top = (new_h - pre.input_size) // 2
    left = (new_w - pre.input_size) // 2
    return (
        round(top / s),
        round(left / s),
        round(pre.input_size * h / new_h),
        round(pre.input_size * w / new_w),
    )


def normalize(img01: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """(H, W) in [0, 1] -> (C, H, W) float32 normalised with the manifest's mean/std."""
    c = pre.channels
    mean = np.asarray(pre.normalization.mean, dtype=np.float32)
    std = np.asarray(pre.normalization.std, dtype=np.float32)
    if mean.size == 1:
        mean = np.repeat(mean, c)
    if std.size == 1:
        std = np.repeat(std, c)
    out = np.repeat(img01[None], c, axis=0)
    return ((out - mean[:, None, None]) / std[:, None, None]).astype(np.float32, copy=False)


def preprocess_frame(frame: np.ndarray, pre: Preprocessing, study: Study | None = None) -> np.ndarray:
    """One frame of modality values -> (C, input_size, input_size) float32 model input."""
    # Resize first, then window: the linear map commutes with the (linear) resampling, so mapping the
    # 224^2 result instead of a 2048^2 radiograph gives the same input at a fraction of the cost; only
    # clipping at the window edges happens after instead of before the smoothing.
    frame, lo, hi = intensity_range(frame, pre, study)
    small = resize_and_crop(np.asarray(frame, dtype=np.float32), pre)
    return normalize(_map_unit(small, lo, hi, bool(study is not None and study.invert)), pre)


def preprocess_study(study: Study, pre: Preprocessing, frames: list[int] | None = None) -> np.ndarray:
    """Selected frames of a study (default: the middle one) -> (N, C, S, S) float32 batch."""
    idx = [study.middle_index()] if frames is None else frames
    return np.stack([preprocess_frame(study.frames[i], pre, study) for i in idx])
