"""A saved model in a notebook: load it, embed eye photos, a patient's two photos and reports, score prompts.

    import retclip_dist
    model = retclip_dist.load("runs/x/model")
    features = model.embed_images(["od.jpg", "os.jpg"])

Photos are PIL images or file paths; the model's own preprocessing is applied (the whole photo resized to
its square input, bicubic, its mean and std: ``RetClip.image_input``), so nothing is normalised by hand.
Every number equals retclip-eval's for the same photos and head: the functions are retclip-eval's own
(eval/features.py, eval/zeroshot.py). Results are float32 CPU tensors, one row per photo, patient or text.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from retclip_dist.data.samples import clean_report
from retclip_dist.eval.config import ZeroShotConfig
from retclip_dist.eval.data import model_input
from retclip_dist.eval.features import embed_images as embed_rows
from retclip_dist.eval.features import load_model, normalise, pick_device
from retclip_dist.eval.zeroshot import class_embeddings, load_prompts, zero_shot_probs
from retclip_dist.model.config import LEVELS, ImageInput
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.tokenizer import build_tokenizer

Photo = Image.Image | str | os.PathLike
# Image heads of a single photo (retclip-eval's --features.head): "projected" the shared projection (D,
# un-normalised, for probes), "tower" the pooled tower output (W), "left"/"right" the eye levels and
# "patient" the photo as both eyes (normalised, text-aligned).
HEADS = ("projected", "tower", "left", "right", "patient")
# Tokens per text, as retclip-eval zero-shot truncates; pass context_length for longer reports.
CONTEXT_LENGTH = ZeroShotConfig().context_length


def load(directory: str | os.PathLike, device: str = "auto") -> Pretrained:
    """A model written by ``save_pretrained`` (a run's ``model/``, ``retclip-eval convert-release``
    output), in eval mode on ``device`` ("auto": cuda when available)."""
    return Pretrained(load_model(str(directory), pick_device(device)))


def _pixels(photo: Photo, size: int) -> Tensor:
    if isinstance(photo, Image.Image):
        return model_input(photo, size)
    try:
        with Image.open(Path(photo)) as img:
            return model_input(img, size)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{photo}: not a readable image ({exc})") from None


class Pretrained:
    """A RetClip with its preprocessing and tokenizer; ``model`` is the RetClip itself."""

    def __init__(self, model: RetClip) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device

    @functools.cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer (built on first use: a model saved without one still embeds photos)."""
        return build_tokenizer(self.model.config)

    @property
    def image_input(self) -> ImageInput:
        """What the model takes: side, mean, std, interpolation."""
        return self.model.image_input

    def pixels(self, photos: Sequence[Photo] | Photo) -> Tensor:
        """uint8 [n, 3, S, S]: the photos resized to the model's input (before normalisation)."""
        photos = [photos] if isinstance(photos, (Image.Image, str, os.PathLike)) else list(photos)
        if not photos:
            raise ValueError("no photos given")
        size = self.image_input.size
        return torch.stack([_pixels(p, size) for p in photos])

    def preprocess(self, photos: Sequence[Photo] | Photo) -> Tensor:
        """float [n, 3, S, S] on the model's device, normalised with its mean and std: the tower's input."""
        return normalise(self.pixels(photos).to(self.device), self.image_input)

    def embed_images(
        self, photos: Sequence[Photo] | Photo, head: str | Sequence[str] = "projected", batch_size: int = 32
    ) -> Tensor:
        """One feature row per photo from ``head`` (HEADS), or a head per photo ("left"/"right" by each
        photo's eye: the two eye levels are one space)."""
        pixels = self.pixels(photos)
        heads = [head] * len(pixels) if isinstance(head, str) else list(head)
        if len(heads) != len(pixels) or not set(heads) <= set(HEADS):
            raise ValueError(f"head: one of {HEADS}, or one per photo ({len(pixels)}); got {head!r}")
        return embed_rows(self.model, pixels, heads, batch_size)

    @torch.inference_mode()
    def embed_patient(
        self, left: Sequence[Photo] | Photo, right: Sequence[Photo] | Photo, batch_size: int = 32
    ) -> Tensor:
        """The patient-level feature of each (left photo, right photo) pair, normalised: [n, D]."""
        lefts, rights = self.pixels(left), self.pixels(right)
        if len(lefts) != len(rights):
            raise ValueError(f"{len(lefts)} left photos but {len(rights)} right photos")
        out = []
        for start in range(0, len(lefts), batch_size):
            pair = [
                normalise(p[start : start + batch_size].to(self.device), self.image_input)
                for p in (lefts, rights)
            ]
            out.append(self.model.encode_image(*pair).patient.float().cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def embed_texts(
        self,
        texts: Sequence[str] | str,
        level: str = "patient",
        context_length: int = CONTEXT_LENGTH,
        batch_size: int = 64,
    ) -> Tensor:
        """Normalised text features of reports or prompts through the ``level`` head (patient, left, right),
        cleaned as training reports are (lower case, straight quotes) and cut at ``context_length`` tokens."""
        if level not in LEVELS:
            raise ValueError(f"level {level!r}: one of {LEVELS}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = [clean_report(t) for t in texts[start : start + batch_size]]
            tokens = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=context_length, return_tensors="pt"
            )
            levels = self.model.encode_text(
                tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
            )
            out.append(getattr(levels, level).float().cpu())
        return torch.cat(out)

    def zero_shot(
        self,
        photos: Sequence[Photo] | Photo,
        prompts: Mapping[str, str | Sequence[str]] | str | os.PathLike,
        eyes: str | Sequence[str],
        context_length: int = CONTEXT_LENGTH,
    ) -> Tensor:
        """Class probabilities [n, C] of each photo: its eye level's scale times the cosine similarity to
        each class's mean prompt embedding, softmaxed. ``prompts`` maps class -> prompt(s) (columns in its
        order) or names a retclip-eval prompt file; ``eyes`` is "left"/"right" for all photos or one each
        ("patient" scores each photo as both eyes through the patient level).
        """
        if isinstance(prompts, (str, os.PathLike)):
            prompts = load_prompts(prompts)
        table = {str(c): [p] if isinstance(p, str) else list(p) for c, p in prompts.items()}
        if not table or not all(table.values()):
            raise ValueError("prompts: give at least one class, each with at least one prompt")
        pixels = self.pixels(photos)
        heads = [eyes] * len(pixels) if isinstance(eyes, str) else list(eyes)
        if len(heads) != len(pixels) or not (set(heads) <= {"left", "right"} or set(heads) == {"patient"}):
            raise ValueError(
                f"eyes: 'left' or 'right' (or 'patient': the photo as both eyes), or left/right per photo "
                f"({len(pixels)}); got {eyes!r}"
            )
        features = embed_rows(self.model, pixels, heads, 32)
        classes = class_embeddings(self.model, table, list(table), context_length)
        return zero_shot_probs(self.model, features, heads, classes)
