"""Local-or-S3 file access through fsspec, with atomic writes.

S3 endpoints and credentials come from fsspec's own configuration (``FSSPEC_S3_ENDPOINT_URL``,
``FSSPEC_S3_KEY``, ``FSSPEC_S3_SECRET``) or the usual AWS variables, so no flags are needed here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


def is_local(url: str) -> bool:
    return isinstance(fsspec.core.url_to_fs(url)[0], LocalFileSystem)


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as fh:
        return fh.read()


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


class OutputDir:
    """An output directory; every file appears complete or not at all (rename locally, one PUT on S3)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            Path(self.path).mkdir(parents=True, exist_ok=True)

    def _p(self, name: str) -> str:
        return join(self.path, name)

    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(self._p(name))

    def size(self, name: str) -> int:
        return int(self.fs.size(self._p(name)))

    def read_text(self, name: str) -> str:
        return self.fs.cat_file(self._p(name)).decode("utf-8")

    def remove(self, name: str) -> None:
        if self.exists(name):
            self.fs.rm(self._p(name))

    def names(self) -> list[str]:
        self.fs.invalidate_cache()
        return sorted(basename(p) for p in self.fs.ls(self.path, detail=False))

    def staging_path(self, name: str) -> str:
        """Where to write ``name`` before publish(): beside it locally, in a temp dir for S3."""
        if self.local:
            return self._p(name + ".tmp")
        return os.path.join(tempfile.mkdtemp(prefix="make-shards-"), name)

    def publish(self, staged: str, name: str) -> None:
        if self.local:
            with open(staged, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(staged, self._p(name))
        else:
            self.fs.put_file(staged, self._p(name))
            shutil.rmtree(os.path.dirname(staged), ignore_errors=True)

    def write_text(self, name: str, text: str) -> None:
        staged = self.staging_path(name)
        with open(staged, "w", encoding="utf-8") as fh:
            fh.write(text)
        self.publish(staged, name)

    def append_line(self, name: str, line: str) -> None:
        """Append one line durably; S3 objects cannot be appended to, so they are rewritten whole."""
        if self.local:
            with open(self._p(name), "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        else:
            old = self.read_text(name) if self.exists(name) else ""
            self.write_text(name, old + line + "\n")
