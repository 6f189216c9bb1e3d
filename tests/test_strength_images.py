"""The decompression-bomb limit at its boundary: exactly ``max_pixels`` is kept, one pixel more is not."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from retclip_dist.shards.images import ImageOptions, process_image
from retclip_dist.shards.records import RejectError


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 30, 10)).save(buf, "PNG")
    return buf.getvalue()


def test_max_pixels_keeps_exactly_the_limit_and_rejects_one_over():
    photo = _png(64, 80)  # 5120 pixels
    _, size = process_image(photo, ImageOptions(size=64, min_side=64, max_pixels=5120))
    assert size == (64, 80)
    with pytest.raises(RejectError) as info:
        process_image(photo, ImageOptions(size=64, min_side=64, max_pixels=5119))
    assert info.value.reason == "too_many_pixels"
    assert "64x80" in str(info.value)


def test_min_side_keeps_exactly_the_minimum_and_rejects_one_under():
    photo = _png(64, 80)
    _, size = process_image(photo, ImageOptions(size=64, min_side=64, max_pixels=10_000))
    assert size == (64, 80)
    with pytest.raises(RejectError) as info:
        process_image(photo, ImageOptions(size=64, min_side=65, max_pixels=10_000))
    assert info.value.reason == "too_small"
