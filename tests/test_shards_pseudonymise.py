"""make-shards build --pseudonymise: no original id or path leaves in any output byte; pseudonyms are
stable per key; splits do not depend on the key; bad key files are one-line errors."""

import csv
import gzip
import hashlib
import io
import json
import re
import tarfile
import zipfile

import pytest
from conftest import build_argv
from PIL import Image

from retclip_dist.shards import cli
from retclip_dist.shards.journal import Journal
from retclip_dist.shards.pseudonym import Pseudonymiser
from retclip_dist.shards.verify import _check_sample

SMALL = ["--image-size", "64", "--min-side", "48", "--no-progress"]
KEY = b"0123456789abcdef0123456789abcdef"

# Ids and paths as a hospital writes them: names, dates and record numbers in both.
PATIENTS = [
    (
        "HOSP.0091427",
        "Müller^Hans/HOSP.0091427_2019-03-04_OD.jpg",
        "Müller^Hans/HOSP.0091427_2019-03-04_OS.jpg",
    ),
    (
        "HOSP.0115518",
        "Dupont^Marie/HOSP.0115518_2020-11-12_OD.jpg",
        "Dupont^Marie/HOSP.0115518_2020-11-12_OS.jpg",
    ),
    ("MRN77120934", "MRN77120934/right_eye_scan.jpg", "MRN77120934/left_eye_scan.jpg"),
    ("Rossi, Anna 1957", "rossi_anna_1957/fundus_od.jpg", "rossi_anna_1957/fundus_os.jpg"),
    ("PAT-4471-XY", "pat4471xy/img_0001.jpg", "pat4471xy/img_0002.jpg"),
    ("HOSP.0200001", "Garcia^Luis/scan_right.jpg", "Garcia^Luis/scan_left.jpg"),
]
# Rows that are rejected, each for another reason; their ids and paths must not leak either.
REJECTED = [
    ("HOSP.0300003", "Nowak^Jan/missing_right.jpg", "Nowak^Jan/scan_OS.jpg"),  # missing_file
    ("HOSP.0400004", "Kim^Min/tiny_right.jpg", "Kim^Min/tiny_left.jpg"),  # too_small
    ("HOSP.0091427", "Müller^Hans/again_OD.jpg", "Müller^Hans/again_OS.jpg"),  # duplicate_id
]


def _jpeg(size: int, seed: int, description: str = "") -> bytes:
    """A noisy JPEG whose EXIF ImageDescription holds ``description`` (cameras write names there)."""
    exif = Image.Exif()
    exif[0x010E] = description
    buf = io.BytesIO()
    Image.effect_noise((size, size), 40 + seed).convert("RGB").save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture
def cohort(tmp_path):
    """(manifest, zip root, key file, every original string that must not leave)."""
    raw = tmp_path / "Klinikum_Nord_export"
    raw.mkdir()
    members = {}
    for i, (pid, right, left) in enumerate(PATIENTS + REJECTED):
        members[right] = _jpeg(80, i, pid)
        members[left] = _jpeg(80, i + 50, pid)
    del members["Nowak^Jan/missing_right.jpg"]
    members["Kim^Min/tiny_right.jpg"] = _jpeg(20, 1)
    images = raw / "fundus_Klinikum_Nord.zip"
    with zipfile.ZipFile(images, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    manifest = raw / "patients_Klinikum_Nord.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient_id", "left_image", "right_image", "report"])
        for pid, right, left in PATIENTS + REJECTED:
            writer.writerow([pid, left, right, "mild non-proliferative retinopathy"])
        writer.writerow(["HOSP.0500005", "Lee^Ann/x.jpg", "", "report"])  # missing_eye
    keyfile = tmp_path / "pseudonym.key"
    keyfile.write_bytes(KEY + b"\n")
    secret = {pid for pid, _, _ in PATIENTS + REJECTED} | {"HOSP.0500005", "Lee^Ann/x.jpg"}
    for _, right, left in PATIENTS + REJECTED:
        for path in (right, left):
            secret |= {path, *path.split("/")}
    secret |= {str(manifest), str(images), manifest.name, images.name, raw.name, str(keyfile), KEY.decode()}
    return manifest, images, keyfile, secret


def _build(cohort, out, *extra) -> int:
    manifest, images, keyfile, _ = cohort
    args = ["build", "--manifest", str(manifest), "--images", str(images), "--output_dir", str(out)]
    return cli.main([*args, "--pseudonymise", str(keyfile), *SMALL, *extra])


