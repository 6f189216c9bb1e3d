"""Model configuration: which towers to build, where their local weights live, and the head/scale setup.

Defaults reproduce the paper: a ViT-B/16 at 224 px for both eyes, a BERT-base-shaped Chinese text
encoder (RoBERTa-wwm-ext-base-chinese has BERT's architecture and a 21,128-token vocabulary), D = 512.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

# The three contrastive levels, in the order every per-level tuple uses.
LEVELS = ("patient", "left", "right")

# CLIP's input normalisation (OpenAI and open_clip), which the release and its ViT-B/16 starting point use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224  # CLIP ViT-B/16's side: the data path's size where no model states one (tests, benchmarks)


@dataclass(frozen=True)
class ImageInput:
    """What the vision tower takes, as the model states it (timm's resolve_data_config, open_clip's
    preprocess config): both augmentation paths and retclip-eval read this, never constants of their own."""

    size: int  # side of the square input in pixels
    mean: tuple[float, ...]  # per-channel mean subtracted after scaling pixels to [0, 1]
    std: tuple[float, ...]  # per-channel standard deviation divided by after that
    interpolation: str = (
        "bicubic"  # resize filter: bicubic or bilinear (PIL); training augmentation: bicubic only
    )
    # How a photo of any shape becomes size x size (retclip-eval; training shards are already square):
    # "squash" resizes both sides to size / crop_pct, "shortest" the shorter side, "longest" the longer
    # side (keeping the aspect ratio); the result is then centre-cropped, or padded with black, to size.
    resize: Literal["squash", "shortest", "longest"] = "squash"
    crop_pct: float = 1.0  # share of the resized image kept by the centre crop (timm's crop_pct)
    pad: Literal["centre", "end"] = "centre"  # where padding goes: both sides, or right and bottom only

    def describe(self) -> str:
        """One line for result tables: the geometry, filter and normalisation, as a person would repeat it."""
        scaled = math.floor(self.size / self.crop_pct)
        if self.resize == "squash":
            steps = f"resized to {scaled}x{scaled}"
        elif self.resize == "shortest":
            steps = f"shorter side to {scaled}"
        else:
            steps = f"longer side to {scaled}"
        if scaled != self.size or self.resize == "shortest":
            steps += f", centre crop {self.size}"
        if self.resize == "longest":
            steps += ", padded with black " + (
                "on both sides" if self.pad == "centre" else "right and bottom"
            )
        mean = ", ".join(f"{v:g}" for v in self.mean)
        std = ", ".join(f"{v:g}" for v in self.std)
        return f"{self.size} px: {steps} ({self.interpolation}); mean ({mean}), std ({std})"

    @classmethod
    def clip(cls, size: int | None = None) -> ImageInput:
        """CLIP normalisation at ``size`` px (CLIP's own side by default): for data-path code that runs
        without a model (tests, benchmarks)."""
        return cls(CLIP_SIZE if size is None else size, CLIP_MEAN, CLIP_STD)


# BERT-base shape with the Chinese vocabulary, used when no local text checkpoint is given.
BERT_BASE_CHINESE: dict[str, Any] = {
    "model_type": "bert",
    "vocab_size": 21128,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
}

# The public release starts all three InfoNCE temperatures at 1/90; SigLIP starts its sigmoid at 10.
INFONCE_INIT_LOGIT_SCALE = math.log(90)
SIGMOID_INIT_LOGIT_SCALE = math.log(10)
# The release clamps its log-scales to this range after each step (its train.py writes ln 100 as 4.6052);
# configs/retclip_release.yaml spells the same numbers.
RELEASE_LOGIT_SCALE_RANGE = (0.0, 4.6052)
# timm builds OpenAI-CLIP-shaped ViTs under both names; "_clip_quickgelu_" is the one CLIP was trained with.
CLIP_QUICKGELU_TAG = "_clip_quickgelu_"


CHECKPOINTING_MODES = ("off", "selective", "full")


class ModelConfigError(ValueError):
    """A model config the model cannot be built from (weights that do not fit, a setting the towers cannot
    take): ``field`` is the config field to change, the message one line naming the file or reason.

    train/preflight.py builds the model on the meta device before any process starts and reports these as
    ``{field}: {message}``; elsewhere (retclip-eval, the converter) they are plain ValueErrors."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def checkpointing_mode(value: str | bool) -> str:
    """model.grad_checkpointing as one of CHECKPOINTING_MODES; the former bool reads true = full, false = off."""
    if isinstance(value, bool):
        return "full" if value else "off"
    if value not in CHECKPOINTING_MODES:
        raise ValueError(f"model.grad_checkpointing={value!r}: must be one of {list(CHECKPOINTING_MODES)}")
    return value


@dataclass
class ModelConfig:
    # timm architecture name of the eye encoder; the default is OpenAI CLIP's ViT-B/16 (QuickGELU MLP)
    vision_name: str = "vit_base_patch16_clip_quickgelu_224"
    vision_kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs (img_size, depth...)
    vision_weights: str | None = None  # local vision state dict (.safetensors/.bin/.pt/.pth); None = random
    # Names (* wildcards) that may be left out when vision_weights loads, as its refusal prints them: the
    # model's for tensors the file lacks (visual.norm.bias), the file's for tensors the tower has no place for
    vision_weights_ignore: list[str] = field(default_factory=list)
    text_path: str | None = None  # local HF model dir (config.json, optional weights, tokenizer)
    # Names (* wildcards) that may be left out when text_path's weights load, as its refusal prints them
    text_weights_ignore: list[str] = field(default_factory=list)
    text_config: dict = field(default_factory=lambda: dict(BERT_BASE_CHINESE))  # HF config w/o text_path
    tokenizer_path: str | None = None  # vocab .txt or HF tokenizer dir; None = text_path
    embed_dim: int = 512  # D, the shared image-text embedding width
    # MLP activation the vision_weights were trained with; "auto": QuickGELU for OpenAI-CLIP-layout files
    # (OpenAI's ViT-B/16 and the release), unchecked for others. A tower with another activation is refused.
    vision_weights_act: Literal["auto", "quick_gelu", "gelu"] = "auto"
    init_logit_scale: float | None = None  # ln(1/temperature); None = ln 90 (infonce), ln 10 (sigmoid)
    # Release: true, the patient scale starts from vision_weights' CLIP logit_scale (ln 100 for OpenAI's
    # ViT-B/16), the eye scales at init_logit_scale; false (ours): all three at init_logit_scale.
    patient_scale_from_clip: bool = False
    min_logit_scale: float | None = None  # lower clamp after each step; None = none (release: 0)
    max_logit_scale: float = math.log(100)  # upper clamp after each step (release: 4.6052, ln 100 rounded)
    init_logit_bias: float = -10.0  # sigmoid loss only: initial learnable bias (SigLIP's value)
    loss: Literal["infonce", "sigmoid"] = "infonce"  # which contrastive objective the scales serve
    # Recompute tower activations in backward to save memory: "off", "selective" (every other block of
    # both towers), "full" (every block). Old configs' true/false read as full/off.
    grad_checkpointing: Literal["off", "selective", "full"] | bool = "off"
    # A save_pretrained directory (a run's model/ or convert-release output) whose weights replace every
    # initial weight: towers, heads and scales. Optimiser, schedule and data position still start fresh.
    init_from: str | None = None
    # true: refuse unless the directory holds exactly this model's tensors; false: load the common ones
    # and list the missing (kept at their fresh init) and unexpected (ignored). Shapes must always match.
    init_from_strict: bool = True
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))  # input normalisation mean
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))  # input normalisation std

    def __post_init__(self) -> None:
        self.grad_checkpointing = checkpointing_mode(self.grad_checkpointing)

    def resolved_init_logit_scale(self) -> float:
        """The initial logit scale, falling back to the published value for the chosen loss."""
        if self.init_logit_scale is not None:
            return self.init_logit_scale
        return SIGMOID_INIT_LOGIT_SCALE if self.loss == "sigmoid" else INFONCE_INIT_LOGIT_SCALE
