"""What the benchmark asks of a model, whoever trained it: probe features, zero-shot scores, a network to
fine-tune, and the preprocessing its authors used.

An adapter is a BenchModel subclass in its own file (see registry.py for the list). It loads strictly from
a local path: every tensor of the model comes from the file, and every tensor of the file is either used
or a part of the published checkpoint the adapter names as unused (MAE's decoder, DINO's heads); anything
else refuses the file with one line naming the keys (model/weights.load_strict, the trainer's loader too).
Image-only adapters leave ``text`` False, and their zero-shot cells say "n/a (image-only)".
"""

from __future__ import annotations

import abc
import copy
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retclip_dist.config import ConfigError
from retclip_dist.eval.benchmark.recipe import ImageClassifier
from retclip_dist.eval.benchmark.suite import PROTOCOLS, ModelSpec
from retclip_dist.eval.features import normalise
from retclip_dist.model.config import ImageInput

# Keys a layout error names of each kind (the count is always complete).


class LayoutError(ValueError):
    """A checkpoint whose tensors are not the layout the adapter reads; the message names the keys."""


@dataclass
class NoOptions:
    """Adapters without options take ``options: {}``."""


# How a file that does not fit ends its one line (model/weights.load_strict, the one strict loader).
REMEDY = "the file is not in the layout this adapter reads (check models[].kind and models[].path)"


def weights_file(spec: ModelSpec, where: str) -> Path:
    """The model's path as a file that exists, or a ConfigError naming the field."""
    path = Path(spec.path)
    if not path.is_file():
        raise ConfigError(
            f"{where}.path: {spec.path} is not a file (give the local checkpoint; nothing is downloaded)"
        )
    return path


