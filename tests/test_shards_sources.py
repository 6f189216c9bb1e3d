import dataclasses
import gzip
import hashlib
import io
import json
import os
import tarfile
import unicodedata
import zipfile

import numpy as np
import pytest

from retclip_dist import synth
from retclip_dist.io.errors import AmbiguousName, ImageNotFound, ImageRootError, UnsafePath
from retclip_dist.io.roots import DirStore, ZipStore, open_image_root
from retclip_dist.shards import records as records_module
from retclip_dist.shards.build import BuildOptions, build_shards
from retclip_dist.shards.images import ImageOptions
from retclip_dist.shards.plan import drop_duplicates, plan
from retclip_dist.shards.records import (
    PatientRecord,
    RejectError,
    ShardInputError,
    assign_keys,
    normalise_relpath,
    read_reject,
    shard_key,
)
from retclip_dist.shards.sources import read_patient_table, read_retclip

HEADER = "patient_id,left_image,right_image,report"


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return str(path)


def rejects_by_line(rejects):
    return {r.source: (r.reason, r.patient_id) for r in rejects}


def test_normalise_relpath_rules():
    assert normalise_relpath("./a//b/./c.jpg") == "a/b/c.jpg"
    assert normalise_relpath("a\\b.jpg") == "a/b.jpg"
    for bad in ("/etc/passwd", "../x.jpg", "a/../../x.jpg", "C:/x.jpg", "..\\x.jpg"):
        with pytest.raises(RejectError) as info:
            normalise_relpath(bad)
        assert info.value.reason == "unsafe_path", bad
    for empty in ("   ", "./", "."):
        with pytest.raises(RejectError) as info:
            normalise_relpath(empty)
        assert info.value.reason == "empty_path", empty


def test_every_image_read_error_of_io_maps_to_one_reject_reason():
    from retclip_dist.io import errors

    kinds = [
        c
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.ImageReadError) and c is not errors.ImageReadError
    ]
    reasons = {kind.__name__: read_reject(kind("x.jpg not found under r")).reason for kind in kinds}
    assert reasons == {
        "EmptyPath": "empty_path",
        "UnsafePath": "unsafe_path",
        "ImageNotFound": "missing_file",
        "AmbiguousName": "ambiguous_name",
        "CorruptData": "undecodable",
    }
    assert read_reject(ImageNotFound("x.jpg not found under r")).detail == "x.jpg not found under r"


def test_shard_key_sanitises_only_when_needed():
    assert shard_key("P-001_a") == "P-001_a"
    assert shard_key("P 001.jpg") == "sanitised-" + hashlib.sha256(b"P 001.jpg").hexdigest()[:32]
    assert shard_key("x" * 65).startswith("sanitised-")
    assert shard_key("a/b") != shard_key("a\\b")
    # A plain id that looks like a hashed key is hashed too, so it cannot take another patient's key.
    lookalike = shard_key("P 001.jpg")
    assert shard_key(lookalike) != lookalike and shard_key(lookalike).startswith("sanitised-")


def test_csv_manifest_every_row_problem_names_its_line(tmp_path):
    text = "\n".join(
        [
            HEADER + ",split,left_report",
            "p1,a.jpg,b.jpg,fine report,,left says",
            "p2,,b.jpg,r,,",
            "p3,   ,b.jpg,r,,",
            "p4,/etc/passwd,b.jpg,r,,",
            "p5,a.jpg,../b.jpg,r,,",
            "p6,a.jpg,b.jpg,   ,,",
            "p7,a.jpg,b.jpg,r,te st,",
            "p8,a.jpg",
            ",a.jpg,b.jpg,r,,",
            "p10,a.jpg,b.jpg,r,val,",
        ]
    )
    records, rejects = read_patient_table(write(tmp_path / "m.csv", text + "\n"))
    assert rejects_by_line(rejects) == {
        "m.csv:3": ("missing_eye", "p2"),
        "m.csv:4": ("empty_path", "p3"),
        "m.csv:5": ("unsafe_path", "p4"),
        "m.csv:6": ("unsafe_path", "p5"),
        "m.csv:7": ("blank_report", "p6"),
        "m.csv:8": ("bad_row", "p7"),
        "m.csv:9": ("bad_row", ""),
        "m.csv:10": ("bad_row", ""),
    }
    assert [(r.patient_id, r.split, r.source) for r in records] == [
        ("p1", None, "m.csv:2"),
        ("p10", "val", "m.csv:11"),
    ]
    assert records[0].left_report == "left says" and records[0].right_report is None
    assert records[0].report == "fine report"


