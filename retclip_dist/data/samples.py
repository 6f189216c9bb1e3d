"""One raw WebDataset sample -> decoded, augmented patient; a list of patients -> a tokenised batch."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from retclip_dist.data.augment import augment_cpu, identity_params, sample_params, sample_rng
from retclip_dist.data.config import DataConfig
from retclip_dist.data.skips import SkipCounter
from retclip_dist.model.config import ImageInput
from retclip_dist.shardset import EYE_REPORT_MEMBER, EYES, IMAGE_MEMBER, REPORT_MEMBER, TRAINING_MEMBERS

# What PIL raises on bytes that are not a complete image (UnidentifiedImageError is an OSError).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass
class Patient:
    key: str  # sanitised patient id (the shard member prefix)
    images: dict[str, torch.Tensor]  # per eye: normalised float [3, 224, 224] (cpu) or uint8 [3, 256, 256]
    params: dict[str, np.ndarray] | None  # per eye: augmentation still to apply on the device, or None
    reports: dict[str, str]  # "patient", "left", "right"; eyes without their own report repeat the patient's


def clean_report(text: str) -> str:
    """The release's text normalisation: lower case and straight double quotes."""
    return text.lower().replace("\u201c", '"').replace("\u201d", '"')


# Batch key of the per-sample report hashes: int64 [b, 3], one column per contrastive level (LEVELS order).
REPORT_HASH = "report_hash"


