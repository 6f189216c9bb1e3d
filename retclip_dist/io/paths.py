"""The two rules for names inside an image root: how a relative path is normalised, and in which
Unicode form names are compared."""

from __future__ import annotations

import re
import unicodedata

from retclip_dist.io.errors import EmptyPath, UnsafePath


def unicode_form(name: str) -> str:
    """The form names are compared in: NFC, so a manifest in NFC finds a member macOS wrote in NFD (and the
    reverse). Compatibility forms (NFKC) are not folded: they would merge genuinely different characters."""
    return unicodedata.normalize("NFC", name)


def normalise_relpath(path: str) -> str:
    """Relative POSIX path inside a root, or EmptyPath / UnsafePath.

    Backslashes count as separators so Windows-made manifests and archives cannot smuggle ``..\\``.
    """
    if not path.strip():
        raise EmptyPath(f"image path {path!r} is blank")
    unified = path.replace("\\", "/")
    if unified.startswith("/") or re.match(r"[A-Za-z]:", unified):
        raise UnsafePath(f"absolute path {path!r}")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePath(f"path {path!r} contains '..'")
    if not parts:
        raise EmptyPath(f"image path {path!r} names no file")
    return "/".join(parts)
