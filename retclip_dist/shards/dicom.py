"""``make-shards build --dicom``: a PACS export of ophthalmic photographs, read by its tags.

Every file under the export is read once for its tags (in ``--workers`` processes). A file that is not
one readable photograph is a counted reject naming why; the photos are grouped into visits of a patient
(tags, not file names), one photo per eye is chosen by a fixed rule, reports are joined from a table,
and each visit becomes a PatientRecord exactly like a row of ``--manifest``: planning, pseudonyms and
packing are the manifest path's. The derived table can be written (``--write-manifest``) and built later
with ``--manifest``, because the image step decodes DICOM files wherever they come from (image_bytes).

What is read from which tag is in docs/shards.md ("DICOM exports"); no tag value is written into a sample
except the patient id, which --pseudonymise replaces like any id. pydicom is imported only when a DICOM
file is met, so the rest of make-shards works without the ``dicom`` extra.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, MutableSequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from retclip_dist.io import files
from retclip_dist.io.errors import ImageReadError, ImageRootError
from retclip_dist.io.files import OutputDir
from retclip_dist.io.roots import ImageStore, open_image_root
from retclip_dist.runtime.workers import process_pool
from retclip_dist.seeds import hash_unit
from retclip_dist.shards.records import PatientRecord, Reject, RejectError, ShardInputError, read_reject
from retclip_dist.shards.sources import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, table_rows
from retclip_dist.shardset import EYES

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'retclip-dist[dicom]'"
# JPEG Lossless, JPEG-LS and 12-bit JPEG Extended: Pillow cannot decode them, pylibjpeg-libjpeg can. It is
# GPL-3.0 licensed, so it is an extra of its own that a hospital installs knowingly.
LIBJPEG_HINT = "pip install 'retclip-dist[dicom-libjpeg]'"
_LIBJPEG_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.51",  # JPEG Extended (12-bit)
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    }
)

# Part 10 files: a 128-byte preamble, then these four bytes.
_MAGIC_AT, _MAGIC = 128, b"DICM"
# SOP classes holding one photograph of the eye (or a secondary capture of one); anything else (OCT
# volumes, reports, PDFs, DICOMDIR, presentation states) is not_photo.
PHOTO_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.77.1.5.1": "Ophthalmic Photography 8 Bit Image",
    "1.2.840.10008.5.1.4.1.1.77.1.5.2": "Ophthalmic Photography 16 Bit Image",
    "1.2.840.10008.5.1.4.1.1.77.1.5.7": "Wide Field Ophthalmic Photography Stereographic Projection Image",
    "1.2.840.10008.5.1.4.1.1.77.1.5.8": "Wide Field Ophthalmic Photography 3D Coordinates Image",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL Photographic Image",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image",
}
PHOTO_MODALITIES = ("OP", "XC")  # ophthalmic photography, external-camera photography
# Photometric interpretations decoded to RGB or grey (PS3.3 C.7.6.3.1.2) -> their samples per pixel;
# YBR_PARTIAL_* are video only, ARGB, CMYK and HSV retired.
_SAMPLES = {
    **dict.fromkeys(("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"), "3"),
    **dict.fromkeys(("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"), "1"),
}
_LATERALITY = {"L": "left", "R": "right"}
# Tags whose values name the patient or the visit: reports often repeat them, so --scrub-reports removes
# them from the visit's report and a --pseudonymise build audits its output for them.
IDENTIFYING_TAGS = (
    "PatientID",
    "OtherPatientIDs",
    "PatientName",
    "PatientBirthName",
    "PatientMotherBirthName",
    "AccessionNumber",
)
REPORT_COLUMN = "report"
_EYE_REPORT_COLUMNS = ("left_report", "right_report")
# Columns of the --write-manifest table: the --manifest columns, then what the pairing saw.
MANIFEST_COLUMNS = (
    *REQUIRED_COLUMNS,
    *OPTIONAL_COLUMNS,
    "patient",
    "visit",
    "study_date",
    "studies",
    "rejected",
)


@dataclass(frozen=True)
class DicomOptions:
    """Where a DICOM export is and how its photos become patients (make-shards flags: field name, or
    metadata "flag")."""

    # DICOM export to read instead of --manifest: a directory, .zip, .tar or .tar.gz (or s3://), searched
    # recursively; photos are paired into patients and visits by their tags
    root: str | None = field(default=None, metadata={"flag": "--dicom", "metavar": "DIR"})
    # with --dicom: CSV/TSV/JSONL table of reports with a `report` column (optional left_report,
    # right_report) and a column named like --report-key
    reports: str | None = None
    # the tag whose value finds a visit's row in --reports (the column is named like the tag)
    report_key: Literal["AccessionNumber", "StudyInstanceUID", "PatientID"] = "AccessionNumber"
    # one visit = one StudyInstanceUID (study), or all studies of a patient on one StudyDate (date: for
    # cameras that open a study per eye)
    visit: Literal["study", "date"] = field(default="study", metadata={"flag": "--dicom-visit"})
    # with --dicom: write the derived patient table (CSV, tag values included: keep it in the hospital)
    # here; `make-shards build --manifest FILE --images DIR` builds the same shards from it
    write_manifest: str | None = field(default=None, metadata={"metavar": "FILE"})

    def validate(self, out: str) -> None:
        if self.root is None:
            for flag, value in (("--reports", self.reports), ("--write-manifest", self.write_manifest)):
                if value is not None:
                    raise ShardInputError(f"{flag} is for --dicom builds only")
            return
        if self.reports is None:
            raise ShardInputError("--dicom needs --reports (the table the visits' reports are joined from)")
        if self.write_manifest is not None and _inside(self.write_manifest, out):
            raise ShardInputError(
                f"--write-manifest {self.write_manifest} is inside the output directory {out}; the derived "
                "table holds tag values (patient ids, dates), so write it elsewhere"
            )

    def recorded(self) -> dict[str, Any]:
        """What manifest.json records: everything that shapes the shards (not where the table went)."""
        return {
            "root": self.root,
            "reports": self.reports,
            "report_key": self.report_key,
            "visit": self.visit,
        }


def _inside(path: str, directory: str) -> bool:
    if files.is_local(path) and files.is_local(directory):
        path, directory = os.path.realpath(path), os.path.realpath(directory)
        return os.path.commonpath([path, directory]) == directory
    return path.startswith(directory.rstrip("/") + "/")


def import_pydicom() -> ModuleType:
    """pydicom, or ShardInputError naming the extra to install."""
    try:
        import pydicom
        import pydicom.encaps
        import pydicom.errors
        import pydicom.pixels
        import pydicom.pixels.utils
        import pydicom.uid
    except ImportError:
        raise ShardInputError(f"--dicom needs pydicom, which is not installed: {INSTALL_HINT}") from None
    return pydicom


def is_dicom(data: bytes) -> bool:
    return data[_MAGIC_AT : _MAGIC_AT + len(_MAGIC)] == _MAGIC


def _text(ds: Any, keyword: str) -> str:
    """A tag's value as stripped text ("" when absent or empty)."""
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _read_dataset(pydicom: ModuleType, data: bytes) -> Any:
    """The parsed dataset, or RejectError (not_dicom, truncated, undecodable)."""
    try:
        with warnings.catch_warnings():
            # pydicom warns about harmless deviations (VR mismatches, odd lengths); what matters is
            # checked below and becomes a reject.
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data))
    except pydicom.errors.InvalidDicomError as exc:
        raise RejectError("not_dicom", str(exc)) from None
    except EOFError as exc:
        raise RejectError("truncated", f"the file ends inside its tags ({exc})") from None
    except Exception as exc:
        # A damaged file can fail anywhere in pydicom's parser; any failure means "cannot be read".
        raise RejectError("undecodable", f"{type(exc).__name__}: {exc}") from None