def _every_byte_stream(directory):
    """(where, bytes) of every file under ``directory``, of every tar member's name and data, and of
    anything gzip-compressed, decompressed."""
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        data = path.read_bytes()
        yield str(path.relative_to(directory)), data
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
            yield f"{path.name} (gunzipped)", data
        if path.name.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                for member in tf.getmembers():
                    fh = tf.extractfile(member)
                    yield f"{path.name} member name", member.name.encode("utf-8")
                    yield f"{path.name}:{member.name}", fh.read() if fh else b""


def _leaks(directory, secret: set[str]) -> list[tuple[str, str]]:
    forms = {s: {s.encode("utf-8"), json.dumps(s)[1:-1].encode("ascii")} for s in secret}
    return [
        (where, s)
        for where, data in _every_byte_stream(directory)
        for s, encodings in forms.items()
        if any(e in data for e in encodings)
    ]


def test_no_original_id_or_path_in_any_output_byte(cohort, tmp_path, monkeypatch, capsys):
    # Keep the resume journal too: it sits under --out while a build runs.
    monkeypatch.setattr(Journal, "remove", lambda self: None)
    out = tmp_path / "out"
    assert _build(cohort, out, "--max-count", "2") == 0
    assert re.search(r"^kept +6$", capsys.readouterr().out, re.M)
    assert (out / "make-shards.journal.jsonl").exists()
    assert _leaks(out, cohort[3]) == []
    # The check itself finds a leak: the same build without --pseudonymise is full of them.
    plain = tmp_path / "plain"
    manifest, images, _, secret = cohort
    argv = ["build", "--manifest", str(manifest), "--images", str(images), "--output_dir", str(plain), *SMALL]
    assert cli.main(argv) == 0
    leaked = {s for _, s in _leaks(plain, secret)}
    assert {"HOSP.0091427", "Müller^Hans/HOSP.0091427_2019-03-04_OD.jpg", "HOSP.0300003"} <= leaked


