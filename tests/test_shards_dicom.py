"""make-shards build --dicom: a PACS export of ophthalmic photographs becomes verified shards in one command.

The export is written here with pydicom (conftest.write_dicom_export): photos are paired by their tags,
decoded to the source pixels (colour spaces as DICOM PS3.3 C.7.6.3.1.2 says), rejects carry their
reasons, no tag value reaches a pseudonymised set, and the derived table builds the same shards through
--manifest.
"""

import csv
import io
import json
import re
import shutil
import sys
import tarfile
import zipfile

import numpy as np
import pytest
from conftest import (
    OP_8BIT,
    dicom_photo,
    fundus_image,
    jpeg,
    rgb_from_ybr_full,
    write_dicom_export,
    ybr_full,
)
from PIL import Image, features

from retclip_dist.io.roots import DirStore, ImageStore
from retclip_dist.shards import cli, dicom
from retclip_dist.shards.images import ImageOptions, process_image
from retclip_dist.shards.pseudonym import Pseudonymiser
from retclip_dist.shards.records import RejectError, ShardInputError

pydicom = pytest.importorskip("pydicom", reason="needs the dicom extra: pip install -e '.[dev]'")
JPEGBaseline8Bit = pydicom.uid.JPEGBaseline8Bit
encapsulate = pydicom.encaps.encapsulate

SMALL = ["--image-size", "64", "--min-side", "48", "--no-progress"]
OPTIONS = ImageOptions(size=64, min_side=48)
KEY = b"0123456789abcdef0123456789abcdef"
# A JPEG-compressed photo is lossy: its shard image may differ from the one made from the uncompressed
# source pixels by at most this much per channel on average (measured: about 0.6).
JPEG_MEAN_TOLERANCE = 1.5


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return write_dicom_export(tmp_path_factory.mktemp("pacs"))


def _build(export, out, *extra, root=None) -> int:
    args = ["build", "--dicom", str(root or export.root), "--reports", str(export.reports)]
    return cli.main([*args, "--output_dir", str(out), *SMALL, *extra])


