"""Classification metrics with bootstrap 95% confidence intervals (scikit-learn point estimates).

`compute_metrics` is the one entry point used by the engine (per-epoch validation, final eval), by
`training.export` (the numbers that go into a bundle's manifest) and by ``kd-train eval``.

Conventions
-----------
* single-label: ``probs`` (N, K) softmax probabilities, ``y_true`` (N,) class indices; the
  prediction is the arg-max.

  - binary (K == 2): precision / recall (= sensitivity) / F1 / specificity refer to the positive
    class (``positive_class``, default ``class_names[1]``); ``roc_auc`` is the AUC of the positive
    class probability.
  - multiclass (K > 2): precision / recall / F1 / specificity are macro averages of the
    one-vs-rest values (a class never predicted has precision 0, as scikit-learn's
    ``zero_division=0``); ``roc_auc`` is the macro average of the one-vs-rest AUCs, which are also
    reported per class as ``roc_auc:<class>``.

* multi-label: ``probs`` (N, K) sigmoid probabilities, ``y_true`` (N, K) multi-hot; each label is
  thresholded at 0.5. ``accuracy`` is the label-wise (Hamming) accuracy, precision / recall / F1 /
  specificity are macro averages over labels, ``roc_auc`` is the macro AUC over labels that have
  both outcomes, with ``roc_auc:<label>`` per label. ``confusion_matrix`` is then one 2x2 matrix
  per label (``[[TN, FP], [FN, TP]]``), as scikit-learn's ``multilabel_confusion_matrix``.

Confidence intervals are percentile bootstrap intervals (2.5th and 97.5th percentiles) over
``n_boot`` resamples of the cases with replacement. The bootstrap is vectorised: a resample is a
row of case multiplicities ``C`` (n_boot, N), confusion counts of all resamples are one matrix
product, and AUCs are computed from multiplicity-weighted rank statistics over the cases sorted
once — 1000 resamples of 600 cases take a few tens of milliseconds. Resamples where a metric is
undefined (only one class present for an AUC) are skipped for that metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

CI_LEVEL = 0.95


def _ci(samples: np.ndarray) -> tuple[float | None, float | None]:
    """Percentile interval of the finite entries of ``samples``; (None, None) when there are none."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size < 2:
        return None, None
    alpha = (1.0 - CI_LEVEL) / 2.0 * 100.0
    lo, hi = np.percentile(s, [alpha, 100.0 - alpha])
    return float(lo), float(hi)


