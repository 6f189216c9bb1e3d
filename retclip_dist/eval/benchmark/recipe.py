"""Full fine-tuning with RETFound's recipe (rmaphoh/RETFound_MAE main_finetune.py, README command).

Layer-wise lr decay, stochastic depth, label smoothing, RandAugment + random erasing (timm's training
transform, as RETFound builds it), AdamW, peak lr = blr * global batch / 256 with a per-step linear
warmup and half-cosine decay, and the epoch kept that scores best on validation. The network is the
model adapter's (eval/models): single images train tower + linear head; on paired layouts (ODIR-5K) ours
trains tower + shared projection + patient head + linear head on both eyes, and other models' towers
embed both eyes into one linear head. Accelerate places the model (and under ``accelerate launch`` wraps it in DDP: each
process takes its slice of every global batch); only the 1-process CPU path is tested.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import create_transform
from timm.layers import DropPath
from torch import Tensor, nn

from retclip_dist.eval.benchmark.suite import FinetuneRecipe
from retclip_dist.eval.finetune import optimiser_step, predict
from retclip_dist.eval.metrics import compute_metrics, selection_score
from retclip_dist.model.retclip import RetClip
from retclip_dist.runtime.env import accelerator_placement

if TYPE_CHECKING:
    from retclip_dist.eval.models.base import BenchModel

_LATEST = "latest"  # the newest epoch checkpoint (Accelerate state) in a cell's checkpoint directory
_PROGRESS = "progress.json"  # epoch, history and best score, inside the checkpoint
_BEST = "best.safetensors"  # weights of the best epoch so far
log = logging.getLogger(__name__)

# The tower's stem: layer 0 for the layer-wise lr decay (RETFound's get_layer_id_for_vit), by the names
# of timm ViTs, open_clip's ViT (class_embedding, positional_embedding, conv1, ln_pre) and ResNets.
_STEM = (
    "cls_token",
    "pos_embed",
    "patch_embed",
    "reg_token",
    "class_embedding",
    "positional_embedding",
    "conv1",
    "bn1",
    "ln_pre",
)
# Parameters without weight decay besides biases and norms (RETFound's no_weight_decay list, by name).
_NO_DECAY = ("cls_token", "pos_embed", "reg_token", "class_embedding", "positional_embedding")
# Transformer block i of a timm ViT (blocks.i) or an open_clip ViT (transformer.resblocks.i).
_BLOCK = re.compile(r"^(?:transformer\.res)?blocks\.(\d+)\.")
# ResNet stage k (layer1..layer4): a stage counts as one block for the layer decay.
_STAGE = re.compile(r"^layer(\d+)\.")


class BenchClassifier(nn.Module):
    """Single eye: tower -> Linear. Pair [n, 2, 3, H, W]: tower (both eyes) -> shared projection ->
    patient head -> Linear, the patient-level path of RetClip.encode_image."""

    def __init__(self, model: RetClip, n_classes: int, paired: bool) -> None:
        super().__init__()
        self.tower = model.visual
        self.paired = paired
        if paired:
            self.proj = model.image_proj
            self.patient = model.image_patient
        width = model.config.embed_dim if paired else model.visual.num_features
        self.head = nn.Linear(width, n_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # RETFound's head init: start near uniform
        nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor) -> Tensor:
        if not self.paired:
            return self.head(self.tower(images))
        n = images.shape[0]
        eyes = self.proj(self.tower(images.flatten(0, 1))).reshape(n, -1)  # [left | right] per patient
        return self.head(self.patient(eyes))


class ImageClassifier(nn.Module):
    """Any image tower fine-tuned under a new head: single eye: tower -> Linear; pair [n, 2, 3, H, W]:
    both eyes through the tower, their pooled features side by side -> Linear."""

    def __init__(self, tower: nn.Module, width: int, n_classes: int, paired: bool) -> None:
        super().__init__()
        self.tower = tower
        self.paired = paired
        self.head = nn.Linear(2 * width if paired else width, n_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # RETFound's head init, as BenchClassifier
        nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor) -> Tensor:
        if not self.paired:
            return self.head(self.tower(images))
        n = images.shape[0]
        return self.head(self.tower(images.flatten(0, 1)).reshape(n, -1))


def _vit_blocks(tower: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a timm ViT, or none for another tower."""
    blocks = getattr(tower, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.Sequential | nn.ModuleList) else []


