"""The `Study`: what every loader returns and every consumer (display, model, batch) reads.

Pixels are float32 in *modality units* (HU for CT after the Modality LUT; raw stored values for
radiographs). Display and model input are two separate transforms of the same Study, so changing
the on-screen window never changes what the model sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Window:
    """A display window (VOI): centre/level and width, in modality units."""

    center: float
    width: float
    name: str = ""

    @property
    def low(self) -> float:
        return self.center - self.width / 2.0

    @property
    def high(self) -> float:
        return self.center + self.width / 2.0


#: Standard CT window presets (radiology convention: width, level in HU).
CT_PRESETS: dict[str, Window] = {
    "lung": Window(center=-600.0, width=1500.0, name="lung"),
    "mediastinum": Window(center=50.0, width=350.0, name="mediastinum"),
    "bone": Window(center=500.0, width=2000.0, name="bone"),
}


@dataclass
class Study:
    """One image or one volume, ready to display or to feed a model.

    Attributes:
        frames: (N, H, W) float32 array in modality units; N == 1 for a single radiograph, N
            slices for a CT volume (sorted head-first along the patient axis), N frames for a
            multi-frame object.
        modality: DICOM modality ("CT", "CR", "DX", ...) or "OT" for ordinary pictures.
        photometric: photometric interpretation of the source ("MONOCHROME1", "MONOCHROME2", "RGB" ...).
        invert: True when the display (and the model input) must be inverted so that dense tissue
            is bright, i.e. MONOCHROME1 sources.
        pixel_spacing: (row, column) spacing in mm, or None when unknown.
        slice_spacing: distance between slices in mm for volumes, else None.
        window: the default display window.
        windows: named windows offered to the user: the DICOM's own (first), then presets.
        metadata: safe, displayable fields (no patient identifiers).
        phi: protected health information (name, ID, birth date, ...), hidden unless asked for.
        notes: human-readable notes about conversions done while loading (e.g. RGB -> grayscale).
        source: the file (or folder for a series) this came from.
        uids: StudyInstanceUID / SeriesInstanceUID / SOPInstanceUID(s) when DICOM.
        slice_positions: patient-axis position of each frame (mm) for volumes, else None.
        voi_lut: optional DICOM VOI LUT (lookup table applied to modality values) for display.
        dropped: slices of a series that could not be decoded and are not in ``frames``:
            (file path, reason) each. A series answer over the remaining slices cannot see a finding
            on these, so every consumer must show that slices were dropped.
        n_found: number of slices found for a series (``n_frames`` of them were used), else None.
    """

    frames: np.ndarray
    modality: str = "OT"
    photometric: str = "MONOCHROME2"
    invert: bool = False
    pixel_spacing: tuple[float, float] | None = None
    slice_spacing: float | None = None
    window: Window = field(default_factory=lambda: Window(127.5, 255.0, "full range"))
    windows: dict[str, Window] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    phi: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    source: Path | None = None
    uids: dict[str, str] = field(default_factory=dict)
    slice_positions: list[float] | None = None
    voi_lut: VoiLut | None = None
    dropped: list[tuple[str, str]] = field(default_factory=list)
    n_found: int | None = None

    def __post_init__(self) -> None:
        frames = np.asarray(self.frames)
        if frames.ndim == 2:
            frames = frames[None]
        if frames.ndim != 3:
            raise ValueError(f"Study.frames must be (N, H, W), got shape {frames.shape}")
        self.frames = np.ascontiguousarray(frames, dtype=np.float32)

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of one frame."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])

    @property
    def is_volume(self) -> bool:
        return self.n_frames > 1 and self.modality == "CT"

    def frame(self, index: int = 0) -> np.ndarray:
        return self.frames[index]

    def middle_index(self) -> int:
        return self.n_frames // 2


@dataclass(frozen=True)
class VoiLut:
    """A DICOM VOI LUT: values below `first_mapped` map to lut[0], above the table to lut[-1]."""

    lut: np.ndarray
    first_mapped: int
    explanation: str = ""

    def apply(self, values: np.ndarray) -> np.ndarray:
        idx = np.clip(np.rint(values).astype(np.int64) - self.first_mapped, 0, len(self.lut) - 1)
        return self.lut[idx].astype(np.float32)
