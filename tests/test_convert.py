"""The release -> save_pretrained converter, checked against an independent reference of the release.

We cannot download the published checkpoint, so the tests build one with the release's key names and
layouts at a small scale (ViT width 64, 2 blocks; BERT hidden 64, 2 layers; D = 32; tests/release_reference),
in both forms the release writes (a bare DDP ``module.`` state dict, and train.py's checkpoint dict whose
optimizer state holds numpy scalars), with a vocab.txt shaped like the release's (CRLF, U+2028 tokens).
"""

from __future__ import annotations

import io

import pytest
import torch
from release_reference import ReleaseClip, training_checkpoint, write_release_vocab

from retclip_dist import synth
from retclip_dist.eval.cli import main as eval_main
from retclip_dist.model.convert_retclip import (
    ConversionError,
    convert_release,
    convert_state_dict,
    infer_config,
)
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.tokenizer import build_tokenizer
from retclip_dist.model.vocab import read_vocab
from retclip_dist.model.weights import read_state_dict

RES = 32


@pytest.fixture
def release(tmp_path):
    vocab = tmp_path / "vocab.txt"
    size = write_release_vocab(vocab, synth.vocabulary())
    torch.manual_seed(0)
    reference = ReleaseClip(vocab_size=size).eval()
    return reference, vocab


def _save(reference: ReleaseClip, path, form: str):
    if form == "training":
        torch.save(training_checkpoint(reference), path)
    else:
        torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, path)
    return path


def test_release_vocab_keeps_line_separator_tokens_and_drops_carriage_returns(release):
    _, vocab = release
    ids = read_vocab(vocab)
    lines = vocab.read_bytes().decode("utf-8").split("\r\n")[:-1]
    assert len(ids) == len(lines)
    assert ids["[PAD]"] == 0 and ids["[MASK]"] == 4
    assert ids["\u2028"] == len(lines) - 3 and ids["##\u2028"] == len(lines) - 2
    assert not any(token.endswith("\r") for token in ids)


@pytest.mark.parametrize("form", ["bare", "training"])
def test_converted_model_reproduces_release_features(release, tmp_path, form):
    reference, vocab = release
    checkpoint = _save(reference, tmp_path / "epoch_latest.pt", form)
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
    # Exactly one home per release tensor: nothing dropped, and as many tensors as the release has.
    assert report["dropped"] == []
    assert report["tensors"] == len(reference.state_dict())
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
        # The shared projection is the release's visual output (ln_post(cls) @ proj), not a fold of it.
        torch.testing.assert_close(model.project_eye(left), reference.visual(left), atol=2e-5, rtol=1e-4)
    for ours, ref in zip((*ours_img, *ours_txt), (*ref_img, *ref_txt), strict=True):
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    scales = {
        level: round(model.logit_scale[level].exp().item(), 3) for level in ("patient", "left", "right")
    }
    assert scales == {"patient": 90.0, "left": 80.0, "right": 70.0}
    assert (model.config.min_logit_scale, model.config.max_logit_scale) == (0.0, 4.6052)


def test_every_release_tensor_has_exactly_one_home(release):
    reference, vocab = release
    state = reference.state_dict()
    model = RetClip(infer_config(state, str(vocab)))
    converted, dropped = convert_state_dict(state, model)
    assert dropped == [] and len(converted) == len(state) == len(model.state_dict())
    assert torch.equal(converted["image_proj.weight"], state["visual.proj"].T)
    assert torch.equal(converted["image_patient.weight"], state["global_feature_mapping.weight"])
    assert torch.equal(converted["image_left.weight"], state["left_feature_mapping.weight"])
    assert torch.equal(converted["image_right.weight"], state["right_feature_mapping.weight"])
    assert torch.equal(converted["visual.cls_token"].flatten(), state["visual.class_embedding"])
    assert torch.equal(
        converted["visual.blocks.1.attn.qkv.weight"],
        state["visual.transformer.resblocks.1.attn.in_proj_weight"],
    )
    # Every converted tensor is some release tensor, unchanged up to layout: no two share a source.
    sums = sorted(round(v.double().sum().item(), 6) for v in converted.values())
    assert sums == sorted(round(v.double().sum().item(), 6) for v in state.values())


