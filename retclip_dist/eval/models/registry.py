"""The model kinds ``retclip-eval benchmark`` can compare: one adapter class per kind, listed here.

Adding a model family is one file in this package (a BenchModel subclass: ``files`` checks the spec,
``load`` builds it strictly from local weights) and one line in ADAPTERS.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from retclip_dist.config import ConfigError, from_dict
from retclip_dist.eval.benchmark.suite import ModelSpec
from retclip_dist.eval.models.base import BenchModel, sha256_of
from retclip_dist.eval.models.flair import FlairModel
from retclip_dist.eval.models.openclip import OpenClipModel
from retclip_dist.eval.models.retclip import RetClipModel
from retclip_dist.eval.models.retfound_dinov2 import RetFoundDinov2
from retclip_dist.eval.models.retfound_green import RetFoundGreen
from retclip_dist.eval.models.retfound_mae import RetFoundMae
from retclip_dist.eval.models.timm_model import TimmModel

log = logging.getLogger(__name__)

ADAPTERS: dict[str, type[BenchModel]] = {
    "retclip": RetClipModel,
    "retfound_mae": RetFoundMae,
    "retfound_dinov2": RetFoundDinov2,
    "retfound_green": RetFoundGreen,
    "flair": FlairModel,
    "open_clip": OpenClipModel,
    "timm": TimmModel,
}


@dataclass(frozen=True)
class Resolved:
    """A model of the suite, checked against its adapter before any weights are read."""

    spec: ModelSpec  # as written in the suite (or on the command line)
    adapter: type[BenchModel]  # the class that loads it
    options: Any  # the adapter's Options, parsed
    files: tuple[Path, ...]  # the files whose bytes are the model

    def record(self) -> dict[str, Any]:
        """What benchmark.json keeps of the model: a rerun with other weights or settings is refused."""
        return {
            "kind": self.spec.kind,
            "arch": self.spec.arch,
            "options": asdict(self.options),
            "prompts": dict(self.spec.prompts),
            "sha256": sha256_of(list(self.files)),
        }

    def load(self, device: torch.device) -> BenchModel:
        log.info("loading %s (%s) from %s", self.spec.name, self.spec.kind, self.spec.path)
        return self.adapter.load(self.spec, self.options, device)


def resolve(spec: ModelSpec, where: str) -> Resolved:
    """The adapter, options and weight files of ``spec``; a ConfigError naming the field otherwise."""
    adapter = ADAPTERS.get(spec.kind)
    if adapter is None:
        raise ConfigError(f"{where}.kind: {spec.kind!r} is not one of {sorted(ADAPTERS)}")
    if spec.arch and spec.kind not in ("open_clip", "timm"):
        raise ConfigError(f"{where}.arch: only the open_clip and timm kinds take an architecture name")
    options = from_dict(adapter.Options, spec.options, where=f"{where}.options")
    return Resolved(spec, adapter, options, tuple(adapter.files(spec, options, where)))
