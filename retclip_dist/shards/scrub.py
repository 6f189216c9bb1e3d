"""--scrub-reports: identifiers out of the report text, the clinical text left as it was.

Two kinds of replacement, in this order:

1. The manifest's own identifiers of the patient (the patient id and every ``--identifier-columns`` cell of
   its row) wherever they occur, ignoring case, spacing and punctuation between their characters and
   full-width forms (``Zhang Wei``, ``ZHANGWEI``, ``zhang-wei``; ``HOSP.0091427``, ``hosp 0091427``;
   ``张伟``, ``张 伟``), become ``[COLUMN]`` (``[PATIENT_ID]``, ``[PATIENT_NAME]``, ``[MRN]``). A value
   without digits is taken for a name, and each of its words of two or more letters is replaced on its
   own too (``Mr Müller``); a surname that is also a clinical word (White, Rose) is therefore replaced in
   clinical text as well: safety first.
2. Typed patterns: e-mail addresses ``[EMAIL]``, web addresses ``[URL]``, national id numbers
   (the 18-character Chinese resident id, the old 15-digit one, US SSN) ``[ID_NUMBER]``, dates (ISO,
   numeric, month names, Chinese 年月日) ``[DATE]``, phone numbers (Chinese mobile and landline, spaced
   or dashed groups, +country codes) ``[PHONE]``, names and record numbers after labels
   (``Name:``, ``Dr``, ``MRN:``, ``姓名：``, ``住院号``) ``[NAME]``/``[ID]``, and any run of six or more
   digits ``[NUMBER]``. Numbers as clinical text writes them (``cup-to-disc ratio 0.6``, ``IOP 21 mmHg``,
   ``stage 2``, ``20/40``, ``眼压18 mmHg``) match none of these.

Rules, not a library: the maintained de-identification libraries (Microsoft Presidio) find names with a
spaCy or transformer NER model that must be downloaded at run time, which a hospital build host (and
this project's machines) cannot do, and have no recognisers for Chinese text or ids; scrubadub and
philter-ucsf are unmaintained and English-only. Names here come from the manifest instead, which is
exact for the patient; other people's names are only caught after a label or title.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Iterable, Sequence

from retclip_dist.shards.records import PatientRecord

PATIENT_ID_COLUMN = "patient_id"
# A number-only identifier shorter than this is left alone: "12" cannot be told from "IOP 12 mmHg".
MIN_ID_DIGITS = 4
_LATIN = r"A-Za-z\u00C0-\u024F\uFF21-\uFF3A\uFF41-\uFF5A"
_CJK = r"\u3040-\u30FF\u3400-\u4DBF\u4E00-\u9FFF\uF900-\uFAFF\uAC00-\uD7AF"
_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
    r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
# Characters that may stand between the characters of an identifier in a report ("ignoring spacing").
_GAP_CHARS = frozenset(" \t\n\r\u3000\u00a0._-·・,，'’^/")
_D = r"(?<!\d)"  # no digit before
_ND = r"(?!\d)"  # no digit after

# (placeholder, pattern), applied in this order after the manifest's identifiers. Earlier patterns take
# what later ones would misread (a resident id holds a date; a date would read as a phone number).
_TYPED: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, flags))
    for name, pattern, flags in (
        ("[EMAIL]", r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+", 0),
        ("[URL]", r"\b(?:https?://|www\.)[^\s,，。;；)）]+", re.IGNORECASE),
        (
            "[ID_NUMBER]",
            _D + r"[1-9]\d{5}\s?(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\s?\d{3}[\dXx]"
            r"(?![\dA-Za-z])|" + _D + r"\d{3}-\d{2}-\d{4}" + _ND,
            0,
        ),
        (
            "[DATE]",
            _D
            + r"\d{4}\s?[-/.年]\s?\d{1,2}\s?[-/.月]\s?\d{1,2}(?:\s?[日号])?"
            + _ND
            + "|"
            + _D
            + r"\d{4}年\s?\d{1,2}月(?:\s?\d{1,2}[日号])?|"
            + _D
            + r"\d{1,2}月\s?\d{1,2}[日号]|"
            + _D
            + r"\d{1,2}[-/.]\d{1,2}[-/.](?:\d{4}|\d{2})"
            + _ND
            + "|"
            + _D
            + r"\d{1,2}(?:st|nd|rd|th)?[\s-]+"
            + _MONTH
            + r"\.?,?[\s-]+\d{2,4}"
            + _ND
            + "|"
            + r"\b"
            + _MONTH
            + r"\.?\s+\d{1,2}(?:st|nd|rd|th)?,?\s+\d{4}"
            + _ND
            + "|"
            + r"\b"
            + _MONTH
            + r"\.?,?\s+(?:19|20)\d{2}"
            + _ND
            + "|"
            + _D
            + r"(?:0?[1-9]|1[0-2])[/-](?:19|20)\d{2}"
            + _ND
            + "|"
            + _D
            + r"(?:19|20)\d{2}-(?:0[1-9]|1[0-2])(?![\d-])",
            re.IGNORECASE,
        ),
        (
            "[PHONE]",
            r"(?:(?:\+|00)\d{1,3}[\s-]?)?(?:"
            + _D
            + r"1[3-9]\d[\s-]?\d{4}[\s-]?\d{4}"
            + _ND
            + "|"
            + r"(?:\(0\d{2,3}\)|"
            + _D
            + r"0\d{2,3})[\s-]?\d{7,8}"
            + _ND
            + "|"
            + r"(?:\(\d{2,4}\)|"
            + _D
            + r"\d{2,4})[\s.-]\d{3,4}[\s.-]\d{3,4}"
            + _ND
            + ")",
            0,
        ),
        # A title or a label, then the name or number it introduces: the label (group "keep") stays.
        (
            "[NAME]",
            r"(?P<keep>\b(?:Dr|Mr|Mrs|Ms|Miss|Prof)\.?\s+)[A-Z][\w'’-]+(?:\s+[A-Z][\w'’-]+)?",
            0,
        ),
        (
            "[NAME]",
            r"(?P<keep>\b(?i:(?:patient\s+)?name|physician|doctor|examiner|signed(?:\s+by)?)\s*[:：]\s*)"
            r"[A-Z][\w'’-]+(?:\s+[A-Z][\w'’-]+){0,2}",
            0,
        ),
        (
            "[NAME]",
            r"(?P<keep>(?:姓名|患者|病人|医生|医师|签名|报告人|检查者)\s*[:：]\s*)[" + _CJK + r"]{2,4}",
            0,
        ),
        (
            "[ID]",
            r"(?P<keep>\b(?:(?i:MRN|record\s+(?:no\.?|number)|hospital\s+no\.?|patient\s+id)|ID)\s*[:：#]?\s*)"
            r"[A-Za-z]*\d[A-Za-z0-9-]*",
            0,
        ),
        (
            "[ID]",
            r"(?P<keep>(?:住院号|门诊号|病历号|病案号|登记号|检查号|ID号|卡号)\s*[:：]?\s*)[A-Za-z]*\d[A-Za-z0-9-]*",
            0,
        ),
        ("[NUMBER]", _D + r"\d{6,}" + _ND, 0),
    )
)


# Full-width ASCII forms (U+FF01-U+FF5E) and the ideographic space, one character for one character.
_HALF_WIDTH = {0xFF01 + i: 0x21 + i for i in range(94)} | {0x3000: 0x20}
_LATIN_RE = re.compile(f"[{_LATIN}]")


def _fold(c: str) -> str:
    """How a character is compared: NFKC (full-width forms become ASCII) and case-folded."""
    return c.lower() if c.isascii() else unicodedata.normalize("NFKC", c).casefold()


def _squeeze(text: str) -> tuple[str, list[int]]:
    """``text`` folded, without the characters that may stand inside an identifier (spacing and
    punctuation), and for each character kept the index of the original character it came from."""
    kept: list[str] = []
    where: list[int] = []
    for i, c in enumerate(text):
        for folded in _fold(c):
            if folded in _GAP_CHARS or folded.isspace():
                continue
            kept.append(folded)
            where.append(i)
    return "".join(kept), where


def _kind(c: str) -> str:
    if c.isdigit():
        return "digit"
    return "latin" if _LATIN_RE.match(c) else "other"


def identifier_skeletons(value: str) -> list[str]:
    """What to look for of ``value``: its folded letters and digits (spacing and punctuation between them
    do not matter), and for a name (no digits) each of its words of two or more letters too."""
    squeezed, _ = _squeeze(unicodedata.normalize("NFKC", value))
    skeleton = "".join(c for c in squeezed if c.isalnum())
    if len(skeleton) < 2 or (skeleton.isdigit() and len(skeleton) < MIN_ID_DIGITS):
        return []
    found = [skeleton]
    if not any(c.isdigit() for c in skeleton):
        words = [
            _squeeze(w)[0] for w in re.findall(f"[{_LATIN}]{{2,}}", unicodedata.normalize("NFKC", value))
        ]
        found += [w for w in words if w != skeleton]
    return found


def _spans(text: str, squeezed: str, where: list[int], skeleton: str) -> list[tuple[int, int]]:
    """(start, end) in ``text`` of each occurrence of ``skeleton`` whose ends touch no further letter or
    digit of the same kind ("12" is not in "123", "Li" not in "Lily"); Chinese has no such edges."""
    spans = []
    first, last = _kind(skeleton[0]), _kind(skeleton[-1])
    at = squeezed.find(skeleton)
    while at >= 0:
        start, end = where[at], where[at + len(skeleton) - 1] + 1
        before = text[start - 1] if start > 0 else ""
        after = text[end] if end < len(text) else ""
        touching = (first != "other" and before and _kind(before) == first) or (
            last != "other" and after and _kind(after) == last
        )
        if not touching:
            spans.append((start, end))
        at = squeezed.find(skeleton, at + 1)
    return spans


def placeholder(column: str) -> str:
    """``[MRN]`` for column ``mrn``: a typed placeholder that names where the identifier came from."""
    return "[" + (re.sub(r"\W+", "_", column).strip("_").upper() or "IDENTIFIER") + "]"


def scrub_text(text: str, identifiers: Sequence[tuple[str, str]]) -> str:
    """``text`` (NFC-normalised) with ``identifiers`` ((column, value) pairs) and the typed patterns replaced."""
    text = unicodedata.normalize("NFC", text)
    squeezed, where = _squeeze(text)
    taken: list[tuple[int, int, str]] = []
    # Longer values first, so "Anna Rossi" goes whole before its word "Anna" would split it.
    for column, value in sorted(identifiers, key=lambda cv: -len(cv[1])):
        for skeleton in identifier_skeletons(value):
            for start, end in _spans(text, squeezed, where, skeleton):
                if all(end <= s or start >= e for s, e, _ in taken):
                    taken.append((start, end, placeholder(column)))
    for start, end, name in sorted(taken, reverse=True):
        text = text[:start] + name + text[end:]
    # The patterns read full-width digits and letters (common in Chinese text) as ASCII; the view has the
    # same length as the text, so a match in the view is replaced at the same place in the text.
    view = text.translate(_HALF_WIDTH)
    for name, pattern in _TYPED:
        for m in reversed(list(pattern.finditer(view))):
            start = m.start("keep") + len(m["keep"]) if "keep" in pattern.groupindex else m.start()
            text = text[:start] + name + text[m.end() :]
            view = view[:start] + name + view[m.end() :]
    return text


def scrub_record(rec: PatientRecord) -> PatientRecord:
    """``rec`` with its reports scrubbed of its id, its identifier cells and the typed patterns."""
    identifiers = [(PATIENT_ID_COLUMN, rec.patient_id), *rec.identifiers]

    def clean(text: str | None) -> str | None:
        return None if text is None else scrub_text(text, identifiers)

    return dataclasses.replace(
        rec,
        report=clean(rec.report),
        left_report=clean(rec.left_report),
        right_report=clean(rec.right_report),
    )


def scrub_records(records: Iterable[PatientRecord]) -> list[PatientRecord]:
    return [scrub_record(rec) for rec in records]
