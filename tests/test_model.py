"""RetClip: towers, heads, per-eye reports, scales, checkpointing, local weights and save/load."""

import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_model_config
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, BertForMaskedLM

from retclip_dist.config import load_config
from retclip_dist.model.config import ModelConfig, ModelConfigError
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.tokenizer import build_tokenizer
from retclip_dist.model.towers import build_text_tower
from retclip_dist.model.vocab import write_vocab

WORDS = ["left", "right", "eye", "normal", "retina", "cup", "disc", "haemorrhage", "drusen"]
BATCH = 3


@pytest.fixture
def vocab(tmp_path):
    return write_vocab(tmp_path / "vocab.txt", WORDS)


@pytest.fixture
def cfg(vocab):
    return tiny_model_config(vocab)


def _model(cfg: ModelConfig, seed: int = 0) -> RetClip:
    torch.manual_seed(seed)
    return RetClip(cfg)


def _batch(cfg: ModelConfig, per_eye: bool = False, rows: int = BATCH, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tokenizer = build_tokenizer(cfg)
    reports = ["normal retina left eye", "cup disc", "drusen haemorrhage right"][:rows]
    batch = {
        "left": torch.randn(rows, 3, 32, 32, generator=gen),
        "right": torch.randn(rows, 3, 32, 32, generator=gen),
        **tokenizer(reports, padding=True, return_tensors="pt", return_token_type_ids=False),
    }
    if per_eye:
        for eye, text in (("left", "drusen left"), ("right", "cup right disc")):
            enc = tokenizer([text] * rows, padding=True, return_tensors="pt")
            batch[f"{eye}_input_ids"] = enc["input_ids"]
            batch[f"{eye}_attention_mask"] = enc["attention_mask"]
    return batch


def test_defaults_are_the_paper_model():
    cfg = ModelConfig()
    assert cfg.vision_name == "vit_base_patch16_clip_quickgelu_224"  # the tower CLIP was trained as
    assert cfg.embed_dim == 512
    assert cfg.resolved_init_logit_scale() == pytest.approx(math.log(90))
    assert cfg.max_logit_scale == pytest.approx(math.log(100))
    assert cfg.text_config["hidden_size"] == 768
    assert cfg.text_config["vocab_size"] == 21128
    assert ModelConfig(loss="sigmoid").resolved_init_logit_scale() == pytest.approx(math.log(10))


def test_config_loads_from_yaml(tmp_path):
    preset = tmp_path / "model.yaml"
    preset.write_text("vision_kwargs: {img_size: 64}\nloss: sigmoid\ntext_config: {num_hidden_layers: 4}\n")
    cfg = load_config(ModelConfig, preset, ["--embed_dim", "256"])
    assert cfg.vision_kwargs == {"img_size": 64}
    assert cfg.loss == "sigmoid"
    assert cfg.embed_dim == 256
    assert cfg.text_config["num_hidden_layers"] == 4
    assert cfg.text_config["hidden_size"] == 768


def test_forward_shapes_norms_and_scales(cfg):
    model = _model(cfg)
    out = model(_batch(cfg))
    for features in (*out.image, *out.text):
        assert features.shape == (BATCH, 16)
        torch.testing.assert_close(features.norm(dim=-1), torch.ones(BATCH))
    assert [s.item() for s in out.logit_scale] == pytest.approx([90.0] * 3)
    assert out.logit_bias is None
    # 60,787 before the shared projection: heads on W=32 (2048 weights) became proj + heads on D=16 (1536).
    assert sum(p.numel() for p in model.parameters()) == 60275


def test_both_eyes_share_one_batched_vision_forward(cfg):
    model = _model(cfg)
    batch = _batch(cfg)
    calls = []
    model.visual.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    image = model.encode_image(batch["left"], batch["right"])
    assert calls == [2 * BATCH]
    with torch.no_grad():
        pooled = model.embed_eye(batch["left"])
        v_left, v_right = model.project_eye(batch["left"]), model.project_eye(batch["right"])
        torch.testing.assert_close(v_left, pooled @ model.image_proj.weight.T)
        torch.testing.assert_close(image.left, F.normalize(model.image_left(v_left), dim=-1))
        torch.testing.assert_close(image.right, F.normalize(model.image_right(v_right), dim=-1))
        patient = model.image_patient(torch.cat([v_left, v_right], dim=-1))
        torch.testing.assert_close(image.patient, F.normalize(patient, dim=-1))
    assert pooled.shape == (BATCH, 32) and v_left.shape == (BATCH, 16)


def test_heads_follow_the_release_layout(cfg):
    model = _model(cfg)
    # One shared projection W -> D (CLIP's visual.proj), then the three bias-free maps on D.
    assert model.image_proj.weight.shape == (16, 32) and model.image_proj.bias is None
    assert model.image_patient.weight.shape == (16, 32)
    assert model.image_left.weight.shape == model.image_right.weight.shape == (16, 16)
    assert model.image_left.bias is None and model.image_patient.bias is None
    assert [type(m).__name__ for m in model.text_left] == ["Linear", "ReLU", "Linear"]
    assert model.text_patient[0].weight.shape == (32, 32)
    assert model.text_patient[2].weight.std().item() == pytest.approx(32**-0.5, rel=0.15)
    assert not hasattr(model.text, "pooler") or model.text.pooler is None


def test_without_per_eye_reports_the_text_tower_runs_once(cfg):
    model = _model(cfg)
    batch = _batch(cfg)
    calls = []
    model.text.register_forward_hook(lambda mod, args, kwargs, out: calls.append(1), with_kwargs=True)
    text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert calls == [1]
    with torch.no_grad():
        cls = model.text(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state[:, 0]
        torch.testing.assert_close(text.left, F.normalize(model.text_left(cls), dim=-1))
        torch.testing.assert_close(text.right, F.normalize(model.text_right(cls), dim=-1))


def test_per_eye_reports_change_eye_features_not_patient(cfg):
    model = _model(cfg)
    shared = model(_batch(cfg)).text
    per_eye = model(_batch(cfg, per_eye=True)).text
    torch.testing.assert_close(per_eye.patient, shared.patient, rtol=0, atol=0)
    assert (per_eye.left - shared.left).abs().max().item() > 1e-3
    assert (per_eye.right - shared.right).abs().max().item() > 1e-3


def test_batch_of_one(cfg):
    # A patient alone gives the features it gets as the first row of a larger batch (nothing mixes rows).
    model = _model(cfg)
    batch = _batch(cfg, per_eye=True)
    with torch.no_grad():
        alone = model({k: v[:1] for k, v in batch.items()})
        together = model(batch)
    for one, many in zip((*alone.image, *alone.text), (*together.image, *together.text), strict=True):
        assert one.shape == (1, 16)
        torch.testing.assert_close(one, many[:1], rtol=0, atol=1e-5)


def test_clamp_logit_scales(cfg):
    model = _model(cfg)
    with torch.no_grad():
        model.logit_scale["patient"].fill_(6.0)
        model.logit_scale["left"].fill_(1.0)
    model.clamp_logit_scales_()
    assert model.logit_scale["patient"].item() == pytest.approx(math.log(100))
    assert model.logit_scale["left"].item() == 1.0
    assert model.logit_scale["right"].item() == pytest.approx(math.log(90))
    with torch.no_grad():
        model.logit_scale["left"].fill_(-0.5)
    model.clamp_logit_scales_()
    assert model.logit_scale["left"].item() == -0.5  # ours: no lower bound by default
    model.config.min_logit_scale, model.config.max_logit_scale = 0.0, 4.6052  # the release's range
    with torch.no_grad():
        model.logit_scale["patient"].fill_(6.0)
    model.clamp_logit_scales_()
    assert model.logit_scale["left"].item() == 0.0
    assert model.logit_scale["patient"].item() == pytest.approx(4.6052)


def test_sigmoid_model_has_learnable_biases(vocab):
    cfg = tiny_model_config(vocab)
    cfg.loss = "sigmoid"
    out = _model(cfg)(_batch(cfg))
    assert [s.item() for s in out.logit_scale] == pytest.approx([10.0] * 3)
    assert [b.item() for b in out.logit_bias] == [-10.0] * 3
    assert all(b.requires_grad for b in out.logit_bias)


def _text_checkpointing(text) -> bool:
    # transformers 5.24 names it is_activation_checkpointing; 4.x and 5.17 is_gradient_checkpointing.
    flag = getattr(type(text), "is_activation_checkpointing", None)
    return bool(text.is_activation_checkpointing if flag is not None else text.is_gradient_checkpointing)


def test_gradient_checkpointing_gives_identical_outputs_and_gradients(vocab):
    plain_cfg = tiny_model_config(vocab)
    ckpt_cfg = tiny_model_config(vocab)
    ckpt_cfg.grad_checkpointing = True
    plain, ckpt = _model(plain_cfg, seed=3), _model(ckpt_cfg, seed=3)
    assert ckpt.visual.grad_checkpointing and _text_checkpointing(ckpt.text)
    assert not plain.visual.grad_checkpointing and not _text_checkpointing(plain.text)
    batch = _batch(plain_cfg, per_eye=True)
    results = []
    for model in (plain, ckpt):
        model.train()
        out = model(batch)
        loss = sum(
            (i + 1) * (img * txt).sum() for i, (img, txt) in enumerate(zip(out.image, out.text, strict=True))
        )
        loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    for a, b in zip((*out_a.image, *out_a.text), (*out_b.image, *out_b.text), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_save_and_load_round_trip_is_bit_exact(cfg, tmp_path):
    model = _model(cfg).eval()
    saved = model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in saved.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer",
    ]
    loaded = RetClip.from_pretrained(saved).eval()
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    batch = _batch(cfg, per_eye=True)
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    for x, y in zip((*a.image, *a.text), (*b.image, *b.text), strict=True):
        assert torch.equal(x, y)
    reloaded_tokens = build_tokenizer(loaded.config)("left eye drusen")["input_ids"]
    assert reloaded_tokens == [2, 5, 7, 13, 3]


def test_model_saved_before_the_shared_projection_is_refused_by_name(cfg, tmp_path):
    saved = _model(cfg).save_pretrained(tmp_path / "old")
    state = load_file(str(saved / "model.safetensors"))
    del state["image_proj.weight"]
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(ValueError, match=r"old: saved without the shared image projection"):
        RetClip.from_pretrained(saved)


def test_from_pretrained_without_config_names_the_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"empty has no config.json"):
        RetClip.from_pretrained(tmp_path / "empty")


def _tiny_vit(cfg: ModelConfig):
    return timm.create_model(cfg.vision_name, pretrained=False, num_classes=0, **cfg.vision_kwargs)


def test_vision_weights_refuse_a_missing_tensor_unless_named(cfg, tmp_path):
    torch.manual_seed(11)
    source = _tiny_vit(cfg).state_dict()
    source.pop("norm.bias")
    source["head.weight"] = torch.zeros(4, 32)  # an ImageNet-style classifier: a known name, not used
    save_file(source, str(tmp_path / "vit.safetensors"))
    cfg.vision_weights = str(tmp_path / "vit.safetensors")
    with pytest.raises(ModelConfigError) as err:
        _model(cfg, seed=99)
    assert err.value.field == "model.vision_weights"
    assert str(err.value) == (
        f"{tmp_path}/vit.safetensors: does not fit the vision tower: 1 of the tower's tensors are not in the "
        "file (norm.bias); name those that may stay out in model.vision_weights_ignore"
    )
    cfg.vision_weights_ignore = ["norm.*"]
    model = _model(cfg, seed=99)
    report = model.load_reports["vision"]
    # A timm-layout file has no CLIP projection: the shared projection stays random, and says so.
    assert report.missing == ["image_proj.weight", "norm.bias"]
    assert report.unexpected == ["head.weight"]
    assert report.loaded == len(source) - 1
    assert torch.equal(
        model.visual.state_dict()["blocks.1.attn.qkv.weight"], source["blocks.1.attn.qkv.weight"]
    )
    assert "2 left at their initialisation: image_proj.weight, norm.bias" in str(report)
    assert report.record() == {"vision_tensors": len(source) - 1, "vision_left_out": 2, "vision_unused": 1}


def test_vision_weights_from_wrapped_torch_checkpoint(cfg, tmp_path):
    torch.manual_seed(12)
    source = _tiny_vit(cfg).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.items()}}, tmp_path / "vit.pth")
    cfg.vision_weights = str(tmp_path / "vit.pth")
    model = RetClip(cfg)
    report = model.load_reports["vision"]
    assert report.missing == ["image_proj.weight"] and report.unexpected == []
    assert all(torch.equal(model.visual.state_dict()[k], v) for k, v in source.items())