def _samples(out) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for member in tf.getmembers():
                key, _, suffix = member.name.partition(".")
                samples.setdefault(key, {})[suffix] = tf.extractfile(member).read()
    return samples


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _tars(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_export_and_report_table_become_verified_shards_with_every_visit_paired(export, tmp_path, capsys):
    derived = tmp_path / "derived.csv"
    assert _build(export, tmp_path / "out", "--write-manifest", str(derived)) == 0
    summary = capsys.readouterr().out
    assert re.search(r"^kept +3$", summary, re.M)
    for reason, count in (("extra_photo", 2), ("not_photo", 1), ("not_dicom", 1), ("truncated", 1)):
        assert re.search(rf"^rejected: {reason} +{count}$", summary, re.M), reason

    rows = {row["patient_id"]: row for row in _rows(derived)}
    assert set(rows) == set(export.visits)
    for visit, expected in export.visits.items():
        row = rows[visit]
        if isinstance(expected, str):
            assert row["rejected"] == expected
        else:
            assert (row["left_image"], row["right_image"], row["report"]) == expected and not row["rejected"]
    assert rows["HOSP0091427-v2"]["patient"] == "HOSP0091427" and rows["HOSP0091427-v2"]["visit"] == "2"

    # Every rejected file and visit is a line naming its reason; a file's detail starts with its path.
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    by_file = {r["detail"].split(":")[0]: r["reason"] for r in rejects if "/" in r["detail"].split(":")[0]}
    by_file |= {r["detail"].split(":")[0]: r["reason"] for r in rejects if r["reason"] == "not_dicom"}
    assert by_file == {f.path: f.reject for f in export.files.values() if f.reject}
    by_visit = {r["id"]: r["reason"] for r in rejects if r["id"].endswith("-v1") and r["id"] in export.visits}
    assert by_visit == {v: reason for v, reason in export.visits.items() if isinstance(reason, str)}
    assert "IM000001 was chosen" in next(r["detail"] for r in rejects if r["reason"] == "extra_photo")

    samples = _samples(tmp_path / "out")
    assert set(samples) == {v for v, e in export.visits.items() if not isinstance(e, str)}
    for visit, (left, right, report) in ((v, e) for v, e in export.visits.items() if not isinstance(e, str)):
        meta = json.loads(samples[visit]["json"])
        assert meta["source"] == {"left": left, "right": right} and meta["patient_id"] == visit
        assert samples[visit]["report.txt"].decode() == report
    assert cli.main(["verify", str(tmp_path / "out")]) == 0


def test_photos_are_the_source_pixels_after_the_same_resize(export, tmp_path):
    assert _build(export, tmp_path / "out") == 0
    samples = _samples(tmp_path / "out")
    checked = {"native": 0, "jpeg": 0}
    for visit, expected in export.visits.items():
        if isinstance(expected, str):
            continue
        for eye, path in zip(("left", "right"), expected[:2], strict=True):
            source = export.files[path]
            png = io.BytesIO()
            Image.fromarray(source.pixels).save(png, "PNG")
            want, _ = process_image(png.getvalue(), OPTIONS)
            got = samples[visit][f"{eye}.jpg"]
            if pydicom.dcmread(io.BytesIO(source.data)).file_meta.TransferSyntaxUID == JPEGBaseline8Bit:
                diff = np.abs(
                    np.asarray(Image.open(io.BytesIO(got)), int) - np.asarray(Image.open(io.BytesIO(want)))
                )
                assert diff.mean() <= JPEG_MEAN_TOLERANCE, (path, diff.mean())
                checked["jpeg"] += 1
            else:
                # Lossless storage (native RGB, YBR_FULL, RLE): the very bytes the source pixels give.
                assert got == want, f"{visit} {eye} ({path})"
                checked["native"] += 1
    assert checked == {"native": 5, "jpeg": 1}


def _every_byte_stream(directory):
    """(where, bytes) of every file under ``directory`` and of every tar member's name and data."""
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        data = path.read_bytes()
        yield str(path.relative_to(directory)), data
        if path.name.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                for member in tf.getmembers():
                    fh = tf.extractfile(member)
                    yield f"{path.name} member name", member.name.encode("utf-8")
                    yield f"{path.name}:{member.name}", fh.read() if fh else b""


def _found(directory, strings: set[str]) -> set[str]:
    forms = {
        s: {s.encode("utf-8"), json.dumps(s)[1:-1].encode("ascii"), s.encode("latin-1", "ignore")}
        for s in strings
    }
    streams = list(_every_byte_stream(directory))
    return {
        s for s, encodings in forms.items() for _, data in streams if any(e and e in data for e in encodings)
    }


def test_no_tag_value_reaches_the_output(export, tmp_path):
    keyfile = tmp_path / "key"
    keyfile.write_bytes(KEY)
    assert _build(export, tmp_path / "ps", "--pseudonymise", str(keyfile)) == 0
    secret = export.identifiers | set(export.visits) | {export.root.name, export.reports.name}
    assert len(export.identifiers) > 60  # names, dates, UIDs, accession numbers, device, institution ...
    assert _found(tmp_path / "ps", secret) == set()
    assert cli.main(["verify", str(tmp_path / "ps")]) == 0
    # The tag patient id became the pseudonym as any id does (one per visit), rejects say "line N".
    ps = Pseudonymiser(KEY)
    assert set(_samples(tmp_path / "ps")) == {
        ps.pseudonym(v) for v, e in export.visits.items() if not isinstance(e, str)
    }
    rejects = [json.loads(line) for line in (tmp_path / "ps" / "rejects.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rejects} >= {ps.pseudonym("MRN77120934-v1"), ps.pseudonym("HOSP0091427"), ""}
    assert all(re.fullmatch(r"line [0-9,]+", r["source"]) for r in rejects)

    # A plain build keeps the patient id (as --manifest builds do) and the file paths, but no other tag
    # value; the same scan finds the ids, so it does see what is there.
    assert _build(export, tmp_path / "plain") == 0
    patient_ids = {v.rsplit("-v", 1)[0] for v in export.visits}
    shards_and_manifest = tmp_path / "plain-shards"
    shards_and_manifest.mkdir()
    for path in (tmp_path / "plain").glob("*"):
        if path.name != "rejects.jsonl":  # the owner's copy: names files, patients and accession numbers
            shutil.copy(path, shards_and_manifest / path.name)
    assert _found(shards_and_manifest, export.identifiers) == {"HOSP0091427", "HOSP0115518"}
    assert patient_ids & _found(shards_and_manifest, patient_ids) == {"HOSP0091427", "HOSP0115518"}


def test_derived_manifest_builds_the_same_shards_through_manifest(export, tmp_path):
    derived = tmp_path / "derived.csv"
    assert _build(export, tmp_path / "dicom", "--write-manifest", str(derived), "--val-fraction", "0.5") == 0
    args = [
        "build",
        "--manifest",
        str(derived),
        "--images",
        str(export.root),
        "--output_dir",
        str(tmp_path / "m"),
    ]
    assert cli.main([*args, *SMALL]) == 0
    assert _tars(tmp_path / "m") == _tars(tmp_path / "dicom") and len(_tars(tmp_path / "m")) == 2
    # The rows of rejected visits come back as rejects of the manifest path.
    rejected = {
        json.loads(line)["id"] for line in (tmp_path / "m" / "rejects.jsonl").read_text().splitlines()
    }
    assert rejected == {"MRN77120934-v1", "PAT4471XY-v1"}


def test_zip_and_tar_exports_and_workers_give_the_same_shards(export, tmp_path):
    assert _build(export, tmp_path / "dir") == 0
    with zipfile.ZipFile(tmp_path / "export.zip", "w") as zf:
        for f in export.files.values():
            zf.writestr(f.path, f.data)
    with tarfile.open(tmp_path / "export.tar.gz", "w:gz") as tf:
        tf.add(export.root, arcname=".")
    assert _build(export, tmp_path / "zip", root=tmp_path / "export.zip") == 0
    assert _build(export, tmp_path / "tgz", "--workers", "2", root=tmp_path / "export.tar.gz") == 0
    assert _tars(tmp_path / "zip") == _tars(tmp_path / "dir") == _tars(tmp_path / "tgz")
    reasons = [
        [json.loads(line)["reason"] for line in (tmp_path / d / "rejects.jsonl").read_text().splitlines()]
        for d in ("dir", "zip", "tgz")
    ]
    assert reasons[0] == reasons[1] == reasons[2] and len(reasons[0]) == 8


def test_val_fraction_keeps_all_visits_of_a_patient_in_one_split(export):
    options = dicom.DicomOptions(root=str(export.root), reports=str(export.reports))
    seen = set()
    for seed in range(12):
        records, _, store = dicom.read_dicom_export(options, "train", 0.5, seed, 1, False)
        store.cleanup()
        split = {r.patient_id: r.split for r in records}
        assert split["HOSP0091427-v1"] == split["HOSP0091427-v2"]
        seen.add(split["HOSP0091427-v1"])
    assert seen == {"train", "val"}


def test_rerun_of_a_finished_build_still_writes_the_derived_table(export, tmp_path):
    assert _build(export, tmp_path / "out") == 0
    before = _tars(tmp_path / "out")
    assert _build(export, tmp_path / "out", "--write-manifest", str(tmp_path / "d.csv")) == 0
    assert len(_rows(tmp_path / "d.csv")) == len(export.visits) and _tars(tmp_path / "out") == before


# --- colour: every photometric interpretation decodes to the pixels DICOM PS3.3 C.7.6.3.1.2 defines ---


def _photo() -> np.ndarray:
    return np.asarray(fundus_image(np.random.default_rng(3), 64).resize((64, 48)))


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(dicom.decode_photo(data, 10**9))


def test_colour_photos_decode_to_rgb_as_the_standard_defines():
    rgb = _photo()
    assert (_decoded(dicom_photo(rgb)) == rgb).all()
    assert (_decoded(dicom_photo(rgb, encoding="rle")) == rgb).all()
    # YBR_FULL: the stored YCbCr through the standard's inverse equations (written out in conftest).
    assert (_decoded(dicom_photo(rgb, photometric="YBR_FULL")) == rgb_from_ybr_full(ybr_full(rgb))).all()
    # Native YBR_FULL_422: each pixel pair shares the chroma of its first pixel.
    ybr = ybr_full(rgb)
    ybr[:, 1::2, 1:] = ybr[:, 0::2, 1:]
    assert (_decoded(dicom_photo(rgb, photometric="YBR_FULL_422")) == rgb_from_ybr_full(ybr)).all()
    # JPEG Baseline stored as YBR_FULL_422: exactly what Pillow decodes the stream to, whichever decoders
    # are installed (Pillow's is preferred), and within the JPEG loss of the source.
    stream = io.BytesIO()
    Image.fromarray(rgb).save(stream, "JPEG", quality=95, subsampling=1)
    decoded = _decoded(dicom_photo(rgb, encoding="jpeg"))
    assert (decoded == np.asarray(Image.open(stream).convert("RGB"))).all()
    assert np.abs(decoded.astype(int) - rgb).mean() < JPEG_MEAN_TOLERANCE


def test_jpeg_2000_with_reversible_colour_transform_decodes_through_pillow():
    if not features.check_codec("jpg_2000"):
        pytest.skip("this Pillow has no OpenJPEG")
    rgb = _photo()
    stream = io.BytesIO()
    Image.fromarray(rgb).save(stream, "JPEG2000", irreversible=False, no_jp2=True, mct=1)  # lossless, RCT
    data = _with(
        dicom_photo(rgb),
        TransferSyntaxUID=pydicom.uid.JPEG2000Lossless,
        PhotometricInterpretation="YBR_RCT",
        PixelData=encapsulate([stream.getvalue()]),
    )
    assert (_decoded(data) == rgb).all()


def test_planar_rgb_is_interleaved():
    rgb = _photo()
    data = dicom_photo(rgb)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PlanarConfiguration = 1
    ds.PixelData = np.moveaxis(rgb, -1, 0).tobytes()  # RRR...GGG...BBB...
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    assert (_decoded(out.getvalue()) == rgb).all()


def test_grey_and_palette_photos_decode_as_the_standard_defines():
    grey = _photo()[..., 1]
    assert (_decoded(dicom_photo(grey)) == grey).all()
    assert (_decoded(dicom_photo(grey, photometric="MONOCHROME1")) == 255 - grey).all()  # lowest is white
    twelve = grey.astype(np.int64) * 16 + 7  # 12 bits stored in 16
    want = np.rint(twelve * 255 / 4095).astype(np.uint8)
    assert (_decoded(dicom_photo(twelve.astype(np.uint16), bits_stored=12)) == want).all()
    # PALETTE COLOR: each index through the red, green and blue tables (16-bit entries scaled to 8 bits).
    lut = np.random.default_rng(1).integers(0, 65536, size=(3, 256), dtype=np.uint16)
    tables = {
        f"{c}PaletteColorLookupTable{part}": value
        for c, table in zip(("Red", "Green", "Blue"), lut, strict=True)
        for part, value in (("Descriptor", [256, 0, 16]), ("Data", table.tobytes()))
    }
    palette = _decoded(dicom_photo(grey, photometric="PALETTE COLOR", **tables))
    want = ((lut[:, grey].astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    assert (palette == np.moveaxis(want, 0, -1)).all()


def test_jpeg_lossless_decodes_with_the_libjpeg_extra():
    pytest.importorskip("libjpeg", reason="needs the dicom-libjpeg extra (in dev)")
    from pydicom.data import get_testdata_file

    with open(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"), "rb") as fh:
        lossless = fh.read()  # JPEG Lossless, first-order prediction
    rle = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm")).pixel_array  # the same photo, RLE
    assert (_decoded(lossless) == rle).all()


# --- which file is which reject, and the rule that picks one photo per eye ---


class _Files(ImageStore):
    def __init__(self, data: dict[str, bytes]) -> None:
        self.data = data

    def read(self, ref: str) -> bytes:
        return self.data[ref]

    def names(self) -> list[str]:
        return sorted(self.data)


def _op(**tags) -> bytes:
    base = {"PatientID": "P1", "StudyInstanceUID": "1.2.3", "ImageLaterality": "L"}
    return dicom_photo(_photo(), **{**base, **tags})


def _with(data: bytes, **changes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        elif keyword == "TransferSyntaxUID":
            ds.file_meta.TransferSyntaxUID = value
        else:
            setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize(
    ("data", "reason", "detail"),
    [
        (lambda: b"\0" * 128 + b"DICM" + b"\xff" * 40, "undecodable", "SOPClassUID"),
        (lambda: _op()[:200], "truncated", "without pixel data"),
        (lambda: _op(modality="CT"), "not_photo", "modality 'CT'"),
        (lambda: _op(sop_class="1.2.840.10008.5.1.4.1.1.2"), "not_photo", "CT Image Storage"),
        (lambda: _op(NumberOfFrames=2), "not_photo", "2 frames"),
        (lambda: _with(_op(), PhotometricInterpretation="YBR_PARTIAL_420"), "undecodable", "YBR_PARTIAL_420"),
        (
            lambda: _with(
                _op(), TransferSyntaxUID="1.2.840.10008.1.2.4.100", PixelData=encapsulate([b"\0" * 64])
            ),
            "no_decoder",
            "MPEG2",
        ),
        (lambda: _with(_op(), Rows=None), "undecodable", "Rows"),
        (lambda: _with(_op(), BitsAllocated=None), "undecodable", "BitsAllocated"),
        (lambda: _op(PatientID=None), "missing_tag", "PatientID"),
        (lambda: _op(StudyInstanceUID=None), "missing_tag", "StudyInstanceUID"),
        (lambda: _op(ImageLaterality="B"), "no_laterality", "'B'"),
        (lambda: _op(ImageLaterality="U", Laterality="L"), "no_laterality", "'U'"),
        (lambda: _op(ImageLaterality="L", Laterality="R"), "no_laterality", "disagree"),
        (lambda: _op(ImageLaterality=None), "no_laterality", "neither"),
    ],
)
def test_files_that_are_not_one_usable_photo_are_rejected_with_their_reason(data, reason, detail):
    result = dicom.scan_file(_Files({"IM1": data()}), 1, "IM1")
    assert isinstance(result, dicom.FileReject), result
    assert (result.reason, result.detail.startswith("IM1: ")) == (reason, True)
    assert detail in result.detail


def test_laterality_comes_from_image_laterality_else_laterality():
    photo = dicom.scan_file(_Files({"a": _op(ImageLaterality=None, Laterality="R")}), 1, "a")
    assert isinstance(photo, dicom.Photo) and photo.eye == "right"
    photo = dicom.scan_file(_Files({"a": _op(ImageLaterality="R", Laterality="R")}), 1, "a")
    assert isinstance(photo, dicom.Photo) and photo.eye == "right"
    photo = dicom.scan_file(_Files({"a": _op(ImageLaterality="L")}), 1, "a")
    assert isinstance(photo, dicom.Photo) and (photo.eye, photo.patient, photo.study) == (
        "left",
        "P1",
        "1.2.3",
    )


def _p(
    ref: str,
    eye: str = "left",
    colour: bool = True,
    acquired: str = "",
    pixels: int = 100,
    study="s1",
    date="20200101",
) -> dicom.Photo:
    return dicom.Photo(1, ref, "P", study, date, "", "A", eye, colour, pixels, acquired)


def test_one_photo_per_eye_is_chosen_by_the_documented_rule_and_the_rest_counted():
    # Each step of the rule decides one pair: colour, then earliest acquisition (none last), then most
    # pixels, then the first path.
    cases = [
        ([_p("a", colour=False, acquired="1"), _p("b", acquired="9")], "b"),
        ([_p("a", acquired="20200101120000"), _p("b", acquired="20200101090000")], "b"),
        ([_p("a"), _p("b", acquired="20200101090000")], "b"),
        ([_p("a", pixels=100), _p("b", pixels=200)], "b"),
        ([_p("b"), _p("a")], "a"),
    ]
    for photos, chosen in cases:
        visits, extras = dicom.group_visits([*photos, _p("r", "right")], "study", lambda p: "train")
        assert [v.chosen("left").ref for v in visits] == [chosen]
        assert [e.ref for e in extras] == sorted({"a", "b"} - {chosen}) and {e.reason for e in extras} == {
            "extra_photo"
        }


def test_visits_are_studies_or_days_and_numbered_in_date_order():
    photos = [
        _p("l2", study="s2", date="20210101"),
        _p("r2", "right", study="s3", date="20210101"),  # the right eye in a study of its own, same day
        _p("l1", study="s1", date="20190101"),
        _p("r1", "right", study="s1", date="20190101"),
    ]
    by_study, _ = dicom.group_visits(photos, "study", lambda p: "train")
    assert [(v.number, v.chosen("left") and v.chosen("left").ref) for v in by_study] == [
        (1, "l1"),
        (2, "l2"),
        (3, None),
    ]
    by_day, _ = dicom.group_visits(photos, "date", lambda p: "train")
    assert [(v.id, v.chosen("left").ref, v.chosen("right").ref) for v in by_day] == [
        ("P-v1", "l1", "r1"),
        ("P-v2", "l2", "r2"),
    ]


def test_a_visit_split_over_studies_of_one_day_says_how_to_pair_it(tmp_path, capsys):
    tags = {"PatientID": "P9", "StudyDate": "20200202", "AccessionNumber": "A1"}
    root = tmp_path / "export"
    root.mkdir()
    (root / "1").write_bytes(dicom_photo(_photo(), StudyInstanceUID="1.1", ImageLaterality="L", **tags))
    (root / "2").write_bytes(dicom_photo(_photo(), StudyInstanceUID="1.2", ImageLaterality="R", **tags))
    (tmp_path / "r.csv").write_text("AccessionNumber,report\nA1,no abnormality\n")
    args = ["build", "--dicom", str(root), "--reports", str(tmp_path / "r.csv"), *SMALL]
    assert cli.main([*args, "--output_dir", str(tmp_path / "study")]) == 0
    details = (tmp_path / "study" / "rejects.jsonl").read_text()
    assert details.count("missing_eye") == 2 and "--dicom-visit date pairs them" in details
    assert cli.main([*args, "--output_dir", str(tmp_path / "date"), "--dicom-visit", "date"]) == 0
    assert set(_samples(tmp_path / "date")) == {"P9-v1"}


def test_a_searched_directory_lists_nested_files_and_stays_inside(tmp_path):
    root = tmp_path / "export"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "IM1").write_bytes(_op())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "IM9").write_bytes(_op(PatientID="P9"))
    (root / "linked_dir").symlink_to(outside)  # not entered
    (root / "linked_file").symlink_to(outside / "IM9")  # listed, and refused when read
    store = DirStore(str(root))
    assert store.names() == ["a/b/IM1", "linked_file"]
    assert isinstance(dicom.scan_file(store, 1, "a/b/IM1"), dicom.Photo)
    refused = dicom.scan_file(store, 2, "linked_file")
    assert isinstance(refused, dicom.FileReject) and refused.reason == "unsafe_path"


# --- reports ---


def _export_of_two_visits(tmp_path):
    root = tmp_path / "export"
    root.mkdir()
    for n, (study, accession) in enumerate((("1.1", "A1"), ("1.2", "A2"))):
        for eye in "LR":
            tags = {
                "PatientID": "P7",
                "StudyInstanceUID": study,
                "AccessionNumber": accession,
                "StudyDate": f"2020010{n + 1}",
            }
            (root / f"{study}-{eye}").write_bytes(dicom_photo(_photo(), ImageLaterality=eye, **tags))
    return root


@pytest.mark.parametrize(
    ("key", "table", "expected"),
    [
        (
            "AccessionNumber",
            "AccessionNumber,report\nA1,first\nA2,second\n",
            {"P7-v1": "first", "P7-v2": "second"},
        ),
        (
            "StudyInstanceUID",
            "StudyInstanceUID,report\n1.1,first\n1.2,second\n",
            {"P7-v1": "first", "P7-v2": "second"},
        ),
        ("PatientID", "PatientID,report\nP7,both\n", {"P7-v1": "both", "P7-v2": "both"}),
        (
            "AccessionNumber",
            "AccessionNumber,report\nA1,first\nA1,other\nA2,second\n",
            {"P7-v1": "ambiguous_report", "P7-v2": "second"},
        ),
        (
            "AccessionNumber",
            "AccessionNumber,report\nA1,same\nA1,same\nA2, \n",
            {"P7-v1": "same", "P7-v2": "blank_report"},
        ),
        (
            "AccessionNumber",
            "AccessionNumber,report\nA2,second\n",
            {"P7-v1": "missing_report", "P7-v2": "second"},
        ),
        (
            "StudyInstanceUID",
            '{"StudyInstanceUID": "1.1", "report": "first", "left_report": "l"}\n',
            {"P7-v1": "first", "P7-v2": "missing_report"},
        ),
    ],
)
def test_reports_are_joined_by_the_key_named(tmp_path, key, table, expected):
    root = _export_of_two_visits(tmp_path)
    name = "r.jsonl" if table.startswith("{") else "r.csv"
    (tmp_path / name).write_text(table)
    options = dicom.DicomOptions(root=str(root), reports=str(tmp_path / name), report_key=key)
    records, rejects, _ = dicom.read_dicom_export(options, "train", 0.0, 0, 1, False)
    got = {r.patient_id: r.report for r in records} | {r.patient_id: r.reason for r in rejects}
    assert got == expected
    assert all(r.left_report == "l" for r in records if name == "r.jsonl")


# --- usage errors: one line, exit 2 ---


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--manifest", "REPORTS", "--images", "EXPORT", "--reports", "REPORTS"], "--reports is for --dicom"),
        (["--dicom", "EXPORT"], "--dicom needs --reports"),
        (
            ["--dicom", "EXPORT", "--reports", "REPORTS", "--write-manifest", "OUT/derived.csv"],
            "inside the output directory",
        ),
        (["--dicom", "EXPORT", "--reports", "EXPORT"], "reports EXPORT: cannot read"),
        (["--dicom", "EXPORT", "--reports", "BADREPORTS"], "missing required column(s) ['AccessionNumber']"),
        (["--dicom", "EXPORT", "--manifest", "REPORTS", "--images", "EXPORT"], "give one of --manifest"),
        (
            ["--dicom", "EXPORT", "--reports", "REPORTS", "--images", "EXPORT"],
            "--images is the image root of",
        ),
        (["--dicom", "EMPTY", "--reports", "REPORTS"], "EMPTY: no files found"),
        (["--dicom", "EXPORT.zip", "--reports", "REPORTS"], "--dicom EXPORT.zip: no such file"),
    ],
)
def test_unusable_dicom_options_exit_2_with_one_line(tmp_path, capsys, extra, message):
    root = _export_of_two_visits(tmp_path)
    (tmp_path / "r.csv").write_text("AccessionNumber,report\nA1,x\n")
    (tmp_path / "bad.csv").write_text("accession,report\nA1,x\n")
    (tmp_path / "empty").mkdir()
    paths = {"EXPORT": str(root), "REPORTS": str(tmp_path / "r.csv"), "BADREPORTS": str(tmp_path / "bad.csv")}
    paths |= {"EMPTY": str(tmp_path / "empty"), "EXPORT.zip": str(root) + ".zip"}
    paths["OUT/derived.csv"] = str(tmp_path / "out" / "sub" / "derived.csv")
    argv = ["build", *(paths.get(a, a) for a in extra), "--output_dir", str(tmp_path / "out"), *SMALL]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("make-shards: error:"), err
    assert message.replace("EXPORT", str(root)).replace("EMPTY", str(tmp_path / "empty")) in err[0]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_pydicom_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    root = _export_of_two_visits(tmp_path)
    (tmp_path / "r.csv").write_text("AccessionNumber,report\nA1,x\n")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    argv = [
        "build",
        "--dicom",
        str(root),
        "--reports",
        str(tmp_path / "r.csv"),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    assert cli.main([*argv, *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "make-shards: error: --dicom needs pydicom, which is not installed: pip install 'retclip-dist[dicom]'"
    ]
    # A --manifest build that meets a DICOM file without pydicom rejects that patient and says why.
    with pytest.raises(RejectError, match=r"no_decoder: .*retclip-dist\[dicom\]"):
        dicom.image_bytes((root / "1.1-L").read_bytes(), 10**9)
    with pytest.raises(ShardInputError):
        dicom.import_pydicom()


def test_non_dicom_bytes_pass_through_to_the_image_step():
    data = jpeg(fundus_image(np.random.default_rng(0), 64))
    assert dicom.image_bytes(data, 10**9) is data
    big = _op()
    with pytest.raises(RejectError, match="too_many_pixels"):
        dicom.image_bytes(big, 64 * 48 - 1)
    assert dicom.image_bytes(big, 64 * 48)[:2] == b"P6"  # a PPM of the pixels: no tag comes along
    assert OP_8BIT in dicom.PHOTO_SOP_CLASSES


def test_reports_that_repeat_tag_values_are_scrubbed_and_the_set_passes_the_audit(export, tmp_path, capsys):
    """A report that names the patient as the tags do (name, PatientID, accession number) leaks them
    unless --scrub-reports removes them: the pseudonymised build fails its own audit without it, and
    passes it, and make-shards audit against the derived table, with it."""
    rows = list(csv.DictReader(export.reports.open(encoding="utf-8")))
    tagged = {}  # accession -> (PatientID, PatientName) of the photos under that accession
    for f in export.files.values():
        if f.data[128:132] == b"DICM":
            ds = pydicom.dcmread(io.BytesIO(f.data), stop_before_pixels=True)
            if ds.get("AccessionNumber"):
                tagged[str(ds.AccessionNumber)] = (str(ds.PatientID), str(ds.PatientName))
    for row in rows:
        pid, name = tagged[row["AccessionNumber"]]
        family, given = name.split("^")
        row["report"] = (
            f"Patient {given} {family.upper()}, ID {pid}, acc. {row['AccessionNumber']}. " + row["report"]
        )
    reports = tmp_path / "reports.csv"
    with reports.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["AccessionNumber", "report"])
        writer.writeheader()
        writer.writerows(rows)
    keyfile = tmp_path / "key"
    keyfile.write_bytes(KEY)
    args = [
        "build",
        "--dicom",
        str(export.root),
        "--reports",
        str(reports),
        *SMALL,
        "--pseudonymise",
        str(keyfile),
    ]

    capsys.readouterr()
    assert cli.main([*args, "--output_dir", str(tmp_path / "leaky")]) == 1
    hits = [line for line in capsys.readouterr().out.splitlines() if line.startswith("HIT ")]
    assert any("report.txt" in h and "PatientID of" in h for h in hits)
    assert any("report.txt" in h and "PatientName of" in h for h in hits), hits
    assert any("report.txt" in h and "AccessionNumber of" in h for h in hits)
    assert not (tmp_path / "leaky" / "manifest.json").exists()

    derived = tmp_path / "derived.csv"
    out = tmp_path / "clean"
    assert (
        cli.main([*args, "--scrub-reports", "--write-manifest", str(derived), "--output_dir", str(out)]) == 0
    )
    texts = [s["report.txt"].decode() for s in _samples(out).values()]
    assert texts and all("[PATIENTID]" in t and "[ACCESSIONNUMBER]" in t for t in texts)
    secret = {v for v in export.identifiers if not v.isdigit() or len(v) >= 6}
    assert _found(out, secret) == set()
    audit = [
        "audit",
        str(out),
        "--manifest",
        str(derived),
        "--identifier-columns",
        "patient,study_date,studies",
    ]
    assert cli.main(audit) == 0
