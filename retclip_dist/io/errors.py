"""Errors of retclip_dist.io; each message names the reference and the root it was looked up in."""

from __future__ import annotations


class StorageError(Exception):
    """Base class of everything retclip_dist.io raises on purpose."""


class ImageRootError(StorageError):
    """An image root that cannot be used at all: no such file, not a directory, an unreadable archive."""


class ImageReadError(StorageError):
    """One image reference cannot be read; the root itself is fine."""


class EmptyPath(ImageReadError):
    """The reference is blank or normalises to nothing."""


class UnsafePath(ImageReadError):
    """An absolute path, a '..' component, or a symlink that leaves the root."""


class ImageNotFound(ImageReadError):
    """No entry of the root has this name (compared in Unicode NFC form)."""


class AmbiguousName(ImageReadError):
    """Several entries of the root share the reference's NFC form, so which one was meant is unknown."""


class CorruptData(ImageReadError):
    """The entry exists but its stored bytes cannot be read back (corrupt archive member, bad base64)."""