def _decoder(pydicom: ModuleType, ds: Any) -> Any:
    """pydicom's decoder for the file's transfer syntax, or RejectError (no_decoder, undecodable)."""
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if not tsyntax:
        raise RejectError("undecodable", "no TransferSyntaxUID (0002,0010) in the file meta information")
    try:
        decoder = pydicom.pixels.get_decoder(tsyntax)
    except NotImplementedError:
        raise RejectError("no_decoder", f"pydicom has no decoder for {tsyntax.name} ({tsyntax})") from None
    if not decoder.is_available:
        hint = LIBJPEG_HINT if tsyntax in _LIBJPEG_SYNTAXES else "; ".join(decoder.missing_dependencies)
        raise RejectError("no_decoder", f"{tsyntax.name}: no decoder installed ({hint})")
    return decoder


@dataclass(frozen=True)
class Photo:
    """One photograph of the export as its tags describe it (values stay in this process and the derived
    table; samples get only the visit's id)."""

    number: int  # position of the file in the sorted listing of the export, from 1
    ref: str  # path inside the export
    patient: str  # PatientID (0010,0020)
    study: str  # StudyInstanceUID (0020,000D)
    study_date: str  # StudyDate (0008,0020), "" when absent
    study_time: str  # StudyTime (0008,0030), "" when absent
    accession: str  # AccessionNumber (0008,0050), "" when absent
    eye: str  # "left" or "right"
    colour: bool  # three samples per pixel (a colour photo, not red-free, angiography or IR)
    pixels: int  # rows x columns
    acquired: str  # acquisition date-time as sortable digits, "" when no tag gives it
    # (tag keyword, value) of the tags that name the patient (IDENTIFYING_TAGS): what --scrub-reports removes
    # from the visit's report besides its id, and what a --pseudonymise build audits its output for
    identifiers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class FileReject:
    number: int  # position of the file in the sorted listing of the export, from 1
    ref: str  # path inside the export
    patient: str  # PatientID when it could be read, else ""
    reason: str  # a key of REJECT_REASONS
    detail: str  # why, for rejects.jsonl


