"""Evaluation numbers against hand computations where a plausible bug would change them.

Unequal class supports (a support-weighted mean is not the macro mean), zero-shot text heads that differ
from each other (pairing every image head with one text head changes the probabilities), and the
decompression-bomb limit at exactly the limit and one pixel over.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retclip_dist import synth
from retclip_dist.eval.metrics import multiclass_metrics, multilabel_metrics, selection_score
from retclip_dist.eval.zeroshot import class_embeddings, zero_shot_probs
from retclip_dist.model.config import tiny_model_config, write_vocab
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.tokenizer import build_tokenizer


def test_multiclass_macro_metrics_on_unequal_supports_match_hand_computation():
    # Supports 3, 2, 1. One-vs-rest AUROC counts (positive, negative) pairs ordered right:
    #   a: positives 0.6 0.5 0.2 vs negatives 0.3 0.45 0.1 -> 3 + 3 + 1 = 7 of 9
    #   b: positives 0.6 0.4 vs negatives 0.3 0.2 0.5 0.2 -> 4 + 3 = 7 of 8
    #   c: positive 0.7 above all five negatives -> 1
    # AP: a ranks P P N N P N -> (1 + 1 + 3/5) / 3 = 13/15; b ranks P N P ... -> (1 + 2/3) / 2 = 5/6; c 1.
    labels = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array(
        [
            [0.6, 0.3, 0.1],
            [0.5, 0.2, 0.3],
            [0.2, 0.5, 0.3],
            [0.3, 0.6, 0.1],
            [0.45, 0.4, 0.15],
            [0.1, 0.2, 0.7],
        ]
    )
    m = multiclass_metrics(labels, probs, ["a", "b", "c"])
    assert [m["per_class"][c]["support"] for c in "abc"] == [3, 2, 1]
    assert [m["per_class"][c]["auroc"] for c in "abc"] == pytest.approx([7 / 9, 7 / 8, 1.0])
    assert [m["per_class"][c]["auprc"] for c in "abc"] == pytest.approx([13 / 15, 5 / 6, 1.0])
    # Argmax predicts a a b b a c: F1(a) = 2*2 / (2*2 + 1 + 1), F1(b) = 2*1 / (2*1 + 1 + 1), F1(c) = 1.
    assert [m["per_class"][c]["f1"] for c in "abc"] == pytest.approx([2 / 3, 1 / 2, 1.0])
    overall = m["overall"]
    # Macro: the plain mean over classes. Weighted by support these would be 0.847, 0.878 and 2/3.
    assert overall["macro_auroc"] == pytest.approx((7 / 9 + 7 / 8 + 1) / 3)
    assert overall["macro_auprc"] == pytest.approx((13 / 15 + 5 / 6 + 1) / 3)
    assert overall["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert overall["accuracy"] == pytest.approx(4 / 6)


def test_multilabel_macro_metrics_on_unequal_supports_match_hand_computation():
    # x: 4 positives (0.9 0.5 0.6 0.8) all above its one negative (0.4) -> AUROC 1, AP 1.
    # y: 1 positive (0.6) above 0.2 0.1 0.5, below 0.7 -> AUROC 3/4; ranked N P ... -> AP 1/2.
    labels = np.array([[1, 0], [1, 1], [1, 0], [0, 0], [1, 0]])
    probs = np.array([[0.9, 0.2], [0.5, 0.6], [0.6, 0.7], [0.4, 0.1], [0.8, 0.5]])
    m = multilabel_metrics(labels, probs, ["x", "y"])
    assert [m["per_class"][c]["support"] for c in "xy"] == [4, 1]
    assert [m["per_class"][c]["auroc"] for c in "xy"] == pytest.approx([1.0, 0.75])
    overall = m["overall"]
    # Macro means; weighted by support they would be 0.95 and 0.9.
    assert overall["macro_auroc"] == pytest.approx(0.875)
    assert overall["mAP"] == pytest.approx(0.75)
    # At 0.5, x is predicted exactly (F1 1, accuracy 1); y predicts rows 1, 2 and 4 (0.5 counts): tp 1,
    # fp 2 -> F1 1/2, accuracy 3/5. Rows 0, 1 and 3 are right in both labels.
    assert [m["per_class"][c]["f1"] for c in "xy"] == pytest.approx([1.0, 0.5])
    assert overall["macro_f1"] == pytest.approx(0.75)
    assert overall["accuracy"] == pytest.approx(0.8)
    assert overall["exact_match"] == pytest.approx(0.6)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> RetClip:
    vocab = write_vocab(tmp_path_factory.mktemp("zs") / "vocab.txt", synth.vocabulary())
    torch.manual_seed(0)
    return RetClip(tiny_model_config(vocab, image_size=16)).eval()


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


@pytest.mark.filterwarnings("ignore::UserWarning")  # scikit-learn: kappa is undefined on one label
def test_undefined_selection_metric_ranks_below_every_defined_one():
    # No class has both outcomes: AUROC is undefined, and a hyper-parameter that scored it must lose.
    m = multiclass_metrics(np.array([0, 0]), np.array([[0.9, 0.1], [0.8, 0.2]]), ["a", "b"])
    assert m["overall"]["macro_auroc"] is None
    assert selection_score(m, "macro_auroc") == float("-inf")
