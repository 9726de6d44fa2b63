"""The viewer's logic that needs no Qt: view geometry, scale bars, colour maps, case lists, labels.

Widgets in this package stay thin: they translate events into calls on these functions and paint the
results. Everything here is plain Python + numpy so it is unit-testable without a display and could
be reused by another front end.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdviewer.imaging.study import CT_PRESETS, Study, Window

# --------------------------------------------------------------------------------------------------
# View geometry
# --------------------------------------------------------------------------------------------------

MIN_ZOOM = 0.02
MAX_ZOOM = 40.0


@dataclass
class ViewTransform:
    """Maps image pixels to widget pixels: ``view = (image - center) * zoom + pane_center + pan``.

    ``center`` is the image centre, so a pure zoom keeps the image centred; ``pan`` is an offset in
    screen pixels. All functions keep the image point under the cursor fixed while zooming.
    """

    image_w: int = 1
    image_h: int = 1
    zoom: float = 1.0
    pan_x: float = 0.0
    pan_y: float = 0.0
    fitted: bool = True  # True while the user has not zoomed/panned: resizes refit the image

    def fit(self, view_w: float, view_h: float, margin: float = 0.98) -> None:
        if self.image_w <= 0 or self.image_h <= 0 or view_w <= 0 or view_h <= 0:
            return
        self.zoom = max(MIN_ZOOM, min(view_w / self.image_w, view_h / self.image_h) * margin)
        self.pan_x = self.pan_y = 0.0
        self.fitted = True

    def one_to_one(self) -> None:
        self.zoom = 1.0
        self.pan_x = self.pan_y = 0.0
        self.fitted = False

    def image_to_view(self, x: float, y: float, view_w: float, view_h: float) -> tuple[float, float]:
        return (
            (x - self.image_w / 2.0) * self.zoom + view_w / 2.0 + self.pan_x,
            (y - self.image_h / 2.0) * self.zoom + view_h / 2.0 + self.pan_y,
        )

    def view_to_image(self, vx: float, vy: float, view_w: float, view_h: float) -> tuple[float, float]:
        return (
            (vx - view_w / 2.0 - self.pan_x) / self.zoom + self.image_w / 2.0,
            (vy - view_h / 2.0 - self.pan_y) / self.zoom + self.image_h / 2.0,
        )

    def zoom_at(self, factor: float, vx: float, vy: float, view_w: float, view_h: float) -> None:
        """Multiply the zoom by ``factor`` keeping the image point under (vx, vy) where it is."""
        ix, iy = self.view_to_image(vx, vy, view_w, view_h)
        self.zoom = float(min(MAX_ZOOM, max(MIN_ZOOM, self.zoom * factor)))
        nx, ny = self.image_to_view(ix, iy, view_w, view_h)
        self.pan_x += vx - nx
        self.pan_y += vy - ny
        self.fitted = False

    def pan_by(self, dx: float, dy: float) -> None:
        self.pan_x += dx
        self.pan_y += dy
        self.fitted = False

    def image_rect(self, view_w: float, view_h: float) -> tuple[float, float, float, float]:
        """(x, y, w, h) of the whole image in view coordinates."""
        x0, y0 = self.image_to_view(0, 0, view_w, view_h)
        return x0, y0, self.image_w * self.zoom, self.image_h * self.zoom


def wheel_zoom_factor(angle_delta_y: float) -> float:
    """One notch (120 units) zooms by 1.25x; trackpads send smaller deltas and zoom proportionally."""
    return float(1.25 ** (angle_delta_y / 120.0))


# --------------------------------------------------------------------------------------------------
# Window / level
# --------------------------------------------------------------------------------------------------


def drag_window(start: Window, dx: float, dy: float, value_range: float) -> Window:
    """Radiology convention: drag right widens the window (less contrast), drag down raises the level
    (darker image). Sensitivity scales with the data range so CT (HU) and 8-bit PNGs feel alike.

    Used only when `kdviewer.imaging.windowing.window_from_drag` is unavailable.
    """
    step = max(value_range, 1.0) / 512.0
    width = max(1.0, start.width + dx * step * 2.0)
    center = start.center + dy * step
    return Window(center=center, width=width, name="custom")


def window_for_drag(start: Window, dx: float, dy: float, frame: np.ndarray) -> Window:
    """The window after a right-drag of (dx, dy) screen pixels, via the imaging room's convention."""
    try:
        from kdviewer.imaging.windowing import window_from_drag
    except ImportError:  # pragma: no cover - imaging room without the helper
        value_range = float(np.ptp(frame)) if frame.size else 255.0
        return drag_window(start, dx, dy, value_range)
    win = window_from_drag(start, dx, dy)
    return Window(center=float(win.center), width=float(win.width), name="custom")


