"""Inference on a `Study`: predict, teacher comparison, saliency maps and the OOD guard (no Qt).

Names are imported lazily so that light users (``kdviewer.inference.ood`` in the training exporter,
`kdviewer info`) do not pay for torch and grad-cam imports they do not need.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Classifier": "kdviewer.inference.predict",
    "Prediction": "kdviewer.inference.predict",
    "Comparison": "kdviewer.inference.compare",
    "compare_predictions": "kdviewer.inference.compare",
    "saliency": "kdviewer.inference.saliency",
    "SaliencyMap": "kdviewer.inference.saliency",
    "saliency_agreement": "kdviewer.inference.saliency",
    "overlay": "kdviewer.inference.saliency",
    "METHODS": "kdviewer.inference.saliency",
    "OodGuard": "kdviewer.inference.ood",
    "fit_ood_stats": "kdviewer.inference.ood",
    "ood_scores": "kdviewer.inference.ood",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kdviewer.inference' has no attribute {name!r}")
