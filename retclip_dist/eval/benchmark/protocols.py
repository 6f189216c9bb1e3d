"""One cell of the table: a protocol on one dataset split for one seed, giving test probabilities.

Features of a dataset are computed once and shared by its cells: the shared projection for probes
(single images), the patient head through both eyes for paired layouts (RetClip.encode_image), and for
zero-shot the text-aligned head (left/right by laterality when every row has one, else the patient
head with the photo as both eyes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retclip_dist.eval.benchmark.layouts import BenchSet
from retclip_dist.eval.benchmark.prompts import LANGUAGES, PromptPack
from retclip_dist.eval.benchmark.recipe import finetune_recipe
from retclip_dist.eval.benchmark.suite import Suite
from retclip_dist.eval.data import LabelledSet, load_images
from retclip_dist.eval.features import embed_images, image_size, normalise
from retclip_dist.eval.metrics import compute_metrics
from retclip_dist.eval.probe import fit_probe, predict_probs
from retclip_dist.eval.zeroshot import class_embeddings, zero_shot_probs
from retclip_dist.model.retclip import RetClip


@dataclass
class DatasetContext:
    """A dataset's decoded images and cached features, shared by all its cells."""

    bset: BenchSet
    model: RetClip
    batch_size: int
    _images: torch.Tensor | None = None
    _features: dict[str, tuple[np.ndarray, list[str]]] = field(default_factory=dict)

    @property
    def images(self) -> torch.Tensor:
        """uint8 [n, 3, s, s], or [n, 2, 3, s, s] (left, right) for a paired layout."""
        if self._images is None:
            size = image_size(self.model)
            left = load_images(self.bset.lset, size)
            if self.bset.right is None:
                self._images = left
            else:
                rows = tuple(
                    type(r)(r.id, ref, r.label, r.split, "right", r.source)
                    for r, ref in zip(self.bset.lset.rows, self.bset.right, strict=True)
                )
                lset = LabelledSet(
                    rows, self.bset.lset.classes, True, self.bset.lset.table, self.bset.lset.store
                )
                self._images = torch.stack([left, load_images(lset, size)], dim=1)
        return self._images

    def features(self, zero_shot: bool) -> tuple[np.ndarray, list[str]]:
        """(features [n, D], per-row head) for probes or for zero-shot."""
        key = "zero_shot" if zero_shot else "probe"
        if key not in self._features:
            if self.bset.paired:
                self._features[key] = (self._patient_pairs(), ["patient"] * len(self.bset.lset))
            else:
                rows = self.bset.lset.rows
                if not zero_shot:
                    heads = ["projected"] * len(rows)
                elif all(r.laterality for r in rows):
                    heads = [str(r.laterality) for r in rows]
                else:
                    heads = ["patient"] * len(rows)
                feats = embed_images(self.model, self.images, heads, self.batch_size).numpy()
                self._features[key] = (feats, heads)
        return self._features[key]

    @torch.inference_mode()
    def _patient_pairs(self) -> np.ndarray:
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(self.images), self.batch_size):
            pair = normalise(self.images[start : start + self.batch_size].to(device), self.model.image_input)
            out.append(self.model.encode_image(pair[:, 0], pair[:, 1]).patient.float().cpu())
        return torch.cat(out).numpy()


def _zs_probs(
    model: RetClip, feats: np.ndarray, heads: list[str], emb: dict[str, torch.Tensor], multilabel: bool
) -> np.ndarray:
    features = torch.from_numpy(feats)
    if not multilabel:
        return zero_shot_probs(model, features, heads, emb).numpy()
    # Labels are not exclusive: each label scores against the mean of all labels, per image.
    probs = torch.empty((len(heads), next(iter(emb.values())).shape[0]))
    for head in set(heads):
        mask = torch.tensor([h == head for h in heads])
        sims = features[mask] @ emb[head].T
        scale = model.logit_scale[head].detach().exp().cpu()
        probs[mask] = (scale * (sims - sims.mean(dim=1, keepdim=True))).sigmoid()
    return probs.numpy()


