"""Every output image is written from its pixels alone: source photos (JPEG, PNG, TIFF) carrying the
manifest's id and the patient's name in each kind of metadata give shards without a byte of either."""

import csv
import io
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin, TiffImagePlugin

from retclip_dist import synth
from retclip_dist.shards import cli
from retclip_dist.shards.audit import Identifiers, audit
from retclip_dist.shards.images import ImageOptions, process_image

PID = "HOSP-0091427-ZW"
NAME = "Zhang Wei Tongren"
KEY = b"0123456789abcdef0123456789abcdef"
# Markers Pillow writes for a plain baseline JPEG: SOI, APP0 (JFIF), DQT, SOF0, DHT, SOS, EOI.
PLAIN_MARKERS = {0xD8, 0xE0, 0xDB, 0xC0, 0xC4, 0xDA, 0xD9}


def _icc(text: str) -> bytes:
    """An ICC-shaped blob whose 'desc' tag holds ``text`` (cameras name the profile, PACS the patient)."""
    desc = b"desc\0\0\0\0" + (len(text) + 1).to_bytes(4, "big") + text.encode() + b"\0"
    body = (1).to_bytes(4, "big") + b"desc" + (132 + 12).to_bytes(4, "big") + len(desc).to_bytes(4, "big")
    header = (128 + len(body) + len(desc)).to_bytes(4, "big") + b"\0" * 32 + b"acsp" + b"\0" * 88
    return header + body + desc


def _photo() -> Image.Image:
    return synth.make_patient(5, 96).left


def jpeg_source(text: str) -> bytes:
    """COM, EXIF (description, artist, UTF-16 XP comment), XMP, IPTC, ICC and bytes after the end."""
    buf = io.BytesIO()
    _photo().save(buf, "JPEG", quality=90, icc_profile=_icc(text))
    return synth.with_metadata(buf.getvalue(), text) + b"trailer: " + text.encode()


def png_source(text: str) -> bytes:
    """tEXt, zTXt, iTXt (UTF-8), eXIf and iCCP chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", text)
    info.add_text("Author", text, zip=True)
    info.add_itxt("Description", text + " 张伟", lang="zh")
    exif = Image.Exif()
    exif[0x010E] = text
    buf = io.BytesIO()
    _photo().save(buf, "PNG", pnginfo=info, exif=exif.tobytes(), icc_profile=_icc(text))
    return buf.getvalue()


def tiff_source(text: str) -> bytes:
    """ImageDescription, Artist, DocumentName, PageName, Copyright, XMP, IPTC, ICC and a private tag."""
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    for tag in (270, 315, 269, 285, 33432):
        ifd[tag] = text
    ifd[700] = f"<x:xmpmeta><dc:creator>{text}</dc:creator></x:xmpmeta>".encode()
    ifd[33723] = b"\x1c\x02\x05" + len(text).to_bytes(2, "big") + text.encode()
    ifd[65000] = text
    buf = io.BytesIO()
    _photo().save(buf, "TIFF", tiffinfo=ifd, icc_profile=_icc(text))
    return buf.getvalue()


SOURCES = {"jpeg": jpeg_source, "png": png_source, "tiff": tiff_source}


def _forms(text: str) -> list[bytes]:
    return [
        f(text).encode(e) for f in (str, str.upper, str.lower) for e in ("utf-8", "utf-16-le", "utf-16-be")
    ]


def _markers(jpeg: bytes) -> set[int]:
    found, i = set(), 0
    while i + 1 < len(jpeg):
        if jpeg[i] == 0xFF and jpeg[i + 1] not in (0x00, 0xFF) and not 0xD0 <= jpeg[i + 1] <= 0xD7:
            found.add(jpeg[i + 1])
            if jpeg[i + 1] == 0xDA:  # scan data follows; markers inside are stuffed (FF00) or RSTn
                i += 2
                continue
            if jpeg[i + 1] not in (0xD8, 0xD9):
                i += int.from_bytes(jpeg[i + 2 : i + 4], "big")
        i += 1
    return found


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_sources_carry_the_text_and_outputs_do_not(kind):
    data = SOURCES[kind](PID)
    # The fixture is what it claims: the id is in the source, plainly or compressed (zTXt, iCCP).
    assert PID.encode() in data
    if kind == "png":
        assert _in_png_compressed(data, PID)
    if kind == "jpeg":
        assert PID.encode("utf-16-le") in data  # the XP comment
    out, _ = process_image(data, ImageOptions(size=64, min_side=48))
    assert not any(form in out for form in _forms(PID))
    assert _markers(out) <= PLAIN_MARKERS  # no APPn but JFIF, no COM
    assert np.asarray(Image.open(io.BytesIO(out))).std() > 5  # the pixels are there


def _in_png_compressed(data: bytes, text: str) -> bool:
    """Whether ``text`` is in a zlib-compressed PNG chunk (zTXt, iCCP) of ``data``."""
    i, found = 8, False
    while i + 8 <= len(data):
        length, kind = int.from_bytes(data[i : i + 4], "big"), data[i + 4 : i + 8]
        body = data[i + 8 : i + 8 + length]
        if kind in (b"zTXt", b"iCCP"):
            found |= text.encode() in zlib.decompress(body[body.index(b"\0") + 2 :])
        i += 12 + length
    return found


def test_jpeg_comment_is_not_carried_through(tmp_path):
    # The reproduction of the issue: Pillow carries info["comment"] through convert/resize/save.
    buf = io.BytesIO()
    _photo().save(buf, "JPEG", comment=f"Patient ID {PID}".encode())
    assert Image.open(io.BytesIO(buf.getvalue())).info["comment"] == f"Patient ID {PID}".encode()
    out, _ = process_image(buf.getvalue(), ImageOptions(size=64, min_side=48))
    assert PID.encode() not in out and "comment" not in Image.open(io.BytesIO(out)).info


@pytest.mark.parametrize("pseudonymise", [True, False])
def test_no_shard_byte_carries_metadata_identifiers(tmp_path, pseudonymise):
    images = tmp_path / "images"
    images.mkdir()
    manifest = tmp_path / "patients.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient_id", "left_image", "right_image", "report", "name"])
        for i, kind in enumerate(sorted(SOURCES)):
            pid = f"{PID}-{i}"
            for eye in ("left", "right"):
                (images / f"{i}_{eye}.{kind}").write_bytes(SOURCES[kind](f"{pid} {NAME}"))
            writer.writerow([pid, f"{i}_left.{kind}", f"{i}_right.{kind}", "no abnormality", NAME])
    (tmp_path / "key").write_bytes(KEY)
    out = tmp_path / "out"
    argv = ["build", "--manifest", str(manifest), "--images", str(images), "--output_dir", str(out)]
    argv += ["--image-size", "64", "--min-side", "48", "--no-progress"]
    argv += ["--pseudonymise", str(tmp_path / "key"), "--identifier-columns", "name"] if pseudonymise else []
    assert cli.main(argv) == 0
    shard = (out / "train-000000.tar").read_bytes()
    secrets = [NAME, "Tongren"] + ([PID] if pseudonymise else [])
    assert not [s for s in secrets for form in _forms(s) if form in shard]
    if pseudonymise:
        result = audit(str(out), Identifiers.from_table(str(manifest), ("name",)))
        assert result.ok and result.images == 6
