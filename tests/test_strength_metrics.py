"""Macro metrics against hand computations on unequal class supports, where a support-weighted mean differs."""

from __future__ import annotations

import numpy as np
import pytest

from retclip_dist.eval.metrics import multiclass_metrics, multilabel_metrics, selection_score


def test_multiclass_macro_metrics_on_unequal_supports_match_hand_computation():
    # Supports 3, 2, 1. One-vs-rest AUROC counts (positive, negative) pairs ordered right:
    #   a: positives 0.6 0.5 0.2 vs negatives 0.3 0.45 0.1 -> 3 + 3 + 1 = 7 of 9
    #   b: positives 0.6 0.4 vs negatives 0.3 0.2 0.5 0.2 -> 4 + 3 = 7 of 8
    #   c: positive 0.7 above all five negatives -> 1
    # AP: a ranks P P N N P N -> (1 + 1 + 3/5) / 3 = 13/15; b ranks P N P ... -> (1 + 2/3) / 2 = 5/6; c 1.
    labels = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array(
        [
            [0.6, 0.3, 0.1],
            [0.5, 0.2, 0.3],
            [0.2, 0.5, 0.3],
            [0.3, 0.6, 0.1],
            [0.45, 0.4, 0.15],
            [0.1, 0.2, 0.7],
        ]
    )
    m = multiclass_metrics(labels, probs, ["a", "b", "c"])
    assert [m["per_class"][c]["support"] for c in "abc"] == [3, 2, 1]
    assert [m["per_class"][c]["auroc"] for c in "abc"] == pytest.approx([7 / 9, 7 / 8, 1.0])
    assert [m["per_class"][c]["auprc"] for c in "abc"] == pytest.approx([13 / 15, 5 / 6, 1.0])
    # Argmax predicts a a b b a c: F1(a) = 2*2 / (2*2 + 1 + 1), F1(b) = 2*1 / (2*1 + 1 + 1), F1(c) = 1.
    assert [m["per_class"][c]["f1"] for c in "abc"] == pytest.approx([2 / 3, 1 / 2, 1.0])
    overall = m["overall"]
    # Macro: the plain mean over classes. Weighted by support these would be 0.847, 0.878 and 2/3.
    assert overall["macro_auroc"] == pytest.approx((7 / 9 + 7 / 8 + 1) / 3)
    assert overall["macro_auprc"] == pytest.approx((13 / 15 + 5 / 6 + 1) / 3)
    assert overall["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert overall["accuracy"] == pytest.approx(4 / 6)


def test_multilabel_macro_metrics_on_unequal_supports_match_hand_computation():
    # x: 4 positives (0.9 0.5 0.6 0.8) all above its one negative (0.4) -> AUROC 1, AP 1.
    # y: 1 positive (0.6) above 0.2 0.1 0.5, below 0.7 -> AUROC 3/4; ranked N P ... -> AP 1/2.
    labels = np.array([[1, 0], [1, 1], [1, 0], [0, 0], [1, 0]])
    probs = np.array([[0.9, 0.2], [0.5, 0.6], [0.6, 0.7], [0.4, 0.1], [0.8, 0.5]])
    m = multilabel_metrics(labels, probs, ["x", "y"])
    assert [m["per_class"][c]["support"] for c in "xy"] == [4, 1]
    assert [m["per_class"][c]["auroc"] for c in "xy"] == pytest.approx([1.0, 0.75])
    overall = m["overall"]
    # Macro means; weighted by support they would be 0.95 and 0.9.
    assert overall["macro_auroc"] == pytest.approx(0.875)
    assert overall["mAP"] == pytest.approx(0.75)
    # At 0.5, x is predicted exactly (F1 1, accuracy 1); y predicts rows 1, 2 and 4 (0.5 counts): tp 1,
    # fp 2 -> F1 1/2, accuracy 3/5. Rows 0, 1 and 3 are right in both labels.
    assert [m["per_class"][c]["f1"] for c in "xy"] == pytest.approx([1.0, 0.5])
    assert overall["macro_f1"] == pytest.approx(0.75)
    assert overall["accuracy"] == pytest.approx(0.8)
    assert overall["exact_match"] == pytest.approx(0.6)


@pytest.mark.filterwarnings("ignore::UserWarning")  # scikit-learn: kappa is undefined on one label
def test_undefined_selection_metric_ranks_below_every_defined_one():
    # No class has both outcomes: AUROC is undefined, and a hyper-parameter that scored it must lose.
    m = multiclass_metrics(np.array([0, 0]), np.array([[0.9, 0.1], [0.8, 0.2]]), ["a", "b"])
    assert m["overall"]["macro_auroc"] is None
    assert selection_score(m, "macro_auroc") == float("-inf")
