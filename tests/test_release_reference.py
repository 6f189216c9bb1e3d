"""Our model, loss and optimiser against an independent reference of the release (tests/release_reference).

From identical weights (the reference's state dict, converted) and an identical batch, in float64 so that
1e-5 relative is a statement about the maths and not about rounding: the loss of each level, the gradient
of every tensor, and the update of one SGD step and of one AdamW step (with the release's decay rule and
clamp) agree at every level, the shared image projection included.
"""

from __future__ import annotations

import copy

import pytest
import torch
from release_reference import (
    ReleaseClip,
    adamw_first_step,
    release_decays,
    release_losses,
    sgd_step,
    write_release_vocab,
)

from retclip_dist import synth
from retclip_dist.loss import TripartiteLoss, infonce_local
from retclip_dist.model.config import LEVELS
from retclip_dist.model.convert_retclip import convert_state_dict, infer_config
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.tokenizer import build_tokenizer
from retclip_dist.train.optim import exempt_from_decay, param_groups

RTOL = 1e-5
LR_SGD, LR_ADAMW, WD, BETAS, EPS = 0.05, 1e-3, 0.1, (0.9, 0.98), 1e-6
REPORTS = [
    "left eye: a few drusen.",
    "normal fundus",
    "multiple haemorrhages and hard exudates",
    "cup disc ratio 0.7, right eye",
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(reference, ours, batch): the same weights in both, float64, train mode (no dropout anywhere)."""
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    size = write_release_vocab(vocab, synth.vocabulary())
    torch.manual_seed(0)
    reference = ReleaseClip(vocab_size=size)
    with torch.no_grad():
        reference.logit_scale.fill_(4.6)  # near the clamp's top, as CLIP's ln 100 start is
    state = reference.state_dict()
    cfg = infer_config(state, str(vocab))
    # The release's BERT config has dropout 0.1 (so has the converted one); off here, as in the reference,
    # so that train-mode forwards are deterministic.
    cfg.text_config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ours = RetClip(cfg)
    ours.load_state_dict(convert_state_dict(state, ours)[0], strict=True)
    tokens = build_tokenizer(ours.config)(REPORTS, padding=True, return_tensors="pt")
    gen = torch.Generator().manual_seed(1)
    batch = {
        "left": torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64),
        "right": torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64),
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
    }
    return reference.double().train(), ours.double().train(), batch, state


def _ours_losses(model: RetClip, batch) -> dict[str, torch.Tensor]:
    """Per-level losses with a graph each: ``infonce_local`` with the local rows as their own columns (what
    TripartiteLoss(gather=False) computes per level), checked equal to TripartiteLoss's own numbers."""
    out = model(batch)
    total, parts = TripartiteLoss("infonce", gather=False)(*out)
    losses = {
        level: infonce_local(out.image[i], out.text[i], out.image[i], out.text[i], out.logit_scale[i], 0)
        for i, level in enumerate(LEVELS)
    }
    losses["total"] = total
    for level in LEVELS:
        assert torch.equal(parts[level], losses[level].detach())
    return losses


def _backward(loss: torch.Tensor, model: torch.nn.Module) -> None:
    """Backward, then zero gradients for tensors the level does not use (e.g. the right head for the left
    level), so that both optimisers treat every tensor alike (AdamW skips tensors without a gradient)."""
    loss.backward()
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def _grads_by_release_name(model: ReleaseClip) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _in_our_names(tensors: dict[str, torch.Tensor], model: RetClip) -> dict[str, torch.Tensor]:
    """Release-named tensors (gradients, updates) mapped and laid out like our parameters."""
    return convert_state_dict(tensors, model)[0]


def _assert_rel(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], what: str) -> None:
    """Every tensor within RTOL of the reference, relative to the reference tensor's norm."""
    assert ours.keys() == ref.keys()
    for name in ours:
        scale = ref[name].double().norm().item()
        err = (ours[name].double() - ref[name].double()).norm().item()
        assert err <= RTOL * scale + 1e-12, f"{what} of {name}: |diff| {err:.3g} vs |ref| {scale:.3g}"


def _updates(before: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


@pytest.mark.parametrize("level", [*LEVELS, "total"])
def test_loss_gradients_and_sgd_step_match_the_reference(pair, level):
    reference, ours, batch, _ = (copy.deepcopy(x) for x in pair)
    ref_loss = release_losses(reference, batch)[level]
    our_loss = _ours_losses(ours, batch)[level]
    assert our_loss.item() == pytest.approx(ref_loss.item(), rel=RTOL)
    _backward(ref_loss, reference)
    _backward(our_loss, ours)
    ref_grads = _in_our_names(_grads_by_release_name(reference), ours)
    our_grads = {n: p.grad for n, p in ours.named_parameters()}
    _assert_rel(our_grads, ref_grads, f"{level} gradient")
    assert our_grads["image_proj.weight"].norm() > 0  # the shared projection learns at every level

    ref_before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    our_before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    sgd_step(reference, LR_SGD)
    torch.optim.SGD(ours.parameters(), lr=LR_SGD).step()
    ours.config.min_logit_scale, ours.config.max_logit_scale = 0.0, 4.6052
    ours.clamp_logit_scales_()
    _assert_rel(
        _updates(our_before, ours), _in_our_names(_updates(ref_before, reference), ours), "SGD update"
    )


@pytest.mark.parametrize("level", [*LEVELS, "total"])
def test_adamw_step_with_the_release_decay_rule_matches_the_reference(pair, level):
    reference, ours, batch, _ = (copy.deepcopy(x) for x in pair)
    _backward(release_losses(reference, batch)[level], reference)
    _backward(_ours_losses(ours, batch)[level], ours)
    ref_before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    our_before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    adamw_first_step(reference, LR_ADAMW, WD, BETAS, EPS)
    optimizer = torch.optim.AdamW(param_groups(ours, WD, "release"), lr=LR_ADAMW, betas=BETAS, eps=EPS)
    optimizer.step()
    ours.config.min_logit_scale, ours.config.max_logit_scale = 0.0, 4.6052
    ours.clamp_logit_scales_()
    _assert_rel(
        _updates(our_before, ours), _in_our_names(_updates(ref_before, reference), ours), "AdamW update"
    )


def _release_name_of(pair) -> dict[str, str]:
    """Our parameter name -> the release name it was converted from (by marking each release tensor)."""
    _, ours, _, state = pair
    names = list(state)
    marked = {n: torch.full_like(v, float(i)) for i, (n, v) in enumerate(state.items())}
    return {
        ours_name: names[int(t.flatten()[0])] for ours_name, t in convert_state_dict(marked, ours)[0].items()
    }


def test_release_decay_rule_is_the_releases_and_ours_differs_only_on_bert_layernorms(pair):
    _, ours, _, _ = pair
    origin = _release_name_of(pair)
    params = dict(ours.named_parameters())
    for name, param in params.items():
        assert exempt_from_decay(name, param, "release") == (not release_decays(origin[name])), name
    differ = sorted(
        n for n, p in params.items() if exempt_from_decay(n, p, "1d") != exempt_from_decay(n, p, "release")
    )
    assert differ and all(n.startswith("text.") and n.endswith("LayerNorm.weight") for n in differ)
    assert len(differ) == 1 + 2 * ours.text.config.num_hidden_layers  # embeddings + two per layer
