"""retclip-eval benchmark end to end: every layout x every protocol on look-alike folders, tiny model.

Checks the table's format, that a metric recomputed from a predictions CSV equals results.csv, and that
a rerun reuses finished cells (and recomputes exactly the one whose file was removed).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import bench_folders as B
import bench_models as M
import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_model_config
from sklearn.metrics import roc_auc_score

from retclip_dist import synth
from retclip_dist.config import ConfigError
from retclip_dist.eval.benchmark import results
from retclip_dist.eval.benchmark.results import RESULT_COLUMNS
from retclip_dist.eval.benchmark.run import run_benchmark
from retclip_dist.eval.benchmark.suite import ModelSpec, Suite, load_suite
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


def with_model(suite: Suite, model_dir: Path) -> Suite:
    """``suite`` comparing ours only, as ``--model DIR`` sets it."""
    suite.models = [ModelSpec(name="retclip", path=str(model_dir))]
    return suite


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
                assert (
                    out / "predictions" / "retclip" / f"{layout.upper()}_{protocol}_seed{seed}.csv"
                ).is_file()
    assert all(r["n_seeds"] == "2" and r["model"] == "retclip" for r in rows)
    assert all(float(r["ci_low"]) <= float(r["mean"]) <= float(r["ci_high"]) for r in rows)
    md = (out / "results.md").read_text()
    lines = md.splitlines()
    assert lines[lines.index("## IDRID") + 2].startswith("| model | zero_shot auroc | zero_shot auprc |")
    assert "binary task the positive class's AP" in md and "t-interval" in md
    assert "MESSIDOR2: 2 rows excluded (ungradable)" in md and "APTOS2019: 1 rows without a label" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A finished cell drops its fine-tuning checkpoint.
    assert [p for p in (out / "checkpoints").rglob("*") if p.is_file()] == []
    templates = (out / "zero_shot_templates.md").read_text()
    assert "| retclip | IDRID | zh | 眼底照片显示{}。 |" in templates

    # Recompute the ODIR-5K linear-probe AUROC (patient level, macro over labels) from its two CSVs.
    per_seed = []
    for seed in (0, 1):
        with (out / "predictions" / "retclip" / f"ODIR5K_linear_probe_seed{seed}.csv").open() as fh:
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
    files = sorted((out / "predictions").rglob("*_seed*.csv"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again = run_benchmark(with_model(load_suite(suite_path), model_dir), str(out))
    assert again["ran"] == [] and len(again["reused"]) == len(LAYOUTS) * len(protocols) * 2
    victim = out / "predictions" / "retclip" / "APTOS2019_few_shot_2_seed1.csv"
    victim.unlink()
    third = run_benchmark(with_model(load_suite(suite_path), model_dir), str(out))
    assert third["ran"] == ["retclip/APTOS2019/few_shot_2/seed1"]
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
    history = json.loads((out / "predictions" / "retclip" / "ODIR5K_finetune_seed1_history.json").read_text())
    assert [h.get("epoch") for h in history] == [1, None] and history[1] == {"best_epoch": 1}
    with (out / "results.csv").open() as fh:
        assert {(r["dataset"], r["n_seeds"]) for r in csv.DictReader(fh)} == {
            ("RETFOUND_SPLIT", "2"),
            ("ODIR5K", "2"),
        }


# -- several models ---------------------------------------------------------------------------------------------


def _macro_auroc(path: Path) -> float:
    """Macro AUROC of a predictions CSV by hand: over classes (one vs rest) or labels (multi-label)."""
    with path.open() as fh:
        pred = list(csv.DictReader(fh))
    classes = [k[len("prob_") :] for k in pred[0] if k.startswith("prob_")]
    values = []
    for c in classes:
        truth = [r[f"label_{c}"] == "1" if "label" not in r else r["label"] == c for r in pred]
        y = np.array(truth, dtype=int)
        if y.min() != y.max():
            values.append(roc_auc_score(y, [float(r[f"prob_{c}"]) for r in pred]))
    return float(np.mean(values))


@pytest.mark.slow
def test_ours_an_image_only_and_an_image_text_model_in_one_table(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(results, "BOOTSTRAP_RESAMPLES", 20)  # the rule is checked by hand elsewhere
    suite_path = write_suite(tmp_path, layouts=("retfound_split", "odir5k"))
    suite = yaml.safe_load(suite_path.read_text())
    suite["few_shot"] = {"shots": [1]}
    rf = M.retfound_mae(tmp_path / "RETFound_cfp_weights.pth")
    flair = M.flair(tmp_path / "flair_resnet.pth", tmp_path / "Bio_ClinicalBERT")
    suite["models"] = [
        {"name": "ours", "kind": "retclip", "path": str(model_dir)},
        {"name": "retfound", "kind": "retfound_mae", "path": "RETFound_cfp_weights.pth", "options": rf},
        {"name": "flair", "kind": "flair", "path": "flair_resnet.pth", "options": flair},
    ]
    suite_path.write_text(yaml.safe_dump(suite, sort_keys=False))
    out = tmp_path / "out"
    assert eval_main(["benchmark", "--suite", str(suite_path), "--output_dir", str(out)]) == 0

    with (out / "results.csv").open() as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == RESULT_COLUMNS
        rows = list(reader)
    protocols = {"zero_shot", "linear_probe", "few_shot_1", "finetune"}
    for model in ("ours", "flair", "retfound"):
        for ds in ("RETFOUND_SPLIT", "ODIR5K"):
            got = {r["protocol"] for r in rows if r["model"] == model and r["dataset"] == ds}
            assert got == (protocols - {"zero_shot"} if model == "retfound" else protocols)
    assert not (out / "predictions" / "retfound" / "ODIR5K_zero_shot_seed0.csv").exists()

    md = (out / "results.md").read_text()
    section = md.split("## RETFOUND_SPLIT\n", 1)[1].split("\n## ", 1)[0]
    lines = section.strip().splitlines()
    assert lines[0].startswith("| model | zero_shot auroc |")
    assert [line.split(" | ")[0] for line in lines[2:5]] == ["| ours", "| retfound", "| flair"]
    assert lines[3].startswith("| retfound | n/a (image-only) |")
    assert "Paired differences against ours (model minus ours, 95% CI):" in section
    assert any(line.startswith("| retfound | n/a (image-only) | ") for line in lines[5:])
    assert "| retfound | retfound_mae | " in md and (
        "32 px: shorter side to 36, centre crop 32 (bicubic); mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)"
        in md
    )
    assert (
        "32 px: longer side to 32, padded with black right and bottom (bilinear); mean (0, 0, 0), std (1, 1, 1)"
        in md
    )
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    templates = (out / "zero_shot_templates.md").read_text()
    assert "| flair | RETFOUND_SPLIT | en | A fundus photograph of {} |" in templates
    assert "| ours | RETFOUND_SPLIT | zh |" in templates and "| retfound |" not in templates

    # The paired difference of the fine-tuning AUROC on a split drawn per seed, recomputed by hand.
    with (out / "differences.csv").open() as fh:
        diffs = list(csv.DictReader(fh))
    row = next(
        r
        for r in diffs
        if (r["model"], r["dataset"], r["protocol"], r["metric"]) == ("flair", "ODIR5K", "finetune", "auroc")
    )
    per_seed = [
        _macro_auroc(out / "predictions" / "flair" / f"ODIR5K_finetune_seed{s}.csv")
        - _macro_auroc(out / "predictions" / "ours" / f"ODIR5K_finetune_seed{s}.csv")
        for s in (0, 1)
    ]
    assert per_seed[0] != per_seed[1]  # other test patients per seed
    assert row["baseline"] == "ours" and float(row["difference"]) == pytest.approx(
        np.mean(per_seed), abs=5e-5
    )
    half = 12.7062047 * np.std(per_seed, ddof=1) / np.sqrt(2)  # t(0.975, 1)
    assert (row["interval"], float(row["ci_low"]), float(row["ci_high"])) == (
        "t over seeds",
        pytest.approx(np.mean(per_seed) - half, abs=5e-4),
        pytest.approx(np.mean(per_seed) + half, abs=5e-4),
    )
    assert {r["model"] for r in diffs} == {"retfound", "flair"}

    # A fourth model: only its cells run; nothing of the first three is touched.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "predictions").rglob("*.csv")}
    green = M.retfound_green(tmp_path / "retfoundgreen_statedict.pth")
    suite["models"].append(
        {"name": "green", "kind": "retfound_green", "path": "retfoundgreen_statedict.pth", "options": green}
    )
    suite_path.write_text(yaml.safe_dump(suite, sort_keys=False))
    summary = run_benchmark(load_suite(suite_path), str(out))
    assert summary["ran"] and all(cell.startswith("green/") for cell in summary["ran"])
    assert len(summary["ran"]) == 2 * 3 * 2  # two datasets x (probe, few-shot, fine-tune) x two seeds
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert "| green | n/a (image-only) |" in (out / "results.md").read_text()

    # Other weights under a name already in the table are refused before any work.
    M.retfound_green(tmp_path / "retfoundgreen_statedict.pth", seed=1)
    with pytest.raises(ConfigError, match=r"model green was run with other sha256"):
        run_benchmark(load_suite(suite_path), str(out))


@pytest.mark.slow
def test_every_adapter_through_the_suite_with_model_given_several_times(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(results, "BOOTSTRAP_RESAMPLES", 20)  # one seed: every interval is a bootstrap
    suite_path = write_suite(tmp_path, layouts=("retfound_split", "odir5k"))
    suite = yaml.safe_load(suite_path.read_text())
    suite.update(seeds=[0], few_shot={"shots": [2]})
    suite_path.write_text(yaml.safe_dump(suite, sort_keys=False))
    dino = M.retfound_dinov2(tmp_path / "dino.pth")
    green = M.retfound_green(tmp_path / "green.pth")
    vit = M.timm_vit(tmp_path / "vit.pth")

    def flow(options: dict) -> str:
        return ",".join(f"options.{k}={json.dumps(v)}" for k, v in options.items())

    models = [
        f"ours={model_dir}",
        f"name=dino,kind=retfound_dinov2,path={tmp_path / 'dino.pth'},{flow(dino)}",
        f"name=green,kind=retfound_green,path={tmp_path / 'green.pth'},{flow(green)}",
        f"name=vit,kind=timm,arch=vit_tiny_patch16_224,path={tmp_path / 'vit.pth'},{flow(vit)}",
    ]
    has_open_clip = importlib.util.find_spec("open_clip") is not None
    if has_open_clip:
        config, weights = M.open_clip_files(tmp_path / "clip")
        models.append(f"name=clip,kind=open_clip,arch={M.TINY_CLIP},path={weights},options.config={config}")
    out = tmp_path / "out"
    argv = ["benchmark", "--suite", str(suite_path), "--output_dir", str(out)]
    assert eval_main([*argv, *[a for m in models for a in ("--model", m)]]) == 0
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    with (out / "differences.csv").open() as fh:
        diffs = list(csv.DictReader(fh))
    names = ["ours", "dino", "green", "vit"] + (["clip"] if has_open_clip else [])
    for name in names:
        for ds in ("RETFOUND_SPLIT", "ODIR5K"):
            got = {r["protocol"] for r in rows if r["model"] == name and r["dataset"] == ds}
            text = name in ("ours", "clip")
            expected = {"linear_probe", "few_shot_2", "finetune"} | ({"zero_shot"} if text else set())
            assert got == expected
            if name != "ours":  # one seed: paired by resampling the test images
                got = {
                    (r["protocol"], r["interval"]) for r in diffs if r["model"] == name and r["dataset"] == ds
                }
                assert got == {(p, "bootstrap over test images") for p in expected}
    assert all(float(r["ci_low"]) <= float(r["mean"]) <= float(r["ci_high"]) for r in rows)
    md = (out / "results.md").read_text()
    assert "| dino | retfound_dinov2 | " in md and "| green | retfound_green | " in md
    assert "28 px: resized to 28x28 (bilinear); mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5)" in md  # green
    if has_open_clip:
        assert f"| clip | open_clip {M.TINY_CLIP} | " in md
