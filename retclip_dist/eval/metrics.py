"""Classification metrics for downstream tasks: per class and macro, multi-class or multi-label.

Scores are probabilities: [n, C] softmax rows for multi-class, [n, C] independent sigmoids for
multi-label. A class with no positive (or no negative) example in the evaluated rows has no AUROC; it is
reported as null and left out of the macro mean rather than silently counted as 0.5.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    cohen_kappa_score,
    f1_score,
    roc_auc_score,
)


def _ranked(y: np.ndarray, score: np.ndarray) -> tuple[float | None, float | None]:
    """(AUROC, AUPRC) of one binary column, None for both when it holds a single class."""
    if y.min() == y.max():
        return None, None
    return float(roc_auc_score(y, score)), float(average_precision_score(y, score))


def _macro(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def multiclass_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Per-class one-vs-rest AUROC/AUPRC/F1 and overall accuracy, macro-F1, quadratic kappa.

    Kappa weighs disagreements by squared distance between class indices, so it is meaningful when the
    class order is an ordinal scale such as DR grades 0-4.
    """
    predicted = probs.argmax(axis=1)
    indices = list(range(len(classes)))
    f1 = f1_score(labels, predicted, labels=indices, average=None, zero_division=0)
    per_class: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(classes):
        auroc, auprc = _ranked((labels == i).astype(int), probs[:, i])
        per_class[name] = {
            "auroc": auroc,
            "auprc": auprc,
            "f1": float(f1[i]),
            "support": int((labels == i).sum()),
        }
    overall = {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(np.mean(f1)),
        "macro_auroc": _macro([m["auroc"] for m in per_class.values()]),
        "macro_auprc": _macro([m["auprc"] for m in per_class.values()]),
        "kappa_quadratic": float(cohen_kappa_score(labels, predicted, labels=indices, weights="quadratic")),
    }
    return {
        "task": "multiclass",
        "n": len(labels),
        "classes": classes,
        "overall": overall,
        "per_class": per_class,
    }


def multilabel_metrics(
    labels: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float = 0.5
) -> dict[str, Any]:
    """Per-label AUROC/AUPRC/F1/accuracy at ``threshold``; mAP is the macro mean of per-label AUPRC."""
    predicted = (probs >= threshold).astype(int)
    per_class: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(classes):
        auroc, auprc = _ranked(labels[:, i], probs[:, i])
        per_class[name] = {
            "auroc": auroc,
            "auprc": auprc,
            "f1": float(f1_score(labels[:, i], predicted[:, i], zero_division=0)),
            "accuracy": float(accuracy_score(labels[:, i], predicted[:, i])),
            "support": int(labels[:, i].sum()),
        }
    overall = {
        "mAP": _macro([m["auprc"] for m in per_class.values()]),
        "macro_auroc": _macro([m["auroc"] for m in per_class.values()]),
        "macro_f1": float(np.mean([m["f1"] for m in per_class.values()])),
        "accuracy": float(np.mean([m["accuracy"] for m in per_class.values()])),
        "exact_match": float((predicted == labels).all(axis=1).mean()),
    }
    return {
        "task": "multilabel",
        "n": len(labels),
        "classes": classes,
        "overall": overall,
        "per_class": per_class,
    }


def compute_metrics(
    labels: np.ndarray, probs: np.ndarray, classes: list[str], multilabel: bool
) -> dict[str, Any]:
    """Dispatch on the task kind; ``labels`` is [n] class indices or an [n, C] 0/1 matrix."""
    if multilabel:
        return multilabel_metrics(labels, probs, classes)
    return multiclass_metrics(labels, probs, classes)


def selection_score(metrics: dict[str, Any], name: str) -> float:
    """The overall metric used to pick a hyper-parameter or an epoch; undefined counts as worst."""
    value = metrics["overall"].get(name)
    if name not in metrics["overall"]:
        raise ValueError(f"selection metric {name!r} is not one of {sorted(metrics['overall'])}")
    return float("-inf") if value is None else float(value)
