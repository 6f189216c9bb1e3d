"""The four evaluations, each ``run_*(cfg) -> result dict``, writing its files under cfg.output_dir.

Results share one shape: method, model, table, split, ``features_from`` (which head made the features,
with row counts), the metrics, and method-specific details. The CLI and the demo both call these.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from retclip_dist.eval.config import EvalConfig
from retclip_dist.eval.data import LabelledSet, load_images, read_labelled
from retclip_dist.eval.features import (
    describe,
    features_for,
    image_size,
    load_model,
    pick_device,
    save_features,
)
from retclip_dist.eval.finetune import finetune, predict
from retclip_dist.eval.metrics import compute_metrics
from retclip_dist.eval.probe import ProbeFit, fit_probe, predict_probs
from retclip_dist.eval.report import write_result
from retclip_dist.eval.zeroshot import check_classes, class_embeddings, load_prompts, zero_shot_probs
from retclip_dist.model.retclip import RetClip

log = logging.getLogger(__name__)


def _selected(lset: LabelledSet, split: str | None) -> LabelledSet:
    return lset if split is None else lset.subset(split)


def probe_splits(lset: LabelledSet, cfg: EvalConfig) -> tuple[LabelledSet, LabelledSet, LabelledSet]:
    """train/val/test, each with both outcomes present, and every class learnable from train."""
    parts = [lset.subset(s) for s in (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split)]
    for part, name in zip(
        parts, (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split), strict=True
    ):
        part.check_both_outcomes(name)
    lset.check_trainable(parts[0])
    return parts[0], parts[1], parts[2]


def _result(
    method: str, cfg: EvalConfig, lset: LabelledSet, split: str | None, heads: list[str], metrics: dict
) -> dict[str, Any]:
    return {
        "method": method,
        "model": cfg.model,
        "table": cfg.data.table,
        "split": split or "all",
        "features_from": describe(heads),
        "missing_labels": lset.missing_labels(),
        "metrics": metrics,
    }


def run_features(cfg: EvalConfig) -> dict[str, Any]:
    """Embed the images (and, if the prompt file exists for the classes, the class prompts) to a file."""
    model = load_model(cfg.model, pick_device(cfg.features.device))
    lset = _selected(read_labelled(cfg.data), cfg.data.eval_split)
    images = load_images(lset, image_size(model))
    features, heads = features_for(model, lset, images, cfg.features, zero_shot=False)
    arrays = {"image_features": features.numpy(), "labels": lset.labels()}
    if cfg.zero_shot.prompts and not lset.multilabel:
        prompts = load_prompts(cfg.zero_shot.prompts)
        check_classes(lset, prompts, cfg.zero_shot.prompts)
        for head, emb in class_embeddings(
            model, prompts, list(lset.classes), cfg.zero_shot.context_length
        ).items():
            arrays[f"class_features_{head}"] = emb.numpy()
    metadata = {
        "model": cfg.model,
        "table": cfg.data.table,
        "features_from": describe(heads),
        "heads": ",".join(heads),
        "classes": ",".join(lset.classes),
    }
    path = save_features(
        f"{cfg.output_dir}/{cfg.features.output}", arrays, [r.id for r in lset.rows], metadata
    )
    log.info("wrote %s (%d rows, features from %s)", path, len(lset), describe(heads))
    return {
        "method": "features",
        "path": str(path),
        "rows": len(lset),
        "features_from": describe(heads),
        "missing_labels": lset.missing_labels(),
    }


def run_zero_shot(cfg: EvalConfig) -> dict[str, Any]:
    """Classify by similarity to averaged class prompts; the class order is the prompt file's."""
    if not cfg.zero_shot.prompts:
        raise ValueError(
            "zero-shot needs --zero_shot.prompts, a YAML of class prompts (see configs/prompts_synth.yaml)"
        )
    prompts = load_prompts(cfg.zero_shot.prompts)
    data_cfg = cfg.data if cfg.data.classes else dataclasses.replace(cfg.data, classes=list(prompts))
    lset = _selected(read_labelled(data_cfg), cfg.data.eval_split)
    check_classes(lset, prompts, cfg.zero_shot.prompts)
    model = load_model(cfg.model, pick_device(cfg.features.device))
    features, heads = features_for(
        model, lset, load_images(lset, image_size(model)), cfg.features, zero_shot=True
    )
    emb = class_embeddings(model, prompts, list(lset.classes), cfg.zero_shot.context_length)
    probs = zero_shot_probs(model, features, heads, emb).numpy()
    labels = lset.labels()
    result = _result(
        "zero-shot",
        cfg,
        lset,
        cfg.data.eval_split,
        heads,
        compute_metrics(labels, probs, list(lset.classes), False),
    )
    result["prompts"] = cfg.zero_shot.prompts
    write_result(result, labels, probs, cfg.output_dir)
    return result


