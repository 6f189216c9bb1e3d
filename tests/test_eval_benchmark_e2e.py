"""retclip-eval benchmark end to end: every layout x every protocol on look-alike folders, tiny model.

Checks the table's format, that a metric recomputed from a predictions CSV equals results.csv, and that
a rerun reuses finished cells (and recomputes exactly the one whose file was removed).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import bench_folders as B
import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_model_config
from sklearn.metrics import roc_auc_score

from retclip_dist import synth
from retclip_dist.eval.benchmark.results import RESULT_COLUMNS
from retclip_dist.eval.benchmark.run import run_benchmark
from retclip_dist.eval.benchmark.suite import load_suite
from retclip_dist.eval.cli import main as eval_main
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.vocab import write_vocab

LAYOUTS = ("retfound_split", "aptos2019", "idrid", "messidor2", "rfmid", "odir5k", "table")
PACKS = Path(__file__).resolve().parents[1] / "configs" / "prompts"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_model")
    vocab = write_vocab(root / "vocab.txt", synth.vocabulary())
    torch.manual_seed(0)
    return RetClip(tiny_model_config(vocab, image_size=32)).save_pretrained(root / "model")


def write_suite(
    tmp_path: Path, layouts=LAYOUTS, protocols=("zero_shot", "linear_probe", "few_shot", "finetune")
) -> Path:
    datasets = []
    for layout in layouts:
        getattr(B, layout)(tmp_path / "data" / layout)
        entry = {"name": layout.upper(), "layout": layout, "root": f"data/{layout}"}
        if layout == "retfound_split":
            entry["prompts"] = str(PACKS / "retfound_dr.yaml")
        if layout == "table":
            entry["prompts"] = str(PACKS / "dr_grade.yaml")
            entry["options"] = {"label_column": "grade"}
        datasets.append(entry)
    suite = {
        "seeds": [0, 1],
        "protocols": list(protocols),
        "datasets": datasets,
        "few_shot": {"shots": [1, 2]},
        "probe": {"c_grid": [0.1, 1.0]},
        "finetune": {"epochs": 1, "warmup_epochs": 1, "batch_size": 8},
        "device": "cpu",
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


@pytest.mark.slow
def test_every_layout_every_protocol_end_to_end(model_dir, tmp_path):
    suite_path = write_suite(tmp_path)
    out = tmp_path / "out"
    assert (
        eval_main(
            ["benchmark", "--suite", str(suite_path), "--model", str(model_dir), "--output_dir", str(out)]
        )
        == 0
    )
    with (out / "results.csv").open() as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == RESULT_COLUMNS
        rows = list(reader)
    protocols = ["zero_shot", "linear_probe", "few_shot_1", "few_shot_2", "finetune"]
    for layout in LAYOUTS:
        for protocol in protocols:
            got = {r["metric"] for r in rows if r["dataset"] == layout.upper() and r["protocol"] == protocol}
            multilabel = layout in ("rfmid", "odir5k")
            assert got == ({"auroc", "auprc", "accuracy", "macro_f1"} | (set() if multilabel else {"kappa"}))
            for seed in (0, 1):
                assert (out / "predictions" / f"{layout.upper()}_{protocol}_seed{seed}.csv").is_file()
    assert all(r["n_seeds"] == "2" for r in rows)
    assert all(float(r["ci_low"]) <= float(r["mean"]) <= float(r["ci_high"]) for r in rows)
    md = (out / "results.md").read_text()
    assert md.splitlines()[0].startswith("| dataset | zero_shot auroc | zero_shot auprc |")
    assert "binary task the positive class's AP" in md and "t-interval" in md
    assert "MESSIDOR2: 2 rows excluded (ungradable)" in md and "APTOS2019: 1 rows without a label" in md
    assert (out / "results_auroc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "checkpoints").iterdir()) == []  # a finished cell drops its fine-tuning checkpoint
    templates = (out / "zero_shot_templates.md").read_text()
    assert "| IDRID | zh | 眼底照片显示{}。 |" in templates

    # Recompute the ODIR-5K linear-probe AUROC (patient level, macro over labels) from its two CSVs.
    per_seed = []
    for seed in (0, 1):
        with (out / "predictions" / f"ODIR5K_linear_probe_seed{seed}.csv").open() as fh:
            pred = list(csv.DictReader(fh))
        values = []
        for label in B.ODIR:
            y = np.array([int(r[f"label_{label}"]) for r in pred])
            p = np.array([float(r[f"prob_{label}"]) for r in pred])
            if y.min() != y.max():
                values.append(roc_auc_score(y, p))
        per_seed.append(np.mean(values))
    row = next(
        r
        for r in rows
        if r["dataset"] == "ODIR5K" and r["protocol"] == "linear_probe" and r["metric"] == "auroc"
    )
    assert float(row["mean"]) == pytest.approx(np.mean(per_seed), abs=5e-5)

    # Resume: nothing reruns; remove one cell and exactly that one reruns, the others keep their files.
    results = (out / "results.csv").read_text()
    files = sorted((out / "predictions").glob("*_seed*.csv"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again = run_benchmark(load_suite(suite_path), str(model_dir), str(out))
    assert again["ran"] == [] and len(again["reused"]) == len(LAYOUTS) * len(protocols) * 2
    victim = out / "predictions" / "APTOS2019_few_shot_2_seed1.csv"
    victim.unlink()
    third = run_benchmark(load_suite(suite_path), str(model_dir), str(out))
    assert third["ran"] == ["APTOS2019/few_shot_2/seed1"]
    assert (out / "results.csv").read_text() == results  # same cell, same seed, same numbers
    assert all(p.stat().st_mtime_ns == stamps[p] for p in files if p != victim)
    assert (out / "results.md").read_text() == md  # notes of datasets not reread are kept


@pytest.mark.slow
def test_finetune_under_accelerate_launch_two_cpu_processes(model_dir, tmp_path):
    """`accelerate launch` with two gloo processes: each takes half of every global batch, only rank 0
    writes, and the table comes out once (CPU only; no GPU run of this path has been made)."""
    suite_path = write_suite(tmp_path, layouts=("retfound_split", "odir5k"), protocols=("finetune",))
    out = tmp_path / "out"
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "cpu_2proc.yaml"
    command = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(config),
        "-m",
        "retclip_dist.eval.cli",
        "benchmark",
        "--suite",
        str(suite_path),
        "--model",
        str(model_dir),
        "--output_dir",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("cells run: 4, reused: 0") == 1
    history = json.loads((out / "predictions" / "ODIR5K_finetune_seed1_history.json").read_text())
    assert [h.get("epoch") for h in history] == [1, None] and history[1] == {"best_epoch": 1}
    with (out / "results.csv").open() as fh:
        assert {(r["dataset"], r["n_seeds"]) for r in csv.DictReader(fh)} == {
            ("RETFOUND_SPLIT", "2"),
            ("ODIR5K", "2"),
        }
