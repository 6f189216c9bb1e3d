"""make-shards audit: search every byte of a shard set for the patient table's identifiers and for
patterns, before the set leaves the hospital. It is what a data-protection officer runs before the copy,
and a --pseudonymise build runs it on its own output.

What is searched, in every file under the directory (shards, manifest.json, rejects.jsonl, anything else):
tar headers (member names, owner names, pax records) and padding, text and JSON members, every metadata
segment of every JPEG (APPn: EXIF, XMP, ICC, IPTC; COM; the tables) and bytes after its end, gzip files
after decompression, and any other file whole. Each region is read as UTF-8 and, where it is binary, as
Latin-1 and (where it has NUL bytes) as UTF-16 in both byte orders; JSON ``\\uXXXX`` escapes are undone.

How identifiers are matched: text and identifiers are cut into tokens (runs of letters, runs of digits,
single CJK characters), Unicode-normalised (NFKC: full-width forms count as ASCII) and case-folded; an
identifier is found where its tokens follow each other with anything but letters and digits between
("Anna Rossi" in "ANNA-ROSSI", "anna  rossi"), or run together ("annarossi", "HOSP0091427"). A token never
matches part of a longer run, so "12345678" is not found in "123456789". Identifiers that would match
by chance are not searched and are counted instead: a lone number under MIN_DIGITS digits (it cannot be
told from a size or a count), anything under MIN_CHARS letters and digits (a single CJK character).
Runs of 16 or more hex digits (pseudonyms, digests) are not tokens, so an id cannot be "found" in a hash.

What is not searched, and said so in the summary: the entropy-coded scan data of JPEG images (compressed
pixels: random bytes in which short ids would match by chance; metadata cannot hide there), any other
compressed data except gzip, and anything drawn in the pixels (burned-in text inside the field, a face).
"""

from __future__ import annotations

import gzip
import re
import unicodedata
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

import fsspec

from retclip_dist.io import files
from retclip_dist.shards.records import PatientRecord, Reject, RejectError, ShardInputError
from retclip_dist.shards.sources import cell_text, table_rows

# Identifier columns every patient table has; image paths often hold names, dates or record numbers.
TABLE_ID_COLUMNS = ("patient_id", "left_image", "right_image")
MIN_DIGITS = 6  # a number-only identifier needs this many digits to be searched
MIN_CHARS = 4  # any identifier needs this many letters and digits (CJK characters count double)

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{_CJK}]|\d+|[^\W\d_{_CJK}]+")
_HEX = re.compile(r"(?<![0-9A-Za-z])(?=[0-9]*[A-Fa-f])[0-9A-Fa-f]{16,}(?![0-9A-Za-z])")
_JSON_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")
_BLOCK = 512


@dataclass(frozen=True)
class Needle:
    """One identifier to search for."""

    tokens: tuple[str, ...]  # normalised tokens, matched consecutively
    label: str  # where it comes from: "mrn of patients.csv:12"
    value: str  # as written in the table


@dataclass(frozen=True)
class Hit:
    file: str  # path relative to the audited directory
    member: str  # tar member name ("" for a plain file)
    offset: int  # byte offset in the file (of the region, where the text had to be decoded first)
    matched: str  # the text found
    what: str  # which identifier or pattern
    encoding: str  # how the bytes were read: utf-8, latin-1, utf-16-le, json-escaped, gunzipped ...

    def line(self) -> str:
        where = f"{self.file}:{self.member}" if self.member else self.file
        return f"HIT {where} @{self.offset} ({self.encoding}): {self.matched!r} = {self.what}"


def _fold(token: str) -> str:
    return token.lower() if token.isascii() else unicodedata.normalize("NFKC", token).casefold()


def _is_cjk(token: str) -> bool:
    return len(token) == 1 and bool(re.match(f"[{_CJK}]", token))


def tokenise(text: str) -> tuple[list[str], list[int]]:
    """Normalised tokens of ``text`` and the character offset of each; hex runs are left out."""
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    if len(text) >= 16:
        text = _HEX.sub(lambda m: " " * len(m[0]), text)
    tokens, offsets = [], []
    for m in _TOKEN.finditer(text):
        tokens.append(_fold(m[0]))
        offsets.append(m.start())
    return tokens, offsets


def _merged(tokens: tuple[str, ...]) -> tuple[str, ...]:
    """Adjacent letter tokens (and digit tokens) run together: "Anna Rossi" as "annarossi"."""
    out: list[str] = []
    for tok in tokens:
        if out and not _is_cjk(tok) and not _is_cjk(out[-1]) and tok.isdigit() == out[-1].isdigit():
            out[-1] += tok
        else:
            out.append(tok)
    return tuple(out)


