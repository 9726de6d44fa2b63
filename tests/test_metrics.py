"""training.metrics: point estimates against hand-computed values, bootstrap CIs, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

from kdviewer.models.manifest import MetricWithCI
from training.metrics import (
    bootstrap_counts,
    compute_metrics,
    format_table,
    manifest_metrics,
    weighted_auc,
)

# Binary example worked by hand: truth, positive-class probability.
Y_BIN = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
P_BIN = np.array([0.1, 0.4, 0.6, 0.2, 0.9, 0.8, 0.3, 0.7, 0.55, 0.45])


def _binary_probs(p: np.ndarray) -> np.ndarray:
    return np.stack([1 - p, p], axis=1)


def test_binary_point_estimates_match_hand_computation():
    # predictions: [0,0,1,0, 1,1,0,1,1,0] -> TN 3, FP 1, TP 4, FN 2
    r = compute_metrics(Y_BIN, _binary_probs(P_BIN), ["normal", "pneumonia"], "single-label", n_boot=0)
    m = r["metrics"]
    assert r["confusion_matrix"] == [[3, 1], [2, 4]]
    assert r["support"] == [4, 6]
    assert r["positive_class"] == "pneumonia"
    assert m["accuracy"]["value"] == pytest.approx(0.7)
    assert m["precision"]["value"] == pytest.approx(0.8)
    assert m["recall"]["value"] == pytest.approx(4 / 6)
    assert m["f1"]["value"] == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    assert m["specificity"]["value"] == pytest.approx(0.75)
    # AUC: positives beat 4+4+2+4+3+3 = 20 of the 24 (positive, negative) pairs.
    assert m["roc_auc"]["value"] == pytest.approx(20 / 24)
    assert m["accuracy"]["ci_low"] is None  # no bootstrap requested


def test_positive_class_can_be_the_first_class():
    r = compute_metrics(Y_BIN, _binary_probs(P_BIN), ["a", "b"], positive_class="a", n_boot=0)
    m = r["metrics"]
    # Class "a" as positive: TP 3, FN 1, FP 2, TN 4.
    assert m["precision"]["value"] == pytest.approx(3 / 5)
    assert m["recall"]["value"] == pytest.approx(3 / 4)
    assert m["specificity"]["value"] == pytest.approx(4 / 6)
    assert m["roc_auc"]["value"] == pytest.approx(20 / 24)


def test_multiclass_macro_metrics_match_hand_computation():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), pred] = 0.8
    r = compute_metrics(y, probs, ["a", "b", "c"], n_boot=0)
    m = r["metrics"]
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"]["value"] == pytest.approx(4 / 6)
    assert m["precision"]["value"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    assert m["recall"]["value"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert m["f1"]["value"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["specificity"]["value"] == pytest.approx((0.75 + 0.75 + 1.0) / 3)
    per_class = [m[f"roc_auc:{c}"]["value"] for c in "abc"]
    for c, auc in enumerate(per_class):
        assert auc == pytest.approx(roc_auc_score(y == c, probs[:, c]))
    assert m["roc_auc"]["value"] == pytest.approx(np.mean(per_class))
    assert r["positive_class"] is None


def test_multilabel_metrics_agree_with_sklearn():
    rng = np.random.default_rng(3)
    y = (rng.random((200, 3)) < 0.4).astype(float)
    p = np.clip(0.35 * y + 0.65 * rng.random((200, 3)), 0, 1)
    r = compute_metrics(y, p, ["x", "y", "z"], "multi-label", n_boot=200)
    m = r["metrics"]
    pred = (p >= 0.5).astype(int)
    prec, rec, f1, _ = precision_recall_fscore_support(y, pred, average="macro", zero_division=0)
    assert m["precision"]["value"] == pytest.approx(prec)
    assert m["recall"]["value"] == pytest.approx(rec)
    assert m["f1"]["value"] == pytest.approx(f1)
    assert m["accuracy"]["value"] == pytest.approx(np.mean(pred == y))
    for c, name in enumerate("xyz"):
        assert m[f"roc_auc:{name}"]["value"] == pytest.approx(roc_auc_score(y[:, c], p[:, c]))
    assert m["roc_auc"]["value"] == pytest.approx(
        np.mean([roc_auc_score(y[:, c], p[:, c]) for c in range(3)])
    )
    assert np.asarray(r["confusion_matrix"]).shape == (3, 2, 2)
    assert r["support"] == y.sum(0).astype(int).tolist()


def test_multilabel_with_one_label_has_one_confusion_matrix():
    """Recipe 004 on phantoms: one finding. sklearn's multilabel_confusion_matrix reads a one-column
    indicator as binary multiclass and returns two matrices; the metrics must count one label."""
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(4)
    y = (rng.random((60, 1)) < 0.3).astype(float)
    p = np.clip(0.4 * y + 0.6 * rng.random((60, 1)), 0, 1)
    r = compute_metrics(y, p, ["pneumonia"], "multi-label", n_boot=50)
    pred = (p[:, 0] >= 0.5).astype(int)
    expected = confusion_matrix(y[:, 0], pred, labels=[0, 1]).tolist()
    assert np.asarray(r["confusion_matrix"]).tolist() == [expected]
    prec, rec, _, _ = precision_recall_fscore_support(y[:, 0], pred, average="binary", zero_division=0)
    assert r["metrics"]["precision"]["value"] == pytest.approx(prec)
    assert r["metrics"]["recall"]["value"] == pytest.approx(rec)


def test_weighted_auc_equals_sklearn_with_ties_and_replication():
    rng = np.random.default_rng(0)
    s = np.round(rng.random(50), 1)  # many ties
    y = rng.random(50) < 0.5
    assert weighted_auc(s, y, np.ones(50))[0] == pytest.approx(roc_auc_score(y, s))
    w = rng.integers(0, 4, 50)
    rep = np.repeat(np.arange(50), w)
    assert weighted_auc(s, y, w)[0] == pytest.approx(roc_auc_score(y[rep], s[rep]))
    assert np.isnan(weighted_auc(s, y, np.where(y, 1, 0))[0])  # no negatives left


def test_bootstrap_counts_are_resamples():
    c = bootstrap_counts(30, 100, seed=1)
    assert c.shape == (100, 30)
    assert np.all(c.sum(axis=1) == 30)
    assert np.array_equal(c, bootstrap_counts(30, 100, seed=1))


def _noisy_binary(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
    return y, _binary_probs(p)


def test_cis_contain_the_estimate_and_narrow_with_more_cases():
    widths = {}
    for n in (100, 1600):
        y, probs = _noisy_binary(n, seed=n)
        r = compute_metrics(y, probs, ["neg", "pos"], n_boot=500, seed=0)
        for name, m in r["metrics"].items():
            assert m["ci_low"] <= m["value"] <= m["ci_high"], name
            MetricWithCI(**m)  # the manifest's shape
        widths[n] = {k: m["ci_high"] - m["ci_low"] for k, m in r["metrics"].items()}
    for name in widths[100]:
        assert widths[1600][name] < 0.6 * widths[100][name], name


def test_ci_is_reproducible_with_the_seed():
    y, probs = _noisy_binary(200, 0)
    a = compute_metrics(y, probs, ["n", "p"], n_boot=200, seed=7)
    b = compute_metrics(y, probs, ["n", "p"], n_boot=200, seed=7)
    assert a["metrics"] == b["metrics"]


def test_bootstrap_1000_resamples_of_600_cases_is_fast():
    y, probs = _noisy_binary(600, 1)
    t0 = time.perf_counter()
    compute_metrics(y, probs, ["n", "p"], n_boot=1000)
    assert time.perf_counter() - t0 < 1.0


def test_auc_bootstrap_skips_single_class_resamples():
    # 2 positives among 40: many resamples have no positive; the CI is still computed from the rest.
    y = np.zeros(40, int)
    y[:2] = 1
    p = np.linspace(0.9, 0.1, 40)
    r = compute_metrics(y, _binary_probs(p), ["n", "p"], n_boot=300)
    auc = r["metrics"]["roc_auc"]
    assert auc["value"] == pytest.approx(1.0)
    assert auc["ci_low"] == pytest.approx(1.0) and auc["ci_high"] == pytest.approx(1.0)


def test_single_class_split_has_no_auc_in_manifest_metrics():
    y = np.ones(10, int)
    r = compute_metrics(y, _binary_probs(np.linspace(0.2, 0.9, 10)), ["n", "p"], n_boot=50)
    assert np.isnan(r["metrics"]["roc_auc"]["value"])
    mm = manifest_metrics(r)
    assert "roc_auc" not in mm and "accuracy" in mm
    assert "roc_auc" in format_table(r)


@pytest.mark.parametrize(
    ("y", "probs", "names", "task"),
    [
        (np.array([0, 1]), np.ones((2, 3)) / 3, ["a", "b"], "single-label"),  # wrong K
        (np.array([0, 1, 1]), np.ones((2, 2)) / 2, ["a", "b"], "single-label"),  # wrong N
        (np.array([0, 2]), np.ones((2, 2)) / 2, ["a", "b"], "single-label"),  # label out of range
        (np.array([0, 1]), np.ones((2, 2)) / 2, ["a", "b"], "multi-label"),  # targets not multi-hot
        (np.array([0, 1]), np.ones((2, 2)) / 2, ["a", "b"], "regression"),
    ],
)
def test_bad_inputs_raise(y, probs, names, task):
    with pytest.raises(ValueError):
        compute_metrics(y, probs, names, task, n_boot=0)
