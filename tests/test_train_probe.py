"""The linear probe during pretraining (val.probe) and checkpoint.keep_best.

Fast tests probe a tiny model in process and compare with ``retclip-eval linear-probe``'s own command;
the slow ones train the tiny config and check the logged AUROC against ``retclip-eval`` on the saved
model, the kept best checkpoint against the logged values, and that a resume keeps knowing the best.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import (
    TINY_ARGS,
    TINY_VOCAB,
    accelerate_cmd,
    build_synth_shards,
    tiny_argv,
    tiny_model_config,
    trainer_cmd,
    trainer_env,
)

from retclip_dist.config import ConfigError, load_config
from retclip_dist.eval.commands import run_linear_probe
from retclip_dist.eval.config import DataConfig, EvalConfig
from retclip_dist.eval.data import read_labelled, seeded_split, with_seeded_splits
from retclip_dist.model.retclip import RetClip
from retclip_dist.synth import write_labelled_set
from retclip_dist.train.checkpoint import Checkpointer
from retclip_dist.train.config import ProbeSection, RunConfig
from retclip_dist.train.metrics_log import MetricsLog, read_metrics
from retclip_dist.train.preflight import check_run_config
from retclip_dist.train.probe import TrainProbe, read_probe_splits, run_probe

ROOT = Path(__file__).resolve().parent.parent
LABEL = "hard_exudates"
# The tiny config, small: 4 steps per epoch at batch 16, every step logged, no progress bar; TensorBoard on
# (log.trackers' default), as these runs always had.
TINY = [
    *TINY_ARGS,
    "--data.batch_size", "16",
    "--data.partitions", "2",
    "--train.warmup_steps", "2",
    "--val.every_epochs", "0",
    "--log.trackers", "[tensorboard]",
]  # fmt: skip


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, Path]:
    """100 synthetic patients -> 200 eye photos with a split column (120 train, 40 val, 40 test)."""
    root = tmp_path_factory.mktemp("probe-table")
    table = write_labelled_set(root / "data", n_patients=100, seed=0, image_size=64)
    return table, root / "data" / "images"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("probe-shards")
    return build_synth_shards(root, 100, seed=3, raw_size=96, size=64, max_count=12, val_fraction=0.2)


def _section(labelled: tuple[Path, Path], **extra) -> ProbeSection:
    return ProbeSection(table=str(labelled[0]), images=str(labelled[1]), label=LABEL, **extra)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[RetClip, Path]:
    torch.manual_seed(0)
    model = RetClip(tiny_model_config(TINY_VOCAB, image_size=64))
    return model, model.save_pretrained(tmp_path_factory.mktemp("probe-model") / "model")


# --- splits ----------------------------------------------------------------------------------------------


def test_seeded_split_is_per_row_id_whatever_the_order_and_keeps_its_shares():
    ids = [f"img{i:04d}" for i in range(2000)]
    split = {i: seeded_split(i, 0) for i in ids}
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    assert {i: seeded_split(i, 0) for i in shuffled[:500]} == {i: split[i] for i in shuffled[:500]}
    shares = {s: sum(v == s for v in split.values()) / len(ids) for s in ("train", "val", "test")}
    assert shares == pytest.approx({"train": 0.6, "val": 0.2, "test": 0.2}, abs=0.03)
    other = sum(seeded_split(i, 1) != split[i] for i in ids) / len(ids)
    assert other > 0.4  # another seed draws again (two independent 60/20/20 draws differ 56% of the time)


def test_a_table_without_a_split_column_is_split_by_seeded_row_ids(labelled, tmp_path):
    table, images = labelled
    lines = table.read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("split")
    bare = tmp_path / "bare.csv"
    bare.write_text(
        "\n".join(",".join(c for j, c in enumerate(line.split(",")) if j != col) for line in lines) + "\n"
    )
    splits = read_probe_splits(ProbeSection(table=str(bare), images=str(images), label=LABEL, split_seed=3))
    assert splits.source == "seeded 60/20/20 (split_seed 3)"
    for part, name in zip(splits.parts, ("train", "val", "test"), strict=True):
        assert part.rows and all(seeded_split(r.id, 3) == name for r in part.rows)
    assert sum(len(p) for p in splits.parts) == 200
    # With the column, the table's own splits are used, as retclip-eval linear-probe uses them.
    own = read_probe_splits(_section(labelled))
    assert own.source == "split column"
    assert [len(p) for p in own.parts] == [120, 40, 40]
    data = read_labelled(DataConfig(table=str(bare), images=str(images), label_column=LABEL))
    assert with_seeded_splits(data, 3).rows == splits.table.rows


# --- the probe in process --------------------------------------------------------------------------------


def test_probe_of_the_live_model_equals_retclip_eval_linear_probe(labelled, tiny_model, tmp_path):
    model, model_dir = tiny_model
    model.train()
    probe = TrainProbe(_section(labelled))
    record = probe.score(model)
    assert model.training  # put back in training mode
    cfg = EvalConfig(
        model=str(model_dir),
        output_dir=str(tmp_path / "eval"),
        data=DataConfig(table=str(labelled[0]), images=str(labelled[1]), label_column=LABEL),
    )
    result = run_linear_probe(cfg)
    assert record["auroc"] == result["metrics"]["overall"]["macro_auroc"]
    assert record["accuracy"] == result["metrics"]["overall"]["accuracy"]
    assert record["C"] == result["probe"]["C"]
    assert record["features_from"] == result["features_from"] == "shared projection (200)"
    assert (record["test_images"], record["split"]) == (40, "split column")
    again = probe.score(model)  # from the decoded images kept by the first call: the same numbers
    assert {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in record.items() if k != "seconds"
    }


def test_run_probe_logs_the_record_and_offers_it_as_best(labelled, tiny_model, tmp_path):
    model, _ = tiny_model
    acc = Accelerator(cpu=True)
    probe = TrainProbe(_section(labelled))
    ck = Checkpointer(acc, tmp_path / "checkpoints", keep_last=1, keep_best="probe/auroc")
    logged: list[tuple[int, dict]] = []
    metrics = MetricsLog(tmp_path, lambda values, step: logged.append((step, values)))
    assert run_probe(probe, model, acc, metrics, ck, step=5, epoch=1)
    assert not run_probe(probe, model, acc, metrics, ck, step=10, epoch=2)  # the same value: a tie
    metrics.close()
    rows = read_metrics(tmp_path / "metrics.jsonl", "probe")
    assert [(r["step"], r["epoch"], r["kept_as_best"]) for r in rows] == [(5, 1, True), (10, 2, False)]
    assert ck.best == {
        "metric": "probe/auroc",
        "value": rows[0]["auroc"],
        "step": 5,
        "checkpoint": "step_00000005",
    }
    # The trackers (TensorBoard by default) get the same number under probe/auroc.
    assert [(step, values["probe/auroc"]) for step, values in logged] == [
        (5, rows[0]["auroc"]),
        (10, rows[1]["auroc"]),
    ]


def test_a_probe_that_fails_is_logged_and_training_goes_on(labelled, tiny_model, tmp_path):
    model, _ = tiny_model
    images = tmp_path / "images"
    images.mkdir()
    for path in labelled[1].iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    (images / "p00003_left.jpg").write_bytes(b"not a jpeg")
    acc = Accelerator(cpu=True)
    probe = TrainProbe(replace(_section(labelled), images=str(images)))
    ck = Checkpointer(acc, tmp_path / "checkpoints", keep_last=1, keep_best="probe/auroc")
    metrics = MetricsLog(tmp_path)
    assert not run_probe(probe, model, acc, metrics, ck, step=5, epoch=1)
    assert not run_probe(probe, model, acc, metrics, ck, step=10, epoch=2)  # tries again, fails the same
    (images / "p00003_left.jpg").write_bytes((labelled[1] / "p00003_left.jpg").read_bytes())
    assert run_probe(probe, model, acc, metrics, ck, step=15, epoch=3)  # mended: the probe is back
    metrics.close()
    rows = read_metrics(tmp_path / "metrics.jsonl", "probe")
    for row in rows[:2]:
        assert (
            row["auroc"] is None and "labels.csv:8: image 'p00003_left.jpg' cannot be decoded" in row["error"]
        )
    assert rows[2]["auroc"] is not None and "error" not in rows[2]
    assert ck.best["step"] == 15


# --- preflight -------------------------------------------------------------------------------------------


def _cfg(shards: Path, out: Path, *extra: str) -> RunConfig:
    args = tiny_argv(TINY, shards, out, *extra)
    return load_config(RunConfig, args[1], args[2:])


def _probe_args(labelled: tuple[Path, Path], table: Path | None = None) -> list[str]:
    return [
        "--val.probe.table",
        str(table or labelled[0]),
        "--val.probe.images",
        str(labelled[1]),
        "--val.probe.label",
        LABEL,
    ]


def test_preflight_accepts_a_probe_and_keep_best(shards, labelled, tmp_path):
    cfg = _cfg(shards, tmp_path / "run", *_probe_args(labelled), "--checkpoint.keep_best", "probe/auroc")
    check_run_config(cfg, 2)
    assert (cfg.val.probe.every_epochs, cfg.checkpoint.keep_best) == (1, "probe/auroc")


def test_preflight_names_the_probe_field_and_the_reason(shards, labelled, tmp_path):
    one_class = tmp_path / "one_class.csv"
    lines = labelled[0].read_text().splitlines()
    header = lines[0].split(",")
    col, split = header.index(LABEL), header.index("split")
    rows = [line.split(",") for line in lines[1:]]
    for r in rows:
        if r[split] == "test":
            r[col] = "0"
    one_class.write_text("\n".join([lines[0], *(",".join(r) for r in rows)]) + "\n")
    cases = [
        (["--checkpoint.keep_best", "probe/auroc"], "checkpoint.keep_best='probe/auroc': is only produced by val.probe"),
        (["--checkpoint.keep_best", "val/loss"], "checkpoint.keep_best: 'val/loss' is not one of ['probe/auroc', None]"),
        ([*_probe_args(labelled), "--val.probe.every_epochs", "0"], "val.probe.every_epochs=0: must be at least 1"),
        (["--val.probe.images", str(labelled[1])], "is set but val.probe.table is not"),
        (["--val.probe.table", str(labelled[0])], "val.probe.images='': must name the image root"),
        (_probe_args(labelled, tmp_path / "nowhere.csv"), "val.probe.table="),
        ([*_probe_args(labelled), "--val.probe.label", "glaucoma"], "val.probe: "),
        (_probe_args(labelled, one_class), "split 'test' (40 rows, first one_class.csv:"),
    ]  # fmt: skip
    for overrides, message in cases:
        with pytest.raises(ConfigError) as info:
            check_run_config(_cfg(shards, tmp_path / "run", *overrides), 1)
        assert message in str(info.value), (overrides, str(info.value))
        assert "\n" not in str(info.value)


# --- end to end ------------------------------------------------------------------------------------------


def _train(shards: Path, out: Path, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    args = tiny_argv(TINY, shards, out, *extra)
    cmd = trainer_cmd(*args) if processes == 1 else accelerate_cmd(*args, processes=processes)
    done = subprocess.run(cmd, env=trainer_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def _best_of(rows: list[dict]) -> dict:
    """The record a keep_best run must keep: the highest AUROC, the earliest on a tie."""
    return max(rows, key=lambda r: (r["auroc"], -r["step"]))


def _kept(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def _train_state(out: Path) -> dict:
    return json.loads((out / "checkpoints" / _kept(out)[-1] / "train_state.json").read_text())


KEEP_BEST = [
    "--checkpoint.keep_best",
    "probe/auroc",
    "--checkpoint.keep_last",
    "1",
    "--checkpoint.every_steps",
    "2",
]


@pytest.mark.slow
def test_training_probes_each_epoch_like_retclip_eval_and_keeps_the_best(shards, labelled, tmp_path):
    out = tmp_path / "run"
    _train(shards, out, "--train.epochs", "3", *_probe_args(labelled), *KEEP_BEST)
    rows = read_metrics(out / "metrics.jsonl", "probe")
    epochs = read_metrics(out / "metrics.jsonl", "epoch")
    # One probe after each epoch, at the epoch's last step (the last one on the final weights).
    assert [(r["epoch"], r["step"]) for r in rows] == [(e["epoch"] + 1, e["step"]) for e in epochs]
    assert len(rows) == 3
    assert all(r["features_from"] == "shared projection (200)" and r["test_images"] == 40 for r in rows)
    # The last record is what retclip-eval linear-probe gives on the saved model, to the last bit.
    cli = subprocess.run(
        [
            sys.executable, "-m", "retclip_dist.eval.cli", "linear-probe",
            "--model", str(out / "model"), "--output_dir", str(tmp_path / "eval"),
            "--data.table", str(labelled[0]), "--data.images", str(labelled[1]), "--data.label_column", LABEL,
        ],
        env=trainer_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert rows[-1]["auroc"] == result["metrics"]["overall"]["macro_auroc"]
    assert rows[-1]["C"] == result["probe"]["C"]
    # keep_best: the checkpoint of the best logged AUROC stays beside the last one (keep_last 1, saving
    # every 2 steps, so keep_last alone would have deleted it), and the records say which one it is.
    best = _best_of(rows)
    last = read_metrics(out / "metrics.jsonl", "train")[-1]["step"]
    assert _kept(out) == sorted({f"step_{best['step']:08d}", f"step_{last:08d}"})
    assert _train_state(out)["best"] == {
        "metric": "probe/auroc",
        "value": best["auroc"],
        "step": best["step"],
        "checkpoint": f"step_{best['step']:08d}",
    }
    running = [max(r["auroc"] for r in rows[: i + 1]) for i in range(len(rows))]
    assert [r["kept_as_best"] for r in rows] == [
        i == 0 or r["auroc"] > running[i - 1] for i, r in enumerate(rows)
    ]
    # The kept best is a complete checkpoint of that step.
    state = json.loads((out / "checkpoints" / f"step_{best['step']:08d}" / "train_state.json").read_text())
    assert state["step"] == best["step"]

    # A resumed run keeps knowing the best value: raised here above any AUROC, nothing later beats it,
    # and its checkpoint survives every later pruning.
    latest = out / "checkpoints" / _kept(out)[-1] / "train_state.json"
    saved = json.loads(latest.read_text())
    saved["best"]["value"] = 2.0
    latest.write_text(json.dumps(saved))
    _train(
        shards, out, "--train.epochs", "5", "--checkpoint.resume", "auto", *_probe_args(labelled), *KEEP_BEST
    )
    rows = read_metrics(out / "metrics.jsonl", "probe")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert not any(r["kept_as_best"] for r in rows[3:])
    last = read_metrics(out / "metrics.jsonl", "train")[-1]["step"]
    assert _kept(out) == sorted({f"step_{best['step']:08d}", f"step_{last:08d}"})
    assert _train_state(out)["best"]["value"] == 2.0


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_wait_for_the_probe_and_agree_on_the_best_save(shards, labelled, tmp_path):
    # Rank 1 waits in one collective while rank 0 probes, then both save the best step together.
    out = tmp_path / "run"
    _train(
        shards,
        out,
        "--data.batch_size",
        "8",
        "--train.epochs",
        "2",
        *_probe_args(labelled),
        *KEEP_BEST,
        processes=2,
    )
    rows = read_metrics(out / "metrics.jsonl", "probe")
    assert [r["epoch"] for r in rows] == [1, 2]
    best = _best_of(rows)
    last = read_metrics(out / "metrics.jsonl", "train")[-1]["step"]
    assert _kept(out) == sorted({f"step_{best['step']:08d}", f"step_{last:08d}"})
    assert all((out / "checkpoints" / name / "data_rank1.json").exists() for name in _kept(out))


def test_an_unexpected_probe_error_is_logged_and_training_goes_on(
    labelled, tiny_model, tmp_path, monkeypatch
):
    # E.g. CUDA running out of memory beside the training state: rank 0 must still reach the collective.
    model, _ = tiny_model
    probe = TrainProbe(_section(labelled))
    ck = Checkpointer(Accelerator(cpu=True), tmp_path / "checkpoints", keep_last=1, keep_best="probe/auroc")

    def out_of_memory(_model):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(probe, "score", out_of_memory)
    metrics = MetricsLog(tmp_path)
    assert not run_probe(probe, model, Accelerator(cpu=True), metrics, ck, step=5, epoch=1)
    metrics.close()
    (row,) = read_metrics(tmp_path / "metrics.jsonl", "probe")
    assert (row["auroc"], row["error"]) == (
        None,
        "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB",
    )
    assert ck.best is None and probe.last_step == 5