def test_mae_pretraining_parts_are_known_by_name(cfg, tmp_path):
    """RETFound's MAE checkpoint: the encoder, plus a decoder and mask token only pretraining uses."""
    source = _tiny_vit(cfg).state_dict()
    mae = {**source, "mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(16, 32)}
    mae["decoder_blocks.0.norm1.weight"] = torch.ones(16)
    torch.save({"model": mae}, tmp_path / "mae.pth")
    cfg.vision_weights = str(tmp_path / "mae.pth")
    report = RetClip(cfg).load_reports["vision"]
    assert report.loaded == len(source) and report.missing == ["image_proj.weight"]
    assert set(report.unexpected) <= {"mask_token", "decoder_embed.weight", "decoder_blocks.0.norm1.weight"}
    assert "decoder_embed.weight" in report.unexpected


def test_vision_weights_with_wrong_shape_are_an_error(cfg, tmp_path):
    source = _tiny_vit(cfg).state_dict()
    source["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 32)
    save_file(source, str(tmp_path / "bad.safetensors"))
    cfg.vision_weights = str(tmp_path / "bad.safetensors")
    with pytest.raises(
        ModelConfigError,
        match=r"^\S*bad\.safetensors: 1 tensor\(s\) do not fit the vision tower's shapes: "
        r"blocks\.0\.mlp\.fc1\.weight: file \(7, 32\) vs tower \(128, 32\)$",
    ):
        RetClip(cfg)


def test_vision_weights_bad_file_errors(cfg, tmp_path):
    cfg.vision_weights = str(tmp_path / "missing.safetensors")
    with pytest.raises(ModelConfigError, match=r"missing\.safetensors does not exist") as err:
        RetClip(cfg)
    assert err.value.field == "model.vision_weights"
    (tmp_path / "w.npz").write_bytes(b"x")
    cfg.vision_weights = str(tmp_path / "w.npz")
    with pytest.raises(ModelConfigError, match=r"w.npz: unsupported suffix '.npz'"):
        RetClip(cfg)
    # Unreadable files are one line too, not a traceback of torch or safetensors.
    source = _tiny_vit(cfg).state_dict()
    torch.save(source, tmp_path / "vit.pt")
    save_file(source, str(tmp_path / "vit.safetensors"))
    for name in ("vit.pt", "vit.safetensors"):
        (tmp_path / f"cut-{name}").write_bytes((tmp_path / name).read_bytes()[:100])
        cfg.vision_weights = str(tmp_path / f"cut-{name}")
        with pytest.raises(ModelConfigError, match=rf"^weights file \S*cut-{name}: cannot read it \(\S.*\)$"):
            RetClip(cfg)
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "jit.pt"))
    cfg.vision_weights = str(tmp_path / "jit.pt")
    with pytest.raises(
        ModelConfigError, match=r"jit\.pt is a TorchScript archive .* save its state_dict\(\)"
    ):
        RetClip(cfg)


