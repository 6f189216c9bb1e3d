"""What starting loader workers costs per epoch: this tree against another version's tree.

    git archive <base> | (mkdir -p /tmp/base && tar -x -C /tmp/base)
    .venv/bin/python bench/worker_start.py --baseline /tmp/base --workers 2 --epochs 6 --rounds 3

Each epoch builds a new DataLoader whose workers start anew (the trainer does this every epoch, every
validation and every probe). Per tree, in its own process with one torch thread, it times the first
batch of each epoch of the training loader (worker start, shuffle-buffer fill, first decode) and the
whole epoch. The first epoch of this tree also starts the fork server (runtime/workers.py), once per
process; later epochs show the per-epoch cost. Trees run in alternating rounds; best per tree is shown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _measure(root: Path, workers: int, epochs: int, batch: int) -> dict:
    """First-batch and epoch seconds of ``epochs`` epochs of the training loader (in this process)."""
    from retclip_dist.data.config import DataConfig
    from retclip_dist.data.loader import build_train_data
    from retclip_dist.model.tokenizer import wordpiece_tokenizer
    from retclip_dist.model.vocab import read_vocab

    cfg = DataConfig(
        shards=str(root),
        batch_size=batch,
        num_workers=workers,
        shuffle_buffer=16,
        val_split=None,
        pin_memory=False,
        image_size=64,
        decode_size=64,
    )
    tokenizer = wordpiece_tokenizer(read_vocab(ROOT / "configs/tiny_vocab.txt"))
    loader = build_train_data(cfg, tokenizer, 0, 1, 0)
    first, whole = [], []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        start = time.perf_counter()
        it = iter(loader)
        next(it)
        first.append(time.perf_counter() - start)
        for _ in it:
            pass
        whole.append(time.perf_counter() - start)
    import retclip_dist

    return {"first_batch_s": first, "epoch_s": whole, "module": retclip_dist.__file__}


def _tree(tree: Path, root: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-W", "ignore", __file__, "--measure", str(root)]
    cmd += ["--workers", str(args.workers), "--epochs", str(args.epochs), "--batch", str(args.batch)]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=tree)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", type=Path, help="source tree to compare against")
    parser.add_argument("--workers", type=int, default=2, help="loader workers")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per process")
    parser.add_argument("--batch", type=int, default=8, help="patients per batch")
    parser.add_argument("--patients", type=int, default=96, help="patients in the shard set (64 px)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per tree")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(_measure(args.measure, args.workers, args.epochs, args.batch)))
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import fake_patients, write_shard_set

    trees = {"this tree": ROOT, **({"baseline": args.baseline} if args.baseline else {})}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        write_shard_set(Path(tmp), {"train": fake_patients(args.patients, size=64)}, per_shard=16)
        for _ in range(args.rounds):
            for name, tree in trees.items():
                runs[name].append(_tree(tree, Path(tmp), args))
    print(
        f"{args.workers} loader worker(s), {args.patients} patients of 64 px, batch {args.batch}, "
        f"{args.epochs} epochs per process, {args.rounds} rounds (best per tree)"
    )
    print(f"{'code':<10} {'1st epoch: 1st batch s':>22} {'later epochs: 1st batch s':>26} {'epoch s':>8}")
    for name, got in runs.items():
        first = min(r["first_batch_s"][0] for r in got)
        later = min(statistics.median(r["first_batch_s"][1:]) for r in got)
        epoch = min(statistics.median(r["epoch_s"][1:]) for r in got)
        print(f"{name:<10} {first:>22.3f} {later:>26.3f} {epoch:>8.3f}  ({got[0]['module']})")


if __name__ == "__main__":
    main()
