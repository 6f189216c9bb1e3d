"""Linear probe: L2-regularised logistic regression on frozen features, C chosen on validation.

Features are standardised with training statistics first, so one grid of C values suits towers of any
width. Multi-label tasks fit one binary classifier per label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from retclip_dist.eval.config import ProbeConfig
from retclip_dist.eval.metrics import compute_metrics, selection_score


@dataclass
class ProbeFit:
    classifier: Pipeline  # scaler + logistic regression, fitted on the training split
    c: float  # the chosen inverse regularisation strength
    validation: list[dict[str, float]]  # [{"C": c, metric: value}, ...] over the grid


def _classifier(c: float, multilabel: bool, max_iter: int) -> Pipeline:
    logistic = LogisticRegression(C=c, max_iter=max_iter)
    return make_pipeline(StandardScaler(), OneVsRestClassifier(logistic) if multilabel else logistic)


def predict_probs(classifier: Pipeline, features: np.ndarray) -> np.ndarray:
    """[n, C] probabilities, columns in class-index order."""
    return classifier.predict_proba(features)


def fit_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    classes: list[str],
    multilabel: bool,
    cfg: ProbeConfig,
) -> ProbeFit:
    """Fit every C of the grid on ``train``; keep the best on ``val`` (ties go to the smaller C)."""
    if not cfg.c_grid:
        raise ValueError("probe.c_grid is empty")
    best: tuple[float, float, Pipeline] | None = None
    curve: list[dict[str, Any]] = []
    for c in sorted(cfg.c_grid):
        classifier = _classifier(c, multilabel, cfg.max_iter).fit(*train)
        metrics = compute_metrics(val[1], predict_probs(classifier, val[0]), classes, multilabel)
        score = selection_score(metrics, cfg.select_metric)
        curve.append({"C": c, cfg.select_metric: score})
        if best is None or score > best[0]:
            best = (score, c, classifier)
    assert best is not None
    return ProbeFit(classifier=best[2], c=best[1], validation=curve)
