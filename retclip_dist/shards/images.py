"""One eye image: bytes in, checked, converted to 8-bit RGB, optionally cropped to the fundus field,
resized (never up), JPEG bytes out.

The output JPEG is encoded from the pixels alone: no comment, EXIF, XMP, IPTC, ICC profile or any other
metadata of the source survives (Pillow would carry a JPEG comment through convert/resize/save), because
cameras and PACS exports write names and ids there and the model never reads them.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image

from retclip_dist.shards.crop import crop_to_field, find_fundus_field
from retclip_dist.shards.records import RejectError

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@dataclass(frozen=True)
class ImageOptions:
    """How each eye image is checked and re-encoded (make-shards flags: field name, or metadata "flag")."""

    size: int = field(
        default=512, metadata={"flag": "--image-size"}
    )  # target side in pixels (the paper: 512)
    resize: Literal["square", "shorter"] = "square"  # square: squash to size x size; shorter: keep aspect
    quality: int = field(default=95, metadata={"flag": "--jpeg-quality"})  # JPEG quality of the stored images
    min_side: int = 224  # reject images whose shorter side is below this (model input is 224)
    max_pixels: int = 50_000_000  # reject larger images from their header, before decoding (bombs)
    # fundus: crop to the circular field of view's bounding square, black outside the circle (removes
    # text burned into the corners); images without a field are rejected as no_fundus_field
    crop: Literal["none", "fundus"] = "none"


def target_size(width: int, height: int, opts: ImageOptions) -> tuple[int, int]:
    """Output size for an input size; never larger than the input in either dimension."""
    if opts.resize == "square":
        side = min(opts.size, width, height)
        return side, side
    scale = min(1.0, opts.size / min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit grey is rescaled (65535 -> 255) rather than clipped, alpha is laid on black."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:
        # "I" is how PIL may report 16-bit greyscale, so it is treated as 16-bit too.
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        # Fundus backgrounds are black, so transparent areas become black instead of stray colour.
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL warns about large images at open; the max_pixels check is the policy we apply.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise RejectError("too_many_pixels", str(exc)) from None
    except Exception as exc:
        # PIL's format plugins raise many exception types on hostile bytes; any of them means "not an image".
        raise RejectError("undecodable", f"{type(exc).__name__}: {exc}") from None


def _decode(img: Image.Image, draft: tuple[int, int]) -> Image.Image:
    """8-bit RGB pixels of ``img``; a JPEG is decoded at the smallest DCT scale still covering ``draft``."""
    if img.format == "JPEG":
        # DCT-domain downscaling: decode at 1/2, 1/4 or 1/8 scale when that still covers the target.
        img.draft("RGB", draft)
    try:
        img.load()
    except Exception as exc:
        reason = "truncated" if "truncat" in str(exc).lower() else "undecodable"
        raise RejectError(reason, f"{type(exc).__name__}: {exc}") from None
    return to_rgb(img)


def _crop_fundus(data: bytes, rgb: Image.Image, width: int, height: int, opts: ImageOptions) -> Image.Image:
    """The field of view's bounding square at min(--image-size, its side in the source) pixels."""
    field = find_fundus_field(rgb)
    if field is None:
        raise RejectError("no_fundus_field", f"{width}x{height}: no circular field of view found")
    scale = width / rgb.width  # > 1 where the JPEG was decoded at a reduced DCT scale
    side = min(opts.size, max(1, math.floor(2 * field.r * scale)))
    if 2 * field.r < side and scale > 1:
        # The field is smaller than the frame, so the reduced decode is too coarse: decode finer.
        need = side / (2 * field.r * scale)
        finer = _decode(_open(data), (math.ceil(width * need), math.ceil(height * need)))
        field, rgb = field.scaled(finer.width / rgb.width, finer.height / rgb.height), finer
    return crop_to_field(rgb, field, side)


def process_image(data: bytes, opts: ImageOptions) -> tuple[bytes, tuple[int, int]]:
    """JPEG bytes and the original (width, height), or RejectError with a reason from REJECT_REASONS."""
    img = _open(data)
    width, height = img.size
    if width * height > opts.max_pixels:
        raise RejectError("too_many_pixels", f"{width}x{height} is over {opts.max_pixels} pixels")
    if min(width, height) < opts.min_side:
        raise RejectError("too_small", f"{width}x{height}: shorter side under {opts.min_side}")
    size = target_size(width, height, opts)
    rgb = _decode(img, size)
    if opts.crop == "fundus":
        rgb = _crop_fundus(data, rgb, width, height, opts)
    elif rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    # A fresh image holds the pixels and nothing else, so save() finds no metadata to carry over.
    clean = Image.frombytes("RGB", rgb.size, rgb.tobytes())
    buf = io.BytesIO()
    clean.save(buf, "JPEG", quality=opts.quality)
    return buf.getvalue(), (width, height)
