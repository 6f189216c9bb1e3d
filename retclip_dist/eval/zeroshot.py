"""Zero-shot classification: each class is the average text embedding of its prompts.

The prompt file names, per class, a few phrases; every phrase is put into every template and the
resulting prompts are embedded by the text head that matches the image head (left image head with left
text head, and so on), averaged per class and re-normalised.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from retclip_dist.data.samples import clean_report
from retclip_dist.eval.data import LabelError, LabelledSet
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.tokenizer import build_tokenizer


def load_prompts(path: str | Path) -> dict[str, list[str]]:
    """``{"templates": [...with "{}"...], "classes": {name: [phrases]}}`` -> {class: prompts}."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read prompt file {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("classes"), dict) or not data["classes"]:
        raise ValueError(f"prompt file {path}: needs a non-empty 'classes' mapping of class -> phrases")
    templates = data.get("templates") or ["{}"]
    for template in templates:
        if not isinstance(template, str) or "{}" not in template:
            raise ValueError(f"prompt file {path}: template {template!r} has no '{{}}' for the phrase")
    prompts: dict[str, list[str]] = {}
    for name, phrases in data["classes"].items():
        if isinstance(phrases, str):
            phrases = [phrases]
        if not phrases or not all(isinstance(p, str) and p.strip() for p in phrases):
            raise ValueError(f"prompt file {path}: class {name!r} needs a list of non-empty phrases")
        prompts[str(name)] = [t.format(p) for t in templates for p in phrases]
    return prompts


@torch.inference_mode()
def class_embeddings(
    model: RetClip, prompts: dict[str, list[str]], classes: list[str], context_length: int
) -> dict[str, Tensor]:
    """{head: [C, D]} normalised class embeddings for the left, right and patient text heads."""
    device = next(model.parameters()).device
    tokenizer = build_tokenizer(model.config)
    # The same normalisation as the training reports, or curly quotes would become [UNK].
    flat = [clean_report(p) for name in classes for p in prompts[name]]
    tokens = tokenizer(flat, padding=True, truncation=True, max_length=context_length, return_tensors="pt")
    levels = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
    owner = torch.tensor([i for i, name in enumerate(classes) for _ in prompts[name]], device=device)
    out = {}
    for head in ("patient", "left", "right"):
        per_prompt = getattr(levels, head)
        means = torch.stack([per_prompt[owner == i].mean(dim=0) for i in range(len(classes))])
        out[head] = F.normalize(means, dim=-1).float().cpu()
    return out


def check_classes(lset: LabelledSet, prompts: dict[str, list[str]], prompt_file: str) -> None:
    """Every label of the data needs prompts; the first row whose label has none is named."""
    if lset.multilabel:
        raise LabelError(f"{lset.table}: zero-shot classifies single-label tasks; this table is multi-label")
    for row in lset.rows:
        name = lset.classes[row.label[0]]
        if name not in prompts:
            raise LabelError(
                f"{row.source}: label {name!r} has no prompts in {prompt_file} ({sorted(prompts)})"
            )


def zero_shot_probs(
    model: RetClip, features: Tensor, heads: list[str], classes_emb: dict[str, Tensor]
) -> Tensor:
    """Softmax over classes of the head's logit scale times cosine similarity, row by row."""
    probs = torch.empty((features.shape[0], next(iter(classes_emb.values())).shape[0]))
    for head in set(heads):
        mask = torch.tensor([h == head for h in heads])
        scale = model.logit_scale[head].detach().exp().cpu()
        probs[mask] = (scale * features[mask] @ classes_emb[head].T).softmax(dim=-1)
    return probs