def test_samples_manifest_and_rejects_carry_pseudonyms(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    assert _build(cohort, out) == 0
    alias = Pseudonymiser(KEY).pseudonym
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pseudonymised"] is True and manifest["options"]["pseudonymise"] is True
    assert manifest["options"]["manifest"].startswith("hmac-sha256:")
    with tarfile.open(out / "train-000000.tar") as tf:
        metas = [json.load(tf.extractfile(m)) for m in tf.getmembers() if m.name.endswith(".json")]
        names = {m.name.split(".")[0] for m in tf.getmembers()}
    assert sorted(m["patient_id"] for m in metas) == sorted(alias(pid) for pid, _, _ in PATIENTS)
    assert names == {m["patient_id"] for m in metas}  # the pseudonym is the key
    assert all(set(m) == {"patient_id", "split", "orig_size"} for m in metas)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    # The data owner finds each row by its line in their manifest (and can recompute the pseudonym).
    assert [(r["id"], r["source"], r["reason"]) for r in rejects] == [
        (alias("HOSP.0300003"), "line 8", "missing_file"),
        (alias("HOSP.0400004"), "line 9", "too_small"),
        (alias("HOSP.0091427"), "line 10", "duplicate_id"),
        (alias("HOSP.0500005"), "line 11", "missing_eye"),
    ]
    assert cli.main(["verify", str(out)]) == 0
    assert "pseudonymised: yes" in capsys.readouterr().out


def test_pseudonyms_stable_per_key_and_splits_independent_of_key(cohort, tmp_path):
    def files(d):
        return {p.name: p.read_bytes() for p in sorted(d.iterdir())}

    extra = ["--val-fraction", "0.5", "--max-count", "2"]
    assert _build(cohort, tmp_path / "a", *extra) == 0
    assert _build(cohort, tmp_path / "b", *extra, "--workers", "2") == 0
    assert files(tmp_path / "a") == files(tmp_path / "b")

    def splits(d):
        found = {}
        for tar in d.glob("*.tar"):
            with tarfile.open(tar) as tf:
                for m in tf.getmembers():
                    if m.name.endswith(".json"):
                        meta = json.load(tf.extractfile(m))
                        found[meta["patient_id"]] = meta["split"]
        return found

    other = tmp_path / "other.key"
    other.write_bytes(b"another-secret-key-of-32-bytes!!")
    manifest, images, _, _ = cohort
    assert _build((manifest, images, other, None), tmp_path / "c", *extra) == 0
    a, c = splits(tmp_path / "a"), splits(tmp_path / "c")
    assert set(a).isdisjoint(c)  # another key, other pseudonyms
    by_id_a = {pid: a[Pseudonymiser(KEY).pseudonym(pid)] for pid, _, _ in PATIENTS}
    by_id_c = {pid: c[Pseudonymiser(other.read_bytes()).pseudonym(pid)] for pid, _, _ in PATIENTS}
    assert cli.main(build_argv(manifest, images, tmp_path / "p", *SMALL, *extra)) == 0
    assert by_id_a == by_id_c == splits(tmp_path / "p")  # the split follows the original id
    assert set(by_id_a.values()) == {"train", "val"}


def test_rerun_with_another_key_is_refused(cohort, tmp_path, capsys):
    assert _build(cohort, tmp_path / "out") == 0
    other = tmp_path / "other.key"
    other.write_bytes(b"another-secret-key-of-32-bytes!!")
    manifest, images, _, _ = cohort
    assert _build((manifest, images, other, None), tmp_path / "out") == 2
    assert "built with other options" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the key file"),
        ("dir", "cannot read the key file"),
        (b"", "the key file is empty"),
        (b"  \n\n", "the key file is empty"),
        (b"short\n", "the key is 5 bytes, need at least 16"),
    ],
)
def test_bad_key_file_is_one_line_exit_2(cohort, tmp_path, capsys, content, message):
    keyfile = tmp_path / "bad.key"
    if content == "dir":
        keyfile.mkdir()
    elif content is not None:
        keyfile.write_bytes(content)
    manifest, images, _, _ = cohort
    assert _build((manifest, images, keyfile, None), tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert message in err and str(keyfile) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_verify_flags_pseudonymised_samples_with_ids_or_paths():
    alias = Pseudonymiser(KEY).pseudonym("HOSP.0091427")
    jpeg = _jpeg(8, 0)

    def sample(meta):
        members = {"json": json.dumps(meta).encode(), "left.jpg": jpeg, "right.jpg": jpeg, "report.txt": b"r"}
        return _check_sample(alias, members, pseudonymised=True)

    assert sample({"patient_id": alias, "split": "train", "orig_size": {}}) == []
    leaky = sample({"patient_id": "HOSP.0091427", "split": "train", "source": {"left": "a.jpg"}})
    assert [p.split(": ", 1)[1] for p in leaky] == [
        "set is pseudonymised but patient_id is not this key's pseudonym",
        "set is pseudonymised but json carries source paths",
    ]


def test_source_hashes_are_keyed_so_a_photo_cannot_be_tested_without_the_key(cohort, tmp_path):
    manifest, images, _, _ = cohort
    out = tmp_path / "out"
    assert _build(cohort, out) == 0
    written = json.loads((out / "manifest.json").read_text())
    assert written["source_hash"] == "hmac-sha256"
    assert written["key_check"] == Pseudonymiser(KEY).key_check() and KEY.decode() not in json.dumps(written)
    digests = {d for shard in written["shards"] for d in shard["source_sha256"]}
    with zipfile.ZipFile(images) as zf:
        sources = {path: zf.read(path) for _, right, left in PATIENTS for path in (right, left)}
    plain = {hashlib.sha256(data).hexdigest() for data in sources.values()}
    assert len(digests) == len(plain) == 2 * len(PATIENTS)
    assert digests.isdisjoint(plain)  # holding a photo tells nothing
    assert digests == {Pseudonymiser(KEY).source_digest(h) for h in plain}  # the key holder can still check
    # The same build without the key keeps the plain hashes.
    argv = [
        "build",
        "--manifest",
        str(manifest),
        "--images",
        str(images),
        "--output_dir",
        str(tmp_path / "p"),
    ]
    assert cli.main([*argv, *SMALL]) == 0
    unkeyed = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert unkeyed["source_hash"] == "sha256" and "key_check" not in unkeyed
    assert {d for shard in unkeyed["shards"] for d in shard["source_sha256"]} == plain


def test_a_pseudonym_cannot_be_matched_to_a_digest_of_the_same_text_elsewhere_in_the_set():
    """Each keyed digest has its own domain: the id "P1" and an input path "P1" (or a photo's hash) get
    unrelated digests, so a reader cannot link a manifest's option digest or a source digest to a patient."""
    p = Pseudonymiser(KEY)
    for text in ("P1", "/exports/HOSP.0500005", hashlib.sha256(b"photo").hexdigest()):
        digests = {
            p.pseudonym(text).removeprefix("ps-"),
            p.option_digest(text).removeprefix("hmac-sha256:"),
            p.source_digest(text)[:32],
        }
        assert len(digests) == 3, text
