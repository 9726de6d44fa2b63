"""OOD guard: Mahalanobis on penultimate features; an X-ray model flags CT slices, noise, non-chest images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _bundles import ct_volume, cxr_bundle, phantom_set, write_ct_series

from kdviewer.imaging import load
from kdviewer.imaging.study import Study
from kdviewer.inference.ood import (
    OodGuard,
    fit_ood_stats,
    load_ood_stats,
    ood_scores,
    save_ood_stats,
    threshold_from_scores,
)
from kdviewer.inference.predict import Classifier

# The first test builds the shared trained bundle (~20 s on an idle machine, minutes on a loaded one).
pytestmark = pytest.mark.timeout(900)


def test_fit_and_score_on_gaussians(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cov = np.diag(np.linspace(0.5, 3.0, 32))
    train = rng.multivariate_normal(np.zeros(32), cov, 400)
    stats = fit_ood_stats(train)
    assert stats["mean"].shape == (32,) and stats["precision"].shape == (32, 32)
    assert np.allclose(stats["precision"], stats["precision"].T)
    val = rng.multivariate_normal(np.zeros(32), cov, 200)
    thr = threshold_from_scores(ood_scores(val, stats), 99)
    shifted = rng.multivariate_normal(np.full(32, 2.0), cov, 200)
    assert np.mean(ood_scores(shifted, stats) > thr) > 0.95
    # one vector or a batch; sqrt of the quadratic form
    d = val[0] - stats["mean"]
    assert ood_scores(val[0], stats)[0] == pytest.approx(np.sqrt(d @ stats["precision"] @ d), rel=1e-4)
    save_ood_stats(tmp_path / "ood.npz", stats)
    back = load_ood_stats(tmp_path / "ood.npz")
    assert np.array_equal(back["precision"], stats["precision"])
    guard = OodGuard(back, thr)
    _, flags = guard.flag(np.vstack([val[:5], shifted[:5]]))
    assert flags[5:].all() and guard.dim == 32
    with pytest.raises(ValueError, match="does not match"):
        ood_scores(np.zeros((2, 31)), stats)
    with pytest.raises(ValueError):
        fit_ood_stats(np.zeros((1, 4)))


def test_ood_npz_must_be_plain_arrays(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="precision"):
        load_ood_stats(tmp_path / "bad.npz")
    np.savez(tmp_path / "obj.npz", mean=np.array([object()], dtype=object), precision=np.eye(1))
    with pytest.raises(ValueError):
        load_ood_stats(tmp_path / "obj.npz")  # object arrays would need pickle: refused


def _non_chest_images(rng: np.random.Generator) -> dict[str, np.ndarray]:
    h, w = 144, 128
    yy, xx = np.mgrid[0:h, 0:w]
    checker = ((yy // 16 + xx // 16) % 2) * 200.0 + 20
    scene = 60 + 120 * (yy / h)  # a sky-to-ground gradient with a "sun" and a "house"
    scene[(yy - 30) ** 2 + (xx - 95) ** 2 < 150] = 250
    scene[80:130, 20:70] = 90
    scene[60:80, 20:70] = 30
    return {
        "uniform noise": rng.uniform(0, 255, (h, w)),
        "checkerboard": checker,
        "outdoor scene": scene + rng.normal(0, 4, (h, w)),
    }


def test_xray_model_flags_ct_noise_and_non_chest_images(tmp_path: Path) -> None:
    tb = cxr_bundle()
    clf = Classifier(tb.path, use_int8=False)
    assert clf.ood is not None
    # in-distribution: fresh phantoms (not the validation set that set the threshold) mostly pass
    fresh = phantom_set(48, seed=11)
    val = [clf.predict(Study(im.astype(np.float32))) for im in fresh.images]
    in_flags = np.array([p.ood_flag for p in val])
    assert in_flags.mean() <= 0.1
    # a CT series (read from DICOM, HU) given to the X-ray model
    write_ct_series(tmp_path / "ct", ct_volume(np.random.default_rng(1), n=4, size=96))
    study = load(tmp_path / "ct")
    assert clf.predict(study).refused is not None  # the modality gate answers first (CT is not CR/DX) ...
    batch, _ = clf.preprocess(study, "all")
    ct = clf.predict_batch([batch])[0]  # ... and the guard on its own flags the CT pixels too
    assert ct.ood_flag, f"CT series not flagged: {ct.ood_score:.2f} <= {ct.ood_threshold:.2f}"
    assert all(s["ood_score"] > ct.ood_threshold for s in ct.per_slice)
    rng = np.random.default_rng(3)
    scores = {}
    for name, img in _non_chest_images(rng).items():
        pred = clf.predict(Study(img.astype(np.float32)))
        scores[name] = pred.ood_score
        assert pred.ood_flag, f"{name} not flagged: {pred.ood_score:.2f} <= {pred.ood_threshold:.2f}"
    in_scores = np.array([p.ood_score for p in val])
    assert min(scores.values()) > np.median(in_scores)


def test_domain_shift_is_a_binomial_test_of_the_flag_count() -> None:
    from scipy.stats import binom

    from kdviewer.inference.ood import domain_shift

    none = domain_shift(0, 200)
    assert none.p_value == 1.0 and not none.shifted and none.expected == pytest.approx(2.0)
    # ~1% flagged, as the 99th-percentile threshold gives for in-distribution data: not a shift
    assert not domain_shift(3, 200).shifted
    # the PneumoniaMNIST model on 54 adult radiographs: 24 flagged where ~0.5 are expected
    adult = domain_shift(24, 54)
    assert adult.shifted and adult.p_value == pytest.approx(binom.sf(23, 54, 0.01))
    assert adult.p_value < 1e-30 and adult.message().startswith("DOMAIN SHIFT: 24 of 54")
    # a few cases can never make a shift, however many are flagged... unless all of enough are
    assert not domain_shift(1, 1).shifted and domain_shift(5, 5).shifted
    with pytest.raises(ValueError):
        domain_shift(3, 2)
