"""Starting from CLIP weights as the release does: the tower, the shared projection and the patient scale.

The files are built here at reduced size (width 64, 2 blocks, patch 8 at 32 px, D = 32) under the names
OpenAI's and open_clip's state dicts use, text tower included, so loading must pick the image side out.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model_config
from release_reference import Visual
from safetensors.torch import save_file

from retclip_dist.model.config import ModelConfig, ModelConfigError
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.vocab import write_vocab

WIDTH, LAYERS, PATCH, RES, EMBED = 64, 2, 8, 32, 32
CLIP_SCALE = math.log(100.0)  # OpenAI's ViT-B/16 ends training at the 100 cap


def _clip_text_side() -> dict[str, torch.Tensor]:
    """The text half of a CLIP state dict (one block is enough to be 'unexpected' if misread)."""
    return {
        "token_embedding.weight": torch.randn(50, WIDTH),
        "positional_embedding": torch.randn(16, WIDTH),
        "transformer.resblocks.0.attn.in_proj_weight": torch.randn(3 * WIDTH, WIDTH),
        "transformer.resblocks.0.ln_1.weight": torch.ones(WIDTH),
        "ln_final.weight": torch.ones(WIDTH),
        "text_projection": torch.randn(WIDTH, EMBED),
    }


def _openai_layout(visual: Visual) -> dict[str, torch.Tensor]:
    """OpenAI's state dict (as the release's transform_openai_pretrain_weights.py saves it from the JIT
    archive): visual.* in OpenAI names, the text side, logit_scale, and three int entries."""
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    state.update(_clip_text_side())
    state["logit_scale"] = torch.tensor(CLIP_SCALE)
    for key, value in (("input_resolution", RES), ("context_length", 77), ("vocab_size", 49408)):
        state[key] = torch.tensor(value)
    return state


def _open_clip_timm_layout(model: RetClip, proj: torch.Tensor) -> dict[str, torch.Tensor]:
    """open_clip with a timm trunk: visual.trunk.<timm names>, the projection as visual.head.proj."""
    state = {f"visual.trunk.{k}": v for k, v in model.visual.state_dict().items()}
    state["visual.head.proj.weight"] = proj.T.contiguous()
    state.update(_clip_text_side())
    state["logit_scale"] = torch.tensor(CLIP_SCALE)
    return state


def _cfg(tmp_path, vision_name: str = "vit_base_patch16_clip_quickgelu_224") -> ModelConfig:
    cfg = tiny_model_config(write_vocab(tmp_path / "vocab.txt", ["eye"]), image_size=RES, embed_dim=EMBED)
    cfg.vision_name = vision_name
    cfg.vision_kwargs = {
        "img_size": RES,
        "patch_size": PATCH,
        "embed_dim": WIDTH,
        "depth": LAYERS,
        "num_heads": 1,
    }
    return cfg


@pytest.fixture
def visual():
    torch.manual_seed(3)
    return Visual(WIDTH, LAYERS, PATCH, RES, EMBED).eval()


@pytest.mark.parametrize("layout", ["openai", "open_clip"])
def test_clip_weights_fill_tower_and_shared_projection(tmp_path, visual, layout):
    state = _openai_layout(visual)
    if layout == "open_clip":
        # open_clip's own ViT names the image side exactly as OpenAI does, without the three ints.
        state = {
            k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")
        }
    path = tmp_path / "clip.bin"
    torch.save(state, path)
    cfg = _cfg(tmp_path)
    cfg.vision_weights, cfg.patient_scale_from_clip = str(path), True
    model = RetClip(cfg).eval()
    report = model.load_reports["vision"]
    assert report.missing == [] and report.unexpected == []
    assert report.loaded == len(visual.state_dict())  # every visual.* tensor, proj included
    assert torch.equal(model.image_proj.weight, visual.proj.T)
    x = torch.randn(2, 3, RES, RES)
    with torch.no_grad():
        torch.testing.assert_close(model.project_eye(x), visual(x), atol=2e-5, rtol=1e-4)
    # Release: the patient scale starts at CLIP's, the eye scales at ln 90.
    assert model.logit_scale["patient"].item() == pytest.approx(CLIP_SCALE)
    assert model.logit_scale["left"].item() == pytest.approx(math.log(90))


def test_open_clip_timm_trunk_layout(tmp_path, visual):
    cfg = _cfg(tmp_path)
    torch.manual_seed(4)
    source = RetClip(cfg)
    save_file(_open_clip_timm_layout(source, visual.proj.detach()), str(tmp_path / "oc.safetensors"))
    cfg.vision_weights = str(tmp_path / "oc.safetensors")
    model = RetClip(cfg)
    report = model.load_reports["vision"]
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(model.image_proj.weight, visual.proj.T)
    assert all(torch.equal(model.visual.state_dict()[k], v) for k, v in source.visual.state_dict().items())
    assert model.logit_scale["patient"].item() == pytest.approx(math.log(90))  # patient_scale_from_clip off


def test_gelu_tower_refuses_quickgelu_clip_weights_by_name(tmp_path, visual):
    torch.save(_openai_layout(visual), tmp_path / "clip.pt")
    cfg = _cfg(tmp_path, "vit_base_patch16_clip_224")
    cfg.vision_weights = str(tmp_path / "clip.pt")
    with pytest.raises(
        ModelConfigError,
        match=r"clip\.pt: these CLIP weights were trained with quick_gelu but model\.vision_name "
        r"'vit_base_patch16_clip_224' uses gelu; use model\.vision_name 'vit_base_patch16_clip_quickgelu_224'",
    ):
        RetClip(cfg)
    cfg.vision_weights_act = "gelu"  # the user says these weights were trained with GELU (e.g. LAION's)
    assert RetClip(cfg).load_reports["vision"].missing == []


def test_patient_scale_from_clip_needs_a_logit_scale(tmp_path, visual):
    state = {k: v for k, v in _openai_layout(visual).items() if k != "logit_scale"}
    torch.save(state, tmp_path / "clip.pt")
    cfg = _cfg(tmp_path)
    cfg.vision_weights, cfg.patient_scale_from_clip = str(tmp_path / "clip.pt"), True
    with pytest.raises(
        ModelConfigError, match=r"clip\.pt: has no 'logit_scale', which the patient scale"
    ) as err:
        RetClip(cfg)
    assert err.value.field == "model.patient_scale_from_clip"
    # Without any vision weights (configs/retclip_release.yaml as shipped) it was silently ignored.
    cfg.vision_weights = None
    with pytest.raises(ModelConfigError, match=r"^is true but model\.vision_weights is not set") as err:
        RetClip(cfg)
    assert err.value.field == "model.patient_scale_from_clip"


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: {f"module.{k}": v for k, v in s.items()},  # DDP
        lambda s: {f"model.{k}": v for k, v in s.items()},  # Lightning-style
        lambda s: {
            "epoch": 3,
            "state_dict": {f"module.{k}": v for k, v in s.items()},
        },  # a training checkpoint
        lambda s: {"model": s, "optimizer": {"lr": 0.1}},
    ],
    ids=["module", "model", "state_dict+module", "model-key"],
)
def test_unambiguous_wrappers_of_a_clip_file_are_unwrapped(tmp_path, visual, wrap):
    torch.save(wrap(_openai_layout(visual)), tmp_path / "clip.pt")
    cfg = _cfg(tmp_path)
    cfg.vision_weights, cfg.patient_scale_from_clip = str(tmp_path / "clip.pt"), True
    model = RetClip(cfg)
    assert model.load_reports["vision"].loaded == len(visual.state_dict())
    assert torch.equal(model.image_proj.weight, visual.proj.T)
    assert model.logit_scale["patient"].item() == pytest.approx(CLIP_SCALE)


def test_ambiguous_wrappers_are_refused_by_name(tmp_path, visual):
    state = _openai_layout(visual)
    cfg = _cfg(tmp_path)
    cfg.vision_weights = str(tmp_path / "two.pt")
    torch.save({"model": state, "state_dict": state}, tmp_path / "two.pt")
    with pytest.raises(ModelConfigError, match=r"two\.pt holds 2 state dicts \('state_dict', 'model'\)"):
        RetClip(cfg)
    # "module." on some keys only: not stripped, and the tensors that keep it are named.
    part = {(f"module.{k}" if "resblocks.1." in k else k): v for k, v in state.items()}
    torch.save(part, tmp_path / "part.pt")
    cfg.vision_weights = str(tmp_path / "part.pt")
    with pytest.raises(ModelConfigError) as err:
        RetClip(cfg)
    message = str(err.value)
    assert "part.pt: does not fit the vision tower: 12 of the tower's tensors are not in the file" in message
    assert "blocks.1.attn.proj.bias" in message and "\n" not in message


def test_timm_clip_weights_keep_their_projection(tmp_path, visual):
    """timm's own CLIP files (vit_base_patch16_clip_224.openai) hold CLIP's projection as the head, with
    the zero bias timm's converter writes; it is the shared projection, not a classifier to drop."""
    cfg = _cfg(tmp_path)
    torch.manual_seed(4)
    tower = RetClip(cfg).visual.state_dict()
    state = {**tower, "head.weight": visual.proj.detach().T.contiguous(), "head.bias": torch.zeros(EMBED)}
    save_file(state, str(tmp_path / "timm_clip.safetensors"))
    cfg.vision_weights = str(tmp_path / "timm_clip.safetensors")
    model = RetClip(cfg)
    report = model.load_reports["vision"]
    assert report.missing == [] and report.unexpected == [] and report.loaded == len(tower) + 1
    assert torch.equal(model.image_proj.weight, visual.proj.T)
    # A trained bias makes it a classifier head: not used (a known name), and the projection starts random.
    state["head.bias"] = torch.full((EMBED,), 0.1)
    save_file(state, str(tmp_path / "classifier.safetensors"))
    cfg.vision_weights = str(tmp_path / "classifier.safetensors")
    report = RetClip(cfg).load_reports["vision"]
    assert report.missing == ["image_proj.weight"] and report.unexpected == ["head.bias", "head.weight"]


