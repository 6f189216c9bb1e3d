"""Seeded synthetic fundus patients: two eye photographs plus a report that names what was drawn.

Real retinal data cannot ship with the repository, so demos and tests train on these; the writers lay
them out as a hospital export (write_raw_archive), the RET-CLIP release (write_retclip_dir) or a labelled
single-eye set for retclip-eval (write_labelled_set). Each eye is drawn
independently (orange-red fundus, optic disc on the nasal side, vessels, macula, lesions) and the report
is built from the same lesion flags, so image-text agreement is learnable and retrieval beats chance.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

LESIONS: tuple[str, ...] = ("haemorrhages", "hard_exudates", "drusen", "cotton_wool_spots")
# Each lesion kind appears in an eye independently with this probability.
_LESION_P = {"haemorrhages": 0.35, "hard_exudates": 0.3, "drusen": 0.3, "cotton_wool_spots": 0.2}
# Phrase per lesion by amount (few / scattered / many); the amount follows the number of dots drawn.
_PHRASES = {
    "haemorrhages": ("a few haemorrhages", "scattered haemorrhages", "multiple haemorrhages"),
    "hard_exudates": ("a few hard exudates", "scattered hard exudates", "clusters of hard exudates"),
    "drusen": ("a few drusen", "scattered drusen", "numerous drusen"),
    "cotton_wool_spots": ("a cotton wool spot", "cotton wool spots", "multiple cotton wool spots"),
}
_NORMAL = ("no abnormality", "normal fundus", "no abnormal findings")
_IMPRESSION = (
    "no diabetic retinopathy",
    "mild non-proliferative diabetic retinopathy",
    "moderate non-proliferative diabetic retinopathy",
    "severe non-proliferative diabetic retinopathy",
)
# Image roots write_raw_archive can lay the export out as (make-shards reads all of them).
Layout = Literal["zip", "dir", "tar"]
_EXTRA_WORDS = ("left", "right", "eye", "impression", "and")
_PUNCTUATION = (".", ",", ":", "-")


@dataclass
class Patient:
    """One synthetic patient; ``labels[eye][lesion]`` says what was drawn in that eye."""

    left: Image.Image
    right: Image.Image
    report: str
    left_report: str
    right_report: str
    labels: dict[str, dict[str, bool]]
    grade: int  # DR-like grade 0-3 of the worse eye


def vocabulary() -> list[str]:
    """Every lower-case word and punctuation mark a report can contain, sorted (for a tiny WordPiece vocab)."""
    texts = [p for phrases in _PHRASES.values() for p in phrases] + list(_NORMAL + _IMPRESSION + _EXTRA_WORDS)
    words = {w for text in texts for w in re.findall(r"[a-z]+", text)}
    return sorted(words | set(_PUNCTUATION))


def eye_grade(labels: dict[str, bool]) -> int:
    """DR-like grade of one eye: cotton wool spots 3, exudates 2, haemorrhages only 1, else 0 (drusen are not DR)."""
    if labels["cotton_wool_spots"]:
        return 3
    if labels["hard_exudates"]:
        return 2
    return 1 if labels["haemorrhages"] else 0


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _amount(count: int, low: int, high: int) -> int:
    return 0 if count < low else (2 if count >= high else 1)


def _dots(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    size: int,
    count: int,
    radius: tuple[float, float],
    colour: tuple[int, int, int],
    centre: tuple[float, float],
    spread: float,
) -> None:
    # Positions are in image-normalised units around ``centre``; kept inside the fundus circle.
    for _ in range(count):
        angle = rng.uniform(0, 2 * np.pi)
        dist = spread * np.sqrt(rng.uniform(0, 1))
        x = (0.5 + 0.5 * (centre[0] + dist * np.cos(angle))) * size
        y = (0.5 + 0.5 * (centre[1] + dist * np.sin(angle))) * size
        r = rng.uniform(*radius) * size
        rx = r * rng.uniform(0.8, 1.25)
        draw.ellipse((x - rx, y - r, x + rx, y + r), fill=colour)


def _draw_eye(
    rng: np.random.Generator, size: int, labels: dict[str, bool]
) -> tuple[Image.Image, dict[str, int]]:
    """A right-eye image (disc on the right of the picture); the caller mirrors it for a left eye."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    xx, yy = np.meshgrid(axis, axis)
    r2 = xx * xx + yy * yy
    tint = rng.uniform(0.85, 1.1, size=3).astype(np.float32)
    base = np.array([215, 100, 45], dtype=np.float32) * tint
    shade = 1.0 - 0.5 * r2
    mac_x, mac_y = -0.12 + rng.uniform(-0.03, 0.03), rng.uniform(-0.04, 0.04)
    shade *= 1.0 - 0.4 * np.exp(-((xx - mac_x) ** 2 + (yy - mac_y) ** 2) / 0.012)
    rgb = np.clip(base[None, None, :] * shade[..., None], 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    draw = ImageDraw.Draw(img)

    disc_x, disc_y, disc_r = 0.48 + rng.uniform(-0.03, 0.03), rng.uniform(-0.05, 0.05), 0.1

    def px(u: float, v: float) -> tuple[float, float]:
        return (0.5 + 0.5 * u) * size, (0.5 + 0.5 * v) * size

    for sign in (-1, 1):
        for branch in range(2):
            # Arcades leave the disc vertically and bend towards the temporal side, around the macula.
            reach, lift = rng.uniform(1.0, 1.4), rng.uniform(0.35, 0.6) * (1 + 0.4 * branch)
            t = np.linspace(0, 1, 24)
            u = disc_x - reach * t
            v = disc_y + sign * lift * np.sin(np.pi * t * 0.9) + rng.normal(0, 0.01, t.size)
            width = max(1, round(size * (0.012 - 0.004 * branch)))
            draw.line([px(a, b) for a, b in zip(u, v, strict=True)], fill=(125, 22, 18), width=width)
    cx, cy = px(disc_x, disc_y)
    rad = disc_r * size / 2
    draw.ellipse((cx - rad, cy - rad * 1.1, cx + rad, cy + rad * 1.1), fill=(250, 220, 135))

    counts = {k: 0 for k in LESIONS}
    if labels["haemorrhages"]:
        counts["haemorrhages"] = int(rng.integers(4, 18))
        _dots(draw, rng, size, counts["haemorrhages"], (0.008, 0.018), (95, 10, 8), (mac_x, mac_y), 0.55)
    if labels["hard_exudates"]:
        counts["hard_exudates"] = int(rng.integers(6, 30))
        _dots(draw, rng, size, counts["hard_exudates"], (0.005, 0.01), (245, 225, 80), (mac_x, mac_y), 0.35)
    if labels["drusen"]:
        counts["drusen"] = int(rng.integers(6, 26))
        _dots(draw, rng, size, counts["drusen"], (0.006, 0.012), (235, 205, 165), (mac_x, mac_y), 0.2)
    if labels["cotton_wool_spots"]:
        counts["cotton_wool_spots"] = int(rng.integers(1, 6))
        _dots(draw, rng, size, counts["cotton_wool_spots"], (0.02, 0.035), (238, 232, 215), (0.1, 0.0), 0.5)

    mask = Image.fromarray(((r2 < 0.92**2) * 255).astype(np.uint8), "L")
    return Image.composite(img, Image.new("RGB", img.size), mask), counts


def _eye_sentence(rng: np.random.Generator, counts: dict[str, int]) -> str:
    bounds = {
        "haemorrhages": (8, 13),
        "hard_exudates": (12, 22),
        "drusen": (10, 19),
        "cotton_wool_spots": (2, 4),
    }
    found = [_PHRASES[k][_amount(counts[k], *bounds[k])] for k in LESIONS if counts[k]]
    return _join(found) if found else _NORMAL[int(rng.integers(len(_NORMAL)))]


def make_patient(rng: np.random.Generator | int, size: int = 320) -> Patient:
    """Draw one patient from ``rng`` (or a seed): both eyes, patient and per-eye reports, labels, grade."""
    rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
    images, sentences, labels = {}, {}, {}
    for eye in ("left", "right"):
        labels[eye] = {k: bool(rng.uniform() < _LESION_P[k]) for k in LESIONS}
        img, counts = _draw_eye(rng, size, labels[eye])
        # Fundus photos show the optic disc on the nasal side: right of the picture for a right eye.
        images[eye] = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if eye == "left" else img
        sentences[eye] = _eye_sentence(rng, counts)
    grades = {eye: eye_grade(labels[eye]) for eye in labels}
    grade = max(grades.values())
    report = (
        f"left eye: {sentences['left']}. right eye: {sentences['right']}. impression: {_IMPRESSION[grade]}."
    )
    eye_reports = {eye: f"{sentences[eye]}. impression: {_IMPRESSION[grades[eye]]}." for eye in labels}
    return Patient(
        left=images["left"],
        right=images["right"],
        report=report,
        left_report=eye_reports["left"],
        right_report=eye_reports["right"],
        labels=labels,
        grade=grade,
    )


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def field_photo(
    eye: Image.Image, width: int, height: int, centre: tuple[int, int], radius: int
) -> Image.Image:
    """``eye`` (a make_patient image, its field a disc of 0.46 of its side) scaled so that the field has
    ``radius`` and laid on a black ``width`` x ``height`` frame with the field's centre at ``centre``;
    parts beyond the frame are cut off, as cameras cut a wide field at the top and bottom."""
    side = round(radius / 0.46)
    tile = eye.resize((side, side), Image.Resampling.BICUBIC)
    frame = Image.new("RGB", (width, height))
    frame.paste(tile, (centre[0] - side // 2, centre[1] - side // 2))
    return frame


def burn_in(img: Image.Image, corners: dict[str, list[str]], scale: int = 2) -> Image.Image:
    """``img`` with white text in its corners ("tl", "tr", "bl", "br" -> lines), as fundus cameras print
    the patient's name, id and date; Pillow's built-in bitmap font, enlarged ``scale`` times."""
    out = img.copy()
    for corner, lines in corners.items():
        probe = ImageDraw.Draw(Image.new("L", (1, 1)))
        text = "\n".join(lines)
        _, _, right, bottom = probe.multiline_textbbox((0, 0), text)
        layer = Image.new("L", (right + 2, bottom + 2))
        ImageDraw.Draw(layer).multiline_text((0, 0), text, fill=255)
        layer = layer.resize((layer.width * scale, layer.height * scale), Image.Resampling.NEAREST)
        margin = 2 * scale
        x = margin if corner[1] == "l" else out.width - layer.width - margin
        y = margin if corner[0] == "t" else out.height - layer.height - margin
        out.paste((255, 255, 255), (x, y), layer)
    return out


# Identifying details of the hospital-style export (write_raw_archive(identifying=True)); fictitious.
_NAMES = ("Hans Müller", "张伟", "Anna Rossi", "王芳", "Marie Dupont", "李娜", "John O'Neill", "刘洋")


def _resident_id(rng: np.random.Generator) -> str:
    """An 18-character Chinese resident id: region, birth date, sequence and the ISO 7064 check digit."""
    body = f"{rng.integers(110000, 660000)}{rng.integers(1940, 2005)}{rng.integers(1, 13):02d}"
    body += f"{rng.integers(1, 29):02d}{rng.integers(0, 1000):03d}"
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    check = "10X98765432"[sum(int(d) * w for d, w in zip(body, weights, strict=True)) % 11]
    return body + check


def identifying_details(i: int, seed: int = 0) -> dict[str, str]:
    """Name, record number, birth and visit dates, phone, resident id and e-mail of export patient ``i``."""
    rng = np.random.default_rng([seed, i, 7])
    return {
        "patient_name": _NAMES[i % len(_NAMES)],
        "mrn": f"MRN{rng.integers(10_000_000, 99_999_999)}",
        "birth_date": f"{rng.integers(1940, 2005)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}",
        "visit_date": f"2023-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}",
        "phone": f"1{rng.integers(3, 10)}{rng.integers(0, 10)}{rng.integers(10_000_000, 99_999_999)}",
        "resident_id": _resident_id(rng),
        "email": f"patient{i}@example.org",
    }


def identifying_report(i: int, pid: str, who: dict[str, str], clinical: str) -> str:
    """``clinical`` wrapped in the header and footer a hospital report carries, English or Chinese."""
    if i % 2:
        y, m, d = who["visit_date"].split("-")
        return (
            f"患者：{who['patient_name']}，病历号 {who['mrn']}，ID {pid}，身份证号{who['resident_id']}，"
            f"联系电话{who['phone']}，{int(y)}年{int(m)}月{int(d)}日就诊。{clinical}"
            f" 报告已发送至 {who['email']}。"
        )
    phone = f"+86 {who['phone'][:3]} {who['phone'][3:7]} {who['phone'][7:]}"
    return (
        f"Name: {who['patient_name'].upper()}  MRN: {who['mrn']}  Patient ID: {pid}  "
        f"DOB: {who['birth_date']}  Visit: {who['visit_date']}. {clinical} "
        f"Call {phone} or write to {who['email']} with questions."
    )


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def with_metadata(jpeg: bytes, text: str) -> bytes:
    """``jpeg`` carrying ``text`` in a comment (COM), EXIF (description, artist, UTF-16 XP comment), XMP
    and IPTC (APP13) segments, as camera and PACS software write names and ids into exports."""
    exif = Image.Exif()
    exif[0x010E] = text  # ImageDescription
    exif[0x013B] = text  # Artist
    exif[0x9C9C] = text.encode("utf-16-le") + b"\0\0"  # XPComment (Windows writes UTF-16)
    xmp = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" dc:creator="{text}"/>'
        "</rdf:RDF></x:xmpmeta>"
    ).encode()
    value = text.encode("utf-8")
    iptc = b"\x1c\x02\x05" + len(value).to_bytes(2, "big") + value  # IPTC 2:05 object name
    photoshop = b"Photoshop 3.0\0" + b"8BIM\x04\x04\0\0" + len(iptc).to_bytes(4, "big") + iptc
    segments = (
        _segment(0xE1, b"Exif\0\0" + exif.tobytes())
        + _segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0" + xmp)
        + _segment(0xED, photoshop)
        + _segment(0xFE, text.encode("utf-8"))
    )
    return jpeg[:2] + segments + jpeg[2:]


def hospital_photo(eye: Image.Image, pid: str, who: dict[str, str], side: str, cut: bool) -> Image.Image:
    """``eye`` as a fundus camera exports it: a 3:2 frame (the field cut off at the top and bottom when
    ``cut``) with the patient's name, ids and date burned into the corners, outside the field."""
    height = eye.height
    width = round(height * 1.5)
    radius = round(height * (0.53 if cut else 0.45))
    photo = field_photo(eye, width, height, (width // 2, height // 2), radius)
    corners = {
        "tl": [who["patient_name"].encode("ascii", "replace").decode(), pid],
        "tr": [who["mrn"], side],
        "bl": [who["birth_date"]],
        "br": [who["visit_date"], "10:42"],
    }
    return burn_in(photo, corners, scale=max(1, height // 160))


def _patients(n: int, seed: int, size: int) -> list[tuple[str, Patient]]:
    # One generator per patient so patient i is the same whatever n is.
    return [(f"patient-{i:06d}", make_patient(np.random.default_rng([seed, i]), size)) for i in range(n)]


def write_raw_archive(
    out_dir: str | Path,
    n_patients: int,
    seed: int = 0,
    image_size: int = 320,
    layout: Layout = "zip",
    eye_reports: bool = False,
    identifying: bool = False,
) -> tuple[Path, Path]:
    """Write JPEG eye images under an image root plus ``patients.csv``; returns (manifest, image root).

    This is the layout a user starts from: ``make-shards build --manifest patients.csv --images ROOT``.
    ``identifying`` makes it look like a real hospital export: ``patient_name`` and ``mrn`` columns, the
    name and ids in each photo's metadata and burned into its corners (3:2 frames, every other field cut
    off at the top and bottom; text fits the corners from about 256 px), and reports that name the patient, dates, phone, resident id and e-mail.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    rows = []
    for i, (pid, patient) in enumerate(_patients(n_patients, seed, image_size)):
        row = {"patient_id": pid, "report": patient.report}
        who = identifying_details(i, seed) if identifying else {}
        if identifying:
            row |= {"patient_name": who["patient_name"], "mrn": who["mrn"]}
            row["report"] = identifying_report(i, pid, who, patient.report)
        for eye in ("left", "right"):
            img = getattr(patient, eye)
            if identifying:
                side = "OS" if eye == "left" else "OD"
                img = hospital_photo(img, pid, who, side, cut=i % 2 == 1)
                name = f"{who['patient_name']}/{pid}_{who['visit_date']}_{side}.jpg"
                files[name] = with_metadata(_jpeg(img), f"{who['patient_name']} {pid} {who['mrn']}")
                row[f"{eye}_image"] = name
            else:
                rel = f"{pid[-2:]}/{pid}_{eye}.jpg"
                files[rel] = _jpeg(img)
                row[f"{eye}_image"] = rel
            if eye_reports:
                row[f"{eye}_report"] = getattr(patient, f"{eye}_report")
        rows.append(row)

    root = {"dir": out / "images", "zip": out / "images.zip", "tar": out / "images.tar"}[layout]
    if layout == "dir":
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
    elif layout == "zip":
        with zipfile.ZipFile(root, "w", zipfile.ZIP_STORED) as zf:
            for rel, data in files.items():
                zf.writestr(rel, data)
    else:
        with tarfile.open(root, "w") as tf:
            for rel, data in files.items():
                info = tarfile.TarInfo(rel)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))

    manifest = out / "patients.csv"
    columns = ["patient_id", "left_image", "right_image", "report"]
    columns += ["left_report", "right_report"] if eye_reports else []
    columns += ["patient_name", "mrn"] if identifying else []
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return manifest, root


def write_retclip_dir(
    out_dir: str | Path, n: int, seed: int = 0, split: str = "train", image_size: int = 320
) -> Path:
    """Write the original RET-CLIP release layout: ``{split}_imgs.tsv`` and ``{split}_texts.jsonl``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    patients = _patients(n, seed, image_size)
    with (out / f"{split}_imgs.tsv").open("w", encoding="ascii") as fh:
        for pid, p in patients:
            left, right = (base64.b64encode(_jpeg(img)).decode("ascii") for img in (p.left, p.right))
            fh.write(f"{pid}\t{left}\t{right}\n")
    with (out / f"{split}_texts.jsonl").open("w", encoding="utf-8") as fh:
        for text_id, (pid, p) in enumerate(patients):
            fh.write(json.dumps({"text_id": text_id, "text": p.report, "image_ids": [pid]}) + "\n")
    return out


# Patient i of a labelled set goes to _SPLITS[i % 5]: a 60/20/20 train/val/test split that any n keeps.
_SPLITS = ("train", "train", "train", "val", "test")


def write_labelled_set(out_dir: str | Path, n_patients: int, seed: int = 0, image_size: int = 96) -> Path:
    """A labelled single-eye set for retclip-eval: JPEGs under ``out_dir/images`` and ``out_dir/labels.csv``
    (returned). Each patient gives two rows (left and right photo) sharing a split, so no patient straddles
    train and test; labels per eye are one 0/1 column per lesion kind and the DR-like ``grade`` 0-3."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    columns = ["id", "image", "split", "laterality", "grade", *LESIONS]
    rows = []
    for i in range(n_patients):
        patient = make_patient(np.random.default_rng([seed, i]), image_size)
        for eye in ("left", "right"):
            name = f"p{i:05d}_{eye}.jpg"
            getattr(patient, eye).save(out / "images" / name, "JPEG", quality=95)
            labels = patient.labels[eye]
            rows.append(
                {
                    "id": f"p{i:05d}-{eye}",
                    "image": name,
                    "split": _SPLITS[i % len(_SPLITS)],
                    "laterality": eye,
                    "grade": eye_grade(labels),
                    **{k: int(labels[k]) for k in LESIONS},
                }
            )
    table = out / "labels.csv"
    with table.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return table
