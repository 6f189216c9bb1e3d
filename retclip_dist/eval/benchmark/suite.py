"""The suite file: which models, on which datasets in which published layout, under which protocols and
seeds.

One YAML file, parsed by retclip_dist.config.from_dict into the dataclasses below, so an unknown key or
a wrong type is one error naming the field (``datasets[1].layout: 'aptos' is not one of [...]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from retclip_dist.config import ConfigError, from_dict, parse_yaml
from retclip_dist.eval.config import ProbeConfig

Layout = Literal["retfound_split", "aptos2019", "idrid", "messidor2", "rfmid", "odir5k", "table"]
Protocol = Literal["zero_shot", "linear_probe", "few_shot", "finetune"]
PROTOCOLS: tuple[str, ...] = ("zero_shot", "linear_probe", "few_shot", "finetune")


@dataclass
class DatasetSpec:
    name: str = ""  # row name in the table; also names the predictions files (no '/' or spaces)
    layout: Layout = "table"  # which published layout root holds (see layouts.py)
    root: str = ""  # local directory of the dataset as published (never downloaded)
    prompts: str = ""  # zero-shot prompt pack; empty = the layout's pack in configs/prompts/
    options: dict[str, Any] = field(default_factory=dict)  # layout options (see layouts.py *Options)


@dataclass
class ModelSpec:
    # Row name in the table and folder of the model's predictions (no '/' or spaces). The first model of
    # the suite is the baseline every other one is compared with (paired differences).
    name: str = ""
    kind: str = "retclip"  # adapter that loads it (one of retclip_dist.eval.models.registry.ADAPTERS)
    path: str = ""  # local weights, never downloaded: a save_pretrained directory (retclip) or a file
    arch: str = ""  # architecture name, for the open_clip (e.g. ViT-B-16) and timm (e.g. convnext_base) kinds
    options: dict[str, Any] = field(default_factory=dict)  # adapter options (each adapter's Options)
    prompts: dict[str, str] = field(default_factory=dict)  # dataset name -> prompt pack for this model


@dataclass
class SplitConfig:
    # Official splits are kept; what a layout does not publish is drawn per seed, grouped by patient.
    val_fraction: float = 0.2  # share of patients drawn for validation (from train when test is official)
    test_fraction: float = 0.2  # share of patients drawn for test when the layout has no test labels


@dataclass
class FewShotConfig:
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # training images per class


@dataclass
class ZeroShotSpec:
    language: Literal["en", "zh"] = "en"  # pack language of the headline zero-shot row
    context_length: int = 64  # prompt token budget of ours (FLAIR and open_clip use their own: 77)


@dataclass
class FinetuneRecipe:
    """RETFound's fine-tuning recipe (rmaphoh/RETFound_MAE main_finetune.py and its README command)."""

    epochs: int = 50  # training epochs; the best epoch on validation is kept
    warmup_epochs: int = 10  # linear warmup from 0 to the peak lr, then a half-cosine to min_lr
    batch_size: int = 16  # images per device per step (RETFound's README command)
    blr: float = 5e-3  # base lr; peak lr = blr * batch_size * world_size / 256
    min_lr: float = 1e-6  # floor of the cosine schedule
    layer_decay: float = 0.65  # lr of block i is scaled by layer_decay ** (n_blocks + 1 - (i + 1))
    weight_decay: float = 0.05  # AdamW, not applied to biases, norms, position embedding, class token
    drop_path: float = 0.2  # stochastic depth rate of the last block (linearly from 0 at the first)
    smoothing: float = 0.1  # label smoothing of the cross-entropy (single-label tasks)
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment policy; "" = none
    reprob: float = 0.25  # random erasing probability (pixel mode, one box)
    select_metric: str = "macro_auroc"  # validation metric that picks the kept epoch
    precision: Literal["no", "fp16", "bf16"] = "no"  # Accelerate mixed precision


