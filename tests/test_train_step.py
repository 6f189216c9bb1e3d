"""The chunked (GradCache-style) step must give the gradient of one big batch."""

import inspect

import torch
from accelerate import Accelerator
from conftest import tiny_model_config

from retclip_dist.loss import TripartiteLoss
from retclip_dist.model.config import LEVELS
from retclip_dist.model.retclip import PerLevel, RetClip, RetClipOutput
from retclip_dist.model.vocab import write_vocab
from retclip_dist.train.step import forward_backward, output_loss, split_batch

WORDS = ["left", "right", "eye", "normal", "haemorrhage", "exudate", "drusen", "disc", "macula"]


def _batch(n: int, image_size: int = 32, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 5 + len(WORDS), (n, length), generator=g)
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones_like(ids)
    mask[: n // 2, length // 2 :] = 0
    return {
        "left": torch.randn(n, 3, image_size, image_size, generator=g),
        "right": torch.randn(n, 3, image_size, image_size, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "keys": [f"p{i}" for i in range(n)],
    }


def _grads(tmp_path, chunks: int, dropout: float) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    cfg = tiny_model_config(write_vocab(tmp_path / "vocab.txt", WORDS))
    cfg.vision_kwargs["drop_rate"] = dropout
    model = RetClip(cfg).double()
    model.train()
    loss_fn = TripartiteLoss("infonce")
    batch = {
        k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in _batch(8).items()
    }
    torch.manual_seed(123)
    loss, _ = forward_backward(model, batch, output_loss(loss_fn), Accelerator(cpu=True), chunks)
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_split_batch_keeps_lists_and_tensors_aligned():
    parts = split_batch(_batch(8), 4)
    assert [len(p["left"]) for p in parts] == [2, 2, 2, 2]
    assert parts[3]["keys"] == ["p6", "p7"]


def test_chunked_gradient_equals_one_big_batch(tmp_path):
    loss1, g1 = _grads(tmp_path, chunks=1, dropout=0.0)
    loss4, g4 = _grads(tmp_path, chunks=4, dropout=0.0)
    assert abs(loss1 - loss4) < 1e-10
    assert g1.keys() == g4.keys()
    assert "logit_scale.patient" in g1
    for name in g1:
        torch.testing.assert_close(g4[name], g1[name], rtol=1e-7, atol=1e-10, msg=name)


def test_chunked_step_replays_dropout(tmp_path):
    # With dropout, the second pass over a chunk must see the same masks as the first, or the cached
    # feature gradients would be pushed through different activations.
    torch.manual_seed(0)
    cfg = tiny_model_config(write_vocab(tmp_path / "vocab.txt", WORDS))
    cfg.vision_kwargs["drop_rate"] = 0.5
    model = RetClip(cfg)
    model.train()
    seen: list[torch.Tensor] = []
    original = model.forward

    def recording_forward(batch):
        out = original(batch)
        seen.append(out.image.left.detach().clone())
        return out

    model.forward = recording_forward
    loss_fn = TripartiteLoss("infonce")
    forward_backward(model, _batch(8), output_loss(loss_fn), Accelerator(cpu=True), chunks=2)
    first_pass, second_pass = seen[:2], seen[2:]
    assert len(second_pass) == 2
    for a, b in zip(first_pass, second_pass, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    # The masks really are random: the two chunks' passes are not all the same function of the input.
    assert not torch.equal(seen[0], original({k: v[:4] for k, v in _batch(8).items()}).image.left.detach())


def test_model_to_loss_contract_is_by_name():
    """Every RetClipOutput field is a TripartiteLoss argument of the same name, and PerLevel lists LEVELS."""
    assert PerLevel._fields == LEVELS
    params = list(inspect.signature(TripartiteLoss.forward).parameters)[1:]
    # The model's fields first, then what comes from the batch rather than the model (report hashes).
    assert params == [*RetClipOutput._fields, "report_hash"]
    torch.manual_seed(0)
    feats = [torch.nn.functional.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1) for _ in range(6)]
    scales = [torch.tensor([10.0 + i], dtype=torch.float64) for i in range(3)]
    out = RetClipOutput(PerLevel(*feats[:3]), PerLevel(*feats[3:]), PerLevel(*scales), None)
    total, parts = output_loss(TripartiteLoss("infonce"))(out)
    expected, expected_parts = TripartiteLoss("infonce")(feats[:3], feats[3:], scales)
    assert total.item() == expected.item()
    assert {k: v.item() for k, v in parts.items()} == {k: v.item() for k, v in expected_parts.items()}
    # Text and image swapped gives another number: the fields are not interchangeable by accident.
    swapped, _ = TripartiteLoss("infonce")(feats[3:], feats[:3], scales[::-1])
    assert swapped.item() != total.item()
