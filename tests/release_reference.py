"""An independent reference of the public RET-CLIP release (sStonemason/RET-CLIP), written from its maths.

Nothing here imports retclip_dist's model or loss: the vision tower is an OpenAI-CLIP VisualTransformer
written out by hand (pre-LN blocks, nn.MultiheadAttention, QuickGELU MLP, ln_post on the class token,
then ``@ proj``), the text tower a BERT without pooler (the release's modeling_bert is a copy of Hugging
Face's BERT under the same names), and the heads, loss, decay rule, optimiser steps and clamp are the
published formulas. Parameter names are the release's (``RET_CLIP/clip/model.py``), so its state dict is
a release-shaped checkpoint at whatever reduced size the test picks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig, BertModel

from retclip_dist.model.vocab import SPECIAL_TOKENS

# The release's clamp after every step: train.py writes ln 100 as 4.6052.
CLAMP = (0.0, 4.6052)
SCALE_NAMES = ("logit_scale", "logit_scale_left", "logit_scale_right")


class Block(nn.Module):
    """x + attn(ln_1 x), then x + c_proj(QuickGELU(c_fc(ln_2 x)))."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, width // 64)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:  # [L, N, W], as nn.MultiheadAttention takes it
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))


class Visual(nn.Module):
    """OpenAI CLIP's VisualTransformer: the output is ln_post(class token) @ proj, D wide."""

    def __init__(self, width: int, layers: int, patch: int, resolution: int, embed: int) -> None:
        super().__init__()
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((resolution // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[Block(width) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


def _text_mlp(hidden: int, embed: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, embed))


class ReleaseClip(nn.Module):
    """The release's CLIP class at test scale, under its parameter names."""

    def __init__(
        self,
        vocab_size: int,
        width: int = 64,
        layers: int = 2,
        patch: int = 8,
        resolution: int = 32,
        embed: int = 32,
        hidden: int = 64,
    ) -> None:
        super().__init__()
        self.visual = Visual(width, layers, patch, resolution, embed)
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=2,
            num_attention_heads=hidden // 64,
            intermediate_size=2 * hidden,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.bert = BertModel(config, add_pooling_layer=False)  # the release's BERT has no pooler
        self.text_projection = _text_mlp(hidden, embed)
        self.text_projection_left = _text_mlp(hidden, embed)
        self.text_projection_right = _text_mlp(hidden, embed)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(90)))
        self.logit_scale_left = nn.Parameter(torch.tensor(math.log(80)))
        self.logit_scale_right = nn.Parameter(torch.tensor(math.log(70)))
        self.global_feature_mapping = nn.Linear(2 * embed, embed, bias=False)
        self.left_feature_mapping = nn.Linear(embed, embed, bias=False)
        self.right_feature_mapping = nn.Linear(embed, embed, bias=False)

    def encode_image(self, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised (patient, left, right) image features; visual.proj is inside self.visual."""
        fl, fr = self.visual(left), self.visual(right)
        out = (
            self.global_feature_mapping(torch.cat([fl, fr], dim=1)),
            self.left_feature_mapping(fl),
            self.right_feature_mapping(fr),
        )
        return tuple(F.normalize(t, dim=-1) for t in out)

    def encode_text(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised (patient, left, right) text features, all three from the one [CLS]."""
        cls = self.bert(ids, attention_mask=mask)[0][:, 0]
        heads = (self.text_projection, self.text_projection_left, self.text_projection_right)
        return tuple(F.normalize(h(cls), dim=-1) for h in heads)

    def scales(self) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(getattr(self, n).exp() for n in SCALE_NAMES)


def symmetric_infonce(image: Tensor, text: Tensor, scale: Tensor) -> Tensor:
    """(CE(image -> text) + CE(text -> image)) / 2 over one batch, written out as log-softmax diagonals."""
    logits = scale * image @ text.T
    return -(logits.log_softmax(dim=1).diagonal().mean() + logits.log_softmax(dim=0).diagonal().mean()) / 2


def release_losses(model: ReleaseClip, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """{"patient", "left", "right", "total"} as the release's get_loss computes them (local negatives)."""
    image = model.encode_image(batch["left"], batch["right"])
    text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    levels = {
        level: symmetric_infonce(i, t, s)
        for level, i, t, s in zip(("patient", "left", "right"), image, text, model.scales(), strict=True)
    }
    return {**levels, "total": levels["patient"] + levels["left"] + levels["right"]}


def release_decays(name: str) -> bool:
    """The release's main.py filter: names with bn, ln, bias or logit_scale get no weight decay."""
    return not any(part in name for part in ("bn", "ln", "bias", "logit_scale"))


@torch.no_grad()
def clamp_scales(model: ReleaseClip) -> None:
    for name in SCALE_NAMES:
        getattr(model, name).clamp_(*CLAMP)


@torch.no_grad()
def sgd_step(model: ReleaseClip, lr: float) -> None:
    """p <- p - lr * grad, then the clamp."""
    for p in model.parameters():
        p -= lr * p.grad
    clamp_scales(model)


@torch.no_grad()
def adamw_first_step(
    model: ReleaseClip, lr: float, wd: float, betas: tuple[float, float], eps: float
) -> None:
    """Decoupled AdamW, step 1 from zero moments: p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)."""
    b1, b2 = betas
    for name, p in model.named_parameters():
        g = p.grad
        m_hat = (1 - b1) * g / (1 - b1)
        v_hat = (1 - b2) * g * g / (1 - b2)
        if release_decays(name):
            p *= 1 - lr * wd
        p -= lr * m_hat / (v_hat.sqrt() + eps)
    clamp_scales(model)


def write_release_vocab(path, words: list[str]) -> int:
    """A vocab.txt like the release's RET_CLIP/clip/vocab.txt: CRLF line ends and U+2028 tokens."""
    tokens = [*SPECIAL_TOKENS, *words, "\u2028", "##\u2028", "\u201c"]
    path.write_bytes("".join(t + "\r\n" for t in tokens).encode("utf-8"))
    return len(tokens)


def training_checkpoint(model: ReleaseClip) -> dict:
    """What the release's train.py saves: DDP ``module.`` names and an AdamW state whose learning rates the
    numpy cosine schedule wrote as numpy floats."""
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    params = [nn.Parameter(p.detach().clone()) for p in model.parameters()]
    optimizer = torch.optim.AdamW(params, lr=3e-5)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()  # fills exp_avg / exp_avg_sq / step, as a checkpoint taken mid-run has them
    for group in optimizer.param_groups:
        group["lr"] = np.float64(2.9e-5)
        group["initial_lr"] = np.float64(3e-5)
    return {
        "epoch": 10,
        "step": 7570,
        "name": "test_retclip",
        "state_dict": state,
        "optimizer": optimizer.state_dict(),
    }
