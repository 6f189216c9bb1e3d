"""RET-CLIP: one vision tower for both eyes, one text tower, three projection levels (patient, left, right).

Image path, as in the release: v = image_proj(tower(eye)) for each eye (CLIP's visual.proj, shared and
trained), then patient = image_patient([v_left, v_right]), left = image_left(v_left), right =
image_right(v_right), all bias-free.

The module only computes features: it never moves itself to a device, reads the environment or talks to
other processes, so the same object works under DDP, Accelerate, DeepSpeed or a plain evaluation script.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from retclip_dist.config import from_dict, to_dict
from retclip_dist.model.card import TrainingSummary, write_card
from retclip_dist.model.checkpointing import selected, set_block_checkpointing, tower_blocks
from retclip_dist.model.config import LEVELS, ImageInput, ModelConfig, ModelConfigError, checkpointing_mode
from retclip_dist.model.tokenizer import build_tokenizer
from retclip_dist.model.towers import (
    build_text_tower,
    build_vision_tower,
    image_input,
    load_vision_weights,
    tower_input_size,
)
from retclip_dist.model.weights import InitFromError, LoadReport, load_whole_model, read_state_dict

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"


class PerLevel(NamedTuple):
    """One tensor per contrastive level: features [b, D], or scalar scales/biases (fields in LEVELS order)."""

    patient: Tensor
    left: Tensor
    right: Tensor


class RetClipOutput(NamedTuple):
    """Everything the tripartite loss needs, by name: each field is the ``TripartiteLoss`` argument of the
    same name (train/step.py ``output_loss`` passes them so). A NamedTuple so that GradCache's pytree
    flattening (train/step.py) still sees its tensors."""

    image: PerLevel  # L2-normalised image features per level
    text: PerLevel  # L2-normalised text features per level
    logit_scale: PerLevel  # exp of the learnable log-scales
    logit_bias: PerLevel | None  # learnable biases, sigmoid loss only


def _text_head(hidden: int, embed_dim: int) -> nn.Sequential:
    head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, embed_dim))
    for layer in (head[0], head[2]):
        nn.init.normal_(layer.weight, std=hidden**-0.5)
        nn.init.zeros_(layer.bias)
    return head


def _scalars(value: float) -> nn.ParameterDict:
    # Shape [1], not a 0-d scalar: DeepSpeed broadcasts parameters as byte views, which 0-d tensors
    # cannot take, so a 0-d scale makes ZeRO fail before the first step.
    return nn.ParameterDict({level: nn.Parameter(torch.full((1,), float(value))) for level in LEVELS})


class RetClip(nn.Module):
    """The tripartite CLIP model. ``RetClip(cfg)`` builds both towers, loading local weights if configured."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.visual = build_vision_tower(cfg)
        self.text, text_report = build_text_tower(cfg)
        width = self.visual.num_features
        hidden = self.text.config.hidden_size
        # CLIP's visual.proj, shared by both eyes and all three image heads, and trained (as in the release).
        self.image_proj = nn.Linear(width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=width**-0.5)  # CLIP's init of visual.proj
        self.image_patient = nn.Linear(2 * cfg.embed_dim, cfg.embed_dim, bias=False)
        self.image_left = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.image_right = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.text_patient = _text_head(hidden, cfg.embed_dim)
        self.text_left = _text_head(hidden, cfg.embed_dim)
        self.text_right = _text_head(hidden, cfg.embed_dim)
        self.logit_scale = _scalars(cfg.resolved_init_logit_scale())
        self.logit_bias = _scalars(cfg.init_logit_bias) if cfg.loss == "sigmoid" else None
        vision_report = None
        if cfg.patient_scale_from_clip and cfg.vision_weights is None and cfg.init_from is None:
            raise ModelConfigError(
                "model.patient_scale_from_clip",
                "is true but model.vision_weights is not set: the patient scale starts from the CLIP "
                "file's logit_scale (set model.vision_weights to it, or patient_scale_from_clip false)",
            )
        if cfg.vision_weights is not None:
            vision_report, clip_scale = load_vision_weights(cfg, self.visual, self.image_proj)
            if cfg.patient_scale_from_clip:
                self._patient_scale_from(clip_scale, cfg.vision_weights)
        # Kept so that a launcher can print or assert what was initialised from disk.
        self.load_reports: dict[str, LoadReport] = {
            r.tower: r for r in (vision_report, text_report) if r is not None
        }
        self.set_grad_checkpointing(cfg.grad_checkpointing)
        if cfg.init_from is not None:
            self.load_reports["model"] = self.load_whole(cfg.init_from, cfg.init_from_strict)

    @torch.no_grad()
    def _patient_scale_from(self, clip_scale: Tensor | None, source: str) -> None:
        if clip_scale is None or clip_scale.numel() != 1:
            what = (
                "no 'logit_scale'"
                if clip_scale is None
                else f"a logit_scale of shape {tuple(clip_scale.shape)}"
            )
            raise ModelConfigError(
                "model.patient_scale_from_clip",
                f"{source}: has {what}, which the patient scale would start from (set "
                "model.patient_scale_from_clip false to start it at init_logit_scale)",
            )
        # copy_, not fill_(float()): in the pre-flight build on the meta device the scale has no value.
        self.logit_scale["patient"].copy_(clip_scale.reshape(1))

    def load_whole(self, directory: str | Path, strict: bool = True) -> LoadReport:
        """Overwrite every weight with a save_pretrained directory's (model.init_from); see load_whole_model."""
        path = Path(directory) / WEIGHTS_FILE
        if not path.is_file():
            raise InitFromError(f"{directory}: no {WEIGHTS_FILE} (not a save_pretrained directory)")
        try:
            state = read_state_dict(path)
        except ValueError as exc:
            raise InitFromError(str(exc)) from None
        return load_whole_model(self, state, str(directory), strict)

    @property
    def image_input(self) -> ImageInput:
        """The input the vision tower takes (size, mean, std, interpolation): the one place the data paths
        and retclip-eval learn it from."""
        return image_input(self.config, tower_input_size(self.visual))

    def set_grad_checkpointing(self, mode: str | bool = "full") -> None:
        """Recompute tower activations during backward: "full" (every block, HF only in training mode),
        "selective" (every other block of both towers, see model/checkpointing.py) or "off"; true/false
        mean full/off."""
        mode = checkpointing_mode(mode)
        self.visual.set_grad_checkpointing(mode == "full")
        # transformers 5.24 renamed gradient_checkpointing_* to activation_checkpointing_* (the old names
        # warn); 5.17 and 4.x have only the old ones.
        if hasattr(self.text, "activation_checkpointing_enable"):
            enable_fn, disable_fn, kwarg = (
                self.text.activation_checkpointing_enable,
                self.text.activation_checkpointing_disable,
                "activation_checkpointing_kwargs",
            )
        else:
            enable_fn, disable_fn, kwarg = (
                self.text.gradient_checkpointing_enable,
                self.text.gradient_checkpointing_disable,
                "gradient_checkpointing_kwargs",
            )
        if mode == "full":
            enable_fn(**{kwarg: {"use_reentrant": False}})
        else:
            disable_fn()
        for name, tower in (("vision", self.visual), ("text", self.text)):
            blocks = tower_blocks(tower)
            if mode == "selective" and not blocks:
                raise ModelConfigError(
                    "model.grad_checkpointing",
                    f"selective: the {name} tower {type(tower).__name__} has no 'blocks' or "
                    "'encoder.layer' to choose from; use full or off",
                )
            for index, block in enumerate(blocks):
                set_block_checkpointing(block, mode == "selective" and selected(index))

    @torch.no_grad()
    def clamp_logit_scales_(self) -> None:
        """Clamp every log-scale to [cfg.min_logit_scale, cfg.max_logit_scale]; the trainer calls this after
        each optimizer step."""
        for scale in self.logit_scale.values():
            scale.clamp_(min=self.config.min_logit_scale, max=self.config.max_logit_scale)

    def embed_eye(self, images: Tensor) -> Tensor:
        """Pooled vision tower output [n, W] of single-eye images, before the shared projection."""
        return self.visual(images)

    def project_eye(self, images: Tensor) -> Tensor:
        """The shared projection of the tower output [n, D], un-normalised: the release's image feature."""
        return self.image_proj(self.embed_eye(images))

    def encode_image(self, left: Tensor, right: Tensor) -> PerLevel:
        """Normalised patient/left/right image features; both eyes go through the tower in one batch."""
        eyes = self.project_eye(torch.cat([left, right]))
        v_left, v_right = eyes[: left.shape[0]], eyes[left.shape[0] :]
        return PerLevel(
            patient=F.normalize(self.image_patient(torch.cat([v_left, v_right], dim=-1)), dim=-1),
            left=F.normalize(self.image_left(v_left), dim=-1),
            right=F.normalize(self.image_right(v_right), dim=-1),
        )

    def _cls(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]

    def encode_text(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        left_input_ids: Tensor | None = None,
        left_attention_mask: Tensor | None = None,
        right_input_ids: Tensor | None = None,
        right_attention_mask: Tensor | None = None,
    ) -> PerLevel:
        """Normalised text features; an eye's head reads its own report when given, else the patient one.

        Per-eye reports are all-or-nothing per batch: the data loader fills a patient that lacks one with
        the patient report, so the tensors stay rectangular.
        """
        patient_cls = self._cls(input_ids, attention_mask)
        left_cls = patient_cls if left_input_ids is None else self._cls(left_input_ids, left_attention_mask)
        right_cls = (
            patient_cls if right_input_ids is None else self._cls(right_input_ids, right_attention_mask)
        )
        return PerLevel(
            patient=F.normalize(self.text_patient(patient_cls), dim=-1),
            left=F.normalize(self.text_left(left_cls), dim=-1),
            right=F.normalize(self.text_right(right_cls), dim=-1),
        )

    def forward(self, batch: dict[str, Tensor]) -> RetClipOutput:
        """Training step features from a collated batch ("left", "right", "input_ids", "attention_mask",
        and optionally "left_input_ids", "left_attention_mask", "right_input_ids", "right_attention_mask")."""
        image = self.encode_image(batch["left"], batch["right"])
        text = self.encode_text(
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("left_input_ids"),
            batch.get("left_attention_mask"),
            batch.get("right_input_ids"),
            batch.get("right_attention_mask"),
        )
        scale = PerLevel(*(self.logit_scale[level].exp() for level in LEVELS))
        bias = None if self.logit_bias is None else PerLevel(*(self.logit_bias[level] for level in LEVELS))
        return RetClipOutput(image, text, scale, bias)

    def save_pretrained(
        self,
        directory: str | Path,
        summary: TrainingSummary | None = None,
        state_dict: dict[str, Tensor] | None = None,
    ) -> Path:
        """Write a self-contained dir: safetensors weights, config.json, the tokenizer if one is set, and the
        model card README.md (with the trainer's ``summary`` of the run where there is one).

        ``state_dict``: the weights to write instead of this module's own (as in transformers), e.g. the
        full weights gathered from the shards of a ZeRO-3 run, whose module holds none."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # The saved config must rebuild the architecture without the original files: towers are
        # described inline and their weights live in model.safetensors.
        standalone = replace(
            self.config,
            vision_weights=None,
            text_path=None,
            text_config={**self.text.config.to_dict(), "model_type": self.text.config.model_type},
            tokenizer_path=None,
            init_from=None,  # the weights are in this directory now
        )
        if self.config.tokenizer_path or self.config.text_path:
            build_tokenizer(self.config).save_pretrained(str(directory / TOKENIZER_DIR))
        (directory / CONFIG_FILE).write_text(json.dumps(to_dict(standalone), indent=2, sort_keys=True))
        weights = self.state_dict() if state_dict is None else state_dict
        state = {k: v.detach().contiguous() for k, v in weights.items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        # The card counts parameters and reads the scales: from the weights written, not an empty ZeRO-3 shard.
        write_card(directory, self if state_dict is None else type(self).from_pretrained(directory), summary)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> RetClip:
        """Rebuild a model written by save_pretrained; weights must match the architecture exactly."""
        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; was it written by save_pretrained?")
        cfg = from_dict(ModelConfig, json.loads(config_path.read_text()), where=str(config_path))
        # Every scale is in the saved weights: a model trained with patient_scale_from_clip has no CLIP file
        # to read here, and needs none.
        cfg = replace(cfg, patient_scale_from_clip=False)
        if (directory / TOKENIZER_DIR).is_dir():
            cfg = replace(cfg, tokenizer_path=str(directory / TOKENIZER_DIR))
        state = load_file(str(directory / WEIGHTS_FILE))
        if "image_proj.weight" not in state:
            # Earlier versions had no shared projection (heads read the tower output, visual.proj folded
            # into each); three independent heads cannot in general be split into one shared map.
            raise ValueError(
                f"{directory}: saved without the shared image projection (image_proj.weight) by an earlier "
                "version; convert the release checkpoint again or retrain"
            )
        model = cls(cfg)
        model.load_state_dict(state, strict=True)
        return model
