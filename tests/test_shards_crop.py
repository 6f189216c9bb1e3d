"""--crop fundus: the circular field is found (IoU >= 0.95 with the drawn one) in centred, off-centre,
cut-off and dark photos with text burned into the corners; after the crop nothing outside the circle is
non-black (so the text is gone); images without a field are rejected as no_fundus_field."""

import io
import json

import numpy as np
import pytest
from conftest import build_argv
from PIL import Image, ImageEnhance

from retclip_dist import synth
from retclip_dist.shards import cli
from retclip_dist.shards.crop import Circle, crop_to_field, find_fundus_field, outside_mask
from retclip_dist.shards.images import ImageOptions, process_image
from retclip_dist.shards.records import RejectError

CORNERS = {
    "tl": ["ZHANG WEI", "ID 00912345"],
    "tr": ["MRN77120934", "OD"],
    "bl": ["1957-03-04"],
    "br": ["2023-05-06", "10:42"],
}
EYE = synth.make_patient(3, 320).left
# name: (frame width, height, field centre, field radius, brightness)
GEOMETRY = {
    "centred": (600, 400, (300, 200), 180, 1.0),
    "off_centre": (640, 420, (250, 230), 170, 1.0),
    "cut_top_and_bottom": (660, 400, (330, 200), 225, 1.0),
    "dark": (600, 400, (300, 200), 180, 0.22),
    "large_cut": (1500, 1000, (760, 500), 560, 1.0),
}


def photo(name: str) -> tuple[Image.Image, Circle]:
    """A synthetic fundus photo with text burned into its corners, and the circle its field fills."""
    w, h, centre, radius, brightness = GEOMETRY[name]
    img = synth.burn_in(synth.field_photo(EYE, w, h, centre, radius), CORNERS, scale=2)
    side = round(radius / 0.46)
    # field_photo pastes the tile at centre - side // 2; the disc's centre is at side / 2 of the tile.
    truth = Circle(centre[0] - side // 2 + side / 2, centre[1] - side // 2 + side / 2, 0.46 * side)
    text = np.asarray(synth.burn_in(Image.new("RGB", img.size), CORNERS, scale=2)).max(axis=2) > 0
    assert outside_mask(img.size, Circle(truth.cx, truth.cy, truth.r + 3))[text].all(), "text must be outside"
    return ImageEnhance.Brightness(img).enhance(brightness), truth


def iou(a: Circle, b: Circle, size: tuple[int, int]) -> float:
    """Of the two discs, in a frame twice the image's size (fields cut off by the frame count whole)."""
    big = (2 * size[0], 2 * size[1])
    shift = (
        Circle(a.cx + size[0] / 2, a.cy + size[1] / 2, a.r),
        Circle(b.cx + size[0] / 2, b.cy + size[1] / 2, b.r),
    )
    x, y = (~outside_mask(big, c) for c in shift)
    return (x & y).sum() / (x | y).sum()


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(GEOMETRY))
def test_field_is_found_and_everything_outside_it_is_black(name):
    img, truth = photo(name)
    assert np.asarray(img)[~outside_mask(img.size, truth)].max() > 0  # there is something to keep
    found = find_fundus_field(img)
    assert found is not None
    assert iou(found, truth, img.size) >= 0.95
    side = 256
    out = crop_to_field(img, found, side)
    assert out.size == (side, side)
    pixels = np.asarray(out)
    outside = outside_mask(out.size, Circle(side / 2, side / 2, side / 2))
    assert pixels[outside].max() == 0  # burned-in text and anything else outside is black, exactly
    # The retina is kept and aligned: inside the circle (away from its edge) the crop matches the source's
    # true bounding square resampled to the same size.
    pad = round(truth.r)  # the true square may stick out of the frame: resample from a padded copy
    padded = img.crop((-pad, -pad, img.width + pad, img.height + pad))
    box = (
        truth.cx - truth.r + pad,
        truth.cy - truth.r + pad,
        truth.cx + truth.r + pad,
        truth.cy + truth.r + pad,
    )
    reference = np.asarray(padded.resize((side, side), Image.Resampling.BICUBIC, box=box), dtype=float)
    core = ~outside_mask(out.size, Circle(side / 2, side / 2, side / 2 - 4))
    assert np.abs(pixels[core].astype(float) - reference[core]).mean() < 4


