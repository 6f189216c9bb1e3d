import base64
import csv
import io
import json
import re
import tarfile
import zipfile

import numpy as np
import pytest
from conftest import TINY_VOCAB
from PIL import Image

from retclip_dist import synth
from retclip_dist.model.vocab import SPECIAL_TOKENS, vocab_lines


def _region_mean(img: Image.Image, x0: float, x1: float) -> float:
    """Mean brightness of a vertical band (fractions of the width), middle third of the height."""
    arr = np.asarray(img.convert("L"), dtype=np.float64)
    h, w = arr.shape
    return float(arr[h // 3 : 2 * h // 3, int(x0 * w) : int(x1 * w)].mean())


def test_same_seed_same_patient_and_different_seed_differs():
    a, b, c = synth.make_patient(7, 128), synth.make_patient(7, 128), synth.make_patient(8, 128)
    assert a.report == b.report
    assert a.left.tobytes() == b.left.tobytes() and a.right.tobytes() == b.right.tobytes()
    assert a.left.tobytes() != c.left.tobytes()


def test_images_are_rgb_black_cornered_with_disc_on_nasal_side():
    p = synth.make_patient(3, 200)
    for img in (p.left, p.right):
        assert img.mode == "RGB" and img.size == (200, 200)
        assert img.getpixel((0, 0)) == (0, 0, 0)
        assert img.getpixel((199, 199)) == (0, 0, 0)
    # The bright yellow disc sits right of centre for a right eye and left of centre for a left eye.
    assert _region_mean(p.right, 0.68, 0.8) > _region_mean(p.right, 0.2, 0.32) + 20
    assert _region_mean(p.left, 0.2, 0.32) > _region_mean(p.left, 0.68, 0.8) + 20


def test_report_mentions_exactly_the_drawn_lesions():
    words = {
        "haemorrhages": "haemorrhage",
        "hard_exudates": "exudate",
        "drusen": "drusen",
        "cotton_wool_spots": "cotton wool",
    }
    seen = set()
    for seed in range(60):
        p = synth.make_patient(seed, 64)
        left_part, right_part = p.report.split(". right eye: ")
        for eye, text in (("left", left_part), ("right", right_part.split(". impression")[0])):
            for lesion, word in words.items():
                assert (word in text) == p.labels[eye][lesion], (seed, eye, lesion, p.report)
                seen.add((lesion, p.labels[eye][lesion]))
            assert (getattr(p, f"{eye}_report").split(".")[0]) == text.removeprefix("left eye: ")
        assert p.grade == max(synth.eye_grade(p.labels[e]) for e in ("left", "right"))
    assert len(seen) == 8  # every lesion appears both present and absent across 60 patients


def test_lesions_change_pixels_in_the_expected_direction():
    # Drawn haemorrhages darken the posterior pole: the same rng with and without them differs there.
    clean, _ = synth._draw_eye(np.random.default_rng(1), 160, dict.fromkeys(synth.LESIONS, False))
    flags = dict.fromkeys(synth.LESIONS, False) | {"haemorrhages": True}
    bleed, counts = synth._draw_eye(np.random.default_rng(1), 160, flags)
    assert counts["haemorrhages"] >= 4
    assert _region_mean(bleed, 0.15, 0.6) < _region_mean(clean, 0.15, 0.6) - 0.5


def test_vocabulary_covers_every_report_token():
    vocab = set(synth.vocabulary())
    assert vocab >= {"left", "right", "eye", "haemorrhages", "exudates", "drusen", "cotton", "wool", ".", ":"}
    assert all(w == w.lower() for w in vocab)
    for seed in range(40):
        p = synth.make_patient(seed, 32)
        for text in (p.report, p.left_report, p.right_report):
            assert set(re.findall(r"[a-z]+|[^\sa-z]", text)) <= vocab, text


def test_the_tiny_vocabulary_file_is_synths_vocabulary():
    # configs/tiny_vocab.txt is the one tiny vocabulary (configs/tiny.yaml, the tests' tokenizer): BERT's
    # special tokens, then every word a synthetic report can contain, so none of them is [UNK].
    assert vocab_lines(TINY_VOCAB) == [*SPECIAL_TOKENS, *synth.vocabulary()]


@pytest.mark.parametrize("layout", ["zip", "dir", "tar"])
def test_write_raw_archive_layouts(tmp_path, layout):
    manifest, root = synth.write_raw_archive(
        tmp_path, 3, seed=5, image_size=64, layout=layout, eye_reports=True
    )
    rows = list(csv.DictReader(manifest.open()))
    assert [r["patient_id"] for r in rows] == ["patient-000000", "patient-000001", "patient-000002"]
    assert set(rows[0]) == {
        "patient_id",
        "left_image",
        "right_image",
        "report",
        "left_report",
        "right_report",
    }
    expected = synth.make_patient(np.random.default_rng([5, 1]), 64)
    assert rows[1]["report"] == expected.report
    rel = rows[1]["left_image"]
    if layout == "zip":
        with zipfile.ZipFile(root) as zf:
            data = zf.read(rel)
    elif layout == "tar":
        with tarfile.open(root) as tf:
            data = tf.extractfile(rel).read()
    else:
        data = (root / rel).read_bytes()
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG" and img.size == (64, 64)


def test_write_retclip_dir_matches_release_layout(tmp_path):
    out = synth.write_retclip_dir(tmp_path, 2, seed=1, split="valid", image_size=48)
    lines = (out / "valid_imgs.tsv").read_text().splitlines()
    pid, _, right = lines[1].split("\t")
    assert pid == "patient-000001"
    assert Image.open(io.BytesIO(base64.b64decode(right))).size == (48, 48)
    texts = [json.loads(x) for x in (out / "valid_texts.jsonl").read_text().splitlines()]
    assert texts[1] == {
        "text_id": 1,
        "text": synth.make_patient(np.random.default_rng([1, 1]), 48).report,
        "image_ids": ["patient-000001"],
    }