def zero_shot(
    ctx: DatasetContext, lset: LabelledSet, index: dict[str, np.ndarray], pack: PromptPack, suite: Suite
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Test probabilities from the suite language's whole pack, and the AUROC of every single template."""
    feats, heads = ctx.features(zero_shot=True)
    test = index["test"]
    feats, heads = feats[test], [heads[i] for i in test]
    classes = list(lset.classes)
    labels = lset.labels()[test]

    def probs_for(prompts: dict[str, list[str]]) -> np.ndarray:
        emb = class_embeddings(ctx.model, prompts, classes, suite.zero_shot.context_length)
        return _zs_probs(ctx.model, feats, heads, emb, lset.multilabel)

    probs = probs_for(pack.prompts(suite.zero_shot.language, classes))
    per_template = []
    for language in LANGUAGES:
        for template in pack.templates[language]:
            p = probs_for(pack.prompts(language, classes, template))
            auroc = compute_metrics(labels, p, classes, lset.multilabel)["overall"]["macro_auroc"]
            per_template.append({"language": language, "template": template, "auroc": auroc})
    return probs, per_template


def _probe(
    feats: np.ndarray,
    labels: np.ndarray,
    train: np.ndarray,
    index: dict[str, np.ndarray],
    lset: LabelledSet,
    suite: Suite,
) -> np.ndarray:
    classes = list(lset.classes)
    fit = fit_probe(
        (feats[train], labels[train]),
        (feats[index["val"]], labels[index["val"]]),
        classes,
        lset.multilabel,
        suite.probe,
    )
    probs = predict_probs(fit.classifier, feats[index["test"]])
    if lset.multilabel or probs.shape[1] == len(classes):
        return probs
    # A class absent from the training rows gets probability 0 (its column is missing otherwise).
    full = np.zeros((len(index["test"]), len(classes)))
    full[:, fit.classifier[-1].classes_] = probs
    return full


def linear_probe(
    ctx: DatasetContext, lset: LabelledSet, index: dict[str, np.ndarray], suite: Suite
) -> np.ndarray:
    feats, _ = ctx.features(zero_shot=False)
    return _probe(feats, lset.labels(), index["train"], index, lset, suite)


def few_shot_draw(
    labels: np.ndarray, train: np.ndarray, shots: int, seed: int, multilabel: bool
) -> np.ndarray:
    """Class-balanced draw from ``train``: ``shots`` rows per class (all when fewer), seeded by (seed,
    shots); multi-label: ``shots`` positives per label, the union."""
    rng = np.random.default_rng([seed, shots])
    n_classes = labels.shape[1] if multilabel else int(labels.max()) + 1
    picked: list[int] = []
    for c in range(n_classes):
        members = train[labels[train, c] == 1] if multilabel else train[labels[train] == c]
        members = np.array([m for m in members if m not in picked], dtype=np.int64)
        if len(members):
            picked.extend(rng.choice(members, size=min(shots, len(members)), replace=False).tolist())
    return np.array(sorted(picked), dtype=np.int64)


def few_shot(
    ctx: DatasetContext, lset: LabelledSet, index: dict[str, np.ndarray], suite: Suite, shots: int, seed: int
) -> np.ndarray:
    """Linear probe on a class-balanced draw of the training rows; C still chosen on the full val."""
    feats, _ = ctx.features(zero_shot=False)
    labels = lset.labels()
    drawn = few_shot_draw(labels, index["train"], shots, seed, lset.multilabel)
    return _probe(feats, labels, drawn, index, lset, suite)


def finetune(
    ctx: DatasetContext,
    lset: LabelledSet,
    index: dict[str, np.ndarray],
    suite: Suite,
    seed: int,
    checkpoints: Path | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    return finetune_recipe(
        ctx.model,
        ctx.images,
        lset.labels(),
        index,
        list(lset.classes),
        lset.multilabel,
        suite.finetune,
        seed,
        checkpoints,
    )
