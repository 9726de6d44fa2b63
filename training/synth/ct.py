"""Axial chest CT phantom in Hounsfield units: air, subcutaneous fat, chest-wall muscle, ribs, sternum,
vertebra with spinal canal, lungs with 3-D vessels, heart with epicardial fat, aorta, trachea/bronchi,
mediastinal fat, liver dome at the lowest levels, and the scanner table.

Geometry is in millimetres in the DICOM patient frame (x to the patient's left = image right, y to
posterior = image down, z to the head). Anatomy (`CtAnatomy`, one per synthetic patient) and lesions
(`CtLesions`, one per study) are defined in 3-D, so consecutive slices of a series agree with each other.
`severe` studies carry ground glass (~-500 HU) with consolidated cores (~30 HU); `mild` studies carry
one small, faint ground-glass focus or nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .common import FourierTexture, blur, ellipse, soft_step

__all__ = [
    "CT_FOV_MM",
    "CtAnatomy",
    "CtCase",
    "CtLesions",
    "CtSlice",
    "ct_anatomy",
    "ct_case",
    "render_ct",
    "render_ct_slice",
]

#: Default reconstruction field of view (mm): pixel spacing = CT_FOV_MM / size (0.70 mm at 512 px).
CT_FOV_MM = 360.0
HU_MIN, HU_MAX = -1024.0, 3071.0
Pattern = Literal["none", "mild", "severe"]


@dataclass(frozen=True)
class CtAnatomy:
    """One synthetic patient's chest, in mm."""

    body_a: float  # half width
    body_b: float  # half antero-posterior depth
    body_cy: float  # centre (y) of the body outline
    rot: float  # small in-plane rotation of the patient (radians)
    fat: float  # subcutaneous fat thickness
    muscle: float  # chest wall muscle thickness
    heart: tuple[float, float, float, float, float]  # cx, dy (from body centre), ax, ay, angle
    heart_z: float  # level (mm) where the heart is largest
    liver_z: float  # level (mm) of the right diaphragm dome
    rib_phase: float
    vessels: list[tuple[float, float, float, float, float, float, float]] = field(default_factory=list)
    lung_hu: float = -860.0


@dataclass(frozen=True)
class CtLesions:
    """One study's lung lesions: 3-D Gaussian sub-blobs, patchy texture, target densities."""

    blobs: list[tuple[float, float, float, float, float, float]]  # x, y, z, rx, ry, rz (mm)
    ggo_hu: float
    consolidation_from: float  # lesion strength above which the lung is consolidated (> 1: never)
    texture: FourierTexture | None = None


@dataclass(frozen=True)
class CtCase:
    """Everything needed to render any slice of one study (anatomy, lesions, difficulty)."""

    anatomy: CtAnatomy
    lesions: CtLesions
    difficulty: float
    shift: tuple[float, float] = (0.0, 0.0)  # patient position on the table for this study (mm)


@dataclass
class CtSlice:
    """A rendered slice with its ground truth."""

    hu: np.ndarray  # float32 (S, S), integer-valued HU clipped to [-1024, 3071]
    lesion: np.ndarray  # bool
    lungs: np.ndarray  # bool
    spine: np.ndarray  # bool, vertebral body (for sanity checks)
    spacing_mm: float


