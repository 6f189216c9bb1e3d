"""Image<->text retrieval recall, with identical reports counted as equally correct answers.

Clinical reports repeat ("no abnormality in either eye" is the most common report of all), so a query
whose report text is shared by m patients has m right answers; counting only its own index would make a
perfect model look poor. Chance is reported beside each recall so numbers mean something on any split.
"""

from __future__ import annotations

import math

import torch


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
