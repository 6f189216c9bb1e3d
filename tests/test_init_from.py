"""model.init_from: a run starts from every weight of a saved model, or refuses one that does not fit."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARGS, build_synth_shards, tiny_argv, tiny_model_config, trainer_cmd, trainer_env

from retclip_dist.config import from_dict
from retclip_dist.data.loader import build_train_data
from retclip_dist.data.samples import REPORT_HASH
from retclip_dist.loss import TripartiteLoss
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.tokenizer import build_tokenizer
from retclip_dist.model.vocab import write_vocab
from retclip_dist.model.weights import InitFromError
from retclip_dist.train.config import RunConfig
from retclip_dist.train.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parent.parent
BASE = [
    *TINY_ARGS,
    "--train.warmup_steps", "2",
    "--data.val_split", "null",  # no validation (and no dependence on its section name)
]  # fmt: skip


def _tiny(tmp_path: Path, **changes) -> RetClip:
    cfg = tiny_model_config(write_vocab(tmp_path / "v.txt", ["a", "b"]))
    return RetClip(replace(cfg, **changes))


def _saved(model: RetClip, directory: Path) -> Path:
    return model.save_pretrained(directory)


def test_every_weight_is_loaded(tmp_path):
    torch.manual_seed(1)
    source = _tiny(tmp_path)
    with torch.no_grad():
        source.logit_scale["left"].fill_(1.25)  # a scale no initialisation gives
    saved = _saved(source, tmp_path / "src")
    torch.manual_seed(2)
    model = _tiny(tmp_path, init_from=str(saved))
    want = source.state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    report = model.load_reports["model"]
    assert report.loaded == len(want) and not report.missing and not report.unexpected


def test_shape_mismatch_is_refused_naming_the_tensors(tmp_path):
    saved = _saved(_tiny(tmp_path), tmp_path / "src")
    with pytest.raises(InitFromError) as exc:
        _tiny(tmp_path, embed_dim=8, init_from=str(saved))
    message = str(exc.value)
    assert "\n" not in message and exc.value.field == "model.init_from"
    # embed_dim reaches the shared projection, the three image heads and the text heads' output layers:
    # the first four are named, then the count.
    assert (
        "10 tensor(s) do not fit the configured model: image_left.weight saved (16, 16) vs model (8, 8), "
        in message
    )
    for name in ("image_patient.weight", "image_proj.weight", "image_right.weight"):
        assert f"{name} saved" in message, message
    assert message.endswith(", ... (10 in all)")
    assert "visual.blocks.0.attn.qkv.weight" not in message  # towers fit: only the misfits are named


def test_missing_and_unexpected_keys_refused_unless_not_strict(tmp_path):
    sigmoid = _saved(_tiny(tmp_path, loss="sigmoid"), tmp_path / "sigmoid")
    infonce = _saved(_tiny(tmp_path), tmp_path / "infonce")
    biases = ["logit_bias.left", "logit_bias.patient", "logit_bias.right"]
    with pytest.raises(InitFromError, match="3 unexpected: " + ", ".join(biases)):
        _tiny(tmp_path, init_from=str(sigmoid))
    with pytest.raises(InitFromError, match="3 missing: " + ", ".join(biases)):
        _tiny(tmp_path, loss="sigmoid", init_from=str(infonce))

    loose = _tiny(tmp_path, init_from=str(sigmoid), init_from_strict=False)
    report = loose.load_reports["model"]
    assert report.unexpected == biases and not report.missing
    assert "3 in the file not used: logit_bias.left" in str(report)
    source = RetClip.from_pretrained(sigmoid)
    for name, value in loose.state_dict().items():
        assert torch.equal(value, source.state_dict()[name]), name
    torch.manual_seed(5)
    fresh_bias = _tiny(tmp_path, loss="sigmoid").logit_bias["left"].detach().clone()
    loose = _tiny(tmp_path, loss="sigmoid", init_from=str(infonce), init_from_strict=False)
    assert loose.load_reports["model"].missing == biases
    assert torch.equal(loose.logit_bias["left"].detach(), fresh_bias)  # kept at its fresh init


def test_not_a_saved_model_is_refused(tmp_path):
    with pytest.raises(InitFromError, match=r"no model\.safetensors"):
        _tiny(tmp_path, init_from=str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00")  # cut short
    with pytest.raises(InitFromError, match=r"model\.safetensors: cannot read it \(") as err:
        _tiny(tmp_path, init_from=str(tmp_path))
    assert err.value.field == "model.init_from" and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("init-data")
    return build_synth_shards(root, 60, seed=5, raw_size=96, size=64, max_count=12, val_fraction=0.2)


def _train(shards: Path, out: Path, *extra: str, expect: int = 0) -> subprocess.CompletedProcess:
    cmd = trainer_cmd(*tiny_argv(BASE, shards, out, *extra))
    done = subprocess.run(cmd, env=trainer_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == expect, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _first_loss(out: Path) -> float:
    rows = sorted(read_metrics(out / "metrics.jsonl", "train"), key=lambda r: r["step"])
    assert rows[0]["step"] == 1
    return rows[0]["loss"]


def _loss_on_first_batch(run: Path, model: RetClip) -> float:
    """The tripartite loss of ``model`` on the first batch the run ``run`` trained on, computed here."""
    cfg = from_dict(RunConfig, json.loads((run / "config.json").read_text()))
    data = build_train_data(cfg.data, build_tokenizer(cfg.model), 0, 1, cfg.train.seed)
    batch = data.device_augment("cpu")(next(iter(data)))
    loss_fn = TripartiteLoss(cfg.model.loss, gather=cfg.loss.gather, duplicates=cfg.loss.duplicates)
    with torch.no_grad():
        total, _ = loss_fn(*model.train()(batch), report_hash=batch[REPORT_HASH])
    return total.item()


@pytest.mark.slow
def test_run_from_a_trained_model_starts_at_its_loss(shards, tmp_path):
    trained = tmp_path / "trained"
    _train(shards, trained, "--train.max_steps", "6", "--train.seed", "7")
    source = RetClip.from_pretrained(trained / "model")
    started = tmp_path / "started"
    _train(shards, started, "--train.max_steps", "1", "--model.init_from", str(trained / "model"))
    expected = _loss_on_first_batch(started, source)
    assert abs(_first_loss(started) - expected) < 1e-5, (_first_loss(started), expected)
    # A run from random weights (same seed, same batch) starts elsewhere.
    fresh = tmp_path / "fresh"
    _train(shards, fresh, "--train.max_steps", "1")
    assert abs(_first_loss(fresh) - expected) > 1e-2, (_first_loss(fresh), expected)


@pytest.mark.slow
def test_run_refuses_a_model_that_does_not_fit(shards, tmp_path):
    small = _saved(_tiny(tmp_path), tmp_path / "small")
    done = _train(shards, tmp_path / "run", "--model.init_from", str(small), expect=2)
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("retclip-train: model.init_from: ") and "image_proj.weight saved" in line, line
    assert line.endswith(" (83 in all)") and not (tmp_path / "run" / "metrics.jsonl").exists()
    done = _train(shards, tmp_path / "run2", "--model.init_from", str(tmp_path), expect=2)
    assert "model.init_from=" in done.stderr and "no model.safetensors" in done.stderr
