"""The small family of typed errors every room raises; messages are written for a person to act on."""

from __future__ import annotations


class KDViewerError(Exception):
    """Base of every error kdviewer raises on purpose."""


class ImageError(KDViewerError):
    """A file could not be turned into pixels."""

    def __init__(self, message: str, path: object | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(message if path is None else f"{path}: {message}")


class UnsupportedImageError(ImageError):
    """The file is readable but not something we can show (wrong kind, unsupported codec...)."""


class CorruptImageError(ImageError):
    """The file claims to be an image but its bytes are damaged, truncated or empty."""


class NoPixelDataError(UnsupportedImageError):
    """A DICOM object without pixel data (RT plan, structured report, ...)."""

    def __init__(self, message: str, path: object | None = None, sop_class: str | None = None) -> None:
        self.sop_class = sop_class
        super().__init__(message, path)


class ImageTooLargeError(UnsupportedImageError):
    """The image exceeds the pixel-count cap (decompression-bomb guard)."""


class SeriesError(ImageError):
    """A folder of slices cannot be assembled into one consistent volume."""


class BundleError(KDViewerError):
    """A model bundle is missing, malformed, of an unknown schema version, or unsafe."""


class WeightsUnavailableError(KDViewerError):
    """Pretrained weights were requested but are not on this machine (and cannot be downloaded)."""


class InferenceError(KDViewerError):
    """A model could not be run on an input."""


class DicomExportError(KDViewerError):
    """A result could not be written as DICOM (source no longer readable, output not writable, ...)."""
