"""Typed configuration: nested dataclasses, YAML presets and ``--section.key value`` overrides.

Every config object in the project is a dataclass whose fields all have defaults. This module is the one
place that turns YAML and command-line strings into those objects, checking names and types, so a typo
in a preset or an override is an error that names the key instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not match the dataclasses."""


class _Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false are booleans, so ``precision: no`` stays the word "no".

    PyYAML follows YAML 1.1, where yes/no/on/off are booleans too; a choice field such as
    ``train.precision`` (``"no" | "fp16" | "bf16"``) would then receive ``False``. Boolean fields still
    accept yes/no/on/off (see ``_BOOL_WORDS``), so nothing written for YAML 1.1 breaks.
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_BOOL_WORDS = {"yes": True, "on": True, "no": False, "off": False}


def parse_yaml(text: str) -> Any:
    """Parse YAML text the way every config and override in the project is parsed."""
    return yaml.load(text, Loader=_Loader)


@dataclasses.dataclass(frozen=True)
class _Word:
    """A command-line value: the text as typed and its YAML reading.

    A string or choice field takes the text as written (``--data.train_split 2024`` is the split "2024",
    not the integer), every other field takes the YAML value.
    """

    text: str
    value: Any


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if isinstance(value, _Word):
        if tp is Any or origin is dict or tp is dict:
            # A free-form mapping's keys have no declared type: they take the YAML value.
            return _coerce(value.value, tp, where)
        if tp is str:
            return value.text
        if origin is Literal and value.value not in get_args(tp) and value.text in get_args(tp):
            return value.text
        if origin not in (Union, types.UnionType):
            return _coerce(value.value, tp, where)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        plain = value.value if isinstance(value, _Word) else value
        if plain is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        choices = [o for o in options if o is not type(None)]
        if all(get_origin(o) is Literal for o in choices):  # an optional choice: name the choices
            words = [w for o in choices for w in get_args(o)] + ([None] if type(None) in options else [])
            raise ConfigError(f"{where}: {plain!r} is not one of {words}")
        raise ConfigError(f"{where}: {plain!r} fits none of {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {k: v.value if isinstance(v, _Word) else v for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-4" (no dot) as a string, and learning rates are written that way.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {tp}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and ill-typed values."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config, for saving next to checkpoints and printing."""
    return dataclasses.asdict(cfg)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--train.lr", "1e-4", "--data.batch_size=8"]`` -> ``{"train": {"lr": 1e-4}, "data": {...}}``.

    Values are parsed as YAML scalars/lists so ``true``, ``3``, ``1e-4``, ``null`` and ``[1, 2]`` work;
    string and choice fields take the text as written (``--train.precision no`` is "no").
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override {arg!r} must look like --section.key value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        try:
            parsed = parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {arg}: cannot parse {raw!r}: {exc}") from exc
        # Mappings merge into the preset key by key, so they stay plain; a scalar keeps its text.
        value = parsed if isinstance(parsed, (dict, list)) else _Word(raw, parsed)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def _renamed(data: dict[str, Any], renames: dict[str, str], source: str) -> dict[str, Any]:
    """``data`` with each old top-level key of ``renames`` moved to its new name, one warning line each.

    Old spellings keep working for a while (a preset written before the rename, a launcher passing the
    old flag); writing both the old and the new name is an error, since one would silently win.
    """
    out = dict(data)
    for old, new in renames.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"{source}: both {old!r} and its new name {new!r} given; keep only {new!r}")
        out[new] = out.pop(old)
        print(f"warning: {source}: {old!r} is now {new!r}; the old name will be removed", file=sys.stderr)
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of ``cls``, updated by the YAML file at ``path``, updated by command-line overrides.

    A class may list renamed top-level keys as ``RENAMED = {"old": "new"}`` (a ClassVar): the old
    spelling is then read as the new one, with a warning.
    """
    renames: dict[str, str] = getattr(cls, "RENAMED", {})
    data: dict[str, Any] = to_dict(cls())
    if path is not None:
        try:
            loaded = parse_yaml(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
        data = _merge(data, _renamed(loaded, renames, f"config {path}"))
    data = _merge(data, _renamed(parse_overrides(overrides or []), renames, "command line"))
    return from_dict(cls, data)
