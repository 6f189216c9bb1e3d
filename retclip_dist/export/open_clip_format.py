"""One eye level of RET-CLIP as an open_clip model: timm vision tower + Hugging Face text tower.

open_clip's ``CustomTextCLIP`` pairs one image encoder with one text encoder; RET-CLIP has three levels.
A single fundus photo belongs to the left or the right level, so each eye is its own open_clip model:
``encode_image`` = normalise(image_<eye>(image_proj(tower(photo)))) and ``encode_text`` =
normalise(text_<eye>(BERT [CLS])), scored with that level's logit scale, exactly RET-CLIP's eye-level
features (``retclip-eval zero-shot`` with the same head).

- Vision: open_clip's timm adapter (``timm_model_name``, ``timm_pool: ""`` keeps the tower's own pooling,
  ``timm_proj: linear`` without bias). The two bias-free maps image_<eye> o image_proj are one linear map,
  composed in float64. A tower built with extra constructor arguments (``model.vision_kwargs``: depth,
  size...) cannot be named by architecture alone: its timm ``config.json`` goes into ``vision/`` and open_clip
  builds it through timm's ``local-dir:`` name.
- Text: open_clip's Hugging Face adapter reads the text tower's ``config.json`` from ``hf_model_name`` (this
  folder: with no hub, a local path is the only name it can resolve) and the tokenizer from the same
  folder. Its own poolers and projections cannot express RET-CLIP's Linear-ReLU-Linear head, so the head
  is a registered pooler (retclip_open_clip.py, copied beside the weights) and the projection is the
  identity on the head's D outputs.
- Preprocessing: ``resize_mode: squash`` (the whole photo resized to the square input, no crop), bicubic,
  the model's mean and std: retclip-eval's own (eval/data.py ``model_input``).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
from open_clip.hf_configs import arch_dict
from safetensors.torch import save_file
from torch import Tensor

from retclip_dist.data.samples import clean_report
from retclip_dist.export import retclip_open_clip
from retclip_dist.export.check import CHECK_TEXTS, ExportMismatch, check_close, check_input
from retclip_dist.export.retclip_open_clip import CONFIG_FILE, LOCAL_DIR, POOLER_TYPE, VISION_DIR
from retclip_dist.export.timm_format import TIMM_CONFIG, timm_config
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.tokenizer import build_tokenizer

WEIGHTS_FILE = "open_clip_model.safetensors"  # the first name open_clip's local-dir loader looks for
MODULE_FILE = Path(retclip_open_clip.__file__).name
Eye = Literal["left", "right"]
EYES: tuple[str, ...] = ("left", "right")


def model_name(eye: Eye) -> str:
    """The name ``open_clip.add_model_config(DIR)`` registers this export's config under."""
    return f"retclip-{eye}"


def _composed(outer: Tensor, inner: Tensor) -> Tensor:
    """outer @ inner in float64, back to the weights' dtype: one map for two bias-free Linears."""
    return (outer.detach().double() @ inner.detach().double()).to(inner.dtype).contiguous()


def open_clip_state_dict(model: RetClip, eye: Eye) -> dict[str, Tensor]:
    """CustomTextCLIP's tensors for one eye level (``visual.trunk``, ``visual.head``, ``text.*``, scales)."""
    state = {f"visual.trunk.{k}": v.detach().clone() for k, v in model.visual.state_dict().items()}
    state["visual.head.proj.weight"] = _composed(
        getattr(model, f"image_{eye}").weight, model.image_proj.weight
    )
    state.update({f"text.transformer.{k}": v.detach().clone() for k, v in model.text.state_dict().items()})
    head = getattr(model, f"text_{eye}")
    first, last = head[0], head[2]
    for name, tensor in (
        ("weight1", first.weight),
        ("bias1", first.bias),
        ("weight2", last.weight),
        ("bias2", last.bias),
    ):
        state[f"text.pooler.{name}"] = tensor.detach().clone()
    hidden, embed = first.weight.shape[0], last.weight.shape[0]
    state["text.proj.weight"] = torch.eye(embed, hidden, dtype=last.weight.dtype)
    state["logit_scale"] = model.logit_scale[eye].detach().reshape(())
    if model.logit_bias is not None:
        state["logit_bias"] = model.logit_bias[eye].detach().reshape(())
    return {k: v.contiguous() for k, v in state.items()}


