"""Validation during training: image<->text retrieval recall on the held-out split.

Every rank embeds its own shards of the split; features and report texts are gathered to all ranks and
sorted by patient key, so the numbers are those of the whole split whatever the world size. Ranks' shares
differ; where a forward is a collective (ZeRO-3), a rank whose share is done runs blank batches until the
last rank's is done too.

Clinical reports repeat ("no abnormality in either eye" is the most common report of all), so a query
whose report text is shared by m patients has m right answers; counting only its own index would make a
perfect model look poor. Chance is reported beside each recall so numbers mean something on any split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from retclip_dist.data.validation import ValLoader
from retclip_dist.model.config import LEVELS
from retclip_dist.train.backend import same_forwards, to_device
from retclip_dist.train.metrics_log import MetricsLog
from retclip_dist.train.signals import any_rank, sum_over_ranks

log = logging.getLogger("retclip_dist.train")


def _groups(texts: list[str]) -> torch.Tensor:
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(t, len(ids)) for t in texts])


def recall_at_k(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    texts: list[str],
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k both ways for L2-normalised features whose row i belongs to patient i.

    Image->text: a hit when any of the top k texts has the same report string as the image's own.
    Text->image: a hit when any of the top k images belongs to a patient with that same report string.
    """
    n = len(texts)
    if image_features.shape[0] != n or text_features.shape[0] != n:
        raise ValueError(f"{image_features.shape[0]} images, {text_features.shape[0]} texts, {n} reports")
    group = _groups(texts)
    same = group[:, None] == group[None, :]
    sim = image_features.float() @ text_features.float().T
    out: dict[str, float] = {}
    for direction, scores in (("i2t", sim), ("t2i", sim.T)):
        order = scores.argsort(dim=1, descending=True)
        hits = torch.gather(same, 1, order)
        for k in ks:
            out[f"{direction}_r{k}"] = hits[:, : min(k, n)].any(dim=1).float().mean().item()
    correct = same.sum(dim=1).tolist()
    for k in ks:
        out[f"chance_r{k}"] = sum(_chance(n, m, k) for m in correct) / n
    return out


def _chance(n: int, m: int, k: int) -> float:
    """P(at least one of m right answers among k drawn without replacement from n)."""
    k = min(k, n)
    if n - m < k:
        return 1.0
    return 1.0 - math.comb(n - m, k) / math.comb(n, k)


def total_skipped(acc: Accelerator, mine: int) -> int:
    """Skipped samples of all ranks together (a collective: every rank must call it)."""
    return int(sum_over_ranks(acc, torch.tensor([mine], dtype=torch.int64, device=acc.device)).item())


@torch.no_grad()
def retrieval_scores(
    model: torch.nn.Module,
    loader: ValLoader,
    acc: Accelerator,
    prepare: Callable[[dict[str, Any]], dict[str, Any]],
    max_samples: int | None,
    stopping: Callable[[], bool] | None = None,
) -> dict[str, float] | None:
    """Recall@1/5/10 both ways at patient, left and right level over the held-out split (a collective).

    ``stopping`` is asked before each batch (the trainer's progress beat and stop signal): once it says
    yes on any rank, every rank stops and the result is None, not scores of part of the split.
    """
    inner = acc.unwrap_model(model)
    was_training = inner.training
    inner.eval()
    rows: list[dict[str, Any]] = []
    per_rank = None if max_samples is None else -(-max_samples // acc.num_processes)
    lockstep = same_forwards(acc)
    stopped = False
    batches = iter(loader)
    while True:
        if stopping is not None and stopping():
            stopped = True
        batch = None if stopped else next(batches, None) if per_rank is None or len(rows) < per_rank else None
        if lockstep:
            # Under ZeRO-3 one small collective per batch: every rank runs a forward while any has a batch,
            # and all stop together (a rank leaving alone would hang the others in their forward).
            more, stop_any = any_rank(acc, batch is not None, stopped)
            stopped = stopped or stop_any
            more = more and not stopped
        else:
            more = batch is not None
        if not more:
            break
        if batch is None:  # this rank's share is done, another's is not
            with acc.autocast():
                inner(prepare(to_device(loader.blank_batch(), acc.device)))
            continue
        batch = prepare(to_device(batch, acc.device))
        with acc.autocast():
            out = inner(batch)
        for i, key in enumerate(batch["keys"]):
            rows.append(
                {
                    "key": key,
                    "reports": [batch["reports"][i], batch["left_reports"][i], batch["right_reports"][i]],
                    "image": [f[i].float().cpu() for f in out.image],
                    "text": [f[i].float().cpu() for f in out.text],
                }
            )
    inner.train(was_training)
    if any_rank(acc, stopped)[0]:  # every rank gets here, however many batches it had
        return None
    gathered = gather_object(rows) if acc.num_processes > 1 else rows
    # A fixed order (by patient key) makes the numbers independent of the world size.
    gathered = sorted(gathered, key=lambda r: r["key"])
    if max_samples is not None:
        gathered = gathered[:max_samples]
    if not gathered:
        return {}
    scores: dict[str, float] = {"samples": float(len(gathered))}
    for i, level in enumerate(LEVELS):
        found = recall_at_k(
            torch.stack([r["image"][i] for r in gathered]),
            torch.stack([r["text"][i] for r in gathered]),
            [r["reports"][i] for r in gathered],
        )
        scores.update({f"{level}/{k}": v for k, v in found.items()})
    return scores


def validate(
    model: torch.nn.Module,
    loader: ValLoader | None,
    acc: Accelerator,
    prepare: Callable[[dict[str, Any]], dict[str, Any]],
    max_samples: int | None,
    metrics: MetricsLog | None,
    step: int,
    epoch: int,
    stopping: Callable[[], bool] | None = None,
) -> bool:
    """Score the held-out split and write one ``val`` record; every rank must call it (collectives).

    False when ``stopping`` (see ``retrieval_scores``) ended it early: nothing is recorded.
    """
    if loader is None:
        return True
    scores = retrieval_scores(model, loader, acc, prepare, max_samples, stopping)
    if scores is None:
        log.warning("validation at step %d (epoch %d) stopped by a signal; not recorded", step, epoch)
        return False
    skipped = total_skipped(acc, loader.skipped)  # every rank joins; each read its own shards
    if metrics is not None and scores:
        metrics.write("val", step, {"epoch": epoch, "skipped_samples": skipped, **scores})
        log.info("validation at step %d (epoch %d): %s", step, epoch, _summary(scores))
    return True


def _summary(scores: dict[str, float]) -> str:
    keys = ("patient/i2t_r1", "patient/t2i_r1", "patient/i2t_r5", "patient/chance_r5")
    return ", ".join(f"{k} {scores[k]:.3f}" for k in keys if k in scores)
