"""Telemetry that finds the slow rank: data wait and step time per logged step, their maxima over ranks with
the rank, peak memory, the end-of-run data-wait share, and every record through Accelerate's trackers.

Unit tests drive ``StepClock`` with a fake clock and the over-ranks fields with hand-set numbers on 2 gloo
ranks; the end-to-end test slows one rank's loader on purpose under ``accelerate launch`` and reads the
record back from ``metrics.jsonl`` and TensorBoard's event files.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import accelerate.tracking
import pytest
import torch
from accelerate.utils import LoggerType
from conftest import TINY_ARGS, accelerate_cmd, build_synth_shards, run_gloo_ranks, tiny_argv, trainer_env

from retclip_dist.config import from_dict, to_dict
from retclip_dist.exit_codes import EXIT_CONFIG
from retclip_dist.train import telemetry
from retclip_dist.train.cli import main
from retclip_dist.train.config import LogSection
from retclip_dist.train.metrics_log import MetricsLog, read_metrics, tracker_config
from retclip_dist.train.telemetry import StepClock, peak_memory_gb, step_timing, wait_share

ROOT = Path(__file__).resolve().parent.parent


class FakeTime:
    """``time.perf_counter`` that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _clock_with(wait_s: list[float], step_s: list[float], fake: FakeTime) -> StepClock:
    """A clock that has seen one step per pair: ``wait_s`` blocked on the loader, then ``step_s`` of work."""
    clock = StepClock()

    def loader():
        for wait in wait_s:
            fake.now += wait  # the time next() blocks
            yield object()

    for _, step in zip(clock.batches(loader()), step_s, strict=True):
        fake.now += step
        clock.step_done()
    return clock


