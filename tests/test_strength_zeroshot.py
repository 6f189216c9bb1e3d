"""Zero-shot against hand computations where the three text heads differ from each other.

Pairing every image head with one text head (or one logit scale) changes these numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VOCAB, tiny_model_config

from retclip_dist.eval.zeroshot import class_embeddings, zero_shot_probs
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> RetClip:
    torch.manual_seed(0)
    return RetClip(tiny_model_config(TINY_VOCAB, image_size=16)).eval()


def _set_scales(model: RetClip, **scales: float) -> None:
    with torch.no_grad():
        for head, value in scales.items():
            model.logit_scale[head].fill_(math.log(value))


def test_zero_shot_probs_pair_each_image_head_with_its_own_text_head(tiny_model):
    _set_scales(tiny_model, patient=10.0, left=2.0, right=5.0)
    # Two classes in 2-d; each text head places them differently.
    emb = {
        "patient": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        "left": torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
        "right": torch.tensor([[0.6, 0.8], [0.8, -0.6]]),
    }
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    heads = ["left", "right", "right", "patient"]
    probs = zero_shot_probs(tiny_model, features, heads, emb)

    def softmax2(a: float, b: float) -> list[float]:
        return [1 / (1 + math.exp(b - a)), 1 / (1 + math.exp(a - b))]

    expected = [
        softmax2(2 * 0.0, 2 * 1.0),  # left row [1, 0]: cosines 0 and 1, scale 2
        softmax2(5 * 0.6, 5 * 0.8),  # right row [1, 0]: cosines 0.6 and 0.8, scale 5
        softmax2(5 * 0.8, 5 * -0.6),  # right row [0, 1]: cosines 0.8 and -0.6
        softmax2(10 * 0.0, 10 * 1.0),  # patient row [0, 1]: cosines 0 and 1, scale 10
    ]
    torch.testing.assert_close(probs, torch.tensor(expected), rtol=0, atol=1e-6)


def test_class_embeddings_come_from_the_matching_text_head(tiny_model):
    # Two prompts per class, lower case words of the vocabulary (nothing for prompt cleaning to change).
    prompts = {
        "none": ["no diabetic retinopathy .", "normal ."],
        "some": ["haemorrhages .", "hard exudates and drusen ."],
    }
    classes = ["some", "none"]
    emb = class_embeddings(tiny_model, prompts, classes, 32)
    tokenizer = build_tokenizer(tiny_model.config)
    for head in ("patient", "left", "right"):
        expected = []
        for name in classes:
            # One prompt at a time (no padding): each head's own features, averaged and re-normalised.
            rows = []
            for prompt in prompts[name]:
                tokens = tokenizer([prompt], return_tensors="pt")
                with torch.no_grad():
                    levels = tiny_model.encode_text(tokens["input_ids"], tokens["attention_mask"])
                rows.append(getattr(levels, head)[0])
            expected.append(F.normalize(torch.stack(rows).mean(0), dim=-1))
        torch.testing.assert_close(emb[head], torch.stack(expected), rtol=0, atol=1e-5, msg=head)
    # The heads really differ, so a mix-up of heads cannot pass unnoticed.
    for a, b in (("patient", "left"), ("patient", "right"), ("left", "right")):
        assert (emb[a] - emb[b]).abs().max() > 0.1, (a, b)
