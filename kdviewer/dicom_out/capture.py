"""The Secondary Capture: the case as a picture with the saliency overlay and a burned-in legend.

For PACS viewers that do not render SR. The picture is the frame the answer rests on (the slice that
drove a series aggregate, else the middle frame) in the study's *default* window — not whatever window
was on screen, so the viewer and the command line write the same picture for the same case — scaled so
its longer side is between `MIN_SIDE` and `MAX_SIDE` pixels, with the saliency map blended over it and a
legend band below. Trust rules: a refused study shows "NO CLASS" and the reason; an OOD-flagged one
shows "NO RELIABLE ANSWER" and no probabilities; every capture says "decision support, not a diagnosis".
No patient identifiers are burned in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from kdviewer.dicom_out.identity import ModelIdentity
from kdviewer.dicom_out.sources import SourceInfo
from kdviewer.imaging.study import Study
from kdviewer.imaging.windowing import display_frame
from kdviewer.inference.saliency import answer_frame
from kdviewer.inference.saliency import overlay as blend  # numpy + matplotlib at import, no torch

MIN_SIDE = 512
MAX_SIDE = 1024
BAND = (28, 30, 34)
TEXT = (235, 235, 235)
WARN = (255, 196, 0)
DIM = (170, 170, 170)


@dataclass
class Overlay:
    """A saliency heatmap (H, W) in [0, 1] in the geometry of ``frame``, and what it shows."""

    heatmap: np.ndarray
    frame: int
    method: str  # "Grad-CAM", ...
    class_name: str


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def _pct(p: float) -> str:
    return f"{100 * p:.1f}%"


def legend_lines(
    prediction: Any, model: ModelIdentity, source: SourceInfo, comparison: Any | None,
    overlay: Overlay | None, frame: int, n_frames: int,
) -> list[tuple[str, tuple[int, int, int]]]:
    """(text, colour) lines of the burned-in legend."""
    lines: list[tuple[str, tuple[int, int, int]]] = [
        ("kdviewer result - DECISION SUPPORT ONLY, NOT A DIAGNOSIS", WARN),
        (f"Model: {model.name}  ({model.version})" + "".join(f"  [{t}]" for t in model.tags), TEXT),
    ]
    refused = getattr(prediction, "refused", None)
    if refused:
        lines.append(("NO CLASS - the model was not run on this study:", WARN))
        lines.append((str(refused), WARN))
    elif prediction.ood_flag:
        lines.append(("NO RELIABLE ANSWER - this image is unlike the model's training data", WARN))
        lines.append((f"(out-of-distribution score {prediction.ood_score:.2f} > threshold "
                      f"{prediction.ood_threshold:.2f}; probabilities withheld, see the SR)", WARN))
    else:
        if prediction.task == "multi-label":
            lines.append((f"Student: {prediction.label}", TEXT))
        else:
            lines.append((f"Student: {prediction.label}  ({_pct(prediction.probability)})", TEXT))
        pairs = zip(prediction.class_names, prediction.probabilities, strict=True)
        probs = "  ".join(f"{n} {float(p):.3f}" for n, p in pairs)
        calib = f"calibrated, T={prediction.temperature:g}" if prediction.calibrated else "uncalibrated"
        lines.append((f"{probs}   ({calib})", DIM))
        if comparison is not None:
            t = comparison.teacher
            verdict = "DISAGREE" if comparison.disagree else "agree"
            lines.append((f"Teacher: {t.label} ({_pct(t.probability)}) - student and teacher {verdict} "
                          f"(TV {comparison.divergence:.3f}, threshold {comparison.threshold:.2f})",
                          WARN if comparison.disagree else TEXT))
    where = f"; slice {frame + 1} of {n_frames}" if n_frames > 1 else ""
    if overlay is not None:
        lines.append((f"Overlay: {overlay.method} for '{overlay.class_name}'{where}", DIM))
    elif where:
        lines.append((f"Shown: {where[2:]}", DIM))
    lines.append((f"Source: {source.description}", DIM))
    return lines


def render(
    study: Study,
    prediction: Any,
    model: ModelIdentity,
    source: SourceInfo,
    comparison: Any | None = None,
    overlay: Overlay | None = None,
    frame: int | None = None,
) -> np.ndarray:
    """The capture as RGB uint8 (H, W, 3)."""
    frame = answer_frame(study, prediction) if frame is None else frame
    gray = display_frame(study, frame)
    rgb = blend(gray, overlay.heatmap) if overlay is not None and overlay.frame == frame else \
        np.repeat(gray[..., None], 3, axis=2)
    h, w = rgb.shape[:2]
    scale = min(MAX_SIDE / max(h, w), max(1.0, MIN_SIDE / max(h, w)))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = Image.fromarray(rgb).resize(size, Image.BILINEAR) if size != (w, h) else Image.fromarray(rgb)
    width = max(img.width, MIN_SIDE)
    font_px = int(np.clip(width / 42, 12, 22))
    font = _font(font_px)
    lines = legend_lines(prediction, model, source, comparison, overlay, frame, study.n_frames)
    pad, step = font_px // 2, math.ceil(font_px * 1.35)
    wrapped: list[tuple[str, tuple[int, int, int]]] = []
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for text, colour in lines:
        words, cur = text.split(" "), ""
        for word in words:
            trial = f"{cur} {word}".strip()
            if cur and probe.textlength(trial, font=font) > width - 2 * pad:
                wrapped.append((cur, colour))
                cur = word
            else:
                cur = trial
        wrapped.append((cur, colour))
    band_h = 2 * pad + step * len(wrapped)
    canvas = Image.new("RGB", (width, img.height + band_h), BAND)
    canvas.paste(img, ((width - img.width) // 2, 0))
    draw = ImageDraw.Draw(canvas)
    y = img.height + pad
    for text, colour in wrapped:
        draw.text((pad, y), text, fill=colour, font=font)
        y += step
    return np.asarray(canvas, dtype=np.uint8)
