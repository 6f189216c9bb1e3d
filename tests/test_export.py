"""retclip-eval export: each format loads through its own library (timm, RETFound's loading steps, open_clip)
and gives the model's features on the same photos, through that library's own preprocessing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY_VOCAB, fundus_image, tiny_model_config
from PIL import Image

import retclip_dist
from retclip_dist.api import Pretrained
from retclip_dist.eval.cli import main
from retclip_dist.exit_codes import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from retclip_dist.export import timm_format
from retclip_dist.export.timm_format import RETFOUND_CHECKPOINT, TIMM_CONFIG, TIMM_WEIGHTS
from retclip_dist.model.retclip import RetClip

TOL = {"rtol": 1e-5, "atol": 1e-5}
TEXTS = ["no diabetic retinopathy.", "scattered hard exudates. impression: moderate diabetic retinopathy."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny model (32 px, patch 8: a 4 x 4 grid; W = 32, D = 16)."""
    torch.manual_seed(0)
    return RetClip(tiny_model_config(TINY_VOCAB)).save_pretrained(tmp_path_factory.mktemp("export") / "model")


def _photos() -> list[Image.Image]:
    """Photos of other sizes and shapes than the model's input: each library must resize them itself."""
    rng = np.random.default_rng(0)
    return [fundus_image(rng, 60).resize(size) for size in ((60, 44), (36, 50), (32, 32))]


def _export(model_dir: Path, fmt: str, out: Path, *flags: str) -> int:
    return main(["export", "--model", str(model_dir), "--format", fmt, "--output_dir", str(out), *flags])


EXPORT_HEADING = "### Exporting: `retclip-eval export`"


def _readme_block(heading: str, index: int = 0) -> str:
    """The ``index``-th Python block under ``heading`` in docs/evaluation.md, unindented."""
    section = (ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8").split(heading, 1)[1]
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", section, re.S | re.M)
    return textwrap.dedent(blocks[index][1])


@pytest.mark.parametrize("head", ["none", "projection"])
def test_timm_export_gives_the_models_features_through_timm(model_dir, tmp_path, head):
    """Loaded by the timm block of docs/evaluation.md as written, from export/timm under the working dir."""
    out = tmp_path / "export" / "timm"
    assert _export(model_dir, "timm", out, "--head", head) == EXIT_OK
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", RETFOUND_CHECKPOINT, TIMM_CONFIG, TIMM_WEIGHTS]
    )
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(
            compile(_readme_block(EXPORT_HEADING), "docs/evaluation.md", "exec"),
            namespace,
        )
    finally:
        os.chdir(cwd)
    tower, transform = namespace["tower"].eval(), namespace["transform"]
    assert tower.num_classes == (16 if head == "projection" else 0)
    data = timm.data.resolve_data_config(model=tower)
    assert (
        tuple(data["input_size"]) == (3, 32, 32) and data["crop_mode"] == "squash" and data["crop_pct"] == 1.0
    )
    photos = _photos()
    with torch.no_grad():
        theirs = tower(torch.stack([transform(p) for p in photos]))
    ours = retclip_dist.load(model_dir, device="cpu").embed_images(
        photos, head="projected" if head == "projection" else "tower"
    )
    torch.testing.assert_close(theirs, ours, **TOL)
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\nlicense: other\nlibrary_name: timm\n") and "## Architecture" in readme
    # Readable by others as the umask allows (mkdtemp's folder is 0700, safetensors' files 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / TIMM_WEIGHTS).stat().st_mode & 0o777 == 0o666 & ~umask