def _laterality(ds: Any) -> str:
    """The eye from ImageLaterality (0020,0062), else Laterality (0020,0060); RejectError otherwise."""
    image, series = _text(ds, "ImageLaterality").upper(), _text(ds, "Laterality").upper()
    if image and image not in _LATERALITY:
        raise RejectError("no_laterality", f"ImageLaterality is {image!r} (not one eye)")
    if image and series in _LATERALITY and series != image:
        raise RejectError("no_laterality", f"ImageLaterality {image!r} and Laterality {series!r} disagree")
    value = image or series
    if not value:
        raise RejectError("no_laterality", "neither ImageLaterality nor Laterality is given")
    if value not in _LATERALITY:
        raise RejectError("no_laterality", f"no ImageLaterality, and Laterality is {value!r}")
    return _LATERALITY[value]


def _acquired(ds: Any) -> str:
    """When the photo was taken, as digits that sort in time order (timezone offsets dropped)."""
    stamp = _text(ds, "AcquisitionDateTime")
    for date, time in (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime")):
        if not stamp and _text(ds, date):
            stamp = _text(ds, date) + _text(ds, time)
    return re.sub(r"[^0-9.]", "", re.split(r"[+-]", stamp)[0])


def _check_pixel_data(pydicom: ModuleType, ds: Any, decoder: Any) -> None:
    """RejectError (truncated) unless the pixel data is all there, checked without decoding it."""
    if "PixelData" not in ds:
        raise RejectError("truncated", "no pixel data: the file ends early")
    if decoder.is_native:
        expected = pydicom.pixels.utils.get_expected_length(ds, unit="bytes")
        if len(ds.PixelData) < expected:
            raise RejectError("truncated", f"{len(ds.PixelData)} bytes of pixel data, expected {expected}")
        return
    try:
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    except Exception as exc:
        # Damaged encapsulation fails in pydicom's item parser with varying exception types.
        raise RejectError("truncated", f"encapsulated pixel data is incomplete ({exc})") from None
    if not frame:
        raise RejectError("truncated", "encapsulated pixel data has an empty frame")


def photo_from(pydicom: ModuleType, ds: Any, number: int, ref: str) -> Photo:
    """The Photo a parsed file holds, or RejectError with the first reason it is not one."""
    sop_class = _text(ds, "SOPClassUID") or _text(getattr(ds, "file_meta", {}), "MediaStorageSOPClassUID")
    if not sop_class:
        raise RejectError("undecodable", "no SOPClassUID (0008,0016): the object cannot be identified")
    if sop_class not in PHOTO_SOP_CLASSES:
        raise RejectError("not_photo", f"SOP class {pydicom.uid.UID(sop_class).name} is not a photograph")
    if "PixelData" not in ds:
        # pydicom stops quietly where a file ends, so a photo object without pixels is a cut-off file.
        raise RejectError("truncated", "a photo object without pixel data: the file ends early")
    modality = _text(ds, "Modality")
    if modality not in PHOTO_MODALITIES:
        raise RejectError("not_photo", f"modality {modality!r} is not {' or '.join(PHOTO_MODALITIES)}")
    frames = _text(ds, "NumberOfFrames") or "1"
    if frames != "1":
        raise RejectError("not_photo", f"{frames} frames; one photograph per file is read")
    interpretation, samples = _text(ds, "PhotometricInterpretation"), _text(ds, "SamplesPerPixel")
    if _SAMPLES.get(interpretation) != samples:
        raise RejectError(
            "undecodable", f"photometric interpretation {interpretation!r} with {samples} samples per pixel"
        )
    decoder = _decoder(pydicom, ds)
    _check_pixel_data(pydicom, ds, decoder)
    patient, study = _text(ds, "PatientID"), _text(ds, "StudyInstanceUID")
    for keyword, value in (("PatientID", patient), ("StudyInstanceUID", study)):
        if not value:
            raise RejectError("missing_tag", f"no {keyword}")
    return Photo(
        number=number,
        ref=ref,
        patient=patient,
        study=study,
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        accession=_text(ds, "AccessionNumber"),
        eye=_laterality(ds),
        colour=samples == "3",
        pixels=int(ds.Rows) * int(ds.Columns),
        acquired=_acquired(ds),
        identifiers=_identifiers(ds),
    )


def _identifiers(ds: Any) -> tuple[tuple[str, str], ...]:
    """The values of IDENTIFYING_TAGS in ``ds`` (person names with their ``^`` parts as spaces)."""
    found = []
    for keyword in IDENTIFYING_TAGS:
        value = ds.get(keyword)
        values = list(value) if isinstance(value, MutableSequence) else [value]  # pydicom's MultiValue
        for v in values:
            text = " ".join(str(v or "").replace("^", " ").split())
            if text:
                found.append((keyword, text))
    return tuple(found)


def scan_file(store: ImageStore, number: int, ref: str) -> Photo | FileReject:
    """File ``number`` of the export read for its tags (the pixels are checked for presence only)."""
    try:
        data = store.read(ref)
    except ImageReadError as exc:
        err = read_reject(exc)
        return FileReject(number, ref, "", err.reason, err.detail)
    if not is_dicom(data):
        return FileReject(number, ref, "", "not_dicom", f"{ref}: no DICM marker at byte {_MAGIC_AT}")
    pydicom = import_pydicom()
    try:
        ds = _read_dataset(pydicom, data)
    except RejectError as exc:
        return FileReject(number, ref, "", exc.reason, f"{ref}: {exc.detail}")
    try:
        return photo_from(pydicom, ds, number, ref)
    except RejectError as exc:
        reason, detail = exc.reason, exc.detail
    except Exception as exc:
        # A tag a photo needs is missing or malformed (Rows, Bits Allocated, ...): pydicom raises many types.
        reason, detail = "undecodable", f"{type(exc).__name__}: {exc}"
    # The patient helps the owner find a rejected file; a pseudonymised rejects.jsonl hashes it.
    return FileReject(number, ref, _text(ds, "PatientID"), reason, f"{ref}: {detail}")


_scan_store: ImageStore | None = None


def _init_scan(store: ImageStore) -> None:
    global _scan_store
    _scan_store = store


def _scan(item: tuple[int, str]) -> Photo | FileReject:
    assert _scan_store is not None, "pool initializer did not run"
    return scan_file(_scan_store, *item)


def scan_export(store: ImageStore, workers: int, progress: bool) -> Iterator[Photo | FileReject]:
    """Every file of the export, in sorted path order, as a Photo or a FileReject."""
    items = list(enumerate(store.names(), start=1))
    bar = tqdm(total=len(items), unit="file", desc="reading DICOM tags", disable=not progress)
    with bar:
        if workers == 1:
            results: Iterator[Photo | FileReject] = (scan_file(store, *item) for item in items)
            for result in results:
                bar.update(1)
                yield result
            return
        chunk = max(1, min(64, len(items) // (workers * 8)))
        with process_pool(workers, _init_scan, (store,)) as pool:  # never a fork of this threaded process
            for result in pool.imap(_scan, items, chunksize=chunk):
                bar.update(1)
                yield result


@dataclass(frozen=True)
class Report:
    text: str  # patient-level report
    left: str | None  # per-eye report, where the table has one
    right: str | None


class ReportTable:
    """The --reports table by key value; a key with two different rows is remembered as ambiguous."""

    def __init__(self, url: str, key: str) -> None:
        self.name = files.basename(url)
        self.key = key
        self.rows: dict[str, Report] = {}
        self.lines: dict[str, list[int]] = {}
        self.ambiguous: set[str] = set()
        skipped: list[str] = []
        for line_no, row in table_rows(url, (key, REPORT_COLUMN), "reports"):
            why = row.detail if isinstance(row, RejectError) else self._add(line_no, row)
            if why:
                skipped.append(f"{line_no} ({why})")
        if skipped:
            # A row names no visit by itself: its visits become missing_report, and this says why.
            log.warning("%s: %d rows skipped: lines %s", self.name, len(skipped), ", ".join(skipped[:10]))
        if not self.rows:
            raise ShardInputError(f"reports {url}: no row has a {key} and a {REPORT_COLUMN}")

    def _add(self, line_no: int, row: Mapping[str, Any]) -> str:
        """Take one row; the reason it cannot be used, or ""."""
        value, text = row.get(self.key), row.get(REPORT_COLUMN)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            return f"no {self.key}"
        if not isinstance(text, str):
            return f"no {REPORT_COLUMN} text"
        left, right = (_optional(row.get(column)) for column in _EYE_REPORT_COLUMNS)
        report = Report(text.strip(), left, right)
        key = value.strip()
        self.lines.setdefault(key, []).append(line_no)
        if self.rows.setdefault(key, report) != report:
            self.ambiguous.add(key)
        return ""

    def find(self, key: str) -> Report:
        where = f"{self.name}:{','.join(map(str, self.lines.get(key, [])))}"
        if key in self.ambiguous:
            raise RejectError(
                "ambiguous_report", f"{where}: {self.key} {key} has rows with different reports"
            )
        if key not in self.rows:
            raise RejectError("missing_report", f"no row of {self.name} has {self.key} {key}")
        if not self.rows[key].text:
            raise RejectError("blank_report", f"{where}: report is blank")
        return self.rows[key]


def _optional(value: Any) -> str | None:
    return value.strip() or None if isinstance(value, str) else None


def _key_value(photo: Photo, key: str) -> str:
    return {"AccessionNumber": photo.accession, "StudyInstanceUID": photo.study, "PatientID": photo.patient}[
        key
    ]


def choice_rank(photo: Photo) -> tuple[Any, ...]:
    """The rule that picks one photo of an eye in a visit (smallest first): a colour photo before a
    monochrome one (red-free, angiography, infrared), then the earliest acquisition (no time last), then the
    most pixels, then the first path."""
    return (not photo.colour, not photo.acquired, photo.acquired, -photo.pixels, photo.ref)


@dataclass
class Visit:
    """The photos of one patient's visit, and what became of it."""

    patient: str  # PatientID
    number: int  # 1 for the patient's earliest visit
    photos: dict[str, list[Photo]]  # eye -> photos, chosen first (choice_rank)
    split: str  # decided on the patient, so all of a patient's visits land in one split
    report: Report | None = None  # joined from --reports, when found
    reject: RejectError | None = None  # why the visit is not a sample, if it is not

    @property
    def id(self) -> str:
        """The sample's patient id: unique per visit, and ``-v<digits>`` cannot end a patient id ambiguously."""
        return f"{self.patient}-v{self.number}"

    def chosen(self, eye: str) -> Photo | None:
        return self.photos[eye][0] if self.photos[eye] else None

    @property
    def identifiers(self) -> tuple[tuple[str, str], ...]:
        """The identifying tag values of every photo of the visit, each once, in tag order."""
        found = {pair for photos in self.photos.values() for photo in photos for pair in photo.identifiers}
        return tuple(sorted(found, key=lambda kv: (IDENTIFYING_TAGS.index(kv[0]), kv[1])))

    @property
    def source(self) -> str:
        """Where the visit is, for rejects: the chosen files' numbers in the sorted listing of the export."""
        return ",".join(str(p.number) for p in (self.chosen(eye) for eye in EYES) if p is not None)


def group_visits(
    photos: list[Photo], mode: str, split_of: Callable[[str], str]
) -> tuple[list[Visit], list[FileReject]]:
    """Visits of each patient (sorted by patient id, then date), one chosen photo per eye; every photo not
    chosen is an extra_photo reject."""
    by_visit: dict[tuple[str, str], list[Photo]] = {}
    for photo in photos:
        key = photo.study_date if mode == "date" and photo.study_date else "uid:" + photo.study
        by_visit.setdefault((photo.patient, key), []).append(photo)
    ordered = sorted(
        by_visit.items(),
        key=lambda kv: (kv[0][0], min((p.study_date, p.study_time) for p in kv[1]), kv[0][1]),
    )
    visits: list[Visit] = []
    extras: list[FileReject] = []
    for (patient, _), members in ordered:
        number = 1 if not visits or visits[-1].patient != patient else visits[-1].number + 1
        per_eye = {eye: sorted((p for p in members if p.eye == eye), key=choice_rank) for eye in EYES}
        visit = Visit(patient, number, per_eye, split_of(patient))
        for eye in EYES:
            for other in per_eye[eye][1:]:
                detail = f"{other.ref}: visit {visit.id} has {len(per_eye[eye])} {eye}-eye photos; {per_eye[eye][0].ref} was chosen"
                extras.append(FileReject(other.number, other.ref, patient, "extra_photo", detail))
        visits.append(visit)
    return visits, extras


def _others_same_day(visit: Visit, visits: list[Visit], eye: str) -> bool:
    day = {p.study_date for ps in visit.photos.values() for p in ps} - {""}
    return any(
        v.patient == visit.patient and v is not visit and any(p.study_date in day for p in v.photos[eye])
        for v in visits
    )


def join_reports(visits: list[Visit], table: ReportTable, mode: str) -> None:
    """Set each visit's report, or its reject (missing_eye, missing/blank/ambiguous_report)."""
    for visit in visits:
        try:
            for eye in EYES:
                if visit.chosen(eye) is None:
                    hint = ""
                    if mode == "study" and _others_same_day(visit, visits, eye):
                        hint = "; another study of this patient on the same day has one (--dicom-visit date pairs them)"
                    raise RejectError("missing_eye", f"visit {visit.id} has no {eye}-eye photo{hint}")
            reports = {}
            for eye in EYES:
                photo = visit.chosen(eye)
                assert photo is not None
                value = _key_value(photo, table.key)
                if not value:
                    raise RejectError("missing_report", f"{photo.ref} has no {table.key}")
                reports[value] = table.find(value)
            if len(set(reports.values())) > 1:
                raise RejectError(
                    "ambiguous_report",
                    f"visit {visit.id}: the left and right photos have different {table.key}s with different reports",
                )
            visit.report = next(iter(reports.values()))
        except RejectError as exc:
            visit.reject = exc


def records(
    visits: list[Visit], root_name: str, first_order: int
) -> tuple[list[PatientRecord], list[Reject]]:
    """The visits as manifest-path records (orders after every file's), or visit-level rejects."""
    kept, rejected = [], []
    for index, visit in enumerate(visits):
        order, source = first_order + index, f"{root_name}:{visit.source}"
        if visit.reject is not None:
            rejected.append(Reject(order, visit.id, source, visit.reject.reason, visit.reject.detail))
            continue
        left, right, report = visit.chosen("left"), visit.chosen("right"), visit.report
        assert left is not None and right is not None and report is not None
        kept.append(
            PatientRecord(
                order=order,
                patient_id=visit.id,
                source=source,
                left=left.ref,
                right=right.ref,
                report=report.text,
                left_report=report.left,
                right_report=report.right,
                split=visit.split,
                identifiers=visit.identifiers,
            )
        )
    return kept, rejected


def manifest_csv(visits: list[Visit]) -> str:
    """The derived table: one row per visit (rejected ones too, with the reason, so they can be fixed
    by hand), readable by ``--manifest`` with paths relative to the export."""
    out = io.StringIO()
    writer = csv.DictWriter(out, MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for visit in visits:
        report = visit.report or Report("", None, None)
        photos = [p for ps in visit.photos.values() for p in ps]
        row = {f"{eye}_image": getattr(visit.chosen(eye), "ref", "") for eye in EYES}
        writer.writerow(
            row
            | {
                "patient_id": visit.id,
                "report": report.text,
                "left_report": report.left or "",
                "right_report": report.right or "",
                "split": visit.split,
                "patient": visit.patient,
                "visit": visit.number,
                "study_date": min(p.study_date for p in photos),
                "studies": ";".join(sorted({p.study for p in photos})),
                "rejected": visit.reject.reason if visit.reject is not None else "",
            }
        )
    return out.getvalue()


def _write_text(url: str, text: str) -> None:
    parent, _, name = url.rstrip("/").rpartition("/")
    OutputDir(parent or ".").write_text(name, text)


def read_dicom_export(
    opts: DicomOptions, default_split: str, val_fraction: float, seed: int, workers: int, progress: bool
) -> tuple[list[PatientRecord], list[Reject], ImageStore]:
    """Records (one per complete visit), rejects (files, then visits) and the export as an image store."""
    assert opts.root is not None and opts.reports is not None  # BuildOptions.validate guarantees both
    import_pydicom()
    table = ReportTable(opts.reports, opts.report_key)
    try:
        store = open_image_root(opts.root)
    except ImageRootError as exc:
        raise ShardInputError(str(exc).replace("image root", "--dicom", 1)) from exc
    try:
        scanned = list(scan_export(store, workers, progress))
        if not scanned:
            raise ShardInputError(f"--dicom {opts.root}: no files found")
        photos = [s for s in scanned if isinstance(s, Photo)]
        file_rejects = [s for s in scanned if isinstance(s, FileReject)]

        def split_of(patient: str) -> str:
            # The val share is decided per patient (plan() decides per row, and a row here is a visit).
            return "val" if hash_unit("val", seed, patient) < val_fraction else default_split

        visits, extras = group_visits(photos, opts.visit, split_of)
        join_reports(visits, table, opts.visit)
        root_name = files.basename(opts.root)
        rejects = [
            Reject(r.number - 1, r.patient, f"{root_name}:{r.number}", r.reason, r.detail)
            for r in sorted(file_rejects + extras, key=lambda r: r.number)
        ]
        kept, visit_rejects = records(visits, root_name, len(scanned))
        log.info(
            "%s: %d files, %d photos in %d visits of %d patients; %d visits complete",
            opts.root,
            len(scanned),
            len(photos),
            len(visits),
            len({v.patient for v in visits}),
            len(kept),
        )
        if opts.write_manifest is not None:
            _write_text(opts.write_manifest, manifest_csv(visits))
            log.info("wrote the derived patient table to %s (%d visits)", opts.write_manifest, len(visits))
    except BaseException:
        store.cleanup()
        raise
    return kept, rejects + visit_rejects, store


def _to_eight_bits(arr: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned samples of ``bits`` significant bits scaled to 0..255 (rounded), as images.to_rgb does
    for 16-bit grey."""
    if arr.dtype == np.uint8 and bits == 8:
        return arr
    top = (1 << bits) - 1
    wide = np.clip(arr.astype(np.int64), 0, top)
    return ((wide * 255 + top // 2) // top).astype(np.uint8)


def decode_photo(data: bytes, max_pixels: int) -> Image.Image:
    """The photo of a DICOM file as 8-bit RGB or grey, converted as PS3.3 C.7.6.3.1.2 says: YBR to RGB
    (pydicom, or the JPEG 2000 decoder for YBR_ICT/RCT), PALETTE COLOR through its lookup table,
    MONOCHROME1 inverted, more than 8 bits scaled to 8. RejectError (with a reason) when it cannot be."""
    pydicom = import_pydicom()
    ds = _read_dataset(pydicom, data)
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        if rows * columns > max_pixels:
            raise RejectError("too_many_pixels", f"{columns}x{rows} is over {max_pixels} pixels")
        decoder = _decoder(pydicom, ds)
        _check_pixel_data(pydicom, ds, decoder)
        # Pillow's decoder first where it has one: the pixels then do not depend on which optional
        # decoders happen to be installed (pylibjpeg's JPEG decoder rounds differently).
        plugin = "pillow" if decoder.is_encapsulated and "pillow" in decoder.available_plugins else ""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr, props = decoder.as_array(ds, index=0, decoding_plugin=plugin)
        interpretation = str(props["photometric_interpretation"])
        bits = int(ds.BitsStored)
        if interpretation == "PALETTE COLOR":
            arr = pydicom.pixels.apply_color_lut(arr, ds)
            bits = 8 * arr.dtype.itemsize
        elif int(ds.get("PixelRepresentation", 0)) == 1:
            arr = arr.astype(np.int64) + (1 << (bits - 1))  # signed samples: the lowest value is black
        if interpretation not in ("RGB", "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"):
            raise RejectError("undecodable", f"pixels decoded as {interpretation}, not RGB")
        eight = _to_eight_bits(arr, bits)
        if interpretation == "MONOCHROME1":
            eight = 255 - eight  # MONOCHROME1: the lowest value is white
    except RejectError:
        raise
    except Exception as exc:
        # Decoders raise many types on damaged streams; any of them means the photo cannot be read.
        raise RejectError("undecodable", f"{type(exc).__name__}: {exc}") from None
    return Image.fromarray(np.ascontiguousarray(eight), "RGB" if eight.ndim == 3 else "L")


def image_bytes(data: bytes, max_pixels: int) -> bytes:
    """Bytes that PIL opens: a DICOM file becomes a PPM/PGM of its decoded photo (lossless, and no tag comes
    along); anything else is returned as it is."""
    if not is_dicom(data):
        return data
    try:
        import_pydicom()
    except ShardInputError:
        raise RejectError(
            "no_decoder", f"a DICOM file, and pydicom is not installed ({INSTALL_HINT})"
        ) from None
    img = decode_photo(data, max_pixels)
    out = io.BytesIO()
    img.save(out, "PPM")
    return out.getvalue()
