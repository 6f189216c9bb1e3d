import hashlib
import json
import re
import shutil

import pytest

from retclip_dist import synth
from retclip_dist.shards import cli
from retclip_dist.shards.verify import verify_shards


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    base = tmp_path_factory.mktemp("verify")
    manifest, root = synth.write_raw_archive(base / "raw", 9, seed=2, image_size=72, layout="zip")
    out = base / "clean"
    argv = ["build", "--manifest", str(manifest), "--images", str(root), "--output_dir", str(out)]
    assert (
        cli.main([*argv, "--image-size", "64", "--min-side", "48", "--max-count", "3", "--no-progress"]) == 0
    )
    return out


@pytest.fixture
def copy(shard_set, tmp_path):
    return shutil.copytree(shard_set, tmp_path / "copy")


def test_clean_set_verifies(shard_set, capsys):
    result = verify_shards(str(shard_set))
    assert result.ok and result.problems == []
    assert (result.shards, result.samples) == (3, 9)
    assert cli.main(["verify", str(shard_set)]) == 0
    assert capsys.readouterr().out.strip().endswith("3 shards, 9 samples checked: OK")


def test_flipped_byte_and_deleted_shard_are_reported(copy, capsys):
    shard = copy / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside some member's data, so the tar still parses
    shard.write_bytes(bytes(data))
    (copy / "train-000002.tar").unlink()
    result = verify_shards(str(copy))
    assert not result.ok
    assert result.shards == 3
    assert any(
        re.fullmatch(r"train-000001\.tar: sha256 [0-9a-f]{64} != manifest [0-9a-f]{64}", p)
        for p in result.problems
    )
    assert "train-000002.tar: missing" in result.problems
    assert not any(p.startswith("train-000000.tar") for p in result.problems)
    assert cli.main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM train-000002.tar: missing" in out and out.strip().endswith("FAILED")


def test_undecodable_image_with_matching_manifest_is_reported(copy):
    # Rewrite a JPEG member's bytes with zeros and fix up the manifest hash: only decoding can catch it.
    shard = copy / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    start = data.index(b"\xff\xd8\xff")
    data[start : start + 600] = bytes(600)
    shard.write_bytes(bytes(data))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_shards(str(copy)).problems
    assert len(problems) == 1 and re.match(
        r"train-000000\.tar: sample \S+: \w+\.jpg does not decode", problems[0]
    )


def test_count_mismatch_unlisted_shard_and_missing_manifest(copy, tmp_path):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][2]["count"] = 4
    (copy / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(copy / "train-000000.tar", copy / "train-000009.tar")
    assert verify_shards(str(copy)).problems == [
        "train-000002.tar: 3 samples, manifest says 4",
        "train-000009.tar: not listed in manifest.json",
    ]
    (tmp_path / "empty").mkdir()
    assert verify_shards(str(tmp_path / "empty")).problems == [f"{tmp_path / 'empty'}/manifest.json: missing"]
