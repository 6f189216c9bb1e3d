"""Per-sample predictions, the headline metrics, 95% CIs over seeds, paired differences between models,
and results.csv, differences.csv, results.md and results.png.

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
- paired difference: model minus the first model of the suite, on the same test rows of the same
  seeds. With two or more seeds a t-interval over the per-seed differences; with one seed, or when
  every seed gave the same difference (nothing random varied: an official split with a deterministic
  protocol), a percentile bootstrap over the test images, each resample drawing the same images for
  both models (200 resamples, seed 0), marked with *.
- n/a (image-only): the model has no text tower, so no zero-shot; n/a alone: the metric is undefined
  (kappa of a multi-label task, or a class without both outcomes in every test set).
- paired layouts (ODIR-5K): ours scores the patient head through both eyes; other models put both
  eyes' features side by side (probes, fine-tuning) or average both eyes' embeddings (zero-shot).
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from retclip_dist.eval.metrics import compute_metrics

METRICS = ("auroc", "auprc", "accuracy", "macro_f1", "kappa")
RESULT_COLUMNS = ("model", "dataset", "protocol", "metric", "mean", "ci_low", "ci_high", "n_seeds")
DIFFERENCE_COLUMNS = (
    "model",
    "baseline",
    "dataset",
    "protocol",
    "metric",
    "difference",
    "ci_low",
    "ci_high",
    "n",
    "interval",
)
IMAGE_ONLY = "n/a (image-only)"  # a zero-shot cell of a model without a text tower
T_OVER_SEEDS = "t over seeds"
BOOTSTRAP = "bootstrap over test images"
BOOTSTRAP_RESAMPLES = 200
_PROB = "prob_"
_LABEL = "label_"


def predictions_name(dataset: str, protocol: str, seed: int) -> str:
    """The one place that names a cell's predictions file (in predictions/<model>/)."""
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


