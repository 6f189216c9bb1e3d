"""Labelled single-eye images for downstream evaluation: a CSV/JSONL table plus an image root.

Downstream datasets (IDRiD, APTOS, RFMiD...) label images, not patients, so one row is one eye photo:
``image,label`` for a single-label task or one 0/1 column per class for a multi-label task, with optional
``id``, ``split`` and ``laterality`` columns. Images come from a directory, zip, tar, s3:// prefix, or a
shard set made by make-shards, whose members are named ``KEY.left.jpg``/``KEY.right.jpg``. Every error
names the table row it comes from.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from retclip_dist.eval.config import DataConfig
from retclip_dist.io import files
from retclip_dist.io.errors import ImageNotFound, ImageReadError, ImageRootError
from retclip_dist.io.roots import ImageStore, TarStore, open_image_root
from retclip_dist.model.config import ImageInput
from retclip_dist.seeds import unit_draw
from retclip_dist.shardset import EYES, IMAGE_MEMBER, MANIFEST_NAME, is_eye_image, read_manifest

# Ophthalmology writes laterality several ways; OD (oculus dexter) is the right eye.
_LATERALITY = {"left": "left", "l": "left", "os": "left", "right": "right", "r": "right", "od": "right"}
_TRUE = {"1", "1.0", "true", "yes"}
_FALSE = {"0", "0.0", "false", "no"}
# Cells meaning "no label" (compared lower-cased after stripping): what spreadsheets, pandas (its default
# NA strings) and JSON (null, NaN) write. Such a row is dropped and counted, or refused with data.strict;
# it never becomes a class. A marker listed in data.classes is taken as a real class name instead.
MISSING_LABELS = frozenset({"", "nan", "-nan", "na", "n/a", "#n/a", "<na>", "null", "none"})
# How many dropped rows a result names (the count is always complete).
_DROPPED_SHOWN = 20

log = logging.getLogger(__name__)


class LabelError(ValueError):
    """Labelled input that cannot be evaluated; the message names the file and row."""


@dataclass(frozen=True)
class LabelledImage:
    id: str  # row id (the id column, else the image path)
    image: str  # reference of the image inside the image root
    label: tuple[int, ...]  # (class index,) for single-label, one 0/1 per class for multi-label
    split: str | None  # value of the split column, None without one
    laterality: str | None  # "left", "right", or None when unknown
    source: str  # "labels.csv:12", for error messages


@dataclass(frozen=True)
class LabelledSet:
    rows: tuple[LabelledImage, ...]  # in table order
    classes: tuple[str, ...]  # class names in index order
    multilabel: bool  # one 0/1 column per class instead of one label per row
    table: str  # where the rows were read from
    store: ImageStore  # where the images are read from
    dropped: tuple[str, ...] = ()  # sources ("labels.csv:12") of rows dropped for a missing label

    def missing_labels(self) -> dict[str, Any]:
        """What results report about dropped rows: the count (whole table) and the first rows."""
        return {"dropped": len(self.dropped), "rows": list(self.dropped[:_DROPPED_SHOWN])}

    def __len__(self) -> int:
        return len(self.rows)

    def labels(self) -> np.ndarray:
        """[n] class indices, or [n, C] 0/1 for a multi-label set."""
        array = np.array([r.label for r in self.rows], dtype=np.int64)
        return array if self.multilabel else array[:, 0]

    def subset(self, split: str) -> LabelledSet:
        """The rows of one split; an error names the splits present when it is empty."""
        rows = tuple(r for r in self.rows if r.split == split)
        if not rows:
            present = sorted({str(r.split) for r in self.rows})
            raise LabelError(f"{self.table}: no rows in split {split!r}; splits present: {present}")
        return replace(self, rows=rows)

    def check_both_outcomes(self, split: str) -> None:
        """Refuse a split on which AUROC is undefined: a single class, or a label column never/always set."""
        labels = self.labels()
        where = f"{self.table}: split {split!r} ({len(self)} rows, first {self.rows[0].source})"
        if self.multilabel:
            for i, name in enumerate(self.classes):
                if labels[:, i].min() == labels[:, i].max():
                    raise LabelError(f"{where}: label column {name!r} is {labels[0, i]} on every row")
        elif len(set(labels.tolist())) < 2:
            raise LabelError(f"{where}: every row has class {self.classes[labels[0]]!r}; need two classes")

    def check_trainable(self, train: LabelledSet) -> None:
        """Every class must occur in the training split, or the classifier has no output for it."""
        if self.multilabel:
            return
        missing = set(range(len(self.classes))) - set(train.labels().tolist())
        for row in self.rows:
            if row.label[0] in missing:
                raise LabelError(
                    f"{row.source}: label {self.classes[row.label[0]]!r} never occurs in the training split"
                )
        if missing:
            names = [self.classes[i] for i in sorted(missing)]
            raise LabelError(f"{self.table}: classes {names} (from data.classes) have no rows at all")


class ShardSetStore(ImageStore):
    """Eye images of a make-shards set, addressed by member name (``KEY.left.jpg``)."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.members: dict[str, TarStore] = {}
        for shard in read_manifest(location).shards:
            store = TarStore(shard.url)
            for name in store.index.names():
                if is_eye_image(name):
                    self.members[name] = store

    def read(self, ref: str) -> bytes:
        store = self.members.get(ref)
        if store is None:
            raise ImageNotFound(f"{ref} is not a member of shard set {self.location}")
        return store.read(ref)


