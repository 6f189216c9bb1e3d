"""A stop signal at any moment is honoured: during the model build, the checkpoint load, validation, the
probe and the final save, each ends the trainer within seconds with exit code 3, and either a saved,
resumable state or nothing that needed saving.

The trainer runs as one process (``python -m retclip_dist.train``, as torchrun starts ranks). The signal
goes when the trainer's log says the phase begins (the model build of a slow tower; the epoch's record,
which the probe follows), or, where a file read in the phase can be one, while the trainer is held in a
read of a FIFO (a hung mount, on purpose): opening the FIFO's write end without blocking succeeds only
once the trainer has it open, which is how the test knows where the trainer is.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TINY_TRAIN_ARGS, build_synth_shards, trainer_cmd, trainer_env

from retclip_dist.exit_codes import EXIT_OK, EXIT_STOPPED
from retclip_dist.synth import write_labelled_set
from retclip_dist.train.metrics_log import read_metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="FIFOs and Linux signals"),
]

ROOT = Path(__file__).resolve().parent.parent
# 40 training patients at batch 8: 5 steps per epoch, 2 epochs; 20 validation patients.
ARGS = [
    *TINY_TRAIN_ARGS,
    "--model.vision_kwargs", "{img_size: 64, patch_size: 16, embed_dim: 64, depth: 2, num_heads: 2}",
    "--data.image_size", "64",
    "--data.decode_size", "64",
    "--train.epochs", "2",
    "--val.every_epochs", "1",
]  # fmt: skip
REQUEUE = signal.SIGUSR2  # the launchers' requeue signal
HONOURED_S = 90  # from the signal to the exit: inside Slurm's 120 s warning, with room for a loaded machine


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Shards (40 train, 20 val) and a probe table with its images."""
    root = tmp_path_factory.mktemp("stop-phases")
    shards = build_synth_shards(root, 60, seed=4, raw_size=96, size=64, max_count=12, val_fraction=0.2)
    table = write_labelled_set(root / "probe", n_patients=200, seed=0, image_size=64)
    return shards, table, root / "probe" / "images"


def _probe(table: Path, images: Path, every: int) -> list[str]:
    return [
        "--val.probe.table", str(table), "--val.probe.images", str(images),
        "--val.probe.label", "hard_exudates", "--val.probe.every_epochs", str(every),
    ]  # fmt: skip