def test_jsonl_manifest_rows(tmp_path):
    lines = [
        json.dumps({"patient_id": 17, "left_image": "l.png", "right_image": "r.png", "report": "ok"}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"patient_id": "p", "left_image": "l.png", "right_image": "r.png"}),
        "",
        json.dumps({"patient_id": "q", "left_image": None, "right_image": "r.png", "report": "x"}),
    ]
    records, rejects = read_patient_table(write(tmp_path / "m.jsonl", "\n".join(lines)))
    assert [r.patient_id for r in records] == ["17"]
    assert rejects_by_line(rejects) == {
        "m.jsonl:2": ("bad_row", ""),
        "m.jsonl:3": ("bad_row", ""),
        "m.jsonl:4": ("missing_report", "p"),
        "m.jsonl:6": ("missing_eye", "q"),
    }


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("m.csv", "patient_id,left_image,report\np,a,b\n", "missing required column(s) ['right_image']"),
        ("m.csv", "", "empty file"),
        ("m.jsonl", "this is not json\nnor this\n", "no line is a JSON object"),
        ("m.csv", b"\xff\xfe\x00garbage", "not UTF-8"),
        ("absent.csv", None, "no such file"),
    ],
)
def test_unusable_manifest_is_one_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ShardInputError) as info:
        read_patient_table(str(path))
    assert message in str(info.value) and name in str(info.value)


def test_duplicates_keep_first_and_plan_is_order_independent(tmp_path):
    rows = [f"p{i},a.jpg,b.jpg,r" for i in range(40)] + ["p3,c.jpg,d.jpg,second copy"]
    records, _ = read_patient_table(write(tmp_path / "a.csv", "\n".join([HEADER, *rows])))
    kept, dups = drop_duplicates(records)
    assert len(kept) == 40 and [(d.patient_id, d.source, d.reason) for d in dups] == [
        ("p3", "a.csv:42", "duplicate_id")
    ]
    assert "a.csv:5" in dups[0].detail
    planned, _ = plan(records, "train", 0.25, seed=3)
    shuffled, _ = read_patient_table(write(tmp_path / "b.csv", "\n".join([HEADER, *reversed(rows[:40])])))
    planned_rev, _ = plan(shuffled, "train", 0.25, seed=3)
    order = [(r.split, r.patient_id) for r in planned]
    assert order == [(r.split, r.patient_id) for r in planned_rev]
    val = [pid for split, pid in order if split == "val"]
    assert 4 <= len(val) <= 18 and order[: len(order) - len(val)] == [
        ("train", p) for _, p in order if _ == "train"
    ]
    assert [p for _, p in order[:5]] != ["p0", "p1", "p2", "p3", "p4"]  # shuffled, not manifest order
    planned_seed4, _ = plan(records, "train", 0.25, seed=4)
    assert [r.patient_id for r in planned_seed4] != [p for _, p in order]


def test_ids_whose_old_32_bit_keys_collided_are_both_kept_with_distinct_keys():
    ids = ["HOSP.0091427", "HOSP.0115518"]
    # The pair: the former sha1[:8] suffix gave both the same key.
    assert len({hashlib.sha1(i.encode()).hexdigest()[:8] for i in ids}) == 1
    records = [
        PatientRecord(order=n, patient_id=pid, source=f"m.csv:{n + 2}", left="l", right="r", report="x")
        for n, pid in enumerate(ids)
    ]
    planned, dups = plan(records, "train", 0.0, seed=0)
    assert dups == []
    assert {r.patient_id: r.key for r in planned} == {i: shard_key(i) for i in ids}
    assert len({r.key for r in planned}) == 2


def test_id_equal_to_another_ids_hashed_key_is_not_a_duplicate():
    odd = PatientRecord(order=0, patient_id="a b", source="m.csv:2", left="l", right="r", report="x")
    twin = dataclasses.replace(odd, order=1, patient_id=shard_key("a b"), source="m.csv:3")
    planned, dups = plan([twin, odd], "train", 0.0, seed=0)
    assert dups == [] and len({r.key for r in planned}) == 2


