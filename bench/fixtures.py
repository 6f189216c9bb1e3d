"""Speed of the test fixtures: synthetic patients and the demo's linear probe (timing claims live here).

Tests used to assert these timings on a shared CPU, where they fail under load and prove no behaviour;
this script prints them against a peer measured in the same run instead.

    OMP_NUM_THREADS=1 .venv/bin/python bench/fixtures.py
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from retclip_dist import synth
from retclip_dist.demo import demo_probe
from retclip_dist.model.retclip import RetClip

# The tiny model config is the tests' (tests/conftest.py), not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import tiny_model_config


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320, help="side of the synthetic eye images")
    parser.add_argument("--patients", type=int, default=10)
    parser.add_argument("--probe-images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    synth.make_patient(0, args.size)  # warm-up
    patients = _best(lambda: [synth.make_patient(s, args.size) for s in range(args.patients)], args.repeats)
    noise = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)

    def encode() -> None:
        for _ in range(2 * args.patients):
            Image.fromarray(noise).save(io.BytesIO(), "JPEG", quality=90)

    peer = _best(encode, args.repeats)
    per_image = patients / (2 * args.patients)
    print("| what | seconds | vs peer |")
    print("|---|---|---|")
    print(f"| bare JPEG encode, {args.size} px (peer) | {peer / (2 * args.patients):.4f} per image | 1.00 |")
    print(f"| synth.make_patient, {args.size} px | {per_image:.4f} per image | {patients / peer:.2f} |")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vocab = Path(__file__).resolve().parent.parent / "configs/tiny_vocab.txt"  # synth.vocabulary()
        torch.manual_seed(0)
        model = RetClip(tiny_model_config(vocab, image_size=64)).save_pretrained(root / "model")
        start = time.perf_counter()
        demo_probe(model, root / "demo", n_images=args.probe_images, seed=0)
        print(f"| demo_probe, {args.probe_images} images, end to end | {time.perf_counter() - start:.2f} | |")


if __name__ == "__main__":
    main()
