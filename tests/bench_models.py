"""Reduced-size look-alikes of the published checkpoints the benchmark's adapters read, for the tests.

Each file has the published key names and nesting (read from the authors' module definitions: MAE's
MaskedAutoencoderViT as RETFound saves it, DINOv2's teacher with chunked blocks, timm's
vit_small_patch14_reg4_dinov2 state dict as RETFound-Green publishes it, FLAIRModel's state dict with a
torchvision ResNet and a BERT, an open_clip CLIP) but tiny widths and depths, random weights, and the
adapter options that build the same reduced architecture. Never real weights.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import timm
import torch
from conftest import tiny_tokenizer
from timm.models.vision_transformer import Block
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet
from transformers import BertConfig, BertModel

VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}  # the reduced ViT of every timm-built look-alike


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def _prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.clone() for k, v in module.state_dict().items()}


def retfound_mae(path: Path, size: int = 32, patch: int = 8, seed: int = 0) -> dict[str, Any]:
    """MAE's save_model output ({"model", "optimizer", "epoch", "scaler", "args"}) of a
    MaskedAutoencoderViT: encoder (cls_token, pos_embed, patch_embed, blocks, norm) and decoder
    (decoder_embed, mask_token, decoder_pos_embed, decoder_blocks, decoder_norm, decoder_pred).
    Returns the retfound_mae options that build the same encoder."""
    _seeded(seed)
    encoder = timm.create_model(
        "vit_large_patch16_224", pretrained=False, num_classes=0, img_size=size, patch_size=patch, **VIT
    )
    state = dict(encoder.state_dict())
    assert "norm.weight" in state and "fc_norm.weight" not in state  # MAE's encoder ends in norm
    state["norm.weight"] = 1 + 0.1 * torch.randn(VIT["embed_dim"])  # trained, so not LayerNorm's init
    state["norm.bias"] = 0.1 * torch.randn(VIT["embed_dim"])
    tokens = (size // patch) ** 2 + 1
    dec = 16
    state["decoder_embed.weight"] = torch.randn(dec, VIT["embed_dim"])
    state["decoder_embed.bias"] = torch.zeros(dec)
    state["mask_token"] = torch.randn(1, 1, dec)
    state["decoder_pos_embed"] = torch.randn(1, tokens, dec)
    state.update(_prefixed("decoder_blocks.0.", Block(dec, 2, qkv_bias=True)))
    state["decoder_norm.weight"] = torch.ones(dec)
    state["decoder_norm.bias"] = torch.zeros(dec)
    state["decoder_pred.weight"] = torch.randn(patch * patch * 3, dec)
    state["decoder_pred.bias"] = torch.zeros(patch * patch * 3)
    checkpoint = {
        "model": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "weight_decay": 0.05}]},
        "epoch": 799,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0},
        "args": argparse.Namespace(model="mae_vit_large_patch16", input_size=size, mask_ratio=0.75),
    }
    torch.save(checkpoint, path)
    return {"img_size": size, "timm_kwargs": {"patch_size": patch, **VIT}}


def retfound_dinov2(
    path: Path, grid: int = 3, depth: int = 4, chunks: int = 2, seed: int = 0
) -> dict[str, Any]:
    """DINOv2's teacher checkpoint {"teacher": ...}: a ``backbone.`` ViT with layer scale and mask token,
    blocks chunked as DINOv2's block_chunks saves them (blocks.<chunk>.<i>), the DINO and iBOT heads.
    Trained at ``grid`` x ``grid`` patches of 14 px; the options build it at 2 x 2 (the position
    embedding is resampled, as RETFound does from 518 px to 224). ``chunks`` 0: blocks.<i>."""
    _seeded(seed)
    vit = {**VIT, "depth": depth}
    backbone = timm.create_model(
        "vit_large_patch14_dinov2", pretrained=False, num_classes=0, img_size=14 * grid, **vit
    )
    state = {}
    per_chunk = depth // chunks if chunks else depth
    for key, value in backbone.state_dict().items():
        if chunks and key.startswith("blocks."):
            i = int(key.split(".")[1])
            key = f"blocks.{i // per_chunk}.{key[len('blocks.') :]}"
        state[f"backbone.{key}"] = value.clone()
    state["backbone.mask_token"] = torch.zeros(1, VIT["embed_dim"])
    for head in ("dino_head", "ibot_head"):
        state[f"{head}.mlp.0.weight"] = torch.randn(64, VIT["embed_dim"])
        state[f"{head}.mlp.0.bias"] = torch.zeros(64)
        state[f"{head}.last_layer.weight_g"] = torch.ones(128, 1)
        state[f"{head}.last_layer.weight_v"] = torch.randn(128, 64)
    torch.save({"teacher": state}, path)
    return {"img_size": 28, "timm_kwargs": vit}


def retfound_green(path: Path, size: int = 28, seed: int = 0) -> dict[str, Any]:
    """retfoundgreen_statedict.pth: the state dict of timm's vit_small_patch14_reg4_dinov2 built with
    num_classes=0 (no head), as its README loads it."""
    _seeded(seed)
    model = timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=size, **VIT
    )
    torch.save(model.state_dict(), path)
    return {"img_size": size, "timm_kwargs": dict(VIT)}


def bert_dir(root: Path, seed: int = 0) -> tuple[Path, BertModel]:
    """A tiny BERT folder as a local copy of Bio_ClinicalBERT would be (config.json, tokenizer files),
    without weights: FLAIR's file carries them. Returns the folder and a BERT (with pooler) of that shape."""
    _seeded(seed)
    tokenizer = tiny_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    root.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root, BertModel(config).eval()


def flair(path: Path, text_dir: Path, dim: int = 16, seed: int = 0) -> dict[str, Any]:
    """FLAIRModel.state_dict(): vision_model.model (torchvision ResNet with Bottleneck blocks, fc an
    Identity, here one block per stage), the bias-free projections, text_model.model (a BERT with its
    pooler, and the position_ids buffer transformers saved before 4.31) and logit_scale = ln(1/0.07)."""
    _seeded(seed)
    resnet = ResNet(Bottleneck, [1, 1, 1, 1])
    resnet.fc = nn.Identity()
    _, bert = bert_dir(text_dir, seed)
    state = _prefixed("vision_model.model.", resnet)
    state["vision_model.projection_head_vision.projection.weight"] = torch.randn(dim, 2048) * 0.02
    state.update(_prefixed("text_model.model.", bert))
    state["text_model.model.embeddings.position_ids"] = torch.arange(128)[None]
    state["text_model.projection_head_text.projection.weight"] = torch.randn(dim, 32) * 0.2
    state["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    torch.save(state, path)
    return {"text": str(text_dir), "image_size": 32}


TINY_CLIP = "tiny-clip-test"


def open_clip_files(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """An open_clip model config JSON (a 2-block ViT and text transformer, open_clip's own 49,408-token
    BPE) and a checkpoint of it written by open_clip itself: (config, weights)."""
    import open_clip

    root.mkdir(parents=True, exist_ok=True)
    config = root / f"{TINY_CLIP}.json"
    config.write_text(
        json.dumps(
            {
                "embed_dim": 16,
                "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
            }
        )
    )
    open_clip.add_model_config(config)
    _seeded(seed)
    weights = root / "tiny_clip.pt"
    torch.save(open_clip.create_model(TINY_CLIP).state_dict(), weights)
    return config, weights


def timm_vit(path: Path, seed: int = 0) -> dict[str, Any]:
    """A timm state dict with its classifier (head.*), as a model saved after ImageNet training."""
    _seeded(seed)
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2}
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).state_dict(), path)
    return {"kwargs": kwargs}
