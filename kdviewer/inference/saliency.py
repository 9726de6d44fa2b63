"""Saliency maps with the grad-cam package, mapped back onto the ORIGINAL image geometry.

Methods: "gradcam", "gradcam++", "scorecam", "eigencam", "layercam", "hirescam". The CAM layer is the
bundle manifest's ``target_layer`` for the role (falling back to the architecture's default).

Geometry: the model sees a resized, centre-cropped frame; its CAM (input_size x input_size) is resized
onto the region of the original frame that the crop covers (`kdviewer.models.preprocess.crop_box`) and
is zero outside it, so a heatmap pixel (r, c) always refers to original pixel (r, c).

Score-CAM is bounded: it scores only the ``SCORECAM_MAX_CHANNELS`` most active channels of the target
layer (all of them for small layers), in batches of ``SCORECAM_BATCH`` masked inputs, without ever
materialising all masked inputs at once (the stock implementation holds C x input in memory).

Target of the gradient (``target="margin"``, the default for single-label tasks): the class logit minus
the mean of the other logits (for two classes, the log-odds of the class). With a softmax only logit
*differences* matter, so the margin shows the evidence for the class against the alternatives; the raw
logit (``target="logit"``, classic Grad-CAM and the default for multi-label tasks, where each logit is
already its own log-odds) can light up structures that raise every class alike.

Agreement between two maps (`saliency_agreement`): "pearson" (default) = Pearson correlation of the
two heatmaps over the original frame, in [-1, 1]; "iou" = intersection-over-union of their top-10 %
(by value) pixels, in [0, 1].
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

from kdviewer.errors import InferenceError
from kdviewer.imaging.study import Study
from kdviewer.models.manifest import Preprocessing
from kdviewer.models.preprocess import crop_box, preprocess_frame

METHODS: tuple[str, ...] = ("gradcam", "gradcam++", "scorecam", "eigencam", "layercam", "hirescam")
METHOD_LABELS: dict[str, str] = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "scorecam": "Score-CAM",
    "eigencam": "Eigen-CAM",
    "layercam": "Layer-CAM",
    "hirescam": "HiResCAM",
}
SCORECAM_BATCH = 16
SCORECAM_MAX_CHANNELS = 128


@dataclass
class SaliencyMap:
    """A heatmap in original frame geometry: (H, W) float32 in [0, 1]."""

    heatmap: np.ndarray
    method: str
    role: str
    target_class: int
    class_name: str
    frame: int
    input_heatmap: np.ndarray  # (S, S) CAM over the model input (the crop)
    box: tuple[int, int, int, int]  # (top, left, height, width) of the crop in the original frame
    score: float | None = None  # the target logit
    elapsed_ms: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> tuple[int, int]:
        """(row, col) of the hottest pixel in original coordinates."""
        r, c = np.unravel_index(int(np.argmax(self.heatmap)), self.heatmap.shape)
        return int(r), int(c)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "role": self.role,
            "target_class": self.target_class,
            "class_name": self.class_name,
            "frame": self.frame,
            "peak": list(self.peak),
            "box": list(self.box),
            "elapsed_ms": round(self.elapsed_ms, 2),
        }


def answer_frame(study: Study, prediction: Any) -> int:
    """The frame an answer rests on: for a series, the slice with the highest probability of the
    predicted class (the one that drove the aggregate); else the frame that was read (the middle one)."""
    frames = list(getattr(prediction, "frames", []) or [])
    slices = getattr(prediction, "per_slice", None)
    k = int(getattr(prediction, "label_index", -1))
    if slices and k >= 0 and getattr(prediction, "refused", None) is None:
        return int(max(slices, key=lambda s: s["probabilities"][k])["index"])
    if len(frames) == 1:
        return int(frames[0])
    return study.middle_index()


def explain(
    classifier: Any, study: Study, prediction: Any, method: str = "gradcam", target: int | str | None = None
) -> SaliencyMap | None:
    """The saliency map of a prediction's class on `answer_frame` (None when the modality gate refused
    the study: the model never saw it). Used for heatmap files and the DICOM Secondary Capture.

    ``target``: the class / finding (index or name) to explain instead of the prediction's own
    (``label_index``: for a multi-label answer the finding furthest above its threshold)."""
    if getattr(prediction, "refused", None) is not None or int(getattr(prediction, "label_index", -1)) < 0:
        return None
    k = int(prediction.label_index) if target is None else target
    return saliency(classifier, study, method, target_class=k,
                    role=getattr(prediction, "role", "student"), frame=answer_frame(study, prediction))


def _normalize_method(method: str) -> str:
    m = method.lower().replace("-", "").replace("_", "").replace(" ", "")
    m = {"gradcamplusplus": "gradcam++", "gradcampp": "gradcam++"}.get(m, m)
    if m not in METHODS:
        raise ValueError(f"unknown saliency method {method!r}; choose one of {', '.join(METHODS)}")
    return m


def _bounded_scorecam_class() -> type:
    import torch
    from pytorch_grad_cam import ScoreCAM

    class BoundedScoreCAM(ScoreCAM):
        """Score-CAM over the top-k most active channels, scored in small batches (bounded memory)."""

        def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):  # type: ignore[override]
            with torch.no_grad():
                acts = torch.from_numpy(np.asarray(activations)).to(self.device)
                n, c = acts.shape[:2]
                k = min(c, getattr(self, "max_channels", SCORECAM_MAX_CHANNELS))
                bs = max(1, int(getattr(self, "batch_size", SCORECAM_BATCH)))
                weights = np.zeros((n, c), dtype=np.float32)
                up = torch.nn.functional.interpolate(acts, size=input_tensor.shape[-2:], mode="bilinear",
                                                     align_corners=False)
                flat = up.view(n, c, -1)
                mins, maxs = flat.min(-1)[0], flat.max(-1)[0]
                for b in range(n):
                    chosen = torch.argsort(acts[b].mean(dim=(1, 2)), descending=True)[:k]
                    scores = []
                    for i in range(0, k, bs):
                        ch = chosen[i : i + bs]
                        masks = (up[b, ch] - mins[b, ch, None, None]) / (
                            maxs[b, ch, None, None] - mins[b, ch, None, None] + 1e-8
                        )
                        batch = input_tensor[b][None] * masks[:, None]
                        out = self.model(batch)
                        scores.extend(float(targets[b](o).cpu()) for o in out)
                    w = torch.softmax(torch.tensor(scores), dim=0).numpy()
                    weights[b, chosen.cpu().numpy()] = w
                return weights

    return BoundedScoreCAM


class MarginTarget:
    """Logit of class ``k`` minus the mean of the other logits (a callable grad-cam target)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, output: Any) -> Any:
        out = output if output.ndim == 2 else output[None]
        n = out.shape[-1]
        if n < 2:
            return out[..., self.k].squeeze(0) if output.ndim == 1 else out[..., self.k]
        others = (out.sum(dim=-1) - out[..., self.k]) / (n - 1)
        res = out[..., self.k] - others
        return res.squeeze(0) if output.ndim == 1 else res


