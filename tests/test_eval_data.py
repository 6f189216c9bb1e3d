"""Labelled single-eye input: table formats, image roots (dir, zip, shard set), and bad-input errors."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from retclip_dist.eval.config import DataConfig
from retclip_dist.eval.data import LabelError, load_images, read_labelled


def _jpeg(colour: tuple[int, int, int], size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for name, colour in (("a.jpg", (255, 0, 0)), ("b.jpg", (0, 255, 0)), ("c.jpg", (0, 0, 255))):
        (root / name).write_bytes(_jpeg(colour))
    return root


def test_csv_single_label_with_laterality_spellings(tmp_path, images):
    table = _write(
        tmp_path / "t.csv",
        "image,label,split,laterality\na.jpg,2,train,OD\nb.jpg,10,train,os\nc.jpg,2,val,\n",
    )
    lset = read_labelled(DataConfig(table=str(table), images=str(images)))
    # Numeric labels are ordered by value, so "10" comes after "2".
    assert lset.classes == ("2", "10")
    assert lset.labels().tolist() == [0, 1, 0]
    assert [r.laterality for r in lset.rows] == ["right", "left", None]
    assert [r.id for r in lset.rows] == ["a.jpg", "b.jpg", "c.jpg"]
    assert lset.rows[1].source == "t.csv:3"
    pixels = load_images(lset, 8)
    assert pixels.shape == (3, 3, 8, 8)
    # JPEG of a flat colour decodes back to (nearly) that colour.
    assert pixels[0, :, 4, 4].tolist() == pytest.approx([254, 0, 0], abs=2)


def test_jsonl_multilabel_from_zip(tmp_path):
    archive = tmp_path / "imgs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("x/1.jpg", _jpeg((10, 20, 30)))
        zf.writestr("x/2.jpg", _jpeg((200, 100, 0)))
    rows = [
        {"id": "p1", "image": "x/1.jpg", "dr": 1, "amd": "false"},
        {"id": "p2", "image": "x/2.jpg", "dr": "0", "amd": True},
    ]
    table = _write(tmp_path / "t.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    lset = read_labelled(DataConfig(table=str(table), images=str(archive), label_columns=["dr", "amd"]))
    assert lset.multilabel
    assert lset.labels().tolist() == [[1, 0], [0, 1]]
    assert load_images(lset, 4)[1, :, 0, 0].tolist() == pytest.approx([200, 100, 0], abs=3)


def test_shard_set_members_carry_their_laterality(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "test-000000.tar", "w") as tf:
        for name, colour in (("pat1.left.jpg", (255, 255, 0)), ("pat1.right.jpg", (0, 255, 255))):
            data = _jpeg(colour)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    manifest = {
        "format": "retclip-shards/1",
        "shards": [{"name": "test-000000.tar", "split": "test", "count": 1}],
    }
    (shards / "manifest.json").write_text(json.dumps(manifest))
    table = _write(tmp_path / "t.csv", "image,label\npat1.left.jpg,healthy\npat1.right.jpg,glaucoma\n")
    lset = read_labelled(DataConfig(table=str(table), images=str(shards)))
    assert [r.laterality for r in lset.rows] == ["left", "right"]
    assert load_images(lset, 4)[1, :, 2, 2].tolist() == pytest.approx([0, 255, 255], abs=3)
    # A table row naming no member of the set is the row's error, in eval's words.
    missing = _write(tmp_path / "m.csv", "image,label\npat1.left.jpg,healthy\npat2.left.jpg,glaucoma\n")
    with pytest.raises(LabelError, match=r"m\.csv:3: image 'pat2\.left\.jpg': .* not a member of shard set"):
        load_images(read_labelled(DataConfig(table=str(missing), images=str(shards))), 4)


def test_unusable_image_root_is_a_label_error_naming_data_images(tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 not really")
    table = _write(tmp_path / "t.csv", "image,label\na.jpg,x\n")
    for root, why in ((tmp_path / "bad.zip", "not a readable zip"), (tmp_path / "none.tar", "no such file")):
        with pytest.raises(LabelError, match=f"data.images: image root .*{root.name}: {why}"):
            read_labelled(DataConfig(table=str(table), images=str(root)))


@pytest.mark.parametrize(
    ("csv", "extra", "message"),
    [
        (
            "image,label\na.jpg,dr\nb.jpg,cataract\n",
            {"classes": ["dr", "amd"]},
            r"t\.csv:3: unknown label 'cataract'",
        ),
        ("image,label\na.jpg,dr\n,dr\n", {}, r"t\.csv:3: column 'image' is empty"),
        ("image,grade\na.jpg,1\n", {}, r"t\.csv: no column 'label'"),
        ("image,label,laterality\na.jpg,x,both\n", {}, r"t\.csv:2: laterality 'both' is not left/right"),
        (
            "image,dr\na.jpg,maybe\n",
            {"label_columns": ["dr"]},
            r"t\.csv:2: column 'dr' must be 0/1, got 'maybe'",
        ),
        ("id,image,label\nk,a.jpg,x\nk,b.jpg,y\n", {}, r"t\.csv:3: id 'k' repeats t\.csv:2"),
    ],
)
def test_bad_tables_name_the_row(tmp_path, images, csv, extra, message):
    table = _write(tmp_path / "t.csv", csv)
    with pytest.raises(LabelError, match=message):
        read_labelled(DataConfig(table=str(table), images=str(images), **extra))


def test_missing_image_names_the_row(tmp_path, images):
    table = _write(tmp_path / "t.csv", "image,label\na.jpg,x\nnope.jpg,y\n")
    lset = read_labelled(DataConfig(table=str(table), images=str(images)))
    with pytest.raises(LabelError, match=r"t\.csv:3: image 'nope\.jpg': nope\.jpg not found under"):
        load_images(lset, 4)


def test_undecodable_image_names_the_row(tmp_path, images):
    (images / "bad.jpg").write_bytes(b"not a jpeg")
    table = _write(tmp_path / "t.csv", "image,label\nbad.jpg,x\n")
    lset = read_labelled(DataConfig(table=str(table), images=str(images)))
    with pytest.raises(LabelError, match=r"t\.csv:2: image 'bad\.jpg' cannot be decoded"):
        load_images(lset, 4)


def test_single_class_split_and_untrained_label_are_refused(tmp_path, images):
    table = _write(
        tmp_path / "t.csv",
        "image,label,split\na.jpg,dr,train\nb.jpg,dr,val\nc.jpg,amd,val\n",
    )
    lset = read_labelled(DataConfig(table=str(table), images=str(images)))
    train = lset.subset("train")
    with pytest.raises(
        LabelError, match=r"split 'train' \(1 rows, first t\.csv:2\): every row has class 'dr'"
    ):
        train.check_both_outcomes("train")
    with pytest.raises(LabelError, match=r"t\.csv:4: label 'amd' never occurs in the training split"):
        lset.check_trainable(train)
    with pytest.raises(LabelError, match=r"no rows in split 'test'; splits present: \['train', 'val'\]"):
        lset.subset("test")


def test_multilabel_constant_column_is_refused(tmp_path, images):
    table = _write(tmp_path / "t.csv", "image,dr,amd\na.jpg,1,0\nb.jpg,0,0\n")
    lset = read_labelled(DataConfig(table=str(table), images=str(images), label_columns=["dr", "amd"]))
    with pytest.raises(LabelError, match="label column 'amd' is 0 on every row"):
        lset.check_both_outcomes("all")
    assert np.array_equal(lset.labels(), [[1, 0], [0, 0]])


# One image per row; the label cells hold every spelling of "no label" next to a binary 0/1 label.
_MISSING_CELLS = ["NaN", "nan", "", "   ", "NA", "null", "N/A", "None"]


def _binary_rows() -> list[tuple[str, str]]:
    labelled = [(f"img{i}.jpg", str(i % 2)) for i in range(6)]
    return labelled + [(f"gap{i}.jpg", cell) for i, cell in enumerate(_MISSING_CELLS)]


def _csv_table(path, rows):
    lines = ["image,label"] + [f"{image},{cell}" for image, cell in rows]
    return _write(path, "\n".join(lines) + "\n")


def test_missing_labels_are_dropped_and_counted_never_classes(tmp_path, images):
    table = _csv_table(tmp_path / "t.csv", _binary_rows())
    lset = read_labelled(DataConfig(table=str(table), images=str(images)))
    assert lset.classes == ("0", "1")
    assert lset.labels().tolist() == [0, 1, 0, 1, 0, 1]
    assert [r.image for r in lset.rows] == [f"img{i}.jpg" for i in range(6)]
    assert lset.missing_labels() == {"dropped": 8, "rows": [f"t.csv:{n}" for n in range(8, 16)]}


def test_strict_refuses_a_missing_label_naming_file_and_row(tmp_path, images):
    table = _csv_table(tmp_path / "t.csv", _binary_rows())
    with pytest.raises(LabelError, match=r"^t\.csv:8: no label in column 'label' \('NaN'\); data\.strict"):
        read_labelled(DataConfig(table=str(table), images=str(images), strict=True))


def test_a_missing_marker_named_in_classes_is_a_class(tmp_path, images):
    table = _write(tmp_path / "t.csv", "image,label\na.jpg,NA\nb.jpg,dr\nc.jpg,\n")
    lset = read_labelled(DataConfig(table=str(table), images=str(images), classes=["dr", "NA"]))
    assert lset.labels().tolist() == [1, 0] and lset.missing_labels()["dropped"] == 1


def test_class_order_is_sorted_and_identical_for_shuffled_rows(tmp_path, images):
    labels = ["10", "2", "mild", "1.5", "NaN", "inf", "2", "", "mild", "nan"]
    rows = [(f"x{i}.jpg", cell) for i, cell in enumerate(labels)]
    orders = []
    for seed in range(4):
        shuffled = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
        table = _csv_table(tmp_path / f"t{seed}.csv", shuffled)
        lset = read_labelled(DataConfig(table=str(table), images=str(images)))
        orders.append(lset.classes)
        assert lset.missing_labels()["dropped"] == 3
    assert orders == [("1.5", "2", "10", "inf", "mild")] * 4
    # Before, "nan" counted as a number and made the sort key partial, so the order followed set
    # iteration (string-hash seed); the key is total now, and the order is fixed above.
    assert sorted(orders[0], key=str) == sorted(set(labels) - {"NaN", "nan", ""})


def test_multilabel_missing_values_are_dropped_or_refused(tmp_path, images):
    rows = [
        {"image": "a.jpg", "dr": 1, "amd": 0},
        {"image": "b.jpg", "dr": None, "amd": 1},
        {"image": "c.jpg", "dr": 0, "amd": float("nan")},
        {"image": "d.jpg", "dr": 0, "amd": 1},
        {"image": "e.jpg", "dr": "", "amd": 0},
    ]
    table = _write(tmp_path / "t.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = DataConfig(table=str(table), images=str(images), label_columns=["dr", "amd"])
    lset = read_labelled(cfg)
    assert lset.labels().tolist() == [[1, 0], [0, 1]]
    assert lset.missing_labels() == {"dropped": 3, "rows": ["t.jsonl:2", "t.jsonl:3", "t.jsonl:5"]}
    with pytest.raises(LabelError, match=r"^t\.jsonl:2: no label in column 'dr' \(''\)"):
        read_labelled(
            DataConfig(table=str(table), images=str(images), label_columns=["dr", "amd"], strict=True)
        )
