"""Where metrics go: one JSON object per line (for scripts and tests) and TensorBoard (for people)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends to ``metrics.jsonl``; only the main process should own one."""

    def __init__(self, out_dir: str | Path, tensorboard: bool) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        record = {"kind": kind, "step": step, **values}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def train_step(
        self,
        step: int,
        epoch: int,
        lr: float,
        losses: dict[str, float],
        scales: dict[str, float],
        patients_per_s: float,
        skipped: int,
    ) -> None:
        """One ``train`` record: ``losses`` holds the global-batch loss under "total" and one per level
        (already averaged over ranks), ``scales`` the logit scale of each level (exp of the learnt log-scale)."""
        per_level = {f"loss_{k}": v for k, v in losses.items() if k != "total"}
        per_scale = {f"scale_{k}": v for k, v in scales.items()}
        record = {"epoch": epoch, "lr": lr, "loss": losses["total"], **per_level, **per_scale}
        self.write("train", step, {**record, "patients_per_s": patients_per_s, "skipped_samples": skipped})

    def epoch_end(self, step: int, epoch: int, used: int, unused: int, skipped: int) -> None:
        """One ``epoch`` record: used + unused = the split's patient count in the manifest."""
        record = {
            "epoch": epoch,
            "patients_used": used,
            "patients_unused": unused,
            "skipped_samples": skipped,
        }
        self.write("epoch", step, record)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, optionally only one kind ("train", "val", ...)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]
