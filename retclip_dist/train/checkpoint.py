"""One component owns everything stateful in a run: save it atomically, find it, load it back.

A checkpoint is a directory ``checkpoints/step_XXXXXXXX`` holding Accelerate's state (model, optimiser,
grad scaler, every rank's RNG streams; DeepSpeed's shards under ZeRO), ``train_state.json`` (step, epoch,
the run config) and ``data_rankN.json`` (each rank's loader position). A run may resume on another
world size (not under DeepSpeed): the loader then re-plans the rest of the epoch. All ranks write into a ``.tmp``
directory first; the main process renames it only after every rank has finished, so a directory without
the suffix is complete by construction and a run killed mid-save leaves nothing that looks usable.

With ``keep_best`` (a metric such as "probe/auroc") the checkpointer also remembers the best value offered
so far and the step it came from; that checkpoint is kept beside the last ``keep_last``. The record is
``best`` in every later ``train_state.json``, so a resumed run knows it too.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from retclip_dist.config import ConfigError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8})$")
STATE_NAME = "train_state.json"
CHECKPOINTS_DIR = "checkpoints"  # under output_dir


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (none when it does not exist)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_NAME).exists()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resume_path(root: Path, resume: str | None) -> Path | None:
    """The checkpoint ``resume`` ("auto" or a path) names, checked to be complete; None: start fresh."""
    if resume is None:
        return None
    if resume == "auto":
        done = complete_checkpoints(root)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        what = "does not exist" if not path.exists() else f"is not a complete checkpoint (no {STATE_NAME})"
        raise ConfigError(f"checkpoint.resume={resume!r}: {path} {what}")
    return path


def read_train_state(path: Path) -> dict[str, Any]:
    """A checkpoint's step, epoch, world size and run config."""
    try:
        return json.loads((path / STATE_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"checkpoint.resume: cannot read {path / STATE_NAME}: {exc}") from exc


def data_state_files(path: Path, world_size: int) -> list[Path]:
    """The loader positions a checkpoint saved by ``world_size`` ranks holds, one per rank."""
    return [path / f"data_rank{r}.json" for r in range(world_size)]


@dataclass
class Restored:
    step: int  # optimiser steps already taken
    epoch: int  # epoch the next step belongs to
    data_state: dict[str, Any] | None  # {"ranks": every saved rank's loader position}
    path: Path  # where it came from


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint directory named by ``checkpoint_name``."""
    return int(_NAME.match(path.name).group(1))


class Checkpointer:
    def __init__(
        self,
        accelerator: Accelerator,
        root: str | Path,
        keep_last: int,
        keep_best: str | None = None,
        wait: Callable[[], None] | None = None,
    ) -> None:
        self.accelerator = accelerator
        # The barrier where ranks wait for the main process's writes and deletions (default
        # accelerator.wait_for_everyone; the trainer's LongWait, which a slow disk cannot time out).
        self.wait = wait or accelerator.wait_for_everyone
        self.root = Path(root)
        self.keep_last = max(1, keep_last)
        self.keep_best = keep_best
        # {"metric", "value", "step", "checkpoint"} of the best value offered so far (None: none yet)
        self.best: dict[str, Any] | None = None
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step_*.tmp"):
                log.warning("removing incomplete checkpoint %s (a run died while saving it)", stale)
                shutil.rmtree(stale)
        self.wait()

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return complete_checkpoints(self.root)

    def save(self, step: int, epoch: int, config: dict[str, Any], data_state: dict[str, Any]) -> Path:
        acc = self.accelerator
        final = self.root / checkpoint_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.wait()
        acc.save_state(str(tmp))
        data_file = data_state_files(tmp, acc.num_processes)[acc.process_index]
        data_file.write_text(json.dumps(data_state, sort_keys=True))
        self.wait()
        if acc.is_main_process:
            state = {"step": step, "epoch": epoch, "world_size": acc.num_processes, "config": config}
            if self.best is not None:
                state["best"] = self.best
            (tmp / STATE_NAME).write_text(json.dumps(state, indent=1, sort_keys=True))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            kept = self.best["checkpoint"] if self.best is not None else None
            for old in self.complete()[: -self.keep_last]:
                if old.name != kept:
                    shutil.rmtree(old)
        self.wait()
        return final

    def offer(self, metric: str, value: float, step: int) -> bool:
        """Whether ``value`` of ``metric`` at ``step`` is a new best (higher is better; a tie keeps the
        earlier one). If so it is remembered, and the caller must save the checkpoint of ``step``, which
        then survives ``keep_last``. Every rank must offer the same values to agree on the save."""
        if metric != self.keep_best or not math.isfinite(value):
            return False
        if self.best is not None and value <= self.best["value"]:
            return False
        self.best = {"metric": metric, "value": value, "step": step, "checkpoint": checkpoint_name(step)}
        return True

    def load(self, resume: str | None) -> Restored | None:
        """Restore from ``resume`` ("auto" or a path); None when there is nothing to resume from."""
        path = resume_path(self.root, resume)
        if path is None:
            if resume is not None:
                log.info("resume=auto: no complete checkpoint under %s, starting fresh", self.root)
            return None
        state = read_train_state(path)
        saved_world, world = state["world_size"], self.accelerator.num_processes
        if saved_world != world and self.accelerator.state.deepspeed_plugin is not None:
            raise ConfigError(
                f"checkpoint.resume: {path} was saved by {saved_world} processes, this run has {world}: "
                "DeepSpeed's optimiser state is sharded per rank; resume ZeRO runs on the same world size"
            )
        # Model and optimiser state are whole (DDP); a rank without its saved RNG state keeps the seeded one.
        self.accelerator.load_state(str(path))
        # Every rank gets every saved rank's loader position: on another layout the loader re-plans the
        # rest of the epoch from all of them.
        files = data_state_files(path, saved_world)
        missing = [f.name for f in files if not f.exists()]
        if missing and len(missing) < len(files):
            raise ConfigError(
                f"checkpoint.resume: {path} lacks {', '.join(missing)} (saved by {saved_world} ranks)"
            )
        data_state = None if missing else {"ranks": [json.loads(f.read_text()) for f in files]}
        # The best so far as of this checkpoint (a best of another metric is not this run's concern).
        best = state.get("best")
        self.best = best if best is not None and best["metric"] == self.keep_best else None
        if self.best is not None and not (self.root / best["checkpoint"]).is_dir():
            log.warning(
                "the best %s checkpoint %s is gone; keeping its value", best["metric"], best["checkpoint"]
            )
        log.info("resumed from %s at step %d", path, state["step"])
        return Restored(step=state["step"], epoch=state["epoch"], data_state=data_state, path=path)