def ct_anatomy(rng: np.random.Generator, difficulty: float = 0.5) -> CtAnatomy:
    """Draw one patient's chest; `difficulty` widens the anatomical variability."""
    v = 0.6 + 0.8 * difficulty

    def j(scale: float) -> float:
        return float(rng.normal(0.0, scale * v))

    a = float(np.clip(158 + j(10), 125, 175))
    b = float(np.clip(108 + j(8), 85, 130))
    cy = -12.0 + j(4)
    vessels: list[tuple[float, float, float, float, float, float, float]] = []
    for side in (-1.0, 1.0):
        hx, hy, hz = side * 0.30 * a, cy + 0.05 * b, 0.0
        trunks = [(hx, hy, hz, float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(-0.9, 0.9)), 5.5, 0)
                  for _ in range(int(rng.integers(12, 16)))]
        while trunks:
            x0, y0, z0, az, el, r, gen = trunks.pop()
            length = rng.uniform(12, 22) * (1.0 - 0.15 * gen)
            for _ in range(int(rng.integers(2, 4))):
                az += rng.normal(0, 0.2)
                el += rng.normal(0, 0.15)
                dx = np.cos(el) * np.cos(az) * length
                dy = np.cos(el) * np.sin(az) * length * 0.8
                dz = np.sin(el) * length
                x1 = x0 + dx + side * 4.0  # drift laterally, away from the hilum
                vessels.append(tuple(float(v) for v in (x0, y0, z0, x1, y0 + dy, z0 + dz, r)))  # type: ignore[arg-type]
                x0, y0, z0, r = x1, y0 + dy, z0 + dz, max(r * 0.8, 1.0)
            if gen < 3:
                for da in (-0.6, 0.6):
                    trunks.append((x0, y0, z0, az + da, el + rng.normal(0, 0.3), r * 0.85, gen + 1))
    # small peripheral vessels throughout the lungs, pointing away from the hila
    for _ in range(int(rng.integers(650, 800))):
        px_ = rng.uniform(-0.9 * a, 0.9 * a)
        py_ = cy + rng.uniform(-0.85, 0.95) * b
        pz_ = rng.uniform(-75, 75)
        hx = np.sign(px_) * 0.30 * a
        direction = np.array([px_ - hx, py_ - cy, pz_ * 0.6]) + rng.normal(0, 15, 3)
        direction /= max(float(np.linalg.norm(direction)), 1e-6)
        length = rng.uniform(8, 22)
        q = np.array([px_, py_, pz_]) + direction * length
        vessels.append((float(px_), float(py_), float(pz_), float(q[0]), float(q[1]), float(q[2]),
                        float(rng.uniform(0.8, 1.6))))
    return CtAnatomy(
        body_a=a,
        body_b=b,
        body_cy=cy,
        rot=float(np.deg2rad(j(2.0))),
        fat=float(np.clip(14 + j(5), 5, 30)),
        muscle=float(np.clip(11 + j(2), 7, 16)),
        heart=(30 + j(4), -0.22 * b + j(3), 0.42 * a + j(4), 0.34 * b + j(3), float(np.deg2rad(-35 + j(6)))),
        heart_z=-35.0 + j(8),
        liver_z=-55.0 + j(8),
        rib_phase=float(rng.uniform(0, 1)),
        vessels=vessels,
        lung_hu=-860.0 + j(12),
    )


