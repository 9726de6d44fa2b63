"""Image I/O: files on disk (DICOM, PNG, JPEG, TIFF, folders of CT slices) -> `Study`.

No torch and no Qt in this room: numpy, pydicom and Pillow only. `load` dispatches on content;
`to_display` / `display_frame` turn modality values into 8-bit grey levels for the screen.

Windows are in modality units (HU for CT), except one case: when `Study.voi_lut` is set (a DICOM
VOI LUT Sequence), `Study.window` spans the LUT *output* and must be used together with the LUT;
`display_frame(study, i, window)` applies that rule (the LUT only for the study's default window).
"""

from kdviewer.imaging.formats import (
    MAX_PIXELS,
    MAX_TOTAL_PIXELS,
    SUPPORTED_SUFFIXES,
    is_supported_file,
    sniff,
)
from kdviewer.imaging.loader import load
from kdviewer.imaging.series import SeriesInfo, load_series, scan_series
from kdviewer.imaging.study import CT_PRESETS, Study, VoiLut, Window
from kdviewer.imaging.windowing import (
    auto_window,
    display_frame,
    full_range_window,
    to_display,
    window_from_drag,
)

__all__ = [
    "CT_PRESETS",
    "MAX_PIXELS",
    "MAX_TOTAL_PIXELS",
    "SUPPORTED_SUFFIXES",
    "SeriesInfo",
    "Study",
    "VoiLut",
    "Window",
    "auto_window",
    "display_frame",
    "full_range_window",
    "is_supported_file",
    "load",
    "load_series",
    "scan_series",
    "sniff",
    "to_display",
    "window_from_drag",
]
