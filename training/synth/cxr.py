"""Frontal (PA) chest radiograph phantom: body, lungs, heart, mediastinum, ribs, spine, clavicles,
diaphragm, vessels, exposure variation and quantum noise; `pneumonia` adds patchy consolidations
strictly inside the lung fields.

Images are float32 in [0, 1], bright = dense (MONOCHROME2). Anatomy is drawn in a canonical frame
(x, y in [-1, 1]; image left = patient right) and then warped by the study's positioning jitter.
The anatomy of one synthetic *patient* (`CxrAnatomy`) is shared by all that patient's studies, so
patient-wise splits matter the way they do with real data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .common import _resize, blur, ellipse, smooth_noise, soft_step

__all__ = ["CxrAnatomy", "CxrPhantom", "cxr_anatomy", "cxr_phantom", "render_cxr"]

_MAX_RENDER = 1024  # larger images are interpolated from this size before noise is added


@dataclass(frozen=True)
class CxrAnatomy:
    """One synthetic patient's chest (canonical units, x/y in [-1, 1])."""

    body_hw: float
    neck_hw: float
    shoulder_y: float
    lung_w: tuple[float, float]  # lateral extent (right lung = image left, left lung)
    apex_y: tuple[float, float]
    apex_h: float
    dome_y: tuple[float, float]
    dome_h: tuple[float, float]
    med_w: float
    heart: tuple[float, float, float, float, float]  # cx, cy, ax, ay, angle
    rib_y0: float
    rib_dy: float
    rib_curv: float
    clav_y: float
    clav_slope: float
    vessels: list[tuple[float, float, float, float, float]] = field(default_factory=list)  # x0,y0,x1,y1,w


@dataclass
class CxrPhantom:
    """A rendered radiograph with its ground truth."""

    image: np.ndarray  # float32 (S, S) in [0, 1]
    lesion: np.ndarray  # bool (S, S)
    lungs: np.ndarray  # bool (S, S), visible lung fields (heart and mediastinum excluded)
    lesion_contrast: float  # amplitude of the consolidations before exposure/noise (0 if none)


def cxr_anatomy(rng: np.random.Generator, difficulty: float = 0.5) -> CxrAnatomy:
    """Draw one patient's anatomy; `difficulty` widens the anatomical variability."""
    v = 0.6 + 0.8 * difficulty

    def j(scale: float) -> float:
        return float(rng.normal(0.0, scale * v))

    apex = -0.74 + j(0.03)
    dome = 0.56 + j(0.04)
    lung_w = 0.74 + j(0.03)
    vessels: list[tuple[float, float, float, float, float]] = []
    for side in (-1.0, 1.0):
        hx, hy = side * (0.19 + j(0.01)), -0.04 + j(0.02)
        # a few tapering, gently wiggling trunks from the hilum, each branching twice
        stack = [(hx, hy, float(rng.uniform(-1.3, 1.2)), 0.016 * rng.uniform(0.9, 1.2), 0)
                 for _ in range(int(rng.integers(6, 9)))]
        while stack:
            x0, y0, a, w, gen = stack.pop()
            length = rng.uniform(0.07, 0.13) * (1.0 - 0.15 * gen)
            for _ in range(int(rng.integers(2, 4))):
                a += rng.normal(0, 0.18)
                x1, y1 = x0 + side * np.cos(a) * length, y0 + np.sin(a) * length
                vessels.append((float(x0), float(y0), float(x1), float(y1), float(w)))
                x0, y0, w = x1, y1, w * 0.82
            if gen < 2:
                for da in (-0.5, 0.45):
                    stack.append((x0, y0, a + da + rng.normal(0, 0.15), w * 0.8, gen + 1))
    return CxrAnatomy(
        body_hw=0.90 + j(0.03),
        neck_hw=0.20 + j(0.015),
        shoulder_y=-0.68 + j(0.03),
        lung_w=(lung_w + j(0.01), lung_w + j(0.01)),
        apex_y=(apex + j(0.01), apex + j(0.01) + 0.01),
        apex_h=0.75 + j(0.05),
        dome_y=(dome, dome + 0.05 + j(0.02)),
        dome_h=(0.17 + j(0.02), 0.15 + j(0.02)),
        med_w=0.075 + j(0.008),
        heart=(0.12 + j(0.025), 0.27 + j(0.03), 0.33 + j(0.025), 0.22 + j(0.02), -0.30 + j(0.06)),
        rib_y0=apex - 0.02 + j(0.01),
        rib_dy=0.105 + j(0.005),
        rib_curv=0.50 + j(0.05),
        clav_y=-0.60 + j(0.025),
        clav_slope=-0.20 + j(0.03),
        vessels=vessels,
    )


