"""Per-sample predictions, the headline metrics, 95% CIs over seeds, and results.csv/.md/.png.

Every number of the table is computed from the predictions CSVs, on a first run and on a resumed one
alike, so anyone holding ``predictions/`` can recompute it.

Conventions (also printed under results.md):
- auroc: one-vs-rest AUROC averaged over all classes (multi-label: over labels); a class without both
  outcomes in the test rows is left out. For a binary task the two classes' AUROCs are equal, so this
  is the positive class's AUROC.
- auprc: mean over classes of the average precision; for a binary task the positive class's AP only.
- accuracy: argmax accuracy (multi-label: mean per-label accuracy at 0.5).
- macro_f1: F1 averaged over the same classes as auroc (multi-label: per label at 0.5).
- kappa: quadratic-weighted Cohen's kappa over the class order (single-label only).
- 95% CI: with two or more seeds a t-interval over the per-seed values (mean +- t(0.975, n-1) * sd /
  sqrt(n)), not clipped to the metric's range; with one seed a percentile bootstrap over the test
  samples (200 resamples, seed 0). On an official (fixed) split zero-shot and the linear probe do not
  depend on the seed, so their interval has zero width; few-shot draws, fine-tuning and drawn splits do.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from retclip_dist.eval.metrics import compute_metrics

METRICS = ("auroc", "auprc", "accuracy", "macro_f1", "kappa")
RESULT_COLUMNS = ("dataset", "protocol", "metric", "mean", "ci_low", "ci_high", "n_seeds")
BOOTSTRAP_RESAMPLES = 200
_PROB = "prob_"
_LABEL = "label_"


def predictions_name(dataset: str, protocol: str, seed: int) -> str:
    """The one place that names a cell's predictions file."""
    return f"{dataset}_{protocol}_seed{seed}.csv"


@dataclass(frozen=True)
class Predictions:
    ids: list[str]  # row ids in test order
    labels: np.ndarray  # [n] class indices or [n, C] 0/1
    probs: np.ndarray  # [n, C]
    classes: list[str]  # class order of the probability columns
    multilabel: bool  # label columns per class instead of one label column


def write_predictions(path: Path, pred: Predictions) -> None:
    """``id, label, prob_<class>...`` (multi-label: ``id, label_<class>..., prob_<class>...``), written
    to a temporary name and renamed, so a file that exists is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    label_cols = [f"{_LABEL}{c}" for c in pred.classes] if pred.multilabel else ["label"]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", *label_cols, *(f"{_PROB}{c}" for c in pred.classes)])
        for i, row_id in enumerate(pred.ids):
            labels = [int(v) for v in pred.labels[i]] if pred.multilabel else [pred.classes[pred.labels[i]]]
            writer.writerow([row_id, *labels, *(repr(float(p)) for p in pred.probs[i])])
    os.replace(tmp, path)


def read_predictions(path: Path) -> Predictions:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    header = rows[0]
    classes = [h[len(_PROB) :] for h in header if h.startswith(_PROB)]
    multilabel = "label" not in header
    probs = np.array([[float(v) for v in r[-len(classes) :]] for r in rows[1:]], dtype=np.float64)
    if multilabel:
        labels = np.array([[int(v) for v in r[1 : 1 + len(classes)]] for r in rows[1:]], dtype=np.int64)
    else:
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[r[1]] for r in rows[1:]], dtype=np.int64)
    return Predictions([r[0] for r in rows[1:]], labels, probs, classes, multilabel)


def headline(
    labels: np.ndarray, probs: np.ndarray, classes: list[str], multilabel: bool
) -> dict[str, float | None]:
    """The five table metrics of one cell (None where undefined)."""
    m = compute_metrics(labels, probs, classes, multilabel)
    overall = m["overall"]
    if multilabel:
        return {
            "auroc": overall["macro_auroc"],
            "auprc": overall["mAP"],
            "accuracy": overall["accuracy"],
            "macro_f1": overall["macro_f1"],
            "kappa": None,
        }
    auprc = m["per_class"][classes[1]]["auprc"] if len(classes) == 2 else overall["macro_auprc"]
    kappa = overall["kappa_quadratic"]  # NaN when truth and prediction share a single class
    return {
        "auroc": overall["macro_auroc"],
        "auprc": auprc,
        "accuracy": overall["accuracy"],
        "macro_f1": overall["macro_f1"],
        "kappa": None if math.isnan(kappa) else kappa,
    }


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the 95% t-interval over seeds (n >= 2)."""
    arr = np.asarray(values, dtype=np.float64)
    mean = float(arr.mean())
    half = float(stats.t.ppf(0.975, len(arr) - 1) * arr.std(ddof=1) / np.sqrt(len(arr)))
    return mean, mean - half, mean + half


