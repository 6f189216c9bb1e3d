"""Full fine-tuning: the RetClip vision tower plus a linear head, early-stopped on validation.

Accelerate handles the device, mixed precision and the optimiser/RNG state in checkpoints. Downstream
sets are small (hundreds to a few thousand images), so one process reads them from memory; batches
follow a permutation seeded by (seed, epoch), which is what makes a resumed run repeat the same order.
Each epoch ends with an atomic checkpoint (written to ``.tmp``, then renamed) and, when validation
improved, an atomic ``best.safetensors``; the test split is scored with those best weights.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from retclip_dist.eval.config import FinetuneConfig
from retclip_dist.eval.features import normalise
from retclip_dist.eval.metrics import compute_metrics, selection_score
from retclip_dist.model.config import ImageInput

log = logging.getLogger(__name__)

BEST_FILE = "best.safetensors"
STATE_FILE = "finetune_state.json"


class TowerClassifier(nn.Module):
    """Vision tower -> pooled [n, W] -> Linear(W -> C) logits."""

    def __init__(self, tower: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.tower = tower
        self.head = nn.Linear(tower.num_features, n_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.tower(images))


@dataclass
class Progress:
    epoch: int = 0  # epochs completed
    best_score: float = float("-inf")  # best validation selection metric so far
    best_epoch: int = 0  # epoch that produced best.safetensors
    bad_epochs: int = 0  # epochs since the last improvement
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch loss and validation score


def _save_atomic(directory: Path, accelerator: Accelerator, progress: Progress) -> Path:
    final = directory / f"epoch_{progress.epoch:04d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.save_state(str(tmp))
    (tmp / STATE_FILE).write_text(json.dumps(asdict(progress), indent=1))
    tmp.rename(final)
    for old in directory.glob("epoch_*"):
        if old != final:
            shutil.rmtree(old)
    return final


def _latest(directory: Path) -> Path | None:
    done = sorted(p for p in directory.glob("epoch_*") if not p.name.endswith(".tmp"))
    return done[-1] if done else None


@torch.inference_mode()
def predict(
    net: nn.Module, images: Tensor, multilabel: bool, batch_size: int, image: ImageInput
) -> np.ndarray:
    """[n, C] probabilities (sigmoid for multi-label, softmax otherwise); ``image``: the model's input."""
    net.eval()
    device = next(net.parameters()).device
    logits = torch.cat(
        [
            net(normalise(images[i : i + batch_size].to(device), image)).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
    )
    return (logits.sigmoid() if multilabel else logits.softmax(dim=-1)).numpy()


def _train_epoch(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    images: Tensor,
    labels: Tensor,
    multilabel: bool,
    cfg: FinetuneConfig,
    epoch: int,
    image: ImageInput,
) -> float:
    net.train()
    loss_fn = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
    total = 0.0
    for start in range(0, len(order), cfg.batch_size):
        index = order[start : start + cfg.batch_size]
        batch = normalise(images[index].to(accelerator.device), image)
        target = labels[index].to(accelerator.device)
        total += optimiser_step(net, loss_fn, batch, target, optimizer, accelerator, multilabel) * len(index)
    return total / len(order)


def optimiser_step(
    net: nn.Module,
    loss_fn: nn.Module,
    batch: torch.Tensor,
    target: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    multilabel: bool,
) -> float:
    """One classification step (BCE targets as floats for multi-label); the batch's mean loss."""
    loss = loss_fn(net(batch), target.float() if multilabel else target)
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    optimizer.step()
    return loss.item()


def finetune(
    tower: nn.Module,
    train: tuple[Tensor, np.ndarray],
    val: tuple[Tensor, np.ndarray],
    classes: list[str],
    multilabel: bool,
    cfg: FinetuneConfig,
    out_dir: str | Path,
    image: ImageInput,
) -> tuple[TowerClassifier, Progress]:
    """Train tower + head on ``train`` (uint8 images, labels) until validation stops improving.

    ``image`` is the model's input (``RetClip.image_input``): the images are normalised as it says.

    Returns the classifier holding the best validation weights, and the training record.
    """
    out = Path(out_dir)
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    net = TowerClassifier(tower, len(classes))
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    accelerator = Accelerator(mixed_precision=cfg.precision)
    net, optimizer = accelerator.prepare(net, optimizer)
    progress = Progress()
    latest = _latest(checkpoints) if cfg.resume else None
    if latest is not None:
        accelerator.load_state(str(latest))
        progress = Progress(**json.loads((latest / STATE_FILE).read_text()))
        log.info("resumed fine-tuning from %s (epoch %d)", latest, progress.epoch)
    train_labels = torch.as_tensor(train[1])
    while progress.epoch < cfg.epochs and progress.bad_epochs < cfg.patience:
        loss = _train_epoch(
            net, optimizer, accelerator, train[0], train_labels, multilabel, cfg, progress.epoch, image
        )
        metrics = compute_metrics(
            val[1], predict(net, val[0], multilabel, cfg.batch_size, image), classes, multilabel
        )
        score = selection_score(metrics, cfg.select_metric)
        progress.epoch += 1
        progress.history.append(
            {"epoch": progress.epoch, "train_loss": loss, f"val_{cfg.select_metric}": score}
        )
        if score > progress.best_score:
            progress.best_score, progress.best_epoch, progress.bad_epochs = score, progress.epoch, 0
            weights = {
                k: v.detach().cpu().contiguous()
                for k, v in accelerator.unwrap_model(net).state_dict().items()
            }
            save_file(weights, str(out / (BEST_FILE + ".tmp")))
            (out / (BEST_FILE + ".tmp")).rename(out / BEST_FILE)
        else:
            progress.bad_epochs += 1
        log.info("epoch %d: train loss %.4f, val %s %.4f", progress.epoch, loss, cfg.select_metric, score)
        _save_atomic(checkpoints, accelerator, progress)
    best = accelerator.unwrap_model(net)
    best.load_state_dict(load_file(str(out / BEST_FILE)))
    return best, progress
