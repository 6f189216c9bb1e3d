"""Helpers shared by the tests (and the benchmarks in bench/), kept out of the package.

Tests import them by name (``from conftest import fake_patients``): pytest puts this directory on
sys.path. Synthetic *fundus* patients, with reports that say what was drawn, are retclip_dist.synth (the
demo ships them); here are smooth stand-in eyes for the data-path tests, fake shard sets packed by
make-shards' own writer, the one tiny vocabulary as a tokenizer, and a free TCP port.
"""

from __future__ import annotations

import datetime
import io
import itertools
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from transformers import BertTokenizerFast

from retclip_dist import synth
from retclip_dist.io.files import OutputDir
from retclip_dist.model.config import ModelConfig
from retclip_dist.model.tokenizer import wordpiece_tokenizer
from retclip_dist.model.vocab import read_vocab
from retclip_dist.shards.build import BuildOptions, build_shards
from retclip_dist.shards.images import ImageOptions
from retclip_dist.shards.writer import ShardWriter
from retclip_dist.shardset import (
    EYE_REPORT_MEMBER,
    IMAGE_MEMBER,
    MANIFEST_NAME,
    META_MEMBER,
    REPORT_MEMBER,
    manifest_json,
)

ROOT = Path(__file__).resolve().parent.parent
TINY_VOCAB = ROOT / "configs/tiny_vocab.txt"  # BERT's special tokens + synth.vocabulary()
# Findings the fake reports are made of: phrases of the synthetic report vocabulary.
_FINDINGS = (
    "no abnormality",
    "a few drusen",
    "scattered haemorrhages",
    "a cotton wool spot",
    "numerous drusen",
)


