"""make-shards audit, and the realistic export: a hospital-style export (identifiers in the table, in
image metadata, burned into the corners, in the reports) built with --pseudonymise --crop fundus
--scrub-reports passes the audit; identifiers planted anywhere in a set, in any of the encodings an
auditor would meet, are found; ids in compressed pixels or hex digests are not false alarms."""

import gzip
import io
import json
import shutil
import tarfile
import zipfile

import numpy as np
import pytest
from conftest import build_argv
from PIL import Image

from retclip_dist import synth
from retclip_dist.shards import cli
from retclip_dist.shards.audit import Identifiers, audit
from retclip_dist.shards.crop import Circle, outside_mask

KEY = b"0123456789abcdef0123456789abcdef"
SIZE = ["--image-size", "96", "--min-side", "96", "--no-progress"]
COLUMNS = "patient_name,mrn"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """(root, manifest, images, key file, cleaned set) of a 4-patient hospital-style export."""
    root = tmp_path_factory.mktemp("export")
    manifest, images = synth.write_raw_archive(
        root / "raw", 4, seed=4, image_size=256, layout="zip", identifying=True
    )
    key = root / "pseudonym.key"
    key.write_bytes(KEY)
    out = root / "clean"
    argv = build_argv(
        manifest, images, out, *SIZE, "--pseudonymise", str(key), "--identifier-columns", COLUMNS
    )
    assert cli.main([*argv, "--crop", "fundus", "--scrub-reports"]) == 0
    return root, manifest, images, key, out


def who(i: int) -> dict[str, str]:
    return synth.identifying_details(i, 4)


def _audit_cli(directory, manifest, *extra) -> int:
    return cli.main(
        ["audit", str(directory), "--manifest", str(manifest), "--identifier-columns", COLUMNS, *extra]
    )


def test_realistic_export_passes_the_audit_and_keeps_pixels_and_clinical_text(export, capsys):
    _, manifest, images, _, out = export
    raw = zipfile_bytes(images)
    # The export is as identifying as claimed: metadata, names in paths, ids in the reports.
    assert any(who(0)["mrn"].encode() in data for data in raw.values())
    assert who(1)["patient_name"] in manifest.read_text(encoding="utf-8")
    capsys.readouterr()
    assert _audit_cli(out, manifest) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("audit OK: nothing found in 3 files")
    assert "8 JPEGs" in printed[0] and "identifiers of patients.csv" in printed[0]
    assert cli.main(["verify", str(out)]) == 0
    with tarfile.open(out / "train-000000.tar") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    reports = [data.decode() for name, data in members.items() if name.endswith("report.txt")]
    assert len(reports) == 4 and all("[PATIENT_NAME]" in r and "impression:" in r for r in reports)
    for name, data in members.items():
        if name.endswith(".jpg"):
            pixels = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=int)
            assert pixels.shape == (96, 96) and pixels.mean() > 40  # the retina is there
            ring = outside_mask((96, 96), Circle(48, 48, 48 + 2))
            assert pixels[ring].max() <= 12  # the burned-in corners are black