def test_clip_file_without_a_projection_is_refused(tmp_path, visual):
    state = {k: v for k, v in _openai_layout(visual).items() if k != "visual.proj"}
    torch.save(state, tmp_path / "noproj.pt")
    cfg = _cfg(tmp_path)
    cfg.vision_weights = str(tmp_path / "noproj.pt")
    with pytest.raises(
        ModelConfigError, match=r"1 of the tower's tensors are not in the file \(image_proj\.weight\)"
    ):
        RetClip(cfg)
    cfg.vision_weights_ignore = ["image_proj.weight"]  # the user says so: it starts random
    assert RetClip(cfg).load_reports["vision"].missing == ["image_proj.weight"]


def test_model_started_from_clip_scale_reloads_without_the_clip_file(tmp_path, visual):
    """A saved model holds every scale: its config's patient_scale_from_clip needs no CLIP file to reload."""
    torch.save(_openai_layout(visual), tmp_path / "clip.pt")
    cfg = _cfg(tmp_path)
    cfg.vision_weights, cfg.patient_scale_from_clip = str(tmp_path / "clip.pt"), True
    saved = RetClip(cfg).save_pretrained(tmp_path / "model")
    (tmp_path / "clip.pt").unlink()
    loaded = RetClip.from_pretrained(saved)
    assert loaded.logit_scale["patient"].item() == pytest.approx(CLIP_SCALE)
    assert torch.equal(loaded.image_proj.weight, visual.proj.T)
