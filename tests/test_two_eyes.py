"""Every two-eye path with eyes that differ, so that a left/right mix-up or a skipped eye fails.

The patients here have a red left eye and a blue right eye, and left-eye findings that never occur in a
right eye (and the other way round): training batches, validation batches, the model's heads and the
loss's levels, the benchmark's paired images and features, and the leakage guard must each keep every
eye where it belongs. End-to-end runs of the eye levels through ``retclip-train`` are in
test_switches_e2e.py (per-eye reports change the eye levels' loss and only theirs).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import bench_folders as B
import pytest
import torch
import torch.nn.functional as F
from conftest import FakePatient, build_argv, jpeg, tiny_model_config, tiny_tokenizer, write_shard_set
from PIL import Image

from retclip_dist import synth
from retclip_dist.data.config import DataConfig
from retclip_dist.data.loader import build_train_data
from retclip_dist.data.samples import REPORT_HASH, token_hash
from retclip_dist.data.validation import build_val_data
from retclip_dist.eval.benchmark.layouts import read_dataset
from retclip_dist.eval.benchmark.leakage import check_leakage
from retclip_dist.eval.benchmark.protocols import DatasetContext
from retclip_dist.eval.benchmark.suite import DatasetSpec
from retclip_dist.eval.features import normalise
from retclip_dist.eval.models.retclip import RetClipModel
from retclip_dist.loss import TripartiteLoss
from retclip_dist.model.config import LEVELS, ImageInput
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.vocab import write_vocab
from retclip_dist.shards import cli as shards_cli

LEFT_FINDINGS = ("a few drusen", "numerous drusen")  # never in a right eye here
RIGHT_FINDINGS = ("scattered haemorrhages", "a cotton wool spot")  # never in a left eye here
RED, BLUE = (200, 40, 40), (40, 40, 200)


def _eye(colour: tuple[int, int, int], shade: int) -> bytes:
    return jpeg(Image.new("RGB", (48, 48), tuple(max(0, c - shade) for c in colour)))


def _patients(n: int) -> list[FakePatient]:
    out = []
    for i in range(n):
        left, right = LEFT_FINDINGS[i % 2], RIGHT_FINDINGS[(i // 2) % 2]
        out.append(
            FakePatient(
                key=f"p{i:05d}",
                left=_eye(RED, 3 * i),
                right=_eye(BLUE, 3 * i),
                report=f"Left eye: {left}. Right eye: {right}.",
                left_report=f"{left}.",
                right_report=f"{right}.",
            )
        )
    return out


PATIENTS = {p.key: p for p in _patients(12)}


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two-eyes")
    patients = list(PATIENTS.values())
    write_shard_set(root, {"train": patients[:8], "val": patients[8:]}, per_shard=4)
    return root


def _data_config(shards: Path, augment_on: str = "device") -> DataConfig:
    return DataConfig(
        shards=str(shards),
        batch_size=4,
        num_workers=0,
        shuffle_buffer=8,
        eye_reports=True,
        augment_on=augment_on,
        image_size=32,
        decode_size=32,
        context_length=16,
    )


def _red_then_blue(images: torch.Tensor, colour: str) -> None:
    """Each image of [n, 3, s, s] is mostly red (``colour`` "red") or mostly blue."""
    means = images.float().mean(dim=(2, 3))  # [n, 3]
    red, blue = means[:, 0], means[:, 2]
    margin = (red - blue) if colour == "red" else (blue - red)
    assert (margin > 0.5 * (means.abs().max(dim=1).values)).all(), (colour, means)


def _text(ids: torch.Tensor, mask: torch.Tensor) -> str:
    return tiny_tokenizer().decode(ids[mask.bool()].tolist(), skip_special_tokens=True)


def _check_batch(batch: dict, with_texts: bool) -> None:
    _red_then_blue(batch["left"], "red")
    _red_then_blue(batch["right"], "blue")
    tokenizer = tiny_tokenizer()
    for row, key in enumerate(batch["keys"]):
        p = PATIENTS[key]
        for eye, own in (("left", p.left_report), ("right", p.right_report)):
            text = _text(batch[f"{eye}_input_ids"][row], batch[f"{eye}_attention_mask"][row])
            assert text == tokenizer.decode(tokenizer(own)["input_ids"], skip_special_tokens=True), (key, eye)
            if with_texts:
                assert batch[f"{eye}_reports"][row] == own, (key, eye)
        # The duplicate mask's hash of each level is the hash of the ids that level's head reads.
        hashes = batch[REPORT_HASH][row].tolist()
        for level, prefix in zip(LEVELS, ("", "left_", "right_"), strict=True):
            mask = batch[f"{prefix}attention_mask"][row].bool()
            assert hashes[LEVELS.index(level)] == token_hash(batch[f"{prefix}input_ids"][row][mask].tolist())
        if with_texts:
            assert batch["reports"][row] == p.report


@pytest.mark.parametrize("augment_on", ["device", "cpu"])
def test_training_batches_keep_each_eye_and_its_report(shard_set, augment_on):
    cfg = _data_config(shard_set, augment_on)
    data = build_train_data(cfg, tiny_tokenizer(), 0, 1, seed=0, image=ImageInput(32, (0, 0, 0), (1, 1, 1)))
    seen = []
    for batch in data:
        _check_batch(batch, with_texts=False)
        seen += batch["keys"]
    assert sorted(seen) == sorted(list(PATIENTS)[:8])


def test_validation_batches_keep_each_eye_and_its_report(shard_set):
    cfg = _data_config(shard_set)
    val = build_val_data(cfg, tiny_tokenizer(), 0, 1, ImageInput(32, (0, 0, 0), (1, 1, 1)))
    seen = []
    for batch in val:
        _check_batch(batch, with_texts=True)
        seen += batch["keys"]
    assert sorted(seen) == sorted(list(PATIENTS)[8:])


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> RetClip:
    vocab = write_vocab(tmp_path_factory.mktemp("vocab") / "v.txt", ["a", "b", "c"])
    torch.manual_seed(0)
    return RetClip(tiny_model_config(vocab)).eval()


def test_each_eye_head_sees_its_own_eye_and_report(model):
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(3, 3, 32, 32, generator=g), torch.randn(3, 3, 32, 32, generator=g)
    ids = {p: torch.randint(5, 8, (3, 6), generator=g) for p in ("", "left_", "right_")}
    ones = torch.ones(3, 6, dtype=torch.long)
    batch = {"left": left, "right": right}
    for prefix, t in ids.items():
        batch.update({f"{prefix}input_ids": t, f"{prefix}attention_mask": ones})
    with torch.no_grad():
        out = model(batch)
        # By hand: each eye through the tower and the shared projection, then its own head.
        v_left, v_right = model.project_eye(left), model.project_eye(right)
        expect_image = {
            "patient": model.image_patient(torch.cat([v_left, v_right], dim=-1)),
            "left": model.image_left(v_left),
            "right": model.image_right(v_right),
        }
        cls = {p: model._cls(t, ones) for p, t in ids.items()}
        expect_text = {
            "patient": model.text_patient(cls[""]),
            "left": model.text_left(cls["left_"]),
            "right": model.text_right(cls["right_"]),
        }
    for i, level in enumerate(LEVELS):
        torch.testing.assert_close(out.image[i], F.normalize(expect_image[level], dim=-1), msg=level)
        torch.testing.assert_close(out.text[i], F.normalize(expect_text[level], dim=-1), msg=level)
    # The two eye heads are different maps: the checks above could not pass with the eyes swapped.
    assert not torch.allclose(out.image[1], F.normalize(model.image_left(v_right), dim=-1), atol=1e-3)


def test_each_loss_level_compares_its_own_eye():
    # Left features that match their texts row for row, right ones that match the wrong rows: the left
    # level's loss is low, the right level's high, the patient level in between.
    n, d = 6, 8
    eye = F.normalize(torch.eye(n, d), dim=-1)
    shifted = eye.roll(1, dims=0)
    image = (eye, eye, eye)
    text = (0.5 * (eye + shifted), eye, shifted)
    text = tuple(F.normalize(t, dim=-1) for t in text)
    scale = (torch.tensor(20.0),) * 3
    loss = TripartiteLoss("infonce", gather=False, duplicates="keep")
    _, parts = loss(image=image, text=text, logit_scale=scale)
    assert parts["left"] < 0.01
    assert parts["right"] > 10
    assert parts["left"] < parts["patient"] < parts["right"]


# -- evaluation ---------------------------------------------------------------------------------------


def _odir_with_coloured_eyes(root: Path, n: int = 6) -> Path:
    B.odir5k(root, n_patients=n)
    for p in range(n):
        for eye, colour in (("left", RED), ("right", BLUE)):
            Image.new("RGB", (40, 40), colour).save(root / "ODIR-5K_Training_Images" / f"{p}_{eye}.jpg")
    return root


def test_paired_benchmark_images_and_features_keep_left_then_right(tmp_path, model):
    bset = read_dataset(
        DatasetSpec(name="o", layout="odir5k", root=str(_odir_with_coloured_eyes(tmp_path / "o")))
    )
    ctx = DatasetContext(bset, RetClipModel(model), batch_size=4)
    pairs = ctx.images
    assert pairs.shape[:2] == (6, 2)
    _red_then_blue(pairs[:, 0], "red")
    _red_then_blue(pairs[:, 1], "blue")
    features, heads = ctx.features(zero_shot=False)
    assert heads == ["pair"] * 6
    with torch.no_grad():
        both = normalise(pairs, model.image_input)
        expected = model.encode_image(both[:, 0], both[:, 1]).patient
        swapped = model.encode_image(both[:, 1], both[:, 0]).patient
    torch.testing.assert_close(torch.from_numpy(features), expected, atol=1e-5, rtol=0)
    assert (torch.from_numpy(features) - swapped).abs().max() > 1e-3  # the patient head is not symmetric
    zero_shot, zs_heads = ctx.features(zero_shot=True)
    assert zs_heads == ["patient"] * 6
    torch.testing.assert_close(torch.from_numpy(zero_shot), expected, atol=1e-5, rtol=0)


def test_leakage_guard_checks_both_eyes_of_a_paired_row(tmp_path):
    manifest, raw = synth.write_raw_archive(tmp_path / "raw", 2, seed=3, image_size=64, layout="dir")
    args = build_argv(manifest, raw, tmp_path / "shards", "--image-size", "32", "--min-side", "32")
    assert shards_cli.main([*args, "--no-progress"]) == 0
    root = _odir_with_coloured_eyes(tmp_path / "o")
    sources = sorted(raw.rglob("*.jpg"))
    shutil.copy(sources[0], root / "ODIR-5K_Training_Images" / "1_right.jpg")  # only a right eye leaked
    shutil.copy(sources[1], root / "ODIR-5K_Training_Images" / "4_left.jpg")  # only a left eye leaked
    bset = read_dataset(DatasetSpec(name="o", layout="odir5k", root=str(root)))
    leaked = check_leakage(bset, str(tmp_path / "shards"), strict=False)
    assert leaked == [bset.lset.rows[1].source, bset.lset.rows[4].source]
