"""data.text_padding: a batch padded to its longest report gives the loss of fixed context_length padding."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_config

from retclip_dist.data.config import DataConfig
from retclip_dist.data.samples import (
    REPORT_HASH,
    TEXT_PAD_MULTIPLE,
    Patient,
    clean_report,
    collate,
    text_length,
)
from retclip_dist.loss import TripartiteLoss
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.tokenizer import build_tokenizer
from retclip_dist.model.vocab import write_vocab

CONTEXT = 64
WORDS = ["a", "b", "c", "d", "e", "f"]
# Patient reports of 3 to 21 tokens with [CLS]/[SEP]; eye reports of other lengths; two duplicates.
REPORTS = [
    ("a b c", "a", "b c d e f a b c d e f a b c d e f a b c"),
    ("a b c", "b", "b"),
    ("d e f a b c d e f a b c d e f a b c d e f a b", "c c", "d"),
    ("f", "a b", "e e e"),
]
TOKEN_KEYS = [f"{prefix}{k}" for prefix in ("", "left_", "right_") for k in ("input_ids", "attention_mask")]


def _patients(image_size: int) -> list[Patient]:
    g = torch.Generator().manual_seed(0)
    return [
        Patient(
            f"p{i}",
            {eye: torch.randn(3, image_size, image_size, generator=g) for eye in ("left", "right")},
            None,
            {"patient": p, "left": left, "right": right},
        )
        for i, (p, left, right) in enumerate(REPORTS)
    ]


def _vocab(tmp_path):
    return write_vocab(tmp_path / "v.txt", WORDS)


def test_text_length_rounds_up_and_caps():
    cfg = DataConfig(context_length=100, text_padding="batch")
    assert TEXT_PAD_MULTIPLE == 16
    assert [text_length([n], cfg) for n in (1, 16, 17, 32, 33, 96, 97, 100)] == [
        16,
        16,
        32,
        32,
        48,
        96,
        100,
        100,
    ]
    assert text_length([3, 40, 7], cfg) == 48
    assert text_length([3], DataConfig(context_length=100, text_padding="max")) == 100


def test_max_padding_equals_the_tokenizer_fixed_padding(tmp_path):
    tokenizer = build_tokenizer(tiny_model_config(_vocab(tmp_path)))
    cfg = DataConfig(context_length=CONTEXT, eye_reports=True, text_padding="max")
    batch = collate(_patients(4), tokenizer, cfg, False)
    for prefix, column in (("", 0), ("left_", 1), ("right_", 2)):
        ref = tokenizer(
            [clean_report(r[column]) for r in REPORTS],
            padding="max_length",
            truncation=True,
            max_length=CONTEXT,
            return_tensors="pt",
        )
        assert torch.equal(batch[f"{prefix}input_ids"], ref["input_ids"])
        assert torch.equal(batch[f"{prefix}attention_mask"], ref["attention_mask"])


@pytest.mark.parametrize("eye_reports", [True, False])
def test_batch_padding_is_a_prefix_of_max_padding(tmp_path, eye_reports):
    tokenizer = build_tokenizer(tiny_model_config(_vocab(tmp_path)))
    patients = _patients(4)
    fixed = collate(
        patients,
        tokenizer,
        DataConfig(context_length=CONTEXT, eye_reports=eye_reports, text_padding="max"),
        False,
    )
    short = collate(patients, tokenizer, DataConfig(context_length=CONTEXT, eye_reports=eye_reports), False)
    # Longest text: 23 words + [CLS] + [SEP] = 25 tokens (the third patient report) -> 32 for all levels.
    keys = TOKEN_KEYS if eye_reports else TOKEN_KEYS[:2]
    for key in keys:
        assert short[key].shape == (4, 32), key
        assert torch.equal(short[key], fixed[key][:, :32]), key
    assert fixed["attention_mask"][:, 32:].sum() == 0  # what was cut was padding only
    assert torch.equal(short[REPORT_HASH], fixed[REPORT_HASH])
    assert not eye_reports or "left_input_ids" in short


def test_batch_padding_caps_at_context_length(tmp_path):
    tokenizer = build_tokenizer(tiny_model_config(_vocab(tmp_path)))
    short = collate(_patients(4), tokenizer, DataConfig(context_length=20, eye_reports=True), False)
    assert short["input_ids"].shape == (4, 20)  # truncated reports fill it, never more than context_length


@pytest.mark.parametrize("eye_reports", [True, False])
def test_same_loss_and_gradients_as_fixed_padding(tmp_path, eye_reports):
    mcfg = tiny_model_config(_vocab(tmp_path))
    tokenizer = build_tokenizer(mcfg)
    torch.manual_seed(0)
    model = RetClip(mcfg).train()  # dropout is off in the tiny config
    loss_fn = TripartiteLoss("infonce", gather=False, duplicates="mask")
    patients = _patients(32)
    results = {}
    for padding in ("max", "batch"):
        cfg = DataConfig(context_length=CONTEXT, eye_reports=eye_reports, text_padding=padding)
        batch = collate(patients, tokenizer, cfg, False)
        model.zero_grad()
        loss, _ = loss_fn(*model(batch), report_hash=batch[REPORT_HASH])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[padding] = (batch["input_ids"].shape[1], loss.detach(), grads)
    assert results["max"][0] == CONTEXT and results["batch"][0] == 32
    assert torch.allclose(results["batch"][1], results["max"][1], rtol=0, atol=1e-5)
    assert results["batch"][2].keys() == results["max"][2].keys()
    for name, grad in results["max"][2].items():
        assert torch.allclose(results["batch"][2][name], grad, rtol=1e-4, atol=1e-5), name
