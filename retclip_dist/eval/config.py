"""Configuration of ``retclip-eval``: one dataclass per concern, built by retclip_dist.config.load_config.

Every subcommand reads the same object, so ``--data.table labels.csv --features.head left`` means the
same thing whether the run embeds, zero-shot classifies, probes or fine-tunes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

# Where image features come from. "projected": the shared projection of the tower output (width D,
# un-normalised), the feature the release's own linear probes (eval_*.py) use; "tower": the vision tower's
# pooled output before it (width W); "laterality": the left or right head, per row, from the laterality
# column; "left"/"right": every image through that head; "patient": the image given as both eyes to the
# patient head; "auto": "projected", except for zero-shot, which needs text-aligned features and uses
# "laterality".
Head = Literal["auto", "projected", "tower", "laterality", "left", "right", "patient"]


@dataclass
class DataConfig:
    table: str = ""  # CSV or JSONL of labelled single-eye images, one row per image
    images: str = ""  # image root: directory, .zip, .tar, .tar.gz, s3:// prefix, or a shard set directory
    image_column: str = "image"  # column holding the image path inside the root
    label_column: str = "label"  # single-label column (ignored when label_columns is set)
    label_columns: list[str] = field(default_factory=list)  # 0/1 columns of a multi-label task
    classes: list[str] = field(default_factory=list)  # class order; empty = sorted labels found
    id_column: str = "id"  # optional row id column; rows without it are named by their image path
    split_column: str = "split"  # optional column with train/val/test
    laterality_column: str = "laterality"  # optional column: left/right (also L/R, OS/OD)
    train_split: str = "train"  # split the probe/fine-tune is fitted on
    val_split: str = "val"  # split hyper-parameters and early stopping are chosen on
    test_split: str = "test"  # split the reported metrics come from
    eval_split: str | None = None  # features/zero-shot: only this split; None = every row
    strict: bool = (
        False  # refuse a row without a label (NaN, NA, empty...) instead of dropping and counting it
    )


@dataclass
class FeatureConfig:
    head: Head = "auto"  # which projection produces the image features (see Head)
    batch_size: int = 64  # images per forward pass
    device: str = "auto"  # "auto" = cuda when available, else cpu
    output: str = "features.safetensors"  # features subcommand: file name in output_dir (.safetensors/.npz)


@dataclass
class ZeroShotConfig:
    prompts: str = ""  # YAML of templates + phrases per class; features embeds them too when set
    context_length: int = 64  # prompt token budget (longer prompts are truncated)


@dataclass
class ProbeConfig:
    c_grid: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0])  # inverse L2
    select_metric: str = "macro_auroc"  # validation metric that picks C
    max_iter: int = 2000  # lbfgs iterations per fit


@dataclass
class FinetuneConfig:
    epochs: int = 20  # upper bound; early stopping usually ends sooner
    patience: int = 3  # epochs without validation improvement before stopping
    lr: float = 1e-4  # AdamW learning rate for tower and head
    weight_decay: float = 0.05  # AdamW weight decay
    batch_size: int = 32  # images per optimiser step
    select_metric: str = "macro_auroc"  # validation metric for early stopping and the kept weights
    seed: int = 0  # head init and batch order
    precision: Literal["no", "fp16", "bf16"] = "no"  # Accelerate mixed precision
    resume: bool = True  # continue from the newest checkpoint in output_dir/checkpoints if there is one


@dataclass
class EvalConfig:
    model: str = ""  # directory written by RetClip.save_pretrained
    output_dir: str = "eval_out"  # where results, features and checkpoints go
    data: DataConfig = field(default_factory=DataConfig)  # labelled input
    features: FeatureConfig = field(default_factory=FeatureConfig)  # embedding options
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)  # zero-shot options
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # linear-probe options
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # fine-tuning options

    # Old spellings still read (with a warning): output_dir was out_dir, unlike every other tool's.
    RENAMED: ClassVar[dict[str, str]] = {"out_dir": "output_dir"}
