"""make-shards against a real (local) S3 endpoint: moto's server, configured only through environment
variables, exactly as a user would point it at MinIO or AWS."""

import json
import os
import socket
import subprocess
import sys
import unicodedata

import fsspec
import pytest
from conftest import build_argv

from retclip_dist import synth
from retclip_dist.io.errors import AmbiguousName, ImageNotFound
from retclip_dist.io.roots import DirStore
from retclip_dist.shards import cli

pytestmark = pytest.mark.slow


@pytest.fixture
def s3(monkeypatch):
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
        "FSSPEC_S3_KEY": "testing",
        "FSSPEC_S3_SECRET": "testing",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "OMP_NUM_THREADS": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for bucket in ("raw-data", "shard-sets"):
        client.create_bucket(Bucket=bucket)
    yield client
    server.stop()


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    # A fresh process reads the FSSPEC_S3_* variables the way a user's shell would provide them.
    return subprocess.run(
        [sys.executable, "-m", "retclip_dist.shards.cli", *argv],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )


def test_build_and_verify_from_and_to_s3(s3, tmp_path):
    manifest, root = synth.write_raw_archive(tmp_path / "raw", 10, seed=6, image_size=72, layout="zip")
    for path in (manifest, root):
        s3.upload_file(str(path), "raw-data", f"cohort/{path.name}")
    opts = ["--image-size", "64", "--min-side", "48", "--max-count", "4", "--no-progress"]
    remote = [
        "build",
        "--manifest",
        "s3://raw-data/cohort/patients.csv",
        "--images",
        "s3://raw-data/cohort/images.zip",
    ]
    built = run_cli(*remote, "--output_dir", "s3://shard-sets/v1", "--workers", "2", *opts)
    assert built.returncode == 0, built.stderr
    assert "kept        10" in built.stdout

    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="shard-sets")["Contents"])
    assert keys == [
        f"v1/{n}"
        for n in (
            "manifest.json",
            "rejects.jsonl",
            "train-000000.tar",
            "train-000001.tar",
            "train-000002.tar",
        )
    ]
    checked = run_cli("verify", "s3://shard-sets/v1")
    assert checked.returncode == 0, checked.stdout
    assert checked.stdout.strip().endswith("3 shards, 10 samples checked: OK")

    # Same inputs read locally give the same shard bytes.
    assert cli.main(build_argv(manifest, root, tmp_path / "local", *opts)) == 0
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
        remote_bytes = s3.get_object(Bucket="shard-sets", Key=f"v1/{name}")["Body"].read()
        assert remote_bytes == (tmp_path / "local" / name).read_bytes()
    remote_manifest = json.loads(s3.get_object(Bucket="shard-sets", Key="v1/manifest.json")["Body"].read())
    local_manifest = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert remote_manifest["shards"] == local_manifest["shards"]

    s3.delete_object(Bucket="shard-sets", Key="v1/train-000001.tar")
    broken = run_cli("verify", "s3://shard-sets/v1")
    assert broken.returncode == 1 and "PROBLEM train-000001.tar: missing" in broken.stdout


def test_s3_image_root_matches_unicode_forms(s3, monkeypatch):
    # In-process: hand fsspec the endpoint the way FSSPEC_S3_* would have at import.
    monkeypatch.setitem(
        fsspec.config.conf,
        "s3",
        {"endpoint_url": os.environ["FSSPEC_S3_ENDPOINT_URL"], "key": "testing", "secret": "testing"},
    )
    nfc = unicodedata.normalize("NFC", "Zoë_links.jpg")
    nfd = unicodedata.normalize("NFD", nfc)
    s3.put_object(Bucket="raw-data", Key=f"mac/eyes/{nfd}", Body=b"left eye")
    # Two stored spellings of one name (decomposed, and half composed), asked for in a third (NFC): S3
    # takes an exact name first, so only a name matching none of them exactly can be ambiguous there.
    s3.put_object(Bucket="raw-data", Key="mac/twice/e\u0323\u0302.jpg", Body=b"one")
    s3.put_object(Bucket="raw-data", Key="mac/twice/\u00ea\u0323.jpg", Body=b"two")
    store = DirStore("s3://raw-data/mac")
    assert store.read(f"eyes/{nfc}") == b"left eye"
    with pytest.raises(AmbiguousName):
        store.read("twice/\u1ec7.jpg")
    with pytest.raises(ImageNotFound):
        store.read("eyes/none.jpg")
    # A searched root (make-shards --dicom) lists every object under the prefix, as references read() takes.
    names = ["eyes/" + nfd, "twice/e\u0323\u0302.jpg", "twice/\u00ea\u0323.jpg"]
    assert store.names() == sorted(names)
    assert store.read(store.names()[0]) == b"left eye"
