"""Settings of the training and evaluation data path."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DataConfig:
    shards: str = "data/shards"  # shard set directory or its manifest.json, local path or s3:// URL
    storage_options: dict = field(
        default_factory=dict
    )  # fsspec options for remote shards (e.g. endpoint_url)
    train_split: str = "train"  # split name in the manifest used for training
    val_split: str | None = "val"  # held-out split for validation (None: no validation loader)
    batch_size: int = 256  # patients per rank per step
    num_workers: int = 8  # DataLoader worker processes per rank (0: read in the main process)
    prefetch_factor: int = 2  # batches each worker prepares ahead
    pin_memory: bool = True  # page-locked batches for faster host-to-GPU copies (CUDA only)
    shuffle_buffer: int = 1000  # samples held by each stream's shuffle buffer
    partitions: int | None = None  # data partitions; fixes data order across world sizes (None: world size)
    context_length: int = 100  # report tokens per sample at most (longer reports are truncated)
    # "batch": pad each batch to its longest report rounded up to TEXT_PAD_MULTIPLE (fewer tokens, same
    # loss); "max": always pad to context_length (one fixed text shape, e.g. for CUDA graphs)
    text_padding: Literal["batch", "max"] = "batch"
    eye_reports: bool = False  # also tokenise per-eye reports (patient report where an eye has none)
    augment_on: Literal["cpu", "device"] = "device"  # where the random augmentation runs
    # side of the square model input; null (default): the model's own (RetClip.image_input.size, set by
    # model.vision_name and model.vision_kwargs.img_size). A side set here only checks it: refused before
    # training when the model takes another
    image_size: int | None = None
    decode_size: int = 256  # side of the uint8 images handed to the device path
    crop_scale: tuple[float, float] = (0.9, 1.0)  # random resized crop: area fraction range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random resized crop: aspect ratio range
    jitter: float = 0.2  # brightness, contrast and saturation factors drawn from [1 - j, 1 + j]
    erase_prob: float = 0.1  # probability of erasing one random box (to the mean colour)
    hflip: bool = False  # random horizontal flip; off because a flipped left eye looks like a right eye


def sized_for(cfg: DataConfig, side: int) -> DataConfig:
    """``cfg`` with ``image_size`` taken from the model's input side ``side``; ValueError when the config
    names another side (preflight refuses that first, with the tower's name)."""
    if cfg.image_size is not None and cfg.image_size != side:
        raise ValueError(f"data.image_size={cfg.image_size}: the model takes {side} px images")
    return cfg if cfg.image_size == side else dataclasses.replace(cfg, image_size=side)
