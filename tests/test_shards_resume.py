import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retclip_dist import synth
from retclip_dist.shards import build as build_mod
from retclip_dist.shards import cli
from retclip_dist.shards.journal import JOURNAL_NAME

SMALL = ["--image-size", "64", "--min-side", "48", "--no-progress", "--max-count", "2"]


def files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw")
    manifest, root = synth.write_raw_archive(out, 15, seed=3, image_size=80, layout="dir")
    # One bad row so the journal has to carry rejects across the interruption.
    with open(manifest, "a", encoding="utf-8") as fh:
        fh.write("broken,missing.jpg,missing.jpg,r\n")
    return str(manifest), str(root)


def args(raw, out, *extra) -> list[str]:
    return ["build", "--manifest", raw[0], "--images", raw[1], "--output_dir", str(out), *SMALL, *extra]


@pytest.mark.parametrize("pseudonymise", [False, True])
def test_interrupted_build_resumes_to_identical_bytes(raw, tmp_path, monkeypatch, pseudonymise):
    extra = []
    if pseudonymise:
        (tmp_path / "k").write_text("a-secret-of-at-least-16-bytes\n")
        extra = ["--pseudonymise", str(tmp_path / "k")]
    assert cli.main(args(raw, tmp_path / "clean", *extra)) == 0
    real = build_mod.process_record
    calls = {"n": 0}

    def dies_after_nine(*a):
        calls["n"] += 1
        if calls["n"] > 9:
            raise RuntimeError("simulated crash")
        return real(*a)

    monkeypatch.setattr(build_mod, "process_record", dies_after_nine)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.main(args(raw, tmp_path / "s", *extra))
    journal = (tmp_path / "s" / JOURNAL_NAME).read_text().splitlines()
    # Header + full shards of 2: 4 when the reject comes after the ninth patient, 3 when before it
    # (pseudonyms shuffle the patients differently); the next shard was still open.
    assert len(journal) == 1 + (3 if pseudonymise else 4)
    assert not (tmp_path / "s" / "manifest.json").exists()
    assert not list((tmp_path / "s").glob("*.tmp"))  # the half-filled shard was dropped on the way out
    monkeypatch.setattr(build_mod, "process_record", real)
    if pseudonymise:  # another key must not finish a set begun with this one
        (tmp_path / "other").write_text("another-secret-of-16-bytes-or-more")
        assert cli.main(args(raw, tmp_path / "s", "--pseudonymise", str(tmp_path / "other"))) == 2
    assert cli.main(args(raw, tmp_path / "s", *extra)) == 0
    assert files(tmp_path / "s") == files(tmp_path / "clean")
    assert len(json.loads((tmp_path / "s" / "manifest.json").read_text())["shards"]) == 8


def test_resume_with_other_options_is_refused(raw, tmp_path, monkeypatch, capsys):
    def crash(*_):
        raise RuntimeError("stop")

    monkeypatch.setattr(build_mod, "process_record", crash)
    with pytest.raises(RuntimeError):
        cli.main(args(raw, tmp_path / "s"))
    monkeypatch.undo()
    assert cli.main(args(raw, tmp_path / "s", "--seed", "5")) == 2
    assert "unfinished build with other options or inputs" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_mid_run_then_same_command_finishes_identically(tmp_path):
    manifest, root = synth.write_raw_archive(tmp_path / "raw", 400, seed=0, image_size=256, layout="zip")
    cmd = [sys.executable, "-m", "retclip_dist.shards.cli", "build", "--manifest", str(manifest)]
    cmd += [
        "--images",
        str(root),
        "--image-size",
        "224",
        "--max-count",
        "1",
        "--no-progress",
        "--workers",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, "--output_dir", str(out)], env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(out.glob("train-*.tar"))) < 5:
        time.sleep(0.005)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for child in children:  # the pool workers; a real kill -9 of a job takes them down too
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(child), signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists(), "build finished before the kill; make it slower"
    done_before = len(list(out.glob("train-*.tar")))
    assert 5 <= done_before < 400

    subprocess.run([*cmd, "--output_dir", str(out)], env=env, check=True, capture_output=True)
    subprocess.run([*cmd, "--output_dir", str(tmp_path / "clean")], env=env, check=True, capture_output=True)
    assert not (out / JOURNAL_NAME).exists() and not list(out.glob("*.tmp"))
    assert files(out) == files(tmp_path / "clean")