def _lung_region(an: CtAnatomy, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    """Boolean aerated-lung region of the anatomy at level z (no lesions); used to place lesions."""
    return _layers(an, x, y, z)["lungs"] > 0.5


def ct_case(rng: np.random.Generator, difficulty: float = 0.5, pattern: Pattern = "none",
            anatomy: CtAnatomy | None = None, z_range: tuple[float, float] = (-15.0, 15.0),
            jitter: bool = True) -> CtCase:
    """Draw one study: the patient's anatomy (unless given), position on the table and lesions.

    Lesion centres lie at levels inside `z_range` and inside the lungs at those levels, so any slice
    through `z_range` that cuts a lesion shows it.
    """
    d = float(np.clip(difficulty, 0.0, 1.0))
    an = anatomy if anatomy is not None else ct_anatomy(rng, d)
    shift = (0.0, 0.0)
    if jitter:
        shift = (float(rng.normal(0, 6 * (0.5 + d))), float(rng.normal(0, 4 * (0.5 + d))))
    blobs: list[tuple[float, float, float, float, float, float]] = []
    if pattern == "severe":
        n_les = int(rng.integers(2, 5)) if d < 0.6 else int(rng.integers(1, 4))
        scale = 1.0 - 0.5 * d
        ggo_hu = -480.0 - 200.0 * d + rng.normal(0, 25)
        cons = float(rng.uniform(0.72, 0.9)) if rng.random() < 0.8 - 0.4 * d else 2.0
    elif pattern == "mild":
        n_les = 1
        scale = 0.28 + 0.15 * d
        ggo_hu = -620.0 - 100.0 * d + rng.normal(0, 20)
        cons = 2.0
    else:
        n_les, scale, ggo_hu, cons = 0, 0.0, -600.0, 2.0
    if n_les:
        grid = np.linspace(-170, 170, 48, dtype=np.float32)
        gx, gy = np.meshgrid(grid, grid)
        placed = 0
        for _ in range(10 * n_les):  # a level can (rarely) have no lung, e.g. deep in the liver dome
            if placed == n_les:
                break
            zc = float(rng.uniform(*z_range)) if z_range[1] > z_range[0] else float(z_range[0])
            lung = _lung_region(an, gx, gy, zc)  # patient frame (the table shift is applied later)
            if not lung.any():
                continue
            # peripheral and dependent (posterior) zones are favoured, as in viral/organising pneumonia
            yy, xx = gy[lung], gx[lung]
            periph = np.abs(xx) / an.body_a + np.clip(yy - an.body_cy, 0, None) / an.body_b
            w = np.exp(1.5 * periph).astype(np.float64)
            k = int(rng.choice(len(xx), p=w / w.sum()))
            cx, cy = float(xx[k]), float(yy[k])
            r = float(rng.uniform(22, 45)) * scale
            n_sub = int(rng.integers(2, 6)) if pattern == "severe" else 1
            for sub in range(n_sub):
                # the first sub-blob sits on the chosen lung point, so the lesion is always in the lung
                o = rng.normal(0, r * 0.5, 3) if sub else np.zeros(3)
                rr = r * rng.uniform(0.5, 0.9, 3)
                blobs.append((cx + float(o[0]), cy + float(o[1]), zc + float(o[2]) * 0.5, float(rr[0]),
                              float(rr[1]), max(float(rr[2]), 6.0)))
            placed += 1
    lesions = CtLesions(blobs=blobs, ggo_hu=float(ggo_hu), consolidation_from=cons,
                        texture=FourierTexture.random(rng, wavelength=14.0) if blobs else None)
    return CtCase(anatomy=an, lesions=lesions, difficulty=d, shift=shift)


def _layers(an: CtAnatomy, x: np.ndarray, y: np.ndarray, z: float) -> dict[str, np.ndarray]:
    """Soft (0..1) tissue layers at level z on mm grids x, y (patient frame, before the table)."""
    cy = an.body_cy
    c, s = float(np.cos(an.rot)), float(np.sin(an.rot))
    xr = c * x + s * (y - cy)
    yr = -s * x + c * (y - cy)  # relative to the body centre
    a, b = an.body_a, an.body_b
    # body: ellipse, flatter on the back (the patient lies on it)
    back = np.clip(yr, 0, None) / b
    rho = np.sqrt((xr / a) ** 2 + (np.clip(yr, None, 0) / b) ** 2 + back**3 * 0.85)
    px = 0.6
    body = soft_step((1.0 - rho) * min(a, b), px)
    rho_in = np.sqrt((xr / (a - an.fat)) ** 2 + (yr / (b - 0.7 * an.fat)) ** 2)
    inner = soft_step((1.0 - rho_in) * min(a, b), px)
    ar, br = a - an.fat - an.muscle, b - 0.7 * an.fat - an.muscle
    rho_c = np.sqrt((xr / ar) ** 2 + (yr / br) ** 2)
    cage_r = (rho_c - 1.0) * min(ar, br)  # ~ signed distance to the rib cage (mm)
    cavity = soft_step(-cage_r - 7.0, px)

    # vertebra (body + canal + posterior elements) and paraspinal muscles
    vy = br - 28.0
    vert = soft_step(1.0 - ellipse(xr, yr, 0.0, vy, 19.0, 16.0), 0.03)
    vert_core = soft_step(1.0 - ellipse(xr, yr, 0.0, vy, 16.5, 13.5), 0.03)
    canal = soft_step(1.0 - ellipse(xr, yr, 0.0, vy + 24.0, 8.0, 7.5), 0.05)
    lamina = soft_step(1.0 - ellipse(xr, yr, 0.0, vy + 26.0, 15.0, 13.0), 0.04) * (1.0 - canal)
    tip = br + 0.7 * an.fat + an.muscle - 8.0
    spinous = soft_step(4.0 - np.abs(xr), px) * soft_step(yr - (vy + 30), px) * soft_step(tip - yr, px)
    transverse = soft_step(1.0 - ellipse(np.abs(xr), yr, 24.0, vy + 18.0, 12.0, 5.0, 0.4), 0.05)
    post = np.maximum.reduce([lamina, spinous, transverse])
    paraspinal = soft_step(1.0 - ellipse(np.abs(xr), yr, 30.0, vy + 38.0, 26.0, 22.0), 0.05)

    # ribs: oblique cross-sections along the cage, pattern shifting slowly with z
    ribs = np.zeros_like(x)
    near = np.abs(cage_r) < 7.0  # only pixels near the cage can be rib
    ang = np.arctan2(yr[near] / br, xr[near] / ar)  # 0 = patient's left, pi/2 = posterior
    rad = cage_r[near] + 1.0
    rib_vals = np.zeros_like(ang)
    n_ribs = 5
    for side in (-1.0, 1.0):
        for i in range(n_ribs):
            # from anterior (-pi/2) around the side to posterior (near the spine, +pi/2)
            t = (i + 0.5 + an.rib_phase + 0.02 * z) % n_ribs / n_ribs
            phi = -np.pi / 2 + 0.25 + t * (np.pi - 0.45)
            phi_img = phi if side > 0 else np.pi - phi
            dphi = (ang - phi_img + np.pi) % (2 * np.pi) - np.pi
            arc = dphi * (0.5 * (ar + br))
            half_len = 4.5 + 5.0 * float(np.sin(t * np.pi)) * (0.7 + 0.6 * ((i * 0.37 + an.rib_phase) % 1))
            # anterior ends are costal cartilage: less dense than bone
            dens = 0.35 + 0.65 * float(np.clip((t - 0.05) / 0.25, 0.0, 1.0))
            rib = soft_step(1.0 - np.sqrt((arc / half_len) ** 2 + (rad / 3.4) ** 2), 0.08) * dens
            np.maximum(rib_vals, rib, out=rib_vals)
    ribs[near] = rib_vals
    sternum = soft_step(1.0 - ellipse(xr, yr, 0.0, -br + 4.0, 16.0, 6.0), 0.06) * float(z > -90)

    # mediastinum: heart (with epicardial fat), great vessels, airways, oesophagus, fat around them
    hx, hdy, hax, hay, hang = an.heart
    hs = float(np.sqrt(np.clip(1.0 - ((z - an.heart_z) / 60.0) ** 2, 0.0, 1.0)))
    heart = np.zeros_like(x)
    heart_fat = np.zeros_like(x)
    if hs > 0.05:
        heart = soft_step(1.0 - ellipse(xr, yr, hx, hdy, hax * hs, hay * hs, hang), 0.03)
        heart_fat = soft_step(1.0 - ellipse(xr, yr, hx, hdy, hax * hs + 5.0, hay * hs + 5.0, hang), 0.03)
    desc_aorta = soft_step(1.0 - ellipse(xr, yr, 22.0, vy - 18.0, 12.0, 12.0), 0.05)
    upper = float(np.clip((z - an.heart_z - 20.0) / 20.0, 0.0, 1.0))
    asc_aorta = soft_step(1.0 - ellipse(xr, yr, 8.0, -0.30 * b, 15.0, 15.0), 0.05) * upper
    svc = soft_step(1.0 - ellipse(xr, yr, -24.0, -0.22 * b, 9.0, 8.0), 0.06) * upper
    pa = soft_step(1.0 - ellipse(xr, yr, 26.0, -0.18 * b, 14.0, 12.0), 0.05) * float(
        np.clip(1.0 - abs(z - an.heart_z - 40.0) / 18.0, 0.0, 1.0))
    if z > an.heart_z + 45.0:
        airway = soft_step(1.0 - ellipse(xr, yr, 0.0, vy - 36.0, 9.0, 8.0), 0.08)
        airway_wall = soft_step(1.0 - ellipse(xr, yr, 0.0, vy - 36.0, 11.0, 10.0), 0.08)
    else:
        airway = np.zeros_like(x)
        airway_wall = np.zeros_like(x)
        if z > an.heart_z + 25.0:
            for side in (-1.0, 1.0):
                airway = np.maximum(airway, soft_step(1.0 - ellipse(xr, yr, side * 17, vy - 34, 6, 5.5), 0.1))
                airway_wall = np.maximum(airway_wall,
                                         soft_step(1.0 - ellipse(xr, yr, side * 17, vy - 34, 8, 7.5), 0.1))
    oeso = soft_step(1.0 - ellipse(xr, yr, -6.0, vy - 21.0, 7.0, 6.0), 0.08)
    vessels_med = np.maximum.reduce([desc_aorta, asc_aorta, svc, pa])
    med_core = soft_step(1.0 - ellipse(xr, yr, 0.0, (vy - br) / 2.0 + 4, 17.0, (br + vy) / 2.0), 0.03)
    mediastinum = np.maximum.reduce([med_core, heart_fat, _dilate(vessels_med), airway_wall, vert * 1.0,
                                     soft_step(1.0 - ellipse(xr, yr, 0.0, vy, 27.0, 22.0), 0.03)])
    liver = np.zeros_like(x)
    if z < an.liver_z + 25.0:
        lr = float(np.sqrt(max(0.0, (an.liver_z + 25.0 - z) * 2.0 * 90.0)))
        liver = soft_step(1.0 - ellipse(xr, yr, -0.42 * a, 0.2 * b, lr * 1.3, lr, 0.3), 0.05)
    lungs = cavity * (1.0 - mediastinum) * (1.0 - liver)
    return {
        "body": body, "inner": inner, "cavity": cavity, "lungs": lungs, "vert": vert, "vert_core": vert_core,
        "canal": canal, "post": post, "paraspinal": paraspinal, "ribs": ribs, "sternum": sternum,
        "heart": heart, "heart_fat": heart_fat, "vessels_med": vessels_med, "airway": airway,
        "airway_wall": airway_wall, "oeso": oeso, "mediastinum": mediastinum, "liver": liver,
        "yr": yr,
    }


def _dilate(a: np.ndarray, ) -> np.ndarray:
    """A soft layer grown by a thin rim of fat (cheap: a softer copy of itself)."""
    return np.clip(a * 1.6, 0.0, 1.0)


def _draw_vessels(an: CtAnatomy, x0: float, y0: float, sp: float, size: int, z: float,
                  shift: tuple[float, float]) -> np.ndarray:
    """Soft (0..1) cross-sections of the 3-D vessel tree at level z, each drawn in its bounding box."""
    out = np.zeros((size, size), dtype=np.float32)
    c, s = float(np.cos(an.rot)), float(np.sin(an.rot))
    for xa, ya, za, xb, yb, zb, r in an.vessels:
        if min(za, zb) - r > z or max(za, zb) + r < z:
            continue
        # vessel endpoints into the image frame (rotation about the body centre, then the table shift)
        cy = an.body_cy
        pa = (c * xa - s * (ya - cy) + shift[0], s * xa + c * (ya - cy) + cy + shift[1])
        pb = (c * xb - s * (yb - cy) + shift[0], s * xb + c * (yb - cy) + cy + shift[1])
        lo_x, hi_x = min(pa[0], pb[0]) - r - sp, max(pa[0], pb[0]) + r + sp
        lo_y, hi_y = min(pa[1], pb[1]) - r - sp, max(pa[1], pb[1]) + r + sp
        c0, c1 = max(int((lo_x - x0) / sp), 0), min(int((hi_x - x0) / sp) + 2, size)
        r0, r1 = max(int((lo_y - y0) / sp), 0), min(int((hi_y - y0) / sp) + 2, size)
        if c0 >= c1 or r0 >= r1:
            continue
        yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float32)
        xx = x0 + xx * sp
        yy = y0 + yy * sp
        d = np.array([pb[0] - pa[0], pb[1] - pa[1], zb - za], dtype=np.float32)
        ll = float(d @ d) or 1e-6
        t = np.clip(((xx - pa[0]) * d[0] + (yy - pa[1]) * d[1] + (z - za) * d[2]) / ll, 0.0, 1.0)
        dist = np.sqrt((xx - pa[0] - t * d[0]) ** 2 + (yy - pa[1] - t * d[1]) ** 2 + (z - za - t * d[2]) ** 2)
        v = soft_step(r - dist, max(0.35 * sp, 0.3))
        np.maximum(out[r0:r1, c0:c1], v, out=out[r0:r1, c0:c1])
    return out