def open_clip_model_config(model: RetClip, eye: Eye, directory: Path, context_length: int) -> dict[str, Any]:
    """open_clip's model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) for an export at ``directory``."""
    directory = directory.resolve()
    name = model.config.vision_name
    if model.config.vision_kwargs:
        name = LOCAL_DIR + str(directory / VISION_DIR)
    config: dict[str, Any] = {
        "embed_dim": model.config.embed_dim,
        "init_logit_scale": float(model.logit_scale[eye].detach()),
        "vision_cfg": {
            "image_size": model.image_input.size,
            "timm_model_name": name,
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "timm_proj_bias": False,
        },
        "text_cfg": {
            "hf_model_name": str(directory),
            "hf_tokenizer_name": str(directory),
            "hf_model_pretrained": False,
            "hf_pooler_type": POOLER_TYPE,
            "hf_proj_type": "linear",
            "context_length": context_length,
            "vocab_size": model.text.config.vocab_size,
        },
    }
    if model.logit_bias is not None:
        config["init_logit_bias"] = float(model.logit_bias[eye].detach())
    return config


def preprocess_config(model: RetClip) -> dict[str, Any]:
    """open_clip's PreprocessCfg fields for the model's own input (eval/data.py ``model_input``)."""
    spec = model.image_input
    return {
        "size": spec.size,
        "mode": "RGB",
        "mean": list(spec.mean),
        "std": list(spec.std),
        "interpolation": spec.interpolation,
        "resize_mode": "squash",
    }


def check_exportable(model: RetClip, context_length: int) -> None:
    """Refuse what open_clip cannot hold, before anything is written (one line each)."""
    kind = model.text.config.model_type
    if kind not in arch_dict:  # open_clip's text adapter reads a tower's width by its model type
        raise ValueError(
            f"open_clip export: open_clip's text adapter knows {sorted(arch_dict)}, not {kind!r}"
        )
    hidden, embed = model.text.config.hidden_size, model.config.embed_dim
    if hidden < embed:
        raise ValueError(
            f"open_clip export: the text head's {embed} outputs cannot pass through open_clip's projection of "
            f"the {hidden}-wide text tower (needs hidden_size >= embed_dim)"
        )
    limit = model.text.config.max_position_embeddings
    if not 1 <= context_length <= limit:
        raise ValueError(f"--context_length {context_length}: the text tower takes 1 to {limit} tokens")


