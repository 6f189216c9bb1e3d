"""Image features of single-eye images from a trained RetClip, and the record of where they came from.

Single images have no partner eye, so there is a choice to make, and it matters: users of the public
release found that the same photo fed as a left eye or as a right eye gives very different outputs
(sStonemason/RET-CLIP issue 2). The default is the shared projection of the vision tower (D-wide), the
feature the release's linear probes use; the left/right heads are used per row when a laterality column
says which eye a photo shows.
Every result carries ``features_from`` so that numbers from different choices are never mixed up.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file
from torch import Tensor

from retclip_dist.eval.config import FeatureConfig
from retclip_dist.eval.data import LabelError, LabelledSet
from retclip_dist.model.config import ImageInput
from retclip_dist.model.retclip import RetClip


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(directory: str, device: torch.device) -> RetClip:
    """A save_pretrained directory, in eval mode on ``device``."""
    if not directory:
        raise ValueError("set --model to a directory written by RetClip.save_pretrained")
    return RetClip.from_pretrained(directory).to(device).eval()


def image_size(model: RetClip) -> int:
    """Input side length of the vision tower, as the model states it (``RetClip.image_input``)."""
    return model.image_input.size


def normalise(images: Tensor, spec: ImageInput) -> Tensor:
    """uint8 [n, 3, h, w] -> float normalised with the model's mean and std (``RetClip.image_input``)."""
    mean = torch.tensor(spec.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def resolve_head(head: str, zero_shot: bool) -> str:
    """The concrete head for ``auto``: the shared projection, except zero-shot, which needs text-aligned
    features."""
    if head != "auto":
        return head
    return "laterality" if zero_shot else "projected"


def row_heads(lset: LabelledSet, head: str) -> list[str]:
    """Per-row head among projected/tower/left/right/patient; ``laterality`` needs every row's eye."""
    if head != "laterality":
        return [head] * len(lset)
    missing = [r for r in lset.rows if r.laterality is None]
    if missing:
        raise LabelError(
            f"{missing[0].source}: features.head=laterality but the row has no laterality "
            f"({len(missing)} such rows); add a laterality column or pick --features.head "
            "left|right|projected|tower"
        )
    return [r.laterality for r in lset.rows]


def describe(heads: list[str]) -> str:
    """Human-readable origin of a feature matrix, e.g. 'left head (12), right head (8)'."""
    counts = Counter(heads)
    names = {
        "projected": "shared projection",
        "tower": "vision tower",
        "left": "left head",
        "right": "right head",
        "patient": "patient head",
    }
    return ", ".join(f"{names[h]} ({counts[h]})" for h in sorted(counts))


def _projector(model: RetClip, head: str) -> Callable[[Tensor], Tensor]:
    if head == "tower":
        return lambda pooled: pooled
    if head == "projected":
        return model.image_proj
    if head == "patient":
        # One photo stands in for both eyes: the patient head sees [v, v].
        return lambda pooled: F.normalize(
            model.image_patient(torch.cat([model.image_proj(pooled)] * 2, dim=-1)), dim=-1
        )
    layer = model.image_left if head == "left" else model.image_right
    return lambda pooled: F.normalize(layer(model.image_proj(pooled)), dim=-1)


@torch.inference_mode()
def embed_images(model: RetClip, images: Tensor, heads: list[str], batch_size: int) -> Tensor:
    """Features [n, W] (tower) or [n, D] (projected, heads) in row order; only the left and right heads mix
    (laterality), since the others are different spaces."""
    if len(set(heads)) > 1 and not set(heads) <= {"left", "right"}:
        raise ValueError(f"features from {sorted(set(heads))} cannot be mixed in one matrix")
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        batch = normalise(images[start : start + batch_size].to(device), model.image_input)
        pooled = model.embed_eye(batch)
        rows = heads[start : start + batch_size]
        projected = torch.empty(
            (len(rows), pooled.shape[1] if rows[0] == "tower" else model.config.embed_dim), device=device
        )
        for head in set(rows):
            mask = torch.tensor([h == head for h in rows], device=device)
            projected[mask] = _projector(model, head)(pooled[mask])
        out.append(projected.float().cpu())
    return torch.cat(out)


def save_features(
    path: str | Path, arrays: dict[str, np.ndarray], ids: list[str], metadata: dict[str, str]
) -> Path:
    """Write features with their row ids: .safetensors (ids in the header metadata) or .npz (an array)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(
            {k: np.ascontiguousarray(v) for k, v in arrays.items()},
            str(path),
            {**metadata, "ids": json.dumps(ids)},
        )
    elif path.suffix == ".npz":
        np.savez(path, ids=np.array(ids), **arrays, **{f"meta_{k}": np.array(v) for k, v in metadata.items()})
    else:
        raise ValueError(f"features output {path}: use a .safetensors or .npz file name")
    return path


def features_for(
    model: RetClip, lset: LabelledSet, images: Tensor, cfg: FeatureConfig, zero_shot: bool
) -> tuple[Tensor, list[str]]:
    """Embed ``images`` (rows of ``lset``) with the configured head; returns (features, per-row heads)."""
    heads = row_heads(lset, resolve_head(cfg.head, zero_shot))
    if zero_shot and {"tower", "projected"} & set(heads):
        raise ValueError(
            "zero-shot compares images with text, so features.head cannot be 'tower' or 'projected'"
        )
    return embed_images(model, images, heads, cfg.batch_size), heads
