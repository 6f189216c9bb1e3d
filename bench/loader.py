"""Per-core throughput of the two data paths on synthetic 512 px JPEG shards.

    .venv/bin/python bench/loader.py --patients 256 --batch 64

Everything runs in one process with one torch thread, so each figure is patients/s per core (a loader
with W workers scales about linearly until the storage or the GPU is the limit). Rows:
  bare PIL decode      full 512 px decode of both eyes, nothing else (the reference, ratio 1.00)
  cpu path             full decode + random resized crop/jitter/erase/normalise with PIL/torchvision
  device path, worker  DCT draft decode to 256 px uint8 + parameter sampling (what loader workers do)
  device path, augment the batched augmentation of both eyes, timed per batch on the CPU (and GPU if any)
  loader, device path  TrainLoader end to end in the main process: tar reading, shuffle, decode, tokens

With ``--baseline DIR`` (a source tree of another version, e.g. ``git archive main``), the loader row is
also measured on an awkward layout (4 partitions, shards of 48 that stream boundaries cut) for this
tree and DIR, each in its own subprocess, in alternating rounds, with the patients each epoch uses:

    git archive main | (mkdir -p /tmp/base && tar -x -C /tmp/base)
    .venv/bin/python bench/loader.py --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from retclip_dist.data.augment import DeviceAugment, sample_params, sample_rng
from retclip_dist.data.config import DataConfig
from retclip_dist.data.loader import build_train_data
from retclip_dist.data.samples import SampleDecoder
from retclip_dist.data.skips import SkipCounter
from retclip_dist.model.config import ImageInput
from retclip_dist.model.tokenizer import wordpiece_tokenizer
from retclip_dist.model.vocab import read_vocab

ROOT = Path(__file__).resolve().parent.parent


def _rate(fn: Callable[[], int], repeats: int) -> float:
    """Best-of-``repeats`` items per second of ``fn`` (which returns how many items it processed)."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - start))
    return best


def _raw_samples(patients: list) -> list[dict]:
    from conftest import sample_members

    raws = []
    for p in patients:
        raws.append(sample_members(p, "train") | {"__key__": p.key})
    return raws


def _bare_decode(raws: list[dict]) -> int:
    for raw in raws:
        for eye in ("left", "right"):
            Image.open(io.BytesIO(raw[f"{eye}.jpg"])).convert("RGB")
    return len(raws)


def _decode_with(cfg: DataConfig, raws: list[dict]) -> Callable[[], int]:
    decoder = SampleDecoder(
        cfg, ImageInput.clip(cfg.image_size), seed=0, epoch=0, train=True, counter=SkipCounter()
    )

    def run() -> int:
        for raw in raws:
            decoder(raw)
        return len(raws)

    return run


def _augment_ms(cfg: DataConfig, batch: int, device: str, repeats: int) -> float:
    """Milliseconds to augment both eyes of one batch of ``batch`` patients on ``device``."""
    images = torch.randint(0, 256, (batch, 3, cfg.decode_size, cfg.decode_size), dtype=torch.uint8)
    params = torch.from_numpy(
        np.stack([sample_params(sample_rng(0, 0, str(i)), 512, 512, cfg) for i in range(batch)])
    )
    batch_dict = {"left": images, "right": images, "left_params": params, "right_params": params}
    augment = DeviceAugment(ImageInput.clip(cfg.image_size), device)
    best = float("inf")
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        augment(batch_dict)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def _loader_rate(root: Path, batch: int, partitions: int | None = None) -> tuple[float, int]:
    """Patients per second of one epoch of the training loader, and the patients that epoch uses."""
    cfg = DataConfig(
        shards=str(root),
        batch_size=batch,
        num_workers=0,
        shuffle_buffer=64,
        val_split=None,
        partitions=partitions,
    )
    # The tokenizer is built here rather than taken from tests/conftest.py, whose imports a --baseline
    # tree of another version may lack.
    tokenizer = wordpiece_tokenizer(read_vocab(ROOT / "configs/tiny_vocab.txt"))
    loader = build_train_data(cfg, tokenizer, 0, 1, 0)
    start = time.perf_counter()
    steps = sum(1 for _ in loader)
    return steps * batch / (time.perf_counter() - start), steps * batch


# The comparison layout: 4 partitions of 16 patients per batch of 64, shards of 48, so stream boundaries
# mostly fall inside shards (the range plan reads partial shards; the shard plan leaves patients unused).
COMPARE_PARTITIONS = 4
COMPARE_SHARD = 48


