"""Where metrics go: one JSON object per line (the record scripts and tests read) and the experiment trackers
(TensorBoard, wandb, mlflow, ...: for people), which get every finite number as ``{kind}/{key}``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Where the trackers go: Accelerator.log (main process only), or anything with its signature.
Tracker = Callable[..., None]


class MetricsLog:
    """Appends to ``metrics.jsonl`` and hands the same values to ``trackers``; only the main process should
    own one."""

    def __init__(self, out_dir: str | Path, trackers: Tracker | None = None) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._trackers = trackers

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        record = {"kind": kind, "step": step, **values}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self._trackers is not None:
            # Trackers take numbers only; None (peak_mem_gb on CPU) and NaN stay in the JSON record.
            scalars = {
                f"{kind}/{key}": value
                for key, value in values.items()
                if isinstance(value, (int, float)) and math.isfinite(value)
            }
            if scalars:
                self._trackers(scalars, step=step)

    def train_step(
        self,
        step: int,
        epoch: int,
        lr: float,
        losses: dict[str, float],
        scales: dict[str, float],
        patients_per_s: float,
        skipped: int,
        timing: dict[str, Any] | None = None,
    ) -> None:
        """One ``train`` record: ``losses`` holds the global-batch loss under "total" and one per level
        (already averaged over ranks), ``scales`` the logit scale of each level (exp of the learnt log-scale),
        ``timing`` the data wait, step time and peak memory fields (train/telemetry.py ``step_timing``)."""
        per_level = {f"loss_{k}": v for k, v in losses.items() if k != "total"}
        per_scale = {f"scale_{k}": v for k, v in scales.items()}
        record = {"epoch": epoch, "lr": lr, "loss": losses["total"], **per_level, **per_scale}
        record.update(patients_per_s=patients_per_s, skipped_samples=skipped, **(timing or {}))
        self.write("train", step, record)

    def epoch_end(
        self, step: int, epoch: int, used: int, unused: int, skipped: int, read_twice: int, reused: int
    ) -> None:
        """One ``epoch`` record, counted from the rows trained on: used (distinct patients) + unused = the
        split's patient count in the manifest; ``read_twice`` rows repeated a patient (0 unless the data
        order went wrong), ``reused`` rows refilled a stream that damaged samples left short."""
        record = {
            "epoch": epoch,
            "patients_used": used,
            "patients_unused": unused,
            "patients_read_twice": read_twice,
            "patients_reused": reused,
            "skipped_samples": skipped,
        }
        self.write("epoch", step, record)

    def close(self) -> None:
        """Close ``metrics.jsonl``; the trackers end with ``Accelerator.end_training()``."""
        self._file.close()


def tracker_config(config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """The run config (``to_dict``) as ``section.key`` pairs for the trackers' hyperparameter tables, which
    take bool, int, float and str only: lists, mappings and None go as their JSON text."""
    flat: dict[str, Any] = {}
    for name, value in config.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for key, item in items:
            plain = isinstance(item, (bool, int, float, str))
            flat[name if key is None else f"{name}.{key}"] = (
                item if plain else json.dumps(item, sort_keys=True)
            )
    return flat


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, optionally only one kind ("train", "val", ...)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]
