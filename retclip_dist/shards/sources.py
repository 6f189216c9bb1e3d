"""Input readers: a CSV/JSONL patient table (``--manifest``), or the original RET-CLIP ``{split}_imgs.tsv`` +
``{split}_texts.jsonl``. Both yield PatientRecords (images not read yet) plus per-row rejects; only an
input that cannot be read at all raises ShardInputError."""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import logging
from collections.abc import Iterator, Mapping
from typing import IO, Any

import fsspec

from retclip_dist.io import files
from retclip_dist.io.errors import CorruptData
from retclip_dist.io.roots import ImageStore
from retclip_dist.shards.records import (
    PatientRecord,
    Reject,
    RejectError,
    ShardInputError,
    normalise_relpath,
    valid_split,
)

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("patient_id", "left_image", "right_image", "report")
OPTIONAL_COLUMNS = ("left_report", "right_report", "split")


def _optional_text(row: Mapping[str, Any], column: str) -> str | None:
    value = row.get(column)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RejectError("bad_row", f"{column} must be text, got {type(value).__name__}")
    return value if value.strip() else None


def split_columns(spec: str | None) -> tuple[str, ...]:
    """``"name, mrn"`` -> ("name", "mrn"): how --identifier-columns is written."""
    return tuple(c.strip() for c in (spec or "").split(",") if c.strip())


def cell_text(row: Mapping[str, Any], column: str) -> str:
    """A cell as text ("" when absent or null): JSONL numbers become their digits."""
    value = row.get(column)
    return "" if value is None else str(value)


def record_from_row(
    row: Mapping[str, Any], order: int, source: str, identifier_columns: tuple[str, ...] = ()
) -> PatientRecord:
    """Validate one manifest row (CSV cells or a JSON object); the first failing check is the reason."""
    pid = row.get("patient_id")
    if isinstance(pid, int) and not isinstance(pid, bool):
        pid = str(pid)
    if not isinstance(pid, str) or not pid.strip():
        raise RejectError("bad_row", f"patient_id is missing or blank ({pid!r})")
    paths = {}
    for eye in ("left", "right"):
        value = row.get(f"{eye}_image")
        if value is None or value == "":
            raise RejectError("missing_eye", f"no {eye}_image")
        if not isinstance(value, str):
            raise RejectError("bad_row", f"{eye}_image must be text, got {type(value).__name__}")
        paths[eye] = normalise_relpath(value)
    report = row.get("report")
    if report is None:
        raise RejectError("missing_report", "no report field")
    if not isinstance(report, str):
        raise RejectError("bad_row", f"report must be text, got {type(report).__name__}")
    if not report.strip():
        raise RejectError("blank_report", "report is blank")
    split = _optional_text(row, "split")
    if split is not None and not valid_split(split.strip()):
        raise RejectError("bad_row", f"split {split!r} is not a plain word ([A-Za-z0-9_])")
    return PatientRecord(
        order=order,
        patient_id=pid,
        source=source,
        left=paths["left"],
        right=paths["right"],
        report=report.strip(),
        left_report=(_optional_text(row, "left_report") or "").strip() or None,
        right_report=(_optional_text(row, "right_report") or "").strip() or None,
        split=split.strip() if split else None,
        identifiers=tuple((c, cell_text(row, c)) for c in identifier_columns if cell_text(row, c).strip()),
    )


def _read_text(url: str, what: str = "manifest") -> str:
    try:
        data = files.read_bytes(url)
    except FileNotFoundError:
        raise ShardInputError(f"{what} {url}: no such file") from None
    except OSError as exc:
        raise ShardInputError(f"{what} {url}: cannot read ({exc})") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ShardInputError(f"{what} {url}: not UTF-8 text ({exc})") from exc