def write_open_clip(model: RetClip, directory: Path, eye: Eye, context_length: int, final: Path) -> list[str]:
    """Write one eye's open_clip export into ``directory``, configured for where it will live (``final``)."""
    check_exportable(model, context_length)
    config = open_clip_model_config(model, eye, final, context_length)
    files = [CONFIG_FILE, f"{model_name(eye)}.json", WEIGHTS_FILE, MODULE_FILE]
    (directory / CONFIG_FILE).write_text(
        json.dumps({"model_cfg": config, "preprocess_cfg": preprocess_config(model)}, indent=2) + "\n"
    )
    (directory / files[1]).write_text(json.dumps(config, indent=2) + "\n")
    save_file(open_clip_state_dict(model, eye), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    shutil.copyfile(retclip_open_clip.__file__, directory / MODULE_FILE)
    # The text tower's config and the tokenizer, where hf_model_name / hf_tokenizer_name point.
    text_config = copy.deepcopy(model.text.config)
    tokenizer = build_tokenizer(model.config)
    text_config.pad_token_id = tokenizer.pad_token_id  # open_clip masks every position holding this id
    text_config.save_pretrained(str(directory))
    files += ["config.json", *(Path(f).name for f in tokenizer.save_pretrained(str(directory)))]
    if model.config.vision_kwargs:
        (directory / VISION_DIR).mkdir()
        vision = timm_config(model, "none")
        (directory / VISION_DIR / TIMM_CONFIG).write_text(json.dumps(vision, indent=2) + "\n")
        files.append(f"{VISION_DIR}/{TIMM_CONFIG}")
    return files


def eye_features(
    model: RetClip, eye: Eye, images: Tensor, texts: list[str], context_length: int
) -> tuple[Tensor, Tensor]:
    """RET-CLIP's own normalised eye-level features of float ``images`` and raw ``texts``."""
    tokenizer = build_tokenizer(model.config)
    tokens = tokenizer(
        [clean_report(t) for t in texts],
        padding=True,
        truncation=True,
        max_length=context_length,
        return_tensors="pt",
    )
    image = getattr(model.encode_image(images, images), eye)
    text = getattr(model.encode_text(tokens["input_ids"], tokens["attention_mask"]), eye)
    return image, text


@torch.no_grad()
def verify_open_clip(model: RetClip, directory: Path, eye: Eye, context_length: int) -> dict[str, float]:
    """Build the export through open_clip (wherever it is now) and compare image and text features, the
    logit scale (and bias) with RetClip's; returns the largest differences, raises ExportMismatch beyond 1e-5."""
    clip, _, _ = retclip_open_clip.create_model_and_transforms(directory)
    clip.eval()
    tokenizer = open_clip.get_tokenizer(LOCAL_DIR + str(directory.resolve()))
    x = check_input(model.image_input.size)
    image, text = eye_features(model, eye, x, list(CHECK_TEXTS), context_length)
    texts = tokenizer(list(CHECK_TEXTS))
    found = {
        "image": check_close("open_clip image", clip.encode_image(x, normalize=True), image),
        "text": check_close("open_clip text", clip.encode_text(texts, normalize=True), text),
        "logit_scale": check_close(
            "open_clip logit scale", clip.logit_scale.reshape(1), model.logit_scale[eye]
        ),
    }
    if model.logit_bias is not None:  # the sigmoid loss's learnt bias
        theirs = getattr(clip, "logit_bias", None)
        if theirs is None:
            raise ExportMismatch(
                "open_clip logit bias: the export has none, the model's sigmoid loss has one"
            )
        found["logit_bias"] = check_close("open_clip logit bias", theirs.reshape(1), model.logit_bias[eye])
    return found


def open_clip_usage(model: RetClip, eye: Eye) -> list[str]:
    """How to load this export, for its README (paths relative to the export folder)."""
    return [
        f"RET-CLIP's {eye}-eye level as an open_clip model: `encode_image` gives the {eye}-eye image feature of",
        f"one photo, `encode_text` the {eye}-eye text feature, `logit_scale` is that level's. Use it for "
        f"{eye}-eye photos.",
        "",
        "```python",
        'import sys; sys.path.insert(0, "DIR")',
        f"import {Path(MODULE_FILE).stem}  # registers RET-CLIP's text head with open_clip: once, before loading",
        "import open_clip",
        'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:DIR")',
        'tokenizer = open_clip.get_tokenizer("local-dir:DIR")',
        "```",
        "",
        f'Or, after `open_clip.add_model_config("DIR")`: `open_clip.create_model_and_transforms("{model_name(eye)}",',
        f'pretrained="DIR/{WEIGHTS_FILE}", image_resize_mode="squash")` (the name route does not carry the',
        "preprocessing: give the resize mode, and `image_mean`/`image_std` if the model's differ from CLIP's).",
        "",
        "open_clip reads the text tower's config from this folder by its absolute path, written at export",
        f'time. If the folder was moved or copied: `{Path(MODULE_FILE).stem}.create_model_and_transforms("DIR")`.',
        "open_clip cleans texts its own way (ftfy, whitespace) before the tokenizer; texts that RET-CLIP's",
        "cleaning (lower case, straight double quotes) leaves alone tokenize identically.",
    ]