def _entry(value: float, samples: np.ndarray | None) -> dict[str, float | None]:
    """One metric in the manifest's MetricWithCI shape (value, ci_low, ci_high)."""
    lo, hi = _ci(samples) if samples is not None else (None, None)
    v = float(value)
    return {"value": v if math.isfinite(v) else float("nan"), "ci_low": lo, "ci_high": hi}


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (scikit-learn's zero_division=0)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def bootstrap_counts(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, n) multiplicities of each case in each resample (rows sum to n)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    offsets = (np.arange(n_boot, dtype=np.int64) * n)[:, None]
    return np.bincount((idx + offsets).ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC-AUC of ``scores`` for binary ``positive`` under each row of case ``weights``.

    ``weights`` is (B, N) (or (N,)); returns (B,) AUCs (NaN where a row has no positive or no
    negative weight). Ties count one half, so with unit weights this equals sklearn's roc_auc_score.
    """
    scores = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive).astype(bool)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order = np.argsort(scores, kind="mergesort")
    s_sorted = scores[order]
    pos_sorted = pos[order]
    w = w[:, order]
    # Group tied scores: within a group, a positive beats half of the group's negatives.
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    wp = np.add.reduceat(w * pos_sorted, starts, axis=1)
    wn = np.add.reduceat(w * ~pos_sorted, starts, axis=1)
    neg_below = np.cumsum(wn, axis=1) - wn
    num = np.sum(wp * (neg_below + 0.5 * wn), axis=1)
    den = wp.sum(axis=1) * wn.sum(axis=1)
    out = np.full(w.shape[0], np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _rates_from_counts(
    tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray
) -> dict[str, np.ndarray]:
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    return {
        "precision": precision,
        "recall": recall,
        "f1": _safe_div(2 * precision * recall, precision + recall),
        "specificity": _safe_div(tn, tn + fp),
    }


def _single_label(
    y: np.ndarray, probs: np.ndarray, class_names: list[str], pos_idx: int, n_boot: int, seed: int
) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score

    n, k = probs.shape
    pred = probs.argmax(axis=1)
    labels = list(range(k))
    cm = confusion_matrix(y, pred, labels=labels)
    metrics: dict[str, dict[str, float | None]] = {}

    # Confusion matrices of all resamples at once: CM[b] = C[b] @ onehot(y * K + pred).
    C = bootstrap_counts(n, n_boot, seed) if n_boot > 0 else None
    if C is not None:
        cell = np.zeros((n, k * k))
        cell[np.arange(n), y * k + pred] = 1.0
        cms = (C @ cell).reshape(n_boot, k, k)
    else:
        cms = None

    def per_class(m: np.ndarray) -> dict[str, np.ndarray]:
        # m: (..., K, K) with rows = truth, columns = prediction.
        tp = np.diagonal(m, axis1=-2, axis2=-1)
        fp = m.sum(axis=-2) - tp
        fn = m.sum(axis=-1) - tp
        tn = m.sum(axis=(-2, -1))[..., None] - tp - fp - fn
        return _rates_from_counts(tp, fp, fn, tn)

    acc = accuracy_score(y, pred)
    acc_b = np.trace(cms, axis1=1, axis2=2) / n if cms is not None else None
    metrics["accuracy"] = _entry(acc, acc_b)

    point = per_class(cm.astype(np.float64))
    boot = per_class(cms) if cms is not None else None
    for name in ("precision", "recall", "f1", "specificity"):
        if k == 2:
            value = point[name][pos_idx]
            samples = boot[name][:, pos_idx] if boot is not None else None
        else:
            value = point[name].mean()
            samples = boot[name].mean(axis=1) if boot is not None else None
        metrics[name] = _entry(value, samples)

    # ROC-AUC: point estimate from scikit-learn, bootstrap from weighted rank statistics.
    def auc_of(class_idx: int) -> tuple[float, np.ndarray | None]:
        positive = y == class_idx
        if positive.all() or not positive.any():
            return float("nan"), None
        value = float(roc_auc_score(positive, probs[:, class_idx]))
        samples = weighted_auc(probs[:, class_idx], positive, C) if C is not None else None
        return value, samples

    if k == 2:
        value, samples = auc_of(pos_idx)
        metrics["roc_auc"] = _entry(value, samples)
    else:
        values, sample_rows, per_class_auc = [], [], {}
        for c in range(k):
            value, samples = auc_of(c)
            per_class_auc[f"roc_auc:{class_names[c]}"] = _entry(value, samples)
            values.append(value)
            sample_rows.append(samples if samples is not None else np.full(n_boot, np.nan))
        finite = [v for v in values if math.isfinite(v)]
        macro = float(np.mean(finite)) if len(finite) == k else float("nan")
        # A resample missing any class has an undefined macro AUC (NaN) and is skipped.
        macro_b = np.mean(np.stack(sample_rows), axis=0) if C is not None else None
        metrics["roc_auc"] = _entry(macro, macro_b)
        metrics.update(per_class_auc)

    support = np.bincount(y, minlength=k)
    return {"metrics": metrics, "confusion_matrix": cm.astype(int).tolist(), "support": support.tolist()}


def _multi_label(
    y: np.ndarray, probs: np.ndarray, class_names: list[str], n_boot: int, seed: int
) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    n, k = probs.shape
    y = (y > 0.5).astype(np.float64)
    pred = (probs >= 0.5).astype(np.float64)
    # one [[TN, FP], [FN, TP]] per label, counted here: sklearn's multilabel_confusion_matrix reads a
    # one-column indicator matrix (recipe 004: a single finding) as binary *multiclass* targets and
    # returns two matrices, one per class value — which broke the metrics and the report
    yb, pb = y.astype(bool), pred.astype(bool)
    counts = [(~yb & ~pb).sum(0), (~yb & pb).sum(0), (yb & ~pb).sum(0), (yb & pb).sum(0)]
    mcm = np.stack(counts, axis=1).reshape(k, 2, 2)
    tn, fp, fn, tp = (mcm[:, i // 2, i % 2].astype(np.float64) for i in range(4))
    point = _rates_from_counts(tp, fp, fn, tn)
    metrics: dict[str, dict[str, float | None]] = {}

    C = bootstrap_counts(n, n_boot, seed) if n_boot > 0 else None
    if C is not None:
        tp_b, fp_b = C @ (y * pred), C @ ((1 - y) * pred)
        fn_b, tn_b = C @ (y * (1 - pred)), C @ ((1 - y) * (1 - pred))
        boot = _rates_from_counts(tp_b, fp_b, fn_b, tn_b)
        acc_b = (tp_b + tn_b).sum(axis=1) / (n * k)
    else:
        boot, acc_b = None, None
    metrics["accuracy"] = _entry(float((tp + tn).sum() / (n * k)), acc_b)
    for name in ("precision", "recall", "f1", "specificity"):
        metrics[name] = _entry(point[name].mean(), boot[name].mean(axis=1) if boot is not None else None)

    values, sample_rows, per_label_auc = [], [], {}
    for c in range(k):
        positive = y[:, c] > 0.5
        if positive.all() or not positive.any():
            per_label_auc[f"roc_auc:{class_names[c]}"] = _entry(float("nan"), None)
            continue
        value = float(roc_auc_score(positive, probs[:, c]))
        samples = weighted_auc(probs[:, c], positive, C) if C is not None else None
        per_label_auc[f"roc_auc:{class_names[c]}"] = _entry(value, samples)
        values.append(value)
        if samples is not None:
            sample_rows.append(samples)
    macro = float(np.mean(values)) if values else float("nan")
    macro_b = np.mean(np.stack(sample_rows), axis=0) if sample_rows else None
    metrics["roc_auc"] = _entry(macro, macro_b)
    metrics.update(per_label_auc)
    support = y.sum(axis=0).astype(int)
    return {"metrics": metrics, "confusion_matrix": mcm.astype(int).tolist(), "support": support.tolist()}


def compute_metrics(
    y_true: Sequence | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    task: str = "single-label",
    positive_class: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics with bootstrap 95% CIs for one model on one split.

    Returns ``{"metrics": {name: {"value", "ci_low", "ci_high"}}, "confusion_matrix": [[...]],
    "support": [...], "class_names": [...], "task": str, "positive_class": str | None, "n": int,
    "n_boot": int}``. ``metrics`` has the shape of the manifest's ``MetricWithCI`` entries; CIs are
    None when ``n_boot`` is 0. See the module docstring for the definitions.
    """
    class_names = [str(c) for c in class_names]
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true)
    if probs.ndim != 2 or probs.shape[1] != len(class_names):
        raise ValueError(f"probs must be (N, {len(class_names)}), got {probs.shape}")
    if len(y) != probs.shape[0]:
        raise ValueError(f"y_true has {len(y)} cases but probs has {probs.shape[0]}")
    if probs.shape[0] == 0:
        raise ValueError("cannot compute metrics on an empty set")
    n_boot = max(0, int(n_boot))
    if task == "multi-label":
        if y.shape != probs.shape:
            raise ValueError(f"multi-label targets must be (N, K) like probs, got {y.shape}")
        out = _multi_label(y.astype(np.float64), probs, class_names, n_boot, seed)
        pos_name = None
    elif task == "single-label":
        y = y.astype(np.int64).reshape(-1)
        if y.min() < 0 or y.max() >= len(class_names):
            raise ValueError("y_true holds class indices outside 0..K-1")
        pos_name = positive_class if positive_class is not None else class_names[-1]
        if pos_name not in class_names:
            raise ValueError(f"positive_class {pos_name!r} is not one of {class_names}")
        if len(class_names) != 2:
            pos_name = positive_class
        pos_idx = class_names.index(pos_name) if pos_name is not None else 0
        out = _single_label(y, probs, class_names, pos_idx, n_boot, seed)
    else:
        raise ValueError(f"unknown task {task!r} (single-label or multi-label)")
    out.update(
        class_names=class_names,
        task=task,
        positive_class=pos_name,
        n=int(probs.shape[0]),
        n_boot=n_boot,
    )
    return out


def manifest_metrics(result: dict[str, Any], prefix: str = "") -> dict[str, dict[str, float | None]]:
    """The ``metrics`` of a `compute_metrics` result with finite values only, optionally prefixed.

    Suitable for ``Manifest.metrics`` (NaN values, e.g. an AUC on a one-class split, are dropped).
    """
    out = {}
    for name, m in result["metrics"].items():
        if m["value"] is not None and math.isfinite(m["value"]):
            out[f"{prefix}{name}"] = dict(m)
    return out


def format_table(result: dict[str, Any], title: str | None = None) -> str:
    """A plain-text table: metric, value, 95% CI — what ``kd-train eval`` prints."""
    rows = [("metric", "value", "95% CI")]
    for name, m in result["metrics"].items():
        v = m["value"]
        value = "n/a" if v is None or not math.isfinite(v) else f"{v:.4f}"
        ci = "" if m["ci_low"] is None else f"[{m['ci_low']:.4f}, {m['ci_high']:.4f}]"
        rows.append((name, value, ci))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [title] if title else []
    for j, r in enumerate(rows):
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(3)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(f"n = {result['n']}  (bootstrap resamples: {result['n_boot']})")
    return "\n".join(lines)
