"""--pseudonymise: keyed hashes instead of patient ids, and nothing else that points back to a patient.

The data owner keeps a secret key file; every patient id becomes ``ps-`` + 32 hex of
HMAC-SHA256(key, id), so the same id gets the same pseudonym in every build made with that key (splits,
leakage checks and joins across builds keep working) while nobody without the key can recompute or
reverse it. Source photos' content hashes become keyed digests too (source_digest). Everything the build writes under --output_dir (shards, manifest.json, rejects.jsonl, the resume
journal) then carries pseudonyms, line numbers and fixed reason texts only: no id, no image path, no input
path. The key itself is never written anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac

from retclip_dist.shards.records import REJECT_REASONS, PatientRecord, Reject, ShardInputError

PSEUDONYM_PREFIX = "ps-"
# 128 bits: same collision margin as hashed shard keys, and the pseudonym stays a plain shard key (<= 64).
_PSEUDONYM_HEX = 32
# Below this the key could be guessed by trying keys against a pseudonym of a guessable id.
MIN_KEY_BYTES = 16
# Domain separation: a pseudonym and an option digest of the same text never coincide.
_ID_DOMAIN = b"retclip-dist patient id\x00"
_OPTION_DOMAIN = b"retclip-dist option\x00"
_SOURCE_DOMAIN = b"retclip-dist source image\x00"
_KEY_CHECK_DOMAIN = b"retclip-dist key check\x00"
# 64 bits: enough to tell a wrong key file from the right one, nothing about the key itself.
_KEY_CHECK_HEX = 16


class Pseudonymiser:
    def __init__(self, key: bytes) -> None:
        self._key = key

    @classmethod
    def from_keyfile(cls, path: str) -> Pseudonymiser:
        """The key is the file's bytes without surrounding whitespace (so an editor's newline is harmless)."""
        try:
            with open(path, "rb") as fh:
                key = fh.read().strip()
        except OSError as exc:
            raise ShardInputError(
                f"--pseudonymise {path}: cannot read the key file ({exc.strerror})"
            ) from None
        if not key:
            raise ShardInputError(f"--pseudonymise {path}: the key file is empty")
        if len(key) < MIN_KEY_BYTES:
            raise ShardInputError(
                f"--pseudonymise {path}: the key is {len(key)} bytes, need at least {MIN_KEY_BYTES} "
                "(make one with: openssl rand -hex 32 > KEYFILE)"
            )
        return cls(key)

    def __repr__(self) -> str:
        return "Pseudonymiser(<key hidden>)"

    def _mac(self, domain: bytes, text: str) -> str:
        return hmac.new(self._key, domain + text.encode("utf-8"), hashlib.sha256).hexdigest()

    def pseudonym(self, patient_id: str) -> str:
        return PSEUDONYM_PREFIX + self._mac(_ID_DOMAIN, patient_id)[:_PSEUDONYM_HEX]

    def option_digest(self, value: str) -> str:
        """Stands in for an input path in manifest.json: equal for equal paths under one key, so a rerun
        with other inputs (or another key) is still refused, yet the path cannot be read back."""
        return "hmac-sha256:" + self._mac(_OPTION_DOMAIN, value)[:_PSEUDONYM_HEX]

    def source_digest(self, sha256_hex: str) -> str:
        """Stands in for a source photo's plain sha256 in manifest.json: without the key nobody can test
        whether a photo they hold is in the set; with it, retclip-eval's leakage guard still can."""
        return self._mac(_SOURCE_DOMAIN, sha256_hex)

    def key_check(self) -> str:
        """A keyed digest of nothing: tells a reader holding a key file whether it is this set's key."""
        return self._mac(_KEY_CHECK_DOMAIN, "")[:_KEY_CHECK_HEX]

    def records(self, records: list[PatientRecord]) -> list[PatientRecord]:
        """Records with their pseudonym set; two distinct ids on one pseudonym (a 128-bit collision) stop
        the build rather than merge two patients."""
        owner: dict[str, PatientRecord] = {}
        out = []
        for rec in records:
            alias = self.pseudonym(rec.patient_id)
            first = owner.setdefault(alias, rec)
            if first.patient_id != rec.patient_id:
                raise ShardInputError(
                    f"{rec.source} and {first.source}: two patient ids share pseudonym {alias}; use another key"
                )
            out.append(dataclasses.replace(rec, pseudonym=alias))
        return out

    def reject(self, r: Reject) -> Reject:
        """The reject as written under --output_dir: pseudonym, input line and the reason's fixed text. The owner
        finds the row by its line number; the detail (which names paths and ids) stays out."""
        line = r.source.rsplit(":", 1)[-1]
        alias = self.pseudonym(r.patient_id) if r.patient_id else ""
        return Reject(r.order, alias, f"line {line}", r.reason, REJECT_REASONS[r.reason])
