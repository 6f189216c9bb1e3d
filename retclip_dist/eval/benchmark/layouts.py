"""One reader per published layout of a retinal dataset, each returning a BenchSet.

A reader knows the file names, columns and quirks of the layout as published (a trailing space in an
IDRiD column name, empty trailing CSV columns, ungradable MESSIDOR-2 images); it never downloads
anything. Rows become LabelledImage rows of the eval package, so labels, missing-label counting, image
decoding and feature extraction are the eval package's own. Every error names the file (and row).
Each layout's options are a small dataclass, given per dataset as ``options:`` in the suite file.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from retclip_dist.config import from_dict
from retclip_dist.eval.benchmark.suite import DatasetSpec
from retclip_dist.eval.config import DataConfig
from retclip_dist.eval.data import (
    LabelError,
    LabelledImage,
    LabelledSet,
    _binary,
    _cell,
    _class_order,
    _missing,
    _read_table,
    read_labelled,
)
from retclip_dist.io.errors import ImageRootError
from retclip_dist.io.roots import ImageStore, open_image_root

log = logging.getLogger(__name__)


def _image_root(root: Path | str) -> ImageStore:
    """The dataset's image folder or archive; an unusable one is one line naming it."""
    try:
        return open_image_root(str(root))
    except ImageRootError as exc:
        raise LabelError(f"dataset root {root}: {exc}") from None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# ODIR-5K's eight patient-level labels, in the order of its annotation sheet.
ODIR_LABELS = ("N", "D", "G", "C", "A", "H", "M", "O")


@dataclass(frozen=True)
class BenchSet:
    """A dataset as the benchmark sees it: labelled rows plus what the eval package does not model."""

    lset: LabelledSet  # rows (split = official split or None), classes, image store, dropped labels
    right: tuple[str, ...] | None = None  # paired layouts: the right-eye image of each row (row.image = left)
    groups: tuple[str, ...] = ()  # patient id per row (the row id when the layout has none)
    excluded: dict[str, int] = field(default_factory=dict)  # rows left out by rule, e.g. ungradable

    @property
    def paired(self) -> bool:
        return self.right is not None


def _rows(path: Path) -> list[tuple[str, dict[str, str]]]:
    """Rows of a CSV with header names stripped (IDRiD's 'Risk of macular edema ') and empty columns
    (trailing commas) dropped."""
    if not path.is_file():
        raise LabelError(f"{path}: no such file")
    raw = _read_table(str(path))
    return [(src, {k.strip(): v for k, v in row.items() if k and k.strip()}) for src, row in raw]


def _need(path: Path, rows: list[tuple[str, dict[str, str]]], columns: list[str]) -> None:
    if not rows:
        raise LabelError(f"{path}: the table has no rows")
    for column in columns:
        if column not in rows[0][1]:
            raise LabelError(f"{path.name}: no column {column!r}; columns are {sorted(rows[0][1])}")