def set_drop_path(tower: nn.Module, rate: float) -> bool:
    """Stochastic depth rising linearly over the blocks to ``rate`` (timm's drop_path_rate rule), for
    timm ViT blocks; False (nothing set) for towers without them (ResNets, open_clip's ViT)."""
    blocks = [b for b in _vit_blocks(tower) if hasattr(b, "drop_path1")]
    for i, block in enumerate(blocks):
        p = rate * i / max(len(blocks) - 1, 1)
        block.drop_path1 = DropPath(p) if p > 0 else nn.Identity()
        block.drop_path2 = DropPath(p) if p > 0 else nn.Identity()
    return bool(blocks)


def tower_depth(tower: nn.Module) -> int:
    """Blocks of the tower for the layer decay: ViT blocks, open_clip resblocks, or ResNet stages."""
    blocks = _vit_blocks(tower) or list(getattr(getattr(tower, "transformer", None), "resblocks", []))
    if blocks:
        return len(blocks)
    return sum(1 for k in range(1, 5) if hasattr(tower, f"layer{k}"))


def layer_id(name: str, n_layers: int) -> int:
    """0 for the stem, i + 1 for tower block i (ResNet: stage k is k), n_layers for everything after the
    blocks (final norm, projection, heads)."""
    if name.startswith("tower."):
        rest = name[len("tower.") :]
        if rest.startswith(_STEM):
            return 0
        block = _BLOCK.match(rest)
        if block:
            return int(block.group(1)) + 1
        stage = _STAGE.match(rest)
        if stage:
            return int(stage.group(1))
    return n_layers


