"""The model card: README.md beside a saved model's weights, as the Hugging Face hub reads one.

YAML front matter (license, tags, library, pipeline tag), then what a reader needs to trust the weights:
the architecture, and for a trained model the data as counts, the recipe, steps and time and the last
validation recall (``TrainingSummary``, filled by the trainer), then a benchmark section that
``retclip-eval benchmark`` fills in place when it has run on the model.

Nothing identifying goes in: no patient id, no path, no host or user name. The card holds counts,
numbers, architecture names, closed choices and the shard set's split names; a changed setting whose
value is free text (a path, a tracker or project name) is listed by key with its value left out.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import nn

from retclip_dist.model.config import LEVELS

log = logging.getLogger(__name__)

README_FILE = "README.md"
# Markers around the benchmark section, so a rerun replaces it and edits elsewhere in the card survive.
BENCHMARK_START = "<!-- retclip-benchmark:start -->"
BENCHMARK_END = "<!-- retclip-benchmark:end -->"
FRONT_MATTER = {
    # The weights' terms are their owner's (the data's governance decides); the code is Apache-2.0.
    "license": "other",
    "library_name": "retclip-dist",
    "pipeline_tag": "zero-shot-image-classification",
    "tags": ["retclip", "clip", "retina", "fundus", "ophthalmology", "medical-imaging"],
}


@dataclass(frozen=True)
class SplitCount:
    split: str  # split name in the shard manifest
    patients: int  # patients (samples) in the split
    shards: int  # tar shards holding them


@dataclass(frozen=True)
class TrainingSummary:
    """What the trainer knew about the run, as counts and settings only (train/run_summary.py)."""

    splits: list[SplitCount]  # the shard set's splits
    pseudonymised: bool  # the shard set's ids were keyed hashes (make-shards --pseudonymise)
    processes: int  # data-parallel processes (GPUs)
    steps: int  # optimiser steps taken
    epochs: int  # epochs completed
    patients_seen: int  # patients fed to the optimiser, over all epochs (steps x global batch)
    step_seconds: float | None  # time in training steps (data wait + step), summed over every segment
    recipe: list[tuple[str, str]]  # the headline settings, (name, value)
    changes_from: str  # what the changes are relative to: a shipped preset's name or the defaults
    changes: list[tuple[str, str]]  # (dotted key, value) where the run differs from changes_from
    withheld: list[str]  # dotted keys that differ but whose values are free text (paths, names)
    validation: dict[str, float] | None  # the last validation record's recall (level/metric -> value)
    validation_step: int | None  # the step of that record


def _params(module: nn.Module) -> str:
    count = sum(p.numel() for p in module.parameters())
    return f"{count / 1e6:.1f} M parameters" if count >= 100_000 else f"{count:,} parameters"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _architecture(model: nn.Module) -> list[str]:
    cfg, spec, text = model.config, model.image_input, model.text.config
    vision = f"`{cfg.vision_name}`" + (f" with {json.dumps(cfg.vision_kwargs)}" if cfg.vision_kwargs else "")
    scales = ", ".join(f"{level} {float(model.logit_scale[level].detach().exp()):.2f}" for level in LEVELS)
    heads = _params(
        nn.ModuleList(getattr(model, f"{side}_{level}") for side in ("image", "text") for level in LEVELS)
    )
    rows = [
        ("vision tower", f"timm {vision}, {model.visual.num_features} wide, {_params(model.visual)}"),
        (
            "image input",
            f"{spec.size} x {spec.size} px, {spec.interpolation}, mean {list(spec.mean)}, std {list(spec.std)}",
        ),
        (
            "text tower",
            f"{text.model_type}, {text.num_hidden_layers} layers, hidden {text.hidden_size}, "
            f"vocabulary {text.vocab_size}, {_params(model.text)}",
        ),
        ("embedding", f"D = {cfg.embed_dim}, shared image projection {model.visual.num_features} -> D"),
        ("heads", f"image: patient (both eyes), left, right; text: three MLPs on [CLS]; {heads}"),
        ("loss", f"{cfg.loss}; logit scales {scales}"),
    ]
    return ["## Architecture", "", *_table(("part", "what"), rows)]


def _training(summary: TrainingSummary) -> list[str]:
    splits = [(s.split, f"{s.patients:,}", f"{s.shards:,}") for s in summary.splits]
    lines = [
        "## Training data",
        "",
        "Counts only: one patient = a left-eye photo, a right-eye photo and a report.",
        "",
        *_table(("split", "patients", "shards"), splits),
        "",
        f"Patient ids in the shards were {'keyed pseudonyms' if summary.pseudonymised else 'the source ids'} "
        "(none appears in this card).",
        "",
        "## Recipe",
        "",
        *_table(("setting", "value"), summary.recipe),
        "",
        f"Settings that differ from {summary.changes_from}:",
        "",
    ]
    changes = [f"- `{key}`: {value}" for key, value in summary.changes] or ["- none"]
    lines += changes
    if summary.withheld:
        lines += ["", "Also changed, values left out (paths and names): " + ", ".join(summary.withheld) + "."]
    seconds = summary.step_seconds
    if seconds is None:
        took = "not recorded"
    elif seconds < 60:
        took = f"{seconds:.1f} s"
    elif seconds < 3600:
        took = f"{seconds / 60:.1f} min"
    else:
        took = f"{seconds / 3600:.2f} h"
    lines += [
        "",
        "## Steps and time",
        "",
        f"{summary.steps:,} optimiser steps, {summary.epochs} epochs completed, {summary.patients_seen:,} "
        f"patients fed, on {summary.processes} process(es). Time in training steps (data wait + step; "
        f"validation and checkpoints excluded, every resumed segment included): {took}.",
        "",
        "## Validation",
        "",
    ]
    if summary.validation is None:
        return [*lines, "No validation ran."]
    found = {key.split("/", 1)[1] for key in summary.validation if "/" in key}
    # validate.py's order: image->text, text->image, then the chance level, each by k.
    kinds = ("i2t", "t2i", "chance")

    def order(metric: str) -> tuple[int, int, str]:
        kind, _, k = metric.partition("_r")
        return (kinds.index(kind) if kind in kinds else len(kinds), int(k) if k.isdigit() else 0, metric)

    metrics = sorted(found, key=order)
    rows = [
        (level, *(f"{summary.validation[f'{level}/{m}']:.3f}" for m in metrics))
        for level in LEVELS
        if f"{level}/{metrics[0]}" in summary.validation
    ]
    samples = int(summary.validation.get("samples", 0))
    return [
        *lines,
        f"Retrieval recall on {samples:,} held-out patients after step {summary.validation_step:,} "
        "(a text with the same report as the patient's counts as a hit; chance = a random ranking's).",
        "",
        *_table(("level", *metrics), rows),
    ]


def _benchmark_section(table: str | None) -> list[str]:
    body = table.strip() if table else "`retclip-eval benchmark --model DIR` has not run on this model yet."
    return [BENCHMARK_START, "## Benchmark", "", body, BENCHMARK_END]


def _usage() -> list[str]:
    return [
        "## Use",
        "",
        "```python",
        "import retclip_dist",
        'model = retclip_dist.load("this/folder")',
        'features = model.embed_images(["eye.jpg"])',
        "```",
        "",
        "`retclip-eval export --model this/folder --format timm|open_clip --output_dir OUT` writes the vision",
        "tower for timm and RETFound's fine-tuning, or each eye level as an open_clip model.",
    ]


def render_card(model: nn.Module, summary: TrainingSummary | None, benchmark: str | None = None) -> str:
    """The card's full text for ``model`` (a RetClip), with the trainer's summary where there is one."""
    front = yaml.safe_dump(FRONT_MATTER, sort_keys=False, allow_unicode=True)
    lines = [
        "---",
        front.rstrip("\n"),
        "---",
        "",
        "# RET-CLIP retinal image-report model",
        "",
        "A CLIP-style model of colour fundus photographs and clinical reports (RET-CLIP, Du et al., MICCAI "
        "2024), trained with retclip-dist: one vision tower for both eyes, one text tower, contrastive "
        "features at patient, left-eye and right-eye level.",
        "",
        "License: set by the model's owner before sharing (the weights' terms follow the training data's "
        "governance); retclip-dist itself is Apache-2.0.",
        "",
        *_architecture(model),
        "",
    ]
    if summary is None:
        lines += [
            "No training summary: these weights were not written at the end of a retclip-train run.",
            "",
        ]
    else:
        lines += [*_training(summary), ""]
    lines += [*_benchmark_section(benchmark), "", *_usage()]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_card(directory: str | Path, model: nn.Module, summary: TrainingSummary | None) -> Path:
    """README.md in ``directory`` (save_pretrained calls this)."""
    path = Path(directory) / README_FILE
    _write_atomic(path, render_card(model, summary))
    return path


def record_benchmark(directory: str | Path, table: str, seeds: int, model: nn.Module | None = None) -> None:
    """``retclip-eval benchmark``'s results in the card of the model it ran on; a card that cannot be
    written (a read-only model folder) is a warning, never a failed benchmark. ``model`` is needed only
    for a folder without a card (one is written for it); without it, the saved model is read again."""
    intro = f"`retclip-eval benchmark`, {seeds} seed(s): mean [95% CI] per dataset and protocol.\n\n"
    try:
        if model is None and not (Path(directory) / README_FILE).is_file():
            from retclip_dist.model.retclip import RetClip  # retclip.py imports this module

            model = RetClip.from_pretrained(directory)
        set_benchmark(directory, model, intro + table)
    except OSError as exc:
        log.warning("the benchmark's table was not added to %s's model card: %s", directory, exc)


def set_benchmark(directory: str | Path, model: nn.Module | None, table: str) -> Path:
    """Put ``table`` (retclip-eval benchmark's results) into the card's benchmark section.

    Only the marked section is replaced, so the rest of the card (and a reader's edits) stay; a card
    without the markers gets the section appended, and a model without a card gets a new one.
    """
    path = Path(directory) / README_FILE
    section = "\n".join(_benchmark_section(table))
    if not path.is_file():
        _write_atomic(path, render_card(model, None, table))
        return path
    text = path.read_text(encoding="utf-8")
    start, end = text.find(BENCHMARK_START), text.find(BENCHMARK_END)
    if start != -1 and end > start:
        text = text[:start] + section + text[end + len(BENCHMARK_END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    _write_atomic(path, text)
    return path


def source_card_body(directory: str | Path) -> list[str]:
    """The card of the model in ``directory`` without its front matter and markers, headings one level
    down: what an export's own card quotes about where its weights came from."""
    path = Path(directory) / README_FILE
    if not path.is_file():
        return ["The source model has no card."]
    text = path.read_text(encoding="utf-8")
    if text.startswith("---\n"):
        text = text.split("\n---\n", 1)[1] if "\n---\n" in text else text
    kept = [line for line in text.strip().splitlines() if line not in (BENCHMARK_START, BENCHMARK_END)]
    kept = [line for line in kept if not line.startswith("# ")]  # its title: the export's card has its own
    while kept and not kept[0].strip():
        kept.pop(0)
    return [("#" + line if line.startswith("#") else line) for line in kept]


def export_card(front: dict[str, object], title: str, usage: list[str], source: str | Path) -> str:
    """README.md of an export (retclip-eval export): its own front matter, how to load it, then the
    source model's card."""
    meta = {"license": FRONT_MATTER["license"], **front}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip("\n"), "---", "", f"# {title}", ""]
    source_lines = ["## The RET-CLIP model it was exported from", "", *source_card_body(source)]
    return "\n".join([*lines, *usage, "", *source_lines]) + "\n"
