"""Helpers shared by the tests (and the benchmarks in bench/), kept out of the package.

Tests import them by name (``from conftest import fake_patients``): pytest puts this directory on
sys.path. Synthetic *fundus* patients, with reports that say what was drawn, are retclip_dist.synth (the
demo ships them); here are smooth stand-in eyes for the data-path tests, fake shard sets packed by
make-shards' own writer, the one tiny vocabulary as a tokenizer, a free TCP port, and the tiny trainer's
arguments, environment and launch commands for the end-to-end tests.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from transformers import BertTokenizerFast

from retclip_dist import synth
from retclip_dist.io.files import OutputDir
from retclip_dist.model.config import ImageInput, ModelConfig
from retclip_dist.model.tokenizer import wordpiece_tokenizer
from retclip_dist.model.towers import image_input, vision_input_size
from retclip_dist.model.vocab import read_vocab
from retclip_dist.shards.build import BuildOptions, build_shards
from retclip_dist.shards.images import ImageOptions
from retclip_dist.shards.writer import ShardWriter
from retclip_dist.shardset import (
    EYE_REPORT_MEMBER,
    IMAGE_MEMBER,
    MANIFEST_NAME,
    META_MEMBER,
    REPORT_MEMBER,
    manifest_json,
)

ROOT = Path(__file__).resolve().parent.parent
TINY_VOCAB = ROOT / "configs/tiny_vocab.txt"  # BERT's special tokens + synth.vocabulary()
# Findings the fake reports are made of: phrases of the synthetic report vocabulary.
_FINDINGS = (
    "no abnormality",
    "a few drusen",
    "scattered haemorrhages",
    "a cotton wool spot",
    "numerous drusen",
)


def free_port() -> int:
    """A TCP port nothing listens on now; other tests start torchrun too, so a fixed 29500 would collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_rank(
    rank: int, world: int, store_path: str, timeout_s: float, check: Callable[[int], None]
) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        check(rank)
    finally:
        dist.destroy_process_group()


