"""Scoring rules shared by the reproduction, the demo's evaluator and the benchmarks: one place.

Threshold rule: the decision threshold is the one that maximises balanced accuracy (Youden's J)
on the validation split only, never on test. Balanced accuracy, not plain accuracy, because the
validation split of a federation is the union of Dirichlet-skewed local splits whose class
prior differs from the test split's; plain accuracy would move the threshold toward whichever
class that union happens to over-represent. Candidates are the distinct validation
probabilities (plus 0.5); ties go to the lowest threshold.
"""

from __future__ import annotations

import math

import numpy as np


def auc_of(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC; nan when only one class is present."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).reshape(-1)
    if len(np.unique(labels)) < 2:
        return math.nan
    return float(roc_auc_score(labels, np.asarray(probs).reshape(-1)))


def balanced_accuracy_at(*, labels: np.ndarray, probs: np.ndarray, threshold: float) -> float:
    y = np.asarray(labels).reshape(-1) > 0.5
    pred = np.asarray(probs).reshape(-1) >= threshold
    parts = [float((pred[y]).mean())] if y.any() else []
    parts += [float((~pred[~y]).mean())] if (~y).any() else []
    return float(np.mean(parts)) if parts else math.nan


def accuracy_at(*, labels: np.ndarray, probs: np.ndarray, threshold: float) -> float:
    return float(((np.asarray(probs).reshape(-1) >= threshold) == (np.asarray(labels).reshape(-1) > 0.5)).mean())


def select_threshold(*, labels: np.ndarray, probs: np.ndarray) -> float:
    """The validation threshold (module docstring). Keyword-only: the two arrays cannot be swapped."""
    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if probs.size == 0:
        return 0.5
    best_t, best = 0.5, -1.0
    for t in np.unique(np.concatenate([[0.5], probs])):
        score = balanced_accuracy_at(labels=labels, probs=probs, threshold=float(t))
        if score > best:
            best_t, best = float(t), score
    return best_t