def searchable(tokens: tuple[str, ...]) -> bool:
    """Whether an identifier is distinctive enough to search without matching by chance."""
    if len(tokens) == 1 and tokens[0].isdigit():
        return len(tokens[0]) >= MIN_DIGITS
    weight = sum(2 if _is_cjk(t) else len(t) for t in tokens)
    return weight >= MIN_CHARS


class Identifiers:
    """Every identifier to search, indexed by first token (or first two) for one lookup per token."""

    def __init__(self, source: str) -> None:
        self.source = source  # where they came from, for the summary
        self.single: dict[str, list[Needle]] = {}
        self.pairs: dict[tuple[str, str], list[Needle]] = {}
        self.searched = 0
        self.too_short: list[str] = []  # labels of identifiers not searched
        self.unparsed_rows = 0  # table rows whose cells could not be read

    def add(self, value: str, label: str, words: bool = False) -> None:
        """Search for ``value``; with ``words`` (an identifier column or tag, not an id or a path), a
        value of letters only is a name, and each of its distinctive words is searched on its own too."""
        tokens = tuple(tokenise(value)[0])
        if not tokens:
            return
        if not searchable(tokens):
            self.too_short.append(label)
            return
        self.searched += 1
        variants = {tokens, _merged(tokens)}
        # A name is also written in another order or in part ("Hans MÜLLER" for Müller^Hans), and
        # --scrub-reports removes each word of a name: each word distinctive alone is searched too.
        if words and len(tokens) > 1 and not any(t.isdigit() for t in tokens):
            variants |= {(t,) for t in tokens if searchable((t,))}
        for variant in variants:
            needle = Needle(variant, label, value)
            if len(variant) == 1:
                self.single.setdefault(variant[0], []).append(needle)
            else:
                self.pairs.setdefault(variant[:2], []).append(needle)

    def find(self, tokens: list[str]) -> Iterator[tuple[int, int, Needle]]:
        """(first token, end token, needle) of every identifier found in ``tokens``."""
        single, pairs = self.single, self.pairs
        for i, tok in enumerate(tokens):
            for needle in single.get(tok, ()):
                yield i, i + 1, needle
            if pairs and i + 1 < len(tokens):
                for needle in pairs.get((tok, tokens[i + 1]), ()):
                    end = i + len(needle.tokens)
                    if tuple(tokens[i:end]) == needle.tokens:
                        yield i, end, needle

    @classmethod
    def from_table(cls, url: str, columns: tuple[str, ...] = ()) -> Identifiers:
        """The patient table's ids, image paths and ``columns`` cells, of every row (rejected ones too)."""
        found = cls(files.basename(url))
        for line_no, row in table_rows(url, identifier_columns=columns):
            if isinstance(row, RejectError):
                found.unparsed_rows += 1
                continue
            for column in (*TABLE_ID_COLUMNS, *columns):
                value = cell_text(row, column)
                if value.strip():
                    found.add(value, f"{column} of {found.source}:{line_no}", words=column in columns)
        return found

    @classmethod
    def from_records(
        cls, source: str, records: Iterable[PatientRecord], rejects: Iterable[Reject]
    ) -> Identifiers:
        """The ids of parsed records and rejected rows (inputs without a patient table, e.g. --retclip-dir)."""
        found = cls(source)
        for rec in records:
            found.add(rec.patient_id, f"patient_id of {rec.source}")
            for column, value in rec.identifiers:
                found.add(value, f"{column} of {rec.source}", words=True)
        for r in rejects:
            if r.patient_id:
                found.add(r.patient_id, f"patient_id of {r.source}")
        return found


@dataclass
class AuditResult:
    directory: str  # what was audited
    hits: list[Hit] = field(default_factory=list)  # every finding, in file order
    files: int = 0  # files read
    shards: int = 0  # of them tar files
    members: int = 0  # tar members read
    images: int = 0  # JPEG images whose segments were read
    scanned_bytes: int = 0  # bytes searched (before decoding)
    skipped_bytes: int = 0  # entropy-coded JPEG scan data, not searched
    hex_runs: int = 0  # runs of 16+ hex digits (pseudonyms, digests) not searched
    identifiers: Identifiers | None = None
    patterns: int = 0

    @property
    def ok(self) -> bool:
        return not self.hits

    def summary(self) -> str:
        ids = self.identifiers
        verdict = "audit OK: nothing found" if self.ok else f"audit FAILED: {len(self.hits)} hits"
        searched = f"{ids.searched} identifiers of {ids.source}" if ids else "no identifiers"
        skipped = [f"{self.skipped_bytes} bytes of entropy-coded image data in {self.images} JPEGs"]
        if ids and ids.too_short:
            skipped.append(
                f"{len(ids.too_short)} identifiers too short to search (first: {ids.too_short[0]})"
            )
        if ids and ids.unparsed_rows:
            skipped.append(f"the cells of {ids.unparsed_rows} unparsable table rows")
        skipped.append(f"{self.hex_runs} hex digests")
        skipped.append("text drawn in the pixels")
        return (
            f"{verdict} in {self.files} files of {self.directory} ({self.shards} shards, {self.members} members, "
            f"{self.scanned_bytes} bytes searched for {searched} and {self.patterns} patterns); "
            f"not checked: {', '.join(skipped)}"
        )


