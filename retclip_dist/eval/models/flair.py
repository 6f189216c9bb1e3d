"""``flair``: FLAIR (jusiro/FLAIR), a ResNet-50 image tower and a Bio_ClinicalBERT text tower, each with a
bias-free projection to a shared space.

The weights file is FLAIRModel's state dict (``flair_resnet.pth``, or ``model.safetensors`` of its hub
folder): ``vision_model.model.*`` (torchvision's resnet50 without ``fc``),
``vision_model.projection_head_vision.projection.weight``, ``text_model.model.*`` (a BERT with its pooler),
``text_model.projection_head_text.projection.weight`` and ``logit_scale``. The BERT's config and vocabulary
are not in that file: ``options.text`` names a local copy of Bio_ClinicalBERT (config.json, vocab.txt).

As FLAIR computes them: images scaled to [0, 1] without mean/std, the longer side resized to 512 and the
rest padded with black at the right and bottom; the linear probe reads the ResNet's pooled features
(FLAIR's ``--project_features False``); zero-shot normalises the pooled features, projects and normalises
again; a prompt is its caption with the class phrase ("A fundus photograph of [CLS]"), embedded as the
mean over all positions of the mean of hidden layers 1, 2 and the last, projected like the image; a class
is the mean of its prompts' embeddings (not renormalised); logits use exp of the log-scale clamped to
[0, ln 100].
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck, ResNet
from transformers import AutoConfig, AutoTokenizer, BertModel

from retclip_dist.config import ConfigError
from retclip_dist.eval.benchmark.suite import ModelSpec
from retclip_dist.eval.models.base import REMEDY, BenchModel, LayoutError
from retclip_dist.model.config import ImageInput
from retclip_dist.model.weights import load_strict, read_state_dict

# What the FLAIR hub folder (PyTorchModelHubMixin) calls its weights, when ``path`` is that folder.
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
CAPTION = "A fundus photograph of {}"  # FLAIRModel's caption, "[CLS]" written as "{}"
MAX_TOKENS = 77  # FLAIR sets the tokenizer's model_max_length to 77
MAX_LOG_SCALE = 4.6052  # FLAIR clamps its log-scale to [0, ln 100] before use
# transformers before 4.31 saved BERT's position ids as a buffer; FLAIR's file was written then.
UNUSED = ("text_model.model.embeddings.position_ids",)
_VISION_PROJ = "vision_model.projection_head_vision.projection"
_STAGE_BLOCK = re.compile(r"^vision_model\.model\.layer(\d)\.(\d+)\.")


@dataclass
class FlairOptions:
    text: str = ""  # local Bio_ClinicalBERT directory (config.json + vocab.txt); the weights are FLAIR's
    image_size: int = 512  # FLAIRModel's image_size: the longer side, padded to a square
    caption: str = CAPTION  # prompt template with one {}; "" = the prompt pack's own templates


class _Projection(nn.Module):
    def __init__(self, width: int, dim: int, bias: bool) -> None:
        super().__init__()
        self.projection = nn.Linear(width, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        # FLAIR's ProjectionLayer with projection and norm on: normalise, project, normalise.
        return F.normalize(self.projection(F.normalize(x, dim=-1)), dim=-1)


class _Vision(nn.Module):
    def __init__(self, blocks: list[int], dim: int, bias: bool) -> None:
        super().__init__()
        self.model = ResNet(Bottleneck, blocks)
        self.model.fc = nn.Identity()
        self.projection_head_vision = _Projection(2048, dim, bias)


class _Text(nn.Module):
    def __init__(self, config: Any, dim: int, bias: bool) -> None:
        super().__init__()
        self.model = BertModel(config)  # with its pooler, as AutoModel builds Bio_ClinicalBERT
        self.projection_head_text = _Projection(config.hidden_size, dim, bias)


class FlairNet(nn.Module):
    """FLAIRModel's parameter layout, so that its state dict loads name for name."""

    def __init__(self, blocks: list[int], config: Any, dim: int, bias: bool) -> None:
        super().__init__()
        self.vision_model = _Vision(blocks, dim, bias)
        self.text_model = _Text(config, dim, bias)
        self.logit_scale = nn.Parameter(torch.zeros(()))