def bootstrap_values(pred: Predictions, seed: int = 0) -> dict[str, np.ndarray]:
    """Every metric on each of BOOTSTRAP_RESAMPLES resamples of the test rows (NaN where undefined, e.g. a
    class missing from a resample). The resamples depend only on ``seed`` and the number of rows, so two
    models' predictions on the same test rows are resampled identically: the pairing of the differences."""
    rng = np.random.default_rng(seed)
    n = len(pred.ids)
    values = {m: np.full(BOOTSTRAP_RESAMPLES, np.nan) for m in METRICS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on resamples that lack a class
        for i in range(BOOTSTRAP_RESAMPLES):
            pick = rng.integers(0, n, n)
            for metric, value in headline(
                pred.labels[pick], pred.probs[pick], pred.classes, pred.multilabel
            ).items():
                if value is not None:
                    values[metric][i] = value
    return values


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    defined = values[~np.isnan(values)]
    if not len(defined):
        return float("nan"), float("nan")
    return float(np.percentile(defined, 2.5)), float(np.percentile(defined, 97.5))


def bootstrap_intervals(pred: Predictions, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% percentile bootstrap over the test samples of one cell, every metric from the same resamples;
    resamples where a metric is undefined (a class missing) are skipped for that metric."""
    return {m: _percentiles(v) for m, v in bootstrap_values(pred, seed).items()}


Cell = tuple[str, str, str]  # (model, dataset, protocol)


@dataclass
class Scores:
    """The cells' predictions (one per seed, in the suite's seed order) with their per-seed metrics and
    first-seed bootstrap resamples, each computed once for the table and the differences alike."""

    cells: dict[Cell, list[Predictions]]
    _per_seed: dict[Cell, list[dict[str, float | None]]] = field(default_factory=dict)
    _boot: dict[Cell, dict[str, np.ndarray]] = field(default_factory=dict)

    def per_seed(self, cell: Cell) -> list[dict[str, float | None]]:
        if cell not in self._per_seed:
            self._per_seed[cell] = [
                headline(p.labels, p.probs, p.classes, p.multilabel) for p in self.cells[cell]
            ]
        return self._per_seed[cell]

    def boot(self, cell: Cell) -> dict[str, np.ndarray]:
        if cell not in self._boot:
            self._boot[cell] = bootstrap_values(self.cells[cell][0])
        return self._boot[cell]


def aggregate(cells: dict[Cell, list[Predictions]] | Scores) -> list[dict[str, object]]:
    """results.csv rows: per (model, dataset, protocol) and metric, mean and 95% CI over the seeds."""
    scores = cells if isinstance(cells, Scores) else Scores(cells)
    rows = []
    for cell in scores.cells:
        per_seed = scores.per_seed(cell)
        for metric in METRICS:
            values = [m[metric] for m in per_seed if m[metric] is not None]
            if not values:
                continue
            if len(values) >= 2:
                mean, low, high = t_interval(values)
            else:
                mean, (low, high) = values[0], _percentiles(scores.boot(cell)[metric])
            model, dataset, protocol = cell
            rows.append(
                {
                    "model": model,
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


def _same_rows(a: Predictions, b: Predictions, where: str) -> None:
    if a.ids != b.ids or not np.array_equal(a.labels, b.labels):
        raise ValueError(
            f"{where}: the two models' predictions are not on the same test rows; cannot pair them"
        )


def paired_differences(
    cells: dict[Cell, list[Predictions]] | Scores, baseline: str
) -> list[dict[str, object]]:
    """differences.csv rows: each other model minus ``baseline`` per dataset, protocol and metric, with
    the 95% CI of the paired difference (see the module's conventions)."""
    scores = cells if isinstance(cells, Scores) else Scores(cells)
    rows = []
    for cell in scores.cells:
        model, dataset, protocol = cell
        base = (baseline, dataset, protocol)
        if model == baseline or base not in scores.cells:
            continue
        mine, theirs = scores.per_seed(cell), scores.per_seed(base)
        where = f"{model} vs {baseline}, {dataset} {protocol}"
        for seed_mine, seed_theirs in zip(scores.cells[cell], scores.cells[base], strict=True):
            _same_rows(seed_mine, seed_theirs, where)
        for metric in METRICS:
            diffs = [
                m[metric] - t[metric]
                for m, t in zip(mine, theirs, strict=True)
                if m[metric] is not None and t[metric] is not None
            ]
            if not diffs:
                continue
            if len(diffs) >= 2 and max(diffs) > min(diffs):
                difference, low, high = t_interval(diffs)
                n, interval = len(diffs), T_OVER_SEEDS
            else:
                difference = diffs[0]
                low, high = _percentiles(scores.boot(cell)[metric] - scores.boot(base)[metric])
                n, interval = len(scores.cells[cell][0].ids), BOOTSTRAP
            rows.append(
                {
                    "model": model,
                    "baseline": baseline,
                    "dataset": dataset,
                    "protocol": protocol,
                    "metric": metric,
                    "difference": difference,
                    "ci_low": low,
                    "ci_high": high,
                    "n": n,
                    "interval": interval,
                }
            )
    return rows


def write_csv(path: Path, rows: list[dict[str, object]], columns: tuple[str, ...] = RESULT_COLUMNS) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


@dataclass(frozen=True)
class ModelNote:
    """What results.md states about a model of the table."""

    name: str  # row name
    kind: str  # adapter
    weights: str  # where the weights were read, with their digest
    preprocessing: str  # ImageInput.describe()
    features: str  # what the probe and zero-shot features are
    zero_shot: str  # languages read, or n/a (image-only)
    image_only: bool  # no zero-shot cells


def _columns(rows: list[dict[str, object]], protocols: list[str], na: bool) -> list[tuple[str, str]]:
    """(protocol, metric) columns of one dataset: those with a number, plus AUROC of a protocol that
    is n/a for some model and has no number at all."""
    have = {(r["protocol"], r["metric"]) for r in rows}
    columns = [(p, m) for p in protocols for m in METRICS if (p, m) in have]
    shown = {p for p, _ in columns}
    extra = [(p, "auroc") for p in protocols if p not in shown and na]
    return sorted(columns + extra, key=lambda c: (protocols.index(c[0]), METRICS.index(c[1])))


def _span(mean: float, low: float, high: float, signed: bool = False) -> str:
    value = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return f"{value} [{low:.3f}, {high:.3f}]"


def markdown(
    rows: list[dict[str, object]],
    differences: list[dict[str, object]],
    protocols: list[str],
    models: list[ModelNote],
    notes: list[str],
) -> str:
    """Per dataset: the models as rows with every protocol x metric as 'mean [low, high]', then each
    model's paired difference against the first; the models' preprocessing, the conventions, the notes."""
    names = [m.name for m in models]
    image_only = {m.name for m in models if m.image_only}
    datasets = list(dict.fromkeys(str(r["dataset"]) for r in rows))
    by_key = {(r["model"], r["dataset"], r["protocol"], r["metric"]): r for r in rows}
    diff_key = {(r["model"], r["dataset"], r["protocol"], r["metric"]): r for r in differences}
    lines = ["# retclip-eval benchmark", ""]
    for ds in datasets:
        mine = [r for r in rows if r["dataset"] == ds]
        columns = _columns(mine, protocols, bool(image_only) and "zero_shot" in protocols)
        header = [
            "| model | " + " | ".join(f"{p} {m}" for p, m in columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        lines += [f"## {ds}", "", *header]
        for name in names:
            cells = []
            for p, m in columns:
                r = by_key.get((name, ds, p, m))
                if p == "zero_shot" and name in image_only:
                    cells.append(IMAGE_ONLY)
                elif r is None:
                    cells.append("n/a")
                else:
                    cells.append(_span(float(r["mean"]), float(r["ci_low"]), float(r["ci_high"])))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if len(names) > 1:
            lines += [
                "",
                f"Paired differences against {names[0]} (model minus {names[0]}, 95% CI):",
                "",
                *header,
            ]
            for name in names[1:]:
                cells = []
                for p, m in columns:
                    r = diff_key.get((name, ds, p, m))
                    if p == "zero_shot" and {name, names[0]} & image_only:
                        cells.append(IMAGE_ONLY)
                    elif r is None:
                        cells.append("n/a")
                    else:
                        star = "*" if r["interval"] == BOOTSTRAP else ""
                        cells.append(
                            _span(float(r["difference"]), float(r["ci_low"]), float(r["ci_high"]), True)
                            + star
                        )
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Models", "", "| model | kind | weights | preprocessing | features | zero-shot |"]
    lines.append("|---|---|---|---|---|---|")
    for m in models:
        lines.append(
            f"| {m.name} | {m.kind} | {m.weights} | {m.preprocessing} | {m.features} | {m.zero_shot} |"
        )
    conventions = (__doc__ or "").split("Conventions (also printed under results.md):\n", 1)[1].strip()
    lines += ["", "## Conventions", "", conventions]
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def plot(
    path: Path, rows: list[dict[str, object]], protocols: list[str], models: list[str], metric: str = "auroc"
) -> None:
    """One panel per dataset: ``metric`` per protocol, one bar per model, 95% CI as error bars."""
    chosen = [r for r in rows if r["metric"] == metric]
    datasets = list(dict.fromkeys(str(r["dataset"]) for r in chosen)) or ["(none)"]
    ncols = min(3, len(datasets))
    nrows = math.ceil(len(datasets) / ncols)
    fig = Figure(
        figsize=(max(5.0, 1.0 + 0.5 * len(protocols) * max(1, len(models))) * ncols / 1.5, 3.6 * nrows)
    )
    width = 0.8 / max(len(models), 1)
    by_key = {(r["model"], r["dataset"], r["protocol"]): r for r in chosen}
    for k, ds in enumerate(datasets):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        for j, model in enumerate(models):
            xs, means, errs = [], [], []
            for i, protocol in enumerate(protocols):
                r = by_key.get((model, ds, protocol))
                if r is not None:
                    mean = float(r["mean"])
                    xs.append(i + j * width)
                    means.append(mean)
                    errs.append([mean - float(r["ci_low"]), float(r["ci_high"]) - mean])
            err = np.abs(np.array(errs).T) if errs else None
            ax.bar(xs, means, width, yerr=err, capsize=2, label=model)
        ax.set_xticks(
            [i + width * (len(models) - 1) / 2 for i in range(len(protocols))], protocols, rotation=30
        )
        ax.set_title(ds)
        ax.set_ylabel(f"{metric} (95% CI)")
        ax.set_ylim(0, 1)
        if k == 0:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
