"""Small numeric helpers shared by the CXR and CT phantoms (noise fields, blobs, soft masks)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage


def _resize(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Bilinear resize of a 2-D float array to `shape` (rows, cols), pixel centres aligned."""
    im = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), mode="F")
    return np.array(im.resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float32)


def blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur in pixels (float32 in, float32 out); sigma <= 0 returns a copy.

    Wide kernels are applied on a coarser grid and interpolated back, so cost does not grow with sigma.
    """
    a = np.asarray(a, dtype=np.float32)
    if sigma <= 0:
        return a.copy()
    f = int(sigma // 2)
    if sigma < 4 or min(a.shape) // f < 8:
        return ndimage.gaussian_filter(a, sigma, mode="nearest")
    small = _resize(a, (max(a.shape[0] // f, 1), max(a.shape[1] // f, 1)))
    small = ndimage.gaussian_filter(small, sigma / f, mode="nearest")
    return _resize(small, a.shape)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian noise low-passed with a Gaussian of `sigma` pixels.

    For wide kernels the noise is drawn on a coarser grid (statistically the same after low-passing),
    so the random draws, and hence the result, depend only on shape, sigma and the generator.
    """
    f = int(sigma // 2)
    if sigma >= 4 and min(shape) // f >= 8:
        small_shape = (shape[0] // f, shape[1] // f)
        n = rng.standard_normal(small_shape, dtype=np.float32)
        n = _resize(ndimage.gaussian_filter(n, sigma / f, mode="wrap"), shape)
    else:
        n = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    n -= n.mean()
    sd = float(n.std())
    return n / sd if sd > 0 else n


def soft_step(x: np.ndarray, width: float) -> np.ndarray:
    """A soft 0 -> 1 step at x = 0: a linear ramp over 4 * `width` (the logistic's slope at 0), float32."""
    out = np.asarray(x, dtype=np.float32) * np.float32(0.25 / max(width, 1e-6))
    out += np.float32(0.5)
    np.maximum(out, 0.0, out=out)
    return np.minimum(out, 1.0, out=out)


@dataclass(frozen=True)
class FourierTexture:
    """A band-limited random texture defined everywhere in 3-D (consistent across CT slices).

    value(x, y, z) = sum_i cos(k_i . p + phi_i) * sqrt(2 / m): zero mean, unit variance.
    """

    k: np.ndarray  # (m, 3) wave vectors, radians per unit
    phase: np.ndarray  # (m,)

    @classmethod
    def random(cls, rng: np.random.Generator, wavelength: float, m: int = 24) -> FourierTexture:
        direction = rng.standard_normal((m, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        freq = 2 * np.pi / (wavelength * rng.uniform(0.6, 1.6, m))
        return cls(k=(direction * freq[:, None]).astype(np.float32),
                   phase=rng.uniform(0, 2 * np.pi, m).astype(np.float32))

    def __call__(self, x: np.ndarray, y: np.ndarray, z: float | np.ndarray = 0.0) -> np.ndarray:
        out = np.zeros(np.broadcast(x, y).shape, dtype=np.float32)
        for (kx, ky, kz), ph in zip(self.k, self.phase, strict=True):
            out += np.cos(kx * x + ky * y + (kz * z + ph))
        return out * np.float32(np.sqrt(2.0 / len(self.phase)))


def segment_distance(x: np.ndarray, y: np.ndarray, p0: tuple[float, float],
                     p1: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each (x, y) to the segment p0-p1 and the position t in [0, 1] along it."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    ll = dx * dx + dy * dy
    t = np.clip(((x - p0[0]) * dx + (y - p0[1]) * dy) / max(ll, 1e-12), 0.0, 1.0)
    d = np.hypot(x - (p0[0] + t * dx), y - (p0[1] + t * dy))
    return d.astype(np.float32), t.astype(np.float32)


def ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float,
            angle: float = 0.0) -> np.ndarray:
    """Normalised elliptic radius: < 1 inside the ellipse (angle in radians)."""
    c, s = float(np.cos(angle)), float(np.sin(angle))
    u = (x - cx) * c + (y - cy) * s
    v = -(x - cx) * s + (y - cy) * c
    return np.sqrt((u / ax) ** 2 + (v / ay) ** 2).astype(np.float32)


def bbox_of(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the True pixels of a 2-D mask, x1/y1 exclusive; None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