def _cam_class(method: str) -> type:
    import pytorch_grad_cam as pgc

    return {
        "gradcam": pgc.GradCAM,
        "gradcam++": pgc.GradCAMPlusPlus,
        "eigencam": pgc.EigenCAM,
        "layercam": pgc.LayerCAM,
        "hirescam": pgc.HiResCAM,
    }.get(method) or _bounded_scorecam_class()


def to_original_geometry(cam: np.ndarray, shape: tuple[int, int], pre: Preprocessing) -> np.ndarray:
    """Place an (S, S) input-space map onto an (H, W) zero canvas over the crop region."""
    h, w = shape
    top, left, bh, bw = crop_box(shape, pre)
    bh, bw = max(1, bh), max(1, bw)
    resized = np.asarray(
        Image.fromarray(np.asarray(cam, np.float32), mode="F").resize((bw, bh), Image.BILINEAR),
        dtype=np.float32,
    )
    out = np.zeros((h, w), np.float32)
    r0, c0 = max(0, top), max(0, left)
    r1, c1 = min(h, top + bh), min(w, left + bw)
    if r1 > r0 and c1 > c0:
        out[r0:r1, c0:c1] = resized[r0 - top : r1 - top, c0 - left : c1 - left]
    return np.clip(out, 0.0, 1.0)