def param_groups(net: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with an lr_scale per layer; no decay for biases, norms, position embedding, cls."""
    n_layers = tower_depth(net.tower) + 1
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in net.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name.split(".")[-1] in _NO_DECAY
        layer = layer_id(name, n_layers)
        group = groups.setdefault(
            (layer, no_decay),
            {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (n_layers - layer),
            },
        )
        group["params"].append(param)
    return list(groups.values())


def lr_at(progress: float, peak: float, recipe: FinetuneRecipe) -> float:
    """Learning rate at fractional epoch ``progress``: linear warmup, then half-cosine to min_lr."""
    if progress < recipe.warmup_epochs:
        return peak * progress / recipe.warmup_epochs
    span = max(recipe.epochs - recipe.warmup_epochs, 1e-8)
    return recipe.min_lr + (peak - recipe.min_lr) * 0.5 * (
        1 + math.cos(math.pi * (progress - recipe.warmup_epochs) / span)
    )


def _augment(images: Tensor, transform: Any) -> Tensor:
    """uint8 [..., 3, H, W] -> normalised, augmented float, each image (each eye) drawn independently."""
    flat = images.reshape(-1, *images.shape[-3:])
    out = torch.stack([transform(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in flat])
    return out.reshape(*images.shape[:-3], *out.shape[-3:])


def _checkpoint(accelerator: Accelerator, directory: Path, progress: dict[str, Any]) -> None:
    """Accelerate state plus progress, written under a temporary name and renamed into place."""
    tmp = directory / (_LATEST + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / _PROGRESS).write_text(json.dumps(progress, indent=1))
        shutil.rmtree(directory / _LATEST, ignore_errors=True)
        tmp.rename(directory / _LATEST)
    accelerator.wait_for_everyone()


def finetune_recipe(
    model: BenchModel,
    images: Tensor,
    labels: np.ndarray,
    index: dict[str, np.ndarray],
    classes: list[str],
    multilabel: bool,
    recipe: FinetuneRecipe,
    seed: int,
    checkpoints: Path | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Fine-tune a copy of ``model``'s tower (model.classifier) on index["train"], keep the best epoch on
    index["val"]; returns the test probabilities [n_test, C] and the per-epoch record. ``images`` is
    [n, 3, H, W] or, for paired layouts, [n, 2, 3, H, W] uint8. With ``checkpoints``, every epoch ends
    with an atomic checkpoint (Accelerate state: model, optimizer, RNGs) and the run continues from the
    newest one there."""
    set_seed(seed)
    spec = model.image_input  # the model's normalisation, for timm's transform and for predict
    paired = images.dim() == 5
    net = model.classifier(len(classes), paired)
    if recipe.drop_path > 0 and not set_drop_path(net.tower, recipe.drop_path):
        log.info("%s tower has no timm ViT blocks: fine-tuning without drop path", model.kind)
    accelerator = Accelerator(
        mixed_precision=recipe.precision, **accelerator_placement(torch.cuda.is_available())
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    peak = recipe.blr * recipe.batch_size * world / 256
    optimizer = torch.optim.AdamW(param_groups(net, recipe.weight_decay, recipe.layer_decay), lr=peak)
    net, optimizer = accelerator.prepare(net, optimizer)
    size = images.shape[-1]
    transform = create_transform(
        size,
        is_training=True,
        auto_augment=recipe.auto_augment or None,
        interpolation=spec.interpolation,
        re_prob=recipe.reprob,
        re_mode="pixel",
        re_count=1,
        mean=spec.mean,
        std=spec.std,
    )
    if multilabel:
        loss_fn: nn.Module = nn.BCEWithLogitsLoss()
    else:
        loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.smoothing)
    train = index["train"]
    target_all = torch.as_tensor(labels)
    global_batch = recipe.batch_size * world
    steps = math.ceil(len(train) / global_batch)
    best: tuple[float, int, dict[str, Tensor]] | None = None
    history: list[dict[str, Any]] = []
    start = 0
    if checkpoints is not None and (checkpoints / _LATEST).is_dir():
        accelerator.load_state(str(checkpoints / _LATEST))
        progress = json.loads((checkpoints / _LATEST / _PROGRESS).read_text())
        start, history = progress["epoch"], progress["history"]
        best = (progress["best_score"], progress["best_epoch"], load_file(str(checkpoints / _BEST)))
        log.info("resumed fine-tuning from %s after epoch %d", checkpoints, start)
    for epoch in range(start, recipe.epochs):
        net.train()
        order = train[
            torch.randperm(
                len(train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
            ).numpy()
        ]
        total = 0.0
        for step in range(steps):
            chunk = order[step * global_batch : (step + 1) * global_batch]
            if world > 1:  # every process needs a slice: wrap the tail around the epoch
                chunk = order[(step * global_batch + np.arange(global_batch)) % len(order)]
            mine = chunk[rank::world]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch + step / steps, peak, recipe) * group["lr_scale"]
            batch = _augment(images[mine], transform).to(accelerator.device)
            target = target_all[mine].to(accelerator.device)
            total += optimiser_step(net, loss_fn, batch, target, optimizer, accelerator, multilabel) * len(
                mine
            )
        probs = predict(
            accelerator.unwrap_model(net), images[index["val"]], multilabel, recipe.batch_size, spec
        )
        metrics = compute_metrics(labels[index["val"]], probs, classes, multilabel)
        score = selection_score(metrics, recipe.select_metric)
        history.append(
            {"epoch": epoch + 1, "train_loss": total / len(train), f"val_{recipe.select_metric}": score}
        )
        if best is None or score > best[0]:
            state = {
                k: v.detach().cpu().clone() for k, v in accelerator.unwrap_model(net).state_dict().items()
            }
            best = (score, epoch + 1, state)
            if checkpoints is not None and accelerator.is_main_process:
                checkpoints.mkdir(parents=True, exist_ok=True)
                save_file(state, str(checkpoints / (_BEST + ".tmp")))
                os.replace(checkpoints / (_BEST + ".tmp"), checkpoints / _BEST)
        if checkpoints is not None:
            _checkpoint(
                accelerator,
                checkpoints,
                {"epoch": epoch + 1, "history": history, "best_score": best[0], "best_epoch": best[1]},
            )
    assert best is not None
    final = accelerator.unwrap_model(net)
    final.load_state_dict(best[2])
    history.append({"best_epoch": best[1]})
    return predict(final, images[index["test"]], multilabel, recipe.batch_size, spec), history
