"""Reading local state-dict files and loading them into a tower, strictly.

Pretrained tower weights come from files on disk (no hub access during training). A file whose names do
not line up with the tower would load nothing and leave a random tower training while its user believes it
starts from CLIP, so every load is strict: a tower tensor the file lacks, a file tensor the tower has no
place for, or a shape that differs is refused in one line naming the first few and the count. What may
legitimately stay out is known to the caller by name (a classifier head, buffers some library versions
save) or named by the user (``model.vision_weights_ignore``, ``model.text_weights_ignore``).
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from retclip_dist.model.config import ModelConfig, ModelConfigError

log = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# Training checkpoints often wrap the weights one level down under one of these keys.
_WRAPPER_KEYS = ("state_dict", "model", "module")
# DDP/DataParallel ("module.") and Lightning-style wrappers ("model."): stripped only from a file where every
# key carries one, the one case where nothing else could be meant.
_WRAPPER_PREFIXES = ("module.", "model.")
SHOWN = 4  # names a refusal or a log line shows before the count


def first_names(names: Sequence[str], shown: int = SHOWN) -> str:
    """The first ``shown`` names, then how many there are in all."""
    head = ", ".join(names[:shown])
    return head if len(names) <= shown else f"{head}, ... ({len(names)} in all)"


@dataclass(frozen=True)
class LoadReport:
    """What happened when a tower was initialised from a local checkpoint."""

    tower: str  # "vision", "text", or "model" (model.init_from: every weight)
    source: str  # the file or directory the weights came from
    loaded: int  # number of tensors copied into the tower
    missing: list[str]  # tower tensors the file lacks, allowed by name (they keep their initialisation)
    unexpected: list[str]  # file tensors the tower has no place for, allowed by name (not used)

    def __str__(self) -> str:
        parts = [f"{self.tower} tower <- {self.source}: {self.loaded} tensors loaded"]
        if self.missing:
            parts.append(f"{len(self.missing)} left at their initialisation: {first_names(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} in the file not used: {first_names(self.unexpected)}")
        return "; ".join(parts)

    def log(self) -> None:
        log.info("%s", self)

    def record(self) -> dict[str, int]:
        """This tower's counts for metrics.jsonl's ``weights`` record."""
        return {
            f"{self.tower}_tensors": self.loaded,
            f"{self.tower}_left_out": len(self.missing),
            f"{self.tower}_unused": len(self.unexpected),
        }


def weights_record(reports: dict[str, LoadReport]) -> dict[str, int]:
    """metrics.jsonl's ``weights`` record: per tower the tensors loaded from a file (0: random init), the
    tensors left at their initialisation and the file's tensors not used (both allowed by name)."""
    record = {"vision_tensors": 0, "text_tensors": 0}
    for report in reports.values():
        record.update(report.record())
    return record