def _lung_masks(x: np.ndarray, y: np.ndarray, an: CxrAnatomy, px: float) -> np.ndarray:
    """Soft (0..1) lung fields before subtracting heart and mediastinum: rounded apices, lateral
    borders widening to the costophrenic angles, diaphragm domes below."""
    out = np.zeros_like(x)
    for i, side in enumerate((-1.0, 1.0)):
        u = x * side
        med = an.med_w + 0.03 * np.clip(y - an.apex_y[i], 0, None)
        # upper lobe: a half-ellipse dome (rounded apex), then the lateral wall down to the diaphragm
        wx = 0.55 * (an.lung_w[i] - an.med_w)
        cx = an.lung_w[i] - wx
        wy = an.apex_h * 0.7
        yc = an.apex_y[i] + wy
        upper = 1.0 - np.sqrt(((u - cx) / wx) ** 2 + ((y - yc) / wy) ** 2)
        lower = (wx + 0.04 * np.clip(y - yc, 0, None)) - np.abs(u - cx)
        shape = np.where(y < yc, upper * wx, np.minimum(lower, (an.lung_w[i] + 0.1) - u))
        dome_c = 0.40
        dome = an.dome_y[i] - an.dome_h[i] * np.clip(1.0 - ((u - dome_c) / 0.40) ** 2, 0, None)
        m = soft_step(u - med, px) * soft_step(shape, px) * soft_step(dome - y, px)
        out = np.maximum(out, m)
    return out


def _ribs(x: np.ndarray, y: np.ndarray, an: CxrAnatomy, lung_lat: float, px: float) -> np.ndarray:
    """Posterior ribs (bright, arched, cortical edges) and fainter, oblique anterior ribs."""
    d = np.abs(x) - 0.07
    out = np.zeros_like(x)
    # posterior ribs: rise from the spine, arch over the lung and turn down along the chest wall
    turn = np.clip(d - (lung_lat - 0.25), 0, None)
    yc = y - (-an.rib_curv * d + 0.75 * an.rib_curv * d**2 + 2.2 * turn**2)
    phase = (yc - an.rib_y0) / an.rib_dy
    phase = phase - 0.035 * np.clip(phase, 0, None) ** 1.4  # spacing widens inferiorly
    k = np.rint(phase)
    hw = (0.017 + 0.0015 * np.clip(k, 0, 10)) * (1.0 + 0.3 * np.clip(d, 0, 0.7))
    r = np.abs(phase - k) * an.rib_dy / hw
    prof = np.where(r < 1, 0.5 + 0.5 * r**6, 0.0) * soft_step(1 - r, 0.12)
    valid = (k >= 0) & (k <= 11)
    t = np.clip((y - np.mean(an.apex_y) + 0.06) / an.apex_h, 0.0, 1.0)
    thorax = 0.10 + (lung_lat + 0.02 - 0.10) * (1.0 - (1.0 - t) ** 2.2)
    amp = 0.8 + 0.2 * np.cos(k * 2.1 + float(an.rib_y0) * 40.0)  # ribs are not all equally dense
    ext = soft_step(thorax + 0.05 - d, px * 3) * soft_step(d, 0.01) * amp
    out += np.where(valid, prof, 0.0) * ext
    # anterior ribs: from the chest wall obliquely down towards the sternum, fading medially (cartilage)
    ya = y - 0.40 * (lung_lat - d)
    phase_a = (ya - (an.rib_y0 - 0.22)) / (an.rib_dy * 1.1)
    ka = np.rint(phase_a)
    ra = np.abs(phase_a - ka) * an.rib_dy * 1.1 / 0.022
    prof_a = np.where(ra < 1, 0.6 + 0.4 * ra**4, 0.0) * soft_step(1 - ra, 0.2)
    valid_a = (ka >= 1) & (ka <= 6)
    fade = soft_step(d - 0.22, 0.08) * soft_step(thorax - d, px * 2)
    out += 0.45 * np.where(valid_a, prof_a, 0.0) * fade
    return out.astype(np.float32)