def zipfile_bytes(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def test_without_scrubbing_the_pseudonymised_build_fails_its_own_audit(export, tmp_path, capsys):
    _, manifest, images, key, _ = export
    out = tmp_path / "out"
    argv = build_argv(
        manifest, images, out, *SIZE, "--pseudonymise", str(key), "--identifier-columns", COLUMNS
    )
    assert cli.main([*argv, "--crop", "fundus"]) == 1
    captured = capsys.readouterr()
    hits = [line for line in captured.out.splitlines() if line.startswith("HIT ")]
    assert any(
        who(0)["mrn"] in line and "report.txt" in line and "mrn of patients.csv:2" in line for line in hits
    )
    assert "manifest.json was removed" in captured.err
    assert not (out / "manifest.json").exists()
    assert cli.main(["verify", str(out)]) == 1


def _rewrite_tar(path, change):
    """Rewrite a shard with ``change(name, data) -> (name, data, pax)`` applied to every member."""
    with tarfile.open(path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            name, data, pax = change(name, data)
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(data), pax
            tf.addfile(info, io.BytesIO(data))


def _member(suffix, new):
    """A change that gives the first member ending in ``suffix`` the data ``new(data)``."""
    done = []

    def change(name, data):
        if name.endswith(suffix) and not done:
            done.append(name)
            return name, new(data), {}
        return name, data, {}

    return change


def _add_com(data):
    return synth.with_metadata(data, f"Patient ID {who(2)['mrn']}")


PLANTS = {
    # place: (file to change, how, expected file, expected member part, expected encoding, column)
    "member name": (
        "train-000000.tar",
        lambda n, d: (n.replace(".left.jpg", f".{who(0)['mrn']}.jpg"), d, {}),
        "train-000000.tar",
        ".jpg",
        "utf-8",
        "mrn",
    ),
    "pax header": (
        "train-000000.tar",
        lambda n, d: (n, d, {"comment": f"scanned for {who(1)['patient_name']}"}),
        "train-000000.tar",
        "",
        "utf-8",
        "patient_name",
    ),
    "json member": (
        "train-000000.tar",
        _member(".json", lambda d: d[:-1] + f', "note": "{who(3)["mrn"]}"}}'.encode()),
        "train-000000.tar",
        ".json",
        "utf-8",
        "mrn",
    ),
    "report in UTF-16": (
        "train-000000.tar",
        _member(".report.txt", lambda d: f"seen by {who(0)['patient_name']}".encode("utf-16-le")),
        "train-000000.tar",
        ".report.txt",
        "utf-16-le",
        "patient_name",
    ),
    "full-width and upper case": (
        "train-000000.tar",
        _member(
            ".report.txt",
            lambda d: d + who(2)["mrn"].upper().translate({c: c + 0xFEE0 for c in range(33, 127)}).encode(),
        ),
        "train-000000.tar",
        ".report.txt",
        "utf-8",
        "mrn",
    ),
    "JPEG metadata segments": (
        "train-000000.tar",
        _member(".jpg", _add_com),
        "train-000000.tar",
        ".jpg",
        "utf-16-le",  # EXIF XPComment; COM, EXIF ImageDescription/Artist, XMP and IPTC are UTF-8
        "mrn",
    ),
    "bytes after a JPEG's end": (
        "train-000000.tar",
        _member(".jpg", lambda d: d + b"\0\0" + who(1)["mrn"].encode()),
        "train-000000.tar",
        ".jpg",
        "",
        "mrn",
    ),
}


@pytest.mark.parametrize("place", sorted(PLANTS))
def test_audit_finds_identifiers_planted_in_shards(export, tmp_path, place):
    _, manifest, _, _, clean = export
    target, change, file, member, encoding, column = PLANTS[place]
    work = tmp_path / "set"
    shutil.copytree(clean, work)
    _rewrite_tar(work / target, change)
    result = audit(str(work), Identifiers.from_table(str(manifest), tuple(COLUMNS.split(","))))
    assert not result.ok
    assert all(h.file == file and member in h.member for h in result.hits), [h.line() for h in result.hits]
    assert all(h.what.startswith(f"{column} of patients.csv:") for h in result.hits)
    assert any(h.encoding.startswith(encoding) for h in result.hits)
    if place == "JPEG metadata segments":
        assert len({h.offset for h in result.hits}) == 6  # COM, description, artist, XP comment, XMP, IPTC
    assert _audit_cli(work, manifest) == 1


def test_audit_finds_identifiers_in_every_other_file(export, tmp_path, capsys):
    _, manifest, _, _, clean = export
    work = tmp_path / "set"
    shutil.copytree(clean, work)
    name = who(0)["patient_name"]  # "Hans Müller": \u-escaped in JSON written with ensure_ascii
    data = json.loads((work / "manifest.json").read_text())
    data["options"]["note"] = name
    (work / "manifest.json").write_text(json.dumps(data))
    with (work / "rejects.jsonl").open("a") as fh:
        fh.write(json.dumps({"id": who(1)["mrn"].lower()}) + "\n")
    (work / "notes").mkdir()
    (work / "notes" / "log.txt.gz").write_bytes(gzip.compress(f"copied for {who(3)['mrn']}\n".encode()))
    result = audit(str(work), Identifiers.from_table(str(manifest), tuple(COLUMNS.split(","))))
    found = {(h.file, h.encoding, h.what.split(" of ")[0]) for h in result.hits}
    assert found == {
        ("manifest.json", "json-escaped", "patient_name"),
        ("manifest.json", "utf-8", "patient_name"),  # "Hans", a word of the name, is plain ASCII there
        ("rejects.jsonl", "utf-8", "mrn"),
        ("notes/log.txt.gz", "gunzipped utf-8", "mrn"),
    }
    capsys.readouterr()
    assert _audit_cli(work, manifest) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("audit FAILED: 4 hits in 4 files")
    assert any(line.startswith("HIT rejects.jsonl @") and who(1)["mrn"].lower() in line for line in lines)


def test_no_false_alarms_from_compressed_pixels_digests_or_short_ids(export, tmp_path):
    _, _, _, _, clean = export
    work = tmp_path / "set"
    shutil.copytree(clean, work)
    table = tmp_path / "patients.csv"
    table.write_text(
        "patient_id,left_image,right_image,report\n"
        "123456,a.jpg,b.jpg,r\n"  # a 6-digit id, planted below where it must not count
        "12,c.jpg,d.jpg,r\n"  # too short to search at all
    )

    def plant_in_scan_data(data):
        sos = data.index(b"\xff\xda")
        middle = sos + (len(data) - sos) // 2
        return data[:middle] + b"123456" + data[middle + 6 :]

    _rewrite_tar(work / "train-000000.tar", _member(".jpg", plant_in_scan_data))
    data = json.loads((work / "manifest.json").read_text())
    data["options"]["digest"] = "ab123456" + "cd" * 12
    (work / "manifest.json").write_text(json.dumps(data))
    assert b"123456" in (work / "train-000000.tar").read_bytes()  # a byte grep would cry wolf
    result = audit(str(work), Identifiers.from_table(str(table)))
    assert result.ok, [h.line() for h in result.hits]
    assert result.skipped_bytes > 0 and result.hex_runs > 0
    assert "identifiers too short to search (first: patient_id of patients.csv:3)" in result.summary()
    # The same id where it is text is found.
    (work / "note.txt").write_text("patient 123456 was here")
    assert [h.file for h in audit(str(work), Identifiers.from_table(str(table))).hits] == ["note.txt"]


def test_patterns_and_exit_codes(export, tmp_path, capsys):
    _, manifest, _, _, clean = export
    assert _audit_cli(clean, manifest, "--pattern", r"\[PHONE\]") == 1  # the placeholder is there
    assert "pattern" in capsys.readouterr().out
    assert _audit_cli(clean, manifest, "--pattern", "(") == 2
    assert "--pattern '(': not a regular expression" in capsys.readouterr().err
    assert _audit_cli(tmp_path / "missing", manifest) == 2
    assert "not a directory" in capsys.readouterr().err
    assert cli.main(["audit", str(clean), "--manifest", str(manifest), "--identifier-columns", "nope"]) == 2
    assert "no column(s) ['nope']" in capsys.readouterr().err


def test_a_pseudonymised_retclip_build_audits_for_its_ids(tmp_path, capsys):
    source = synth.write_retclip_dir(tmp_path / "rc", 3, image_size=64)
    key = tmp_path / "key"
    key.write_bytes(KEY)
    argv = ["build", "--retclip-dir", str(source), "--image-size", "32", "--min-side", "32", "--no-progress"]
    argv += ["--pseudonymise", str(key)]
    assert cli.main([*argv, "--output_dir", str(tmp_path / "clean")]) == 0
    texts = source / "train_texts.jsonl"
    lines = [json.loads(line) for line in texts.read_text().splitlines()]
    lines[1]["text"] = f"follow-up of {lines[1]['image_ids'][0]}: " + lines[1]["text"]
    texts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    capsys.readouterr()
    assert cli.main([*argv, "--output_dir", str(tmp_path / "leaky")]) == 1
    hits = [line for line in capsys.readouterr().out.splitlines() if line.startswith("HIT ")]
    assert len(hits) == 1 and "report.txt" in hits[0] and "= patient_id of train_imgs.tsv:2" in hits[0]
    assert not (tmp_path / "leaky" / "manifest.json").exists()