def window_presets(study: Study) -> dict[str, Window]:
    """Windows offered for a study, in menu order: its default, its own named ones, then CT presets."""
    out: dict[str, Window] = {}
    default = study.window
    out[f"Default ({default.name})" if default.name else "Default"] = default
    for name, win in study.windows.items():
        if name not in out and win != default:
            out[name] = win
    if study.modality == "CT":
        for name, win in CT_PRESETS.items():
            out[name.capitalize()] = win
    return out


def format_window(win: Window) -> str:
    return f"W {win.width:.0f}  L {win.center:.0f}"


# --------------------------------------------------------------------------------------------------
# Scale bar
# --------------------------------------------------------------------------------------------------

_NICE = (1, 2, 5)


def nice_length(max_value: float) -> float:
    """The largest 1/2/5 x 10^k not above ``max_value`` (``max_value`` > 0)."""
    if max_value <= 0 or not math.isfinite(max_value):
        return 0.0
    exp = math.floor(math.log10(max_value))
    best = 0.0
    for e in (exp - 1, exp):
        for n in _NICE:
            v = n * 10.0**e
            if v <= max_value * (1 + 1e-9):
                best = max(best, v)
    return best


def scale_bar(mm_per_image_px: float | None, zoom: float, max_screen_px: float = 160.0) -> tuple[float, str]:
    """Screen length (px) and label of a scale bar, or (0, "") when the pixel spacing is unknown."""
    if not mm_per_image_px or mm_per_image_px <= 0 or zoom <= 0:
        return 0.0, ""
    mm_per_screen_px = mm_per_image_px / zoom
    length_mm = nice_length(max_screen_px * mm_per_screen_px)
    if length_mm <= 0:
        return 0.0, ""
    px = length_mm / mm_per_screen_px
    label = f"{length_mm / 10:g} cm" if length_mm >= 10 else f"{length_mm:g} mm"
    return px, label


# --------------------------------------------------------------------------------------------------
# Colour maps for saliency overlays
# --------------------------------------------------------------------------------------------------

COLORMAPS = ("jet", "inferno", "viridis", "hot")


def colormap_lut(name: str) -> np.ndarray:
    """(256, 3) uint8 lookup table; matplotlib when installed, else a built-in jet."""
    try:
        from matplotlib import colormaps

        cmap = colormaps[name]
        lut = cmap(np.linspace(0.0, 1.0, 256))[:, :3]
        return np.ascontiguousarray((lut * 255.0 + 0.5).astype(np.uint8))
    except Exception:  # pragma: no cover - matplotlib missing or unknown name
        x = np.linspace(0.0, 1.0, 256)
        r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
        g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
        b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
        return np.ascontiguousarray((np.stack([r, g, b], 1) * 255).astype(np.uint8))


def heatmap_rgba(heatmap: np.ndarray, cmap: str, floor: float = 0.15) -> np.ndarray:
    """Heatmap in [0, 1] (H, W) -> (H, W, 4) uint8 RGBA premultiplied-free, transparent where cold.

    Alpha ramps from 0 at ``floor`` to 255 at 0.5 so the coldest regions leave the anatomy untouched;
    the global opacity is applied when painting.
    """
    h = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0)
    h = np.clip(h, 0.0, 1.0)
    idx = (h * 255.0 + 0.5).astype(np.uint8)
    lut = colormap_lut(cmap)
    out = np.empty((*h.shape, 4), dtype=np.uint8)
    out[..., :3] = lut[idx]
    alpha = np.clip((h - floor) / max(1e-6, 0.5 - floor), 0.0, 1.0)
    out[..., 3] = (alpha * 255.0).astype(np.uint8)
    return out


# --------------------------------------------------------------------------------------------------
# Labels and overlays
# --------------------------------------------------------------------------------------------------

SYNTHETIC_MARKERS = ("SYNTHETIC", "PHANTOM", "KDVIEWER-SYNTH")


def is_synthetic(study: Study) -> bool:
    """True when the study says it is one of our phantoms (metadata, notes, PHI name or the file name)."""
    texts: list[str] = []
    texts.extend(str(v) for v in study.metadata.values())
    texts.extend(str(v) for v in study.phi.values())
    texts.extend(study.notes)
    if study.source is not None:
        texts.append(Path(study.source).name)
    blob = " ".join(texts).upper()
    return any(m in blob for m in SYNTHETIC_MARKERS)