def _index_images(root: Path, where: str) -> dict[str, str]:
    """File name and stem -> path relative to ``root`` for every image below it; a name present twice
    is kept out (a reference to it is then an error naming both places)."""
    found: dict[str, list[str]] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            rel = p.relative_to(root).as_posix()
            for key in {p.name, p.stem}:
                found.setdefault(key, []).append(rel)
    index = {k: v[0] for k, v in found.items() if len(v) == 1}
    index.update({k: "|".join(v) for k, v in found.items() if len(v) > 1})
    if not index:
        raise LabelError(f"{where}: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return index


def _lookup(index: dict[str, str], name: str, source: str, where: Path) -> str:
    """The image named ``name``; by stem when the suffix differs (MESSIDOR-2's CSV says .png for the
    published .tif and .JPG files)."""
    ref = index.get(name) or index.get(Path(name).stem)
    if ref is None:
        raise LabelError(f"{source}: image {name!r} not found under {where}")
    if "|" in ref:
        raise LabelError(f"{source}: image {name!r} is ambiguous under {where}: {ref.split('|')}")
    return ref


def _squash(name: str) -> str:
    return "".join(name.split()).lower()


def _root(spec: DatasetSpec) -> Path:
    root = Path(spec.root)
    if not root.is_dir():
        raise LabelError(f"dataset {spec.name}: root {spec.root} is not a directory")
    return root


def _single(
    spec: DatasetSpec,
    root: Path,
    found: list[tuple[str, str, str, str, str | None]],
    dropped: list[str],
    classes: list[str] | None = None,
    excluded: dict[str, int] | None = None,
) -> BenchSet:
    """(source, row id, image ref, label value, split) rows of a single-label layout -> BenchSet."""
    if not found:
        raise LabelError(f"dataset {spec.name}: no labelled rows under {root}")
    published = classes or _class_order({f[3] for f in found})
    for source, _, _, label, _ in found:
        if label not in published:
            raise LabelError(f"{source}: unknown label {label!r}; classes are {published}")
    # A published class without rows is left out: no probe can output it and no AUROC exists for it.
    order = [c for c in published if c in {f[3] for f in found}]
    index = {name: i for i, name in enumerate(order)}
    rows = []
    for source, row_id, image, label, split in found:
        rows.append(LabelledImage(row_id, image, (index[label],), split, None, source))
    lset = LabelledSet(tuple(rows), tuple(order), False, str(root), _image_root(root), tuple(dropped))
    return BenchSet(lset, groups=tuple(r.id for r in rows), excluded=excluded or {})


# -- retfound_split ---------------------------------------------------------------------------------


@dataclass
class RetfoundOptions:
    classes: list[str] = field(default_factory=list)  # class order; empty = sorted folder names


def read_retfound_split(spec: DatasetSpec, opts: RetfoundOptions) -> BenchSet:
    """RETFound's benchmark splits: ``train|val|test/<class>/<image>``; the split and class are folders."""
    root = _root(spec)
    found = []
    for split in ("train", "val", "test"):
        directory = root / split
        if not directory.is_dir():
            raise LabelError(f"dataset {spec.name}: {directory} is missing (expected train/, val/, test/)")
        for p in sorted(directory.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                rel = p.relative_to(root)
                if len(rel.parts) != 3:
                    raise LabelError(f"{rel.as_posix()}: expected {split}/<class>/<image>")
                found.append((rel.as_posix(), rel.as_posix(), rel.as_posix(), rel.parts[1], split))
    classes = list(opts.classes) or sorted({f[3] for f in found})
    return _single(spec, root, found, [], classes)


# -- aptos2019 --------------------------------------------------------------------------------------


@dataclass
class AptosOptions:
    table: str = "train.csv"  # the labelled table (the Kaggle test.csv has no labels)
    images: str = "train_images"  # folder of <id_code>.png
    suffix: str = ".png"  # image file suffix


def read_aptos2019(spec: DatasetSpec, opts: AptosOptions) -> BenchSet:
    """APTOS-2019 as on Kaggle: ``train.csv`` (id_code, diagnosis 0-4), ``train_images/<id_code>.png``."""
    root = _root(spec)
    path = root / opts.table
    rows = _rows(path)
    _need(path, rows, ["id_code", "diagnosis"])
    found, dropped = [], []
    for source, row in rows:
        label = _cell(row, "diagnosis")
        if _missing(label, []):
            dropped.append(source)
            continue
        if not _cell(row, "id_code"):
            raise LabelError(f"{source}: column 'id_code' is empty")
        code = _cell(row, "id_code")
        found.append((source, code, f"{opts.images}/{code}{opts.suffix}", label, None))
    return _single(spec, root, found, dropped, ["0", "1", "2", "3", "4"])


# -- idrid ------------------------------------------------------------------------------------------


@dataclass
class IdridOptions:
    task: Literal["dr", "dme"] = "dr"  # dr: 'Retinopathy grade' 0-4; dme: 'Risk of macular edema' 0-2


def read_idrid(spec: DatasetSpec, opts: IdridOptions) -> BenchSet:
    """IDRiD disease grading: ``*Training Labels.csv`` / ``*Testing Labels.csv`` (Image name, Retinopathy
    grade, 'Risk of macular edema ' with its trailing space, empty trailing columns), images
    ``<Image name>.jpg`` in the ``*Training Set`` / ``*Testing Set`` folders."""
    root = _root(spec)
    # The whole IDRiD folder also holds "A. Segmentation" with its own "a. Training Set".
    base = root / "B. Disease Grading" if (root / "B. Disease Grading").is_dir() else root
    column = "Retinopathy grade" if opts.task == "dr" else "Risk of macular edema"
    found, dropped = [], []
    for split, pattern, folder in (
        ("train", "*Training Labels.csv", "trainingset"),
        ("test", "*Testing Labels.csv", "testingset"),
    ):
        tables = sorted(base.rglob(pattern))
        if len(tables) != 1:
            raise LabelError(
                f"dataset {spec.name}: expected one {pattern!r} under {base}, found {len(tables)}"
            )
        # "a. Training Set" as published; some copies drop the spaces ("a.TrainingSet").
        folders = [p for p in sorted(base.rglob("*")) if p.is_dir() and _squash(p.name).endswith(folder)]
        if len(folders) != 1:
            raise LabelError(
                f"dataset {spec.name}: expected one folder {folder!r} under {base}, found {len(folders)}"
            )
        index = _index_images(folders[0], str(folders[0]))
        rows = _rows(tables[0])
        _need(tables[0], rows, ["Image name", column])
        for source, row in rows:
            name = _cell(row, "Image name")
            if not name:
                continue  # the published CSVs end with empty rows
            label = _cell(row, column)
            if _missing(label, []):
                dropped.append(source)
                continue
            ref = (folders[0].relative_to(root) / _lookup(index, name, source, folders[0])).as_posix()
            found.append((source, f"{split}/{name}", ref, label, split))
    classes = ["0", "1", "2", "3", "4"] if opts.task == "dr" else ["0", "1", "2"]
    return _single(spec, root, found, dropped, classes)


# -- messidor2 --------------------------------------------------------------------------------------


@dataclass
class Messidor2Options:
    task: Literal["dr", "dme"] = "dr"  # dr: adjudicated_dr_grade 0-4; dme: adjudicated_dme 0/1
    table: str = "messidor_data.csv"  # the adjudicated grades (Krause et al.), as on Kaggle
    images: str = ""  # folder of the images; empty = found by file name anywhere under root


def read_messidor2(spec: DatasetSpec, opts: Messidor2Options) -> BenchSet:
    """MESSIDOR-2 with the adjudicated grades: ungradable images (adjudicated_gradable 0) are excluded
    and counted; the CSV's image_id is the file name."""
    root = _root(spec)
    path = root / opts.table
    rows = _rows(path)
    column = "adjudicated_dr_grade" if opts.task == "dr" else "adjudicated_dme"
    _need(path, rows, ["image_id", column, "adjudicated_gradable"])
    where = root / opts.images if opts.images else root
    index = _index_images(where, f"dataset {spec.name}")
    found, dropped, ungradable = [], [], 0
    for source, row in rows:
        if _binary(source, "adjudicated_gradable", _cell(row, "adjudicated_gradable")) == 0:
            ungradable += 1
            continue
        label = _cell(row, column)
        if _missing(label, []):
            dropped.append(source)
            continue
        label = str(int(float(label))) if label.replace(".", "", 1).isdigit() else label
        ref = _lookup(index, _cell(row, "image_id"), source, where)
        image_id = _cell(row, "image_id")
        found.append((source, image_id, (where.relative_to(root) / ref).as_posix(), label, None))
    classes = ["0", "1", "2", "3", "4"] if opts.task == "dr" else ["0", "1"]
    return _single(spec, root, found, dropped, classes, {"ungradable": ungradable})


# -- rfmid ------------------------------------------------------------------------------------------


@dataclass
class RfmidOptions:
    classes: list[str] = field(default_factory=list)  # disease columns; empty = all but ID, Disease_Risk
    disease_risk: bool = False  # also score Disease_Risk (any disease) as a label
    suffix: str = ".png"  # image file suffix


def read_rfmid(spec: DatasetSpec, opts: RfmidOptions) -> BenchSet:
    """RFMiD: ``RFMiD_{Training,Validation,Testing}_Labels.csv`` (ID, Disease_Risk, one 0/1 column per
    disease); images ``<ID>.png`` in the folder tree next to each CSV (IDs restart in every split)."""
    root = _root(spec)
    rows_out, groups, dropped = [], [], []
    classes: list[str] = []
    for split, name in (("train", "Training"), ("val", "Validation"), ("test", "Testing")):
        tables = sorted(root.rglob(f"*{name}_Labels.csv"))
        if len(tables) != 1:
            raise LabelError(
                f"dataset {spec.name}: expected one '*{name}_Labels.csv' under {root}, found {len(tables)}"
            )
        rows = _rows(tables[0])
        _need(tables[0], rows, ["ID", "Disease_Risk"])
        columns = [c for c in rows[0][1] if c not in ("ID", "Disease_Risk")]
        wanted = list(opts.classes) or columns
        if opts.disease_risk:
            wanted = ["Disease_Risk", *wanted]
        if not classes:
            classes = wanted
        _need(tables[0], rows, classes)
        index = _index_images(tables[0].parent, str(tables[0].parent))
        for source, row in rows:
            if any(_missing(_cell(row, c), []) for c in classes):
                dropped.append(source)
                continue
            image_id = _cell(row, "ID")
            ref = _lookup(index, f"{image_id}{opts.suffix}", source, tables[0].parent)
            ref = (tables[0].parent.relative_to(root) / ref).as_posix()
            label = tuple(_binary(source, c, _cell(row, c)) for c in classes)
            rows_out.append(LabelledImage(f"{split}/{image_id}", ref, label, split, None, source))
            groups.append(f"{split}/{image_id}")
    lset = LabelledSet(tuple(rows_out), tuple(classes), True, str(root), _image_root(root), tuple(dropped))
    return BenchSet(lset, groups=tuple(groups))


# -- odir5k -----------------------------------------------------------------------------------------


@dataclass
class Odir5kOptions:
    table: str = ""  # annotation CSV (the xlsx sheet saved as CSV); empty = the one CSV with Left-Fundus
    images: str = ""  # image folder; empty = found by file name anywhere under root


def read_odir5k(spec: DatasetSpec, opts: Odir5kOptions) -> BenchSet:
    """ODIR-5K: one row per patient (ID, Left-Fundus, Right-Fundus, N D G C A H M O): a multi-label
    patient-level task read through both eyes and the patient head."""
    root = _root(spec)
    if opts.table:
        path = root / opts.table
    else:
        sheets = sorted(root.rglob("*.xlsx"))
        tables = [
            p for p in sorted(root.rglob("*.csv")) if "Left-Fundus" in p.read_text(errors="replace")[:2000]
        ]
        if len(tables) != 1:
            hint = f" ({sheets[0].name} must be saved as CSV first)" if sheets else ""
            raise LabelError(
                f"dataset {spec.name}: expected one CSV with a Left-Fundus column under {root}, "
                f"found {len(tables)}{hint}; or set options.table"
            )
        path = tables[0]
    if path.suffix.lower() == ".xlsx":
        raise LabelError(f"{path}: save the annotation sheet as CSV (no xlsx reader is installed)")
    rows = _rows(path)
    _need(path, rows, ["ID", "Left-Fundus", "Right-Fundus", *ODIR_LABELS])
    where = root / opts.images if opts.images else root
    index = _index_images(where, f"dataset {spec.name}")
    out, right, groups, dropped, seen = [], [], [], [], {}
    for source, row in rows:
        if any(_missing(_cell(row, c), []) for c in ODIR_LABELS):
            dropped.append(source)
            continue
        patient = _cell(row, "ID")
        if patient in seen:
            raise LabelError(f"{source}: patient ID {patient!r} repeats {seen[patient]}")
        seen[patient] = source
        refs = [
            (where.relative_to(root) / _lookup(index, _cell(row, c), source, where)).as_posix()
            for c in ("Left-Fundus", "Right-Fundus")
        ]
        label = tuple(_binary(source, c, _cell(row, c)) for c in ODIR_LABELS)
        out.append(LabelledImage(patient, refs[0], label, None, "left", source))
        right.append(refs[1])
        groups.append(patient)
    if not out:
        raise LabelError(f"{path}: no labelled patients")
    lset = LabelledSet(tuple(out), ODIR_LABELS, True, str(path), _image_root(root), tuple(dropped))
    return BenchSet(lset, right=tuple(right), groups=tuple(groups))


# -- table ------------------------------------------------------------------------------------------


@dataclass
class TableOptions:
    table: str = "labels.csv"  # CSV/JSONL relative to root (retclip-eval's generic table)
    images: str = "images"  # image root relative to root (directory, zip, tar, shard set)
    label_column: str = "label"  # single-label column
    label_columns: list[str] = field(default_factory=list)  # 0/1 columns of a multi-label task
    classes: list[str] = field(default_factory=list)  # class order; empty = sorted labels
    image_column: str = "image"  # image path column
    id_column: str = "id"  # row id column
    split_column: str = "split"  # optional train/val/test column (kept as the official split)
    laterality_column: str = "laterality"  # optional left/right column
    patient_column: str = ""  # optional patient id column: drawn splits keep a patient together


def read_table(spec: DatasetSpec, opts: TableOptions) -> BenchSet:
    """The generic labelled table of retclip-eval, read by eval.data.read_labelled."""
    root = _root(spec)
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    cfg = DataConfig(**{k: v for k, v in dataclasses.asdict(opts).items() if k in fields})
    cfg.table, cfg.images = str(root / opts.table), str(root / opts.images)
    lset = read_labelled(cfg)
    groups = tuple(r.id for r in lset.rows)
    if opts.patient_column:
        by_source = {src: _cell(row, opts.patient_column) for src, row in _read_table(cfg.table)}
        groups = tuple(by_source.get(r.source) or r.id for r in lset.rows)
    return BenchSet(lset, groups=groups)


READERS: dict[str, tuple[type, Callable[[DatasetSpec, Any], BenchSet]]] = {
    "retfound_split": (RetfoundOptions, read_retfound_split),
    "aptos2019": (AptosOptions, read_aptos2019),
    "idrid": (IdridOptions, read_idrid),
    "messidor2": (Messidor2Options, read_messidor2),
    "rfmid": (RfmidOptions, read_rfmid),
    "odir5k": (Odir5kOptions, read_odir5k),
    "table": (TableOptions, read_table),
}


def layout_options(spec: DatasetSpec) -> Any:
    """The typed options of ``spec``'s layout; an unknown key is an error naming the dataset."""
    cls, _ = READERS[spec.layout]
    return from_dict(cls, spec.options, where=f"dataset {spec.name}: options")


def read_dataset(spec: DatasetSpec) -> BenchSet:
    """Read ``spec`` with its layout's reader; logs what was dropped or excluded."""
    _, reader = READERS[spec.layout]
    bset = reader(spec, layout_options(spec))
    for reason, count in bset.excluded.items():
        log.info("%s: excluded %d rows (%s)", spec.name, count, reason)
    return bset
