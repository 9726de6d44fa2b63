"""Student vs teacher on the same case: agreement, divergence and the disagreement flag.

* ``divergence`` = total variation distance ``TV = 0.5 * sum_k |p_k - q_k|`` (in [0, 1]); for
  multi-label tasks, where each label is its own Bernoulli distribution, the largest ``|p_k - q_k|``.
* ``js_divergence`` = Jensen-Shannon divergence in bits (in [0, 1]); multi-label: the mean of the
  per-label Bernoulli JS divergences.
* ``disagree`` = the labels differ, or TV > ``manifest.disagreement_threshold``.

A study refused by the modality gate (``Prediction.refused``) has no probabilities to compare: the
comparison reports agreement (both gave no class), divergence 0 and no disagreement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from kdviewer.inference.predict import Prediction


def total_variation(p: np.ndarray, q: np.ndarray, multi_label: bool = False) -> float:
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if multi_label:
        return float(np.max(np.abs(p - q))) if p.size else 0.0
    return float(0.5 * np.abs(p - q).sum())


def _kl2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    safe_a = np.where(a > 0, a, 1.0)
    return np.where(a > 0, a * np.log2(safe_a / np.maximum(b, 1e-300)), 0.0).sum(axis=-1)


def js_divergence(p: np.ndarray, q: np.ndarray, multi_label: bool = False) -> float:
    """Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint supports)."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if multi_label:
        p = np.stack([p, 1 - p], axis=-1)
        q = np.stack([q, 1 - q], axis=-1)
        m = (p + q) / 2
        return float(np.mean(0.5 * _kl2(p, m) + 0.5 * _kl2(q, m)))
    m = (p + q) / 2
    return float(np.clip(0.5 * _kl2(p, m) + 0.5 * _kl2(q, m), 0.0, 1.0))


@dataclass
class Comparison:
    """Student and teacher on the same case."""

    student: Prediction
    teacher: Prediction
    agreement: bool  # same label
    divergence: float  # total variation distance
    js_divergence: float
    threshold: float  # manifest.disagreement_threshold
    disagree: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "student": self.student.to_dict(),
            "teacher": self.teacher.to_dict(),
            "agreement": self.agreement,
            "divergence": self.divergence,
            "js_divergence": self.js_divergence,
            "threshold": self.threshold,
            "disagree": self.disagree,
        }


def compare_predictions(
    student: Prediction, teacher: Prediction, threshold: float, multi_label: bool = False
) -> Comparison:
    if student.refused is not None or teacher.refused is not None:
        return Comparison(student, teacher, True, 0.0, 0.0, float(threshold), disagree=False)
    tv = total_variation(student.probabilities, teacher.probabilities, multi_label)
    js = js_divergence(student.probabilities, teacher.probabilities, multi_label)
    agree = student.label == teacher.label
    disagree = (not agree) or tv > threshold
    return Comparison(student, teacher, agree, tv, js, float(threshold), disagree=disagree)
