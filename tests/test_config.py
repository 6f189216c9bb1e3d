from dataclasses import dataclass, field
from typing import Literal

import pytest

from retclip_dist.config import ConfigError, load_config, parse_overrides


@dataclass
class Inner:
    lr: float = 3e-5  # learning rate
    steps: int = 10  # optimiser steps
    mode: Literal["a", "b"] = "a"  # a closed choice
    path: str | None = None  # optional path


@dataclass
class Outer:
    name: str = "run"  # run name
    inner: Inner = field(default_factory=Inner)  # nested section
    flags: list[int] = field(default_factory=lambda: [1, 2])  # a list


def test_defaults_yaml_then_overrides(tmp_path):
    preset = tmp_path / "c.yaml"
    preset.write_text("name: paper\ninner:\n  steps: 20\n  mode: b\n")
    cfg = load_config(Outer, preset, ["--inner.lr", "1e-4", "--inner.path=/x", "--flags", "[3, 4, 5]"])
    assert cfg.name == "paper"
    assert cfg.inner.steps == 20
    assert cfg.inner.mode == "b"
    assert cfg.inner.lr == pytest.approx(1e-4)
    assert cfg.inner.path == "/x"
    assert cfg.flags == [3, 4, 5]


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["--a.b", "true", "--a.c", "null", "--d", "7"]) == {
        "a": {"b": True, "c": None},
        "d": 7,
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--inner.lrr", "1"], "unknown key(s) ['lrr']"),
        (["--inner.steps", "ten"], "inner.steps: expected an integer"),
        (["--inner.mode", "c"], "inner.mode: 'c' is not one of ['a', 'b']"),
        (["inner.steps", "3"], "must look like --section.key value"),
        (["--inner.steps"], "has no value"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as exc:
        load_config(Outer, None, overrides)
    assert message in str(exc.value)