def _retfound_load(model: torch.nn.Module, checkpoint: dict[str, torch.Tensor]):
    """RETFound's main_finetune.py steps on checkpoint["model"]: drop a head of another shape, resample the
    position embeddings' grid (bicubic, class token kept) to the model's, load the rest non-strictly."""
    own = model.state_dict()
    for key in ("head.weight", "head.bias"):
        if key in checkpoint and checkpoint[key].shape != own[key].shape:
            del checkpoint[key]
    pos = checkpoint["pos_embed"]
    extra = model.pos_embed.shape[-2] - model.patch_embed.num_patches
    old, new = int((pos.shape[-2] - extra) ** 0.5), int(model.patch_embed.num_patches**0.5)
    if old != new:
        grid = pos[:, extra:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
        checkpoint["pos_embed"] = torch.cat([pos[:, :extra], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    return model.load_state_dict(checkpoint, strict=False)


def test_retfound_finetuning_loads_the_checkpoint_unchanged(model_dir, tmp_path):
    out = tmp_path / "timm"
    assert _export(model_dir, "timm", out, "--head", "projection") == EXIT_OK
    cfg = json.loads((out / TIMM_CONFIG).read_text())
    arch, args = cfg["architecture"], cfg["model_args"]

    def checkpoint() -> dict[str, torch.Tensor]:
        return dict(torch.load(out / RETFOUND_CHECKPOINT, map_location="cpu", weights_only=True)["model"])

    # RETFound's default: global average pooling (a new fc_norm) and a new head, at another input size.
    pooled = timm.create_model(arch, num_classes=5, global_pool="avg", **{**args, "img_size": 48})
    result = _retfound_load(pooled, checkpoint())
    assert set(result.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert pooled.pos_embed.shape == (1, 1 + 36, 32)
    torch.testing.assert_close(pooled.cls_token, checkpoint()["cls_token"])
    # --cls_token: the pooling the tower was trained with; then only the head is new and the features are ours.
    token = timm.create_model(arch, num_classes=5, global_pool="token", **args).eval()
    assert set(_retfound_load(token, checkpoint()).missing_keys) == {"head.weight", "head.bias"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = token.forward_head(token.forward_features(x), pre_logits=True)
        torch.testing.assert_close(features, RetClip.from_pretrained(model_dir).embed_eye(x), **TOL)


def test_an_export_that_differs_from_the_model_is_not_published(model_dir, tmp_path, monkeypatch, capsys):
    real = timm_format.timm_state_dict

    def off_by_a_little(model, head):
        state = real(model, head)
        state["blocks.1.mlp.fc2.bias"][0] += 1e-3  # one channel: LayerNorm would undo a shift of all
        return state

    monkeypatch.setattr(timm_format, "timm_state_dict", off_by_a_little)
    assert _export(model_dir, "timm", tmp_path / "timm") == EXIT_FAILED
    err = capsys.readouterr().err.strip()
    assert err.startswith("retclip-eval export: timm: the export's features differ") and "\n" not in err
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary twin


def test_bad_usage_is_one_line_and_exit_2(model_dir, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    cases = [
        (["--format", "timm", "--output_dir", str(taken)], "already exists"),
        (
            ["--format", "timm", "--output_dir", str(tmp_path / "a"), "--eye", "left"],
            "--eye apply to --format open_clip",
        ),
        (
            ["--format", "open_clip", "--output_dir", str(tmp_path / "b"), "--head", "projection"],
            "--head applies",
        ),
    ]
    for flags, message in cases:
        assert main(["export", "--model", str(model_dir), *flags]) == EXIT_CONFIG
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert (
        main(
            [
                "export",
                "--model",
                str(tmp_path / "none"),
                "--format",
                "timm",
                "--output_dir",
                str(tmp_path / "c"),
            ]
        )
        == EXIT_CONFIG
    )
    assert "has no config.json" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


# One interpreter with open_clip and the export folders only, loading them as the READMEs say: the shipped
# retclip_open_clip.py must be all a user needs besides open_clip (retclip_dist is never imported).
_OPEN_CLIP_USER = """
import json, sys
import torch
from PIL import Image
jobs, photos, texts, result = json.loads(sys.argv[1]), sys.argv[2:-2], json.loads(sys.argv[-2]), sys.argv[-1]
import open_clip
out = {}
for folder, route in jobs:
    sys.path.insert(0, folder)
    import retclip_open_clip
    if route == "name":  # open_clip's own model registry, weights by file
        open_clip.add_model_config(folder)
        name = "retclip-" + folder.rsplit("/", 1)[-1]  # export/<eye>/retclip-<eye>.json
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=folder + "/open_clip_model.safetensors", image_resize_mode="squash")
    elif route == "moved":  # the folder no longer where it was exported
        model, _, preprocess = retclip_open_clip.create_model_and_transforms(folder)
    else:
        model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
    tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
    model.eval()
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in photos]), normalize=True)
        text = model.encode_text(tokenizer(texts), normalize=True)
        classifier = open_clip.build_zero_shot_classifier(
            model, tokenizer, ["no diabetic retinopathy", "severe diabetic retinopathy"], ["{}.", "impression: {}."])
        probs = (model.logit_scale.exp() * image @ classifier).softmax(dim=-1)
    out[route] = {"image": image, "text": text, "probs": probs}
assert "retclip_dist" not in sys.modules
torch.save(out, result)
"""


def _as_open_clip_user(jobs: list[tuple[Path, str]], photos: list[Path], out: Path) -> dict[str, dict]:
    jobs_json = json.dumps([[str(folder), route] for folder, route in jobs])
    cmd = [sys.executable, "-c", _OPEN_CLIP_USER, jobs_json, *map(str, photos), json.dumps(TEXTS), str(out)]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=out.parent, env=dict(os.environ)
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=True)


def _expected(model_dir: Path, photos: list[Path], eye: str) -> dict[str, torch.Tensor]:
    ours = retclip_dist.load(model_dir, device="cpu")
    prompts = {
        c: [f"{c}.", f"impression: {c}."] for c in ("no diabetic retinopathy", "severe diabetic retinopathy")
    }
    return {
        "image": ours.embed_images(photos, head=eye),
        "text": ours.embed_texts(TEXTS, level=eye),
        "probs": ours.zero_shot(photos, prompts, eyes=eye),
    }


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("photos")
    paths = [root / f"photo{i}.png" for i in range(3)]
    for photo, path in zip(_photos(), paths, strict=True):
        photo.save(path)
    return paths


@pytest.mark.slow
def test_open_clip_export_gives_each_eye_levels_features_through_open_clip(model_dir, photo_files, tmp_path):
    out = tmp_path / "open_clip"
    assert _export(model_dir, "open_clip", out, "--context_length", "32") == EXIT_OK
    assert sorted(p.name for p in out.iterdir()) == ["left", "right"]
    config = json.loads((out / "right" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["context_length"] == 32
    # The left export moves away (its config names the old place): the shipped helper still loads it.
    shutil.copytree(out / "left", tmp_path / "moved" / "left")
    shutil.rmtree(out / "left")
    jobs = [(out / "right", "local-dir"), (out / "right", "name"), (tmp_path / "moved" / "left", "moved")]
    got = _as_open_clip_user(jobs, photo_files, tmp_path / "got.pt")
    for route, eye in (("local-dir", "right"), ("name", "right"), ("moved", "left")):
        for key, value in _expected(model_dir, photo_files, eye).items():
            torch.testing.assert_close(got[route][key], value, **TOL, msg=f"{route} {key}")
    readme = (out / "right" / "README.md").read_text()
    assert readme.startswith("---\nlicense: other\nlibrary_name: open_clip\n")
    assert "import retclip_open_clip" in readme and "open_clip.add_model_config" in readme


# What the docs' open_clip block leaves (model, preprocess, tokenizer) applied to photos and texts, saved.
_AFTER_DOCS_BLOCK = """
import json, torch
from PIL import Image
photos, texts, result = sys.argv[1:-2], json.loads(sys.argv[-2]), sys.argv[-1]
model.eval()
with torch.no_grad():
    image = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in photos]), normalize=True)
    text = model.encode_text(tokenizer(texts), normalize=True)
torch.save({"image": image, "text": text}, result)
"""


@pytest.mark.slow
def test_docs_open_clip_block_runs_as_written(model_dir, photo_files, tmp_path):
    """The open_clip block of docs/evaluation.md, unchanged, on export/open_clip under the working directory:
    the left eye level's features."""
    assert _export(model_dir, "open_clip", tmp_path / "export" / "open_clip") == EXIT_OK
    code = _readme_block(EXPORT_HEADING, 1) + _AFTER_DOCS_BLOCK
    assert "local-dir:export/open_clip/left" in code
    out = tmp_path / "got.pt"
    cmd = [sys.executable, "-c", code, *map(str, photo_files), json.dumps(TEXTS), str(out)]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=dict(os.environ)
    )
    assert done.returncode == 0, done.stderr[-4000:]
    got = torch.load(out, weights_only=True)
    expected = _expected(model_dir, photo_files, "left")
    for key in ("image", "text"):
        torch.testing.assert_close(got[key], expected[key], **TOL, msg=key)


@pytest.mark.slow
def test_a_tower_named_by_architecture_alone_exports_as_that_name(tmp_path, capsys):
    """Without vision_kwargs open_clip builds the tower by its timm name (no local-dir folder); the export's
    own check runs it through open_clip before publishing, here with the sigmoid loss's bias too."""
    cfg = tiny_model_config(TINY_VOCAB)
    cfg.vision_name, cfg.vision_kwargs, cfg.loss = "vit_tiny_patch16_224", {}, "sigmoid"
    torch.manual_seed(0)
    model_dir = RetClip(cfg).save_pretrained(tmp_path / "model")
    assert _export(model_dir, "open_clip", tmp_path / "open_clip", "--eye", "left") == EXIT_OK
    config = json.loads((tmp_path / "open_clip/left/open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["timm_model_name"] == "vit_tiny_patch16_224"
    assert config["model_cfg"]["init_logit_bias"] == pytest.approx(-10.0)
    assert not (tmp_path / "open_clip/left/vision").exists()
    report = json.loads(capsys.readouterr().out)
    assert set(report["left"]["max_abs_diff"]) == {"image", "text", "logit_scale", "logit_bias"}


@pytest.mark.slow
def test_the_paper_tower_loads_with_the_overlay_the_issue_names(tmp_path, photo_files):
    """OpenAI CLIP's ViT-B/16 (QuickGELU, pre-norm) with the projection head: timm's own CLIP head is 512
    wide, so the overlay needs only the file."""
    cfg = tiny_model_config(TINY_VOCAB, embed_dim=512)
    cfg.vision_name, cfg.vision_kwargs = "vit_base_patch16_clip_quickgelu_224", {}
    torch.manual_seed(0)
    model = RetClip(cfg).eval()
    model.save_pretrained(tmp_path / "model")
    assert _export(tmp_path / "model", "timm", tmp_path / "timm", "--head", "projection") == EXIT_OK
    tower = timm.create_model(
        "vit_base_patch16_clip_quickgelu_224",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(tmp_path / "timm" / TIMM_WEIGHTS)},
    ).eval()
    x = Pretrained(model).preprocess(photo_files[:2])
    with torch.no_grad():
        torch.testing.assert_close(tower(x), model.project_eye(x), **TOL)