@dataclass
class ProbeOutcome:
    metrics: dict[str, Any]  # compute_metrics of the test split
    fit: ProbeFit  # the chosen C and the validation curve
    heads: list[str]  # per-row heads of train, val and test, in that order
    labels: np.ndarray  # test labels
    probs: np.ndarray  # test probabilities, columns in class order


def probe_model(
    model: RetClip,
    lset: LabelledSet,
    parts: tuple[LabelledSet, LabelledSet, LabelledSet],
    images: tuple[Tensor, Tensor, Tensor],
    cfg: EvalConfig,
) -> ProbeOutcome:
    """Linear probe of ``model``'s image features: fit on train, C on val, metrics on test.

    ``parts`` are ``lset``'s train/val/test (``probe_splits``), ``images`` their decoded photos. The model is
    used as it is (eval mode is the caller's business): the trainer probes its live model with this too.
    """
    embedded = [
        features_for(model, part, imgs, cfg.features, zero_shot=False)
        for part, imgs in zip(parts, images, strict=True)
    ]
    (train, val, test), classes = [f.numpy() for f, _ in embedded], list(lset.classes)
    fit = fit_probe((train, parts[0].labels()), (val, parts[1].labels()), classes, lset.multilabel, cfg.probe)
    probs = predict_probs(fit.classifier, test)
    labels = parts[2].labels()
    metrics = compute_metrics(labels, probs, classes, lset.multilabel)
    return ProbeOutcome(metrics, fit, [h for _, heads in embedded for h in heads], labels, probs)


def run_linear_probe(cfg: EvalConfig) -> dict[str, Any]:
    """Logistic regression on frozen features of train; C picked on val; metrics on test."""
    lset = read_labelled(cfg.data)
    parts = probe_splits(lset, cfg)
    model = load_model(cfg.model, pick_device(cfg.features.device))
    size = image_size(model)
    images = (load_images(parts[0], size), load_images(parts[1], size), load_images(parts[2], size))
    outcome = probe_model(model, lset, parts, images, cfg)
    result = _result("linear-probe", cfg, lset, cfg.data.test_split, outcome.heads, outcome.metrics)
    fit = outcome.fit
    result["probe"] = {"C": fit.c, "select_metric": cfg.probe.select_metric, "validation": fit.validation}
    write_result(result, outcome.labels, outcome.probs, cfg.output_dir)
    return result


def run_finetune(cfg: EvalConfig) -> dict[str, Any]:
    """Fine-tune tower + linear head on train, early-stopped on val; metrics on test."""
    if cfg.features.head not in ("auto", "tower"):
        raise ValueError(
            f"finetune trains the vision tower under a new head; features.head {cfg.features.head!r} must be auto or tower"
        )
    lset = read_labelled(cfg.data)
    train, val, test = probe_splits(lset, cfg)
    model = load_model(cfg.model, pick_device(cfg.features.device))
    size = image_size(model)
    classes = list(lset.classes)
    net, progress = finetune(
        model.visual,
        (load_images(train, size), train.labels()),
        (load_images(val, size), val.labels()),
        classes,
        lset.multilabel,
        cfg.finetune,
        cfg.output_dir,
        model.image_input,
    )
    probs = predict(net, load_images(test, size), lset.multilabel, cfg.finetune.batch_size, model.image_input)
    labels = test.labels()
    heads = ["tower"] * len(lset)
    result = _result(
        "finetune",
        cfg,
        lset,
        cfg.data.test_split,
        heads,
        compute_metrics(labels, probs, classes, lset.multilabel),
    )
    result["finetune"] = {
        "epochs_run": progress.epoch,
        "best_epoch": progress.best_epoch,
        "select_metric": cfg.finetune.select_metric,
        "history": progress.history,
    }
    write_result(result, labels, probs, cfg.output_dir)
    return result


COMMANDS = {
    "features": run_features,
    "zero-shot": run_zero_shot,
    "linear-probe": run_linear_probe,
    "finetune": run_finetune,
}
