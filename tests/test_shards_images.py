import io
import zlib

import numpy as np
import pytest
from PIL import Image

from retclip_dist.shards.images import ImageOptions, process_image, target_size, to_rgb
from retclip_dist.shards.records import RejectError

OPTS = ImageOptions(size=256, min_side=64, max_pixels=4_000_000)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def reason(data: bytes, opts: ImageOptions = OPTS) -> str:
    with pytest.raises(RejectError) as info:
        process_image(data, opts)
    return info.value.reason


def test_target_size_square_shorter_and_never_upscale():
    sq = ImageOptions(size=512)
    sh = ImageOptions(size=512, resize="shorter")
    assert target_size(2000, 1500, sq) == (512, 512)
    assert target_size(400, 300, sq) == (300, 300)
    assert target_size(2000, 1000, sh) == (1024, 512)
    assert target_size(1000, 2000, sh) == (512, 1024)
    assert target_size(400, 300, sh) == (400, 300)


def test_jpeg_is_squashed_to_square_rgb_and_reports_orig_size():
    src = Image.new("RGB", (1000, 600), (200, 80, 40))
    out, orig = process_image(encode(src, "JPEG"), OPTS)
    img = decode(out)
    assert orig == (1000, 600)
    assert img.format == "JPEG" and img.mode == "RGB" and img.size == (256, 256)
    assert np.abs(np.asarray(img, dtype=int).mean(axis=(0, 1)) - [200, 80, 40]).max() <= 2


def test_shorter_mode_keeps_aspect_and_small_images_are_not_upscaled():
    src = encode(Image.new("RGB", (800, 400), (10, 120, 30)), "PNG")
    out, _ = process_image(src, ImageOptions(size=256, resize="shorter", min_side=64))
    assert decode(out).size == (512, 256)
    out, _ = process_image(encode(Image.new("RGB", (100, 90)), "PNG"), OPTS)
    assert decode(out).size == (90, 90)


def test_jpeg_uses_dct_draft_decoding():
    # An 8x8 checkerboard of 1-pixel cells averages to grey under DCT 1/8 scaling, while a full decode +
    # bicubic resize of the same image keeps some texture; a draft-decoded result is almost flat.
    board = (np.indices((1024, 1024)).sum(axis=0) % 2 * 255).astype(np.uint8)
    src = encode(Image.fromarray(board, "L").convert("RGB"), "JPEG", quality=100)
    img = Image.open(io.BytesIO(src))
    img.draft("RGB", (128, 128))
    assert img.size == (128, 128)  # 1/8 scale available for this request
    out, orig = process_image(src, ImageOptions(size=128, min_side=64))
    assert orig == (1024, 1024)
    assert np.asarray(decode(out), dtype=float).std() < 3


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 77, (77, 77, 77)),
        ("LA", (200, 255), (200, 200, 200)),
        ("RGBA", (10, 200, 30, 255), (10, 200, 30)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("1", 1, (255, 255, 255)),
    ],
)
def test_modes_are_converted_not_rejected(mode, value, expected):
    img = Image.new(mode, (96, 96), value)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    out, _ = process_image(encode(img, fmt), OPTS)
    got = np.asarray(decode(out), dtype=int).mean(axis=(0, 1))
    assert np.abs(got - expected).max() <= 3, (mode, got)


def test_transparent_pixels_become_black():
    img = Image.new("RGBA", (96, 96), (255, 255, 255, 0))
    assert to_rgb(img).getpixel((5, 5)) == (0, 0, 0)
    pal = Image.new("P", (96, 96), 1)
    pal.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    assert to_rgb(pal).getpixel((0, 0)) == (250, 10, 10)
    pal.info["transparency"] = 1
    assert to_rgb(pal).getpixel((0, 0)) == (0, 0, 0)


def test_sixteen_bit_png_is_scaled_not_clipped():
    ramp = np.tile(np.array([0, 257 * 64, 257 * 128, 65535], dtype=np.uint16).repeat(24), (96, 1))
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    out, _ = process_image(encode(img, "PNG"), ImageOptions(size=96, min_side=64, quality=100))
    row = np.asarray(decode(out), dtype=int)[48, :, 0]
    # Clipping would make everything above 255 white; scaling keeps 64 and 128 as mid greys.
    assert [row[12], row[36], row[60], row[84]] == pytest.approx([0, 64, 128, 255], abs=3)


def test_tiff_and_palette_png_are_accepted():
    rgb = Image.new("RGB", (128, 100), (30, 60, 90))
    out, orig = process_image(encode(rgb, "TIFF"), OPTS)
    assert orig == (128, 100) and decode(out).size == (100, 100)
    out, _ = process_image(encode(rgb.convert("P"), "PNG"), OPTS)
    assert decode(out).mode == "RGB"


def test_rejects_small_bomb_truncated_and_garbage():
    assert reason(encode(Image.new("RGB", (63, 500)), "PNG")) == "too_small"
    # 3000x3000 = 9 Mpx > 4 Mpx limit; only the header is needed to decide.
    bomb = encode(Image.new("L", (3000, 3000)), "PNG")
    assert reason(bomb) == "too_many_pixels"
    jpeg = encode(Image.effect_noise((300, 300), 64).convert("RGB"), "JPEG")
    assert reason(jpeg[: len(jpeg) // 2]) == "truncated"
    assert reason(b"definitely not an image") == "undecodable"
    assert reason(b"") == "undecodable"


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR (CRC fixed up) that claims a huge size but holds 1 pixel of data."""
    png = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    png[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")
    return bytes(png)


def test_bomb_header_is_refused_without_decoding():
    # 10000 x 10000 = 1e8 pixels: below PIL's own hard limit, so only our header check can refuse it.
    claim = _png_claiming(10000, 10000)
    assert reason(claim, ImageOptions(min_side=1, max_pixels=50_000_000)) == "too_many_pixels"
    # With a higher limit the same bytes reach the decoder, which then fails on the missing data.
    assert reason(claim, ImageOptions(min_side=1, max_pixels=200_000_000)) in {"undecodable", "truncated"}
    assert reason(_png_claiming(100000, 100000), ImageOptions(min_side=1)) == "too_many_pixels"


def test_output_is_deterministic():
    src = encode(Image.effect_noise((400, 300), 40).convert("RGB"), "JPEG")
    assert process_image(src, OPTS) == process_image(src, OPTS)
