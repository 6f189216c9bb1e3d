"""The release -> save_pretrained converter, checked against a re-implementation of the release forward.

We cannot download the published checkpoint, so the test builds one with the release's key names and
layouts at a small scale (ViT width 64, 2 blocks; BERT hidden 64, 2 layers; D = 32), computes features
the way the release's model.py does, and requires the converted RetClip to give the same numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig, BertModel

from retclip_dist import synth
from retclip_dist.model.config import write_vocab
from retclip_dist.model.convert_retclip import ConversionError, convert_release, infer_config
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.tokenizer import build_tokenizer

WIDTH, LAYERS, PATCH, RES, EMBED, HIDDEN = 64, 2, 8, 32, 32, 64


class ReleaseBlock(nn.Module):
    """The release's ResidualAttentionBlock: pre-LN, nn.MultiheadAttention, QuickGELU MLP."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, width // 64)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))


class ReleaseVisual(nn.Module):
    """The release's VisualTransformer (OpenAI CLIP layout), output = ln_post(cls) @ proj."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTH, PATCH, PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(WIDTH) * 0.1)
        self.positional_embedding = nn.Parameter(torch.randn((RES // PATCH) ** 2 + 1, WIDTH) * 0.1)
        self.ln_pre = nn.LayerNorm(WIDTH)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[ReleaseBlock(WIDTH) for _ in range(LAYERS)])
        self.ln_post = nn.LayerNorm(WIDTH)
        self.proj = nn.Parameter(torch.randn(WIDTH, EMBED) * WIDTH**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, EMBED))


class ReleaseClip(nn.Module):
    """The parameter names of the release's CLIP class (model.py), at test scale."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.visual = ReleaseVisual()
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=HIDDEN // 64,
            intermediate_size=128,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.bert = BertModel(config, add_pooling_layer=True)
        self.text_projection, self.text_projection_left, self.text_projection_right = _mlp(), _mlp(), _mlp()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(90)))
        self.logit_scale_left = nn.Parameter(torch.tensor(math.log(80)))
        self.logit_scale_right = nn.Parameter(torch.tensor(math.log(70)))
        self.global_feature_mapping = nn.Linear(2 * EMBED, EMBED, bias=False)
        self.left_feature_mapping = nn.Linear(EMBED, EMBED, bias=False)
        self.right_feature_mapping = nn.Linear(EMBED, EMBED, bias=False)

    def encode_image(self, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        fl, fr = self.visual(left), self.visual(right)
        out = (
            self.global_feature_mapping(torch.cat([fl, fr], 1)),
            self.left_feature_mapping(fl),
            self.right_feature_mapping(fr),
        )
        return tuple(F.normalize(t, dim=-1) for t in out)

    def encode_text(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cls = self.bert(ids, attention_mask=mask)[0][:, 0]
        heads = (self.text_projection, self.text_projection_left, self.text_projection_right)
        return tuple(F.normalize(h(cls), dim=-1) for h in heads)


@pytest.fixture
def release(tmp_path):
    vocab = write_vocab(tmp_path / "vocab.txt", synth.vocabulary())
    torch.manual_seed(0)
    reference = ReleaseClip(vocab_size=len(vocab.read_text().splitlines())).eval()
    # The release saves {"epoch", "step", "name", "state_dict" (DDP: "module." names), "optimizer"}.
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    checkpoint = tmp_path / "epoch_latest.pt"
    torch.save({"epoch": 10, "step": 7570, "name": "retclip", "state_dict": state}, checkpoint)
    return reference, checkpoint, vocab


def test_converted_model_reproduces_release_features(release, tmp_path):
    reference, checkpoint, vocab = release
    report = convert_release(checkpoint, vocab, tmp_path / "converted")
    assert report["vision"] == {
        "name": "vit_base_patch16_clip_quickgelu_224",
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 1,
    }
    assert report["embed_dim"] == 32
    assert report["dropped"] == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    model = RetClip.from_pretrained(tmp_path / "converted").eval()
    torch.manual_seed(1)
    left, right = torch.randn(3, 3, RES, RES), torch.randn(3, 3, RES, RES)
    tokens = build_tokenizer(model.config)(
        ["left eye: a few drusen.", "normal fundus", "multiple haemorrhages and hard exudates"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        ours_img = model.encode_image(left, right)
        ours_txt = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        ref_img = reference.encode_image(left, right)
        ref_txt = reference.encode_text(tokens["input_ids"], tokens["attention_mask"])
    for ours, ref in zip((*ours_img, *ours_txt), (*ref_img, *ref_txt), strict=True):
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    scales = {
        level: round(model.logit_scale[level].exp().item(), 3) for level in ("patient", "left", "right")
    }
    assert scales == {"patient": 90.0, "left": 80.0, "right": 70.0}


def test_infer_config_reads_shapes_and_rejects_resnet(release):
    reference, _, vocab = release
    state = reference.state_dict()
    cfg = infer_config(state, str(vocab))
    assert cfg.text_config["num_hidden_layers"] == 2
    assert cfg.text_config["intermediate_size"] == 128
    assert cfg.text_config["vocab_size"] == 42
    with pytest.raises(ConversionError, match=r"ck\.pt: a ResNet vision tower"):
        infer_config({**state, "visual.attnpool.c_proj.weight": torch.zeros(1)}, str(vocab), "ck.pt")


def test_unknown_or_missing_tensors_are_named(release, tmp_path):
    reference, _, vocab = release
    state = reference.state_dict()
    extra = tmp_path / "extra.pt"
    torch.save({**state, "teacher.fc.weight": torch.zeros(2)}, extra)
    with pytest.raises(ConversionError, match=r"does not know: \['teacher.fc.weight'\]"):
        convert_release(extra, vocab, tmp_path / "out1")
    short = tmp_path / "short.pt"
    torch.save({k: v for k, v in state.items() if k != "left_feature_mapping.weight"}, short)
    with pytest.raises(ConversionError, match=r"no tensor 'left_feature_mapping\.weight'"):
        convert_release(short, vocab, tmp_path / "out2")