def test_hash_collisions_move_a_key_deterministically(monkeypatch):
    # Three hex digits (4096 keys) for 300 ids: about 11 collisions; every id must still get its own key,
    # the same one whatever the input order.
    monkeypatch.setattr(records_module, "_KEY_HEX", 3)
    ids = [f"id {i}" for i in range(300)]
    keys = assign_keys(ids)
    assert len(set(keys.values())) == 300
    assert assign_keys(list(reversed(ids))) == keys
    assert sum(k != shard_key(i) for i, k in keys.items()) > 0  # some keys did move
    assert all(k.startswith("sanitised-") for k in keys.values())


def _archive_bytes() -> dict[str, bytes]:
    return {"a/left.jpg": b"L" * 10, "a/right.jpg": b"R" * 7}


def test_zip_tar_and_targz_roots_read_by_normalised_name(tmp_path):
    files = _archive_bytes()
    with zipfile.ZipFile(tmp_path / "i.zip", "w") as zf:
        for name, data in files.items():
            zf.writestr("./" + name, data)
        zf.writestr("../evil.jpg", b"E")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in {**files, "/abs.jpg": b"A", "b/../../evil.jpg": b"E"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("a/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    (tmp_path / "i.tar").write_bytes(buf.getvalue())
    (tmp_path / "i.tar.gz").write_bytes(gzip.compress(buf.getvalue()))
    for name in ("i.zip", "i.tar", "i.tar.gz"):
        store = open_image_root(str(tmp_path / name))
        try:
            assert store.read("a/left.jpg") == b"L" * 10
            assert store.read("a/right.jpg") == b"R" * 7
            for missing in ("evil.jpg", "abs.jpg", "a/link.jpg", "nope.jpg"):
                with pytest.raises(ImageNotFound, match="not found in"):
                    store.read(missing)
        finally:
            store.cleanup()
    assert not (tmp_path / "evil.jpg").exists()


def test_targz_is_decompressed_once_to_a_temp_tar_that_cleanup_removes(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("x.jpg")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    (tmp_path / "i.tgz").write_bytes(gzip.compress(buf.getvalue()))
    store = open_image_root(str(tmp_path / "i.tgz"))
    assert store.temp_dir and os.path.exists(os.path.join(store.temp_dir, "images.tar"))
    assert store.read("x.jpg") == b"abc"
    store.cleanup()
    assert not os.path.exists(store.temp_dir)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.zip", b"PK\x03\x04 not really", "not a readable zip"),
        ("bad.tar", b"\x01" * 1000, "not a readable tar"),
        ("bad.tar.gz", b"\x1f\x8b garbage", "not a readable tar.gz"),
    ],
)
def test_bad_archive_is_one_clear_error(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageRootError) as info:
        open_image_root(str(tmp_path / name))
    assert message in str(info.value) and name in str(info.value)


def test_dir_root_refuses_symlinks_leaving_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.jpg").write_bytes(b"ok")
    (tmp_path / "secret.jpg").write_bytes(b"secret")
    (root / "escape.jpg").symlink_to(tmp_path / "secret.jpg")
    (root / "inside.jpg").symlink_to(root / "sub" / "ok.jpg")
    (root / "subdir-link").symlink_to(tmp_path)
    store = DirStore(str(root))
    assert store.read("sub/ok.jpg") == b"ok"
    assert store.read("inside.jpg") == b"ok"
    for ref, why in (
        ("escape.jpg", UnsafePath),
        ("subdir-link/secret.jpg", UnsafePath),
        ("no.jpg", ImageNotFound),
    ):
        with pytest.raises(why):
            store.read(ref)


def test_zip_store_pickles_without_handles_and_reopens_in_worker(tmp_path):
    import pickle

    with zipfile.ZipFile(tmp_path / "i.zip", "w") as zf:
        zf.writestr("x.jpg", b"xyz")
    store = ZipStore(str(tmp_path / "i.zip"))
    assert store.read("x.jpg") == b"xyz"  # opens a handle in this process
    clone = pickle.loads(pickle.dumps(store))
    assert not any(k.startswith("_fh") for k in vars(clone))
    assert clone.read("x.jpg") == b"xyz"


def test_retclip_dir_records_and_rejects(tmp_path):
    synth.write_retclip_dir(tmp_path, 3, seed=0, split="train", image_size=32)
    with (tmp_path / "train_imgs.tsv").open("a") as fh:
        fh.write("orphan\tQUJD\tQUJD\n")  # no text line for this patient
        fh.write("broken-line-without-tabs\n")
        fh.write("noeye\t\tQUJD\n")
    with (tmp_path / "train_texts.jsonl").open("a") as fh:
        fh.write(json.dumps({"text_id": 9, "text": "  ", "image_ids": ["noeye"]}) + "\n")
    records, rejects, store = read_retclip(str(tmp_path), "train")
    assert [r.patient_id for r in records] == ["patient-000000", "patient-000001", "patient-000002"]
    assert rejects_by_line(rejects) == {
        "train_imgs.tsv:4": ("missing_report", "orphan"),
        "train_imgs.tsv:5": ("bad_row", "broken-line-without-tabs"),
        "train_imgs.tsv:6": ("missing_eye", "noeye"),
    }
    left = store.read(records[1].left)
    assert left[:2] == b"\xff\xd8"  # JPEG magic after base64 decoding
    assert store.describe(records[1].right) == "train_imgs.tsv:2:right"
    with pytest.raises(ShardInputError, match=r"valid_imgs\.tsv not found"):
        read_retclip(str(tmp_path), "valid")


NFC_NAME = unicodedata.normalize("NFC", "Zoë/Müller_é.jpg")
NFD_NAME = unicodedata.normalize("NFD", NFC_NAME)


def _roots_with(tmp_path, members: dict[str, bytes]) -> list[str]:
    """The same members as a directory, zip, tar and tar.gz root."""
    directory = tmp_path / "dir"
    for name, data in members.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    with zipfile.ZipFile(tmp_path / "i.zip", "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / "i.tar").write_bytes(buf.getvalue())
    (tmp_path / "i.tar.gz").write_bytes(gzip.compress(buf.getvalue()))
    return [str(directory), *(str(tmp_path / n) for n in ("i.zip", "i.tar", "i.tar.gz"))]


@pytest.mark.parametrize(("stored", "asked"), [(NFD_NAME, NFC_NAME), (NFC_NAME, NFD_NAME)])
def test_names_match_across_unicode_forms_in_every_root(tmp_path, stored, asked):
    assert stored != asked
    for url in _roots_with(tmp_path, {stored: b"eye", "plain.jpg": b"p"}):
        store = open_image_root(url)
        try:
            assert store.read(normalise_relpath(asked)) == b"eye", url
            assert store.read("plain.jpg") == b"p"
        finally:
            store.cleanup()


def test_two_entries_with_one_unicode_form_are_ambiguous_naming_both(tmp_path):
    composed = unicodedata.normalize("NFC", "scans/Müller_é.jpg")
    decomposed = unicode_nfd(composed)
    for url in _roots_with(tmp_path, {composed: b"composed", decomposed: b"decomposed"}):
        store = open_image_root(url)
        try:
            for asked in (composed, decomposed):
                with pytest.raises(AmbiguousName) as info:
                    store.read(asked)
                # Both spellings, escaped so that they do not look the same (dirs name the component).
                for name in (decomposed, composed):
                    assert ascii(name.split("/")[-1])[1:-1] + "'" in str(info.value), url
        finally:
            store.cleanup()


def test_build_keeps_patients_whose_paths_differ_in_unicode_form(tmp_path):
    left, right = (synth._jpeg(synth.make_patient(np.random.default_rng(i), 64).left) for i in (1, 2))
    with zipfile.ZipFile(tmp_path / "mac.zip", "w") as zf:
        zf.writestr(unicode_nfd("Zoë/links.jpg"), left)
        zf.writestr(unicode_nfd("Zoë/rechts.jpg"), right)
        zf.writestr("Chloé/l.jpg", left)  # written in NFC, asked for in NFD below
        zf.writestr("Chloé/r.jpg", right)
    rows = [
        HEADER,
        f"p1,{unicodedata.normalize('NFC', 'Zoë/links.jpg')},{unicodedata.normalize('NFC', 'Zoë/rechts.jpg')},r",
        f"p2,{unicode_nfd('Chloé/l.jpg')},{unicode_nfd('Chloé/r.jpg')},r",
    ]
    manifest = write(tmp_path / "m.csv", "\n".join(rows) + "\n")
    opts = BuildOptions(
        out=str(tmp_path / "s"),
        manifest=manifest,
        images=str(tmp_path / "mac.zip"),
        image=ImageOptions(size=32, min_side=32),
        progress=False,
    )
    result = build_shards(opts)
    assert result.kept == 2 and sum(result.rejected.values()) == 0


def unicode_nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)
