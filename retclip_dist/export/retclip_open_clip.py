"""RET-CLIP's eye-level text head for open_clip: import this module once, before open_clip builds the model.

open_clip's Hugging Face text adapter pools the text tower and ends in a bias-free projection; RET-CLIP's
text heads are a Linear-ReLU-Linear MLP with biases on [CLS], which none of its built-in poolers and
projections can express. This module registers that head as an open_clip pooler (``POOLER_TYPE``), so
an exported model is an ordinary open_clip ``CustomTextCLIP`` that open_clip itself loads, strictly:

    import retclip_open_clip  # this file, copied into every open_clip export by ``retclip-eval export``
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:/path/to/export/left")
    tokenizer = open_clip.get_tokenizer("local-dir:/path/to/export/left")

The pooler returns the head's output zero-padded to the tower's width, and the export's projection is
the identity on the first D entries, so open_clip's features equal RET-CLIP's exactly. Its weights are
created empty and take their shapes from the checkpoint; a model built without the checkpoint cannot
run (an error says so) rather than computing with random weights.

``create_model_and_transforms(directory)`` below does the same as the lines above for an export that was
moved or copied since it was written (its config names the text tower by absolute path).

Needs only torch and open_clip: it travels with the export, without retclip-dist.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.hf_model import register_pooler
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

# open_clip names a registered pooler by its class name in snake case.
POOLER_TYPE = "retclip_text_head_pooler"
CONFIG_FILE = "open_clip_config.json"
LOCAL_DIR = "local-dir:"
# The sub-folder holding the timm config of a vision tower built with extra arguments (depth, size...).
VISION_DIR = "vision"


@register_pooler
class RetclipTextHeadPooler(LazyModuleMixin, nn.Module):
    """[CLS] -> Linear(H, H) -> ReLU -> Linear(H, D), zero-padded to H (the adapter's projection input)."""

    def __init__(self) -> None:
        with warnings.catch_warnings():
            # torch warns that lazy modules are new; these never infer a shape, they only load one.
            warnings.simplefilter("ignore", UserWarning)
            super().__init__()
        self.weight1 = UninitializedParameter()
        self.bias1 = UninitializedParameter()
        self.weight2 = UninitializedParameter()
        self.bias2 = UninitializedParameter()

    def initialize_parameters(self, *args: Any, **kwargs: Any) -> None:
        if self.has_uninitialized_params():
            raise RuntimeError(
                "the RET-CLIP text head has no weights: create the model from its exported checkpoint "
                "(open_clip.create_model_and_transforms('local-dir:DIR') or pretrained=...)"
            )

    def forward(self, x: Any, attention_mask: torch.Tensor) -> torch.Tensor:
        cls = x.last_hidden_state[:, 0]
        hidden = F.relu(F.linear(cls, self.weight1, self.bias1))
        out = F.linear(hidden, self.weight2, self.bias2)
        return F.pad(out, (0, cls.shape[-1] - out.shape[-1]))


def relocated_config(directory: str | Path) -> dict[str, Any]:
    """The export's model config with the text tower (and a timm config folder) at ``directory``."""
    directory = Path(directory).resolve()
    config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))["model_cfg"]
    config["text_cfg"].update(hf_model_name=str(directory), hf_tokenizer_name=str(directory))
    if config["vision_cfg"]["timm_model_name"].startswith(LOCAL_DIR):
        config["vision_cfg"]["timm_model_name"] = LOCAL_DIR + str(directory / VISION_DIR)
    return config


def create_model_and_transforms(directory: str | Path, **kwargs: Any):
    """open_clip's own ``create_model_and_transforms("local-dir:DIR")`` for an export wherever it now is."""
    config = relocated_config(directory)
    return open_clip.create_model_and_transforms(
        LOCAL_DIR + str(Path(directory).resolve()),
        vision_cfg=config["vision_cfg"],
        text_cfg=config["text_cfg"],
        **kwargs,
    )
