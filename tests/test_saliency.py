"""Saliency maps: every method, original geometry, teacher maps, agreement, overlay, pointing game."""

from __future__ import annotations

import time

import numpy as np
import pytest
from _bundles import cxr_bundle
from scipy.ndimage import distance_transform_edt

from kdviewer.imaging.study import Study
from kdviewer.inference.predict import Classifier
from kdviewer.inference.saliency import (
    METHODS,
    SaliencyMap,
    overlay,
    saliency,
    saliency_agreement,
    to_original_geometry,
)
from kdviewer.models.manifest import Preprocessing
from kdviewer.models.preprocess import crop_box

# The first test builds the shared trained bundle (~20 s on an idle machine, minutes on a loaded one).
pytestmark = pytest.mark.timeout(900)

#: Minimum share of positive cases whose Grad-CAM peak lies in the (dilated) lesion mask.
POINTING_MIN = 0.6
#: Tolerance of the pointing game (Zhang et al., 2016): 15 px at 224 px input, i.e. 15/224 of the width;
#: 9 px on our 128-px-wide phantoms.
TOLERANCE_PX = 9
#: Positive validation phantoms scored.
POINTING_CASES = 32


@pytest.fixture(scope="module")
def clf() -> Classifier:
    return Classifier(cxr_bundle().path, use_int8=False)


def _positive_study() -> tuple[Study, np.ndarray]:
    tb = cxr_bundle()
    i = int(np.flatnonzero(tb.val.labels == 1)[0])
    return Study(tb.val.images[i].astype(np.float32)), tb.val.masks[i]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_a_map_in_original_geometry(clf: Classifier, method: str) -> None:
    study, _ = _positive_study()
    t0 = time.perf_counter()
    m = saliency(clf, study, method)
    assert time.perf_counter() - t0 < 30  # Score-CAM is bounded
    assert isinstance(m, SaliencyMap)
    assert m.heatmap.shape == study.shape == (144, 128)
    assert m.heatmap.dtype == np.float32 and np.isfinite(m.heatmap).all()
    assert m.heatmap.min() >= 0.0 and m.heatmap.max() <= 1.0
    assert m.input_heatmap.shape == (64, 64)
    assert m.method == method and m.role == "student" and m.frame == 0
    assert m.class_name in ("normal", "nodule")
    assert m.to_dict()["peak"] == list(m.peak)


def test_method_names_and_target_class(clf: Classifier) -> None:
    study, _ = _positive_study()
    assert saliency(clf, study, "Grad-CAM++").method == "gradcam++"
    m = saliency(clf, study, "gradcam", target_class="normal")
    assert m.target_class == 0 and m.class_name == "normal"
    with pytest.raises(ValueError, match="unknown saliency method"):
        saliency(clf, study, "magic")
    with pytest.raises(ValueError, match="unknown class"):
        saliency(clf, study, "gradcam", target_class="pneumothorax")


def test_crop_geometry_maps_back_onto_the_original_frame() -> None:
    pre = Preprocessing(input_size=64, resize=80, channels=1)  # resize 80, centre crop 64
    shape = (200, 100)  # portrait: the crop cuts the top and bottom
    top, left, h, w = crop_box(shape, pre)
    cam = np.zeros((64, 64), np.float32)
    cam[28:36, 28:36] = 1.0  # hot spot in the centre of the crop
    heat = to_original_geometry(cam, shape, pre)
    assert heat.shape == shape
    assert heat[:top].max() == 0 and heat[top + h :].max() == 0  # zero outside the crop
    r, c = np.unravel_index(np.argmax(heat), heat.shape)
    assert abs(r - shape[0] / 2) <= 6 and abs(c - shape[1] / 2) <= 4
    full = to_original_geometry(np.ones((64, 64), np.float32), shape, pre)
    assert full[top : top + h, left : left + w].min() > 0.99


def test_bare_model_and_crop_preprocessing(clf: Classifier) -> None:
    """A model plus explicit preprocessing (here with a centre crop) also maps back to the original."""
    model = clf.torch_model("student")
    pre = Preprocessing(input_size=64, resize=72, channels=1)
    study, _ = _positive_study()
    m = saliency(model, study, "gradcam", preprocessing=pre, class_names=clf.class_names)
    top, left, h, w = crop_box(study.shape, pre)
    assert m.box == (top, left, h, w)
    outside = np.ones(study.shape, bool)
    outside[top : top + h, left : left + w] = False
    assert m.heatmap[outside].max() == 0.0
    with pytest.raises(ValueError, match="preprocessing"):
        saliency(model, study, "gradcam")


def test_teacher_saliency_and_agreement(clf: Classifier) -> None:
    study, _ = _positive_study()
    s = saliency(clf, study, "gradcam", target_class=1)
    t = saliency(clf, study, "gradcam", target_class=1, role="teacher")
    assert t.role == "teacher" and t.heatmap.shape == s.heatmap.shape
    r = saliency_agreement(s, t)
    iou = saliency_agreement(s, t, method="iou")
    assert -1.0 <= r <= 1.0 and 0.0 <= iou <= 1.0
    assert saliency_agreement(s, s) == pytest.approx(1.0)
    assert saliency_agreement(s, s, method="iou") == pytest.approx(1.0)
    assert saliency_agreement(s.heatmap, 1.0 - s.heatmap) == pytest.approx(-1.0, abs=1e-6)
    with pytest.raises(ValueError):
        saliency_agreement(s.heatmap, s.heatmap[:10])


def test_overlay_blends_only_where_hot() -> None:
    img = np.full((20, 30), 100, np.uint8)
    heat = np.zeros((20, 30), np.float32)
    heat[5:10, 5:10] = 1.0
    out = overlay(img, heat, "jet", 0.5)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert (out[0, 0] == 100).all()  # cold pixels unchanged
    assert not (out[7, 7] == 100).all()
    with pytest.raises(ValueError):
        overlay(img, heat[:5])


def test_pointing_game_on_lesion_phantoms(clf: Classifier) -> None:
    """The student's Grad-CAM peak (for 'nodule') falls inside the lesion, dilated by the pointing-game
    tolerance, in most positive validation phantoms (a peak anywhere would hit ~10% of the time)."""
    tb = cxr_bundle()
    hits, n = 0, 0
    for img, mask, label in zip(tb.val.images, tb.val.masks, tb.val.labels, strict=True):
        if not label or n >= POINTING_CASES:
            continue
        m = saliency(clf, Study(img.astype(np.float32)), "gradcam", target_class="nodule")
        r, c = m.peak
        hits += bool(distance_transform_edt(~mask)[r, c] <= TOLERANCE_PX)
        n += 1
    rate = hits / n
    print(f"pointing game: {hits}/{n} = {rate:.2f}")
    assert rate >= POINTING_MIN, f"pointing game {hits}/{n} = {rate:.2f} < {POINTING_MIN}"
