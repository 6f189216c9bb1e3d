"""retclip_dist.load: the notebook API gives retclip-eval's numbers, from paths or PIL images, and the docs'
example (docs/evaluation.md) runs as written."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_VOCAB, tiny_model_config
from PIL import Image
from safetensors import safe_open

import retclip_dist
from retclip_dist.eval.commands import run_features
from retclip_dist.eval.config import DataConfig, EvalConfig
from retclip_dist.model.retclip import RetClip
from retclip_dist.synth import write_labelled_set

PROMPTS = str(ROOT / "configs/prompts_synth.yaml")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny model at 64 px and 6 synthetic patients (12 eye photos with laterality)."""
    root = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    RetClip(tiny_model_config(TINY_VOCAB, image_size=64)).save_pretrained(root / "model")
    table = write_labelled_set(root / "data", n_patients=6, seed=1, image_size=80)
    return root, table


def _features(setup, head: str) -> dict[str, np.ndarray]:
    root, table = setup
    cfg = EvalConfig(
        model=str(root / "model"),
        output_dir=str(root / f"features-{head}"),
        data=DataConfig(table=str(table), images=str(root / "data/images"), label_column="grade"),
    )
    cfg.features.head = head
    cfg.zero_shot.prompts = PROMPTS
    with safe_open(run_features(cfg)["path"], "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _photos(setup) -> tuple[list[Path], list[str]]:
    root, _ = setup
    paths = sorted((root / "data/images").glob("*.jpg"))
    return paths, ["left" if p.stem.endswith("left") else "right" for p in paths]


def test_images_and_zero_shot_equal_retclip_eval(setup):
    model = retclip_dist.load(setup[0] / "model", device="cpu")
    paths, eyes = _photos(setup)  # p00000_left, p00000_right, ...: the table's row order
    projected = _features(setup, "projected")
    lateral = _features(setup, "laterality")

    np.testing.assert_allclose(model.embed_images(paths).numpy(), projected["image_features"], atol=1e-6)
    # PIL images, already open, give the same rows as their paths.
    pil = [Image.open(p) for p in paths]
    np.testing.assert_allclose(model.embed_images(pil).numpy(), projected["image_features"], atol=1e-6)
    by_eye = model.embed_images(paths, head=eyes).numpy()
    np.testing.assert_allclose(by_eye, lateral["image_features"], atol=1e-6)

    # Zero-shot: each photo's eye level, that level's scale, the prompt file's classes in its order.
    probs = model.zero_shot(paths, PROMPTS, eyes=eyes).numpy()
    for i, eye in enumerate(eyes):
        scale = float(model.model.logit_scale[eye].detach().exp())
        logits = scale * by_eye[i] @ lateral[f"class_features_{eye}"].T
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose(probs[i], expected, atol=1e-5)
    assert probs.shape == (12, 4)
    # "patient": every photo as both eyes through the patient level, with its scale and text head.
    as_patient = model.zero_shot(paths[:2], PROMPTS, eyes="patient").numpy()
    scale = float(model.model.logit_scale["patient"].detach().exp())
    logits = (
        scale * model.embed_images(paths[:2], head="patient").numpy() @ lateral["class_features_patient"].T
    )
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(as_patient, expected, atol=1e-5)


def test_preprocessing_is_the_models_own(setup, tmp_path):
    model = retclip_dist.load(setup[0] / "model", device="cpu")
    rng = np.random.default_rng(0)
    # A wide RGBA photo: converted to RGB and squashed to 64 x 64 bicubic, then normalised with CLIP's stats.
    photo = Image.fromarray(rng.integers(0, 256, (60, 90, 4), dtype=np.uint8), "RGBA")
    rgb = np.asarray(photo.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC), dtype=np.float32)
    mean, std = np.array(model.image_input.mean), np.array(model.image_input.std)
    expected = ((rgb / 255.0 - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(model.preprocess(photo)[0].numpy(), expected, atol=1e-5)
    path = tmp_path / "wide.png"
    photo.save(path)
    with torch.no_grad():
        tower = model.model.embed_eye(torch.from_numpy(expected[None]).float())
    np.testing.assert_allclose(model.embed_images(str(path), head="tower").numpy(), tower.numpy(), atol=1e-5)


def test_patient_and_reports(setup):
    model = retclip_dist.load(setup[0] / "model", device="cpu")
    paths, _ = _photos(setup)
    lefts, rights = paths[0::2], paths[1::2]
    patient = model.embed_patient(lefts, rights)
    with torch.no_grad():
        expected = model.model.encode_image(model.preprocess(lefts), model.preprocess(rights)).patient
    np.testing.assert_allclose(patient.numpy(), expected.numpy(), atol=1e-6)
    assert patient.shape == (6, 16)
    # Which photo is the left eye matters: the swapped pair is another patient feature.
    assert not torch.allclose(model.embed_patient(rights, lefts), patient, atol=1e-3)

    report = "Moderate non-proliferative diabetic retinopathy. “Scattered” hard exudates."
    cleaned = report.lower().replace("“", '"').replace("”", '"')
    tokens = model.tokenizer([cleaned], padding=True, return_tensors="pt")
    with torch.no_grad():
        levels = model.model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    for level in ("patient", "left", "right"):
        got = model.embed_texts(report, level=level)
        np.testing.assert_allclose(got.numpy(), getattr(levels, level).numpy(), atol=1e-6)
    assert not torch.allclose(model.embed_texts(report, level="left"), model.embed_texts(report), atol=1e-3)
    assert torch.allclose(model.embed_texts([report, report])[1], model.embed_texts(cleaned)[0], atol=1e-6)


def test_bad_input_is_one_clear_error(setup, tmp_path):
    model = retclip_dist.load(setup[0] / "model", device="cpu")
    paths, _ = _photos(setup)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg: not a readable image"):
        model.embed_images([paths[0], broken])
    with pytest.raises(ValueError, match=r"missing\.jpg: not a readable image"):
        model.embed_images(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="2 left photos but 1 right"):
        model.embed_patient(paths[:2], paths[2])
    with pytest.raises(ValueError, match="eyes"):
        model.zero_shot(paths[:2], {"a": "x", "b": "y"}, eyes=["left"])
    with pytest.raises(ValueError, match="head"):
        model.embed_images(paths[:2], head="laterality")


def _readme_example() -> str:
    text = (ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8")
    section = text.split("### In Python: `retclip_dist.load`", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_as_written(setup, tmp_path):
    """The docs' Python block, unchanged, in a folder laid out as it assumes."""
    root, _ = setup
    shutil.copytree(root / "model", tmp_path / "runs/retclip_vitb16/model")
    (tmp_path / "photos").mkdir()
    for eye in ("left", "right"):
        shutil.copy(root / f"data/images/p00000_{eye}.jpg", tmp_path / f"photos/p001_{eye}.jpg")
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(_readme_example(), "docs/evaluation.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert namespace["features"].shape == (2, 16)
    assert namespace["by_eye"].shape == (2, 16)
    assert namespace["patient"].shape == (1, 16)
    assert namespace["report"].shape == (1, 16)
    torch.testing.assert_close(namespace["probs"].sum(dim=1), torch.ones(2))