#: Safe DICOM fields shown on the image corners, in order; missing ones are skipped.
CORNER_FIELDS_TOP_LEFT = ("Modality", "BodyPartExamined")  # descriptions are free text: PHI
CORNER_FIELDS_BOTTOM_LEFT = ("Manufacturer", "ViewPosition", "SliceThickness", "KVP")


def _meta(study: Study, key: str) -> str | None:
    for k in (key, key.lower()):
        v = study.metadata.get(k)
        if v not in (None, ""):
            return str(v)
    return None


def corner_text(
    study: Study, frame_index: int, window: Window, zoom: float, inverted: bool
) -> dict[str, list[str]]:
    """Text lines for the four image corners: safe fields only (never PHI)."""
    tl: list[str] = []
    for key in CORNER_FIELDS_TOP_LEFT:
        v = _meta(study, key)
        if v and not (key == "Modality" and v == study.modality):
            tl.append(v)
    tl.insert(0, study.modality)
    h, w = study.shape
    tl.append(f"{w} x {h}")
    tr = [format_window(window) + (f"  ({window.name})" if window.name else ""), f"Zoom {zoom * 100:.0f}%"]
    if inverted:
        tr.append("Inverted")
    if study.n_frames > 1:
        label = "Slice" if study.is_volume else "Frame"
        tr.insert(0, f"{label} {frame_index + 1} / {study.n_frames}")
        if study.slice_positions and frame_index < len(study.slice_positions):
            tr.insert(1, f"z = {study.slice_positions[frame_index]:.1f} mm")
    bl: list[str] = []
    for key in CORNER_FIELDS_BOTTOM_LEFT:
        v = _meta(study, key)
        if v:
            if key == "SliceThickness":
                v = f"Thickness {v} mm"
            elif key == "KVP":
                v = f"{v} kVp"
            bl.append(v)
    if study.pixel_spacing:
        bl.append(f"Spacing {study.pixel_spacing[0]:.3g} x {study.pixel_spacing[1]:.3g} mm")
    else:
        bl.append("Pixel spacing unknown (no scale)")
    return {"tl": tl, "tr": tr, "bl": bl}


def tag_rows(study: Study, show_phi: bool) -> list[tuple[str, str, bool]]:
    """(name, value, is_phi) rows for the tag panel; PHI values masked unless ``show_phi``."""
    rows: list[tuple[str, str, bool]] = []
    for k, v in sorted(study.metadata.items()):
        rows.append((k, str(v), False))
    for k, v in sorted(study.phi.items()):
        rows.append((k, str(v) if show_phi else "•••• hidden", True))
    if study.source is not None:
        rows.append(("(file)", str(study.source), False))
    rows.append(("(size)", f"{study.shape[1]} x {study.shape[0]} x {study.n_frames}", False))
    rows.append(("(photometric)", study.photometric, False))
    if study.pixel_spacing:
        rows.append(
            ("(pixel spacing mm)", f"{study.pixel_spacing[0]:g} \\ {study.pixel_spacing[1]:g}", False)
        )
    for note in study.notes:
        rows.append(("(note)", note, False))
    return rows


def format_ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


# --------------------------------------------------------------------------------------------------
# Cases in a folder
# --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One thing the viewer can open: a file, or a folder holding one DICOM series."""

    path: Path
    label: str
    kind: str = "file"  # "file" | "series"
    extra: dict = field(default_factory=dict)


def _is_image_file(p: Path) -> bool:
    try:
        from kdviewer.imaging.formats import is_supported_file
    except ImportError:  # pragma: no cover
        return p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm", ".tif", ".tiff")
    try:
        return bool(is_supported_file(p))
    except OSError:
        return False


def _dicom_series_uid(p: Path) -> str | None:
    try:
        import pydicom

        ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "Modality"])
        return str(ds.get("SeriesInstanceUID", "")) or None
    except Exception:
        return None


def _sniff(p: Path) -> str | None:
    try:
        from kdviewer.imaging.formats import sniff
    except ImportError:  # pragma: no cover
        return "dicom" if p.suffix.lower() in (".dcm", "") else "image"
    try:
        return sniff(p)
    except OSError:
        return None


def folder_is_series(folder: Path, files: list[Path] | None = None) -> bool:
    """A folder is one series when it holds >= 2 DICOM files sharing one SeriesInstanceUID."""
    files = files if files is not None else sorted(f for f in folder.iterdir() if f.is_file())
    dicoms = [f for f in files if _sniff(f) == "dicom"]
    if len(dicoms) < 2 or len(dicoms) != len([f for f in files if _is_image_file(f)]):
        return False
    uids = {_dicom_series_uid(dicoms[0]), _dicom_series_uid(dicoms[-1])}
    return len(uids) == 1 and None not in uids


