"""Image stores: where eye images are read from, by a reference the source readers produced.

Stores are built (and indexed) once in the parent process, then pickled to workers; each worker opens
its own file handles lazily, because zip/tar/S3 handles cannot be shared across processes. Archive
members are looked up by normalised name in an index and read from memory: nothing is ever extracted
to disk under a name taken from the archive.

Names are matched in Unicode NFC form (paths.unicode_form): macOS writes NFD names into zips and onto
disk while manifests are usually NFC. When two entries of one directory or archive share a form, a
reference to that name raises AmbiguousName naming both, since which one was meant cannot be known.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from abc import ABC, abstractmethod
from typing import IO, Any

import fsspec

from retclip_dist.io import files
from retclip_dist.io.errors import (
    AmbiguousName,
    CorruptData,
    ImageNotFound,
    ImageReadError,
    ImageRootError,
    UnsafePath,
)
from retclip_dist.io.paths import normalise_relpath, unicode_form

log = logging.getLogger(__name__)


class ImageStore(ABC):
    """Reads image bytes by reference; raises ImageReadError (a subclass) for anything one image can fail on."""

    @abstractmethod
    def read(self, ref: str) -> bytes: ...

    def names(self) -> list[str]:
        """Every file of the root as a reference read() takes, sorted (a root searched rather than named
        by a manifest, e.g. a DICOM export)."""
        raise ImageRootError(f"{type(self).__name__} cannot list its files")

    def describe(self, ref: str) -> str:
        """The image's origin as written into the sample's JSON."""
        return ref

    temp_dir: str | None = None  # scratch space this store owns (a decompressed tar.gz)

    def cleanup(self) -> None:
        """Remove the store's scratch space, if it made one."""
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __getstate__(self) -> dict[str, Any]:
        # Open handles (and per-process caches, also named _fh*) stay in the process that made them.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_fh")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def _one_of(candidates: list[str], ref: str, where: str) -> str:
    """The single entry whose NFC form matches ``ref``, or ImageNotFound / AmbiguousName.

    ``where`` completes "not found ..." (``under DIR`` or ``in ARCHIVE``); names are shown with ascii() so
    two spellings that look the same read differently in the message.
    """
    if not candidates:
        raise ImageNotFound(f"{ref} not found {where}")
    if len(candidates) > 1:
        shown = ", ".join(ascii(c) for c in candidates)
        raise AmbiguousName(f"{ref!a} {where} is any of {shown} (they differ only in Unicode form)")
    return candidates[0]


def _by_form(names: list[str]) -> dict[str, list[str]]:
    forms: dict[str, list[str]] = {}
    for name in sorted(names):
        forms.setdefault(unicode_form(name), []).append(name)
    return forms