def test_step_clock_splits_loader_wait_from_step_time_per_window(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(telemetry.time, "perf_counter", fake)
    clock = _clock_with([0.010, 0.030], [0.100, 0.300], fake)
    assert clock.window() == pytest.approx((20.0, 200.0))  # means per step, in ms
    assert clock.window() == (0.0, 0.0)  # a new window
    assert clock.total_wait == pytest.approx(0.040)
    assert clock.total_step == pytest.approx(0.400)


def test_step_clock_does_not_count_the_wait_for_the_end_of_the_loader(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(telemetry.time, "perf_counter", fake)
    clock = StepClock()

    def loader():
        fake.now += 0.5
        yield 1
        fake.now += 7.0  # e.g. joining the workers: no batch comes of it

    for _ in clock.batches(loader()):
        clock.step_done()
    assert clock.total_wait == pytest.approx(0.5)


# Rank r's clock over two steps, in seconds: rank 1's loader is slow, rank 0 waits for it inside the step.
WAITS = {0: [0.010, 0.030], 1: [0.500, 0.700]}
STEPS = {0: [0.600, 0.800], 1: [0.100, 0.100]}


def _check_over_ranks(rank: int) -> None:
    fake = FakeTime()
    telemetry.time.perf_counter = fake  # a forked rank: its own copy of the module
    clock = _clock_with(WAITS[rank], STEPS[rank], fake)
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=2)
    timing = step_timing(acc, clock)
    expected = {
        "data_wait_ms": (20.0 + 600.0) / 2,
        "data_wait_ms_max": 600.0,
        "data_wait_ms_max_rank": 1,
        "step_ms": (700.0 + 100.0) / 2,
        "step_ms_max": 700.0,
        "step_ms_max_rank": 0,
        "peak_mem_gb": None,  # CPU: PyTorch counts no peak there
    }
    assert timing == pytest.approx(expected)
    share = wait_share(acc, clock)
    assert share == pytest.approx(
        {
            "data_wait_share": (0.04 + 1.2) / (0.04 + 1.4 + 1.2 + 0.2),
            "data_wait_share_max": 1.2 / 1.4,
            "data_wait_share_max_rank": 1,
        }
    )


@pytest.mark.dist
def test_max_over_ranks_names_the_rank_with_the_slow_loader(tmp_path):
    run_gloo_ranks(_check_over_ranks, 2, tmp_path)


def test_peak_memory_is_none_off_cuda():
    assert peak_memory_gb(torch.device("cpu")) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_memory_counts_what_was_allocated_on_cuda():
    device = torch.device("cuda")
    block = torch.empty(2**28, dtype=torch.uint8, device=device)  # 0.27 GB
    assert peak_memory_gb(device) >= 2**28 / 1e9
    del block


def test_metrics_log_hands_finite_numbers_to_the_trackers_and_keeps_the_rest_in_jsonl(tmp_path):
    calls = []
    metrics = MetricsLog(tmp_path, lambda values, step: calls.append((step, values)))
    timing = {"data_wait_ms": 3.5, "data_wait_ms_max": 6.0, "data_wait_ms_max_rank": 1, "peak_mem_gb": None}
    metrics.train_step(7, 0, 1e-4, {"total": 2.0, "patient": 1.0}, {"patient": 90.0}, 12.5, 0, timing)
    metrics.write("end", 7, {"exit_code": 0, "note": "text", "loss": float("nan")})
    metrics.close()
    assert calls[0][0] == 7
    assert calls[0][1]["train/loss"] == 2.0
    assert calls[0][1]["train/data_wait_ms_max_rank"] == 1
    assert "train/peak_mem_gb" not in calls[0][1]
    assert calls[1] == (7, {"end/exit_code": 0})
    record = read_metrics(tmp_path / "metrics.jsonl", "train")[0]
    assert record["peak_mem_gb"] is None and record["data_wait_ms_max"] == 6.0


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
    args = ["--check", "--log.tensorboard", "false", "--log.trackers", "[tensorboard, wandb]"]
    assert main(args) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "'wandb' needs its package" in err  # tensorboard itself was not asked for
    assert "warning: log.tensorboard=false is an old switch; use log.trackers" in err


@pytest.mark.parametrize(
    ("alias", "trackers", "want"),
    [
        (None, ["tensorboard", "wandb", "tensorboard"], ["tensorboard", "wandb"]),
        (False, ["tensorboard", "wandb"], ["wandb"]),
        (True, ["wandb"], ["wandb"]),  # the alias never adds a tracker
    ],
)
def test_log_tensorboard_is_only_a_warned_alias_of_log_trackers(capsys, alias, trackers, want):
    """trackers is the one list: the alias is folded into it at once and config.json records no alias."""
    section = LogSection(trackers=trackers, tensorboard=alias)
    assert (section.trackers, section.tensorboard) == (want, None)
    assert ("is an old switch" in capsys.readouterr().err) == (alias is not None)
    assert to_dict(section)["tensorboard"] is None
    assert from_dict(LogSection, to_dict(section)) == section


# Rank SLOW_RANK's loader sleeps before handing over each batch; the trainer runs as `-m retclip_dist.train`.
SLOW_LOADER = """\
import os, sys, time
from retclip_dist.data.loader import TrainLoader
from retclip_dist.train.cli import main

if int(os.environ["RANK"]) == int(os.environ["SLOW_RANK"]):
    plain = TrainLoader.__iter__

    def slow(self):
        for batch in plain(self):
            time.sleep(float(os.environ["SLOW_S"]))
            yield batch

    TrainLoader.__iter__ = slow
sys.exit(main())
"""
SLOW_RANK, SLOW_S = 1, 0.4


@pytest.fixture(scope="module")
def slowed_run(tmp_path_factory) -> Path:
    """2 gloo ranks, rank 1's loader slowed by SLOW_S per batch, 2 epochs of 4 steps, TensorBoard on."""
    root = tmp_path_factory.mktemp("telemetry")
    shards = build_synth_shards(root, 100, seed=3, raw_size=96, size=64, max_count=12, val_fraction=0.2)
    script = root / "slow_loader.py"
    script.write_text(SLOW_LOADER)
    out = root / "run"
    args = [
        *TINY_ARGS,
        "--train.epochs", "2",
        "--log.every_steps", "2",
        "--log.trackers", "[tensorboard]",  # log.trackers' default: the records go to TensorBoard too
        "--val.every_epochs", "0",
        "--checkpoint.every_steps", "0",
    ]  # fmt: skip
    cmd = accelerate_cmd(*tiny_argv(args, shards, out), script=script)
    env = trainer_env(SLOW_RANK=str(SLOW_RANK), SLOW_S=str(SLOW_S))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert "waiting for data: " in done.stderr
    return out


@pytest.mark.slow
@pytest.mark.dist
def test_a_slow_loader_on_one_rank_is_named_in_every_train_record(slowed_run):
    rows = read_metrics(slowed_run / "metrics.jsonl", "train")
    assert [r["step"] for r in rows] == [2, 4, 6, 8]  # 2 epochs of 4 steps (77 patients, batch 2 x 8)
    for r in rows:
        assert r["data_wait_ms_max_rank"] == SLOW_RANK
        assert r["data_wait_ms_max"] > 1e3 * SLOW_S
        other = 2 * r["data_wait_ms"] - r["data_wait_ms_max"]  # the mean over 2 ranks, less the slow one
        assert 0 <= other < r["data_wait_ms_max"] - 0.5e3 * SLOW_S  # decoding alone varies a little
        # The fast rank waits for the slow one inside the step (the gradient all-reduce).
        assert r["step_ms_max"] >= r["step_ms"] > 0
        assert r["peak_mem_gb"] is None  # CPU
    end = read_metrics(slowed_run / "metrics.jsonl", "end")[-1]
    assert end["data_wait_share_max_rank"] == SLOW_RANK
    assert end["data_wait_share_max"] > end["data_wait_share"] > 0


@pytest.mark.slow
@pytest.mark.dist
def test_tensorboard_gets_the_train_record_through_the_tracker(slowed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((slowed_run / "tensorboard").rglob("events.out.tfevents.*"))
    runs = {e.parent for e in events if e.parent == slowed_run / "tensorboard" / "retclip"}
    assert len(runs) == 1, events  # output_dir/tensorboard/<log.project>
    board = EventAccumulator(str(runs.pop()))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    rows = read_metrics(slowed_run / "metrics.jsonl", "train")
    fields = ["loss", "loss_patient", "lr", "data_wait_ms", "data_wait_ms_max", "data_wait_ms_max_rank"]
    fields += ["step_ms", "step_ms_max", "step_ms_max_rank", "patients_per_s"]
    for name in fields:
        assert f"train/{name}" in tags, sorted(tags)
        logged = [(e.step, e.value) for e in board.Scalars(f"train/{name}")]
        assert logged == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in rows], name
    assert "train/peak_mem_gb" not in tags  # null on CPU: no scalar
    end = read_metrics(slowed_run / "metrics.jsonl", "end")[-1]
    assert (
        board.Scalars("end/data_wait_share_max_rank")[0].value == SLOW_RANK == end["data_wait_share_max_rank"]
    )