def _csv_rows(
    text: str,
    url: str,
    delimiter: str,
    required: tuple[str, ...],
    what: str,
    identifier_columns: tuple[str, ...] = (),
) -> Iterator[tuple[int, Mapping[str, Any] | RejectError]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        first = next(reader, None)
    except csv.Error as exc:
        raise ShardInputError(f"{what} {url}: header row is not CSV ({exc})") from None
    if first is None:
        raise ShardInputError(f"{what} {url}: empty file")
    header = [h.strip() for h in first]
    missing = [c for c in required if c not in header]
    if missing:
        raise ShardInputError(f"{what} {url}: missing required column(s) {missing}; header is {header}")
    unknown = [c for c in identifier_columns if c not in header]
    if unknown:
        raise ShardInputError(
            f"{what} {url}: no column(s) {unknown} (--identifier-columns); header is {header}"
        )
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield reader.line_num, RejectError("bad_row", f"unparseable CSV ({exc})")
            continue
        if not cells:
            continue
        if len(cells) != len(header):
            yield reader.line_num, RejectError("bad_row", f"{len(cells)} fields, header has {len(header)}")
        else:
            yield reader.line_num, dict(zip(header, cells, strict=True))


def _jsonl_rows(text: str, url: str, what: str) -> Iterator[tuple[int, Mapping[str, Any] | RejectError]]:
    parsed = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield line_no, RejectError("bad_row", f"not JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            yield line_no, RejectError("bad_row", f"expected a JSON object, got {type(obj).__name__}")
            continue
        parsed += 1
        yield line_no, obj
    if parsed == 0:
        raise ShardInputError(f"{what} {url}: no line is a JSON object; is this really JSONL?")


def table_rows(
    url: str,
    required: tuple[str, ...] = REQUIRED_COLUMNS,
    what: str = "manifest",
    identifier_columns: tuple[str, ...] = (),
) -> Iterator[tuple[int, Mapping[str, Any] | RejectError]]:
    """(line number, row or why it cannot be parsed) of a CSV (``.csv``; ``.tsv`` tab-separated) or JSONL
    (``.jsonl``/``.ndjson``, or content starting ``{``) table; a CSV header lacking ``required`` columns or
    one of ``identifier_columns``, or an unreadable file, is a ShardInputError naming it as ``what``."""
    text = _read_text(url, what)
    lower = files.basename(url).lower()
    if lower.endswith((".jsonl", ".ndjson")) or (
        not lower.endswith((".csv", ".tsv")) and text.lstrip()[:1] == "{"
    ):
        return _jsonl_rows(text, url, what)
    return _csv_rows(text, url, "\t" if lower.endswith(".tsv") else ",", required, what, identifier_columns)


def read_patient_table(
    url: str, identifier_columns: tuple[str, ...] = ()
) -> tuple[list[PatientRecord], list[Reject]]:
    """The patient table given as ``--manifest`` (one row per patient; not a shard set's manifest.json);
    each record carries the cells of ``identifier_columns`` (--scrub-reports)."""
    name = files.basename(url)
    records, rejects = [], []
    for order, (line_no, row) in enumerate(table_rows(url, identifier_columns=identifier_columns)):
        source = f"{name}:{line_no}"
        try:
            if isinstance(row, RejectError):
                raise row
            records.append(record_from_row(row, order, source, identifier_columns))
        except RejectError as exc:
            pid = row.get("patient_id", "") if isinstance(row, Mapping) else ""
            rejects.append(Reject(order, str(pid or ""), source, exc.reason, exc.detail))
    return records, rejects


def _retclip_texts(url: str) -> dict[str, str]:
    texts: dict[str, str] = {}
    for line_no, line in enumerate(_read_text(url).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text, ids = obj["text"], obj["image_ids"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            # A text line names no single patient, so it cannot become a reject; its patients will be
            # rejected as missing_report instead.
            log.warning("%s:%d: skipping unreadable text line (%s)", files.basename(url), line_no, exc)
            continue
        for pid in ids:
            texts.setdefault(str(pid), text if isinstance(text, str) else "")
    return texts


class RetclipTsvStore(ImageStore):
    """The RET-CLIP ``{split}_imgs.tsv`` as an image store; a ref (made by read_retclip) is
    ``line:offset:length:column`` of one base64 image."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.name = files.basename(url)

    def _line(self, offset: int, length: int) -> bytes:
        # Both eyes live on one line, so keep the last one read rather than fetching it twice.
        if getattr(self, "_fh_last", (None,))[0] != offset:
            if getattr(self, "_fh", None) is None:
                self._fh: IO[bytes] = fsspec.open(self.url, "rb").open()
            self._fh.seek(offset)
            self._fh_last = (offset, self._fh.read(length))
        return self._fh_last[1]

    def read(self, ref: str) -> bytes:
        line_no, offset, length, column = (int(x) for x in ref.split(":"))
        field = self._line(offset, length).rstrip(b"\r\n").split(b"\t")[column]
        try:
            return base64.b64decode(field, validate=True)
        except binascii.Error as exc:
            raise CorruptData(f"{self.name}:{line_no}: column {column + 1} is not base64 ({exc})") from None

    def describe(self, ref: str) -> str:
        line_no, _, _, column = ref.split(":")
        return f"{self.name}:{line_no}:{'left' if column == '1' else 'right'}"


def read_retclip(directory: str, split: str) -> tuple[list[PatientRecord], list[Reject], RetclipTsvStore]:
    """Index ``{split}_imgs.tsv`` by byte offset (images stay on disk) and join ``{split}_texts.jsonl``."""
    tsv_url = files.join(directory, f"{split}_imgs.tsv")
    texts_url = files.join(directory, f"{split}_texts.jsonl")
    for url in (tsv_url, texts_url):
        if not files.exists(url):
            raise ShardInputError(f"RET-CLIP dir {directory}: {files.basename(url)} not found")
    texts = _retclip_texts(texts_url)
    name = files.basename(tsv_url)
    records, rejects = [], []
    offset = 0
    with fsspec.open(tsv_url, "rb") as fh:
        for order, line in enumerate(fh):
            source = f"{name}:{order + 1}"
            fields = line.rstrip(b"\r\n").split(b"\t")
            pid = fields[0].decode("utf-8", "replace").strip()
            ref = f"{order + 1}:{offset}:{len(line)}"
            offset += len(line)
            try:
                if len(fields) != 3 or not pid:
                    raise RejectError("bad_row", f"expected 3 tab-separated fields, got {len(fields)}")
                for column, eye in ((1, "left"), (2, "right")):
                    if not fields[column].strip():
                        raise RejectError("missing_eye", f"no {eye} image")
                if pid not in texts:
                    raise RejectError("missing_report", f"{pid} is in no line of {files.basename(texts_url)}")
                if not texts[pid].strip():
                    raise RejectError("blank_report", "report is blank")
            except RejectError as exc:
                rejects.append(Reject(order, pid, source, exc.reason, exc.detail))
                continue
            records.append(
                PatientRecord(
                    order=order,
                    patient_id=pid,
                    source=source,
                    left=f"{ref}:1",
                    right=f"{ref}:2",
                    report=texts[pid].strip(),
                )
            )
    return records, rejects, RetclipTsvStore(tsv_url)
