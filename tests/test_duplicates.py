"""loss.duplicates: identical reports are not negatives, exactly, on any number of ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import run_gloo_ranks, tiny_model_config

from retclip_dist.data.config import DataConfig
from retclip_dist.data.samples import REPORT_HASH, Patient, collate, token_hash
from retclip_dist.loss import TripartiteLoss, duplicate_mask
from retclip_dist.model.tokenizer import build_tokenizer
from retclip_dist.model.vocab import write_vocab

WORLD = 2
ROWS = 4  # per rank
DIM = 5
TIMEOUT_S = 30
# Per level, the global batch's report groups: duplicates inside a rank and across the two ranks.
GROUPS = torch.tensor(
    [
        [1, 7, 7],
        [2, 8, 9],
        [3, 7, 9],
        [1, 9, 8],  # rank 0: rows 0-3
        [2, 7, 7],
        [5, 8, 6],
        [1, 9, 9],
        [6, 6, 6],  # rank 1: rows 4-7
    ],
    dtype=torch.int64,
)


def _features(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        F.normalize(torch.randn(WORLD * ROWS, DIM, generator=g, dtype=torch.float64), dim=-1)
        for _ in range(3)
    ]


def _scales() -> list[torch.Tensor]:
    return [torch.tensor([s], dtype=torch.float64) for s in (3.0, 5.0, 7.0)]


def _hand_masked_infonce(image: torch.Tensor, text: torch.Tensor, scale: float, groups: list[int]) -> float:
    """Each row's softmax over its own column and the columns with another report, written as loops."""
    n = len(groups)
    total = 0.0
    for a, b in ((image, text), (text, image)):
        for i in range(n):
            logits = [scale * float(a[i] @ b[j]) for j in range(n)]
            kept = [logits[j] for j in range(n) if j == i or groups[j] != groups[i]]
            total += -logits[i] + math.log(sum(math.exp(v) for v in kept))
    return total / (2 * n)


def test_token_hash_is_a_stable_hash_of_the_ids():
    assert token_hash([2, 5, 3]) == token_hash([2, 5, 3]) and -(2**63) <= token_hash([2, 5, 3]) < 2**63
    assert token_hash([2, 5, 3]) != token_hash([2, 3, 5]) != token_hash([2, 5, 3, 0])
    # The same in every process and run (not Python's salted hash): a fixed value.
    assert token_hash([2, 3]) == token_hash(np.array([2, 3]).tolist()) == 2068279573001530991


def _patients(reports: list[dict[str, str]]) -> list[Patient]:
    image = torch.zeros(3, 4, 4)
    return [Patient(f"p{i}", {"left": image, "right": image}, None, r) for i, r in enumerate(reports)]


@pytest.fixture
def tokenizer(tmp_path):
    return build_tokenizer(tiny_model_config(write_vocab(tmp_path / "v.txt", ["a", "b", "c"])))


@pytest.mark.parametrize("eye_reports", [True, False])
def test_collate_hashes_the_ids_each_level_reads(tokenizer, eye_reports):
    patients = _patients(
        [{"patient": "A b", "left": "a", "right": "b"}, {"patient": "a  b", "left": "b", "right": "b"}]
    )
    batch = collate(patients, tokenizer, DataConfig(context_length=8, eye_reports=eye_reports), False)
    h = batch[REPORT_HASH]
    ids = {t: tokenizer(t)["input_ids"] for t in ("a b", "a", "b")}
    assert h.dtype == torch.int64 and h.shape == (2, 3)
    assert h[0, 0] == h[1, 0] == token_hash(ids["a b"])  # case and spacing are normalised away
    assert batch["input_ids"][0, : len(ids["a b"])].tolist() == ids["a b"]  # what the hash read
    if eye_reports:
        assert h.tolist() == [
            [token_hash(ids[t]) for t in ("a b", "a", "b")],
            [token_hash(ids[t]) for t in ("a b", "b", "b")],
        ]
    else:  # the eye heads read the patient report
        assert (h == token_hash(ids["a b"])).all()


def test_reports_equal_in_their_first_context_length_tokens_are_duplicates(tokenizer):
    """Two long reports that differ only past context_length reach the tower as the same ids: the loss
    must not push them apart. At each eye level the eye report the head reads decides."""
    shared = "a b c a b c"  # with [CLS] and [SEP]: 8 tokens, the whole context
    reports = [
        {"patient": f"{shared} a a a", "left": "a " * 9, "right": "b"},
        {"patient": f"{shared} b b b", "left": "a " * 7 + "c c", "right": "c"},  # left: same first 6 words
        {"patient": f"a {shared}", "left": "a", "right": "b"},  # differs inside the context
    ]
    cfg = DataConfig(context_length=8, eye_reports=True)
    batch = collate(_patients(reports), tokenizer, cfg, False)
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])  # the tower sees one input
    h = batch[REPORT_HASH]
    same = [[h[i, level] == h[j, level] for i, j in ((0, 1), (0, 2), (1, 2))] for level in range(3)]
    assert same == [[True, False, False], [True, False, False], [False, True, False]]
    # The mask the loss builds from them: row 0 leaves out column 1 at the patient and left levels only.
    masks = [duplicate_mask(h[:, level], h[:, level], 0) for level in range(3)]
    assert [m[0].tolist() for m in masks] == [
        [False, True, False],
        [False, True, False],
        [False, False, True],
    ]
    # The cleaned texts differ: hashing them (as before) would have kept the pair as negatives.
    assert reports[0]["patient"] != reports[1]["patient"]
    # With a longer context the same reports are different inputs, and no longer duplicates.
    longer = collate(_patients(reports), tokenizer, DataConfig(context_length=16, eye_reports=True), False)
    assert longer[REPORT_HASH][0, 0] != longer[REPORT_HASH][1, 0]


