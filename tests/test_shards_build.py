import csv
import gzip
import hashlib
import io
import json
import logging
import re
import tarfile
import zipfile

import numpy as np
import pytest
import webdataset as wds
from conftest import build_argv
from PIL import Image

from retclip_dist import __version__, synth
from retclip_dist.shards import cli
from retclip_dist.shards.build import BuildOptions, build_shards
from retclip_dist.shards.images import ImageOptions

SMALL = ["--image-size", "64", "--min-side", "48", "--no-progress"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """12 synthetic patients at 96 px in a zip, with per-eye reports."""
    out = tmp_path_factory.mktemp("raw")
    manifest, root = synth.write_raw_archive(out, 12, seed=1, image_size=96, layout="zip", eye_reports=True)
    return str(manifest), str(root)


def files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def build(raw, out, *extra) -> int:
    return cli.main(
        ["build", "--manifest", raw[0], "--images", raw[1], "--output_dir", str(out), *SMALL, *extra]
    )


def test_cli_build_writes_contract_layout(raw, tmp_path, capsys):
    assert build(raw, tmp_path / "s", "--max-count", "5") == 0
    printed = capsys.readouterr().out
    assert "kept        12" in printed and "patients/s" in printed
    got = files(tmp_path / "s")
    assert sorted(got) == [
        "manifest.json",
        "rejects.jsonl",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    manifest = json.loads(got["manifest.json"])
    assert manifest["format"] == "retclip-shards/1" and manifest["tool_version"] == __version__
    assert manifest["options"]["image"] == {
        "size": 64,
        "resize": "square",
        "quality": 95,
        "min_side": 48,
        "max_pixels": 50_000_000,
        "crop": "none",
    }
    assert manifest["source_hash"] == "sha256" and "key_check" not in manifest
    assert "workers" not in manifest["options"] and "out" not in manifest["options"]
    assert [(s["name"], s["count"]) for s in manifest["shards"]] == [
        ("train-000000.tar", 5),
        ("train-000001.tar", 5),
        ("train-000002.tar", 2),
    ]
    for shard in manifest["shards"]:
        assert shard["sha256"] == hashlib.sha256(got[shard["name"]]).hexdigest()
        assert shard["bytes"] == len(got[shard["name"]])
    assert manifest["splits"] == {
        "train": {"shards": 3, "samples": 12, "bytes": sum(s["bytes"] for s in manifest["shards"])}
    }
    assert set(manifest["rejected"].values()) == {0} and "duplicate_id" in manifest["rejected"]
    assert got["rejects.jsonl"] == b""


def test_shards_read_with_plain_webdataset(raw, tmp_path):
    build(raw, tmp_path / "s")
    with open(raw[0], encoding="utf-8") as fh:
        rows = {r["patient_id"]: r for r in csv.DictReader(fh)}
    ds = wds.WebDataset(str(tmp_path / "s" / "train-000000.tar"), shardshuffle=False)
    seen = []
    for sample in ds:
        meta = json.loads(sample["json"])
        row = rows[meta["patient_id"]]
        assert sample["__key__"] == meta["patient_id"]
        assert sample["report.txt"].decode() == row["report"]
        assert sample["left.txt"].decode() == row["left_report"]
        assert meta["source"] == {"left": row["left_image"], "right": row["right_image"]}
        assert meta["orig_size"] == {"left": [96, 96], "right": [96, 96]} and meta["split"] == "train"
        for eye in ("left", "right"):
            img = Image.open(io.BytesIO(sample[f"{eye}.jpg"]))
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (64, 64))
        seen.append(meta["patient_id"])
    assert sorted(seen) == sorted(rows) and seen != sorted(seen)  # every patient, in shuffled order


def test_tar_metadata_is_fixed(raw, tmp_path):
    build(raw, tmp_path / "s")
    with tarfile.open(tmp_path / "s" / "train-000000.tar") as tf:
        members = tf.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (0, 0, 0, "retclip", "retclip", 0o444)
    }
    first = sorted({m.name.split(".")[0] for m in members})[0]
    assert [m.name for m in members if m.name.startswith(first + ".")] == [
        f"{first}.{s}" for s in ("json", "left.jpg", "left.txt", "report.txt", "right.jpg", "right.txt")
    ]


