"""Install the lowest versions pyproject.toml declares into DIR, beside the project's environment.

    python .ci/lowest.py DIR && PYTHONPATH=DIR python -m pytest -m "not slow and not dist"

pyproject.toml's `name>=X` bounds are the one home of the lowest supported versions; this script reads
them, so a bound cannot be raised or lowered without this run testing it. torch and torchvision stay as
installed (their CUDA builds pull several GB of libraries matched to one CUDA release), as do the
optional extras (deepspeed, s3fs), whose bounds are the versions the main suite runs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEPT = {"torch", "torchvision"}
# transformers brings its own exclusive dependencies (tokenizers, huggingface_hub) at the versions it asks
# for; everything else goes in without dependencies so nothing beside it changes.
WITH_DEPS = {"transformers"}


def lower_bounds(pyproject: Path) -> dict[str, str]:
    """{name: X} for every core dependency written `name>=X` in [project] dependencies."""
    text = pyproject.read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    if block is None:
        raise SystemExit(f"{pyproject}: no [project] dependencies list")
    bounds = {}
    for name, version in re.findall(r'"([A-Za-z0-9_.\-]+)>=([0-9][^,"<]*)', block.group(1)):
        bounds[name.lower()] = version
    return bounds


def _drop_stale_metadata(target: Path, bounds: dict[str, str]) -> None:
    """Remove other versions' dist-info that the second install step left beside the lowest ones.

    pip --target keeps an existing package directory but still writes the metadata of the version it
    skipped, and importlib.metadata (which transformers uses for its version checks) could read that one.
    """
    wanted = {re.sub(r"[-_.]+", "_", k).lower(): v for k, v in bounds.items()}
    for info in target.glob("*.dist-info"):
        name, _, version = info.name[: -len(".dist-info")].rpartition("-")
        key = re.sub(r"[-_.]+", "_", name).lower()
        if key in wanted and version != wanted[key]:
            shutil.rmtree(info)


def main(target: str) -> int:
    if target == "--print":
        print(" ".join(f"{k}>={v}" for k, v in lower_bounds(ROOT / "pyproject.toml").items()))
        return 0
    bounds = {k: v for k, v in lower_bounds(ROOT / "pyproject.toml").items() if k not in KEPT}
    stamp = Path(target) / ".bounds"
    wanted = "\n".join(f"{k}=={v}" for k, v in sorted(bounds.items()))
    if stamp.is_file() and stamp.read_text() == wanted:
        return 0
    pip = [sys.executable, "-m", "pip", "install", "-q", "--target", target]
    plain = [f"{k}=={v}" for k, v in sorted(bounds.items()) if k not in WITH_DEPS]
    subprocess.run([*pip, "--upgrade", "--no-deps", *plain], check=True)
    # Without --upgrade, pip leaves what the first step put in the target as it is.
    deps = [f"{k}=={v}" for k, v in sorted(bounds.items()) if k in WITH_DEPS]
    subprocess.run([*pip, *deps], check=True)
    _drop_stale_metadata(Path(target), bounds)
    stamp.write_text(wanted)
    print("lowest declared versions in", target + ":", ", ".join(plain + deps))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