def _spine(x: np.ndarray, y: np.ndarray, px: float) -> np.ndarray:
    period = 0.09
    ph = (y + 1.0) / period
    frac = np.abs(ph - np.rint(ph))  # 0 at disc
    body = soft_step(frac - 0.12, 0.03)
    col = soft_step(0.065 - np.abs(x), px)
    edges = np.exp(-((np.abs(x) - 0.062) / 0.008) ** 2)
    ped = np.exp(-(((np.abs(x) - 0.045) / 0.015) ** 2 + ((frac - 0.32) / 0.08) ** 2))
    return (col * (0.6 * body + 0.3 * edges) + 0.4 * ped).astype(np.float32)


def _clavicles(x: np.ndarray, y: np.ndarray, an: CxrAnatomy) -> np.ndarray:
    out = np.zeros_like(x)
    for side in (-1.0, 1.0):
        u = x * side
        uu = np.clip(u - 0.08, 0, 0.6)
        yc = an.clav_y + an.clav_slope * uu + 0.035 * np.sin(uu * 10.5)  # a gentle S
        r = np.abs(y - yc) / (0.030 - 0.008 * np.clip(u, 0, 0.6))
        band = np.where(r < 1, 0.6 + 0.4 * r**4, 0.0) * soft_step(1 - r, 0.15)
        out += band * soft_step(u - 0.09, 0.01) * soft_step(0.66 - u, 0.03)
    return out.astype(np.float32)


def _vessels(size: int, an: CxrAnatomy, to_pixel: np.ndarray) -> np.ndarray:
    """Tapered branching pulmonary vessels as anti-aliased lines (0..1, denser where thicker).

    `to_pixel` (2 x 3) maps canonical (x, y, 1) to pixel (column, row) coordinates.
    """
    ss = 2 if 512 < size <= 1024 else 1  # supersampling where thin vessels would alias
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    scale = float(np.sqrt(abs(np.linalg.det(to_pixel[:, :2]))))
    wmax = max(w for *_, w in an.vessels) if an.vessels else 1.0
    for x0, y0, x1, y1, w in sorted(an.vessels, key=lambda v: v[4]):
        p0 = to_pixel @ (x0, y0, 1.0)
        p1 = to_pixel @ (x1, y1, 1.0)
        width = max(round(2.0 * w * scale * ss), 1)
        value = round(255 * (w / wmax) ** 0.7)
        draw.line([((p0[0] + 0.5) * ss - 0.5, (p0[1] + 0.5) * ss - 0.5),
                   ((p1[0] + 0.5) * ss - 0.5, (p1[1] + 0.5) * ss - 0.5)], fill=value, width=width)
    out = np.asarray(canvas, dtype=np.float32) / 255.0
    if ss > 1:
        out = out.reshape(size, ss, size, ss).mean(axis=(1, 3))
    return out


def _lesions(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, lungs: np.ndarray,
             difficulty: float, size: int) -> np.ndarray:
    """Soft (0..1) patchy consolidation field, before clipping to the lungs."""
    inner = blur(lungs, max(size / 50.0, 1.0)) > 0.93
    rows, cols = np.nonzero(inner)
    if rows.size == 0:
        rows, cols = np.nonzero(lungs > 0.5)
    field = np.zeros_like(x)
    if rows.size == 0:
        return field
    # favour lower and peripheral zones, as lobar/bronchopneumonia often is
    weight = 1.0 + 1.5 * np.clip(y[rows, cols] + 0.2, 0, None) + 0.8 * np.abs(x[rows, cols])
    weight = weight.astype(np.float64)
    weight /= weight.sum()
    n_les = int(rng.choice([1, 1, 2, 2, 3])) if difficulty > 0.3 else int(rng.integers(1, 4))
    tex = smooth_noise(rng, x.shape, sigma=size / 64.0)
    tex2 = smooth_noise(rng, x.shape, sigma=size / 24.0)
    for _ in range(n_les):
        i = int(rng.choice(rows.size, p=weight))
        cx, cy = float(x[rows[i], cols[i]]), float(y[rows[i], cols[i]])
        radius = float(rng.uniform(0.09, 0.20)) * (1.0 - 0.55 * difficulty)
        for _ in range(int(rng.integers(3, 7))):
            ox, oy = (float(v) for v in rng.normal(0, radius * 0.55, 2))
            sd = radius * float(rng.uniform(0.35, 0.7))
            blob = np.exp(-((x - (cx + ox)) ** 2 + (y - (cy + oy)) ** 2) / (2 * sd * sd))
            np.maximum(field, blob, out=field)
    patchy = field * (1.0 + 0.35 * tex + 0.2 * tex2)
    return np.clip((patchy - 0.25) / 0.55, 0.0, 1.0).astype(np.float32)


