"""Every export is loaded back through its own library and compared with the model before it is published."""

from __future__ import annotations

import torch
from torch import Tensor

# Float32 features of the same weights through another library's modules: rounding stays far below this.
TOLERANCE = 1e-5
# Two texts for the text-side checks; any tokens do (unknown words become [UNK] on both sides alike).
CHECK_TEXTS = ("no abnormality in either eye", "scattered haemorrhages and hard exudates")


class ExportMismatch(RuntimeError):
    """An export that its library loads but that computes other features than the model: a bug here."""


def check_input(size: int, batch: int = 2) -> Tensor:
    """A fixed float input at the model's size: the same numbers on every machine."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def check_close(what: str, theirs: Tensor, ours: Tensor) -> float:
    """Largest |theirs - ours|; ExportMismatch unless within TOLERANCE (absolute and relative)."""
    if theirs.shape != ours.shape:
        raise ExportMismatch(
            f"{what}: the export gives shape {tuple(theirs.shape)}, the model {tuple(ours.shape)}"
        )
    diff = float((theirs - ours).abs().max())
    if not torch.allclose(theirs, ours, rtol=TOLERANCE, atol=TOLERANCE):
        raise ExportMismatch(f"{what}: the export's features differ from the model's by up to {diff:.3g}")
    return diff
