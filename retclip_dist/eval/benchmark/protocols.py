"""One cell of the table: a protocol on one dataset split for one seed, giving test probabilities.

Features of a dataset are computed once per model and shared by its cells. What they are is the model
adapter's business (eval/models): for ours the shared projection for probes on single images, the
patient head through both eyes for paired layouts and the text-aligned heads for zero-shot; for other
models the feature their authors' own probes read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retclip_dist.eval.benchmark.layouts import BenchSet
from retclip_dist.eval.benchmark.prompts import PromptPack
from retclip_dist.eval.benchmark.recipe import finetune_recipe
from retclip_dist.eval.benchmark.suite import Suite
from retclip_dist.eval.data import LabelledSet, load_images
from retclip_dist.eval.metrics import compute_metrics
from retclip_dist.eval.models.base import BenchModel
from retclip_dist.eval.probe import fit_probe, predict_probs


@dataclass
class DatasetContext:
    """A dataset's decoded images (as the model's authors preprocess them) and the model's cached
    features, shared by all its cells."""

    bset: BenchSet
    model: BenchModel
    batch_size: int
    _images: torch.Tensor | None = None
    _features: dict[str, tuple[np.ndarray, list[str]]] = field(default_factory=dict)

    @property
    def images(self) -> torch.Tensor:
        """uint8 [n, 3, s, s], or [n, 2, 3, s, s] (left, right) for a paired layout."""
        if self._images is None:
            spec = self.model.image_input
            left = load_images(self.bset.lset, spec)
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
                self._images = torch.stack([left, load_images(lset, spec)], dim=1)
        return self._images

    def features(self, zero_shot: bool) -> tuple[np.ndarray, list[str]]:
        """(features [n, F], per-row head) for probes or for zero-shot."""
        key = "zero_shot" if zero_shot else "probe"
        if key not in self._features:
            model, n = self.model, len(self.bset.lset)
            if zero_shot and self.bset.paired:
                self._features[key] = model.zero_shot_pair_features(self.images, self.batch_size)
            elif zero_shot:
                lateralities = [r.laterality for r in self.bset.lset.rows]
                self._features[key] = model.zero_shot_features(self.images, lateralities, self.batch_size)
            elif self.bset.paired:
                self._features[key] = (model.pair_features(self.images, self.batch_size), ["pair"] * n)
            else:
                self._features[key] = (model.probe_features(self.images, self.batch_size), ["image"] * n)
        return self._features[key]


def zero_shot(
    ctx: DatasetContext, lset: LabelledSet, index: dict[str, np.ndarray], pack: PromptPack, suite: Suite
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Test probabilities from the model's headline language (the suite's, where its text tower reads
    it) over the whole pack, and the AUROC of every single template of every language it reads."""
    model = ctx.model
    feats, heads = ctx.features(zero_shot=True)
    test = index["test"]
    feats, heads = feats[test], [heads[i] for i in test]
    classes = list(lset.classes)
    labels = lset.labels()[test]

    def probs_for(prompts: dict[str, list[str]]) -> np.ndarray:
        emb = model.class_embeddings(prompts, classes, suite.zero_shot.context_length)
        return model.zero_shot_probs(feats, heads, emb, lset.multilabel)

    def prompts_for(language: str, template: str) -> dict[str, list[str]]:
        return pack.prompts(language, classes, template)

    def all_prompts(language: str) -> dict[str, list[str]]:
        per_template = [prompts_for(language, t) for t in model.templates(pack.templates[language])]
        return {c: [p for prompts in per_template for p in prompts[c]] for c in classes}

    probs = probs_for(all_prompts(model.zero_shot_language(suite.zero_shot.language)))
    per_template = []
    for language in model.languages:
        for template in model.templates(pack.templates[language]):
            p = probs_for(prompts_for(language, template))
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