class DirStore(ImageStore):
    """A directory, local or ``s3://``; local symlinks that resolve outside the root are refused."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.local = files.is_local(url)
        if self.local:
            if not os.path.isdir(url):
                raise ImageRootError(f"image root {url}: not a directory, .zip, .tar or .tar.gz")
            self.real_root = os.path.realpath(url)

    def names(self) -> list[str]:
        if not self.local:
            fs, path = fsspec.core.url_to_fs(self.url)
            root = path.rstrip("/") + "/"
            return sorted(p[len(root) :] for p in fs.find(path) if p.startswith(root))
        found = []
        # Symlinked directories are not entered (a link can leave the root); a symlinked file is listed and
        # read() decides whether it stays inside.
        for directory, _, file_names in os.walk(self.real_root):
            rel = os.path.relpath(directory, self.real_root)
            prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            found += [prefix + name for name in file_names]
        return sorted(found)

    def _listing(self, directory: str) -> dict[str, list[str]]:
        """Entries of a local directory by NFC form, listed once per process."""
        cache: dict[str, dict[str, list[str]]] = self.__dict__.setdefault("_fh_listings", {})
        if directory not in cache:
            try:
                cache[directory] = _by_form(os.listdir(directory))
            except OSError:
                cache[directory] = {}
        return cache[directory]

    def _local_name(self, ref: str) -> str:
        """``ref`` as named on disk, each path component matched by its NFC form."""
        parts: list[str] = []
        for part in ref.split("/"):
            entries = self._listing(os.path.join(self.real_root, *parts))
            parts.append(_one_of(entries.get(unicode_form(part), []), ref, f"under {self.url}"))
        return "/".join(parts)

    def _read_remote(self, ref: str) -> bytes:
        # Object stores have no directories to list cheaply level by level: try the name as written,
        # then the file names under its prefix by NFC form.
        try:
            return files.read_bytes(files.join(self.url, ref))
        except FileNotFoundError:
            pass
        parent, _, name = ref.rpartition("/")
        prefix = files.join(self.url, parent) if parent else self.url
        cache: dict[str, dict[str, list[str]]] = self.__dict__.setdefault("_fh_listings", {})
        if prefix not in cache:
            fs, path = fsspec.core.url_to_fs(prefix)
            try:
                cache[prefix] = _by_form([files.basename(p) for p in fs.ls(path, detail=False)])
            except FileNotFoundError:
                cache[prefix] = {}
        found = _one_of(cache[prefix].get(unicode_form(name), []), ref, f"under {self.url}")
        try:
            return files.read_bytes(files.join(prefix, found))
        except FileNotFoundError:
            raise ImageNotFound(f"{ref} not found under {self.url}") from None

    def read(self, ref: str) -> bytes:
        if not self.local:
            return self._read_remote(ref)
        real = os.path.realpath(os.path.join(self.real_root, self._local_name(ref)))
        if os.path.commonpath([real, self.real_root]) != self.real_root:
            raise UnsafePath(f"{ref} resolves outside {self.url}")
        if not os.path.isfile(real):
            raise ImageNotFound(f"{ref} not found under {self.url}")
        with open(real, "rb") as fh:
            return fh.read()


class MemberIndex:
    """Archive members by normalised path; unsafe names are dropped so no manifest path can reach them."""

    def __init__(self, names: list[tuple[str, Any]], archive: str) -> None:
        self.archive = archive
        self.locators: dict[str, Any] = {}  # normalised path -> where the member's data is
        for name, locator in names:
            try:
                norm = normalise_relpath(name)
            except ImageReadError as exc:
                log.warning("%s: ignoring member %r (%s)", archive, name, exc)
                continue
            self.locators.setdefault(norm, locator)
        self.forms = _by_form(list(self.locators))  # NFC form -> member paths with that form

    def names(self) -> list[str]:
        return list(self.locators)

    def find(self, ref: str) -> Any:
        """Locator of ``ref`` (matched by NFC form), or ImageNotFound / AmbiguousName."""
        return self.locators[_one_of(self.forms.get(unicode_form(ref), []), ref, f"in {self.archive}")]


class ZipStore(ImageStore):
    def __init__(self, url: str) -> None:
        self.url = url
        try:
            with fsspec.open(url, "rb") as fh, zipfile.ZipFile(fh) as zf:
                members = [(i.filename, i.filename) for i in zf.infolist() if not i.is_dir()]
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ImageRootError(f"image root {url}: not a readable zip archive ({exc})") from exc
        self.index = MemberIndex(members, url)

    def names(self) -> list[str]:
        return sorted(self.index.names())

    def read(self, ref: str) -> bytes:
        name = self.index.find(ref)
        if getattr(self, "_fh_zip", None) is None:
            self._fh_raw = fsspec.open(self.url, "rb").open()
            self._fh_zip = zipfile.ZipFile(self._fh_raw)
        try:
            return self._fh_zip.read(name)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise CorruptData(f"{ref} in {self.url}: corrupt zip member ({exc})") from None


class TarStore(ImageStore):
    """An uncompressed tar, read by seeking to each member's data offset (regular files only)."""

    def __init__(self, url: str, shown_as: str | None = None, temp_dir: str | None = None) -> None:
        self.url = url
        self.shown_as = shown_as or url
        self.temp_dir = temp_dir
        try:
            with fsspec.open(url, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tf:
                members = [(m.name, (m.offset_data, m.size)) for m in tf if m.isreg()]
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ImageRootError(f"image root {self.shown_as}: not a readable tar archive ({exc})") from exc
        self.index = MemberIndex(members, self.shown_as)

    def names(self) -> list[str]:
        return sorted(self.index.names())

    def read(self, ref: str) -> bytes:
        loc = self.index.find(ref)
        if getattr(self, "_fh", None) is None:
            self._fh: IO[bytes] = fsspec.open(self.url, "rb").open()
        self._fh.seek(loc[0])
        return self._fh.read(loc[1])


def _decompressed_tar(url: str) -> TarStore:
    # gzip has no random access, so pay one sequential pass instead of re-reading per image.
    temp_dir = tempfile.mkdtemp(prefix="make-shards-")
    target = os.path.join(temp_dir, "images.tar")
    log.info("decompressing %s to temporary %s (one pass; gzip cannot be read randomly)", url, target)
    try:
        with fsspec.open(url, "rb") as raw, gzip.open(raw) as gz, open(target, "wb") as out:
            shutil.copyfileobj(gz, out, 1 << 20)
    except (OSError, EOFError, zlib.error) as exc:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise ImageRootError(f"image root {url}: not a readable tar.gz archive ({exc})") from exc
    try:
        return TarStore(target, shown_as=url, temp_dir=temp_dir)
    except ImageRootError:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise


def open_image_root(url: str) -> ImageStore:
    """Pick the store by name: ``.zip``, ``.tar``, ``.tar.gz``/``.tgz``, else a directory."""
    lower = url.lower()
    if lower.endswith((".zip", ".tar", ".tar.gz", ".tgz")) and not files.exists(url):
        raise ImageRootError(f"image root {url}: no such file")
    if lower.endswith(".zip"):
        return ZipStore(url)
    if lower.endswith((".tar.gz", ".tgz")):
        return _decompressed_tar(url)
    if lower.endswith(".tar"):
        return TarStore(url)
    return DirStore(url)