def token_hash(ids: list[int]) -> int:
    """Signed 64-bit hash of a report's token ids as the text tower receives them: truncated to
    context_length, [CLS] and [SEP] included, no padding. Reports that differ only past context_length, or
    in what the tokenizer normalises away (case, spacing, words it reads as [UNK]), are the same input to
    the tower and hash equally.

    A keyed-free cryptographic digest, not Python's ``hash``: it must agree across processes and runs.
    """
    digest = hashlib.blake2b(np.asarray(ids, dtype="<i8").tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def decode_draft(image: Image.Image, size: int) -> torch.Tensor:
    """uint8 [3, size, size] via JPEG DCT scaling: decoding 512 px at 1/2 scale costs about a quarter."""
    image.draft("RGB", (size, size))
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    # A CHW view of the HWC pixels: the batch stack does the one copy into CHW layout.
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


class SampleDecoder:
    """Turns raw samples into patients for one (seed, epoch); bad samples are counted and dropped."""

    def __init__(
        self, cfg: DataConfig, image: ImageInput, seed: int, epoch: int, train: bool, counter: SkipCounter
    ) -> None:
        self.cfg = cfg
        self.image = image  # the model's input: CPU-path augmentation resizes and normalises to it
        self.seed = seed
        self.epoch = epoch
        self.train = train
        self.counter = counter

    def _params(self, key: str, sizes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
        if not self.train:
            return {eye: identity_params() for eye in EYES}
        rng = sample_rng(self.seed, self.epoch, key)
        return {eye: sample_params(rng, *sizes[eye], self.cfg) for eye in EYES}

    def __call__(self, raw: dict[str, Any]) -> Patient | None:
        key = raw["__key__"]
        where = f"{raw.get('__url__')}: sample {key}"
        missing = [m for m in TRAINING_MEMBERS if m not in raw]
        if missing:
            self.counter.add("missing_member", 1, f"{where} lacks {missing}")
            return None
        try:
            report = raw[REPORT_MEMBER].decode("utf-8")
            reports = {"patient": report}
            for eye in EYES:
                own = raw.get(EYE_REPORT_MEMBER[eye])
                reports[eye] = own.decode("utf-8") if own is not None else report
        except UnicodeDecodeError as exc:
            self.counter.add("bad_text", 1, f"{where}: report is not UTF-8 ({exc})")
            return None
        try:
            opened = {eye: Image.open(io.BytesIO(raw[IMAGE_MEMBER[eye]])) for eye in EYES}
            params = self._params(key, {eye: img.size for eye, img in opened.items()})
            if self.cfg.augment_on == "cpu":
                images = {
                    eye: augment_cpu(img.convert("RGB"), params[eye], self.image)
                    for eye, img in opened.items()
                }
                return Patient(key, images, None, reports)
            images = {eye: decode_draft(img, self.cfg.decode_size) for eye, img in opened.items()}
        except IMAGE_ERRORS as exc:
            self.counter.add("corrupt_image", 1, f"{where}: {type(exc).__name__}: {exc}")
            return None
        return Patient(key, images, params, reports)


# data.text_padding "batch" rounds each batch's text length up to a multiple of this, so that a compiled
# model sees at most context_length / 16 text shapes instead of one per distinct report length.
TEXT_PAD_MULTIPLE = 16


def text_length(lengths: list[int], cfg: DataConfig) -> int:
    """Tokens per report in one batch: context_length ("max"), or the longest report rounded up ("batch")."""
    if cfg.text_padding == "max":
        return cfg.context_length
    longest = max(lengths)
    return min(cfg.context_length, -(-longest // TEXT_PAD_MULTIPLE) * TEXT_PAD_MULTIPLE)


def _tokens(tokenizer: PreTrainedTokenizerBase, texts: list[str], cfg: DataConfig) -> list[list[int]]:
    """Truncated, unpadded token ids ([CLS] and [SEP] included) of cleaned reports."""
    out = tokenizer([clean_report(t) for t in texts], truncation=True, max_length=cfg.context_length)
    return out["input_ids"]


def _padded(tokenizer: PreTrainedTokenizerBase, ids: list[list[int]], length: int) -> dict[str, torch.Tensor]:
    # Right padding: real tokens keep their positions 0..n-1, padding gets attention mask 0.
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(ids), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def collate(
    patients: list[Patient], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, with_texts: bool
) -> dict[str, Any]:
    """Stack images (and device-path parameters) and tokenise reports to the batch's text length.

    The length is ``cfg.context_length`` or, with ``text_padding: batch``, the longest (truncated) report
    rounded up; right padding with a zero attention mask leaves each report's tokens, positions and
    [CLS] feature as they are, and the duplicate-report hash reads the truncated ids, not the padding.
    """
    batch: dict[str, Any] = {"keys": [p.key for p in patients]}
    for eye in EYES:
        batch[eye] = torch.stack([p.images[eye] for p in patients])
        if patients[0].params is not None:
            batch[f"{eye}_params"] = torch.from_numpy(np.stack([p.params[eye] for p in patients]))
    texts = {"patient": [p.reports["patient"] for p in patients]}
    if cfg.eye_reports:
        texts.update({eye: [p.reports[eye] for p in patients] for eye in EYES})
    ids = {level: _tokens(tokenizer, t, cfg) for level, t in texts.items()}
    # One length for every text of the batch (patient and eye reports alike): one text shape per batch.
    length = text_length([len(seq) for level in ids.values() for seq in level], cfg)
    batch.update(_padded(tokenizer, ids["patient"], length))
    if cfg.eye_reports:
        for eye in EYES:
            batch.update({f"{eye}_{k}": v for k, v in _padded(tokenizer, ids[eye], length).items()})
    # The loss's duplicate mask compares the token ids each level's text head reads: the eye reports' only
    # when they are tokenised (data.eye_reports), otherwise the patient report's at every level.
    levels = ("patient", *(eye if cfg.eye_reports else "patient" for eye in EYES))
    batch[REPORT_HASH] = torch.tensor(
        [[token_hash(ids[level][row]) for level in levels] for row in range(len(patients))], dtype=torch.int64
    )
    if with_texts:
        batch["reports"] = [p.reports["patient"] for p in patients]
        for eye in EYES:
            batch[f"{eye}_reports"] = [p.reports[eye] for p in patients]
    return batch
