"""A labelled single-eye set drawn with retclip_dist.synth, for tests and the demo's closing probe.

Each synthetic patient gives two rows (left and right photo) sharing a split, so no patient straddles
train and test. Labels per eye: one 0/1 column per lesion kind and the DR-like ``grade`` 0-3.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from retclip_dist import synth
from retclip_dist.eval.commands import run_linear_probe
from retclip_dist.eval.config import DataConfig, EvalConfig
from retclip_dist.eval.report import markdown_table

# Patient i goes to _SPLITS[i % 5]: a 60/20/20 train/val/test split that any n keeps stable.
_SPLITS = ("train", "train", "train", "val", "test")


def write_labelled_set(out_dir: str | Path, n_patients: int, seed: int = 0, image_size: int = 96) -> Path:
    """JPEGs under ``out_dir/images`` and ``out_dir/labels.csv``; returns the table path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    columns = ["id", "image", "split", "laterality", "grade", *synth.LESIONS]
    rows = []
    for i in range(n_patients):
        patient = synth.make_patient(np.random.default_rng([seed, i]), image_size)
        for eye in ("left", "right"):
            name = f"p{i:05d}_{eye}.jpg"
            getattr(patient, eye).save(out / "images" / name, "JPEG", quality=95)
            labels = patient.labels[eye]
            rows.append(
                {
                    "id": f"p{i:05d}-{eye}",
                    "image": name,
                    "split": _SPLITS[i % len(_SPLITS)],
                    "laterality": eye,
                    "grade": synth.eye_grade(labels),
                    **{k: int(labels[k]) for k in synth.LESIONS},
                }
            )
    table = out / "labels.csv"
    with table.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return table


def demo_probe(
    model_dir: str | Path,
    out_dir: str | Path,
    n_images: int = 400,
    seed: int = 0,
    label: str = "hard_exudates",
) -> str:
    """Linear probe for one lesion's presence on a trained model's image features (the default feature:
    the shared projection, as the release's probes); a Markdown table.

    Writes ``n_images`` synthetic eye photos (two per patient) and the probe's metrics.json, metrics.md
    and roc.png under ``out_dir``. ``label`` is a column of write_labelled_set: a lesion or ``grade``.
    """
    out = Path(out_dir)
    table = write_labelled_set(out / "data", max(n_images // 2, 5), seed=seed)
    cfg = EvalConfig(
        model=str(model_dir),
        output_dir=str(out / "linear_probe"),
        data=DataConfig(table=str(table), images=str(out / "data" / "images"), label_column=label),
    )
    return markdown_table(run_linear_probe(cfg))
