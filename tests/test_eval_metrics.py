"""Metric functions against values worked out by hand, and the files a result is written to."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retclip_dist.eval.metrics import compute_metrics, multiclass_metrics, multilabel_metrics, selection_score
from retclip_dist.eval.report import markdown_table, write_result


def test_binary_metrics_match_hand_computation():
    # Ranking by P(class 1): 0.8 (pos), 0.4 (neg), 0.35 (pos), 0.1 (neg).
    # AUROC: 3 of 4 (pos, neg) pairs ordered right = 0.75; AP = (1/1 + 2/3) / 2 = 5/6.
    labels = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    m = multiclass_metrics(labels, np.stack([1 - p1, p1], axis=1), ["no", "yes"])
    assert m["per_class"]["yes"]["auroc"] == pytest.approx(0.75)
    assert m["per_class"]["yes"]["auprc"] == pytest.approx(5 / 6)
    assert m["per_class"]["no"]["auprc"] == pytest.approx(5 / 6)
    # argmax predicts [0, 0, 0, 1]: F1(yes) = 2/3 (tp 1, fn 1), F1(no) = 0.8 (tp 2, fp 1).
    assert m["per_class"]["yes"]["f1"] == pytest.approx(2 / 3)
    assert m["per_class"]["no"]["f1"] == pytest.approx(0.8)
    assert m["overall"]["accuracy"] == pytest.approx(0.75)
    assert m["overall"]["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["overall"]["macro_auroc"] == pytest.approx(0.75)
    assert m["per_class"]["yes"]["support"] == 2


def test_quadratic_kappa_matches_hand_computation():
    # True [0, 1, 2, 2], predicted [0, 2, 2, 1]; weights (i - j)^2. Observed weighted disagreement
    # (1 + 1) / 4 = 0.5. Expected, from marginals r = c = [1/4, 1/4, 1/2]: sum (i - j)^2 r_i c_j
    # = 2 * (1/16 + 4/8 + 1/8) = 1.375. Kappa = 1 - 0.5 / 1.375 = 7/11.
    labels = np.array([0, 1, 2, 2])
    probs = np.eye(3)[[0, 2, 2, 1]] * 0.8 + 0.1
    m = multiclass_metrics(labels, probs, ["0", "1", "2"])
    assert m["overall"]["kappa_quadratic"] == pytest.approx(7 / 11)
    assert m["overall"]["accuracy"] == pytest.approx(0.5)


def test_multilabel_map_and_thresholded_scores():
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    probs = np.array([[0.9, 0.65], [0.3, 0.6], [0.4, 0.7], [0.2, 0.1]])
    m = multilabel_metrics(labels, probs, ["a", "b"])
    # a: ranked perfectly -> AUROC 1, AP 1. b: 0.7 (pos), 0.65 (neg), 0.6 (pos), 0.1 (neg) -> AP 5/6, AUROC 3/4.
    assert m["per_class"]["a"]["auroc"] == pytest.approx(1.0)
    assert m["per_class"]["b"]["auroc"] == pytest.approx(0.75)
    assert m["overall"]["mAP"] == pytest.approx((1 + 5 / 6) / 2)
    # At 0.5: a predicts [1, 0, 0, 0] (F1 2/3), b predicts [1, 1, 1, 0] (F1 0.8); rows 2 and 4 all right.
    assert m["per_class"]["a"]["f1"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["f1"] == pytest.approx(0.8)
    assert m["overall"]["accuracy"] == pytest.approx(0.75)
    assert m["overall"]["exact_match"] == pytest.approx(0.5)


def test_class_without_positives_has_no_auroc_and_is_left_out_of_the_macro():
    labels = np.array([0, 1, 0, 1])
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.5, 0.4, 0.1]])
    m = multiclass_metrics(labels, probs, ["a", "b", "c"])
    assert m["per_class"]["c"]["auroc"] is None
    assert m["overall"]["macro_auroc"] == pytest.approx(1.0)
    assert selection_score(m, "macro_auroc") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="selection metric 'auc'"):
        selection_score(m, "auc")


def test_result_files(tmp_path):
    labels = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    probs = np.stack([1 - p1, p1], axis=1)
    result = {
        "method": "linear-probe",
        "features_from": "left head (4)",
        "metrics": compute_metrics(labels, probs, ["no", "yes"], multilabel=False),
    }
    paths = write_result(result, labels, probs, tmp_path)
    assert json.loads(paths["json"].read_text())["features_from"] == "left head (4)"
    assert paths["roc"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = markdown_table(result)
    assert "| yes | 0.7500 | 0.8333 | 0.6667 | 2 |" in table
    assert "| **macro** | 0.7500 | 0.8333 | 0.7333 | 4 |" in table
    assert paths["markdown"].read_text() == table
