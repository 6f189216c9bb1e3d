"""make-shards build: read inputs, plan, process images in parallel, pack shards, write the manifest.

Workers run an ordered map (Pool.imap), so one writer in this process packs samples in the planned
order whatever the worker count; that and fixed tar metadata make the output byte-identical across
``--workers`` values and across interrupted-then-resumed runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from retclip_dist.cli_args import OUTPUT_DIR_FLAG
from retclip_dist.io import files
from retclip_dist.io.errors import ImageReadError, ImageRootError
from retclip_dist.io.files import OutputDir
from retclip_dist.io.roots import ImageStore, open_image_root
from retclip_dist.runtime.workers import process_pool
from retclip_dist.shards.audit import Hit, Identifiers, audit
from retclip_dist.shards.dicom import DicomOptions, image_bytes, read_dicom_export
from retclip_dist.shards.images import ImageOptions, process_image
from retclip_dist.shards.journal import JOURNAL_NAME, Journal, Progress
from retclip_dist.shards.plan import plan
from retclip_dist.shards.pseudonym import Pseudonymiser
from retclip_dist.shards.records import (
    PatientRecord,
    Reject,
    RejectError,
    ShardInputError,
    count_rejects,
    read_reject,
    valid_split,
)
from retclip_dist.shards.scrub import scrub_records
from retclip_dist.shards.sources import read_patient_table, read_retclip, split_columns
from retclip_dist.shards.writer import ShardWriter, rejects_jsonl
from retclip_dist.shardset import (
    EYE_REPORT_MEMBER,
    EYES,
    IMAGE_MEMBER,
    MANIFEST_NAME,
    META_MEMBER,
    REJECTS_NAME,
    REPORT_MEMBER,
    manifest_json,
)

log = logging.getLogger(__name__)

# Options that cannot change the output bytes; kept out of manifest.json and the resume fingerprint.
_RUNTIME_ONLY = ("out", "workers", "progress")
# Input locations; under --pseudonymise manifest.json holds only keyed digests of them.
_INPUT_PATHS = ("manifest", "images", "retclip_dir")


@dataclass
class BuildOptions:
    """Everything ``make-shards build`` takes; its flags are generated from these fields (shards/cli.py):
    ``--field-name`` (or metadata "flag"), the comment as help, a True bool as ``--no-field-name``."""

    out: str = field(
        default="shards/default",
        metadata={"required": True, "flag": OUTPUT_DIR_FLAG, "old": ("--out",), "metavar": "DIR"},
    )  # output directory (local or s3://)
    # CSV or JSONL patient table: patient_id,left_image,right_image,report[,left_report,right_report,split]
    manifest: str | None = None
    images: str | None = None  # image root of the manifest: directory, .zip, .tar or .tar.gz
    retclip_dir: str | None = None  # directory with the RET-CLIP release's {split}_imgs.tsv/_texts.jsonl
    dicom: DicomOptions = field(default_factory=DicomOptions)  # DICOM exports (--dicom)
    split: str = "train"  # split of patients without one (and which RET-CLIP files to read)
    val_fraction: float = 0.0  # share of patients without an explicit split sent to "val" (seeded id hash)
    image: ImageOptions = field(default_factory=ImageOptions)  # resize, JPEG and reject thresholds
    max_count: int = 1000  # patients per shard at most
    max_size: int = 1_000_000_000  # bytes per shard at most (a lone larger sample gets its own shard)
    seed: int = 0  # seed of the patient shuffle and of the val assignment
    workers: int = 1  # image-processing processes
    strict: bool = False  # any reject is an error: stop, write no manifest
    progress: bool = True  # a tqdm progress bar on stderr (--no-progress: none)
    # secret key file of the data owner (keep it in the hospital): patient ids become HMAC-SHA256
    # pseudonyms, image paths are left out and source hashes keyed, and the build ends by auditing its
    # output for the manifest's identifiers, so the output directory may leave the hospital
    pseudonymise: str | None = field(default=None, metadata={"metavar": "KEYFILE"})
    # replace the patient id, the --identifier-columns cells, dates, phone numbers, national ids, e-mail
    # addresses and long digit runs in the report text with typed placeholders ([DATE], [PHONE], ...)
    scrub_reports: bool = False
    # comma-separated manifest columns that identify a patient (name, record number): --scrub-reports
    # removes their values from reports, and a --pseudonymise build audits its output for them
    identifier_columns: str | None = field(default=None, metadata={"metavar": "COL[,COL...]"})

    def identifier_list(self) -> tuple[str, ...]:
        return split_columns(self.identifier_columns)

    def validate(self) -> None:
        if sum(x is not None for x in (self.manifest, self.retclip_dir, self.dicom.root)) != 1:
            raise ShardInputError(
                "give one of --manifest with --images, --retclip-dir, or --dicom with --reports"
            )
        self.dicom.validate(self.out)
        if self.manifest is None and self.identifier_list():
            raise ShardInputError(
                "--identifier-columns needs a --manifest (the RET-CLIP files and DICOM exports have no such "
                "columns)"
            )
        if self.manifest is not None and self.images is None:
            raise ShardInputError("--manifest needs --images (the root its image paths are relative to)")
        if self.images is not None and self.manifest is None:
            raise ShardInputError(
                "--images is the image root of --manifest; --retclip-dir and --dicom take none"
            )
        if not valid_split(self.split):
            raise ShardInputError(f"--split {self.split!r} must be a plain word ([A-Za-z0-9_])")
        checks = {
            "--val-fraction must be in [0, 1]": 0.0 <= self.val_fraction <= 1.0,
            "--max-count must be >= 1": self.max_count >= 1,
            "--max-size must be >= 1": self.max_size >= 1,
            "--workers must be >= 1": self.workers >= 1,
            "--image-size must be >= 1": self.image.size >= 1,
            "--jpeg-quality must be in [1, 100]": 1 <= self.image.quality <= 100,
        }
        for message, ok in checks.items():
            if not ok:
                raise ShardInputError(message)

    def recorded(self, pseudonymiser: Pseudonymiser | None = None) -> dict[str, Any]:
        """The options as written into manifest.json (those that shape the output).

        Pseudonymised, input paths become keyed digests (a rerun with other inputs or another key is
        still told apart) and the key file's location is only ``true``.
        """
        recorded = {k: v for k, v in dataclasses.asdict(self).items() if k not in _RUNTIME_ONLY}
        # Builds without --dicom record no dicom options, so their manifests (and resumes) stay as they were.
        recorded.pop("dicom")
        if self.dicom.root is not None:
            recorded["dicom"] = self.dicom.recorded()
        if pseudonymiser is not None:
            for name in _INPUT_PATHS:
                if recorded[name] is not None:
                    recorded[name] = pseudonymiser.option_digest(recorded[name])
            if "dicom" in recorded:
                for name in ("root", "reports"):
                    recorded["dicom"][name] = pseudonymiser.option_digest(recorded["dicom"][name])
            recorded["pseudonymise"] = True
        return recorded


@dataclass
class BuildResult:
    """Outcome of one build (also of a resumed one: counts cover the whole shard set)."""

    out: str  # output directory
    kept: int  # patients written to shards
    rejected: dict[str, int]  # reason -> count, every reason listed
    shards: list[dict[str, Any]]  # manifest shard entries
    seconds: float  # wall time of this run
    processed: int  # patients handled by this run (less than the total when resuming)

    @property
    def patients_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


class StrictRejectError(Exception):
    """--strict and a patient was rejected."""


@dataclass(frozen=True)
class Sample:
    """A processed patient, ready to be packed."""

    split: str
    key: str
    members: dict[str, bytes]
    source_sha256: tuple[str, ...] = ()  # sha256 of each eye's source file bytes (SOURCE_HASHES_FIELD)


def _read_image(store: ImageStore, ref: str) -> bytes:
    try:
        return store.read(ref)
    except ImageReadError as exc:
        raise read_reject(exc) from None


def process_record(store: ImageStore, opts: ImageOptions, rec: PatientRecord) -> Sample | Reject:
    """Read and convert both eyes of one patient; any bad image rejects the whole patient."""
    members: dict[str, bytes] = {}
    sizes: dict[str, list[int]] = {}
    digests = []
    for eye in EYES:
        ref = getattr(rec, eye)
        try:
            raw = _read_image(store, ref)
            digests.append(hashlib.sha256(raw).hexdigest())
            members[IMAGE_MEMBER[eye]], size = process_image(image_bytes(raw, opts.max_pixels), opts)
        except RejectError as exc:
            return Reject(rec.order, rec.patient_id, rec.source, exc.reason, f"{eye} eye: {exc.detail}")
        sizes[eye] = list(size)
    members[REPORT_MEMBER] = rec.report.encode("utf-8")
    for eye, text in zip(EYES, (rec.left_report, rec.right_report), strict=True):
        if text is not None:
            members[EYE_REPORT_MEMBER[eye]] = text.encode("utf-8")
    meta: dict[str, Any] = {"patient_id": rec.published_id, "split": rec.split, "orig_size": sizes}
    if rec.pseudonym is None:
        # Image paths often hold names, dates or record numbers, so a pseudonymised sample has none.
        meta["source"] = {"left": store.describe(rec.left), "right": store.describe(rec.right)}
    members[META_MEMBER] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return Sample(str(rec.split), rec.key, members, tuple(digests))


_worker_state: tuple[ImageStore, ImageOptions] | None = None


def _init_worker(store: ImageStore, opts: ImageOptions) -> None:
    global _worker_state
    _worker_state = (store, opts)


def _work(rec: PatientRecord) -> Sample | Reject:
    assert _worker_state is not None, "pool initializer did not run"
    return process_record(*_worker_state, rec)


def ordered_map(
    store: ImageStore, opts: ImageOptions, records: list[PatientRecord], workers: int
) -> Iterator[Sample | Reject]:
    """Processed records in input order; with workers > 1 a Pool.imap keeps order while spreading work."""
    if workers == 1:
        yield from (process_record(store, opts, rec) for rec in records)
        return
    chunk = max(1, min(16, len(records) // (workers * 8)))
    # From the fork server: this process runs tqdm's monitor thread (runtime/workers.py says why).
    with process_pool(workers, _init_worker, (store, opts)) as pool:
        yield from pool.imap(_work, records, chunksize=chunk)


def _fingerprint(recorded: dict[str, Any], planned: Iterable[PatientRecord]) -> str:
    sha = hashlib.sha256(json.dumps(recorded, sort_keys=True).encode("utf-8"))
    for rec in planned:
        sha.update(json.dumps(dataclasses.astuple(rec), ensure_ascii=False).encode("utf-8"))
    return sha.hexdigest()


def _read_inputs(opts: BuildOptions) -> tuple[list[PatientRecord], list[Reject], ImageStore]:
    if opts.dicom.root is not None:
        return read_dicom_export(
            opts.dicom, opts.split, opts.val_fraction, opts.seed, opts.workers, opts.progress
        )
    if opts.retclip_dir is not None:
        return read_retclip(opts.retclip_dir, opts.split)
    assert opts.manifest is not None and opts.images is not None  # validate() guarantees both
    records, rejects = read_patient_table(opts.manifest, opts.identifier_list())
    try:
        return records, rejects, open_image_root(opts.images)
    except ImageRootError as exc:
        raise ShardInputError(str(exc)) from exc


def _strict_error(r: Reject) -> StrictRejectError:
    return StrictRejectError(f"--strict: {r.source} ({r.patient_id}): {r.reason}: {r.detail}")


class _Packer:
    """Feeds processed patients to the ShardWriter and journals every published shard together with
    the planned position and the rejects it covers, so a resumed run skips exactly that much."""

    def __init__(
        self,
        out: OutputDir,
        opts: BuildOptions,
        journal: Journal,
        done: Progress,
        scrub: Callable[[Reject], Reject],
        source_digest: Callable[[str], str],
    ) -> None:
        self.journal = journal
        self.scrub = scrub  # what a reject looks like once written under --output_dir
        self.source_digest = source_digest  # what a source photo's sha256 looks like in manifest.json
        self.shards = list(done.shards)
        self.rejects = list(done.rejects)
        self.pending: list[Reject] = []
        self.position = done.consumed
        next_index = dict(Counter(shard["split"] for shard in self.shards))
        self.writer = ShardWriter(out, opts.max_count, opts.max_size, next_index, self._on_close)

    def _on_close(self, entry: dict[str, Any]) -> None:
        # Called before the sample at self.position is added, so every pending reject precedes it.
        self.shards.append(entry)
        self.journal.record(entry, self.position, self.pending)
        self.rejects += self.pending
        self.pending = []

    def consume(self, result: Sample | Reject) -> None:
        if isinstance(result, Reject):
            self.pending.append(self.scrub(result))
        else:
            digests = tuple(map(self.source_digest, result.source_sha256))
            self.writer.add(result.split, result.key, result.members, digests)
        self.position += 1

    def finish(self) -> None:
        self.writer.close()
        self.rejects += self.pending
        self.pending = []


def _process_all(
    packer: _Packer, store: ImageStore, opts: BuildOptions, todo: list[PatientRecord], total: int
) -> None:
    """Process ``todo`` in order into ``packer``; on any failure the open shard is dropped (a resume redoes it)."""
    bar = tqdm(total=total, initial=total - len(todo), unit="patient", disable=not opts.progress)
    try:
        with bar:
            for result in ordered_map(store, opts.image, todo, opts.workers):
                if opts.strict and isinstance(result, Reject):
                    raise _strict_error(result)
                packer.consume(result)
                bar.update(1)
    except BaseException:
        packer.writer.abort()
        raise
    packer.finish()


def _already_built(out: OutputDir, opts: BuildOptions, recorded: dict[str, Any], start: float) -> BuildResult:
    """A finished set built with the same options is left alone, so rerunning a command is harmless."""
    manifest = json.loads(out.read_text(MANIFEST_NAME))
    if manifest.get("options") != recorded:
        raise ShardInputError(
            f"{opts.out} already holds a shard set built with other options; delete it or choose another --output_dir"
        )
    log.info("%s already holds this shard set (same options); nothing to do, delete it to rebuild", opts.out)
    return BuildResult(
        out=opts.out,
        kept=sum(s["count"] for s in manifest["shards"]),
        rejected=manifest["rejected"],
        shards=manifest["shards"],
        seconds=time.perf_counter() - start,
        processed=0,
    )


class AuditFailedError(Exception):
    """A --pseudonymise build found identifiers in its own output (``hits`` lists them)."""

    def __init__(self, message: str, hits: list[Hit]) -> None:
        super().__init__(message)
        self.hits = hits


def _audit_own_output(
    out: OutputDir, opts: BuildOptions, records: list[PatientRecord], rejects: list[Reject]
) -> None:
    """make-shards audit on a set meant to leave the hospital; on a hit manifest.json goes, so the set
    cannot be mistaken for a finished one."""
    if opts.manifest is not None:
        identifiers = Identifiers.from_table(opts.manifest, opts.identifier_list())
    else:  # the ids (and, from DICOM tags, names and accession numbers) the records carry
        source = files.basename(opts.dicom.root) if opts.dicom.root else f"{opts.split}_imgs.tsv"
        identifiers = Identifiers.from_records(source, records, rejects)
    result = audit(opts.out, identifiers)
    log.info("%s", result.summary())
    if not result.ok:
        out.remove(MANIFEST_NAME)
        raise AuditFailedError(
            f"the audit found {len(result.hits)} identifiers in {opts.out} (listed above); its "
            f"{MANIFEST_NAME} was removed so the set cannot be used. Remove them at the source "
            "(--scrub-reports, --identifier-columns, --crop fundus) and build again",
            result.hits,
        )


def build_shards(opts: BuildOptions) -> BuildResult:
    """Build (or finish an interrupted build of) the shard set ``opts.out``.

    Raises ShardInputError for unusable inputs/options and StrictRejectError under ``strict``.
    """
    opts.validate()
    start = time.perf_counter()
    pseudonymiser = Pseudonymiser.from_keyfile(opts.pseudonymise) if opts.pseudonymise else None
    recorded = opts.recorded(pseudonymiser)
    out = OutputDir(opts.out)
    if out.exists(MANIFEST_NAME) and not out.exists(JOURNAL_NAME):
        result = _already_built(out, opts, recorded, start)
        if opts.dicom.write_manifest is not None:
            _read_inputs(opts)[2].cleanup()  # the derived table was asked for: read the export to write it
        return result
    records, rejects, store = _read_inputs(opts)
    scrub: Callable[[Reject], Reject] = pseudonymiser.reject if pseudonymiser else (lambda r: r)
    source_digest: Callable[[str], str] = pseudonymiser.source_digest if pseudonymiser else (lambda d: d)
    try:
        if opts.scrub_reports:
            records = scrub_records(records)
        if pseudonymiser is not None:
            records = pseudonymiser.records(records)
        planned, duplicates = plan(records, opts.split, opts.val_fraction, opts.seed)
        early = sorted(rejects + duplicates, key=lambda r: r.order)
        if opts.strict and early:
            raise _strict_error(early[0])  # stderr stays with the data owner, so it names the row fully
        early = [scrub(r) for r in early]
        journal = Journal(out, _fingerprint(recorded, planned))
        done = journal.load()
        if done.consumed:
            log.info("resuming: %d shards and %d patients already done", len(done.shards), done.consumed)
        for name in out.names():
            if name.endswith(".tmp"):
                out.remove(name)
        packer = _Packer(out, opts, journal, done, scrub, source_digest)
        todo = planned[done.consumed :]
        _process_all(packer, store, opts, todo, len(planned))
        all_rejects = early + packer.rejects
        out.write_text(REJECTS_NAME, rejects_jsonl(all_rejects))
        out.write_text(
            MANIFEST_NAME,
            manifest_json(
                recorded,
                packer.shards,
                count_rejects(all_rejects),
                pseudonymiser is not None,
                pseudonymiser.key_check() if pseudonymiser else None,
            ),
        )
        journal.remove()
        if pseudonymiser is not None:
            _audit_own_output(out, opts, records, rejects)
    finally:
        store.cleanup()
    return BuildResult(
        out=opts.out,
        kept=sum(s["count"] for s in packer.shards),
        rejected=count_rejects(all_rejects),
        shards=packer.shards,
        seconds=time.perf_counter() - start,
        processed=len(todo),
    )
