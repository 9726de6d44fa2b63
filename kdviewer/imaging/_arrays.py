"""Small array helpers shared by the loaders (internal)."""

from __future__ import annotations

import numpy as np

#: ITU-R BT.601 luma weights used for every colour -> grayscale conversion.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """(..., 3 or 4) array -> (...) float32 luma; a 4th (alpha) channel is ignored.

    Computed channel by channel into one float32 output (plus one float32 temporary), never as a
    float32 copy of all channels: the memory caps of the loaders count on it.
    """
    out = np.multiply(rgb[..., 0], LUMA[0], dtype=np.float32)
    tmp = np.empty_like(out)
    for c in (1, 2):
        np.multiply(rgb[..., c], LUMA[c], out=tmp, dtype=np.float32)
        out += tmp
    return out


def replace_non_finite(data: np.ndarray, notes: list[str]) -> np.ndarray:
    """Replace NaN / inf by the minimum finite value (with a note); returns `data` itself when clean."""
    if data.size == 0 or (np.isfinite(data.min()) and np.isfinite(data.max())):
        return data  # min/max propagate NaN and show inf: two fast reductions instead of a mask
    finite = np.isfinite(data)
    bad = int(data.size - np.count_nonzero(finite))
    fill = float(data[finite].min()) if finite.any() else 0.0
    notes.append(f"{bad} non-finite pixel values (NaN/inf) replaced by the image minimum")
    return np.where(finite, data, np.float32(fill)).astype(np.float32)


#: Integer-valued samples spanning at most this many grey levels take the histogram path of `percentiles`.
_HIST_LEVELS = 1 << 20


def percentiles(sample: np.ndarray, qs: tuple[float, ...] | list[float]) -> tuple[float, ...]:
    """``np.percentile(sample, qs)`` (linear method), bit for bit, but without sorting when it can.

    Radiographs and CT are integers in modality units (8-16 bit stored values, integer rescale), so
    a histogram (``np.bincount``) gives the needed order statistics exactly in a fraction of the time
    numpy's partition takes on 256k float samples; they are then interpolated exactly as numpy does
    (``(n - 1) * q`` virtual index, ``_lerp``: ``a + (b - a) * g``, or ``b - (b - a) * (1 - g)`` for
    ``g >= 0.5``, in float64). Non-integer data, NaN, or more than 2^20 levels: ``np.percentile`` itself.
    ``tests/test_imaging_windowing.py`` checks the equality on many arrays.
    """
    flat = np.asarray(sample).ravel()
    n = flat.size
    if n == 0:
        raise ValueError("percentiles of an empty sample")
    lo_v, hi_v = flat.min(), flat.max()
    if not (np.isfinite(lo_v) and np.isfinite(hi_v)) or float(hi_v) - float(lo_v) >= _HIST_LEVELS:
        return tuple(float(v) for v in np.percentile(flat, list(qs)))
    if flat.dtype.kind == "f":
        offset = flat - lo_v  # exact for integer values below 2^24 (checked just below)
        ints = offset.astype(np.int32)
        if not np.array_equal(ints.astype(flat.dtype), offset):
            return tuple(float(v) for v in np.percentile(flat, list(qs)))
    else:
        ints = (flat.astype(np.int64) - int(lo_v)).astype(np.int32)
    cum = np.cumsum(np.bincount(ints))
    q = np.true_divide(np.asarray(qs, dtype=np.float64), 100)
    virtual = (n - 1) * q
    prev = np.floor(virtual)
    nxt = prev + 1
    above = virtual >= n - 1
    prev[above] = n - 1
    nxt[above] = n - 1
    below = virtual < 0
    prev[below] = 0
    nxt[below] = 0
    gamma = virtual - prev

    def order_stat(k: np.ndarray) -> np.ndarray:  # the k-th smallest value (0-based), as numpy holds it
        level = np.searchsorted(cum, k.astype(np.int64), side="right")
        return (level + lo_v).astype(flat.dtype)

    a, b = order_stat(prev), order_stat(nxt)
    diff = b - a
    out = np.add(a, diff * gamma)
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5, casting="unsafe")
    return tuple(float(v) for v in out)