def saliency(
    classifier_or_model: Any,
    study: Study,
    method: str = "gradcam",
    target_class: int | str | None = None,
    role: Literal["student", "teacher"] = "student",
    frame: int | None = None,
    *,
    preprocessing: Preprocessing | None = None,
    target_layer: str | None = None,
    class_names: list[str] | None = None,
    target: Literal["margin", "logit", "auto"] = "auto",
) -> SaliencyMap:
    """Compute a CAM for one frame of ``study`` and return it in original frame geometry.

    Args:
        classifier_or_model: a `Classifier` (preprocessing, target layer and torch models come from its
            bundle) or a torch model built by `build_model` (then pass ``preprocessing``).
        method: one of `METHODS`.
        target_class: index or class name; None = the model's top class for this frame (multi-label:
            the finding furthest above its own threshold, as `Prediction.label_index`).
        role: "student" or "teacher" (only with a `Classifier`).
        frame: frame index; None = the middle frame.
        target: "margin" or "logit" (see the module docstring); "auto" = margin for single-label
            tasks (and bare models), logit for multi-label ones.
    """
    import torch
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from kdviewer.models.architectures import get_module, spec_of

    method = _normalize_method(method)
    if hasattr(classifier_or_model, "torch_model") and hasattr(classifier_or_model, "manifest"):
        clf = classifier_or_model
        model = clf.torch_model(role)
        pre = clf.pre
        spec = clf.bundle.spec(role)
        layer_name = target_layer or spec.target_layer or spec_of(model).target_layer
        names = list(clf.class_names)
        multi_label = bool(getattr(clf, "multi_label", False))
    else:
        clf = None
        model = classifier_or_model
        if preprocessing is None:
            raise ValueError("saliency() on a bare model needs preprocessing=<Preprocessing>")
        pre = preprocessing
        layer_name = target_layer or spec_of(model).target_layer
        names = class_names or []
        multi_label = False
    if target == "auto":
        target = "logit" if multi_label else "margin"
    idx = study.middle_index() if frame is None else int(frame)
    if not 0 <= idx < study.n_frames:
        raise InferenceError(f"frame {idx} is outside this study (0..{study.n_frames - 1})")
    if isinstance(target_class, str):
        if target_class not in names:
            raise ValueError(f"unknown class {target_class!r}; classes: {', '.join(names)}")
        target_class = names.index(target_class)

    t0 = time.perf_counter()
    x = torch.from_numpy(preprocess_frame(study.frames[idx], pre, study)[None])
    device = next(model.parameters()).device
    x = x.to(device)
    model.eval()
    layer = get_module(model, layer_name)
    with torch.no_grad():
        logits = model(x)
    if target_class is None and multi_label and hasattr(clf, "probabilities"):
        probs = clf.probabilities(logits[0].detach().cpu().numpy()[None])[0]
        target_class = int(np.argmax(probs - np.asarray(clf.thresholds, np.float32)))
    elif target_class is None:
        target_class = int(torch.argmax(logits[0]))
    k = int(target_class)
    if not 0 <= k < logits.shape[1]:
        raise ValueError(f"target class {k} is outside 0..{logits.shape[1] - 1}")
    cls = _cam_class(method)
    with cls(model=model, target_layers=[layer]) as cam:
        if method == "scorecam":
            cam.batch_size = SCORECAM_BATCH
            cam.max_channels = SCORECAM_MAX_CHANNELS
        with torch.enable_grad():
            goal = MarginTarget(k) if target == "margin" else ClassifierOutputTarget(k)
            grayscale = cam(input_tensor=x, targets=[goal])[0]
    grayscale = np.nan_to_num(np.asarray(grayscale, np.float32), nan=0.0)
    if grayscale.max() > 0:
        grayscale = grayscale / grayscale.max()
    heat = to_original_geometry(grayscale, study.shape, pre)
    return SaliencyMap(
        heatmap=heat,
        method=method,
        role=role,
        target_class=k,
        class_name=names[k] if k < len(names) else str(k),
        frame=idx,
        input_heatmap=grayscale,
        box=crop_box(study.shape, pre),
        score=float(logits[0, k]),
        elapsed_ms=(time.perf_counter() - t0) * 1e3,
    )