def run_gloo_ranks(check: Callable[[int], None], world: int, tmp_path: Path, timeout_s: float = 30) -> None:
    """Run ``check(rank)`` on ``world`` forked gloo ranks; fail the test if one fails or they hang.

    Forked, not spawned: fresh interpreters importing torch take longer than these tests themselves.
    join() re-raises the failing rank's traceback when an assertion fails in either process.
    """
    store = os.fspath(tmp_path / "gloo-store")
    ctx = mp.start_processes(
        _gloo_rank, args=(world, store, timeout_s, check), nprocs=world, join=False, start_method="fork"
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the {world} ranks did not finish within {timeout_s} s (a collective hangs?)")


def tiny_model_config(vocab_path: str | Path, image_size: int = 32, embed_dim: int = 16) -> ModelConfig:
    """A seconds-fast model for tests: 2-layer ViT (width 32, patch 8) and 2-layer BERT (hidden 32).

    Dropout is off so that forward passes are deterministic in training mode too.
    """
    vocab_size = len(read_vocab(vocab_path))
    return ModelConfig(
        # timm's plain ViT (GELU, no pre-norm): random-init tests have no CLIP weights to match.
        vision_name="vit_base_patch16_224",
        vision_kwargs={"img_size": image_size, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        text_config={
            "model_type": "bert",
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 128,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        tokenizer_path=str(vocab_path),
        embed_dim=embed_dim,
    )


def model_image(cfg: ModelConfig) -> ImageInput:
    """The input the model of ``cfg`` states (``RetClip.image_input``) without building its weights: what
    the trainer hands the loaders, for tests that build loaders as a run does."""
    return image_input(cfg, vision_input_size(cfg))


def tiny_tokenizer() -> BertTokenizerFast:
    """The tokenizer of configs/tiny.yaml: WordPiece over configs/tiny_vocab.txt."""
    return wordpiece_tokenizer(read_vocab(TINY_VOCAB))


@dataclass
class FakePatient:
    key: str  # sanitised id, used as the member prefix
    left: bytes  # JPEG bytes
    right: bytes  # JPEG bytes
    report: str  # patient-level report
    left_report: str | None = None  # per-eye report, where the source has one
    right_report: str | None = None  # per-eye report, where the source has one


def fundus_image(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth RGB disc on black with a random tint, gradient and bright spot: resampling paths can be
    compared on it without the aliasing that noise or synth's sharp lesions would add."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = rng.uniform(0.4, 0.6, size=2)
    disc = np.clip((0.45 - np.hypot(xx - cx, yy - cy)) * 30.0, 0.0, 1.0)
    sx, sy = rng.uniform(0.25, 0.75, size=2)
    spot = np.exp(-((xx - sx) ** 2 + (yy - sy) ** 2) / 0.004)
    tint = rng.uniform(0.3, 1.0, size=3)
    shade = 0.6 + 0.4 * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))
    rgb = disc[..., None] * (tint * shade[..., None] + 0.5 * spot[..., None])
    return Image.fromarray((np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def fake_patients(n: int, size: int = 512, seed: int = 0, eye_reports_every: int = 0) -> list[FakePatient]:
    """``n`` patients with ids p00000...; every ``eye_reports_every``-th one has per-eye reports."""
    rng = np.random.default_rng(seed)
    patients = []
    for i in range(n):
        left, right = _FINDINGS[i % 5], _FINDINGS[(i // 5) % 5]
        per_eye = eye_reports_every > 0 and i % eye_reports_every == 0
        patients.append(
            FakePatient(
                key=f"p{i:05d}",
                left=jpeg(fundus_image(rng, size)),
                right=jpeg(fundus_image(rng, size)),
                report=f"Left eye: {left}. Right eye: {right}.",
                left_report=f"{left}." if per_eye else None,
                right_report=f"{right}." if per_eye else None,
            )
        )
    return patients


def sample_members(p: FakePatient, split: str) -> dict[str, bytes]:
    """The members make-shards writes for one patient (no source paths: these patients have none)."""
    members = {IMAGE_MEMBER["left"]: p.left, IMAGE_MEMBER["right"]: p.right, REPORT_MEMBER: p.report.encode()}
    for eye, text in (("left", p.left_report), ("right", p.right_report)):
        if text is not None:
            members[EYE_REPORT_MEMBER[eye]] = text.encode()
    meta = {"patient_id": p.key, "split": split, "orig_size": {}}
    members[META_MEMBER] = json.dumps(meta, sort_keys=True).encode()
    return members


def write_shard_set(
    root: Path, splits: dict[str, list[FakePatient]], per_shard: int | Sequence[int]
) -> dict[str, Any]:
    """Pack ``splits`` with make-shards' own ShardWriter and manifest.json writer; returns the manifest.

    ``per_shard`` is the patients per shard, or a list of shard sizes that each split's shards take in turn.
    """
    sizes = [per_shard] if isinstance(per_shard, int) else list(per_shard)
    out = OutputDir(str(root))
    entries: list[dict[str, Any]] = []
    writer = ShardWriter(out, max_count=max(sizes), max_size=1 << 62, next_index={}, on_close=entries.append)
    for split, patients in splits.items():
        bounds = [0]
        while bounds[-1] < len(patients):
            bounds.append(min(bounds[-1] + sizes[(len(bounds) - 1) % len(sizes)], len(patients)))
        for first, last in itertools.pairwise(bounds):
            for p in patients[first:last]:
                writer.add(split, p.key, sample_members(p, split))
            writer.close()
    text = manifest_json({"per_shard": sizes}, entries, {}, pseudonymised=False)
    out.write_text(MANIFEST_NAME, text)
    return json.loads(text)


class _CountedFile:
    """A local file whose reads are counted (what a seek passes over is not read, so not counted)."""

    def __init__(self, f: Any, counts: dict[str, int]) -> None:
        self._f, self._counts = f, counts

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._counts["bytes"] += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


@contextlib.contextmanager
def counting_shard_reads() -> Iterator[dict[str, int]]:
    """Count the bytes the training reader fetches from storage, and the tars it opens, in this process.

    Local files count what is read; object storage (fsspec's buffered files, e.g. S3) counts what its
    cache fetches, read-ahead included.
    """
    from retclip_dist.data import streams

    counts = {"bytes": 0, "opens": 0}
    real = streams.fsspec

    @contextlib.contextmanager
    def counted_open(url: str, mode: str = "rb", **options: Any) -> Iterator[Any]:
        counts["opens"] += 1
        with real.open(url, mode, **options) as f:
            cache = getattr(f, "cache", None)
            if cache is None or not hasattr(cache, "fetcher"):
                yield _CountedFile(f, counts)
                return
            fetch = cache.fetcher

            def fetched(start: int, end: int) -> bytes:
                data = fetch(start, end)
                counts["bytes"] += len(data)
                return data

            cache.fetcher = fetched
            yield f

    streams.fsspec = types.SimpleNamespace(open=counted_open)
    try:
        yield counts
    finally:
        streams.fsspec = real


def build_argv(manifest: str | Path, images: str | Path, output_dir: str | Path, *extra: str) -> list[str]:
    """``make-shards build`` arguments for one cohort: the required three, then ``extra`` flags."""
    required = ["--manifest", str(manifest), "--images", str(images), "--output_dir", str(output_dir)]
    return ["build", *required, *extra]


def build_synth_shards(
    root: Path,
    patients: int,
    seed: int,
    raw_size: int,
    size: int,
    max_count: int,
    val_fraction: float,
    layout: synth.Layout = "dir",
    eye_reports: bool = False,
) -> Path:
    """synth's raw export (JPEGs + patients.csv, with per-eye reports if ``eye_reports``) through
    make-shards into ``root/shards``; every patient is kept (synthetic eyes are never rejected, so a reject
    means a broken fixture)."""
    manifest, images = synth.write_raw_archive(root / "raw", patients, seed, raw_size, layout, eye_reports)
    out = root / "shards"
    result = build_shards(
        BuildOptions(
            out=str(out),
            manifest=str(manifest),
            images=str(images),
            val_fraction=val_fraction,
            max_count=max_count,
            image=ImageOptions(size=size, min_side=size),
            progress=False,
        )
    )
    assert result.kept == patients, result.rejected
    return out


# --- DICOM exports (make-shards build --dicom); pydicom is imported only when a test writes one ---

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # Ophthalmic Photography 8 Bit Image Storage
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"  # a document, not a photo


def ybr_full(rgb: np.ndarray) -> np.ndarray:
    """RGB -> YBR_FULL by the equations of DICOM PS3.3 C.7.6.3.1.2 (written out here, not pydicom's)."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    return np.clip(np.rint(np.stack([y, cb, cr], axis=-1)), 0, 255).astype(np.uint8)


def rgb_from_ybr_full(ybr: np.ndarray) -> np.ndarray:
    """YBR_FULL -> RGB by the inverse equations of the same section."""
    y, cb, cr = (ybr[..., i].astype(np.float64) for i in range(3))
    r = y + 1.402 * (cr - 128)
    g = y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128)
    b = y + 1.772 * (cb - 128)
    return np.clip(np.rint(np.stack([r, g, b], axis=-1)), 0, 255).astype(np.uint8)


def dicom_photo(
    pixels: np.ndarray,
    *,
    encoding: str = "native",
    photometric: str | None = None,
    sop_class: str = OP_8BIT,
    modality: str = "OP",
    bits_stored: int | None = None,
    file_meta_only: bool = False,
    **tags: Any,
) -> bytes:
    """A Part 10 DICOM file holding ``pixels`` (rows x columns [x 3], uint8 or uint16) as one photo.

    ``encoding``: "native" (RGB, YBR_FULL: converted here by ybr_full, YBR_FULL_422: subsampled here,
    MONOCHROME1/2, PALETTE COLOR: ``pixels`` are indices and ``tags`` give the LUT), "jpeg" (Pillow's JPEG
    of the RGB pixels, 4:2:2, quality 95, as YBR_FULL_422 in JPEG Baseline) or "rle" (pydicom's RLE Lossless
    encoder). ``tags`` are set by keyword (PatientID=..., ImageLaterality=...); a None value is left out.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless, generate_uid

    colour = pixels.ndim == 3
    photometric = photometric or ("RGB" if colour else "MONOCHROME2")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=[pixels.tobytes()[:64].hex(), repr(sorted(tags.items()))]
    )
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality = modality
    for keyword, value in tags.items():
        if value is not None:
            setattr(ds, keyword, value)
    if file_meta_only:
        return _dicom_bytes(ds)
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 * pixels.dtype.itemsize
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if encoding == "jpeg":
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=95, subsampling=1)
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PixelData = encapsulate([out.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
    elif photometric == "YBR_FULL":
        ds.PixelData = ybr_full(pixels).tobytes()
    elif photometric == "YBR_FULL_422":
        # Native 4:2:2: each pair of pixels stores Y1 Y2 Cb Cr, the chroma of the pair's first pixel.
        ybr = ybr_full(pixels)
        pairs = ybr.reshape(ybr.shape[0], -1, 2, 3)
        ds.PixelData = np.stack(
            [pairs[:, :, 0, 0], pairs[:, :, 1, 0], pairs[:, :, 0, 1], pairs[:, :, 0, 2]], axis=-1
        ).tobytes()
    else:
        ds.PixelData = pixels.tobytes()
    if encoding == "rle":
        ds.compress(RLELossless)
    return _dicom_bytes(ds)


def _dicom_bytes(ds: Any) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@dataclass
class DicomFile:
    path: str  # inside the export
    data: bytes  # the file
    # the photo's RGB/grey pixels as the file defines them (YBR_FULL through the standard's equations; a
    # JPEG's before compression); None: not a photo
    pixels: np.ndarray | None
    reject: str | None = None  # the reason make-shards rejects the file for, if it does


@dataclass
class DicomExport:
    """A small PACS export as make-shards --dicom meets it, and what it must make of it."""

    root: Path  # the export directory
    reports: Path  # reports.csv keyed by AccessionNumber
    files: dict[str, DicomFile]  # path -> file
    visits: dict[str, tuple[str, str, str] | str]  # visit id -> (left path, right path, report) or reject
    identifiers: set[str]  # every tag value (and name part) that identifies someone or something


# (PatientID, PatientName, birth date) of the export's patients; the ids look like hospitals write them.
_DICOM_PATIENTS = {
    "p1": ("HOSP0091427", "Müller^Hans", "19570304"),
    "p2": ("HOSP0115518", "Dupont^Marie", "19610912"),
    "p3": ("MRN77120934", "Rossi^Anna", "19480121"),
    "p4": ("PAT4471XY", "Garcia^Luis", "19750630"),
}


def dicom_tag_strings(data: bytes) -> set[str]:
    """Every text value of every tag in a DICOM file (names also split at ``^``), of 4 characters or more."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    found: set[str] = set()
    for elem in [*ds.file_meta, *ds.iterall()]:
        values = elem.value if isinstance(elem.value, pydicom.multival.MultiValue) else [elem.value]
        for value in values:
            if isinstance(value, str | pydicom.valuerep.PersonName):
                found |= {str(value), *str(value).split("^")}
    return {s.strip() for s in found if len(s.strip()) >= 4}


def write_dicom_export(root: Path, size: tuple[int, int] = (96, 80), seed: int = 0) -> DicomExport:
    """Write a PACS-style export (DICOM/PAnnnnnn/STnnnnnn/IMnnnnnn: no tag value in any path) and
    reports.csv into ``root``.

    p1: two visits; the first has a JPEG-compressed right eye and an uncompressed left eye chosen over a
    later colour photo and an earlier red-free (grey) one; the second a YBR_FULL left and an RLE right
    eye. p2: laterality from (0020,0060) only, and a truncated extra photo. p3: no right eye, and a photo
    without laterality. p4: complete, but no report row. Plus an encapsulated PDF and a README.
    ``size`` is (columns, rows) of every photo.
    """
    rng = np.random.default_rng(seed)
    studies: list[dict[str, str]] = []
    files: dict[str, DicomFile] = {}
    identifiers: set[str] = set()

    def study(patient: str, date: str, accession: str) -> dict[str, str]:
        pid, name, birth = _DICOM_PATIENTS[patient]
        uid = f"1.2.826.0.1.3680043.10.543.{70001 + len(studies)}"
        studies.append(
            {
                "PatientID": pid,
                "PatientName": name,
                "PatientBirthDate": birth,
                "PatientSex": "M" if patient in ("p1", "p4") else "F",
                "StudyInstanceUID": uid,
                "SeriesInstanceUID": uid + ".1",
                "StudyDate": date,
                "StudyTime": "093000",
                "StudyID": "S" + accession[-4:],
                "AccessionNumber": accession,
                "InstitutionName": "Klinikum Nord Augenklinik",
                "ReferringPhysicianName": "Schmidt^Eva",
                "OperatorsName": "Weber^Jonas",
                "DeviceSerialNumber": "FC-5529317",
            }
        )
        return studies[-1]

    def add(tags: dict[str, str], pixels: np.ndarray | None, data: bytes, reject: str | None) -> str:
        patient = [v[0] for v in _DICOM_PATIENTS.values()].index(tags["PatientID"])
        path = f"DICOM/PA{patient:06d}/ST{studies.index(tags):06d}/IM{len(files):06d}"
        files[path] = DicomFile(path, data, pixels, reject)
        identifiers.update(dicom_tag_strings(data))
        return path

    def photo(tags: dict[str, str], pixels: np.ndarray, reject: str | None = None, **kw: Any) -> str:
        return add(tags, pixels, dicom_photo(pixels, **tags, **kw), reject)

    def rgb() -> np.ndarray:
        return np.asarray(fundus_image(rng, max(size)).resize(size))

    reports = {
        "ACC1001": "Left eye: a few drusen. Right eye: no abnormality.",
        "ACC1002": "Left eye: scattered haemorrhages. Right eye: a cotton wool spot.",
        "ACC2001": "Left eye: numerous drusen. Right eye: a few drusen.",
        "ACC3001": "Left eye: no abnormality.",
    }
    visits: dict[str, tuple[str, str, str] | str] = {}
    tags = study("p1", "20190304", "ACC1001")
    grey = np.asarray(Image.fromarray(rgb()).convert("L"))
    photo(tags, grey, "extra_photo", ImageLaterality="L", AcquisitionDateTime="20190304093500")
    left = photo(tags, rgb(), ImageLaterality="L", AcquisitionDateTime="20190304094000")
    right = photo(tags, rgb(), encoding="jpeg", ImageLaterality="R", AcquisitionDateTime="20190304094100")
    photo(tags, rgb(), "extra_photo", ImageLaterality="L", AcquisitionDateTime="20190304094500")
    visits["HOSP0091427-v1"] = (left, right, reports["ACC1001"])
    tags = study("p1", "20201112", "ACC1002")
    left = photo(tags, rgb(), photometric="YBR_FULL", ImageLaterality="L")
    files[left].pixels = rgb_from_ybr_full(ybr_full(files[left].pixels))
    right = photo(tags, rgb(), encoding="rle", ImageLaterality="R")
    visits["HOSP0091427-v2"] = (left, right, reports["ACC1002"])
    tags = study("p2", "20210105", "ACC2001")
    left = photo(tags, rgb(), Laterality="L")
    right = photo(tags, rgb(), Laterality="R")
    cut = photo(tags, rgb(), "truncated", Laterality="R", AcquisitionDateTime="20210105080000")
    files[cut].data = files[cut].data[: len(files[cut].data) // 2]
    visits["HOSP0115518-v1"] = (left, right, reports["ACC2001"])
    tags = study("p3", "20220220", "ACC3001")
    photo(tags, rgb(), ImageLaterality="L")
    photo(tags, rgb(), "no_laterality")
    visits["MRN77120934-v1"] = "missing_eye"
    tags = study("p4", "20230317", "ACC4001")
    photo(tags, rgb(), ImageLaterality="L")
    photo(tags, rgb(), ImageLaterality="R")
    visits["PAT4471XY-v1"] = "missing_report"
    tags = study("p1", "20190304", "ACC1001")
    pdf = dicom_photo(
        np.zeros((1, 1), np.uint8), sop_class=ENCAPSULATED_PDF, modality="DOC", file_meta_only=True, **tags
    )
    add(tags, None, pdf, "not_photo")
    files["README.TXT"] = DicomFile("README.TXT", b"Exported by PACS viewer 4.2\n", None, "not_dicom")

    export = root / "PACS_Klinikum_Nord"
    for f in files.values():
        (export / f.path).parent.mkdir(parents=True, exist_ok=True)
        (export / f.path).write_bytes(f.data)
    table = root / "reports.csv"
    with table.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["AccessionNumber", "report"])
        writer.writerows(reports.items())
    return DicomExport(export, table, files, visits, identifiers)


# --- retclip-train end to end: the tiny config, in one process or on 2 gloo ranks under `accelerate launch` ---

CPU_2PROC = str(ROOT / "configs/accelerate/cpu_2proc.yaml")  # two local CPU processes (gloo)
# The tiny config, quick and quiet: 8 patients per rank, no loader workers, a one-step warm-up, every step
# logged, no trackers, no progress bar. Every end-to-end test file starts from it and appends its own few
# settings (a later flag wins over an earlier one, so an appended value replaces the one here).
TINY_ARGS = [
    "--config", str(ROOT / "configs/tiny.yaml"),
    "--model.tokenizer_path", str(TINY_VOCAB),
    "--data.batch_size", "8",
    "--data.num_workers", "0",
    "--train.warmup_steps", "1",
    "--log.every_steps", "1",
    "--log.trackers", "[]",
    "--log.progress", "false",
]  # fmt: skip
# train_two_ranks' runs (and the other 2-rank files'): 2 data partitions, checkpoints only at the end.
TINY_TRAIN_ARGS = [*TINY_ARGS, "--data.partitions", "2", "--checkpoint.every_steps", "0"]


def tiny_argv(base: Sequence[str], shards: str | Path, out: str | Path, *extra: str) -> list[str]:
    """``retclip-train`` arguments: ``base`` (TINY_ARGS and a file's settings), the shards, the output
    directory, then ``extra``."""
    return [*base, "--data.shards", str(shards), "--output_dir", str(out), *extra]


def trainer_env(**extra: str) -> dict[str, str]:
    """The environment of a trainer subprocess: one OpenMP thread per process (the machine is shared and
    small), unbuffered output (a test reads it line by line while the run goes on), then ``extra``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def trainer_cmd(*args: str) -> list[str]:
    """``retclip-train *args`` in one process, by this interpreter."""
    return [sys.executable, "-m", "retclip_dist.train", *args]


def accelerate_cmd(
    *args: str,
    script: Path | None = None,
    config: str | Path = CPU_2PROC,
    processes: int = 2,
    launcher: Sequence[str] = (),
) -> list[str]:
    """``accelerate launch`` of ``retclip-train *args`` (``-m retclip_dist.train``, or ``script``, which
    ends in ``cli.main()``) on ``processes`` processes of ``config``, on a free port; ``launcher``: more
    flags of ``accelerate launch`` itself."""
    entry = [str(script)] if script is not None else ["-m", "retclip_dist.train"]
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(config),
        "--num_processes", str(processes),
        "--main_process_port", str(free_port()),
        *launcher, *entry, *args,
    ]  # fmt: skip


def train_two_ranks(
    shards: Path, out: Path, *extra: str, script: Path | None = None, env: dict[str, str] | None = None
) -> str:
    """``retclip-train`` (``-m retclip_dist.train``, or ``script``, which ends in ``cli.main()``) on 2 gloo
    ranks with TINY_TRAIN_ARGS, then ``extra``; asserts exit 0 and returns stderr."""
    cmd = accelerate_cmd(*tiny_argv(TINY_TRAIN_ARGS, shards, out, *extra), script=script)
    done = subprocess.run(cmd, env=trainer_env(**(env or {})), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stderr


def child_pids(pid: int) -> list[int]:
    """The pids whose parent is ``pid``, read from /proc (Linux)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


# --- make test's two workers (pytest-xdist, --dist loadgroup --no-loadscope-reorder) ---

# Meant to keep each file on one worker (its module fixtures, often a trainer run, built once) and the
# real-Slurm files together. With pytest 9.2 and xdist 3.8 the groups do not take effect: xdist writes the
# group into `item._nodeid`, which pytest 9.2 no longer reads, so tests are spread one by one (verified
# in a worker: no `@group` suffix). The order below still holds, and slurm_helpers.slurm_node makes the
# Slurm tests take turns on the one node across workers. The marks take effect once xdist follows pytest.
SLURM_FILES = {"test_slurm", "test_submit"}
# The longest first, so that neither worker ends with a long tail (measured with --durations): the Slurm
# files (~15 min together), the demo, the benchmark end to end, then the trainer-heavy files.
LONGEST_FIRST = [
    "slurm",
    "test_demo",
    "test_eval_benchmark_e2e",
    "test_train",
    "test_faults_train",
    "test_launch_multinode",
    "test_freeze",
]


# tryfirst: xdist's own hook turns the xdist_group marks into the groups it schedules by, so they must be
# there before it runs.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Where xdist is installed: mark each test with its file's group (the Slurm files share one) and
    put the longest groups first; without xdist, nothing changes."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    order = {group: i for i, group in enumerate(LONGEST_FIRST)}
    groups = {}
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        groups[item.nodeid] = "slurm" if module in SLURM_FILES else module
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))
    items.sort(key=lambda item: order.get(groups[item.nodeid], len(order)))  # stable: the rest as collected