@pytest.mark.parametrize("gather", [True, False])
def test_loss_equals_hand_computed_masked_infonce(gather):
    image, text, scales = _features(1), _features(2), _scales()
    total, parts = TripartiteLoss("infonce", gather=gather, duplicates="mask")(
        image, text, scales, report_hash=GROUPS
    )
    expected = {}
    for i, level in enumerate(("patient", "left", "right")):
        expected[level] = _hand_masked_infonce(image[i], text[i], scales[i].item(), GROUPS[:, i].tolist())
        assert parts[level].item() == pytest.approx(expected[level], rel=1e-12, abs=0), level
    assert total.item() == pytest.approx(sum(expected.values()), rel=1e-12)
    # "keep" is the plain InfoNCE, and it differs here: the mask did something.
    kept, _ = TripartiteLoss("infonce", gather=gather, duplicates="keep")(image, text, scales)
    no_groups = list(range(WORLD * ROWS))
    plain = sum(_hand_masked_infonce(image[i], text[i], scales[i].item(), no_groups) for i in range(3))
    assert kept.item() == pytest.approx(plain, rel=1e-12)
    assert abs(kept.item() - total.item()) > 1e-3


def test_sigmoid_mask_leaves_duplicate_pairs_out():
    image, text, scales = _features(3), _features(4), _scales()
    biases = [torch.tensor([-1.0], dtype=torch.float64)] * 3
    _, parts = TripartiteLoss("sigmoid", duplicates="mask")(image, text, scales, biases, report_hash=GROUPS)
    for i, level in enumerate(("patient", "left", "right")):
        groups = GROUPS[:, i].tolist()
        n = len(groups)
        value = 0.0
        for r in range(n):
            for c in range(n):
                if c != r and groups[c] == groups[r]:
                    continue
                logit = scales[i].item() * float(image[i][r] @ text[i][c]) - 1.0
                value += -math.log(1 / (1 + math.exp(-(1 if r == c else -1) * logit)))
        assert parts[level].item() == pytest.approx(value / n, rel=1e-12), level


def test_mask_needs_the_hashes():
    image, text, scales = _features(1), _features(2), _scales()
    with pytest.raises(ValueError, match="needs report_hash"):
        TripartiteLoss(duplicates="mask")(image, text, scales)


@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
def test_one_report_for_the_whole_batch_has_finite_gradients(kind):
    image = [x.float().requires_grad_() for x in _features(5)]
    text = [x.float().requires_grad_() for x in _features(6)]
    scales = [torch.tensor([4.0], requires_grad=True) for _ in range(3)]
    biases = [torch.tensor([-2.0], requires_grad=True) for _ in range(3)] if kind == "sigmoid" else None
    same = torch.full((WORLD * ROWS, 3), 42, dtype=torch.int64)
    total, _ = TripartiteLoss(kind, duplicates="mask")(image, text, scales, biases, report_hash=same)
    total.backward()
    assert torch.isfinite(total)
    if kind == "infonce":
        assert total.item() == 0.0  # each row's softmax holds only its own pair
    for t in [*image, *text, *scales, *(biases or [])]:
        assert t.grad is not None and torch.isfinite(t.grad).all()


def _check_two_ranks_equal_one(rank: int) -> None:
    for kind in ("infonce", "sigmoid"):
        image, text, scales = _features(11), _features(12), _scales()
        biases = [torch.tensor([-1.5], dtype=torch.float64)] * 3 if kind == "sigmoid" else None
        ref_img = [x.clone().requires_grad_() for x in image]
        ref_txt = [x.clone().requires_grad_() for x in text]
        # One process on the whole batch (no process group is used with gather=False).
        ref, ref_parts = TripartiteLoss(kind, gather=False, duplicates="mask")(
            ref_img, ref_txt, scales, biases, report_hash=GROUPS
        )
        ref.backward()
        local = slice(rank * ROWS, (rank + 1) * ROWS)
        img = [x[local].clone().requires_grad_() for x in image]
        txt = [x[local].clone().requires_grad_() for x in text]
        total, parts = TripartiteLoss(kind, duplicates="mask")(
            img, txt, scales, biases, report_hash=GROUPS[local]
        )
        total.backward()
        mean = torch.stack([total.detach(), *parts.values()])
        dist.all_reduce(mean)
        want = torch.stack([ref.detach(), *ref_parts.values()])
        torch.testing.assert_close(mean / WORLD, want, rtol=0, atol=1e-12, msg=kind)
        # Every local feature gets its gradient, through the gather's backward where it only reaches the
        # loss gathered (the sigmoid kind's texts): a None here is a tower that would not learn.
        for mine, whole in zip([*img, *txt], [*ref_img, *ref_txt], strict=True):
            assert mine.grad is not None, kind
            torch.testing.assert_close(mine.grad / WORLD, whole.grad[local], rtol=0, atol=1e-12, msg=kind)


def test_two_ranks_equal_one_with_duplicates_across_ranks(tmp_path):
    run_gloo_ranks(_check_two_ranks_equal_one, WORLD, tmp_path, TIMEOUT_S)
