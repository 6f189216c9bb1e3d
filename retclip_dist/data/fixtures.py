"""Small shard sets in the ``retclip-shards/1`` contract format, for the data tests and the loader benchmark.

Images are smooth synthetic "fundus-like" discs (a bright disc with a gradient and a spot), so resampling
paths can be compared without the aliasing that noise images would add.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from transformers import BertTokenizerFast

from retclip_dist.model.tokenizer import wordpiece_tokenizer


@dataclass
class FakePatient:
    key: str  # sanitised id, used as the member prefix
    left: bytes  # JPEG bytes
    right: bytes  # JPEG bytes
    report: str  # patient-level report
    left_report: str | None = None  # per-eye report, where the source has one
    right_report: str | None = None  # per-eye report, where the source has one


def fundus_image(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth RGB disc on black with a random tint, gradient and bright spot."""
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
        per_eye = eye_reports_every > 0 and i % eye_reports_every == 0
        patients.append(
            FakePatient(
                key=f"p{i:05d}",
                left=jpeg(fundus_image(rng, size)),
                right=jpeg(fundus_image(rng, size)),
                report=f"Patient {i}: \u201cmild\u201d changes, grade {i % 5}",
                left_report=f"left eye {i}" if per_eye else None,
                right_report=f"right eye {i}" if per_eye else None,
            )
        )
    return patients


def sample_dict(p: FakePatient, split: str) -> dict:
    members = {"__key__": p.key, "left.jpg": p.left, "right.jpg": p.right, "report.txt": p.report}
    if p.left_report is not None:
        members["left.txt"] = p.left_report
    if p.right_report is not None:
        members["right.txt"] = p.right_report
    members["json"] = json.dumps({"patient_id": p.key, "split": split, "source": {}, "orig_size": {}})
    return members


def write_shard_set(root: Path, splits: dict[str, list[FakePatient]], per_shard: int | Sequence[int]) -> dict:
    """Write ``{split}-{i:06d}.tar`` shards and ``manifest.json`` under ``root``; returns the manifest.

    ``per_shard`` is the patients per shard, or a list of shard sizes that each split's shards take in turn.
    """
    root.mkdir(parents=True, exist_ok=True)
    sizes = [per_shard] if isinstance(per_shard, int) else list(per_shard)
    entries = []
    for split, patients in splits.items():
        bounds = [0]
        while bounds[-1] < len(patients):
            bounds.append(min(bounds[-1] + sizes[(len(bounds) - 1) % len(sizes)], len(patients)))
        for index, (first, last) in enumerate(itertools.pairwise(bounds)):
            name = f"{split}-{index:06d}.tar"
            chunk = patients[first:last]
            with wds.TarWriter(str(root / name)) as sink:
                for p in chunk:
                    sink.write(sample_dict(p, split))
            data = (root / name).read_bytes()
            entries.append(
                {
                    "name": name,
                    "split": split,
                    "count": len(chunk),
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
    manifest = {
        "format": "retclip-shards/1",
        "tool_version": "fixtures",
        "options": {"per_shard": per_shard if isinstance(per_shard, int) else sizes},
        "splits": {
            split: {
                "shards": sum(e["split"] == split for e in entries),
                "samples": sum(e["count"] for e in entries if e["split"] == split),
                "bytes": sum(e["bytes"] for e in entries if e["split"] == split),
            }
            for split in splits
        },
        "shards": entries,
        "rejected": {},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def tiny_tokenizer() -> BertTokenizerFast:
    """A WordPiece tokenizer over a handful of words, enough to tokenise the fake reports."""
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "patient",
        "mild",
        "changes",
        "grade",
        "left",
        "right",
    ]
    words += ["eye", ":", ",", '"', *(str(d) for d in range(10)), *(f"##{d}" for d in range(10))]
    return wordpiece_tokenizer({w: i for i, w in enumerate(words)})