def _save_text_dir(cfg: ModelConfig, directory, vocab_size: int | None = None, weights: bool = True):
    fields = dict(cfg.text_config)
    model_type = fields.pop("model_type")
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    config = AutoConfig.for_model(model_type, **fields)
    if weights:
        torch.manual_seed(21)
        mlm = BertForMaskedLM(config)
        mlm.save_pretrained(directory)
        return mlm
    config.save_pretrained(directory)
    return None


def test_text_tower_loads_local_mlm_checkpoint_without_pooler(cfg, tmp_path):
    mlm = _save_text_dir(cfg, tmp_path / "bert")
    cfg.text_path = str(tmp_path / "bert")
    tower, report = build_text_tower(cfg)
    assert tower.pooler is None
    assert report.missing == []
    assert report.unexpected and all(k.startswith("cls.predictions") for k in report.unexpected)
    assert torch.equal(
        tower.encoder.layer[1].output.dense.weight, mlm.bert.encoder.layer[1].output.dense.weight
    )


def test_text_dir_without_weights_is_random_init(cfg, tmp_path):
    _save_text_dir(cfg, tmp_path / "cfg-only", weights=False)
    cfg.text_path = str(tmp_path / "cfg-only")
    tower, report = build_text_tower(cfg)
    assert report is None
    assert tower.config.hidden_size == 32