def test_byte_identical_across_workers_and_runs(raw, tmp_path):
    build(raw, tmp_path / "a", "--max-count", "4", "--workers", "1")
    build(raw, tmp_path / "b", "--max-count", "4", "--workers", "2")
    build(raw, tmp_path / "c", "--max-count", "4", "--workers", "1")
    assert files(tmp_path / "a") == files(tmp_path / "b") == files(tmp_path / "c")
    build(raw, tmp_path / "d", "--max-count", "4", "--seed", "9")
    assert files(tmp_path / "d")["train-000000.tar"] != files(tmp_path / "a")["train-000000.tar"]


def test_same_shards_from_dir_zip_and_targz_roots(tmp_path):
    shards = []
    for layout in ("dir", "zip", "tar"):
        manifest, root = synth.write_raw_archive(tmp_path / layout, 4, seed=2, image_size=64, layout=layout)
        if layout == "tar":
            gz = tmp_path / "tar" / "images.tar.gz"
            with open(root, "rb") as src, gzip.open(gz, "wb") as dst:
                dst.write(src.read())
            root = gz
        out = tmp_path / f"out-{layout}"
        assert cli.main(build_argv(manifest, root, out, *SMALL)) == 0
        shards.append((out / "train-000000.tar").read_bytes())
    assert shards[0] == shards[1] == shards[2]


