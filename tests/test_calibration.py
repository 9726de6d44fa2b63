"""training.calibration: temperature scaling lowers ECE on over-confident logits; ECE by hand."""

from __future__ import annotations

import numpy as np
import pytest

from kdviewer.models.manifest import Calibration
from training.calibration import (
    calibrate,
    expected_calibration_error,
    fit_temperature,
    fit_temperature_checked,
    nll,
    probabilities,
    reliability_bins,
    softmax,
)


def _overconfident(n: int = 2000, k: int = 3, scale: float = 4.0, seed: int = 0):
    """Logits of a calibrated model (T=1), multiplied by ``scale``: right ~70% but ~99% sure."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k))
    p = softmax(logits)
    y = np.array([rng.choice(k, p=row) for row in p])  # labels drawn from the model's own beliefs
    return logits * scale, y


def test_ece_by_hand():
    # Two bins used: confidence 0.9 (3 cases, 2 right) and 0.6 (2 cases, 2 right).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 1, 1, 0, 1])
    expected = (3 * abs(2 / 3 - 0.9) + 2 * abs(1.0 - 0.6)) / 5
    assert expected_calibration_error(probs, y) == pytest.approx(expected)
    bins = reliability_bins(probs, y)
    assert sum(bins["count"]) == 5 and len(bins["count"]) == 15


def test_temperature_scaling_fixes_overconfidence():
    logits, y = _overconfident()
    t = fit_temperature(logits, y)
    assert 3.0 < t < 5.5  # the true over-confidence factor is 4
    res = calibrate(logits, y)
    assert res["temperature"] == pytest.approx(t)
    assert res["ece_after"] < 0.5 * res["ece_before"]
    assert res["ece_after"] < 0.05
    assert res["nll_after"] < res["nll_before"]
    Calibration(temperature=res["temperature"], ece_before=res["ece_before"], ece_after=res["ece_after"])
    # Temperature scaling never changes the predicted label.
    assert np.array_equal(probabilities(logits, "single-label", t).argmax(1), logits.argmax(1))


def test_underconfident_logits_get_a_temperature_below_one_but_at_most_2x_sharper():
    logits, y = _overconfident(scale=0.6, seed=1)
    t, note = fit_temperature_checked(logits, y)
    assert 0.5 < t < 0.75 and note == "fitted on the val split"  # the true factor is 0.6
    logits, y = _overconfident(scale=0.3, seed=1)
    t, note = fit_temperature_checked(logits, y)
    assert t == 0.5 and "clamped" in note  # the optimum (~0.3) would sharpen > 2x
    assert nll(logits, y, "single-label", t) < nll(logits, y, "single-label")


def test_small_or_separable_val_sets_keep_t_1():
    """The demo bundle's T = 0.16: a few perfectly separated val cases make the NLL fall forever as
    T -> 0. Too few cases, or a separable set of any size, now keep T = 1 and say why."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    margin = rng.uniform(0.5, 3.0, 400)
    logits = np.stack([np.where(y == 0, margin, -margin), np.where(y == 1, margin, -margin)], 1)
    res = calibrate(logits[:24], y[:24])  # a handful of val cases
    assert res["temperature"] == 1.0 and "24 val cases < 50" in res["note"]
    assert res["ece_after"] == res["ece_before"]
    res = calibrate(logits, y)  # separable however many cases: no interior optimum
    assert res["temperature"] == 1.0 and "every val case is classified correctly" in res["note"]
    assert res["n"] == 400
    # the same set with 10% of labels flipped has a real optimum, and it is not a 6x sharpening
    y2 = y.copy()
    y2[:40] = 1 - y2[:40]
    t, note = fit_temperature_checked(logits, y2)
    assert t >= 0.5 and note != "" and nll(logits, y2, "single-label", t) <= nll(logits, y2, "single-label")


def test_model_card_shows_ece_before_and_after() -> None:
    from kdviewer.models.manifest import Manifest, ModelSpec
    from training.export import _model_card

    logits, y = _overconfident(n=600)
    cal = calibrate(logits, y)
    m = Manifest(name="m", class_names=["a", "b", "c"], student=ModelSpec(architecture="resnet18"),
                 calibration=Calibration(temperature=cal["temperature"], ece_before=cal["ece_before"],
                                         ece_after=cal["ece_after"]))
    card = _model_card(m, {"calibration": cal})
    assert f"| ECE (15 bins) | {cal['ece_before']:.4f} | {cal['ece_after']:.4f} |" in card
    assert "NLL" in card and "600 val cases" in card and "fitted on the val split" in card


def test_multilabel_single_temperature_on_sigmoid():
    rng = np.random.default_rng(2)
    z = rng.normal(scale=2.0, size=(3000, 4))
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(np.float32)
    res = calibrate(z * 3.0, y, "multi-label")
    assert 2.3 < res["temperature"] < 3.8
    assert res["ece_after"] < 0.5 * res["ece_before"]
    assert nll(z * 3.0, y, "multi-label", res["temperature"]) < nll(z * 3.0, y, "multi-label")


def test_fit_never_worse_than_identity_and_rejects_bad_shapes():
    logits = np.zeros((10, 2))
    y = np.array([0, 1] * 5)
    assert fit_temperature(logits, y) > 0
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((0, 2)), np.zeros(0))