def _stage_blocks(state: dict[str, Tensor], source: str) -> list[int]:
    """Bottleneck blocks per ResNet stage, read from the keys ([3, 4, 6, 3] for FLAIR's ResNet-50)."""
    found: dict[int, set[int]] = {}
    for key in state:
        match = _STAGE_BLOCK.match(key)
        if match:
            found.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if sorted(found) != [1, 2, 3, 4]:
        raise LayoutError(
            f"{source}: not a FLAIR checkpoint: no vision_model.model.layer1-4 (a ResNet image tower) among "
            f"its keys (first {sorted(state)[:3]})"
        )
    return [len(found[k]) for k in (1, 2, 3, 4)]


class FlairModel(BenchModel):
    kind = "flair"
    Options = FlairOptions
    text = True
    features = (
        "probes: ResNet-50 pooled features (2048-d, FLAIR's linear probe); zero-shot: projected, normalised"
    )

    def __init__(self, net: FlairNet, tokenizer: Any, options: FlairOptions, device: torch.device) -> None:
        self.net = net.to(device).eval()
        self.tokenizer = tokenizer
        self.caption = options.caption
        self.image_input = ImageInput(
            options.image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear", resize="longest", pad="end"
        )
        self.tower = net.vision_model.model
        self.width = 2048
        self.device = device

    @staticmethod
    def _weights(spec: ModelSpec) -> Path:
        """``path``, or the weights file inside a FLAIR hub folder."""
        path = Path(spec.path)
        if path.is_dir():
            return next((path / n for n in HUB_FILES if (path / n).is_file()), path / HUB_FILES[0])
        return path

    @classmethod
    def files(cls, spec: ModelSpec, options: Any, where: str) -> list[Path]:
        text = Path(options.text) if options.text else None
        if text is None or not (text / "config.json").is_file():
            raise ConfigError(
                f"{where}.options.text: {options.text or '(empty)'}: give a local Bio_ClinicalBERT directory "
                "with its config.json and vocab.txt (FLAIR's file holds the weights, not the text config)"
            )
        if options.caption and options.caption.count("{}") != 1:
            raise ConfigError(f"{where}.options.caption: {options.caption!r} needs exactly one {{}}")
        weights = cls._weights(spec)
        if not weights.is_file():
            raise ConfigError(
                f"{where}.path: {spec.path}: no FLAIR weights there (a .pth/.safetensors file, or a folder "
                f"with one of {list(HUB_FILES)}); nothing is downloaded"
            )
        return [weights]

    @classmethod
    def load(cls, spec: ModelSpec, options: Any, device: torch.device) -> FlairModel:
        source = str(cls._weights(spec))
        state = read_state_dict(source)
        proj = state.get(_VISION_PROJ + ".weight")
        if proj is None:
            raise LayoutError(f"{source}: not a FLAIR checkpoint: missing {_VISION_PROJ}.weight")
        config = AutoConfig.from_pretrained(options.text, local_files_only=True)
        net = FlairNet(_stage_blocks(state, source), config, proj.shape[0], _VISION_PROJ + ".bias" in state)
        load_strict(net, state, tower="FLAIR", source=source, field="path", may_leave=UNUSED, remedy=REMEDY)
        tokenizer = AutoTokenizer.from_pretrained(options.text, local_files_only=True)
        tokenizer.model_max_length = MAX_TOKENS
        return cls(net, tokenizer, options, device)

    def image_embed(self, batch: Tensor) -> Tensor:
        return self.net.vision_model.projection_head_vision(self.tower(batch))

    def text_embed(self, prompts: list[str], context_length: int) -> Tensor:
        tokens = self.tokenizer(prompts, truncation=True, padding=True, return_tensors="pt")
        out = self.net.text_model.model(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
            output_hidden_states=True,
        )
        hidden = out.hidden_states
        # FLAIR averages layers 1, 2 and the last, then every position (padding included).
        pooled = torch.stack([hidden[1], hidden[2], hidden[-1]]).mean(dim=0).mean(dim=1)
        return self.net.text_model.projection_head_text(pooled)

    def templates(self, pack_templates: list[str]) -> list[str]:
        return [self.caption] if self.caption else pack_templates

    @torch.inference_mode()
    def class_embeddings(
        self, prompts: dict[str, list[str]], classes: list[str], context_length: int
    ) -> dict[str, Tensor]:
        # One forward per class, as FLAIR's compute_text_embeddings (the padding, and so the mean, is per class).
        return {
            "image": torch.stack(
                [self.text_embed(prompts[c], context_length).mean(dim=0) for c in classes]
            ).cpu()
        }

    def logit_scale(self, head: str) -> float:
        return float(self.net.logit_scale.detach().clamp(0, MAX_LOG_SCALE).exp().cpu())
