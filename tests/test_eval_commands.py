"""Every retclip-eval subcommand end to end on a tiny random model and a small synthetic labelled set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_VOCAB, tiny_model_config
from safetensors import safe_open
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from retclip_dist import synth
from retclip_dist.eval.cli import main
from retclip_dist.eval.commands import run_features, run_finetune, run_linear_probe, run_zero_shot
from retclip_dist.eval.config import DataConfig, EvalConfig
from retclip_dist.eval.data import load_images, read_labelled
from retclip_dist.eval.features import image_size
from retclip_dist.eval.finetune import BEST_FILE, TowerClassifier, predict
from retclip_dist.eval.metrics import compute_metrics
from retclip_dist.eval.zeroshot import class_embeddings
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.vocab import write_vocab
from retclip_dist.synth import write_labelled_set

PROMPTS = "configs/prompts_synth.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny model (64 px, W = 32, D = 16) and 30 synthetic patients = 60 eye photos."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    RetClip(tiny_model_config(TINY_VOCAB, image_size=64)).save_pretrained(root / "model")
    table = write_labelled_set(root / "data", n_patients=30, seed=0, image_size=64)
    return root, table


def _cfg(setup, out: str, label: str = "haemorrhages", **features) -> EvalConfig:
    root, table = setup
    cfg = EvalConfig(
        model=str(root / "model"),
        output_dir=str(root / out),
        data=DataConfig(table=str(table), images=str(root / "data" / "images"), label_column=label),
    )
    for key, value in features.items():
        setattr(cfg.features, key, value)
    return cfg


def _read(path):
    with safe_open(str(path), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def test_features_record_the_head_and_left_differs_from_right(setup):
    # The default is the release's probe feature: the shared projection of the tower output (D = 16).
    projected = run_features(_cfg(setup, "f_projected"))
    assert projected["features_from"] == "shared projection (60)"
    arrays, meta = _read(projected["path"])
    assert arrays["image_features"].shape == (60, 16)
    assert json.loads(meta["ids"])[:2] == ["p00000-left", "p00000-right"]
    assert arrays["labels"].shape == (60,)
    tower = run_features(_cfg(setup, "f_tower", head="tower"))
    assert tower["features_from"] == "vision tower (60)"
    tower_arrays, _ = _read(tower["path"])
    assert tower_arrays["image_features"].shape == (60, 32)
    weight = RetClip.from_pretrained(setup[0] / "model").image_proj.weight.detach().numpy()
    np.testing.assert_allclose(arrays["image_features"], tower_arrays["image_features"] @ weight.T, atol=1e-5)

    runs = {}
    for head in ("left", "right"):
        cfg = _cfg(setup, f"f_{head}", head=head)
        cfg.zero_shot.prompts = PROMPTS
        cfg.data.label_column = "grade"
        result = run_features(cfg)
        assert result["features_from"] == f"{head} head (60)"
        runs[head], meta = _read(result["path"])
        assert meta["heads"].split(",") == [head] * 60
        assert runs[head]["class_features_left"].shape == (4, 16)
    # The same photos through the two eye heads land in different places (sStonemason/RET-CLIP issue 2).
    cosine = (runs["left"]["image_features"] * runs["right"]["image_features"]).sum(axis=1)
    assert runs["left"]["image_features"].shape == (60, 16)
    assert float(np.abs(cosine).mean()) < 0.5


def test_features_npz_by_laterality(setup):
    result = run_features(_cfg(setup, "f_npz", head="laterality", output="feats.npz"))
    assert result["features_from"] == "left head (30), right head (30)"
    data = np.load(result["path"])
    assert data["ids"][1] == "p00000-right"
    heads = str(data["meta_heads"]).split(",")
    assert heads[:2] == ["left", "right"]
    # Each row holds the features of its own eye's head: the rows of the single-head runs for that eye.
    for head in ("left", "right"):
        single = np.load(run_features(_cfg(setup, f"f_npz_{head}", head=head, output="f.npz"))["path"])
        mine = np.array([h == head for h in heads])
        np.testing.assert_allclose(data["image_features"][mine], single["image_features"][mine], atol=1e-6)
        assert not np.allclose(data["image_features"][~mine], single["image_features"][~mine], atol=1e-3)


def test_zero_shot_uses_the_laterality_heads(setup):
    cfg = _cfg(setup, "zs", label="grade")
    cfg.zero_shot.prompts = PROMPTS
    result = run_zero_shot(cfg)
    assert result["features_from"] == "left head (30), right head (30)"
    metrics = json.loads((setup[0] / "zs" / "metrics.json").read_text())["metrics"]
    assert metrics["classes"] == ["0", "1", "2", "3"]
    assert metrics["n"] == 60
    assert sum(m["support"] for m in metrics["per_class"].values()) == 60
    assert (setup[0] / "zs" / "roc.png").read_bytes()[:4] == b"\x89PNG"
    # The same numbers by hand from the features command's output: each photo's eye head against that
    # eye's class embeddings, times that head's logit scale, softmax over the classes.
    fcfg = _cfg(setup, "zs_features", label="grade", head="laterality")
    fcfg.zero_shot.prompts = PROMPTS
    arrays, meta = _read(run_features(fcfg)["path"])
    heads = meta["heads"].split(",")
    assert heads[:2] == ["left", "right"]
    model = RetClip.from_pretrained(setup[0] / "model")
    probs = []
    for feature, head in zip(arrays["image_features"], heads, strict=True):
        logits = model.logit_scale[head].exp().item() * (arrays[f"class_features_{head}"] @ feature)
        probs.append(np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum())
    expected = compute_metrics(arrays["labels"], np.stack(probs), metrics["classes"], False)
    for name, values in expected["per_class"].items():
        # A random tiny model scores some photos almost alike, so float32 rounding in numpy (here) and
        # torch (the command) can swap one near-tie: 0.0015 with numpy 1.26, 0 with the pinned set.
        assert metrics["per_class"][name]["auroc"] == pytest.approx(values["auroc"], abs=2e-3), name
    assert metrics["overall"]["accuracy"] == pytest.approx(expected["overall"]["accuracy"])


@pytest.mark.parametrize("head", ["tower", "projected"])
def test_zero_shot_refuses_features_not_aligned_with_text(setup, head):
    cfg = _cfg(setup, f"zs_{head}", label="grade", head=head)
    cfg.zero_shot.prompts = PROMPTS
    with pytest.raises(ValueError, match=r"features\.head cannot be 'tower' or 'projected'"):
        run_zero_shot(cfg)


def test_zero_shot_prompts_are_cleaned_like_training_reports(tmp_path):
    vocab = write_vocab(tmp_path / "vocab.txt", [*synth.vocabulary(), '"'])
    torch.manual_seed(0)
    model = RetClip(tiny_model_config(vocab)).eval()
    classes = ["0", "1"]

    def embed(quoted: str) -> torch.Tensor:
        prompts = {"0": [f"{quoted[0]}Mild{quoted[1]} drusen"], "1": ["normal fundus"]}
        return class_embeddings(model, prompts, classes, context_length=16)["patient"]

    curly, straight = embed("\u201c\u201d"), embed('""')
    assert torch.equal(curly, straight)  # curly quotes became '"' (and lower case), not [UNK]
    assert not torch.equal(straight, embed(["[UNK]", "[UNK]"]))


def test_linear_probe_picks_c_on_validation(setup):
    result = run_linear_probe(_cfg(setup, "probe"))
    assert result["split"] == "test"
    assert result["features_from"] == "shared projection (60)"
    assert [row["C"] for row in result["probe"]["validation"]] == [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]
    # Which C wins is checked against validation scores computed independently in test_strength_selection.py.
    assert result["metrics"]["n"] == 12
    assert (setup[0] / "probe" / "metrics.md").read_text().startswith("**linear-probe** on 12 images")


def test_finetune_early_stops_checkpoints_and_resumes(setup):
    cfg = _cfg(setup, "ft")
    cfg.finetune.epochs, cfg.finetune.patience, cfg.finetune.batch_size = 2, 5, 12
    first = run_finetune(cfg)
    assert first["finetune"]["epochs_run"] == 2
    checkpoints = setup[0] / "ft" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_0002"]
    cfg.finetune.epochs = 3
    resumed = run_finetune(cfg)
    # Epochs 1-2 were restored from the checkpoint, not re-run: their record is unchanged.
    assert resumed["finetune"]["history"][:2] == first["finetune"]["history"]
    assert [h["epoch"] for h in resumed["finetune"]["history"]] == [1, 2, 3]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_0003"]
    assert resumed["features_from"] == "vision tower (60)"

    cfg.finetune.epochs, cfg.finetune.patience, cfg.finetune.resume = 10, 1, False
    cfg.output_dir = str(setup[0] / "ft_patience")
    stopped = run_finetune(cfg)
    history = stopped["finetune"]["history"]
    # Patience 1: training stops at the first epoch that does not beat the best so far.
    assert len(history) < 10
    assert history[-1]["val_macro_auroc"] <= max(h["val_macro_auroc"] for h in history[:-1])
    assert stopped["finetune"]["best_epoch"] == 1 + int(np.argmax([h["val_macro_auroc"] for h in history]))
    # The kept weights are the best epoch's: scored here on the validation photos with scikit-learn, they
    # reach the best recorded value (the history alone could say anything).
    model = RetClip.from_pretrained(setup[0] / "model")
    net = TowerClassifier(model.visual, 2)
    net.load_state_dict(load_file(str(setup[0] / "ft_patience" / BEST_FILE)))
    val = read_labelled(cfg.data).subset("val")
    probs = predict(net, load_images(val, image_size(model)), False, 12, model.image_input)
    best = max(h["val_macro_auroc"] for h in history)
    assert roc_auc_score(val.labels(), probs[:, 1]) == pytest.approx(best, abs=1e-9)


def test_cli_runs_and_reports_bad_rows(setup, capsys, tmp_path):
    root, table = setup
    args = ["--model", str(root / "model"), "--data.images", str(root / "data" / "images")]
    args += ["--data.label_column", "drusen"]
    code = main(["linear-probe", *args, "--data.table", str(table), "--output_dir", str(tmp_path / "cli")])
    assert code == 0
    assert "**linear-probe** on 12 images" in capsys.readouterr().out
    broken = tmp_path / "broken.csv"
    broken.write_text(table.read_text().replace("p00003_left.jpg", "missing.jpg"))
    code = main(["linear-probe", *args, "--data.table", str(broken), "--output_dir", str(tmp_path / "cli2")])
    assert code == 2
    assert "broken.csv:8: image 'missing.jpg'" in capsys.readouterr().err
    assert main(["nonsense"]) == 2
    capsys.readouterr()
    # An output_dir that is a file: one line and exit code 2, as for every other bad path.
    (tmp_path / "a-file").write_text("")
    code = main(["features", *args, "--data.table", str(table), "--output_dir", str(tmp_path / "a-file")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("retclip-eval features: error: ") and err.count("\n") == 1


def test_cli_drops_and_reports_missing_labels_or_refuses_them(setup, capsys, tmp_path):
    root, table = setup
    lines = table.read_text().splitlines()
    column = lines[0].split(",").index("drusen")
    for n, marker in ((5, "NaN"), (9, "nan"), (14, "")):  # table lines 6, 10, 15
        cells = lines[n].split(",")
        cells[column] = marker
        lines[n] = ",".join(cells)
    gappy = tmp_path / "gappy.csv"
    gappy.write_text("\n".join(lines) + "\n")
    args = ["--model", str(root / "model"), "--data.images", str(root / "data" / "images")]
    args += ["--data.label_column", "drusen", "--data.table", str(gappy)]
    assert main(["linear-probe", *args, "--output_dir", str(tmp_path / "gappy")]) == 0
    printed = capsys.readouterr().out
    assert (
        "3 rows of " in printed
        and "have no label and were left out (first: gappy.csv:6, gappy.csv:10" in printed
    )
    result = json.loads((tmp_path / "gappy" / "metrics.json").read_text())
    assert result["missing_labels"] == {"dropped": 3, "rows": ["gappy.csv:6", "gappy.csv:10", "gappy.csv:15"]}
    assert result["metrics"]["classes"] == ["0", "1"]
    assert main(["linear-probe", *args, "--output_dir", str(tmp_path / "strict"), "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "retclip-eval linear-probe: error: gappy.csv:6: no label in column 'drusen' ('NaN'); "
        "data.strict refuses rows without a label"
    )


def test_help_exits_zero_and_unknown_subcommand_exits_two(capsys):
    from retclip_dist.eval.cli import main

    assert main(["--help"]) == 0
    assert "linear-probe" in capsys.readouterr().out
    assert main(["bogus"]) == 2
