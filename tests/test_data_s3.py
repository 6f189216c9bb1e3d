"""Reading a shard set from s3:// through fsspec, against a local moto S3 server."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from retclip_dist.data.config import DataConfig
from retclip_dist.data.evaluation import build_eval_data
from retclip_dist.data.fixtures import fake_patients, tiny_tokenizer, write_shard_set
from retclip_dist.data.loader import build_train_data

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
    # Shards of 4, 4 and 2 over 2 workers: 4 + 1 or 3 + 2 batches of 2, whichever shard worker 1 gets.
    assert train.steps_per_epoch == 5
    keys = [k for batch in train for k in batch["keys"]]
    assert len(keys) == 2 * train.steps_per_epoch == len(set(keys))
    assert train.skipped == 0

    val = build_eval_data(dataclasses.replace(cfg, num_workers=0), tokenizer, 0, 1)
    seen = [k for batch in val for k in batch["keys"]]
    assert seen == ["p00010", "p00011", "p00012", "p00013"]
