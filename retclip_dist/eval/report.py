"""Writing an evaluation result: ``metrics.json``, ``metrics.md`` (a Markdown table) and ``roc.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(result: dict[str, Any]) -> str:
    """One row per class plus a macro row, then the overall numbers and where the features came from."""
    metrics = result["metrics"]
    per_class = metrics["per_class"]
    columns = ["auroc", "auprc", "f1", "support"]
    lines = [
        f"**{result['method']}** on {metrics['n']} images ({metrics['task']}); features: {result['features_from']}",
        "",
        "| class | AUROC | AUPRC | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for name, row in per_class.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row[c]) for c in columns) + " |")
    overall = metrics["overall"]
    lines.append(
        f"| **macro** | {_cell(overall['macro_auroc'])} | "
        f"{_cell(overall.get('macro_auprc', overall.get('mAP')))} | {_cell(overall['macro_f1'])} | {metrics['n']} |"
    )
    lines.append("")
    lines.append(", ".join(f"{k} {_cell(v)}" for k, v in overall.items()))
    missing = result.get("missing_labels", {})
    if missing.get("dropped"):
        lines.append("")
        lines.append(
            f"{missing['dropped']} rows of {result['table']} have no label and were left out "
            f"(first: {', '.join(missing['rows'][:3])}); --strict refuses such rows instead"
        )
    return "\n".join(lines) + "\n"


def plot_roc(labels: np.ndarray, probs: np.ndarray, classes: list[str], multilabel: bool, path: Path) -> Path:
    """One-vs-rest ROC curve per class (classes without both outcomes are skipped)."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    for i, name in enumerate(classes):
        y = labels[:, i] if multilabel else (labels == i).astype(int)
        if y.min() == y.max():
            continue
        fpr, tpr, _ = roc_curve(y, probs[:, i])
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right", fontsize="small")
    fig.savefig(path, dpi=100)
    return path


def write_result(
    result: dict[str, Any], labels: np.ndarray, probs: np.ndarray, out_dir: str | Path
) -> dict[str, Path]:
    """Write the three files into ``out_dir``; returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = result["metrics"]
    paths = {"json": out / "metrics.json", "markdown": out / "metrics.md", "roc": out / "roc.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown_table(result), encoding="utf-8")
    plot_roc(labels, probs, metrics["classes"], metrics["task"] == "multilabel", paths["roc"])
    return paths
