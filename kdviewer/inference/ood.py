"""Out-of-distribution guard: how unlike the training data a case looks, from penultimate features.

Score = Mahalanobis distance (square root of the quadratic form) of a feature vector to the mean of
the training features, with a Ledoit-Wolf shrunk covariance so that a few hundred samples of a
512-dimensional feature still give a well-conditioned precision matrix. Statistics live in the
bundle's ``ood.npz`` (arrays "mean" (D,) and "precision" (D, D)); the warning threshold is
``manifest.ood.threshold`` (by convention the 99th percentile of validation scores). Higher = less
like the training data.

`domain_shift` judges a *set* of cases (a batch folder): a near-domain shift that the guard flags only
now and then per case still shows as far more flags than the ~1% the threshold implies (binomial
test). numpy + scikit-learn + scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


def fit_ood_stats(features: np.ndarray) -> dict[str, np.ndarray]:
    """Fit the guard's statistics on (N, D) in-distribution features (e.g. the training set).

    Returns {"mean": (D,) float32, "precision": (D, D) float32}, ready for ``np.savez(..., **stats)``.
    """
    from sklearn.covariance import LedoitWolf

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"fit_ood_stats needs (N>=2, D) features, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("fit_ood_stats: features contain NaN or inf")
    lw = LedoitWolf(assume_centered=False).fit(x)
    precision = lw.precision_
    precision = (precision + precision.T) / 2.0  # exact symmetry, so the quadratic form is real >= 0
    return {"mean": lw.location_.astype(np.float32), "precision": precision.astype(np.float32)}


def ood_scores(features: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
    """Mahalanobis distance of each row of (N, D) (or one (D,)) feature vector -> (N,) float32."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    mean = np.asarray(stats["mean"], dtype=np.float64)
    prec = np.asarray(stats["precision"], dtype=np.float64)
    if x.shape[1] != mean.shape[0]:
        raise ValueError(f"feature size {x.shape[1]} does not match OOD statistics ({mean.shape[0]})")
    d = x - mean
    q = np.einsum("nd,de,ne->n", d, prec, d)
    return np.sqrt(np.maximum(q, 0.0)).astype(np.float32)


def save_ood_stats(path: str | Path, stats: dict[str, np.ndarray]) -> Path:
    """Write stats as ``ood.npz`` (plain arrays; read back with allow_pickle=False)."""
    path = Path(path)
    np.savez(path, mean=np.asarray(stats["mean"]), precision=np.asarray(stats["precision"]))
    return path


def load_ood_stats(path: str | Path) -> dict[str, np.ndarray]:
    """Read an ``ood.npz`` without unpickling anything; ValueError when arrays are missing/malformed
    (see `kdviewer.models.ood_stats.read_ood_stats`: headers checked before anything is allocated)."""
    from kdviewer.models.ood_stats import read_ood_stats

    return read_ood_stats(path)


@dataclass
class OodGuard:
    """Scores features and flags those above ``threshold`` (from ``manifest.ood.threshold``)."""

    stats: dict[str, np.ndarray]
    threshold: float

    @property
    def dim(self) -> int:
        return int(np.asarray(self.stats["mean"]).shape[0])

    def score(self, features: np.ndarray) -> np.ndarray:
        return ood_scores(features, self.stats)

    def flag(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores (N,), flags (N,) bool): True = does not look like the training data."""
        s = self.score(features)
        return s, s > self.threshold


IN_DIST_FLAG_RATE = 0.01  # the threshold is the 99th percentile of val scores: ~1% of in-distribution cases
SHIFT_P_VALUE = 1e-3  # a set of cases with a flag count this improbable is called shifted


@dataclass(frozen=True)
class DomainShift:
    """Set-level check of a group of cases (a batch folder): are there more OOD flags than chance?

    One by one, the guard misses cases that are only a little unlike the training data; a whole folder
    of them still shows as many more flags than the ``rate`` (1%) expected of in-distribution data.
    ``p_value`` is the binomial probability of at least ``flagged`` flags among ``scored`` cases.
    """

    flagged: int
    scored: int
    rate: float
    p_value: float

    @property
    def expected(self) -> float:
        return self.rate * self.scored

    @property
    def shifted(self) -> bool:
        return self.scored > 0 and self.p_value < SHIFT_P_VALUE

    def message(self) -> str:
        head = (
            f"{self.flagged} of {self.scored} case(s) flagged by the OOD guard where about "
            f"{self.expected:.1f} would be for data like the training set (p = {self.p_value:.1e})"
        )
        if self.shifted:
            return (
                f"DOMAIN SHIFT: {head}. These cases do not look like the model's training data; "
                "treat all their results with caution."
            )
        return head


def domain_shift(flagged: int, scored: int, rate: float = IN_DIST_FLAG_RATE) -> DomainShift:
    """`DomainShift` of ``flagged`` flags among ``scored`` cases (scipy's binomial survival function)."""
    from scipy.stats import binom

    if not 0 <= flagged <= scored:
        raise ValueError(f"flagged ({flagged}) must be between 0 and scored ({scored})")
    p = float(binom.sf(flagged - 1, scored, rate)) if flagged else 1.0
    return DomainShift(flagged, scored, rate, p)


def threshold_from_scores(scores: np.ndarray, percentile: float = 99.0) -> float:
    """The usual threshold: a high percentile of in-distribution (validation) scores."""
    return float(np.percentile(np.asarray(scores, dtype=np.float64), percentile))
