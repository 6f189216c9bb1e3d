"""Reading a shard set from s3:// through fsspec, against a local moto S3 server."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import fake_patients, tiny_tokenizer, write_shard_set

from retclip_dist.data.config import DataConfig
from retclip_dist.data.loader import build_train_data
from retclip_dist.data.validation import build_val_data

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3_options() -> Iterator[dict]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"},
    }
    server.stop()


@pytest.mark.slow
def test_train_and_eval_loaders_read_s3(tmp_path: Path, s3_options: dict) -> None:
    patients = fake_patients(14, size=64, seed=4)
    write_shard_set(tmp_path, {"train": patients[:10], "val": patients[10:]}, per_shard=4)
    client = boto3.client(
        "s3", aws_access_key_id="testing", aws_secret_access_key="testing", **s3_options["client_kwargs"]
    )
    client.create_bucket(Bucket="shards")
    for path in tmp_path.iterdir():
        client.upload_file(str(path), "shards", f"set/{path.name}")

    cfg = DataConfig(
        shards="s3://shards/set",
        storage_options=s3_options,
        batch_size=2,
        num_workers=2,
        decode_size=32,
        image_size=28,
    )
    tokenizer = tiny_tokenizer()
    train = build_train_data(cfg, tokenizer, 0, 1, 0)
    # 10 samples in shards of 4, 4 and 2, batches of 2: 5 steps (3 + 2 over the 2 workers), none unused;
    # the worker streams of 6 and 4 samples meet inside a shard, so a range starts mid-tar on S3 too.
    assert train.steps_per_epoch == 5 and train.unused_per_epoch == 0
    assert any(r.start > 0 for stream in train.plan.streams[0] for r in stream)
    keys = [k for batch in train for k in batch["keys"]]
    assert sorted(keys) == [f"p{i:05d}" for i in range(10)]
    assert train.skipped == 0

    val = build_val_data(dataclasses.replace(cfg, num_workers=0), tokenizer, 0, 1)
    seen = [k for batch in val for k in batch["keys"]]
    assert seen == ["p00010", "p00011", "p00012", "p00013"]