def _start(out: Path, *extra: str) -> subprocess.Popen:
    cmd = trainer_cmd(*ARGS, "--output_dir", str(out), *extra)
    return subprocess.Popen(
        cmd, env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen, timeout_s: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the trainer did not end within {timeout_s} s:\n{out[-4000:]}")
    return out


def _fifo_in_place_of(path: Path) -> bytes:
    """Replace ``path`` with a FIFO; returns the bytes it held, to feed through it later."""
    content = path.read_bytes()
    path.unlink()
    os.mkfifo(path)
    return content


def _wait_for_reader(fifo: Path, proc: subprocess.Popen, timeout_s: float = 240) -> int:
    """The FIFO's write end, opened once the trainer has it open for reading (it is then blocked on it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        else:
            os.set_blocking(fd, True)
            return fd
        assert proc.poll() is None, f"the trainer ended first:\n{proc.communicate()[0][-4000:]}"
        assert time.monotonic() < deadline, "the trainer never read the FIFO"
        time.sleep(0.05)


def _feed(fd: int, content: bytes) -> None:
    with contextlib.suppress(BrokenPipeError):  # a trainer that gave up reading
        os.write(fd, content)
    os.close(fd)


def _signal_while_blocked(proc: subprocess.Popen, fifo: Path, content: bytes) -> float:
    """Once the trainer blocks reading ``fifo``: the requeue signal, then the data it waits for."""
    fd = _wait_for_reader(fifo, proc)
    sent = time.monotonic()
    proc.send_signal(REQUEUE)
    time.sleep(0.5)  # delivered while the read blocks
    threading.Thread(target=_feed, args=(fd, content), daemon=True).start()
    return sent


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _checkpoints(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_a_stop_during_the_model_build_ends_setup_before_anything_needed_saving(data, tmp_path):
    shards = data[0]
    out = tmp_path / "run"
    # A tower that takes seconds to build, so the signal lands inside the build.
    big = "{img_size: 64, patch_size: 16, embed_dim: 384, depth: 12, num_heads: 2}"
    proc = _start(out, "--data.shards", str(shards), "--model.vision_kwargs", big)
    for line in proc.stdout:
        if "setting up: the model build" in line:
            break
    sent = time.monotonic()
    proc.send_signal(REQUEUE)
    text = _finish(proc, HONOURED_S)
    assert proc.returncode == EXIT_STOPPED, text[-3000:]
    assert time.monotonic() - sent < HONOURED_S
    assert "stopped by SIGUSR2 during the model build: nothing to save yet, exiting for requeue" in text
    assert "Traceback" not in text
    assert _checkpoints(out) == [] and not (out / "metrics.jsonl").exists()


def test_a_stop_during_the_checkpoint_load_leaves_the_checkpoint_as_it_was(data, tmp_path):
    shards = data[0]
    out = tmp_path / "run"
    first = _start(out, "--data.shards", str(shards), "--train.max_steps", "2", "--val.every_epochs", "0")
    assert first.wait(timeout=240) == EXIT_OK, first.communicate()[0][-3000:]
    (saved,) = _checkpoints(out)
    before = _digest(out / "checkpoints")
    # Its data position is the last file the load reads: hold the load there.
    position = out / "checkpoints" / saved / "data_rank0.json"
    content = _fifo_in_place_of(position)
    proc = _start(out, "--data.shards", str(shards), "--checkpoint.resume", "auto", "--val.every_epochs", "0")
    fd = _wait_for_reader(position, proc)
    sent = time.monotonic()
    proc.send_signal(REQUEUE)  # the read is interrupted at once: the test never feeds it
    text = _finish(proc, HONOURED_S)
    os.close(fd)
    assert proc.returncode == EXIT_STOPPED, text[-3000:]
    assert time.monotonic() - sent < HONOURED_S
    # The config check reads the checkpoint's data position first; either stage ends at once.
    assert re.search(
        r"stopped by SIGUSR2 during the (checkpoint load|config check): nothing to save yet", text
    )
    position.unlink()
    position.write_bytes(content)
    assert _digest(out / "checkpoints") == before  # nothing written, nothing removed
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl", "train")] == [1, 2]


def test_a_stop_during_validation_saves_the_epochs_end_without_a_partial_record(data, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(data[0], shards)
    content = _fifo_in_place_of(shards / "val-000000.tar")
    out = tmp_path / "run"
    proc = _start(out, "--data.shards", str(shards))
    sent = _signal_while_blocked(proc, shards / "val-000000.tar", content)
    text = _finish(proc, HONOURED_S + 60)
    assert proc.returncode == EXIT_STOPPED, text[-3000:]
    assert time.monotonic() - sent < HONOURED_S
    assert "validation at step 5 (epoch 1) stopped by a signal; not recorded" in text
    assert "stop requested by signal; saved step 5, exiting for requeue" in text
    assert _checkpoints(out) == ["step_00000005"]
    assert read_metrics(out / "metrics.jsonl", "val") == []
    assert [r["exit_code"] for r in read_metrics(out / "metrics.jsonl", "end")] == [EXIT_STOPPED]


def _signal_after(proc: subprocess.Popen, words: str) -> tuple[float, str]:
    """The requeue signal as soon as the trainer logs a line with ``words``; returns when, and the log."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if words in line:
            break
    sent = time.monotonic()
    proc.send_signal(REQUEUE)
    return sent, "".join(seen)


def test_a_stop_during_the_probe_saves_without_a_probe_record(data, tmp_path):
    shards, table, images = data
    out = tmp_path / "run"
    proc = _start(out, "--data.shards", str(shards), "--val.every_epochs", "0", *_probe(table, images, 1))
    # The probe follows the epoch's record; it embeds 400 photos, so the signal comes while it runs.
    sent, head = _signal_after(proc, "epoch 0 done")
    text = head + _finish(proc, HONOURED_S + 60)
    assert proc.returncode == EXIT_STOPPED, text[-3000:]
    assert time.monotonic() - sent < HONOURED_S
    assert "probe at step 5 stopped by a signal; not recorded" in text
    assert "stop requested by signal; saved step 5, exiting for requeue" in text
    assert _checkpoints(out) == ["step_00000005"]
    assert read_metrics(out / "metrics.jsonl", "probe") == []


def test_a_stop_during_the_final_steps_saves_the_last_step_and_the_requeued_run_finishes(data, tmp_path):
    shards, table, images = data
    out = tmp_path / "run"
    # The probe runs only after the last step (10): the run ends with probe, checkpoint, validation, model.
    args = ["--data.shards", str(shards), *_probe(table, images, 99)]
    proc = _start(out, *args)
    sent, head = _signal_after(proc, "epoch 1 done")
    text = head + _finish(proc, HONOURED_S + 60)
    assert proc.returncode == EXIT_STOPPED, text[-3000:]
    assert time.monotonic() - sent < HONOURED_S
    assert "probe at step 10 stopped by a signal; not recorded" in text
    assert "stop requested by signal; saved step 10, exiting for requeue" in text
    assert _checkpoints(out) == ["step_00000010"]
    assert not (out / "model").exists()

    # Requeued: the run resumes at its last step and does only what the stop left undone.
    again = _start(out, *args, "--checkpoint.resume", "auto")
    text = _finish(again, 240)
    assert again.returncode == EXIT_OK, text[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 11))
    assert [(r["kind"], r["step"]) for r in rows if r["kind"] in ("probe", "val")][-2:] == [
        ("probe", 10),
        ("val", 10),
    ]
    assert [r["exit_code"] for r in rows if r["kind"] == "end"] == [EXIT_STOPPED, EXIT_OK]
    assert (out / "model" / "model.safetensors").is_file()