@pytest.mark.parametrize("name", ["centred", "cut_top_and_bottom", "dark"])
def test_cropped_jpeg_has_no_text_in_the_corners(name):
    img, _ = photo(name)
    out, orig = process_image(encode(img), ImageOptions(size=224, min_side=64, crop="fundus"))
    assert orig == img.size
    decoded = np.asarray(Image.open(io.BytesIO(out)).convert("L"), dtype=int)
    assert decoded.shape == (224, 224)
    # JPEG rings a few levels next to the circle's edge; the text (255) would stand far above that.
    ring = outside_mask((224, 224), Circle(112, 112, 112 + 3))
    assert decoded[ring].max() <= 12
    for corner in (decoded[:24, :24], decoded[:24, -24:], decoded[-24:, :24], decoded[-24:, -24:]):
        assert corner.max() <= 12


def test_a_field_smaller_than_the_frame_is_decoded_finely_enough():
    # 2400 x 1600 with a field 1000 px across: the JPEG draft for a 512 target decodes at 1/2, where the
    # field is 500 px; the crop decodes again at full scale and keeps 512 px.
    big = synth.field_photo(EYE, 2400, 1600, (1200, 800), 500)
    out, _ = process_image(encode(big), ImageOptions(size=512, min_side=64, crop="fundus"))
    assert Image.open(io.BytesIO(out)).size == (512, 512)
    out, _ = process_image(encode(big), ImageOptions(size=2048, min_side=64, crop="fundus"))
    width, height = Image.open(io.BytesIO(out)).size
    assert width == height and abs(width - 2 * 0.46 * round(500 / 0.46)) <= 3  # the field, never upscaled


def _page() -> Image.Image:
    return synth.burn_in(Image.new("RGB", (500, 350), (245, 245, 240)), CORNERS, scale=3)


def _rectangle() -> Image.Image:
    img = Image.new("RGB", (500, 350))
    img.paste((200, 90, 40), (80, 40, 420, 310))
    return img


NOT_FUNDUS = {
    "noise": lambda: Image.effect_noise((500, 350), 60).convert("RGB"),
    "document": _page,
    "rectangle_on_black": _rectangle,
    "black_frame_with_text": lambda: synth.burn_in(Image.new("RGB", (500, 350)), CORNERS, scale=3),
    "all_black": lambda: Image.new("RGB", (500, 350)),
}


@pytest.mark.parametrize("name", sorted(NOT_FUNDUS))
def test_images_without_a_field_are_rejected(name):
    img = NOT_FUNDUS[name]()
    assert find_fundus_field(img) is None
    with pytest.raises(RejectError) as info:
        process_image(encode(img, "PNG"), ImageOptions(size=128, min_side=64, crop="fundus"))
    assert info.value.reason == "no_fundus_field"
    # Without --crop the same image is kept: the crop is what rejects it.
    process_image(encode(img, "PNG"), ImageOptions(size=128, min_side=64))


def test_build_counts_no_fundus_field_rejects(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    good, _ = photo("off_centre")
    good.save(images / "a_left.jpg")
    good.save(images / "a_right.jpg")
    good.save(images / "b_left.jpg")
    _page().save(images / "b_right.png")
    manifest = tmp_path / "patients.csv"
    manifest.write_text(
        "patient_id,left_image,right_image,report\n"
        "a,a_left.jpg,a_right.jpg,no abnormality\n"
        "b,b_left.jpg,b_right.png,no abnormality\n"
    )
    out = tmp_path / "out"
    argv = build_argv(manifest, images, out, "--image-size", "96", "--min-side", "64", "--no-progress")
    assert cli.main([*argv, "--crop", "fundus"]) == 0
    assert "rejected: no_fundus_field         1" in capsys.readouterr().out
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rejects] == [("b", "no_fundus_field")]
    manifest_json = json.loads((out / "manifest.json").read_text())
    assert manifest_json["rejected"]["no_fundus_field"] == 1
    assert manifest_json["options"]["image"]["crop"] == "fundus"


def test_crop_is_deterministic():
    img, _ = photo("off_centre")
    data = encode(img)
    opts = ImageOptions(size=200, min_side=64, crop="fundus")
    assert process_image(data, opts) == process_image(data, opts)
