"""Temperature scaling and expected calibration error (numpy + scipy; no torch needed).

* `fit_temperature` finds the single scalar T > 0 minimising the negative log-likelihood of
  ``logits / T`` on the validation split: softmax cross-entropy for single-label tasks, one shared
  temperature on the per-label sigmoids for multi-label tasks. A bounded scalar search over log T
  (Brent) is exact for this one-parameter convex-in-practice problem and needs no autograd.
  Guards (a temperature of 0.16 fitted on a handful of perfectly separated val cases *sharpened* the
  demo model's probabilities): no fit below `MIN_CASES` val cases; the optimum is searched widely, and
  one at the far lower end means the NLL keeps falling as T -> 0 (a separable val set, which says
  nothing about T): T = 1; a genuine optimum is clamped to [`T_MIN`, `T_MAX`] = [0.5, 20] (sharpening
  by more than 2x is not what temperature scaling is for); and T must lower the val NLL, else T = 1.
  `calibrate` reports which happened in ``note``.
* `expected_calibration_error` uses 15 equal-width confidence bins (Guo et al. 2017):
  single-label — top-label confidence vs accuracy; multi-label — every (case, label) probability
  vs the observed label frequency.
* `calibrate` fits T and reports ECE / NLL before and after, in the manifest's ``Calibration`` shape
  (``temperature``, ``ece_before``, ``ece_after``) plus the NLLs and the reliability-diagram bins.

The viewer divides logits by ``manifest.calibration.temperature`` before the softmax/sigmoid.
"""

from __future__ import annotations

from typing import Any

import numpy as np

N_BINS = 15
T_MIN, T_MAX = 0.5, 20.0
_LOG_T_SEARCH = (-7.0, float(np.log(T_MAX)))  # T in [0.0009, 20]: finds where the NLL minimum lies
#: Fewer val cases than this: no temperature is fitted (T = 1).
MIN_CASES = 50


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def probabilities(logits: np.ndarray, task: str, temperature: float = 1.0) -> np.ndarray:
    """Logits -> probabilities as the viewer computes them (softmax or per-label sigmoid)."""
    return sigmoid(logits, temperature) if task == "multi-label" else softmax(logits, temperature)


def nll(logits: np.ndarray, targets: np.ndarray, task: str, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``targets`` under ``logits / temperature``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if task == "multi-label":
        y = np.asarray(targets, dtype=np.float64)
        # BCE with logits, numerically stable: max(z,0) - z*y + log(1 + exp(-|z|)).
        return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))
    y = np.asarray(targets).astype(np.int64).reshape(-1)
    zmax = z.max(axis=1, keepdims=True)
    logsumexp = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
    return float(np.mean(logsumexp - z[np.arange(len(y)), y]))