def test_training_checkpoint_with_numpy_scalars_loads_and_other_objects_are_refused(release, tmp_path):
    reference, _ = release
    checkpoint = training_checkpoint(reference)
    torch.save(checkpoint, tmp_path / "ok.pt")
    loaded = read_state_dict(tmp_path / "ok.pt")
    assert loaded.keys() == reference.state_dict().keys()
    # The release ran numpy 1.x, whose pickles name numpy.core.multiarray (numpy 2: numpy._core).
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer, _use_new_zipfile_serialization=False)
    old = buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\nscalar" in old
    (tmp_path / "numpy1.pt").write_bytes(old)
    assert read_state_dict(tmp_path / "numpy1.pt").keys() == loaded.keys()
    torch.save(
        {**checkpoint, "args": {"sampler": torch.utils.data.SequentialSampler([])}}, tmp_path / "bad.pt"
    )
    with pytest.raises(
        ValueError, match=r"^weights file \S*bad\.pt holds objects other than tensors.*SequentialSampler"
    ) as err:
        read_state_dict(tmp_path / "bad.pt")
    assert "\n" not in str(err.value)


def test_failed_conversion_leaves_no_output_folder(release, tmp_path, monkeypatch):
    reference, vocab = release
    checkpoint = _save(reference, tmp_path / "ck.pt", "bare")
    out = tmp_path / "out" / "converted"

    def fail_half_way(self, directory):
        (directory / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(RetClip, "save_pretrained", fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        convert_release(checkpoint, vocab, out)
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.undo()
    convert_release(checkpoint, vocab, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer",
    ]
    with pytest.raises(ConversionError, match=r"converted already exists"):
        convert_release(checkpoint, vocab, out)


def test_bad_vocab_fails_before_anything_is_written(release, tmp_path, capsys):
    reference, _ = release
    checkpoint = _save(reference, tmp_path / "ck.pt", "bare")
    bad = tmp_path / "bad_vocab.txt"
    bad.write_text("[PAD]\n\n[UNK]\n", encoding="utf-8")
    out = tmp_path / "out"
    code = eval_main(["convert-release", str(checkpoint), "--vocab", str(bad), "--output_dir", str(out)])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith("bad_vocab.txt: line 2 is empty")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "bad_vocab.txt",
        "ck.pt",
        "vocab.txt",
    ]


def test_infer_config_reads_shapes_and_rejects_resnet(release):
    reference, vocab = release
    state = reference.state_dict()
    cfg = infer_config(state, str(vocab))
    assert cfg.text_config["num_hidden_layers"] == 2
    assert cfg.text_config["intermediate_size"] == 128
    assert cfg.text_config["vocab_size"] == len(read_vocab(vocab))
    with pytest.raises(ConversionError, match=r"ck\.pt: a ResNet vision tower"):
        infer_config({**state, "visual.attnpool.c_proj.weight": torch.zeros(1)}, str(vocab), "ck.pt")


def test_unknown_or_missing_tensors_are_named(release, tmp_path):
    reference, vocab = release
    state = reference.state_dict()
    extra = tmp_path / "extra.pt"
    torch.save({**state, "teacher.fc.weight": torch.zeros(2)}, extra)
    with pytest.raises(ConversionError, match=r"does not know: \['teacher.fc.weight'\]"):
        convert_release(extra, vocab, tmp_path / "out1")
    short = tmp_path / "short.pt"
    torch.save({k: v for k, v in state.items() if k != "left_feature_mapping.weight"}, short)
    with pytest.raises(ConversionError, match=r"unset: \['image_left\.weight'\]"):
        convert_release(short, vocab, tmp_path / "out2")
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
