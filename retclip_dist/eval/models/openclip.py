"""``open_clip``: any open_clip architecture (``arch``) with a local checkpoint; image and text.

Needs the optional open-clip-torch package (``pip install 'retclip-dist[open_clip]'``). The checkpoint
is loaded by open_clip itself, strictly (its load_checkpoint with strict=True: a missing or extra key
refuses the file, naming it), from an absolute file path, so a path is never mistaken for one of
open_clip's download tags. An architecture open_clip does not ship comes with ``options.config``, its
model config JSON. Text towers or tokenizers that open_clip would fetch from the Hugging Face hub are
refused unless the config names a local folder for them.

Preprocessing is the model's own (open_clip's preprocess config: size, mean, std, filter, resize mode).
Probes read the normalised image embedding (as CLIP_benchmark's linear probe); zero-shot is the
logit scale times the cosine with each class's renormalised mean prompt embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from retclip_dist.config import ConfigError
from retclip_dist.eval.benchmark.suite import ModelSpec
from retclip_dist.eval.models.base import BenchModel, LayoutError, weights_file
from retclip_dist.model.config import ImageInput

# open_clip's resize_mode -> ImageInput.resize (its "longest" pads on both sides).
_RESIZE = {"shortest": "shortest", "longest": "longest", "squash": "squash"}
# Where an open_clip model config names something on the Hugging Face hub.
_HUB_KEYS = ("hf_model_name", "hf_tokenizer_name")


@dataclass
class OpenClipOptions:
    config: str = ""  # model config JSON of an architecture open_clip does not ship (arch = its file stem)


def _open_clip(where: str) -> Any:
    try:
        import open_clip
    except ImportError:
        raise ConfigError(
            f"{where}.kind: open_clip needs the open-clip-torch package: pip install 'retclip-dist[open_clip]'"
        ) from None
    return open_clip


def _image_input(open_clip: Any, model: torch.nn.Module, source: str) -> ImageInput:
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    if not isinstance(size, int):
        if size[0] != size[1]:
            raise ValueError(f"{source}: open_clip input size {tuple(size)} is not square")
        size = size[0]
    resize = _RESIZE.get(cfg.get("resize_mode", "shortest"))
    interpolation = cfg.get("interpolation", "bicubic")
    if resize is None or interpolation not in ("bicubic", "bilinear"):
        raise ValueError(
            f"{source}: open_clip preprocessing resize_mode {cfg.get('resize_mode')!r} / interpolation "
            f"{interpolation!r} is not supported"
        )
    return ImageInput(int(size), tuple(cfg["mean"]), tuple(cfg["std"]), interpolation, resize=resize)


class OpenClipModel(BenchModel):
    kind = "open_clip"
    Options = OpenClipOptions
    text = True
    features = "probes: normalised image embedding; zero-shot: logit scale x cosine"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, image_input: ImageInput, device: torch.device):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.image_input = image_input
        self.tower = model.visual
        self.device = device
        with torch.no_grad():
            probe = torch.zeros((2, 3, image_input.size, image_input.size), device=device)
            self.width = int(self.tower(probe).shape[-1])

    @classmethod
    def files(cls, spec: ModelSpec, options: Any, where: str) -> list[Path]:
        open_clip = _open_clip(where)
        if options.config:
            if not Path(options.config).is_file():
                raise ConfigError(f"{where}.options.config: {options.config} is not a file")
            open_clip.add_model_config(options.config)
        if not spec.arch:
            raise ConfigError(f"{where}.arch: empty; give the open_clip model name (open_clip.list_models())")
        cfg = open_clip.get_model_config(spec.arch)
        if cfg is None:
            raise ConfigError(
                f"{where}.arch: {spec.arch!r} is not an open_clip model; options.config adds an architecture"
            )
        text_cfg = cfg.get("text_cfg", {})
        hub = [text_cfg[k] for k in _HUB_KEYS if text_cfg.get(k) and not Path(text_cfg[k]).is_dir()]
        if hub:
            raise ConfigError(
                f"{where}.arch: {spec.arch}'s text tower or tokenizer is {hub[0]!r} on the Hugging Face hub "
                "(a download); give options.config, a copy of its config whose hf_model_name and "
                "hf_tokenizer_name name a local folder"
            )
        return [weights_file(spec, where)]

    @classmethod
    def load(cls, spec: ModelSpec, options: Any, device: torch.device) -> OpenClipModel:
        open_clip = _open_clip("model")
        path = str(Path(spec.path).resolve())
        try:
            model = open_clip.create_model(spec.arch, pretrained=path, device="cpu")
        except RuntimeError as exc:  # load_state_dict(strict=True): the missing and unexpected keys
            raise LayoutError(
                f"{spec.path}: not an open_clip {spec.arch} checkpoint: {' '.join(str(exc).split())[:800]}"
            ) from None
        return cls(model, open_clip.get_tokenizer(spec.arch), _image_input(open_clip, model, path), device)

    def embed(self, batch: Tensor) -> Tensor:
        return self.image_embed(batch)

    def image_embed(self, batch: Tensor) -> Tensor:
        return F.normalize(self.model.encode_image(batch).float(), dim=-1)

    def text_embed(self, prompts: list[str], context_length: int) -> Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def logit_scale(self, head: str) -> float:
        return float(self.model.logit_scale.detach().exp().cpu())