def _as_map(m: SaliencyMap | np.ndarray) -> np.ndarray:
    return np.asarray(m.heatmap if isinstance(m, SaliencyMap) else m, dtype=np.float64)


def saliency_agreement(
    map_a: SaliencyMap | np.ndarray,
    map_b: SaliencyMap | np.ndarray,
    method: Literal["pearson", "iou"] = "pearson",
    top_fraction: float = 0.10,
) -> float:
    """How much two heatmaps of the same frame agree (see the module docstring for the two measures)."""
    a, b = _as_map(map_a), _as_map(map_b)
    if a.shape != b.shape:
        raise ValueError(f"maps have different shapes {a.shape} vs {b.shape}")
    if method == "iou":
        n = max(1, round(top_fraction * a.size))
        ta = np.zeros(a.size, bool)
        tb = np.zeros(b.size, bool)
        ta[np.argpartition(a.ravel(), -n)[-n:]] = True
        tb[np.argpartition(b.ravel(), -n)[-n:]] = True
        union = np.logical_or(ta, tb).sum()
        return float(np.logical_and(ta, tb).sum() / union) if union else 1.0
    if method != "pearson":
        raise ValueError("method must be 'pearson' or 'iou'")
    sa, sb = a.std(), b.std()
    if sa < 1e-12 or sb < 1e-12:
        return 1.0 if np.allclose(a, b) else 0.0
    return float(np.clip(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb), -1.0, 1.0))


def colormap_lut(name: str = "jet") -> np.ndarray:
    """(256, 3) uint8 lookup table of a matplotlib colormap (a built-in jet without matplotlib)."""
    try:
        from matplotlib import colormaps

        lut = colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]
        return np.round(lut * 255).astype(np.uint8)
    except (ImportError, KeyError):
        x = np.linspace(0.0, 1.0, 256)
        r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
        g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
        b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
        return np.round(np.stack([r, g, b], axis=1) * 255).astype(np.uint8)


def overlay(
    frame_uint8: np.ndarray, heatmap: np.ndarray, colormap: str = "jet", alpha: float = 0.45
) -> np.ndarray:
    """Blend a [0, 1] heatmap over a grayscale (H, W) or RGB (H, W, 3) uint8 image -> RGB uint8.

    The blend weight is ``alpha * heatmap`` per pixel, so cold regions (and everything outside the
    model's crop) show the image unchanged.
    """
    img = np.asarray(frame_uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.shape[:2] != np.asarray(heatmap).shape:
        raise ValueError(f"image {img.shape[:2]} and heatmap {np.asarray(heatmap).shape} differ in size")
    h = np.clip(np.nan_to_num(np.asarray(heatmap, np.float32)), 0.0, 1.0)
    color = colormap_lut(colormap)[np.round(h * 255).astype(np.uint8)].astype(np.float32)
    w = (float(alpha) * h)[..., None]
    out = img.astype(np.float32) * (1.0 - w) + color * w
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
