"""What a resume costs: time from process start to the first batch, and bytes read from storage.

    OMP_NUM_THREADS=1 .venv/bin/python bench/resume.py
    .venv/bin/python bench/resume.py --baseline /tmp/base   # also the tree of another version

A synthetic shard set is read by the training loader (one rank, P=2 partitions, in-process reading, so
that every byte goes through the counting reader of tests/conftest.py) from local files and from S3
(moto's server, as tests/test_data_s3.py starts it). Each row is its own fresh process: a fresh start,
and resumes from the loader positions of the steps at 10%, 50% and 90% of the epoch (taken from one
uninterrupted pass). ``seconds`` runs from the process's start (interpreter and imports included) to the
first batch in hand (``load s``: from the loader's build on, what the position changes; the rest is
interpreter start and imports); ``bytes`` is what fsspec fetched from storage until then (S3: what its read-ahead
cache fetched). Ratios are against the fresh start of the same tree and storage, measured in the same
run (``x 10%``: against the resume at 10%). The goal: the 90% resume within 1.2x of the 10% one, and bytes beyond a fresh start at most one
shard per stream plus the samples still in its shuffle buffer (the ``bound`` column).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

# Run in the child: the loader of the tree first on sys.path, the counting reader of this tree's tests.
CHILD = """
import json, sys
tree, tests, cfg_json, state_json = sys.argv[1:5]
sys.path[:0] = [tree, tests]
from conftest import counting_shard_reads
from retclip_dist.data.config import DataConfig
from retclip_dist.data.loader import build_train_data
from retclip_dist.model.tokenizer import wordpiece_tokenizer
from retclip_dist.model.vocab import read_vocab

def age():
    with open("/proc/self/stat") as f:
        started = int(f.read().rsplit(")", 1)[1].split()[19]) / __import__("os").sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) - started

cfg = DataConfig(**json.loads(cfg_json))
tokenizer = wordpiece_tokenizer(read_vocab(tests + "/../configs/tiny_vocab.txt"))
with counting_shard_reads() as counts:
    began = age()
    loader = build_train_data(cfg, tokenizer, 0, 1, 0)
    state = json.loads(state_json)
    if state:
        loader.load_state_dict(state)
    next(iter(loader))
    now = age()
    print(json.dumps({"seconds": now, "load_s": now - began, "bytes": counts["bytes"], "opens": counts["opens"]}))
"""


def _child(tree: Path, cfg: dict, state: dict | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    args = [sys.executable, "-c", CHILD, str(tree), str(ROOT / "tests"), json.dumps(cfg), json.dumps(state)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900, cwd=tree)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _states(cfg: dict, fractions: list[float]) -> dict[float, dict]:
    """Loader positions after the steps at ``fractions`` of the epoch, from one uninterrupted pass."""
    from retclip_dist.data.config import DataConfig
    from retclip_dist.data.loader import build_train_data
    from retclip_dist.model.tokenizer import wordpiece_tokenizer
    from retclip_dist.model.vocab import read_vocab

    tokenizer = wordpiece_tokenizer(read_vocab(ROOT / "configs/tiny_vocab.txt"))
    loader = build_train_data(DataConfig(**cfg), tokenizer, 0, 1, 0)
    at = {max(1, round(f * loader.steps_per_epoch)): f for f in fractions}
    states = {}
    for _ in loader:
        if loader.step in at:
            states[at[loader.step]] = json.loads(json.dumps(loader.state_dict()))
        if len(states) == len(at):
            break
    return states


def _s3(root: Path) -> tuple[object, dict, str]:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"},
    }
    client = boto3.client(
        "s3", aws_access_key_id="testing", aws_secret_access_key="testing", **options["client_kwargs"]
    )
    client.create_bucket(Bucket="shards")
    for path in root.iterdir():
        client.upload_file(str(path), "shards", f"set/{path.name}")
    return server, options, "s3://shards/set"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=1200, help="training patients")
    ap.add_argument("--per-shard", type=int, default=100, help="patients per shard")
    ap.add_argument("--size", type=int, default=192, help="JPEG side in pixels")
    ap.add_argument("--buffer", type=int, default=100, help="data.shuffle_buffer")
    ap.add_argument("--baseline", type=Path, help="the source tree of another version to measure too")
    ap.add_argument("--no-s3", action="store_true", help="local files only")
    ap.add_argument("--baseline-only", action="store_true", help="with --baseline: measure only that tree")
    args = ap.parse_args()

    from conftest import fake_patients, write_shard_set

    root = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    manifest = write_shard_set(root, {"train": fake_patients(args.patients, args.size)}, args.per_shard)
    shard_bytes = max(s["bytes"] for s in manifest["shards"])
    sample_bytes = max(s["bytes"] / s["count"] for s in manifest["shards"])
    base = {
        "batch_size": 16,
        "partitions": 2,
        "num_workers": 0,
        "shuffle_buffer": args.buffer,
        "decode_size": 64,
        "image_size": 56,
    }
    fractions = [0.1, 0.5, 0.9]
    states = _states({**base, "shards": str(root)}, fractions)
    streams = base["partitions"]
    bound = streams * (shard_bytes + args.buffer * sample_bytes)
    print(
        f"{args.patients} patients of {args.size} px in shards of {args.per_shard} ({shard_bytes / 1e6:.2f} MB), "
        f"{streams} streams, shuffle buffer {args.buffer}; bound on bytes beyond a fresh start: "
        f"{bound / 1e6:.2f} MB"
    )
    stores = [("local", str(root), {})]
    server = None
    if not args.no_s3:
        server, options, url = _s3(root)
        stores.append(("s3", url, options))
    trees = [("this tree", ROOT)] + ([("baseline", args.baseline)] if args.baseline else [])
    if args.baseline and args.baseline_only:
        trees = trees[1:]
    print(f"{'tree':<10} {'storage':<7} {'resume at':<9} {'seconds':>8} {'x 10%':>6} {'load s':>7} "
          f"{'x 10%':>6} {'MB read':>8} {'MB beyond fresh':>16} {'within bound':>12}")  # fmt: skip
    try:
        for tree_name, tree in trees:
            for store, url, options in stores:
                cfg = {**base, "shards": url, "storage_options": options}
                fresh = _child(tree, cfg, None)
                rows = [("fresh", fresh)] + [(f"{f:.0%}", _child(tree, cfg, states[f])) for f in fractions]
                ten = rows[1][1]
                for label, got in rows:
                    extra = got["bytes"] - fresh["bytes"]
                    print(
                        f"{tree_name:<10} {store:<7} {label:<9} {got['seconds']:>8.2f} "
                        f"{got['seconds'] / ten['seconds']:>6.2f} {got['load_s']:>7.2f} "
                        f"{got['load_s'] / ten['load_s']:>6.2f} {got['bytes'] / 1e6:>8.2f} "
                        f"{extra / 1e6:>16.2f} {extra <= bound!s:>12}"
                    )
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