@dataclass
class Suite:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one run per seed; CI is over seeds
    protocols: list[Protocol] = field(default_factory=lambda: list(PROTOCOLS))  # columns of the table
    datasets: list[DatasetSpec] = field(default_factory=list)  # rows of the table
    # Models compared on every cell, the first one the baseline; --model on the command line replaces them.
    models: list[ModelSpec] = field(default_factory=list)
    splits: SplitConfig = field(default_factory=SplitConfig)  # drawn splits
    zero_shot: ZeroShotSpec = field(default_factory=ZeroShotSpec)  # zero-shot options
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # linear and few-shot probe options
    few_shot: FewShotConfig = field(default_factory=FewShotConfig)  # few-shot sizes
    finetune: FinetuneRecipe = field(default_factory=FinetuneRecipe)  # fine-tuning recipe
    batch_size: int = 64  # images per forward pass when embedding
    device: str = "auto"  # "auto" = cuda when available, else cpu


def _check(suite: Suite, where: str) -> Suite:
    if not suite.seeds:
        raise ConfigError(f"{where}: seeds: give at least one seed")
    if not suite.protocols:
        raise ConfigError(f"{where}: protocols: give at least one of {list(PROTOCOLS)}")
    if not suite.datasets:
        raise ConfigError(f"{where}: datasets: give at least one dataset")
    if len(set(suite.seeds)) != len(suite.seeds):
        raise ConfigError(f"{where}: seeds: {suite.seeds} repeats a seed")
    names: set[str] = set()
    for i, ds in enumerate(suite.datasets):
        if not ds.name or any(c in ds.name for c in "/\\ \t"):
            raise ConfigError(
                f"{where}: datasets[{i}].name: {ds.name!r} must be non-empty, without / or spaces"
            )
        if ds.name in names:
            raise ConfigError(f"{where}: datasets[{i}].name: {ds.name!r} is used twice")
        names.add(ds.name)
        if not ds.root:
            raise ConfigError(f"{where}: datasets[{i}].root: empty; give the dataset's local directory")
    check_models(suite.models, f"{where}: models")
    for i, model in enumerate(suite.models):
        unknown = sorted(set(model.prompts) - names)
        if unknown:
            raise ConfigError(f"{where}: models[{i}].prompts: no dataset named {unknown} in datasets")
    if any(k < 1 for k in suite.few_shot.shots) or not suite.few_shot.shots:
        raise ConfigError(f"{where}: few_shot.shots: {suite.few_shot.shots} must be positive integers")
    fractions = (suite.splits.val_fraction, suite.splits.test_fraction)
    if not all(0 < f < 1 for f in fractions) or sum(fractions) >= 1:
        raise ConfigError(f"{where}: splits: val_fraction and test_fraction must be in (0, 1) with sum < 1")
    if suite.finetune.epochs < 1 or suite.finetune.batch_size < 1:
        raise ConfigError(f"{where}: finetune: epochs and batch_size must be >= 1")
    return suite


def check_models(models: list[ModelSpec], where: str) -> None:
    """Names usable as folder names and unique, and a path for each (kinds are checked by the registry)."""
    names: set[str] = set()
    for i, model in enumerate(models):
        if not model.name or any(c in model.name for c in "/\\ \t"):
            raise ConfigError(f"{where}[{i}].name: {model.name!r} must be non-empty, without / or spaces")
        if model.name in names:
            raise ConfigError(f"{where}[{i}].name: {model.name!r} is used twice")
        names.add(model.name)
        if not model.path:
            raise ConfigError(f"{where}[{i}].path: empty; give the model's local weights")


def load_suite(path: str | Path) -> Suite:
    """Parse and check a suite file; a relative dataset root is taken relative to the suite file."""
    path = Path(path)
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read suite file {path}: {exc.strerror}") from exc
    except Exception as exc:  # yaml.YAMLError and its subclasses
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with seeds, protocols and datasets")
    try:
        suite = from_dict(Suite, data, where="suite")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    suite = _check(suite, str(path))
    for model in suite.models:
        model.path = _relative_to(path, model.path)
        model.prompts = {name: _relative_to(path, pack) for name, pack in model.prompts.items()}
    for ds in suite.datasets:
        ds.root = str((path.parent / ds.root).resolve()) if not Path(ds.root).is_absolute() else ds.root
        if ds.prompts and not Path(ds.prompts).is_absolute():
            ds.prompts = str((path.parent / ds.prompts).resolve())
    return suite


def _relative_to(suite_file: Path, value: str) -> str:
    """A path written in the suite file, relative to the file's folder unless absolute."""
    return value if Path(value).is_absolute() else str((suite_file.parent / value).resolve())
