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


@dataclass
class Words:
    flag: bool = False  # a switch
    count: int = 0  # a number
    path: str | None = "x"  # optional text
    split: str = "train"  # plain text
    precision: Literal["no", "fp16", "bf16"] = "bf16"  # a choice that includes a YAML 1.1 boolean word
    many: list[str] = field(default_factory=list)  # a list of words
    extra: dict = field(default_factory=lambda: {"p": 0.0, "name": "bert"})  # a free-form mapping


def test_overrides_parse_yaml_scalars():
    args = ["--flag", "true", "--path", "null", "--count", "7", "--many", "[no, 'off']"]
    cfg = load_config(Words, None, args)
    assert (cfg.flag, cfg.path, cfg.count, cfg.many) == (True, None, 7, ["no", "off"])
    assert set(parse_overrides(args)) == {"flag", "path", "count", "many"}


def test_text_fields_take_the_word_as_written(tmp_path):
    cfg = load_config(Words, None, ["--precision", "no", "--split", "2024", "--path", "1e-4"])
    assert (cfg.precision, cfg.split, cfg.path) == ("no", "2024", "1e-4")
    # YAML files read only true/false as booleans; boolean fields still take yes/no/on/off.
    preset = tmp_path / "p.yaml"
    preset.write_text("precision: no\nflag: yes\nsplit: off\n")
    cfg = load_config(Words, preset, ["--flag", "off"])
    assert (cfg.precision, cfg.flag, cfg.split) == ("no", False, "off")
    assert load_config(Words, preset).flag is True
    with pytest.raises(ConfigError, match="count: expected an integer"):
        load_config(Words, None, ["--count", "no"])


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


def test_a_key_inside_a_free_form_mapping_takes_the_yaml_value():
    cfg = load_config(Words, None, ["--extra.p", "0.1", "--extra.depth", "2", "--extra.name", "no"])
    assert cfg.extra == {"p": 0.1, "name": "no", "depth": 2}  # YAML 1.2: "no" is a word
    assert type(cfg.extra["p"]) is float and type(cfg.extra["depth"]) is int


def test_renamed_section_reads_the_old_spelling_with_a_warning(tmp_path, capsys):
    from retclip_dist.train.config import RunConfig

    preset = tmp_path / "old.yaml"
    preset.write_text("eval:\n  every_epochs: 3\n")
    cfg = load_config(RunConfig, preset, ["--eval.max_samples", "7"])
    assert (cfg.val.every_epochs, cfg.val.max_samples) == (3, 7)
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"warning: config {preset}: 'eval' is now 'val'; the old name will be removed",
        "warning: command line: 'eval' is now 'val'; the old name will be removed",
    ]
    with pytest.raises(ConfigError, match="both 'eval' and its new name 'val'"):
        load_config(RunConfig, None, ["--eval.every_epochs", "1", "--val.every_epochs", "2"])