def fit_temperature_checked(
    logits: np.ndarray, targets: np.ndarray, task: str = "single-label", min_cases: int = MIN_CASES
) -> tuple[float, str]:
    """(T, note): the temperature minimising val NLL of ``logits / T`` within [T_MIN, T_MAX], or 1.0 with
    the reason (``note``) when the val set cannot support a fit (see the module docstring)."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"fit_temperature needs (N>0, K) logits, got shape {logits.shape}")
    if len(logits) < min_cases:
        return 1.0, f"not fitted: {len(logits)} val cases < {min_cases}, too few to estimate a temperature"
    separated = (
        bool(np.all((logits > 0) == (np.asarray(targets) > 0.5)))
        if task == "multi-label"
        else bool(np.all(logits.argmax(axis=1) == np.asarray(targets).astype(np.int64).reshape(-1)))
    )
    if separated:  # every case right: the NLL falls forever as T -> 0, there is no optimum to find
        return 1.0, (
            "not fitted: every val case is classified correctly, so the val NLL keeps falling as T -> 0 "
            "and says nothing about a temperature; sharpening was refused"
        )
    res = minimize_scalar(
        lambda log_t: nll(logits, targets, task, float(np.exp(log_t))),
        bounds=_LOG_T_SEARCH,
        method="bounded",
        options={"xatol": 1e-4},
    )
    best = float(np.exp(res.x))
    if res.x <= _LOG_T_SEARCH[0] + 0.05:
        return 1.0, (
            "not fitted: the val NLL keeps falling as T -> 0 (the val set is separated nearly "
            "perfectly), which says nothing about a temperature; sharpening was refused"
        )
    t = float(np.clip(best, T_MIN, T_MAX))
    # Never return something worse than doing nothing (flat NLL surfaces, degenerate splits).
    if nll(logits, targets, task, t) >= nll(logits, targets, task, 1.0):
        return 1.0, "not fitted: no temperature lowers the val NLL"
    if best < T_MIN:
        return t, f"clamped to T = {T_MIN:g} (the val optimum was T = {best:.2f}; sharpening limited to 2x)"
    if best >= T_MAX * 0.99:
        return t, f"fitted at the upper bound T = {T_MAX:g}: the model is strongly over-confident"
    return t, "fitted on the val split"


def fit_temperature(logits: np.ndarray, targets: np.ndarray, task: str = "single-label") -> float:
    """The temperature T > 0 minimising validation NLL of ``logits / T`` (1.0 when the val set cannot
    support a fit; `fit_temperature_checked` also says why)."""
    return fit_temperature_checked(logits, targets, task)[0]


def _confidence_and_correct(
    probs: np.ndarray, targets: np.ndarray, task: str
) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    if task == "multi-label":
        return probs.ravel(), (np.asarray(targets, dtype=np.float64) > 0.5).ravel().astype(np.float64)
    y = np.asarray(targets).astype(np.int64).reshape(-1)
    return probs.max(axis=1), (probs.argmax(axis=1) == y).astype(np.float64)


def reliability_bins(
    probs: np.ndarray, targets: np.ndarray, task: str = "single-label", n_bins: int = N_BINS
) -> dict[str, list[float]]:
    """Per-bin mean confidence, observed accuracy (frequency) and count, for reliability diagrams.

    Bins are equal-width on [0, 1] (right-closed, the first also holds 0). Empty bins have count 0
    and NaN confidence/accuracy.
    """
    conf, correct = _confidence_and_correct(probs, targets, task)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan)
        mean_acc = np.where(count > 0, acc_sum / np.maximum(count, 1), np.nan)
    return {
        "edges": edges.tolist(),
        "confidence": mean_conf.tolist(),
        "accuracy": mean_acc.tolist(),
        "count": count.astype(int).tolist(),
    }


def expected_calibration_error(
    probs: np.ndarray, targets: np.ndarray, task: str = "single-label", n_bins: int = N_BINS
) -> float:
    """ECE: count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    b = reliability_bins(probs, targets, task, n_bins)
    count = np.asarray(b["count"], dtype=np.float64)
    if count.sum() == 0:
        return float("nan")
    gap = np.abs(np.nan_to_num(np.asarray(b["accuracy"])) - np.nan_to_num(np.asarray(b["confidence"])))
    return float(np.sum(count * gap) / count.sum())


def calibrate(
    logits: np.ndarray, targets: np.ndarray, task: str = "single-label", n_bins: int = N_BINS
) -> dict[str, Any]:
    """Fit a temperature on (validation) logits and report calibration before and after.

    Returns {"temperature", "ece_before", "ece_after", "nll_before", "nll_after", "n", "note",
    "reliability_before", "reliability_after"}; the first three fill ``Manifest.calibration``,
    ``note`` says whether T was fitted or why not.
    """
    t, note = fit_temperature_checked(logits, targets, task)
    before = probabilities(logits, task, 1.0)
    after = probabilities(logits, task, t)
    return {
        "temperature": t,
        "ece_before": expected_calibration_error(before, targets, task, n_bins),
        "ece_after": expected_calibration_error(after, targets, task, n_bins),
        "nll_before": nll(logits, targets, task, 1.0),
        "nll_after": nll(logits, targets, task, t),
        "n": len(logits),
        "note": note,
        "reliability_before": reliability_bins(before, targets, task, n_bins),
        "reliability_after": reliability_bins(after, targets, task, n_bins),
    }