def _utf16(data: bytes) -> Iterator[tuple[str, str, int]]:
    for order in ("le", "be"):
        for start in (0, 1):
            chunk = data[start : start + (len(data) - start) // 2 * 2]
            yield chunk.decode(f"utf-16-{order}", "replace"), f"utf-16-{order}", start


def _readings(data: bytes, binary: bool) -> Iterator[tuple[str, str, int]]:
    """(text, encoding, byte offset of its first character) readings of a region."""
    try:
        utf8, valid = data.decode("utf-8"), True
    except UnicodeDecodeError:
        # Each undecodable byte becomes one stand-in character, so offsets can be counted back exactly.
        utf8, valid = data.decode("utf-8", "surrogateescape"), False
    yield utf8, "utf-8", 0
    if binary or not valid:
        if not data.isascii():
            yield data.decode("latin-1"), "latin-1", 0
        if b"\0" in data:
            yield from _utf16(data)
    if "\\u" in utf8:
        yield _JSON_ESCAPE.sub(lambda m: chr(int(m[1], 16)), utf8), "json-escaped", 0


def _jpeg_regions(data: bytes) -> Iterator[tuple[int, int, str]]:
    """(start, end, kind) covering ``data``: "meta" (APPn, COM, bytes after the end), "table" (markers,
    tables, headers) or "scan" (entropy-coded data, not searched)."""
    i, n = 2, len(data)
    yield 0, 2, "table"
    while i + 1 < n:
        if data[i] != 0xFF:
            yield i, n, "meta"  # not a marker where one must be: read the rest as it is
            return
        marker = data[i + 1]
        if marker == 0xFF:
            yield i, i + 1, "table"
            i += 1
            continue
        if marker == 0xD9:  # end of image; anything after it is what cameras append
            yield i, i + 2, "table"
            if i + 2 < n:
                yield i + 2, n, "meta"
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            yield i, i + 2, "table"
            i += 2
            continue
        end = min(n, i + 2 + int.from_bytes(data[i + 2 : i + 4], "big"))
        yield i, end, "meta" if (0xE0 <= marker <= 0xEF or marker == 0xFE) else "table"
        i = end
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next real marker
            j = i
            while True:
                j = data.find(b"\xff", j)
                if j < 0 or j + 1 >= n:
                    j = n
                    break
                if data[j + 1] == 0 or 0xD0 <= data[j + 1] <= 0xD7:
                    j += 2
                    continue
                break
            yield i, j, "scan"
            i = j
    if i < n:
        yield i, n, "meta"


def _octal(field_bytes: bytes) -> int:
    """A tar header number: octal text, or base-256 when the high bit of the first byte is set."""
    if field_bytes[0] & 0x80:
        return int.from_bytes(field_bytes[1:], "big")
    text = field_bytes.replace(b"\0", b" ").strip()
    return int(text, 8) if text else 0


class _Auditor:
    def __init__(
        self, directory: str, identifiers: Identifiers | None, patterns: list[re.Pattern[str]]
    ) -> None:
        self.result = AuditResult(directory, identifiers=identifiers, patterns=len(patterns))
        self.identifiers = identifiers
        self.patterns = patterns
        self.seen: dict[tuple[str, str, str], set[int]] = {}

    def _hit(self, hit: Hit) -> None:
        # One finding read two ways (UTF-8 and Latin-1; UTF-16 in both byte orders, a byte apart) is one hit.
        offsets = self.seen.setdefault((hit.file, hit.member, hit.what), set())
        if not offsets & {hit.offset - 1, hit.offset, hit.offset + 1}:
            offsets.add(hit.offset)
            self.result.hits.append(hit)

    def _search(self, text: str, encoding: str, to_byte, where: tuple[str, str]) -> None:
        if len(text) >= 16:
            if encoding.endswith("utf-8"):
                self.result.hex_runs += len(_HEX.findall(text))
            # Patterns, like identifiers, are not matched inside pseudonyms and digests.
            text = _HEX.sub(lambda m: " " * len(m[0]), text)
        if self.identifiers is not None:
            tokens, offsets = tokenise(text)
            for first, end, needle in self.identifiers.find(tokens):
                start = offsets[first]
                stop = offsets[end - 1] + len(tokens[end - 1])
                self._hit(Hit(*where, to_byte(start), text[start:stop], needle.label, encoding))
        for pattern in self.patterns:
            for m in pattern.finditer(text):
                self._hit(Hit(*where, to_byte(m.start()), m[0], f"pattern {pattern.pattern!r}", encoding))

    def scan(self, data: bytes, base: int, where: tuple[str, str], binary: bool, note: str = "") -> None:
        """Search one region of bytes starting at file offset ``base``."""
        if not data:
            return
        self.result.scanned_bytes += len(data)
        for text, encoding, start in _readings(data, binary):
            if encoding == "utf-8" and not data.isascii():

                def to_byte(k: int, text: str = text) -> int:
                    return base + len(text[:k].encode("utf-8", "surrogateescape"))
            elif encoding.startswith("utf-16"):

                def to_byte(k: int, start: int = start) -> int:
                    return base + start + 2 * k
            elif encoding == "json-escaped":

                def to_byte(k: int) -> int:
                    return base  # escapes change lengths: the region's start
            else:

                def to_byte(k: int) -> int:
                    return base + k

            self._search(text, note + encoding, to_byte, where)

    def content(self, data: bytes, base: int, where: tuple[str, str], note: str = "") -> None:
        """A file's or member's bytes: JPEG by segments, gzip decompressed too, anything else whole."""
        if data[:3] == b"\xff\xd8\xff":
            self.result.images += 1
            for start, end, kind in _jpeg_regions(data):
                if kind == "scan":
                    self.result.skipped_bytes += end - start
                else:
                    self.scan(data[start:end], base + start, where, binary=True, note=note)
            return
        if data[:2] == b"\x1f\x8b":
            try:
                inner = gzip.decompress(data)
            except (OSError, EOFError, zlib.error):
                inner = None  # not really gzip: search its bytes as they are
            if inner is not None:
                # The header (with the original file name) as it is, the compressed rest decompressed.
                self.scan(data[:_BLOCK], base, where, binary=True, note=note)
                self.content(inner, base, where, note="gunzipped " + note)
                return
        self.scan(data, base, where, binary=b"\0" in data[:8192], note=note)

    def tar(self, fh: IO[bytes], head: bytes, rel: str) -> None:
        """Every header, member and padding byte of a tar, members dispatched by content."""
        self.result.shards += 1
        offset, long_name = 0, ""
        pending = head

        def read(n: int) -> bytes:  # n < 0: to the end
            nonlocal pending
            if n < 0:
                out, pending = pending + fh.read(), b""
                return out
            out, pending = pending[:n], pending[n:]
            return out + (fh.read(n - len(out)) if len(out) < n else b"")

        while True:
            header = read(_BLOCK)
            if len(header) < _BLOCK or header == b"\0" * _BLOCK:
                self.scan(header + read(-1), offset, (rel, ""), binary=True)  # end blocks: zeros
                return
            name = header[:100].split(b"\0", 1)[0]
            if header[257:262] == b"ustar" and header[345] != 0:
                name = header[345:500].split(b"\0", 1)[0] + b"/" + name
            member = long_name or name.decode("utf-8", "replace")
            long_name = ""
            size, kind = _octal(header[124:136]), header[156:157]
            self.scan(header, offset, (rel, member), binary=True)
            data = read(size)
            padding = read(-size % _BLOCK)
            if kind in (b"x", b"g"):
                self.scan(data, offset + _BLOCK, (rel, member), binary=False)
                for path in re.findall(rb"\d+ path=([^\n]*)\n", data):
                    long_name = path.decode("utf-8", "replace")
            elif kind == b"L":
                self.scan(data, offset + _BLOCK, (rel, member), binary=False)
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            else:
                self.result.members += 1
                self.content(data, offset + _BLOCK, (rel, member))
            self.scan(padding, offset + _BLOCK + size, (rel, member), binary=True)
            offset += _BLOCK + size + len(padding)


def audit(directory: str, identifiers: Identifiers | None, patterns: Iterable[str] = ()) -> AuditResult:
    """Search every file under ``directory`` (local or fsspec URL) for ``identifiers`` and regexes."""
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as exc:
        raise ShardInputError(f"--pattern {exc.pattern!r}: not a regular expression ({exc})") from None
    fs, root = fsspec.core.url_to_fs(directory)
    if not fs.isdir(root):
        raise ShardInputError(f"{directory}: not a directory")
    auditor = _Auditor(directory, identifiers, compiled)
    for path in sorted(fs.find(root)):
        rel = path[len(root.rstrip("/")) + 1 :]
        auditor.result.files += 1
        with fs.open(path, "rb") as fh:
            head = fh.read(_BLOCK)
            if len(head) == _BLOCK and head[257:262] == b"ustar":
                auditor.tar(fh, head, rel)
            else:
                auditor.content(head + fh.read(), 0, (rel, ""))
    return auditor.result
