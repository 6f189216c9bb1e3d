"""model.grad_checkpointing off | selective | full: same outputs and gradients, and selective recomputes
exactly every other block of both towers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model_config

from retclip_dist.config import ConfigError, from_dict
from retclip_dist.model.checkpointing import is_block_checkpointed, tower_blocks
from retclip_dist.model.config import ModelConfig, checkpointing_mode
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.tokenizer import build_tokenizer
from retclip_dist.model.vocab import write_vocab

DEPTH = 4  # both towers: selective checkpoints blocks 0 and 2


def _cfg(tmp_path, mode) -> ModelConfig:
    cfg = tiny_model_config(write_vocab(tmp_path / "v.txt", ["drusen", "cup", "disc", "left", "right"]))
    cfg.vision_kwargs["depth"] = DEPTH
    cfg.text_config["num_hidden_layers"] = DEPTH
    cfg.grad_checkpointing = mode
    return cfg


def _batch(cfg: ModelConfig) -> dict:
    gen = torch.Generator().manual_seed(0)
    tok = build_tokenizer(cfg)
    enc = tok(["drusen left", "cup disc right", "disc"], padding=True, return_tensors="pt")
    batch = {
        "left": torch.randn(3, 3, 32, 32, generator=gen),
        "right": torch.randn(3, 3, 32, 32, generator=gen),
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
    }
    eye = tok(["cup", "left drusen", "right"], padding=True, return_tensors="pt")
    batch["left_input_ids"], batch["left_attention_mask"] = eye["input_ids"], eye["attention_mask"]
    return batch


def _count_inner_calls(model: RetClip) -> dict[str, list[int]]:
    # A recomputed block runs its submodules again (through their __call__, so hooks see it): count the
    # MLP of each ViT block and the intermediate (MLP) layer of each BERT layer. Pre-hooks: recomputation
    # stops as soon as the last saved tensor is back, which is inside the ViT MLP (before its hook would run).
    counts = {"vision": [0] * DEPTH, "text": [0] * DEPTH}
    for name, inner in (
        ("vision", [b.mlp for b in tower_blocks(model.visual)]),
        ("text", [layer.intermediate for layer in tower_blocks(model.text)]),
    ):
        for i, module in enumerate(inner):

            def hook(*_, name=name, i=i):
                counts[name][i] += 1

            module.register_forward_pre_hook(hook)
    return counts


def _run(model: RetClip, batch: dict):
    model.train()
    model.zero_grad()
    out = model(batch)
    loss = sum(
        (i + 1) * (img * txt).sum() for i, (img, txt) in enumerate(zip(out.image, out.text, strict=True))
    )
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_modes_and_old_booleans():
    assert [checkpointing_mode(v) for v in (True, False, "off", "selective", "full")] == [
        "full",
        "off",
        "off",
        "selective",
        "full",
    ]
    assert from_dict(ModelConfig, {"grad_checkpointing": True}).grad_checkpointing == "full"
    assert from_dict(ModelConfig, {"grad_checkpointing": False}).grad_checkpointing == "off"
    assert from_dict(ModelConfig, {"grad_checkpointing": "selective"}).grad_checkpointing == "selective"
    with pytest.raises(ConfigError, match="grad_checkpointing"):
        from_dict(ModelConfig, {"grad_checkpointing": "some"})


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_same_outputs_and_gradients_as_without(tmp_path, mode):
    torch.manual_seed(3)
    plain = RetClip(_cfg(tmp_path, "off"))
    torch.manual_seed(3)
    ckpt = RetClip(_cfg(tmp_path, mode))
    batch = _batch(plain.config)
    out_a, grads_a = _run(plain, batch)
    out_b, grads_b = _run(ckpt, batch)
    for a, b in zip((*out_a.image, *out_a.text), (*out_b.image, *out_b.text), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and any("encoder.layer.2" in n for n in grads_a)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("mode", "recomputed"),
    [("off", [False] * DEPTH), ("selective", [True, False, True, False])],
)
def test_selective_recomputes_every_other_block_of_both_towers(tmp_path, mode, recomputed):
    model = RetClip(_cfg(tmp_path, mode))
    counts = _count_inner_calls(model)
    batch = _batch(model.config)
    model.train()
    out = model(batch)
    # Forward: every block once per text input (patient + left eye report, the right eye reuses the patient)
    # and once for the image batch (both eyes go through the tower together).
    assert counts == {"vision": [1] * DEPTH, "text": [2] * DEPTH}
    sum(f.sum() for f in (*out.image, *out.text)).backward()
    assert counts["vision"] == [2 if r else 1 for r in recomputed]
    assert counts["text"] == [4 if r else 2 for r in recomputed]
    flags = [is_block_checkpointed(b) for b in tower_blocks(model.visual) + tower_blocks(model.text)]
    assert flags == recomputed * 2


def test_selective_keeps_names_state_and_survives_deepcopy(tmp_path):
    plain = RetClip(_cfg(tmp_path, "off"))
    selective = RetClip(_cfg(tmp_path, "selective"))
    assert list(plain.state_dict()) == list(selective.state_dict())
    twin = copy.deepcopy(selective)
    blocks = tower_blocks(twin.visual)
    assert is_block_checkpointed(blocks[0]) and blocks[0].forward.__self__ is blocks[0]
    # Switching modes at run time undoes the selection; evaluation runs without recomputation.
    selective.set_grad_checkpointing("off")
    assert not any(
        is_block_checkpointed(b) for b in tower_blocks(selective.visual) + tower_blocks(selective.text)
    )
    selective.set_grad_checkpointing(True)
    assert selective.visual.grad_checkpointing
    assert not any(is_block_checkpointed(b) for b in tower_blocks(selective.visual))