def _tree_rate(tree: Path, root: Path, batch: int) -> dict:
    """Best of 3 ``_loader_rate`` epochs by the code under ``tree``, in a fresh process (one torch thread)."""
    cmd = [sys.executable, __file__, "--loader-rate", str(root), "--batch", str(batch)]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _compare(baseline: Path, patients: list, batch: int, rounds: int) -> None:
    from conftest import write_shard_set

    with tempfile.TemporaryDirectory() as tmp:
        write_shard_set(Path(tmp), {"train": patients}, per_shard=COMPARE_SHARD)
        best: dict[str, dict] = {}
        ratios = []
        for _ in range(rounds):
            pair = {}
            for name, tree in (("this tree", ROOT), ("baseline", baseline)):
                pair[name] = got = _tree_rate(tree, Path(tmp), batch)
                if name not in best or got["rate"] > best[name]["rate"]:
                    best[name] = got
            ratios.append(pair["this tree"]["rate"] / pair["baseline"]["rate"])
    print(
        f"\nloader, {len(patients)} patients in shards of {COMPARE_SHARD}, {COMPARE_PARTITIONS} partitions, "
        f"batch {batch}, best of {rounds} alternating rounds"
    )
    print(f"{'code':<10} {'patients/s/core':>16} {'used/epoch':>11}  imported from")
    for name, got in best.items():
        print(f"{name:<10} {got['rate']:>16.1f} {got['used']:>11}  {got['module']}")
    ratio = best["this tree"]["rate"] / best["baseline"]["rate"]
    # Back-to-back runs share the machine's load, so the median of the per-round ratios is the steadier one.
    median = statistics.median(ratios)
    rounds_text = " ".join(f"{r:.2f}" for r in ratios)
    print(f"this tree / baseline: best {ratio:.3f}x, median of rounds {median:.3f}x ({rounds_text})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--patients", type=int, default=256, help="synthetic patients (two 512 px JPEGs each)"
    )
    parser.add_argument("--batch", type=int, default=64, help="batch size for the batched augmentation")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    parser.add_argument("--baseline", type=Path, help="source tree to compare the loader against")
    parser.add_argument("--loader-rate", type=Path, help=argparse.SUPPRESS)  # the subprocess of --baseline
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.loader_rate is not None:
        import retclip_dist

        # Best of a few epochs: the first one in a fresh process also pays for lazy imports and caches.
        rate, used = max(_loader_rate(args.loader_rate, args.batch, COMPARE_PARTITIONS) for _ in range(3))
        print(json.dumps({"rate": rate, "used": used, "module": str(Path(retclip_dist.__file__).parent)}))
        return

    sys.path.insert(0, str(ROOT / "tests"))  # the fake patients and shard sets of the tests
    from conftest import fake_patients

    patients = fake_patients(args.patients, size=512, seed=0)
    raws = _raw_samples(patients)
    cfg = DataConfig()
    decoders = {
        "bare PIL decode (512 px, 2 eyes)": lambda: _bare_decode(raws),
        "cpu path: decode + augment": _decode_with(DataConfig(augment_on="cpu"), raws),
        "device path, worker: draft decode": _decode_with(cfg, raws),
    }
    # Rounds interleave the paths so that load from other processes hits them alike; best round wins.
    best = dict.fromkeys(decoders, 0.0)
    for _ in range(args.repeats):
        for name, fn in decoders.items():
            best[name] = max(best[name], _rate(fn, 1))
    bare = best["bare PIL decode (512 px, 2 eyes)"]
    rows: list[tuple[str, float, str]] = [(name, rate, "") for name, rate in best.items()]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        ms = _augment_ms(cfg, args.batch, device, args.repeats)
        rows.append(
            (
                f"device path, augment on {device}",
                args.batch / ms * 1000,
                f"{ms:.1f} ms/batch of {args.batch}",
            )
        )
    from conftest import write_shard_set

    with tempfile.TemporaryDirectory() as tmp:
        write_shard_set(Path(tmp), {"train": patients}, per_shard=64)
        rows.append(
            ("loader, device path, 1 process", _loader_rate(Path(tmp), args.batch)[0], "tar+shuffle+tokens")
        )

    print(f"{args.patients} patients, 512 px JPEG, 1 torch thread, best of {args.repeats}")
    print(f"{'path':<36} {'patients/s/core':>16} {'vs bare decode':>15}  note")
    for name, rate, note in rows:
        print(f"{name:<36} {rate:>16.1f} {rate / bare:>15.2f}  {note}")
    if args.baseline is not None:
        _compare(args.baseline, patients, args.batch, args.repeats)


if __name__ == "__main__":
    main()