def free_port() -> int:
    """A TCP port nothing listens on now; other tests start torchrun too, so a fixed 29500 would collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_rank(
    rank: int, world: int, store_path: str, timeout_s: float, check: Callable[[int], None]
) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        check(rank)
    finally:
        dist.destroy_process_group()


def run_gloo_ranks(check: Callable[[int], None], world: int, tmp_path: Path, timeout_s: float = 30) -> None:
    """Run ``check(rank)`` on ``world`` forked gloo ranks; fail the test if one fails or they hang.

    Forked, not spawned: fresh interpreters importing torch take longer than these tests themselves.
    join() re-raises the failing rank's traceback when an assertion fails in either process.
    """
    store = os.fspath(tmp_path / "gloo-store")
    ctx = mp.start_processes(
        _gloo_rank, args=(world, store, timeout_s, check), nprocs=world, join=False, start_method="fork"
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the {world} ranks did not finish within {timeout_s} s (a collective hangs?)")


def tiny_model_config(vocab_path: str | Path, image_size: int = 32, embed_dim: int = 16) -> ModelConfig:
    """A seconds-fast model for tests: 2-layer ViT (width 32, patch 8) and 2-layer BERT (hidden 32).

    Dropout is off so that forward passes are deterministic in training mode too.
    """
    vocab_size = len(read_vocab(vocab_path))
    return ModelConfig(
        # timm's plain ViT (GELU, no pre-norm): random-init tests have no CLIP weights to match.
        vision_name="vit_base_patch16_224",
        vision_kwargs={"img_size": image_size, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        text_config={
            "model_type": "bert",
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 128,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        tokenizer_path=str(vocab_path),
        embed_dim=embed_dim,
    )


def tiny_tokenizer() -> BertTokenizerFast:
    """The tokenizer of configs/tiny.yaml: WordPiece over configs/tiny_vocab.txt."""
    return wordpiece_tokenizer(read_vocab(TINY_VOCAB))


@dataclass
class FakePatient:
    key: str  # sanitised id, used as the member prefix
    left: bytes  # JPEG bytes
    right: bytes  # JPEG bytes
    report: str  # patient-level report
    left_report: str | None = None  # per-eye report, where the source has one
    right_report: str | None = None  # per-eye report, where the source has one


def fundus_image(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth RGB disc on black with a random tint, gradient and bright spot: resampling paths can be
    compared on it without the aliasing that noise or synth's sharp lesions would add."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = rng.uniform(0.4, 0.6, size=2)
    disc = np.clip((0.45 - np.hypot(xx - cx, yy - cy)) * 30.0, 0.0, 1.0)
    sx, sy = rng.uniform(0.25, 0.75, size=2)
    spot = np.exp(-((xx - sx) ** 2 + (yy - sy) ** 2) / 0.004)
    tint = rng.uniform(0.3, 1.0, size=3)
    shade = 0.6 + 0.4 * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))
    rgb = disc[..., None] * (tint * shade[..., None] + 0.5 * spot[..., None])
    return Image.fromarray((np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def fake_patients(n: int, size: int = 512, seed: int = 0, eye_reports_every: int = 0) -> list[FakePatient]:
    """``n`` patients with ids p00000...; every ``eye_reports_every``-th one has per-eye reports."""
    rng = np.random.default_rng(seed)
    patients = []
    for i in range(n):
        left, right = _FINDINGS[i % 5], _FINDINGS[(i // 5) % 5]
        per_eye = eye_reports_every > 0 and i % eye_reports_every == 0
        patients.append(
            FakePatient(
                key=f"p{i:05d}",
                left=jpeg(fundus_image(rng, size)),
                right=jpeg(fundus_image(rng, size)),
                report=f"Left eye: {left}. Right eye: {right}.",
                left_report=f"{left}." if per_eye else None,
                right_report=f"{right}." if per_eye else None,
            )
        )
    return patients


def sample_members(p: FakePatient, split: str) -> dict[str, bytes]:
    """The members make-shards writes for one patient (no source paths: these patients have none)."""
    members = {IMAGE_MEMBER["left"]: p.left, IMAGE_MEMBER["right"]: p.right, REPORT_MEMBER: p.report.encode()}
    for eye, text in (("left", p.left_report), ("right", p.right_report)):
        if text is not None:
            members[EYE_REPORT_MEMBER[eye]] = text.encode()
    meta = {"patient_id": p.key, "split": split, "orig_size": {}}
    members[META_MEMBER] = json.dumps(meta, sort_keys=True).encode()
    return members


def write_shard_set(
    root: Path, splits: dict[str, list[FakePatient]], per_shard: int | Sequence[int]
) -> dict[str, Any]:
    """Pack ``splits`` with make-shards' own ShardWriter and manifest.json writer; returns the manifest.

    ``per_shard`` is the patients per shard, or a list of shard sizes that each split's shards take in turn.
    """
    sizes = [per_shard] if isinstance(per_shard, int) else list(per_shard)
    out = OutputDir(str(root))
    entries: list[dict[str, Any]] = []
    writer = ShardWriter(out, max_count=max(sizes), max_size=1 << 62, next_index={}, on_close=entries.append)
    for split, patients in splits.items():
        bounds = [0]
        while bounds[-1] < len(patients):
            bounds.append(min(bounds[-1] + sizes[(len(bounds) - 1) % len(sizes)], len(patients)))
        for first, last in itertools.pairwise(bounds):
            for p in patients[first:last]:
                writer.add(split, p.key, sample_members(p, split))
            writer.close()
    text = manifest_json({"per_shard": sizes}, entries, {}, pseudonymised=False)
    out.write_text(MANIFEST_NAME, text)
    return json.loads(text)


def build_argv(manifest: str | Path, images: str | Path, output_dir: str | Path, *extra: str) -> list[str]:
    """``make-shards build`` arguments for one cohort: the required three, then ``extra`` flags."""
    required = ["--manifest", str(manifest), "--images", str(images), "--output_dir", str(output_dir)]
    return ["build", *required, *extra]


def build_synth_shards(
    root: Path,
    patients: int,
    seed: int,
    raw_size: int,
    size: int,
    max_count: int,
    val_fraction: float,
    layout: synth.Layout = "dir",
) -> Path:
    """synth's raw export (JPEGs + patients.csv) through make-shards into ``root/shards``; every patient
    is kept (synthetic eyes are never rejected, so a reject means a broken fixture)."""
    manifest, images = synth.write_raw_archive(root / "raw", patients, seed, raw_size, layout)
    out = root / "shards"
    result = build_shards(
        BuildOptions(
            out=str(out),
            manifest=str(manifest),
            images=str(images),
            val_fraction=val_fraction,
            max_count=max_count,
            image=ImageOptions(size=size, min_side=size),
            progress=False,
        )
    )
    assert result.kept == patients, result.rejected
    return out
