"""Experiment trackers: every record through Accelerate's tracker API, and trackers that cannot start refused."""

from __future__ import annotations

import accelerate.tracking
import pytest
from accelerate.utils import LoggerType

from retclip_dist.exit_codes import EXIT_CONFIG
from retclip_dist.train.loop import main
from retclip_dist.train.metrics_log import MetricsLog, read_metrics, tracker_config


def test_metrics_log_hands_finite_numbers_to_the_trackers_and_keeps_the_rest_in_jsonl(tmp_path):
    calls = []
    metrics = MetricsLog(tmp_path, lambda values, step: calls.append((step, values)))
    metrics.write("train", 7, {"loss": 2.0, "peak_mem_gb": None})
    metrics.write("end", 7, {"exit_code": 0, "note": "text", "loss": float("nan")})
    metrics.close()
    assert calls == [(7, {"train/loss": 2.0}), (7, {"end/exit_code": 0})]
    assert read_metrics(tmp_path / "metrics.jsonl", "train")[0]["peak_mem_gb"] is None


def test_tracker_config_flattens_sections_to_plain_values():
    flat = tracker_config({"output_dir": "x", "train": {"lr": 1e-4, "freeze": ["text"], "max_steps": None}})
    assert flat == {
        "output_dir": "x",
        "train.lr": 1e-4,
        "train.freeze": '["text"]',
        "train.max_steps": "null",
    }


@pytest.mark.parametrize(
    ("trackers", "reason"),
    [
        ("[tensorboard, nosuch]", "unknown tracker 'nosuch'; Accelerate knows"),
        ("[tensorboard, wandb]", "'wandb' needs its package, which is not installed here"),
    ],
)
def test_a_tracker_that_cannot_start_is_one_line_and_exit_2(monkeypatch, capsys, trackers, reason):
    # As if only TensorBoard were installed, whatever this environment has.
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])
    assert main(["--check", "--log.trackers", trackers]) == EXIT_CONFIG
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.count("\n") == 1
    assert out.err.startswith(f"retclip-train: log.trackers={trackers[1:-1].split(', ')!r}: {reason}")


def test_tensorboard_false_leaves_it_out_of_the_trackers(monkeypatch, capsys):
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    assert main(["--check", "--log.tensorboard", "false", "--log.trackers", "[tensorboard, wandb]"]) == 2
    assert "'wandb' needs its package" in capsys.readouterr().err  # tensorboard itself was not asked for
