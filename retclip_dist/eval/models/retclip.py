"""``retclip``: our save_pretrained directories (a training run's model/, convert-release output).

Single images are probed on the shared projection (the release's probe feature); paired layouts go
through both eyes and the patient head (RetClip.encode_image). Zero-shot uses the text-aligned heads: the
left/right head by laterality when every row has one, else the patient head with the photo as both eyes;
its prompts are tokenised with the model's own tokenizer, in the suite's language.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from retclip_dist.config import ConfigError
from retclip_dist.eval.benchmark.recipe import BenchClassifier
from retclip_dist.eval.benchmark.suite import ModelSpec
from retclip_dist.eval.features import embed_images, normalise
from retclip_dist.eval.models.base import BenchModel
from retclip_dist.eval.zeroshot import class_embeddings
from retclip_dist.model.retclip import WEIGHTS_FILE, RetClip


class RetClipModel(BenchModel):
    kind = "retclip"
    text = True
    languages = ("en", "zh")
    features = (
        "probes: shared projection (paired layouts: patient head through both eyes); zero-shot: left/right "
        "head by laterality, else patient head"
    )

    def __init__(self, model: RetClip) -> None:
        self.model = model
        self.image_input = model.image_input
        self.tower = model.visual
        self.width = model.visual.num_features
        self.device = next(model.parameters()).device

    @classmethod
    def files(cls, spec: ModelSpec, options: Any, where: str) -> list[Path]:
        weights = Path(spec.path) / WEIGHTS_FILE
        if not weights.is_file():
            raise ConfigError(
                f"{where}.path: {spec.path}: no {WEIGHTS_FILE}; give a directory written by save_pretrained "
                "(or retclip-eval convert-release)"
            )
        return [weights]

    @classmethod
    def load(cls, spec: ModelSpec, options: Any, device: torch.device) -> RetClipModel:
        return cls(RetClip.from_pretrained(spec.path).to(device).eval())

    def probe_features(self, images: Tensor, batch_size: int) -> np.ndarray:
        return embed_images(self.model, images, ["projected"] * len(images), batch_size).numpy()

    @torch.inference_mode()
    def _patient(self, pairs: Tensor, batch_size: int) -> np.ndarray:
        out = []
        for start in range(0, len(pairs), batch_size):
            pair = normalise(pairs[start : start + batch_size].to(self.device), self.image_input)
            out.append(self.model.encode_image(pair[:, 0], pair[:, 1]).patient.float().cpu())
        return torch.cat(out).numpy()

    def pair_features(self, pairs: Tensor, batch_size: int) -> np.ndarray:
        return self._patient(pairs, batch_size)

    def zero_shot_features(
        self, images: Tensor, lateralities: list[str | None], batch_size: int
    ) -> tuple[np.ndarray, list[str]]:
        heads = [str(e) for e in lateralities] if all(lateralities) else ["patient"] * len(images)
        return embed_images(self.model, images, heads, batch_size).numpy(), heads

    def zero_shot_pair_features(self, pairs: Tensor, batch_size: int) -> tuple[np.ndarray, list[str]]:
        return self._patient(pairs, batch_size), ["patient"] * len(pairs)

    def class_embeddings(
        self, prompts: dict[str, list[str]], classes: list[str], context_length: int
    ) -> dict[str, Tensor]:
        return class_embeddings(self.model, prompts, classes, context_length)

    def logit_scale(self, head: str) -> float:
        return float(self.model.logit_scale[head].detach().exp().cpu())

    def classifier(self, n_classes: int, paired: bool) -> nn.Module:
        return BenchClassifier(copy.deepcopy(self.model).cpu().train(), n_classes, paired)
