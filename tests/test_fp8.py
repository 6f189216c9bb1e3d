"""train.fp8: refused without torchao or a capability >= 8.9 GPU; which linears convert; the conversion."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model_config
from torch import nn

from retclip_dist.config import ConfigError, load_config
from retclip_dist.exit_codes import EXIT_CONFIG
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.vocab import write_vocab
from retclip_dist.train import fp8
from retclip_dist.train.config import RunConfig
from retclip_dist.train.preflight import _fp8, check_run_config

TINY = "configs/tiny.yaml"


def _tiny_fp8() -> RunConfig:
    return load_config(RunConfig, TINY, ["--train.fp8", "true"])


def _fake_device(monkeypatch, torchao: bool, cuda: bool, capability: tuple[int, int] = (9, 0)) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        fp8.importlib.util,
        "find_spec",
        lambda name, *a: (object() if torchao else None) if name == "torchao" else real(name, *a),
    )
    monkeypatch.setattr(fp8.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(fp8.torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(fp8.torch.cuda, "get_device_name", lambda *a: "Fake GPU")


@pytest.mark.parametrize(
    ("torchao", "cuda", "capability", "message"),
    [
        (False, True, (9, 0), "train.fp8=True: needs torchao, which is not installed"),
        (True, False, (9, 0), "train.fp8=True: needs a CUDA GPU of compute capability 8.9 or newer"),
        (
            True,
            True,
            (8, 0),
            "train.fp8=True: needs compute capability 8.9 or newer (Ada, Hopper); Fake GPU has 8.0",
        ),
    ],
)
def test_refused_with_one_line(monkeypatch, torchao, cuda, capability, message):
    _fake_device(monkeypatch, torchao, cuda, capability)
    with pytest.raises(ConfigError) as exc:
        check_run_config(_tiny_fp8(), 1)
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value), str(exc.value)


@pytest.mark.parametrize("capability", [(8, 9), (9, 0), (10, 0)])
def test_accepted_on_ada_hopper_and_newer(monkeypatch, capability):
    _fake_device(monkeypatch, True, True, capability)
    assert fp8.fp8_unavailable_reason() is None
    monkeypatch.setattr(fp8.torch.cuda, "get_device_capability", lambda *a: (8, 6))
    assert "8.6" in fp8.fp8_unavailable_reason()


def test_off_is_never_refused(monkeypatch):
    _fake_device(monkeypatch, False, False)
    cfg = load_config(RunConfig, TINY)
    assert cfg.train.fp8 is False
    _fp8(cfg)  # the config checks' fp8 rule: no error with train.fp8 off, whatever the machine


def test_check_exits_2_on_this_machine_when_unavailable():
    if fp8.fp8_unavailable_reason() is None:
        pytest.skip("this machine can train in float8")
    done = subprocess.run(
        [sys.executable, "-m", "retclip_dist.train", "--check", "--config", TINY, "--train.fp8", "true"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert "train.fp8=True: needs" in done.stderr and fp8.fp8_unavailable_reason() in done.stderr


def _model(tmp_path, vision_width: int = 32) -> RetClip:
    cfg = tiny_model_config(write_vocab(tmp_path / "v.txt", ["a", "b"]))
    cfg.vision_kwargs["embed_dim"] = vision_width
    torch.manual_seed(0)
    return RetClip(cfg)


def test_filter_picks_the_tower_block_linears(tmp_path):
    names = fp8.fp8_linear_names(_model(tmp_path))
    per_vision_block = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    per_text_layer = [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ]
    assert names == [f"visual.blocks.{i}.{n}" for i in range(2) for n in per_vision_block] + [
        f"text.encoder.layer.{i}.{n}" for i in range(2) for n in per_text_layer
    ]


def test_filter_leaves_heads_and_odd_widths(tmp_path):
    # A vision width of 24 (not a multiple of 16): no vision linear converts, the text tower's still do.
    names = fp8.fp8_linear_names(_model(tmp_path, vision_width=24))
    assert names and all(n.startswith("text.encoder.layer.") for n in names)
    model = _model(tmp_path)
    for name in ("image_proj", "image_patient", "text_patient.0", "text_left.2"):
        assert not fp8.fp8_filter(model.get_submodule(name), name), name
    assert fp8.fp8_filter(nn.Linear(32, 64), "visual.blocks.0.mlp.fc1")
    assert not fp8.fp8_filter(nn.Linear(32, 40), "visual.blocks.0.mlp.fc1")


def test_conversion_swaps_exactly_the_filtered_linears(tmp_path):
    pytest.importorskip("torchao.float8.float8_linear")
    from torchao.float8.float8_linear import Float8Linear

    model = _model(tmp_path)
    keys = list(model.state_dict())
    converted = fp8.convert_fp8_(model)
    assert converted == [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    assert len(converted) == 20
    assert list(model.state_dict()) == keys  # checkpoints and optimiser groups see the same names
    assert type(model.image_proj) is nn.Linear and type(model.text_patient[0]) is nn.Linear