def random_towers(cfg: ModelConfig, record: dict[str, int]) -> list[tuple[str, str]]:
    """(the config field, the tower) for each tower a fresh run starts from random weights: nothing loaded
    from a file and no ``model.init_from``."""
    if cfg.init_from is not None:
        return []
    fields = {"vision": "model.vision_weights", "text": "model.text_path"}
    return [(fields[tower], tower) for tower in fields if record[f"{tower}_tensors"] == 0]


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
        if found is None:
            raise ValueError(f"weights file {path}: cannot read it ({_first_line(exc)})") from None
        raise ValueError(
            f"weights file {path} holds objects other than tensors, numbers, strings and numpy scalars "
            f"(it holds {found.group(1)}); refusing to unpickle it"
        ) from None
    except RuntimeError as exc:
        if "TorchScript" in str(exc):
            raise ValueError(
                f"weights file {path} is a TorchScript archive (OpenAI's CLIP download is one): load it "
                "with torch.jit.load and save its state_dict() to load that"
            ) from None
        raise ValueError(f"weights file {path}: cannot read it ({_first_line(exc)})") from None
    except EOFError:
        raise ValueError(f"weights file {path}: cannot read it (it ends early)") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_weights_file(path: str | Path) -> object:
    """What a .safetensors/.bin/.pt/.pth file holds, as stored (see ``unwrap_state_dict``).

    Always real CPU tensors, also under a ``torch.device("meta")`` context (the pre-flight model build),
    where safetensors 0.4 would otherwise hand out meta tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix not in (".safetensors", *_TORCH_SUFFIXES):
        raise ValueError(
            f"weights file {path}: unsupported suffix {path.suffix!r}; use .safetensors, .bin, .pt or .pth"
        )
    with torch.device("cpu"):
        if path.suffix != ".safetensors":
            return _torch_load(path)
        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise ValueError(f"weights file {path}: cannot read it ({_first_line(exc)})") from None


def unwrap_state_dict(
    obj: object, source: str, wrappers: tuple[str, ...] = _WRAPPER_KEYS
) -> dict[str, torch.Tensor]:
    """The flat name -> tensor mapping inside a training checkpoint, without a wrapper's key prefix.

    Unwrapped only where nothing else could be meant: one level down under one of ``wrappers``
    (``state_dict``, ``model`` or ``module``; DINOv2's ``teacher`` where its reader asks) while the level
    holds no tensors of its own and exactly one of them (two are refused), and a ``module.``/``model.``
    prefix that every key carries. Anything else is left as it is, for the strict load to refuse by name.
    """
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [key for key in wrappers if isinstance(obj.get(key), dict)]
        if len(nested) > 1:
            raise ValueError(
                f"weights file {source} holds {len(nested)} state dicts ({', '.join(map(repr, nested))}); "
                "save the one to load on its own"
            )
        if not nested:
            break
        obj = obj[nested[0]]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(
            f"weights file {source} does not hold a flat mapping of names to tensors (top-level keys {keys})"
        )
    state: dict[str, torch.Tensor] = obj
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def read_state_dict(path: str | Path, wrappers: tuple[str, ...] = _WRAPPER_KEYS) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors/.bin/.pt/.pth file, unwrapped from a training checkpoint and a wrapper's
    prefix (see ``unwrap_state_dict``)."""
    return unwrap_state_dict(load_weights_file(path), str(path), wrappers)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _common_prefix_hint(names: Sequence[str], own: dict[str, torch.Tensor]) -> str:
    """Says so when every name of the file starts with one word the tower has no module of (``encoder.``):
    most likely a wrapper's prefix, which the user has to remove (it is not one of the unambiguous ones)."""
    heads = {name.split(".", 1)[0] for name in names}
    if len(names) < 2 or len(heads) != 1 or "." not in names[0]:
        return ""
    (head,) = heads
    if any(k.split(".", 1)[0] == head for k in own):
        return ""
    return f"; every key of the file starts with {head + '.'!r}, a prefix the loader does not strip"


def strict_fit(
    own: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    *,
    tower: str,
    source: str,
    field: str,
    may_lack: Sequence[str] = (),
    may_leave: Sequence[str] = (),
    remedy: str,
) -> LoadReport:
    """Check that ``state`` fills ``own`` (a state dict, real or on the meta device) exactly.

    Refused with ``ModelConfigError(field, one line)``: any shape that differs; a tower tensor the file
    lacks unless it matches a pattern of ``may_lack``; a file tensor the tower has no place for unless it
    matches ``may_leave`` (fnmatch patterns, ``*`` crosses dots). ``remedy`` ends the refusal.
    """
    mismatched = sorted(k for k, v in state.items() if k in own and v.shape != own[k].shape)
    if mismatched:
        shown = [f"{k}: file {tuple(state[k].shape)} vs tower {tuple(own[k].shape)}" for k in mismatched]
        raise ModelConfigError(
            field,
            f"{source}: {len(mismatched)} tensor(s) do not fit the {tower} tower's shapes: "
            f"{first_names(shown)}",
        )
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    refused_missing = [k for k in missing if not _matches(k, may_lack)]
    refused_unexpected = [k for k in unexpected if not _matches(k, may_leave)]
    if refused_missing or refused_unexpected:
        found = []
        if refused_missing:
            found.append(
                f"{len(refused_missing)} of the tower's tensors are not in the file "
                f"({first_names(refused_missing)})"
            )
        if refused_unexpected:
            found.append(
                f"{len(refused_unexpected)} tensors of the file have no place in the tower "
                f"({first_names(refused_unexpected)})"
            )
        hint = _common_prefix_hint(sorted(state), own) if refused_unexpected else ""
        raise ModelConfigError(
            field, f"{source}: does not fit the {tower} tower: {'; '.join(found)}{hint}; {remedy}"
        )
    return LoadReport(tower, source, len(state) - len(unexpected), missing, unexpected)


def load_strict(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    tower: str,
    source: str,
    field: str,
    may_lack: Sequence[str] = (),
    may_leave: Sequence[str] = (),
    remedy: str,
) -> LoadReport:
    """``strict_fit`` against ``module``, then copy the fitting tensors in; logs and returns the report."""
    own = module.state_dict()
    report = strict_fit(
        own,
        state,
        tower=tower,
        source=source,
        field=field,
        may_lack=may_lack,
        may_leave=may_leave,
        remedy=remedy,
    )
    # Every key is accounted for by strict_fit: what load_state_dict would call missing or unexpected here
    # is exactly the report's allowed gaps.
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    report.log()
    return report


class InitFromError(ModelConfigError):
    """A model.init_from directory whose weights do not fit the configured model (one line, names the tensors)."""

    def __init__(self, message: str) -> None:
        super().__init__("model.init_from", message)


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
            f"{source}: {len(mismatched)} tensor(s) do not fit the configured model: {first_names(mismatched)}"
        )
    missing = sorted(own.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - own.keys())
    if strict and (missing or unexpected):
        found = []
        if missing:
            found.append(f"{len(missing)} missing: {first_names(missing)}")
        if unexpected:
            found.append(f"{len(unexpected)} unexpected: {first_names(unexpected)}")
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