def test_text_weights_with_wrong_shape_are_an_error(cfg, tmp_path):
    _save_text_dir(cfg, tmp_path / "bert", vocab_size=99)
    cfg.text_path = str(tmp_path / "bert")
    cfg.text_config = {}
    (tmp_path / "bert" / "config.json").write_text(
        (tmp_path / "bert" / "config.json").read_text().replace('"vocab_size": 99', '"vocab_size": 14')
    )
    with pytest.raises(
        ModelConfigError,
        match=r"model\.safetensors: 1 tensor\(s\) do not fit the text tower's shapes: "
        r"embeddings\.word_embeddings\.weight: file \(99, 32\) vs tower \(14, 32\)$",
    ) as err:
        build_text_tower(cfg)
    assert err.value.field == "model.text_path"


def _rewrite_text_weights(directory, change) -> None:
    state = load_file(str(directory / "model.safetensors"))
    save_file(change(state), str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_text_weights_are_strict_with_named_exceptions(cfg, tmp_path):
    mlm = _save_text_dir(cfg, tmp_path / "bert")
    cfg.text_path = str(tmp_path / "bert")
    layer = "encoder.layer.1.output.dense.weight"
    _rewrite_text_weights(tmp_path / "bert", lambda s: {k: v for k, v in s.items() if k != f"bert.{layer}"})
    with pytest.raises(ModelConfigError) as err:
        build_text_tower(cfg)
    assert err.value.field == "model.text_path"
    assert str(err.value) == (
        f"{tmp_path}/bert/model.safetensors: does not fit the text tower: 1 of the tower's tensors are not in "
        f"the file ({layer}); name those that may stay out in model.text_weights_ignore"
    )
    cfg.text_weights_ignore = [layer]
    tower, report = build_text_tower(cfg)
    assert report.missing == [layer] and report.loaded == len(tower.state_dict()) - 1
    assert torch.equal(
        tower.encoder.layer[0].output.dense.weight, mlm.bert.encoder.layer[0].output.dense.weight
    )


def test_text_weights_of_other_library_versions_and_precisions_load(cfg, tmp_path):
    """Old files: position-id buffers saved, LayerNorm as gamma/beta, half precision, sharded."""
    mlm = _save_text_dir(cfg, tmp_path / "bert")
    cfg.text_path = str(tmp_path / "bert")

    def old_style(state):
        out = {
            k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
                "LayerNorm.bias", "LayerNorm.beta"
            ): v.half()
            for k, v in state.items()
        }
        out["bert.embeddings.position_ids"] = torch.arange(128)[None]
        return out

    _rewrite_text_weights(tmp_path / "bert", old_style)
    tower, report = build_text_tower(cfg)
    assert report.missing == [] and report.unexpected[-1] == "embeddings.position_ids"
    assert all(k.startswith("cls.") for k in report.unexpected[:-1])
    assert report.loaded == len(tower.state_dict())
    want = mlm.bert.state_dict()
    for name, value in tower.state_dict().items():
        assert value.dtype == torch.float32, name  # a half-precision file does not make a half tower
        assert torch.equal(value, want[name].half().float()), name
    # The same tensors in two shards behind an index, as save_pretrained writes large models.
    state = load_file(str(tmp_path / "bert" / "model.safetensors"))
    (tmp_path / "bert" / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / "bert" / shard))
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "bert" / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded, report = build_text_tower(cfg)
    assert report.source.endswith("model.safetensors.index.json") and report.loaded == len(tower.state_dict())
    for name, value in sharded.state_dict().items():
        assert torch.equal(value, tower.state_dict()[name]), name
    (tmp_path / "bert" / "b.safetensors").unlink()
    with pytest.raises(ModelConfigError, match=r"^weights file \S*b\.safetensors does not exist$"):
        build_text_tower(cfg)