def cxr_phantom(rng: np.random.Generator, difficulty: float = 0.5, size: int = 256, lesion: bool = False,
                anatomy: CxrAnatomy | None = None) -> CxrPhantom:
    """Render one frontal chest radiograph (and its lesion and lung masks).

    `anatomy` fixes the patient (draw it with `cxr_anatomy`); otherwise one is drawn from `rng`. All
    random draws that do not concern the lesion happen before the lesion's, so equally seeded calls
    with `lesion=False` and `lesion=True` give the same radiograph apart from the consolidation.
    """
    d = float(np.clip(difficulty, 0.0, 1.0))
    an = anatomy if anatomy is not None else cxr_anatomy(rng, d)
    out_size = int(size)
    if out_size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    s = min(out_size, _MAX_RENDER)  # anatomy is drawn at most at this size, then interpolated
    v = 0.5 + d
    # this study: positioning (rotation, magnification, shift) and exposure
    ang = float(np.deg2rad(rng.normal(0, 2.5 * v)))
    zoom = float(np.clip(rng.normal(1.0, 0.04 * v), 0.85, 1.15))
    tx, ty = (float(t) for t in rng.normal(0, 0.03 * v, 2))
    gain = float(rng.uniform(1.1, 1.25) * (1.0 - 0.1 * d * rng.uniform(-1, 1)))
    offset = float(rng.uniform(0.02, 0.05))
    gamma = float(rng.uniform(0.85, 1.15))
    gdir = rng.normal(0, 1, 2)
    gdir = gdir / max(float(np.linalg.norm(gdir)), 1e-6) * (0.04 + 0.06 * d)
    det_blur = 0.45 + 0.1 * float(rng.uniform())
    bubble_amt = float(rng.uniform(0.2, 1.0))
    breast_amt = (0.02 + 0.05 * d) * float(rng.uniform(0, 1))
    confounders = [
        (float(rng.uniform(-0.6, 0.6)), float(rng.uniform(-0.5, 0.4)), float(rng.uniform(0.03, 0.10)))
        for _ in range(int(rng.integers(0, 1 + int(3 * d))))
    ]
    noise_rng = np.random.default_rng(int(rng.integers(0, 2**63)))

    # pixel -> canonical patient coordinates (inverse of the positioning), and back for the vessels
    c = (np.arange(s, dtype=np.float32) + 0.5) / s * 2.0 - 1.0
    gx, gy = np.meshgrid(c, c)
    ca, sa = float(np.cos(ang)), float(np.sin(ang))
    qx, qy = (gx - tx) / zoom, (gy - ty) / zoom
    x = (ca * qx + sa * qy).astype(np.float32)
    y = (-sa * qx + ca * qy).astype(np.float32)
    half = s / 2.0
    to_pixel = np.array([[zoom * ca * half, -zoom * sa * half, (tx + 1.0) * half - 0.5],
                         [zoom * sa * half, zoom * ca * half, (ty + 1.0) * half - 0.5]])
    px = 2.0 / s / zoom

    # soft tissue: thickness of an elliptic cylinder; neck above sloping shoulders
    sh = np.clip((y - (an.shoulder_y - 0.40)) / 0.40, 0.0, 1.0) ** 0.6
    torso = an.body_hw * (0.95 + 0.05 * np.clip(y + 0.5, 0, 1)) - 0.04 * np.clip(y - 0.6, 0, None)
    hw = an.neck_hw + (torso + 0.04 - an.neck_hw) * sh
    thick = np.sqrt(np.clip(1.0 - (x / hw) ** 2, 0.0, None)) * soft_step(hw - np.abs(x), px)
    dens = 0.70 * thick**0.45 + 0.06 * soft_step(y - 0.55, 0.1) * thick

    lung_raw = _lung_masks(x, y, an, px)
    hx, hy, hax, hay, hang = an.heart
    heart = soft_step(1.0 - ellipse(x, y, hx, hy, hax, hay, hang), 0.02)
    # the heart sits on the diaphragm: no aerated lung under it
    below = soft_step(y - hy, 0.02) * soft_step(hax * 0.95 - np.abs(x - hx), 0.03)
    heart = np.maximum(heart, below)
    knob = soft_step(1.0 - ellipse(x, y, an.med_w + 0.01, -0.24, 0.06, 0.085), 0.02)
    med_hw = an.med_w + 0.05 * np.clip(y + 0.5, 0, 0.8)
    med = soft_step(med_hw - np.abs(x - 0.01), px) * soft_step(0.6 - y, 0.05)
    solid = np.maximum(np.maximum(heart, knob), med)
    lungs = lung_raw * (1.0 - solid)
    # air: deeper (darker) in the middle of the lung than at its edges; upper zones a bit darker
    depth = blur(lungs, s / 24.0)
    dens -= (0.32 * lungs + 0.24 * depth) * (1.0 + 0.15 * np.clip(-y, 0, None))
    # hila: pulmonary arteries and bronchi overlapping at the lung roots
    for side in (-1.0, 1.0):
        hil = np.exp(-(((x - side * (an.med_w + 0.10)) / 0.06) ** 2 + ((y + 0.04) / 0.10) ** 2))
        dens += 0.07 * hil * lungs
    trachea = soft_step(0.032 - np.abs(x), px) * soft_step(-0.28 - y, 0.03) * soft_step(y + 0.95, 0.05)
    dens -= 0.10 * trachea
    bubble = soft_step(1.0 - ellipse(x, y, 0.40, an.dome_y[1] + 0.10, 0.11, 0.06), 0.04)
    dens -= 0.09 * bubble * bubble_amt

    lung_lat = float(np.mean(an.lung_w))
    above = soft_step(float(np.mean(an.dome_y)) + 0.02 - y, 0.05)  # ribs fade over the dense abdomen
    dens += 0.12 * _ribs(x, y, an, lung_lat, px) * soft_step(hw - np.abs(x), 0.02) * (0.15 + 0.85 * above)
    dens += 0.035 * _spine(x, y, px)
    dens += 0.16 * _clavicles(x, y, an)
    dens += 0.10 * blur(_vessels(s, an, to_pixel), 0.6 * s / 256) * blur(lungs, s / 128)
    dens += 0.02 * smooth_noise(noise_rng, (s, s), s / 48.0) * lungs  # parenchymal texture

    # variability that is not disease: breast/pectoral soft tissue, benign focal densities
    dens += breast_amt * soft_step(y - 0.15, 0.12) * soft_step(np.abs(x) - 0.3, 0.1)
    for cx, cy, r in confounders:
        dens += 0.04 * d * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r)) * lungs

    amp = 0.0
    field = None
    if lesion:
        amp = float(0.25 * (1.0 - 0.85 * d) * rng.uniform(0.8, 1.2))
        field = _lesions(rng, x, y, lungs, d, s) * lungs
        dens += amp * field
    if out_size != s:
        dens, lungs = _resize(dens, (out_size, out_size)), _resize(lungs, (out_size, out_size))
        field = None if field is None else _resize(field, (out_size, out_size))
        s = out_size
        c = (np.arange(s, dtype=np.float32) + 0.5) / s * 2.0 - 1.0
        gx, gy = np.meshgrid(c, c)
    lung_mask = lungs > 0.5
    lesion_mask = np.zeros((s, s), dtype=bool)
    if field is not None:
        lesion_mask = (field > 0.15) & ndimage.binary_erosion(lung_mask, iterations=1)
        if not lesion_mask.any():  # a vanishingly small lesion: keep the label honest
            lesion_mask = (field >= field.max() * 0.5) & lung_mask & (field > 0)

    # exposure: contrast/brightness/gamma, smooth heel-effect gradient, quantum noise, detector blur
    img = np.clip(dens * gain + offset, 0.0, None) ** gamma
    img = img / (1.0 + 0.15 * img)  # a soft shoulder at the dense end
    img = img * (1.0 + float(gdir[0]) * gx + float(gdir[1]) * gy)
    sigma_n = 0.008 + 0.035 * d
    quantum = noise_rng.standard_normal((s, s), np.float32)
    img = img + sigma_n * np.sqrt(np.clip(img, 0, None) + 0.05) * quantum
    img = np.clip(blur(img, det_blur * s / min(s, _MAX_RENDER)), 0.0, 1.0).astype(np.float32)
    return CxrPhantom(image=img, lesion=lesion_mask, lungs=lung_mask, lesion_contrast=amp)


def render_cxr(rng: np.random.Generator, difficulty: float = 0.5, size: int = 256,
               lesion: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One frontal chest radiograph phantom: (image float32 in [0, 1], lesion mask bool)."""
    p = cxr_phantom(rng, difficulty, size, lesion)
    return p.image, p.lesion