def bootstrap_intervals(pred: Predictions, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% percentile bootstrap over the test samples of one cell, every metric from the same resamples;
    resamples where a metric is undefined (a class missing) are skipped for that metric."""
    rng = np.random.default_rng(seed)
    n = len(pred.ids)
    values: dict[str, list[float]] = {m: [] for m in METRICS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on resamples that lack a class
        for _ in range(BOOTSTRAP_RESAMPLES):
            pick = rng.integers(0, n, n)
            for metric, value in headline(
                pred.labels[pick], pred.probs[pick], pred.classes, pred.multilabel
            ).items():
                if value is not None:
                    values[metric].append(value)
    return {
        m: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5)))
        if v
        else (float("nan"), float("nan"))
        for m, v in values.items()
    }


def aggregate(cells: dict[tuple[str, str], list[Predictions]]) -> list[dict[str, object]]:
    """results.csv rows: per (dataset, protocol) and metric, mean and 95% CI over the seeds' cells."""
    rows = []
    for (dataset, protocol), preds in cells.items():
        per_seed = [headline(p.labels, p.probs, p.classes, p.multilabel) for p in preds]
        boot = bootstrap_intervals(preds[0]) if len(preds) == 1 else {}
        for metric in METRICS:
            values = [m[metric] for m in per_seed if m[metric] is not None]
            if not values:
                continue
            if len(values) >= 2:
                mean, low, high = t_interval(values)
            else:
                mean, (low, high) = values[0], boot[metric]
            rows.append(
                {
                    "dataset": dataset,
                    "protocol": protocol,
                    "metric": metric,
                    "mean": mean,
                    "ci_low": low,
                    "ci_high": high,
                    "n_seeds": len(values),
                }
            )
    return rows


def write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


def markdown(rows: list[dict[str, object]], notes: list[str]) -> str:
    """Datasets as rows, protocol x metric as columns, each cell 'mean [low, high]'."""
    datasets = list(dict.fromkeys(str(r["dataset"]) for r in rows))
    protocols = list(dict.fromkeys(str(r["protocol"]) for r in rows))
    columns = [
        (p, m)
        for p in protocols
        for m in METRICS
        if any(r["protocol"] == p and r["metric"] == m for r in rows)
    ]
    by_key = {(r["dataset"], r["protocol"], r["metric"]): r for r in rows}
    lines = [
        "| dataset | " + " | ".join(f"{p} {m}" for p, m in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for ds in datasets:
        cells = []
        for p, m in columns:
            r = by_key.get((ds, p, m))
            cells.append("n/a" if r is None else f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
        lines.append(f"| {ds} | " + " | ".join(cells) + " |")
    conventions = (__doc__ or "").split("Conventions (also printed under results.md):\n", 1)[1].strip()
    return "\n".join([*lines, "", "Conventions:", conventions, "", *notes]) + "\n"


def plot(path: Path, rows: list[dict[str, object]], metric: str = "auroc") -> None:
    """Grouped bars of ``metric`` per dataset, one bar per protocol, 95% CI as error bars."""
    chosen = [r for r in rows if r["metric"] == metric]
    datasets = list(dict.fromkeys(str(r["dataset"]) for r in chosen))
    protocols = list(dict.fromkeys(str(r["protocol"]) for r in chosen))
    fig = Figure(figsize=(max(6, 1.2 * len(datasets) * max(1, len(protocols)) / 3), 4))
    ax = fig.add_subplot()
    width = 0.8 / max(len(protocols), 1)
    for j, protocol in enumerate(protocols):
        xs, means, errs = [], [], []
        for i, ds in enumerate(datasets):
            for r in chosen:
                if r["dataset"] == ds and r["protocol"] == protocol:
                    xs.append(i + j * width)
                    means.append(float(r["mean"]))
                    errs.append(
                        [float(r["mean"]) - float(r["ci_low"]), float(r["ci_high"]) - float(r["mean"])]
                    )
        err = np.abs(np.array(errs).T) if errs else None
        ax.bar(xs, means, width, yerr=err, capsize=2, label=protocol)
    ax.set_xticks([i + width * (len(protocols) - 1) / 2 for i in range(len(datasets))], datasets, rotation=30)
    ax.set_ylabel(f"{metric} (95% CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
