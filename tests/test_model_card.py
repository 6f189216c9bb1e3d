"""The model card save_pretrained writes: front matter, architecture, the trainer's summary, the benchmark
section, and no free text of the run's (paths, names) in it. A real run's card: tests/test_train.py."""

from __future__ import annotations

import logging
import shutil

import bench_folders as B
import pytest
import torch
import yaml
from conftest import ROOT, TINY_VOCAB, tiny_model_config

from retclip_dist.config import load_config
from retclip_dist.eval.benchmark.run import parse_model_arg, run_benchmark
from retclip_dist.eval.benchmark.suite import load_suite
from retclip_dist.model import card
from retclip_dist.model.card import (
    BENCHMARK_END,
    BENCHMARK_START,
    README_FILE,
    SplitCount,
    TrainingSummary,
    record_benchmark,
    render_card,
    set_benchmark,
)
from retclip_dist.model.retclip import RetClip
from retclip_dist.train.config import RunConfig
from retclip_dist.train.run_summary import config_changes, reference_config, run_summary, step_seconds

SECRET = "St-Elsewhere-Eye-Unit"  # stands for anything naming a hospital, a person or a machine


@pytest.fixture(scope="module")
def model() -> RetClip:
    torch.manual_seed(0)
    return RetClip(tiny_model_config(TINY_VOCAB))


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_saved_model_has_a_card_with_front_matter_and_architecture(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    text = (tmp_path / "m" / README_FILE).read_text()
    front = _front_matter(text)
    assert front["license"] == "other" and front["library_name"] == "retclip-dist"
    assert front["pipeline_tag"] == "zero-shot-image-classification" and "fundus" in front["tags"]
    # Numbers read from the model, not the defaults: width 32, D 16, 32 px input, 2 BERT layers of 32.
    assert "32 wide" in text and "D = 16" in text and "32 x 32 px, bicubic" in text
    assert "bert, 2 layers, hidden 32, vocabulary 42" in text
    assert "logit scales patient 90.00, left 90.00, right 90.00" in text
    assert "No training summary" in text
    assert text.count(BENCHMARK_START) == 1 and "has not run on this model yet" in text


def _summary(**changes) -> TrainingSummary:
    fields = {
        "splits": [SplitCount("train", 1200, 10), SplitCount("val", 24, 1)],
        "pseudonymised": True,
        "processes": 8,
        "steps": 3000,
        "epochs": 10,
        "patients_seen": 3000 * 2048,
        "step_seconds": 12.345 * 3600,
        "recipe": [("global batch", "2048 patients (8 x 256)")],
        "changes_from": "the project preset `configs/retclip_vitb16.yaml`",
        "changes": [("train.lr", "0.0001")],
        "withheld": ["data.shards", "output_dir"],
        "validation": {"samples": 24.0, "patient/i2t_r1": 0.25, "patient/chance_r1": 0.04, "left/i2t_r1": 0.5, "left/chance_r1": 0.1, "right/i2t_r1": 0.125, "right/chance_r1": 0.1},
        "validation_step": 3000,
    }  # fmt: skip
    return TrainingSummary(**{**fields, **changes})


def test_the_trainers_summary_is_rendered(model):
    text = render_card(model, _summary())
    assert "| train | 1,200 | 10 |" in text and "| val | 24 | 1 |" in text
    assert "keyed pseudonyms" in text
    assert "Settings that differ from the project preset `configs/retclip_vitb16.yaml`:" in text
    assert "- `train.lr`: 0.0001" in text
    assert "values left out (paths and names): data.shards, output_dir." in text
    assert "3,000 optimiser steps, 10 epochs completed, 6,144,000 patients fed, on 8 process(es)" in text
    assert "12.35 h" in text
    assert "Retrieval recall on 24 held-out patients after step 3,000" in text
    assert "| level | i2t_r1 | chance_r1 |" in text
    assert "| patient | 0.250 | 0.040 |" in text and "| right | 0.125 | 0.100 |" in text
    assert "No validation ran." in render_card(model, _summary(validation=None, validation_step=None))
    assert "included): 42.0 s." in render_card(model, _summary(step_seconds=42.0))
    assert "included): 2.5 min." in render_card(model, _summary(step_seconds=150.0))
    assert "included): not recorded." in render_card(model, _summary(step_seconds=None))


def test_changes_show_numbers_and_choices_and_leave_free_text_out(tmp_path):
    overrides = [
        "--data.shards", f"/data/{SECRET}/shards",
        "--output_dir", f"/home/{SECRET}/runs/x",
        "--model.tokenizer_path", f"/data/{SECRET}/vocab.txt",
        "--log.project", SECRET,
        "--log.trackers", "[wandb]",
        "--data.storage_options", f"{{key: {SECRET}}}",
        "--train.lr", "1e-4",
        "--train.precision", "bf16",
        "--train.freeze", "[vision]",
        "--train.lr_scale", "{text: 0.5}",
        "--loss.duplicates", "keep",
    ]  # fmt: skip
    preset = ROOT / "configs/tiny.yaml"
    cfg = load_config(RunConfig, preset, overrides)
    reference, named = reference_config(str(preset))
    assert named == "the project preset `configs/tiny.yaml`"
    shown, withheld = config_changes(cfg, reference)
    assert dict(shown) == {
        "train.lr": "0.0001",
        "train.precision": '"bf16"',
        "train.freeze": '["vision"]',
        "train.lr_scale": '{"text": 0.5}',
        "loss.duplicates": '"keep"',
    }
    assert withheld == [
        "data.shards",
        "data.storage_options",
        "log.project",
        "log.trackers",
        "model.tokenizer_path",
        "output_dir",
    ]
    # A preset of the user's own is not named (its file name may say where it comes from): the card then
    # compares with the defaults.
    own = tmp_path / f"{SECRET}.yaml"
    shutil.copy(preset, own)
    reference, named = reference_config(str(own))
    assert SECRET not in named and "defaults" in named
    shown, withheld = config_changes(load_config(RunConfig, own, overrides), reference)
    assert ("data.batch_size", "16") in shown and "model.vision_kwargs" in dict(shown)
    assert not any(SECRET in value for _, value in shown)
    assert reference_config(None)[1] == named


def test_step_time_counts_a_replayed_step_once():
    records = [
        {"step": 2, "step_ms": 100.0, "data_wait_ms": 20.0},  # steps 1-2
        {"step": 4, "step_ms": 110.0, "data_wait_ms": 10.0},  # steps 3-4, then the run was killed
        {"step": 4, "step_ms": 130.0, "data_wait_ms": 10.0},  # resumed from step 2: 3-4 again
        {"step": 7, "step_ms": 200.0, "data_wait_ms": 0.0},  # steps 5-7
    ]
    assert step_seconds(records) == pytest.approx((2 * 120 + 2 * 140 + 3 * 200) / 1e3)
    assert step_seconds([{"step": 3, "loss": 1.0}]) is None


def test_the_benchmark_section_is_replaced_and_the_rest_of_the_card_kept(model, tmp_path):
    model.save_pretrained(tmp_path)
    path = tmp_path / README_FILE
    path.write_text(
        path.read_text().replace("## Use", "## Intended use\n\nScreening research only.\n\n## Use")
    )
    set_benchmark(tmp_path, model, "| dataset | zero_shot auroc |\n| IDRID | 0.700 |")
    set_benchmark(tmp_path, model, "| dataset | zero_shot auroc |\n| IDRID | 0.800 |")
    text = path.read_text()
    assert text.count(BENCHMARK_START) == 1 and text.count(BENCHMARK_END) == 1
    assert "| IDRID | 0.800 |" in text and "0.700" not in text and "has not run" not in text
    assert "Screening research only." in text and text.index(BENCHMARK_END) < text.index("## Intended use")
    # A card of the user's own, without the markers, gets the section at the end; no card: a new one.
    path.write_text("# My card\n")
    set_benchmark(tmp_path, model, "| t |")
    assert path.read_text().startswith("# My card\n\n" + BENCHMARK_START)
    path.unlink()
    set_benchmark(tmp_path, model, "| t |")
    assert _front_matter(path.read_text())["library_name"] == "retclip-dist"


def test_a_card_that_cannot_be_written_is_a_warning(model, tmp_path, monkeypatch, caplog):
    def refuse(*args):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(card, "set_benchmark", refuse)
    with caplog.at_level(logging.WARNING):
        record_benchmark(tmp_path, "| t |", 1, model)
    assert "was not added to" in caplog.text and "read-only file system" in caplog.text


@pytest.mark.slow
def test_a_benchmark_run_puts_its_table_in_the_models_card(model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    B.table(tmp_path / "data")
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        yaml.safe_dump(
            {
                "seeds": [0],
                "protocols": ["linear_probe"],
                "datasets": [
                    {
                        "name": "cohort",
                        "layout": "table",
                        "root": "data",
                        "options": {"label_column": "grade"},
                    }
                ],
                "probe": {"c_grid": [1.0]},
                "device": "cpu",
            }
        )
    )
    loaded = load_suite(suite)
    loaded.models = [parse_model_arg(str(tmp_path / "model"))]
    summary = run_benchmark(loaded, str(tmp_path / "out"))
    text = (tmp_path / "model" / README_FILE).read_text()
    section = text[text.index(BENCHMARK_START) : text.index(BENCHMARK_END)]
    auroc = next(r for r in summary["rows"] if r["metric"] == "auroc")
    assert "1 seed(s)" in section and "## cohort" in section and "| model | linear_probe auroc |" in section
    assert f"| retclip | {auroc['mean']:.3f} [" in section
    # The per-dataset notes (which may name images) stay in results.md only.
    assert str(tmp_path) not in text


def test_a_summary_that_cannot_be_gathered_is_a_warning_and_no_summary(tmp_path, caplog):
    cfg = load_config(RunConfig, None, ["--data.shards", str(tmp_path / "gone")])
    with caplog.at_level(logging.WARNING):
        assert run_summary(cfg, None, tmp_path, 1, 10) is None
    assert "model card: no training summary (ValueError: cannot read shard manifest" in caplog.text
