"""retclip-eval benchmark, other models: each adapter on a reduced-size look-alike of its published
checkpoint (tests/bench_models.py), its preprocessing, the features it reads, a wrong layout refused
naming keys; the paired differences against a hand computation; the --model syntax and the run record."""

from __future__ import annotations

import json
import math

import bench_models as M
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from scipy import stats
from sklearn.metrics import roc_auc_score

from retclip_dist.config import ConfigError
from retclip_dist.eval.benchmark import results
from retclip_dist.eval.benchmark.recipe import layer_id, param_groups, tower_depth
from retclip_dist.eval.benchmark.results import (
    BOOTSTRAP,
    T_OVER_SEEDS,
    Predictions,
    paired_differences,
)
from retclip_dist.eval.benchmark.run import _check_record, parse_model_arg
from retclip_dist.eval.benchmark.suite import ModelSpec
from retclip_dist.eval.cli import main as eval_main
from retclip_dist.eval.data import fit_image
from retclip_dist.eval.models.base import LayoutError
from retclip_dist.eval.models.registry import ADAPTERS, resolve
from retclip_dist.model.config import ImageInput, ModelConfigError

CPU = torch.device("cpu")


def load(kind: str, path, options, arch: str = ""):
    spec = ModelSpec(name=kind, kind=kind, path=str(path), arch=arch, options=options)
    return resolve(spec, "models[0]").load(CPU)


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


# -- preprocessing ----------------------------------------------------------------------------------------


