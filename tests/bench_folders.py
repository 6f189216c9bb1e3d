"""Tiny look-alike folders of the published retinal dataset layouts, for the benchmark tests.

Same file names, columns and quirks as the real ones (IDRiD's 'Risk of macular edema ' with a trailing
space and empty trailing columns, MESSIDOR-2's ungradable rows, RFMiD's IDs restarting per split,
ODIR-5K's patient rows); the images are small coloured squares whose brightness follows the label, so a
probe has something to learn. Never real data.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image


def image(path: Path, level: float, seed: int, suffix: str | None = None) -> None:
    """A 16x16 RGB image whose red channel grows with ``level`` (0..1), plus noise."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 60, (16, 16, 3)).astype(np.int64)
    arr[..., 0] += int(180 * level)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)


def _csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def retfound_split(root: Path, classes=("anodr", "bmilddr"), counts=(6, 3, 3)) -> Path:
    """``train|val|test/<class>/<n>.jpg``."""
    k = 0
    for split, n in zip(("train", "val", "test"), counts, strict=True):
        for c, name in enumerate(classes):
            for _i in range(n):
                image(root / split / name / f"img{k:03d}.jpg", c / max(len(classes) - 1, 1), k)
                k += 1
    return root


def aptos2019(root: Path, per_class: int = 6) -> Path:
    """``train.csv`` (id_code, diagnosis) and ``train_images/<id_code>.png``; one row lacks a diagnosis."""
    rows = []
    for grade in range(5):
        for i in range(per_class):
            code = f"{grade:x}{i:02d}a7c3e9f1"
            image(root / "train_images" / f"{code}.png", grade / 4, grade * 100 + i)
            rows.append([code, grade])
    rows.append(["ffff00001111", ""])
    _csv(root / "train.csv", ["id_code", "diagnosis"], rows)
    (root / "test_images").mkdir(exist_ok=True)
    _csv(root / "test.csv", ["id_code"], [["0005cfc8afb6"]])
    return root


def idrid(root: Path, train_per_grade: int = 5, test_per_grade: int = 2) -> Path:
    """``B. Disease Grading`` with its CSVs (trailing-space column, empty trailing columns) and JPGs."""
    base = root / "B. Disease Grading"
    header = ["Image name", "Retinopathy grade", "Risk of macular edema ", "", ""]
    for folder, table, n in (
        ("a. Training Set", "a. IDRiD_Disease Grading_Training Labels.csv", train_per_grade),
        ("b. Testing Set", "b. IDRiD_Disease Grading_Testing Labels.csv", test_per_grade),
    ):
        rows = []
        k = 1
        for grade in range(3):
            for _ in range(n):
                name = f"IDRiD_{k:03d}"
                image(base / "1. Original Images" / folder / f"{name}.jpg", grade / 2, k + 1000 * len(folder))
                rows.append([name, grade, min(grade, 2), "", ""])
                k += 1
        _csv(base / "2. Groundtruths" / table, header, rows)
    return root


def messidor2(root: Path, per_grade: int = 6) -> Path:
    """``messidor_data.csv`` with adjudicated grades; two ungradable rows; images in ``IMAGES/``."""
    rows = []
    k = 0
    for grade in range(3):
        for _ in range(per_grade):
            name = f"20051020_{k:05d}_0100_PP.png" if k % 2 else f"IM{k:06d}.JPG"
            image(root / "IMAGES" / name, grade / 2, k)
            rows.append([name, float(grade), int(grade > 1), 1])
            k += 1
    for j in range(2):
        name = f"IM9{j:05d}.JPG"
        image(root / "IMAGES" / name, 0.5, 900 + j)
        rows.append([name, "", "", 0])
    _csv(
        root / "messidor_data.csv",
        ["image_id", "adjudicated_dr_grade", "adjudicated_dme", "adjudicated_gradable"],
        rows,
    )
    return root


RFMID_DISEASES = ("DR", "ARMD", "MH")


def rfmid(root: Path, counts=(12, 8, 8)) -> Path:
    """Kaggle's RFMiD folders: ``Training_Set/RFMiD_Training_Labels.csv`` + ``Training/<ID>.png``, etc."""
    for (folder, table, images), n in zip(
        (
            ("Training_Set", "RFMiD_Training_Labels.csv", "Training"),
            ("Evaluation_Set", "RFMiD_Validation_Labels.csv", "Validation"),
            ("Test_Set", "RFMiD_Testing_Labels.csv", "Test"),
        ),
        counts,
        strict=True,
    ):
        rows = []
        for i in range(1, n + 1):
            labels = [int(i % 2 == 0), int(i % 3 == 0), int(i % 4 in (1, 2))]
            image(root / folder / images / f"{i}.png", labels[0] * 0.9, i + 50 * n)
            rows.append([i, int(any(labels)), *labels])
        _csv(root / folder / table, ["ID", "Disease_Risk", *RFMID_DISEASES], rows)
    return root


ODIR = ("N", "D", "G", "C", "A", "H", "M", "O")


def odir5k(root: Path, n_patients: int = 30) -> Path:
    """Patient rows (ID, age, sex, Left-Fundus, Right-Fundus, keywords, N..O) and ``<ID>_left.jpg``."""
    rows = []
    for p in range(n_patients):
        d = int(p % 2 == 1)
        labels = [
            int(p % 5 == 0),
            d,
            int(p % 3 == 0),
            int(p % 4 == 0),
            int(p % 6 == 1),
            int(p % 7 == 2),
            int(p % 5 == 3),
            int(p % 4 == 3),
        ]
        for eye in ("left", "right"):
            image(root / "ODIR-5K_Training_Images" / f"{p}_{eye}.jpg", 0.9 * d, 2 * p + (eye == "right"))
        rows.append(
            [
                p,
                50 + p % 20,
                "Female" if p % 2 else "Male",
                f"{p}_left.jpg",
                f"{p}_right.jpg",
                "normal fundus",
                "normal fundus",
                *labels,
            ]
        )
    header = [
        "ID",
        "Patient Age",
        "Patient Sex",
        "Left-Fundus",
        "Right-Fundus",
        "Left-Diagnostic Keywords",
        "Right-Diagnostic Keywords",
        *ODIR,
    ]
    _csv(root / "ODIR-5K_Training_Annotations(Updated)_V2.csv", header, rows)
    return root


def table(root: Path, n_patients: int = 15) -> Path:
    """retclip-eval's generic table (synthetic set with id, image, split, laterality, grade...)."""
    from retclip_dist.synth import write_labelled_set

    write_labelled_set(root, n_patients, seed=0, image_size=32)
    return root