def list_cases(folder: str | os.PathLike, max_cases: int = 5000) -> list[Case]:
    """Cases inside a folder: image files, and subfolders (or the folder itself) holding a DICOM series.

    Hidden files are skipped; order is natural by name.
    """
    root = Path(folder)
    files = sorted((f for f in root.iterdir() if f.is_file() and not f.name.startswith(".")), key=_natural)
    if folder_is_series(root, files):
        return [Case(root, root.name + f"  ({len(files)} slices)", "series")]
    cases: list[Case] = []
    for sub in sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=_natural):
        sub_files = sorted(f for f in sub.iterdir() if f.is_file() and not f.name.startswith("."))
        if folder_is_series(sub, sub_files):
            cases.append(Case(sub, sub.name + f"  ({len(sub_files)} slices)", "series"))
        if len(cases) >= max_cases:
            return cases
    for f in files:
        if _is_image_file(f):
            cases.append(Case(f, f.name, "file"))
            if len(cases) >= max_cases:
                break
    return cases


def _natural(p: Path) -> list[object]:
    import re

    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


def push_recent(items: Iterable[str], new: str, limit: int = 10) -> list[str]:
    """Most-recent-first list with ``new`` at the front, no duplicates, at most ``limit`` entries."""
    out = [new] + [i for i in items if i and i != new]
    return out[:limit]


# --------------------------------------------------------------------------------------------------
# Resources
# --------------------------------------------------------------------------------------------------


def resources_dir() -> Path:
    """The `resources/` folder: $KDVIEWER_RESOURCES, the frozen app's bundle dir, or the source tree."""
    env = os.environ.get("KDVIEWER_RESOURCES")
    if env:
        return Path(env)
    import sys

    frozen = getattr(sys, "_MEIPASS", None)
    if frozen:
        return Path(frozen) / "resources"
    return Path(__file__).resolve().parents[2] / "resources"


def sample_case_path() -> Path | None:
    samples = resources_dir() / "samples"
    # a real radiograph for the real default model first; the phantoms where it is not installed
    for name in ("cxr_kermany_sample.jpeg", "cxr_synthetic.dcm", "cxr_synthetic.png"):
        if (samples / name).is_file():
            return samples / name
    return None


# --------------------------------------------------------------------------------------------------
# Keyboard shortcuts (one table for the actions and the help dialog)
# --------------------------------------------------------------------------------------------------

SHORTCUTS: list[tuple[str, str, str]] = [
    # (action id, key sequence, description)
    ("open_file", "Ctrl+O", "Open an image file (PNG, JPEG, DICOM)"),
    ("open_folder", "Ctrl+Shift+O", "Open a folder (CT series or a list of cases)"),
    ("export_dicom", "Ctrl+E", "Export the result as DICOM (Structured Report + Secondary Capture)"),
    ("load_bundle", "Ctrl+M", "Load a model bundle"),
    ("model_card", "Ctrl+I", "Show the model card"),
    ("next_case", "N", "Next case in the list"),
    ("prev_case", "P", "Previous case in the list"),
    ("next_slice", "PgDown", "Next slice / frame (also Shift+wheel, Down)"),
    ("prev_slice", "PgUp", "Previous slice / frame (also Shift+wheel, Up)"),
    ("fit", "F", "Fit the image to the window"),
    ("one_to_one", "1", "Zoom 1:1 (one image pixel per screen pixel)"),
    ("invert", "I", "Invert grey levels"),
    ("reset_window", "R", "Reset window/level to the default"),
    ("preset_lung", "Ctrl+1", "CT lung window (W 1500 L -600)"),
    ("preset_mediastinum", "Ctrl+2", "CT mediastinum window (W 350 L 50)"),
    ("preset_bone", "Ctrl+3", "CT bone window (W 2000 L 500)"),
    ("compare", "T", "Compare with the teacher"),
    ("saliency", "S", "Toggle the saliency overlay"),
    ("phi", "Ctrl+H", "Show / hide protected health information in the tag panel"),
    ("cancel", "Esc", "Cancel running work"),
    ("help", "F1", "This list of shortcuts"),
    ("quit", "Ctrl+Q", "Quit"),
]
MOUSE_HELP: list[tuple[str, str]] = [
    ("Wheel", "Zoom around the cursor"),
    ("Shift+Wheel", "Scroll slices / frames"),
    ("Left drag", "Pan"),
    ("Right drag", "Window/level: right = wider window, down = higher level (darker)"),
    ("Double click", "Fit"),
    ("Drop a file or folder", "Open it"),
]