def open_images(location: str) -> ImageStore:
    """A shard set when ``location`` holds a manifest.json, else an image root (directory, archive, s3://)."""
    try:
        if location.endswith(MANIFEST_NAME) or files.exists(files.join(location, MANIFEST_NAME)):
            return ShardSetStore(location)
        return open_image_root(location)
    except ImageRootError as exc:
        raise LabelError(f"data.images: {exc}") from None


def _read_table(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(source, row) pairs of a CSV (header on line 1) or JSONL (one object per line) table."""
    name = Path(path).name
    try:
        with fsspec.open(path, "rt", encoding="utf-8-sig", newline="") as fh:
            text = fh.read()
    except OSError as exc:
        raise LabelError(f"cannot read label table {path}: {exc}") from exc
    if path.endswith((".jsonl", ".json")):
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LabelError(f"{name}:{lineno}: not JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise LabelError(f"{name}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"{name}:{lineno}", row))
        return rows
    reader = csv.DictReader(io.StringIO(text))
    return [(f"{name}:{reader.line_num}", row) for row in reader]


def _cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    return "" if value is None else str(value).strip()


def _binary(source: str, column: str, value: str) -> int:
    lowered = value.lower()
    if lowered in _TRUE:
        return 1
    if lowered in _FALSE:
        return 0
    raise LabelError(f"{source}: column {column!r} must be 0/1, got {value!r}")


def _class_order(labels: set[str]) -> list[str]:
    # Numeric labels (DR grades) sort by value so that "10" follows "9" and kappa sees the right order.
    # The key is a total order (NaN and inf are text here), so the order never depends on set iteration.
    return sorted(labels, key=lambda s: (0, float(s), s) if _is_number(s) else (1, 0.0, s))


def _is_number(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def _missing(value: str, classes: list[str]) -> bool:
    return value.lower() in MISSING_LABELS and value not in classes


def _laterality(source: str, value: str, image: str) -> str | None:
    if value:
        try:
            return _LATERALITY[value.lower()]
        except KeyError:
            raise LabelError(f"{source}: laterality {value!r} is not left/right (L/R, OS/OD)") from None
    # Shard-set members say which eye they are.
    for eye in EYES:
        if image.endswith("." + IMAGE_MEMBER[eye]):
            return eye
    return None


def read_labelled(cfg: DataConfig) -> LabelledSet:
    """Parse and check the whole table; images are only opened later, when they are embedded."""
    if not cfg.table or not cfg.images:
        raise LabelError("data.table and data.images must both be set")
    raw = _read_table(cfg.table)
    if not raw:
        raise LabelError(f"{cfg.table}: the table has no rows")
    multilabel = bool(cfg.label_columns)
    required = [cfg.image_column, *(cfg.label_columns if multilabel else [cfg.label_column])]
    for column in required:
        if column not in raw[0][1]:
            raise LabelError(f"{cfg.table}: no column {column!r}; columns are {sorted(raw[0][1])}")
    label_columns = list(cfg.label_columns) if multilabel else [cfg.label_column]
    kept, dropped = [], []
    for source, row in raw:
        gaps = [c for c in label_columns if _missing(_cell(row, c), list(cfg.classes))]
        if not gaps:
            kept.append((source, row))
        elif cfg.strict:
            raise LabelError(
                f"{source}: no label in column {gaps[0]!r} ({_cell(row, gaps[0])!r}); "
                "data.strict refuses rows without a label"
            )
        else:
            dropped.append(source)
    if dropped:
        log.warning(
            "%s: dropped %d of %d rows with a missing label (first %s); data.strict refuses them instead",
            cfg.table,
            len(dropped),
            len(raw),
            dropped[0],
        )
    if not kept:
        raise LabelError(f"{cfg.table}: every row lacks a label in {label_columns}")
    if multilabel:
        classes = list(cfg.label_columns)
    else:
        classes = list(cfg.classes) or _class_order({_cell(r, cfg.label_column) for _, r in kept})
    index = {name: i for i, name in enumerate(classes)}
    rows, seen_ids = [], {}
    for source, row in kept:
        image = _cell(row, cfg.image_column)
        if not image:
            raise LabelError(f"{source}: column {cfg.image_column!r} is empty")
        if multilabel:
            label = tuple(_binary(source, c, _cell(row, c)) for c in cfg.label_columns)
        else:
            value = _cell(row, cfg.label_column)
            if value not in index:
                raise LabelError(f"{source}: unknown label {value!r}; classes are {classes}")
            label = (index[value],)
        row_id = _cell(row, cfg.id_column) or image
        if row_id in seen_ids:
            raise LabelError(f"{source}: id {row_id!r} repeats {seen_ids[row_id]}")
        seen_ids[row_id] = source
        rows.append(
            LabelledImage(
                id=row_id,
                image=image,
                label=label,
                split=_cell(row, cfg.split_column) or None,
                laterality=_laterality(source, _cell(row, cfg.laterality_column), image),
                source=source,
            )
        )
    return LabelledSet(
        tuple(rows), tuple(classes), multilabel, cfg.table, open_images(cfg.images), tuple(dropped)
    )


# A table without a split column gets these shares of train, val and test from seeded_split.
SEEDED_SHARES = (("train", 0.6), ("val", 0.2), ("test", 0.2))


def seeded_split(row_id: str, seed: int) -> str:
    """train, val or test for one row id: a fixed 60/20/20 draw from a hash of (seed, id), so a row keeps
    its split whatever the table's order or length."""
    u = unit_draw((seed, row_id), "\0")
    for name, share in SEEDED_SHARES:
        if u < share:
            return name
        u -= share
    return SEEDED_SHARES[-1][0]


def with_seeded_splits(lset: LabelledSet, seed: int) -> LabelledSet:
    """``lset`` with every row's split replaced by ``seeded_split`` of its id (a table without a split
    column). Rows are split one by one: a patient's two eyes may land in different splits."""
    return replace(lset, rows=tuple(replace(r, split=seeded_split(r.id, seed)) for r in lset.rows))


_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def fit_image(img: Image.Image, spec: ImageInput) -> Image.Image:
    """``img`` as the model takes it: resized by ``spec.resize`` (see ImageInput), then centre-cropped or
    padded with black to spec.size x spec.size. Crop and pad offsets follow torchvision's CenterCrop."""
    scaled = math.floor(spec.size / spec.crop_pct)
    try:
        resample = _FILTERS[spec.interpolation]
    except KeyError:
        raise ValueError(
            f"image interpolation {spec.interpolation!r} is not one of {sorted(_FILTERS)}"
        ) from None
    w, h = img.size
    if spec.resize == "squash":
        img = img.resize((scaled, scaled), resample)
    else:
        side = min(w, h) if spec.resize == "shortest" else max(w, h)
        img = img.resize((max(1, int(w * scaled / side)), max(1, int(h * scaled / side))), resample)
    w, h = img.size
    if w == h == spec.size:
        return img

    def offset(length: int) -> int:
        if length >= spec.size:
            return -round((length - spec.size) / 2)
        return 0 if spec.pad == "end" else (spec.size - length) // 2

    canvas = Image.new("RGB", (spec.size, spec.size))
    canvas.paste(img, (offset(w), offset(h)))
    return canvas


def model_input(image: Image.Image, size: int | ImageInput) -> torch.Tensor:
    """uint8 [3, s, s]: the photo in RGB as the model takes it. An ``int`` (retclip-eval's preprocessing of
    our models) squashes the whole photo to s x s, bicubic, no crop; the timm and open_clip exports state the
    same resize (timm ``crop_mode: squash``, open_clip ``resize_mode: squash``) and retclip_dist.load
    applies it. An ImageInput resizes, crops or pads as the model's authors did (``fit_image``)."""
    spec = size if isinstance(size, ImageInput) else ImageInput(size, (0.0,) * 3, (1.0,) * 3)
    rgb = fit_image(image.convert("RGB"), spec)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def load_images(lset: LabelledSet, size: int | ImageInput) -> torch.Tensor:
    """Decode every image once into uint8 [n, 3, s, s] (``model_input``); errors name the table row."""
    s = size.size if isinstance(size, ImageInput) else size
    out = torch.empty((len(lset), 3, s, s), dtype=torch.uint8)
    for i, row in enumerate(lset.rows):
        try:
            data = lset.store.read(row.image)
            with Image.open(io.BytesIO(data)) as img:
                out[i] = model_input(img, size)
        except ImageReadError as exc:
            raise LabelError(f"{row.source}: image {row.image!r}: {exc}") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise LabelError(f"{row.source}: image {row.image!r} cannot be decoded ({exc})") from None
    return out