def test_max_size_bounds_every_shard(raw, tmp_path):
    build(raw, tmp_path / "s", "--max-size", "30000")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 3
    assert sum(s["count"] for s in manifest["shards"]) == 12
    assert all(s["bytes"] <= 30000 for s in manifest["shards"])
    build(raw, tmp_path / "tiny", "--max-size", "1000")  # smaller than one sample: one sample per shard
    manifest = json.loads((tmp_path / "tiny" / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [1] * 12


def test_val_fraction_and_manifest_split_column(tmp_path):
    manifest, root = synth.write_raw_archive(tmp_path / "raw", 30, seed=0, image_size=64, layout="dir")
    with open(manifest, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for i, row in enumerate(rows):
        row["split"] = "test" if i < 3 else ""
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    opts = BuildOptions(
        out=str(tmp_path / "s"),
        manifest=str(manifest),
        images=str(root),
        val_fraction=0.3,
        image=ImageOptions(size=64, min_side=48),
        progress=False,
    )
    result = build_shards(opts)
    splits = json.loads((tmp_path / "s" / "manifest.json").read_text())["splits"]
    assert splits["test"]["samples"] == 3
    assert 4 <= splits["val"]["samples"] <= 14
    assert splits["train"]["samples"] + splits["val"]["samples"] == 27
    assert result.kept == 30 and [s["split"] for s in result.shards] == ["test", "train", "val"]


def _jpeg(size, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, "JPEG" if mode in ("RGB", "L", "CMYK") else "PNG")
    return buf.getvalue()


def test_bad_records_are_rejected_and_never_stop_the_run(tmp_path, capsys):
    noisy = io.BytesIO()
    Image.effect_noise((80, 80), 50).convert("RGB").save(noisy, "JPEG")
    good = noisy.getvalue()
    rgba = io.BytesIO()
    Image.new("RGBA", (80, 80), (9, 9, 9, 255)).save(rgba, "PNG")
    sixteen = io.BytesIO()
    Image.new("I;16", (80, 80), 40000).save(sixteen, "PNG")
    members = {
        "ok.jpg": good,
        "rgba.png": rgba.getvalue(),
        "grey16.png": sixteen.getvalue(),
        "cmyk.jpg": _jpeg((80, 80), "CMYK"),
        "small.jpg": _jpeg((40, 80)),
        "trunc.jpg": good[: len(good) // 2],
        "junk.jpg": b"\x00" * 300,
        "huge.png": _jpeg((3000, 3000), "L"),
    }
    with zipfile.ZipFile(tmp_path / "img.zip", "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    lines = [
        "patient_id,left_image,right_image,report",
        "keep1,ok.jpg,rgba.png,fine",
        "keep2,grey16.png,cmyk.jpg,fine",
        "nofile,ok.jpg,absent.jpg,r",
        "small,small.jpg,ok.jpg,r",
        "trunc,ok.jpg,trunc.jpg,r",
        "junk,junk.jpg,ok.jpg,r",
        "huge,huge.png,ok.jpg,r",
        "blank,ok.jpg,ok.jpg,  ",
        "keep1,ok.jpg,ok.jpg,again",
        "escape,../ok.jpg,ok.jpg,r",
        "noeye,,ok.jpg,r",
        "short,ok.jpg",
    ]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    args = ["build", "--manifest", str(tmp_path / "m.csv"), "--images", str(tmp_path / "img.zip")]
    code = cli.main([*args, "--output_dir", str(tmp_path / "s"), *SMALL, "--max-pixels", "1000000"])
    assert code == 0
    rejects = [json.loads(x) for x in (tmp_path / "s" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["source"], r["reason"]) for r in rejects] == [
        ("nofile", "m.csv:4", "missing_file"),
        ("small", "m.csv:5", "too_small"),
        ("trunc", "m.csv:6", "truncated"),
        ("junk", "m.csv:7", "undecodable"),
        ("huge", "m.csv:8", "too_many_pixels"),
        ("blank", "m.csv:9", "blank_report"),
        ("keep1", "m.csv:10", "duplicate_id"),
        ("escape", "m.csv:11", "unsafe_path"),
        ("noeye", "m.csv:12", "missing_eye"),
        ("", "m.csv:13", "bad_row"),
    ]
    assert rejects[0]["detail"].startswith("right eye: absent.jpg")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 2
    assert manifest["rejected"]["duplicate_id"] == 1 and sum(manifest["rejected"].values()) == 10
    table = capsys.readouterr().out
    assert re.search(r"^kept +2$", table, re.M) and re.search(r"^rejected: too_many_pixels +1$", table, re.M)

    # --strict stops at the first reject: row-level ones before any image is read, else image-level.
    assert cli.main([*args, "--output_dir", str(tmp_path / "strict"), *SMALL, "--strict"]) == 1
    assert "m.csv:9 (blank): blank_report" in capsys.readouterr().err
    (tmp_path / "m.csv").write_text("\n".join(lines[:4]) + "\n")
    assert cli.main([*args, "--output_dir", str(tmp_path / "strict2"), *SMALL, "--strict"]) == 1
    assert "m.csv:4 (nofile): missing_file" in capsys.readouterr().err
    assert not (tmp_path / "strict" / "manifest.json").exists()
    assert not (tmp_path / "strict2" / "manifest.json").exists()


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("missing_column", "missing required column(s) ['report']"),
        ("bad_zip", "not a readable zip archive"),
        ("no_images_flag", "--manifest needs --images"),
    ],
)
def test_unusable_input_exits_2_with_one_line(tmp_path, capsys, setup, expected):
    header = "patient_id,left_image,right_image" + ("" if setup == "missing_column" else ",report")
    (tmp_path / "m.csv").write_text(header + "\np,a,b\n")
    if setup == "bad_zip":
        (tmp_path / "i.zip").write_bytes(b"not a zip")
    else:
        zipfile.ZipFile(tmp_path / "i.zip", "w").close()
    args = [
        "build",
        "--manifest",
        str(tmp_path / "m.csv"),
        "--output_dir",
        str(tmp_path / "s"),
        "--no-progress",
    ]
    if setup != "no_images_flag":
        args += ["--images", str(tmp_path / "i.zip")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("make-shards: error:") and expected in err[-1]
    assert not any("Traceback" in line for line in err)


def test_rerun_on_finished_output_is_a_no_op_and_other_options_are_refused(raw, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="retclip_dist.shards")
    assert build(raw, tmp_path / "s") == 0
    before = files(tmp_path / "s")
    capsys.readouterr()
    assert build(raw, tmp_path / "s") == 0
    captured = capsys.readouterr()
    assert "already holds this shard set" in caplog.text and re.search(r"^kept +12$", captured.out, re.M)
    assert files(tmp_path / "s") == before
    assert build(raw, tmp_path / "s", "--seed", "1") == 2
    assert "built with other options" in capsys.readouterr().err
    assert files(tmp_path / "s") == before


def test_build_from_retclip_release_layout(tmp_path):
    synth.write_retclip_dir(tmp_path / "rc", 5, seed=4, split="train", image_size=64)
    result = build_shards(
        BuildOptions(
            out=str(tmp_path / "s"),
            retclip_dir=str(tmp_path / "rc"),
            image=ImageOptions(size=64, min_side=48),
            progress=False,
        )
    )
    assert result.kept == 5 and result.processed == 5 and result.patients_per_second > 0
    samples = list(wds.WebDataset(str(tmp_path / "s" / "train-000000.tar"), shardshuffle=False))
    meta = json.loads(next(s for s in samples if s["__key__"] == "patient-000003")["json"])
    assert meta["source"] == {"left": "train_imgs.tsv:4:left", "right": "train_imgs.tsv:4:right"}
    report = next(s for s in samples if s["__key__"] == "patient-000003")["report.txt"].decode()
    assert report == synth.make_patient(np.random.default_rng([4, 3]), 64).report