def _lesion_strength(les: CtLesions, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    """0..1 lesion strength (patchy union of 3-D Gaussian blobs)."""
    f = np.zeros_like(x)
    for bx, by, bz, rx, ry, rz in les.blobs:
        q = ((x - bx) / rx) ** 2 + ((y - by) / ry) ** 2 + ((z - bz) / rz) ** 2
        np.maximum(f, np.exp(-0.5 * q), out=f)
    if les.texture is not None:
        f = f * (1.0 + 0.3 * np.clip(les.texture(x, y, z), -1.3, 1.3))
    return np.clip((f - 0.35) / 0.65, 0.0, 1.0).astype(np.float32)


def render_ct(case: CtCase, size: int = 256, z_mm: float = 0.0, rng: np.random.Generator | None = None,
              fov_mm: float = CT_FOV_MM) -> CtSlice:
    """Render one axial slice of `case` at level `z_mm`; `rng` draws the image noise (None: no noise)."""
    an, d = case.anatomy, case.difficulty
    s = int(size)
    sp = float(fov_mm) / s
    coords = (np.arange(s, dtype=np.float32) - (s - 1) / 2.0) * sp
    x_img, y_img = np.meshgrid(coords, coords)
    x, y = x_img - case.shift[0], y_img - case.shift[1]
    L = _layers(an, x, y, float(z_mm))

    def mix(hu: np.ndarray, layer: np.ndarray, value: float | np.ndarray) -> np.ndarray:
        return hu + (value - hu) * layer

    hu = np.full((s, s), -1000.0, dtype=np.float32)
    hu = mix(hu, L["body"], -95.0)  # subcutaneous fat
    hu = mix(hu, L["inner"], 45.0)  # chest wall muscle
    hu = mix(hu, L["paraspinal"] * L["body"], 50.0)
    hu = mix(hu, L["cavity"], -80.0)  # mediastinal / extrapleural fat, filled in below
    yr = L["yr"]
    gravity = np.clip((yr + an.body_b) / (2 * an.body_b), 0, 1) ** 2  # dependent lung is denser
    lung_hu = an.lung_hu + 60.0 * gravity
    hu = mix(hu, L["lungs"], lung_hu)
    hu = mix(hu, L["heart_fat"], -90.0)
    hu = mix(hu, L["heart"], 42.0)
    hu = mix(hu, L["vessels_med"], 40.0)
    hu = mix(hu, L["oeso"], 35.0)
    hu = mix(hu, L["airway_wall"], 30.0)
    hu = mix(hu, L["airway"], -990.0)
    hu = mix(hu, L["liver"] * L["cavity"], 58.0)

    lesion_mask = np.zeros((s, s), dtype=bool)
    lungs_soft = L["lungs"]
    if case.lesions.blobs:
        st = _lesion_strength(case.lesions, x, y, float(z_mm)) * lungs_soft
        g = st * st * (3.0 - 2.0 * st)  # smoothstep
        ggo = np.clip(g * 1.8, 0.0, 1.0)
        hu = mix(hu, ggo, case.lesions.ggo_hu)
        cons = soft_step(st - case.lesions.consolidation_from, 0.04) * lungs_soft
        hu = mix(hu, cons, 30.0)
        lesion_mask = (ggo > 0.25) & (lungs_soft > 0.5)

    vessels = _draw_vessels(an, float(coords[0]), float(coords[0]), sp, s, float(z_mm), case.shift)
    hu = mix(hu, vessels * lungs_soft, 40.0)

    # bone: cortex bright, medulla less so
    hu = mix(hu, L["vert"], 850.0)
    hu = mix(hu, L["vert_core"], 380.0)
    hu = mix(hu, L["post"] * L["body"], 700.0)
    hu = mix(hu, L["canal"], 15.0)
    rib_core = np.clip((L["ribs"] - 0.6) / 0.4, 0.0, 1.0)
    hu = mix(hu, L["ribs"] * L["body"], 800.0)
    hu = mix(hu, rib_core * L["body"], 450.0)
    hu = mix(hu, L["sternum"] * L["body"], 650.0)

    # table: a curved carbon-fibre shell with foam core, below the patient
    rows = np.flatnonzero((L["body"] > 0.5).any(axis=1))
    table_top = (float(coords[rows[-1]]) if rows.size else an.body_cy + an.body_b) + 1.5
    curve = table_top - 0.0007 * x_img**2  # a shallow cradle
    shell = soft_step(y_img - curve, 0.5) * soft_step(curve + 4.0 - y_img, 0.5)
    foam = soft_step(y_img - (curve + 4.0), 0.5) * soft_step(curve + 18.0 - y_img, 0.5)
    base = soft_step(y_img - (curve + 18.0), 0.5) * soft_step(curve + 21.0 - y_img, 0.5)
    span = soft_step(175.0 - np.abs(x_img), 1.0)
    hu = mix(hu, np.maximum(shell, base) * span, 250.0)
    hu = mix(hu, foam * span, -850.0)

    # partial volume + reconstruction blur, then correlated quantum noise (grows with difficulty)
    hu = blur(hu, 0.45 + 0.4 * min(1.0, 0.7 / sp))
    if rng is not None:
        sigma = 8.0 + 30.0 * d
        noise = blur(rng.standard_normal((s, s), dtype=np.float32), 0.7)
        noise *= sigma / max(float(noise.std()), 1e-6)
        hu = hu + noise * (0.6 + 0.4 * L["body"])  # less noise in air outside the patient
    hu = np.rint(np.clip(hu, HU_MIN, HU_MAX)).astype(np.float32)
    return CtSlice(hu=hu, lesion=lesion_mask, lungs=L["lungs"] > 0.5, spine=L["vert_core"] > 0.5,
                   spacing_mm=sp)


def render_ct_slice(rng: np.random.Generator, difficulty: float = 0.5, size: int = 256, lesion: bool = False,
                    z_mm: float = 0.0, severe: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One axial chest CT slice: (HU float32, integer-valued in [-1024, 3071]; lesion mask bool).

    With `lesion`, `severe` selects extensive ground glass + consolidation, otherwise one small faint
    ground-glass focus. The case (anatomy, lesions) is drawn from `rng` independently of `z_mm`, so calling
    this with equally seeded generators at consecutive `z_mm` gives consistent slices of one volume;
    lesions sit within z = -15..15 mm. Pixel spacing is CT_FOV_MM / size.
    """
    pattern: Pattern = ("severe" if severe else "mild") if lesion else "none"
    case = ct_case(rng, difficulty, pattern)
    return_slice = render_ct(case, size, z_mm, rng)
    return return_slice.hu, return_slice.lesion