def test_text_file_with_a_tensor_twice_is_refused(cfg, tmp_path):
    _save_text_dir(cfg, tmp_path / "bert")
    cfg.text_path = str(tmp_path / "bert")
    key = "embeddings.word_embeddings.weight"
    _rewrite_text_weights(tmp_path / "bert", lambda s: {**s, key: s[f"bert.{key}"].clone()})
    with pytest.raises(ModelConfigError, match=f"two tensors of the file are the text tower's '{key}'"):
        build_text_tower(cfg)


def test_text_config_needs_model_type(cfg):
    cfg.text_config = {"hidden_size": 32}
    with pytest.raises(ValueError, match="needs a 'model_type'"):
        build_text_tower(cfg)


def test_tokenizer_from_vocab_file_lowercases(cfg):
    tokenizer = build_tokenizer(cfg)
    assert len(tokenizer) == 5 + len(WORDS)
    assert tokenizer("Left EYE Drusen unknownword")["input_ids"] == [2, 5, 7, 13, 1, 3]


def test_tokenizer_larger_than_embedding_table_is_an_error(cfg):
    cfg.text_config = {**cfg.text_config, "vocab_size": 8}
    with pytest.raises(ValueError, match=r"has 14 tokens but the text tower embeds only 8"):
        build_tokenizer(cfg)


def test_duplicate_vocab_line_is_an_error(tmp_path):
    vocab = write_vocab(tmp_path / "dup.txt", ["eye", "cup", "eye"])
    with pytest.raises(ValueError, match=r"dup.txt: line 8 repeats token 'eye' \(first on 6\)"):
        build_tokenizer(tiny_model_config(vocab))
