"""Reading local state-dict files and loading them into a tower with an explicit report.

Pretrained tower weights come from files on disk (no hub access during training), so the two things a
user must see are which keys did not line up (reported) and which tensors have the wrong shape (an error:
silently skipping them would train from a half-random tower).
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

log = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# Training checkpoints often wrap the weights one level down under one of these keys.
_WRAPPER_KEYS = ("state_dict", "model", "module")


@dataclass(frozen=True)
class LoadReport:
    """What happened when a tower was initialised from a local checkpoint."""

    tower: str  # "vision", "text", or "model" (model.init_from: every weight)
    source: str  # the file or directory the weights came from
    loaded: int  # number of tensors copied into the tower
    missing: list[str]  # tower keys the checkpoint did not provide (left at random init)
    unexpected: list[str]  # checkpoint keys the tower has no place for (ignored)

    def __str__(self) -> str:
        parts = [f"{self.tower} tower <- {self.source}: {self.loaded} tensors loaded"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing (random init): {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (ignored): {', '.join(self.unexpected)}")
        return "; ".join(parts)

    def log(self) -> None:
        (log.warning if self.missing else log.info)("%s", self)


def _numpy_scalar_globals() -> list:
    """Exactly what pickling a numpy scalar (np.float64(3e-5), np.int64(7)) refers to: numpy's scalar
    constructor, np.dtype and the dtype classes of the numeric and bool scalar types."""
    # numpy 2 has numpy._core.multiarray; numpy 1.26 has a numpy._core stub without it.
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    kinds = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
    kinds += ("float16", "float32", "float64")
    allowed: list = [multiarray.scalar, np.dtype, *{type(np.dtype(kind)) for kind in kinds}]
    # numpy 1.x (which wrote the release's checkpoints) names the constructor numpy.core.multiarray.scalar,
    # numpy 2 numpy._core.multiarray.scalar; torch (>= 2.6) allows one object under both names.
    allowed += [(multiarray.scalar, f"{m}.multiarray.scalar") for m in ("numpy.core", "numpy._core")]
    # MAE-style checkpoints (RETFound's) keep the training arguments beside the weights: an
    # argparse.Namespace of plain values, which the restricted unpickler then still checks one by one.
    allowed.append(argparse.Namespace)
    return allowed


def _torch_load(path: Path) -> object:
    """torch.load without unpickling arbitrary objects; numpy scalars are allowed and nothing else.

    The release's training checkpoints ({"epoch", "step", "name", "state_dict", "optimizer"}) keep the
    scheduler's learning rate as a numpy float in the optimizer's param_groups.
    """
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"(?:Unsupported global|unsupported)[^\n]*?GLOBAL ([\w.]+)", str(exc))
        what = f" (it holds {found.group(1)})" if found else ""
        raise ValueError(
            f"weights file {path} holds objects other than tensors, numbers, strings and numpy scalars{what}; "
            "refusing to unpickle it"
        ) from None


def read_state_dict(path: str | Path, wrappers: tuple[str, ...] = _WRAPPER_KEYS) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors/.bin/.pt/.pth file, unwrapped from a training checkpoint (the first of
    ``wrappers`` that holds a mapping) and 'module.'."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        obj: object = load_file(str(path))
    elif path.suffix in _TORCH_SUFFIXES:
        obj = _torch_load(path)
    else:
        raise ValueError(
            f"weights file {path}: unsupported suffix {path.suffix!r}; use .safetensors, .bin, .pt or .pth"
        )
    for key in wrappers:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(
            f"weights file {path} does not hold a flat mapping of names to tensors (top-level keys {keys})"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def raise_on_shape_mismatch(tower: str, source: str, mismatched: list[tuple[str, tuple, tuple]]) -> None:
    """Fail loudly, naming every (key, checkpoint shape, tower shape) that cannot be copied."""
    if mismatched:
        lines = "\n".join(
            f"  {k}: checkpoint {tuple(a)} vs {tower} tower {tuple(b)}" for k, a, b in mismatched
        )
        raise ValueError(f"{source}: {len(mismatched)} tensor(s) do not fit the {tower} tower:\n{lines}")


def load_into(module: nn.Module, state_dict: dict[str, torch.Tensor], tower: str, source: str) -> LoadReport:
    """Copy matching tensors into ``module``; shape mismatches raise, key mismatches are reported."""
    own = module.state_dict()
    mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape))
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    raise_on_shape_mismatch(tower, source, mismatched)
    result = module.load_state_dict(state_dict, strict=False)
    report = LoadReport(
        tower=tower,
        source=source,
        loaded=len(state_dict) - len(result.unexpected_keys),
        missing=sorted(result.missing_keys),
        unexpected=sorted(result.unexpected_keys),
    )
    report.log()
    return report


class InitFromError(ValueError):
    """A model.init_from directory whose weights do not fit the configured model (one line, names the tensors)."""


def load_whole_model(
    module: nn.Module, state_dict: dict[str, torch.Tensor], source: str, strict: bool
) -> LoadReport:
    """Copy a full saved model into ``module``: every tower, head and scale.

    A shape mismatch is always refused (a half-copied tensor set is a different model). Missing or
    unexpected keys are refused when ``strict``; otherwise they are listed in the report and the missing
    ones keep their fresh initialisation.
    """
    own = module.state_dict()
    mismatched = [
        f"{k} saved {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sorted(state_dict.items())
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise InitFromError(
            f"{source}: {len(mismatched)} tensor(s) do not fit the configured model: {'; '.join(mismatched)}"
        )
    missing = sorted(own.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - own.keys())
    if strict and (missing or unexpected):
        found = []
        if missing:
            found.append(f"{len(missing)} missing: {', '.join(missing)}")
        if unexpected:
            found.append(f"{len(unexpected)} unexpected: {', '.join(unexpected)}")
        raise InitFromError(
            f"{source}: does not hold exactly the configured model's weights ({'; '.join(found)}); "
            "set model.init_from_strict false to load the rest"
        )
    module.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    report = LoadReport(
        tower="model",
        source=source,
        loaded=len(state_dict) - len(unexpected),
        missing=missing,
        unexpected=unexpected,
    )
    report.log()
    return report
