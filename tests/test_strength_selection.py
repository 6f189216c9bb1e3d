"""The linear probe's choice of C, checked against validation scores computed here with scikit-learn.

The end-to-end probe test used to compare the chosen C with the maximum of the probe's own reported
curve, which passes whatever that curve holds. Here the curve is recomputed independently.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from retclip_dist.eval.config import ProbeConfig
from retclip_dist.eval.probe import fit_probe

CLASSES = ["a", "b", "c"]


def _split(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 20))
    x[:, 0] += 0.8 * y
    x[:, 1] -= 0.8 * (y == 1)
    return x, y


def _val_auroc(c: float, train, val) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(*train)
    probs = clf.predict_proba(val[0])
    return float(np.mean([roc_auc_score(val[1] == k, probs[:, k]) for k in range(3)]))


def test_probe_picks_the_c_with_the_best_validation_auroc():
    rng = np.random.default_rng(0)
    train, val = _split(rng, 30), _split(rng, 30)
    cfg = ProbeConfig()
    fit = fit_probe(train, val, CLASSES, False, cfg)
    expected = {c: _val_auroc(c, train, val) for c in sorted(cfg.c_grid)}
    assert [row["C"] for row in fit.validation] == sorted(cfg.c_grid)
    assert [row["macro_auroc"] for row in fit.validation] == pytest.approx(list(expected.values()), abs=1e-9)
    # On this data the best C is inside the grid (0.7478 at C = 1 against 0.7412 and 0.7343 beside it),
    # so neither end of the grid nor the last fit passes.
    assert fit.c == max(expected, key=expected.get) == 1.0
    # The returned classifier is the one fitted with that C.
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(*train)
    np.testing.assert_allclose(
        fit.classifier.predict_proba(val[0]), reference.predict_proba(val[0]), atol=1e-9
    )


def test_probe_ties_go_to_the_smaller_c_whatever_the_grid_order():
    rng = np.random.default_rng(1)
    y = np.tile([0, 1, 2], 10)
    x = rng.normal(size=(30, 4))
    x[:, 0] += 10.0 * y  # separable: every C ranks validation perfectly
    fit = fit_probe((x, y), (x, y), CLASSES, False, ProbeConfig(c_grid=[100.0, 1.0, 10.0]))
    assert [row["macro_auroc"] for row in fit.validation] == [1.0, 1.0, 1.0]
    assert fit.c == 1.0