def _wide(w: int = 64, h: int = 32) -> Image.Image:
    """A picture twice as wide as high whose red channel is the column index (a horizontal ramp)."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(w, dtype=np.uint8)[None, :] * 4
    arr[..., 1] = 200
    return Image.fromarray(arr)


def test_authors_geometry_crop_pad_and_squash():
    # FLAIR: the longer side to 32, black padding at the bottom only.
    flair = np.asarray(
        fit_image(_wide(), ImageInput(32, (0,) * 3, (1,) * 3, "bilinear", "longest", pad="end"))
    )
    assert flair.shape == (32, 32, 3) and (flair[16:] == 0).all() and (flair[:16, :, 1] > 150).all()
    # open_clip's "longest": padding split over both sides.
    centre = np.asarray(fit_image(_wide(), ImageInput(32, (0,) * 3, (1,) * 3, "bicubic", "longest")))
    assert (centre[:8] == 0).all() and (centre[24:] == 0).all() and (centre[8:24, :, 1] > 150).all()
    # RETFound at 32 px: the shorter side to floor(32 / 0.875) = 36 (so 72 x 36), centre crop: the ramp's
    # middle, columns 20..51 of 72, i.e. about source columns 18..45 of 64.
    crop = np.asarray(
        fit_image(_wide(), ImageInput(32, (0,) * 3, (1,) * 3, "bicubic", "shortest", 224 / 256))
    )
    assert crop.shape == (32, 32, 3) and (crop[..., 1] > 150).all()
    assert abs(int(crop[16, 0, 0]) - 18 * 4) <= 8 and abs(int(crop[16, -1, 0]) - 45 * 4) <= 8
    # RETFound-Green: both sides to 392 (here 32): the whole ramp, distorted.
    squash = np.asarray(fit_image(_wide(), ImageInput(32, (0,) * 3, (1,) * 3, "bilinear", "squash")))
    assert squash[16, 0, 0] < 10 and squash[16, -1, 0] > 240


# -- adapters: loading, features, refusals ------------------------------------------------------------------


def test_retfound_mae_reads_maes_checkpoint_and_pools_patch_tokens(tmp_path):
    options = M.retfound_mae(tmp_path / "mae.pth")
    model = load("retfound_mae", tmp_path / "mae.pth", options)
    saved = torch.load(tmp_path / "mae.pth", weights_only=False)["model"]
    tower = model.tower
    assert torch.equal(tower.blocks[1].mlp.fc2.weight, saved["blocks.1.mlp.fc2.weight"])
    # fc_norm is RETFound's fresh norm (LayerNorm's init), not the file's final norm.
    assert torch.equal(tower.fc_norm.weight, torch.ones(32)) and not torch.equal(
        tower.fc_norm.weight, saved["norm.weight"]
    )
    assert model.image_input == ImageInput(
        32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", "shortest", 0.875
    )
    x = images(3, 32)
    with torch.no_grad():
        batch = next(model.batches(x, 3))
        tokens = tower.blocks(tower._pos_embed(tower.patch_embed(batch)))
        expected = F.layer_norm(
            tokens[:, 1:].mean(dim=1), (32,), eps=1e-6
        )  # the patch tokens, no class token
    np.testing.assert_allclose(model.probe_features(x, 2), expected.numpy(), atol=1e-5)
    assert not model.text and "zero_shot" not in model.protocols()


def test_retfound_dinov2_unchunks_renames_and_resamples(tmp_path):
    chunked = M.retfound_dinov2(tmp_path / "chunked.pth", chunks=2)
    flat = M.retfound_dinov2(tmp_path / "flat.pth", chunks=0)
    a = load("retfound_dinov2", tmp_path / "chunked.pth", chunked)
    b = load("retfound_dinov2", tmp_path / "flat.pth", flat)
    teacher = torch.load(tmp_path / "chunked.pth")["teacher"]
    assert "backbone.blocks.1.3.ls2.gamma" in teacher
    assert torch.equal(a.tower.blocks[3].ls2.gamma, teacher["backbone.blocks.1.3.ls2.gamma"])
    assert a.tower.pos_embed.shape == (1, 5, 32)  # 3 x 3 + 1 positions resampled to 2 x 2 + 1
    x = images(4, 28)
    np.testing.assert_array_equal(a.probe_features(x, 4), b.probe_features(x, 4))
    with torch.no_grad():
        cls = a.tower.forward_features(next(a.batches(x, 4)))[:, 0]  # class token after the final norm
    np.testing.assert_allclose(a.probe_features(x, 4), cls.numpy(), atol=1e-6)


def test_retfound_green_is_the_timm_state_dict_with_average_pooling(tmp_path):
    options = M.retfound_green(tmp_path / "green.pth")
    model = load("retfound_green", tmp_path / "green.pth", options)
    assert model.image_input == ImageInput(28, (0.5,) * 3, (0.5,) * 3, "bilinear", "squash")
    x = images(3, 28)
    with torch.no_grad():
        tokens = model.tower.forward_features(next(model.batches(x, 3)))  # after the final norm
    assert model.tower.num_prefix_tokens == 5  # class token and four registers, left out of the mean
    np.testing.assert_allclose(model.probe_features(x, 3), tokens[:, 5:].mean(dim=1).numpy(), atol=1e-6)


def test_flair_layout_text_pooling_and_zero_shot(tmp_path):
    options = M.flair(tmp_path / "flair.pth", tmp_path / "bert")
    model = load("flair", tmp_path / "flair.pth", options)
    assert model.image_input == ImageInput(32, (0,) * 3, (1,) * 3, "bilinear", "longest", pad="end")
    state = torch.load(tmp_path / "flair.pth")
    x = images(2, 32)
    with torch.no_grad():
        batch = next(model.batches(x, 2))
        assert torch.equal(batch, x.float() / 255)  # FLAIR scales to [0, 1] and nothing else
        pooled = model.tower(batch)
        proj = state["vision_model.projection_head_vision.projection.weight"]
        image = F.normalize(F.normalize(pooled, dim=-1) @ proj.T, dim=-1)
        np.testing.assert_allclose(model.probe_features(x, 2), pooled.numpy(), atol=1e-5)  # 2048-d raw
        zs, heads = model.zero_shot_features(x, [None, None], 2)
        np.testing.assert_allclose(zs, image.numpy(), atol=1e-5)
        prompts = {"a": ["normal fundus", "no abnormality seen"], "b": ["drusen"]}
        emb = model.class_embeddings(prompts, ["a", "b"], 64)["image"]
        # By hand: per class one batch, mean over layers 1, 2, last and over every position, projected.
        tok = model.tokenizer(["normal fundus", "no abnormality seen"], padding=True, return_tensors="pt")
        hidden = model.net.text_model.model(**tok, output_hidden_states=True).hidden_states
        text = torch.stack([hidden[1], hidden[2], hidden[3]]).mean(0).mean(1)
        text_proj = state["text_model.projection_head_text.projection.weight"]
        by_hand = F.normalize(F.normalize(text, dim=-1) @ text_proj.T, dim=-1).mean(0)
        np.testing.assert_allclose(emb[0].numpy(), by_hand.numpy(), atol=1e-5)
        assert emb[0].norm() < 1  # FLAIR does not renormalise the class mean
    probs = model.zero_shot_probs(zs, heads, {"image": emb}, multilabel=False)
    expected = (math.exp(min(math.log(1 / 0.07), 4.6052)) * image @ emb.T).softmax(-1)
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-5)
    assert model.templates(["{}."]) == ["A fundus photograph of {}"]


def test_open_clip_loads_strictly_with_its_preprocessing(tmp_path):
    pytest.importorskip("open_clip")
    config, weights = M.open_clip_files(tmp_path)
    model = load("open_clip", weights, {"config": str(config)}, arch=M.TINY_CLIP)
    assert model.image_input.size == 32 and model.image_input.resize == "shortest"
    assert model.image_input.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    x = images(2, 32)
    with torch.no_grad():
        expected = F.normalize(model.model.encode_image(next(model.batches(x, 2))), dim=-1)
    np.testing.assert_allclose(model.probe_features(x, 2), expected.numpy(), atol=1e-6)
    state = torch.load(weights)
    del state["visual.ln_post.weight"]
    torch.save({**state, "visual.extra": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(
        LayoutError, match=r"not an open_clip tiny-clip-test checkpoint: .*visual\.ln_post\.weight"
    ):
        load("open_clip", tmp_path / "bad.pt", {"config": str(config)}, arch=M.TINY_CLIP)


def test_timm_drops_the_classifier_and_states_timm_preprocessing(tmp_path):
    options = M.timm_vit(tmp_path / "vit.pth")
    model = load("timm", tmp_path / "vit.pth", options, arch="vit_tiny_patch16_224")
    assert model.width == 192 and model.image_input == ImageInput(
        32, (0.5,) * 3, (0.5,) * 3, "bicubic", "shortest", 0.9
    )
    with pytest.raises(ConfigError, match=r"models\[0\]\.arch: 'vit_nope' is not a timm model name"):
        load("timm", tmp_path / "vit.pth", options, arch="vit_nope")


@pytest.mark.parametrize(
    ("kind", "wrong", "named"),
    [
        (
            "retfound_mae",
            "green",
            r"do not fit the RETFound MAE \(ViT encoder\) tower's shapes: patch_embed\.proj",
        ),
        ("retfound_dinov2", "mae", r"RETFound DINOv2 \(teacher backbone\) tower's shapes: patch_embed\.proj"),
        ("retfound_green", "mae", r"RETFound-Green \(timm \w+\) tower's shapes: patch_embed\.proj"),
        (
            "flair",
            "green",
            r"not a FLAIR checkpoint: missing vision_model\.projection_head_vision\.projection\.weight",
        ),
        ("timm", "green", r"timm vit_tiny_patch16_224 tower's shapes: blocks\.0\.attn"),
    ],
)
def test_a_file_in_another_layout_is_refused_naming_keys(tmp_path, kind, wrong, named):
    files = {
        "mae": M.retfound_mae(tmp_path / "mae.pth"),
        "dinov2": M.retfound_dinov2(tmp_path / "dinov2.pth"),
        "green": M.retfound_green(tmp_path / "green.pth"),
        "flair": M.flair(tmp_path / "flair.pth", tmp_path / "bert"),
    }
    own = {
        "retfound_mae": files["mae"],
        "retfound_dinov2": files["dinov2"],
        "retfound_green": files["green"],
        "flair": files["flair"],
        "timm": M.timm_vit(tmp_path / "vit.pth"),
    }[kind]
    arch = "vit_tiny_patch16_224" if kind == "timm" else ""
    with pytest.raises((LayoutError, ModelConfigError), match=named) as caught:
        load(kind, tmp_path / f"{wrong}.pth", own, arch=arch)
    assert str(tmp_path / f"{wrong}.pth") in str(caught.value) and "\n" not in str(caught.value)


def test_a_wrapped_file_without_a_known_wrapper_names_its_keys(tmp_path):
    M.retfound_dinov2(tmp_path / "dinov2.pth")
    with pytest.raises(
        ValueError, match=r"dinov2\.pth does not hold a flat mapping .*top-level keys \['teacher'\]"
    ):
        load("retfound_green", tmp_path / "dinov2.pth", {})


def test_a_missing_block_of_the_right_layout_is_refused(tmp_path):
    options = M.retfound_green(tmp_path / "green.pth")
    state = torch.load(tmp_path / "green.pth")
    del state["blocks.1.attn.qkv.weight"]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(
        ModelConfigError,
        match=r"cut\.pth: does not fit the RETFound-Green .* tower: 1 of the tower's tensors are not in the file "
        r"\(blocks\.1\.attn\.qkv\.weight\); the file is not in the layout",
    ):
        load("retfound_green", tmp_path / "cut.pth", options)


def test_spec_errors_name_the_field(tmp_path):
    with pytest.raises(
        ConfigError, match=r"models\[0\]\.kind: 'retfound' is not one of \['flair', 'open_clip'"
    ):
        resolve(ModelSpec(name="x", kind="retfound", path="p"), "models[0]")
    with pytest.raises(ConfigError, match=r"models\[0\]\.options: unknown key\(s\) \['img'\]"):
        resolve(ModelSpec(name="x", kind="retfound_mae", path="p", options={"img": 1}), "models[0]")
    with pytest.raises(ConfigError, match=r"models\[0\]\.path: .*nowhere\.pth is not a file"):
        resolve(ModelSpec(name="x", kind="retfound_mae", path=str(tmp_path / "nowhere.pth")), "models[0]")
    with pytest.raises(
        ConfigError, match=r"models\[0\]\.options\.text: \(empty\): give a local Bio_ClinicalBERT"
    ):
        resolve(ModelSpec(name="x", kind="flair", path="p"), "models[0]")
    with pytest.raises(ConfigError, match=r"models\[0\]\.path: .*: no model\.safetensors"):
        resolve(ModelSpec(name="x", kind="retclip", path=str(tmp_path)), "models[0]")
    with pytest.raises(ConfigError, match=r"models\[0\]\.arch: only the open_clip and timm kinds"):
        resolve(ModelSpec(name="x", kind="retfound_green", path="p", arch="vit"), "models[0]")
    assert sorted(ADAPTERS) == sorted(
        ["retclip", "retfound_mae", "retfound_dinov2", "retfound_green", "flair", "open_clip", "timm"]
    )


def test_open_clip_refuses_a_text_tower_from_the_hub(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    assert open_clip.get_model_config("ViT-B-16-SigLIP")["text_cfg"].get("hf_tokenizer_name")
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(
        ConfigError, match=r"models\[0\]\.arch: ViT-B-16-SigLIP's text tower or tokenizer is .* hub"
    ):
        resolve(
            ModelSpec(name="x", kind="open_clip", path=str(tmp_path / "w.pt"), arch="ViT-B-16-SigLIP"),
            "models[0]",
        )


def test_layer_decay_by_stage_for_resnets_and_by_block_for_open_clip(tmp_path):
    model = load("flair", tmp_path / "flair.pth", M.flair(tmp_path / "flair.pth", tmp_path / "bert"))
    net = model.classifier(3, paired=False)
    assert tower_depth(net.tower) == 4
    assert [
        layer_id(n, 5)
        for n in (
            "tower.conv1.weight",
            "tower.layer1.0.conv1.weight",
            "tower.layer4.0.bn3.bias",
            "head.weight",
        )
    ] == [0, 1, 4, 5]
    groups = param_groups(net, 0.05, 0.65)
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    assert {round(g["lr_scale"], 6) for g in groups} == {round(0.65**k, 6) for k in range(6)}
    assert layer_id("tower.transformer.resblocks.1.attn.in_proj_weight", 3) == 2
    assert layer_id("tower.class_embedding", 3) == 0 and layer_id("tower.ln_post.weight", 3) == 3


# -- paired differences -------------------------------------------------------------------------------------


def _pred(labels: np.ndarray, p1: np.ndarray) -> Predictions:
    return Predictions(
        [f"r{i}" for i in range(len(labels))], labels, np.stack([1 - p1, p1], 1), ["no", "yes"], False
    )


def test_paired_difference_over_seeds_equals_a_hand_computation():
    rng = np.random.default_rng(3)
    labels = np.array([0, 1] * 10)
    cells = {("A", "D", "linear_probe"): [], ("B", "D", "linear_probe"): []}
    hand = []
    for _seed in range(3):
        pa, pb = rng.random(20), rng.random(20)
        cells["A", "D", "linear_probe"].append(_pred(labels, pa))
        cells["B", "D", "linear_probe"].append(_pred(labels, pb))
        hand.append(roc_auc_score(labels, pb) - roc_auc_score(labels, pa))
    row = next(r for r in paired_differences(cells, "A") if r["metric"] == "auroc")
    half = stats.t.ppf(0.975, 2) * np.std(hand, ddof=1) / math.sqrt(3)
    assert (row["model"], row["baseline"], row["interval"], row["n"]) == ("B", "A", T_OVER_SEEDS, 3)
    assert row["difference"] == pytest.approx(np.mean(hand))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((np.mean(hand) - half, np.mean(hand) + half))


def test_paired_difference_with_one_seed_resamples_the_same_images_for_both(monkeypatch):
    monkeypatch.setattr(results, "BOOTSTRAP_RESAMPLES", 20)  # the rule, not the count: a faster test
    rng = np.random.default_rng(4)
    labels = np.array([0, 1] * 15)
    pa, pb = rng.random(30), 0.5 * rng.random(30) + 0.5 * labels
    cells = {("A", "D", "zero_shot"): [_pred(labels, pa)], ("B", "D", "zero_shot"): [_pred(labels, pb)]}
    row = next(r for r in paired_differences(cells, "A") if r["metric"] == "auroc")
    draws = np.random.default_rng(0)
    diffs = []
    for _ in range(20):
        pick = draws.integers(0, 30, 30)
        if labels[pick].min() != labels[pick].max():
            diffs.append(roc_auc_score(labels[pick], pb[pick]) - roc_auc_score(labels[pick], pa[pick]))
    assert (row["interval"], row["n"]) == (BOOTSTRAP, 30)
    assert row["difference"] == pytest.approx(roc_auc_score(labels, pb) - roc_auc_score(labels, pa))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(
        (np.percentile(diffs, 2.5), np.percentile(diffs, 97.5))
    )
    assert row["ci_low"] > 0  # B is better, and the interval says so
    # Seeds that vary nothing (a fixed split, a deterministic probe): the same bootstrap, not a zero width.
    again = {k: v * 3 for k, v in cells.items()}
    assert next(r for r in paired_differences(again, "A") if r["metric"] == "auroc") == row


def test_pairing_refuses_predictions_on_other_rows():
    labels = np.array([0, 1, 0, 1])
    a, b = _pred(labels, np.full(4, 0.3)), _pred(labels, np.full(4, 0.6))
    b = Predictions(["x", *b.ids[1:]], b.labels, b.probs, b.classes, False)
    with pytest.raises(ValueError, match="not on the same test rows"):
        paired_differences({("A", "D", "p"): [a], ("B", "D", "p"): [b]}, "A")


# -- command line and run record ------------------------------------------------------------------------------


def test_model_argument_forms():
    assert parse_model_arg("runs/x/model") == ModelSpec(name="retclip", path="runs/x/model")
    assert parse_model_arg("v2=runs/y/model") == ModelSpec(name="v2", path="runs/y/model")
    spec = parse_model_arg("name=rf,kind=retfound_mae,path=/w/RETFound.pth,options.img_size=256")
    assert spec == ModelSpec(
        name="rf", kind="retfound_mae", path="/w/RETFound.pth", options={"img_size": 256}
    )
    assert parse_model_arg("kind=timm,arch=resnet50,path=r.pth").name == "timm"
    flow = parse_model_arg(
        "kind=timm,path=r.pth,options.kwargs={img_size: 32, depth: 2},arch=vit_tiny_patch16_224"
    )
    assert flow.options == {"kwargs": {"img_size": 32, "depth": 2}} and flow.arch == "vit_tiny_patch16_224"
    with pytest.raises(ConfigError, match=r"unknown key 'weights'"):
        parse_model_arg("kind=timm,weights=r.pth")


def test_two_plain_models_need_names_and_unknown_kinds_stop_before_any_work(tmp_path, capsys):
    suite = {"datasets": [{"name": "A", "layout": "table", "root": "x"}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    base = ["benchmark", "--suite", str(tmp_path / "s.yaml"), "--output_dir", str(tmp_path / "o")]
    assert eval_main([*base, "--model", "a", "--model", "b"]) == 2
    assert "--model[1].name: 'retclip' is used twice" in capsys.readouterr().err
    suite["models"] = [{"name": "x", "kind": "retfund", "path": "w.pth"}]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    assert eval_main(base) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "models[0].kind: 'retfund' is not one of" in err
    suite["models"] = [{"name": "x", "path": "w"}]
    suite["models"][0]["prompts"] = {"B": "p.yaml"}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    assert eval_main(base) == 2
    assert "models[0].prompts: no dataset named ['B']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_record_of_the_one_model_format_is_refused(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "benchmark.json").write_text(
        json.dumps({"model_sha256": "ab", "settings": {}, "datasets": {}})
    )
    (tmp_path / "w.pth").write_bytes(b"x")
    suite = {
        "datasets": [{"name": "A", "layout": "table", "root": "x"}],
        "models": [{"name": "g", "kind": "retfound_green", "path": "w.pth"}],
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    assert (
        eval_main(["benchmark", "--suite", str(tmp_path / "s.yaml"), "--output_dir", str(tmp_path / "o")])
        == 2
    )
    assert "written by an earlier retclip-eval (one model, no model column)" in capsys.readouterr().err


def test_a_model_name_is_bound_to_its_weights_once_it_has_cells(tmp_path):
    first = {"settings": {}, "datasets": {}, "models": {"rf": {"kind": "retfound_mae", "sha256": "aa"}}}
    _check_record(tmp_path, first)
    fixed = {**first, "models": {"rf": {"kind": "retfound_mae", "sha256": "bb"}}}
    _check_record(tmp_path, fixed)  # no cell yet (say its first file was refused): the new file is taken
    assert json.loads((tmp_path / "benchmark.json").read_text())["models"]["rf"]["sha256"] == "bb"
    (tmp_path / "predictions" / "rf").mkdir(parents=True)
    (tmp_path / "predictions" / "rf" / "A_linear_probe_seed0.csv").write_text("id\n")
    with pytest.raises(ConfigError, match=r"benchmark\.json: model rf was run with other sha256; rename it"):
        _check_record(tmp_path, first)


def test_zero_shot_alone_with_image_only_models_is_refused(tmp_path, capsys):
    M.retfound_green(tmp_path / "green.pth")
    suite = {
        "protocols": ["zero_shot"],
        "datasets": [{"name": "A", "layout": "table", "root": "x"}],
        "models": [{"name": "g", "kind": "retfound_green", "path": "green.pth"}],
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    assert (
        eval_main(["benchmark", "--suite", str(tmp_path / "s.yaml"), "--output_dir", str(tmp_path / "o")])
        == 2
    )
    assert "every model is image-only and zero_shot is the only protocol" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
