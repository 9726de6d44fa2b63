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
    finite = np.isfinite(data)
    if finite.all():
        return data
    bad = int(data.size - np.count_nonzero(finite))
    fill = float(data[finite].min()) if finite.any() else 0.0
    notes.append(f"{bad} non-finite pixel values (NaN/inf) replaced by the image minimum")
    return np.where(finite, data, np.float32(fill)).astype(np.float32)
