"""The checkpoint component in one process, in seconds: what it keeps, and what loading gives back.

The end-to-end resume tests (test_train.py, test_strength_resume.py) are ``slow``; this one lets the fast
suite and the mutation run (tools/mutate.py) see a checkpointer that keeps the wrong directories, drops
the loader position or loses the random state.
"""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from retclip_dist.config import ConfigError
from retclip_dist.train.checkpoint import Checkpointer, resume_path


def _model_and_optimizer(acc: Accelerator) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.1))


def test_checkpointer_keeps_the_newest_and_restores_weights_position_and_rng(tmp_path):
    acc = Accelerator(cpu=True)
    model, optimizer = _model_and_optimizer(acc)
    root = tmp_path / "checkpoints"
    (root / "step_00000009.tmp").mkdir(parents=True)  # a run that died while saving
    ck = Checkpointer(acc, root, keep_last=2)
    assert not (root / "step_00000009.tmp").exists()
    assert ck.load("auto") is None
    for step in (2, 4, 6):
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        ck.save(step, step // 3, {"note": "config"}, {"step_in_epoch": step})
    assert [p.name for p in ck.complete()] == ["step_00000004", "step_00000006"]
    assert resume_path(root, "auto") == root / "step_00000006"  # what --checkpoint.resume auto takes
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    next_draws = torch.rand(5)  # what the run would have drawn after its save

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    torch.manual_seed(1234)
    restored = ck.load("auto")
    assert (restored.step, restored.epoch, restored.data_state) == (6, 2, {"ranks": [{"step_in_epoch": 6}]})
    assert restored.path == root / "step_00000006"
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert torch.equal(torch.rand(5), next_draws)
    assert json.loads((root / "step_00000006" / "train_state.json").read_text())["config"] == {
        "note": "config"
    }

    older = ck.load(str(root / "step_00000004"))
    assert (older.step, older.epoch, older.data_state) == (4, 1, {"ranks": [{"step_in_epoch": 4}]})
    assert ck.load(None) is None


def test_checkpointer_gives_every_saved_ranks_position_and_refuses_incomplete_dirs(tmp_path):
    acc = Accelerator(cpu=True)
    _model_and_optimizer(acc)
    ck = Checkpointer(acc, tmp_path, keep_last=1)
    path = ck.save(1, 0, {}, {"rank": 0})
    state = json.loads((path / "train_state.json").read_text())
    # Saved by 2 processes, loaded by 1: the loader gets both positions to re-plan the epoch.
    (path / "train_state.json").write_text(json.dumps({**state, "world_size": 2}))
    with pytest.raises(ConfigError, match=r"lacks data_rank1\.json"):
        ck.load("auto")
    (path / "data_rank1.json").write_text(json.dumps({"rank": 1}))
    assert ck.load("auto").data_state == {"ranks": [{"rank": 0}, {"rank": 1}]}
    (path / "train_state.json").unlink()
    assert resume_path(tmp_path, "auto") is None  # no longer complete: a resume starts fresh
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        ck.load(str(path))


def test_keep_best_survives_keep_last_and_a_resume_knows_its_value(tmp_path):
    acc = Accelerator(cpu=True)
    _model_and_optimizer(acc)
    root = tmp_path / "checkpoints"
    ck = Checkpointer(acc, root, keep_last=1, keep_best="probe/auroc")
    # (step, probe value): the best comes at step 2, a tie at step 6 keeps the earlier one.
    offered = []
    for step, value in ((1, 0.70), (2, 0.90), (3, 0.80), (4, float("nan")), (5, 0.60), (6, 0.90)):
        offered.append(ck.offer("probe/auroc", value, step))
        ck.save(step, 0, {}, {"step": step})
    assert offered == [True, True, False, False, False, False]
    assert [p.name for p in ck.complete()] == ["step_00000002", "step_00000006"]
    best = {"metric": "probe/auroc", "value": 0.90, "step": 2, "checkpoint": "step_00000002"}
    assert json.loads((root / "step_00000006" / "train_state.json").read_text())["best"] == best
    assert not ck.offer("val/patient/i2t_r1", 1.0, 6)  # not the metric this run keeps

    # A fresh checkpointer (a resumed run) knows the best value and keeps protecting its checkpoint.
    resumed = Checkpointer(acc, root, keep_last=1, keep_best="probe/auroc")
    resumed.load("auto")
    assert resumed.best == best
    assert not resumed.offer("probe/auroc", 0.85, 7)
    resumed.save(7, 1, {}, {"step": 7})
    assert [p.name for p in resumed.complete()] == ["step_00000002", "step_00000007"]
    # A new best moves the protection: the old best goes with the next save's pruning.
    assert resumed.offer("probe/auroc", 0.95, 8)
    resumed.save(8, 1, {}, {"step": 8})
    assert [p.name for p in resumed.complete()] == ["step_00000008"]
    resumed.save(9, 1, {}, {"step": 9})
    assert [p.name for p in resumed.complete()] == ["step_00000008", "step_00000009"]

    # Without keep_best a resume ignores the saved best: keep_last alone decides.
    plain = Checkpointer(acc, root, keep_last=1)
    plain.load("auto")
    assert plain.best is None
    plain.save(10, 1, {}, {"step": 10})
    assert [p.name for p in plain.complete()] == ["step_00000010"]