def sha256_of(paths: list[Path]) -> str:
    """One digest over the files' bytes, in the order given (the run record compares it across reruns)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class BenchModel(abc.ABC):
    """A loaded model as the benchmark uses it. Images arrive as uint8 [n, 3, s, s] already resized by
    ``image_input`` (the authors' preprocessing); the model normalises them itself."""

    kind: ClassVar[str]  # the registry name, also written in results
    Options: ClassVar[type] = NoOptions  # dataclass of the adapter's ``options:``
    text: ClassVar[bool] = False  # has a text tower, so zero-shot; image-only otherwise
    languages: ClassVar[tuple[str, ...]] = ("en",)  # prompt-pack languages the text tower reads

    image_input: ImageInput  # input size, resize, crop, filter, mean and std, as the authors used them
    features: str  # what the probe (and zero-shot) features are, for results.md
    tower: nn.Module  # the image encoder fine-tuning trains: normalised images -> pooled features
    width: int  # width of the tower's pooled output
    device: torch.device

    @classmethod
    def files(cls, spec: ModelSpec, options: Any, where: str) -> list[Path]:
        """The files whose bytes are this model (hashed into the run record); checks the spec before any
        weights are read. Default: ``path`` is the checkpoint file."""
        return [weights_file(spec, where)]

    @classmethod
    @abc.abstractmethod
    def load(cls, spec: ModelSpec, options: Any, device: torch.device) -> BenchModel:
        """Build the model from the local files, strictly, in eval mode on ``device``."""

    @classmethod
    def protocols(cls) -> tuple[str, ...]:
        return PROTOCOLS if cls.text else tuple(p for p in PROTOCOLS if p != "zero_shot")

    def batches(self, images: Tensor, batch_size: int) -> Iterator[Tensor]:
        """Normalised float batches on the model's device."""
        for start in range(0, len(images), batch_size):
            yield normalise(images[start : start + batch_size].to(self.device), self.image_input)

    def embed(self, batch: Tensor) -> Tensor:
        """Probe features of a normalised batch; default: the tower's pooled output."""
        return self.tower(batch)

    @torch.inference_mode()
    def probe_features(self, images: Tensor, batch_size: int) -> np.ndarray:
        """[n, F] frozen features for the linear and few-shot probes."""
        return torch.cat([self.embed(b).float().cpu() for b in self.batches(images, batch_size)]).numpy()

    def pair_features(self, pairs: Tensor, batch_size: int) -> np.ndarray:
        """Paired layouts ([n, 2, 3, s, s], left then right): both eyes' features side by side."""
        return np.concatenate(
            [self.probe_features(pairs[:, 0], batch_size), self.probe_features(pairs[:, 1], batch_size)],
            axis=1,
        )

    # -- zero-shot (text models) --------------------------------------------------------------------------

    def image_embed(self, batch: Tensor) -> Tensor:
        """L2-normalised image embedding in the text-aligned space."""
        raise NotImplementedError(f"{self.kind} has no text tower")

    def text_embed(self, prompts: list[str], context_length: int) -> Tensor:
        """L2-normalised text embeddings [len(prompts), D]."""
        raise NotImplementedError(f"{self.kind} has no text tower")

    def logit_scale(self, head: str) -> float:
        """The learned temperature's inverse (exp of the log-scale) for ``head``."""
        raise NotImplementedError(f"{self.kind} has no text tower")

    @torch.inference_mode()
    def zero_shot_features(
        self, images: Tensor, lateralities: list[str | None], batch_size: int
    ) -> tuple[np.ndarray, list[str]]:
        """(normalised image embeddings, the head of each row); one head, "image", unless overridden."""
        feats = torch.cat([self.image_embed(b).float().cpu() for b in self.batches(images, batch_size)])
        return feats.numpy(), ["image"] * len(images)

    def zero_shot_pair_features(self, pairs: Tensor, batch_size: int) -> tuple[np.ndarray, list[str]]:
        """A patient's embedding: the renormalised mean of both eyes' embeddings."""
        left, heads = self.zero_shot_features(pairs[:, 0], [None] * len(pairs), batch_size)
        right, _ = self.zero_shot_features(pairs[:, 1], [None] * len(pairs), batch_size)
        return F.normalize(torch.from_numpy(left + right), dim=-1).numpy(), heads

    def templates(self, pack_templates: list[str]) -> list[str]:
        """Prompt templates for a pack language; default the pack's own (FLAIR uses its caption)."""
        return pack_templates

    def zero_shot_language(self, wanted: str) -> str:
        """The suite's headline language when the text tower reads it, else the tower's first language."""
        return wanted if wanted in self.languages else self.languages[0]

    @torch.inference_mode()
    def class_embeddings(
        self, prompts: dict[str, list[str]], classes: list[str], context_length: int
    ) -> dict[str, Tensor]:
        """{head: [C, D]}: per class the renormalised mean of its prompts' embeddings (CLIP's ensemble)."""
        means = [self.text_embed(prompts[c], context_length).float().mean(dim=0) for c in classes]
        return {"image": F.normalize(torch.stack(means), dim=-1).cpu()}

    def zero_shot_probs(
        self, feats: np.ndarray, heads: list[str], emb: dict[str, Tensor], multilabel: bool
    ) -> np.ndarray:
        """Single-label: softmax over classes of scale x similarity. Multi-label: labels are not exclusive,
        so each label scores sigmoid(scale x (its similarity - the mean over labels)), per image."""
        features = torch.from_numpy(feats).float()
        probs = torch.empty((len(heads), next(iter(emb.values())).shape[0]))
        for head in set(heads):
            mask = torch.tensor([h == head for h in heads])
            sims = self.logit_scale(head) * (features[mask] @ emb[head].T)
            if multilabel:
                probs[mask] = (sims - sims.mean(dim=1, keepdim=True)).sigmoid()
            else:
                probs[mask] = sims.softmax(dim=-1)
        return probs.numpy()

    # -- fine-tuning -------------------------------------------------------------------------------------

    def classifier(self, n_classes: int, paired: bool) -> nn.Module:
        """A fresh network on a copy of the tower (on the CPU): tower -> Linear; paired: both eyes' pooled
        features side by side -> Linear."""
        tower = copy.deepcopy(self.tower).cpu().train()
        return ImageClassifier(tower, self.width, n_classes, paired)

    def describe(self) -> dict[str, str]:
        """What results.md states about the model besides its name and weights."""
        return {
            "kind": self.kind,
            "preprocessing": self.image_input.describe(),
            "features": self.features,
            "zero_shot": ", ".join(self.languages) + " prompts" if self.text else "n/a (image-only)",
        }


@dataclass
class TowerOptions:
    """Options of the timm-built image towers: the published architecture, resized or reduced."""

    img_size: int = 0  # input side in pixels; 0 = the authors' (RETFound 224, RETFound-Green 392)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
