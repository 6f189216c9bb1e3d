"""retclip-eval benchmark, fast parts: the suite file, each layout reader on a look-alike folder, splits,
few-shot draws, the fine-tuning recipe's schedule and groups, CIs and the table format, leakage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import bench_folders as B
import numpy as np
import pytest
import torch
import yaml
from conftest import build_argv, tiny_model_config
from scipy import stats
from sklearn.metrics import average_precision_score

from retclip_dist import synth
from retclip_dist.eval.benchmark.layouts import read_dataset
from retclip_dist.eval.benchmark.leakage import check_leakage, pretraining_hashes
from retclip_dist.eval.benchmark.prompts import DEFAULT_PACKS, PACK_DIR, load_pack
from retclip_dist.eval.benchmark.protocols import few_shot_draw
from retclip_dist.eval.benchmark.recipe import BenchClassifier, layer_id, lr_at, param_groups, set_drop_path
from retclip_dist.eval.benchmark.results import (
    ModelNote,
    Predictions,
    aggregate,
    bootstrap_intervals,
    headline,
    markdown,
    read_predictions,
    t_interval,
    write_predictions,
)
from retclip_dist.eval.benchmark.splits import split_for_seed, split_indices
from retclip_dist.eval.benchmark.suite import DatasetSpec, FinetuneRecipe, SplitConfig
from retclip_dist.eval.cli import main as eval_main
from retclip_dist.eval.data import LabelError, load_images
from retclip_dist.eval.models.retclip import RetClipModel
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.vocab import write_vocab
from retclip_dist.shards import cli as shards_cli


def spec(layout: str, root: Path, **options) -> DatasetSpec:
    return DatasetSpec(name=layout, layout=layout, root=str(root), options=options)


# -- suite file ---------------------------------------------------------------------------------------


def test_strict_without_shards_is_refused(capsys):
    assert eval_main(["benchmark", "--suite", "s", "--model", "m", "--output_dir", "o", "--strict"]) == 2
    assert "--strict refuses leaked images, so it needs --shards" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("suite", "field"),
    [
        ({"datasets": [{"name": "A", "layout": "aptos", "root": "x"}]}, "datasets[0].layout"),
        (
            {"datasets": [{"name": "A", "layout": "table", "root": "x", "rooot": 1}]},
            "datasets[0]: unknown key",
        ),
        ({"seeds": "0", "datasets": [{"name": "A", "root": "x"}]}, "seeds: expected a list"),
        ({"protocols": ["zeroshot"], "datasets": [{"name": "A", "root": "x"}]}, "protocols[0]"),
        ({"datasets": []}, "datasets: give at least one dataset"),
        ({"datasets": [{"name": "A", "root": "x"}, {"name": "A", "root": "y"}]}, "datasets[1].name"),
        ({"datasets": [{"name": "A"}]}, "datasets[0].root"),
        (
            {"finetune": {"layer_decay": "fast"}, "datasets": [{"name": "A", "root": "x"}]},
            "finetune.layer_decay",
        ),
    ],
)
def test_suite_errors_are_one_line_naming_the_field(tmp_path, capsys, suite, field):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    code = eval_main(["benchmark", "--suite", str(path), "--model", "m", "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and field in err, err


def test_recipe_defaults_are_retfounds():
    r = FinetuneRecipe()
    assert (r.layer_decay, r.drop_path, r.smoothing, r.reprob, r.weight_decay, r.blr, r.epochs) == (
        0.65,
        0.2,
        0.1,
        0.25,
        0.05,
        5e-3,
        50,
    )
    assert r.auto_augment == "rand-m9-mstd0.5-inc1" and r.select_metric == "macro_auroc"


def test_bad_dataset_options_and_pack_name_the_dataset(tmp_path, capsys):
    B.aptos2019(tmp_path / "aptos")
    suite = {"datasets": [{"name": "A", "layout": "aptos2019", "root": "aptos", "options": {"tabel": "x"}}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    code = eval_main(
        [
            "benchmark",
            "--suite",
            str(tmp_path / "s.yaml"),
            "--model",
            "m",
            "--output_dir",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "dataset A: options: unknown key(s) ['tabel']" in capsys.readouterr().err


# -- layouts ------------------------------------------------------------------------------------------


def test_retfound_split(tmp_path):
    bset = read_dataset(spec("retfound_split", B.retfound_split(tmp_path / "r")))
    lset = bset.lset
    assert lset.classes == ("anodr", "bmilddr") and len(lset) == 24
    assert [sum(r.split == s for r in lset.rows) for s in ("train", "val", "test")] == [12, 6, 6]
    assert lset.rows[0].id == "train/anodr/img000.jpg" and lset.rows[0].label == (0,)
    shutil.rmtree(tmp_path / "r" / "val")
    with pytest.raises(LabelError, match=r"r/val is missing \(expected train/, val/, test/\)"):
        read_dataset(spec("retfound_split", tmp_path / "r"))


def test_aptos2019_counts_a_missing_diagnosis_and_names_bad_rows(tmp_path):
    root = B.aptos2019(tmp_path / "a")
    bset = read_dataset(spec("aptos2019", root))
    assert len(bset.lset) == 30 and bset.lset.dropped == ("train.csv:32",)
    assert bset.lset.classes == ("0", "1", "2", "3", "4") and bset.lset.rows[0].id == "000a7c3e9f1"
    (root / "train_images" / "100a7c3e9f1.png").write_bytes(b"not a png")  # row 8: first grade-1 image
    with pytest.raises(
        LabelError, match=r"^train\.csv:8: image 'train_images/100a7c3e9f1\.png' cannot be decoded"
    ):
        load_images(bset.lset, 32)
    (root / "train_images" / "100a7c3e9f1.png").unlink()
    with pytest.raises(LabelError, match=r"^train\.csv:8: image 'train_images/100a7c3e9f1\.png'.*not found"):
        load_images(bset.lset, 32)
    with pytest.raises(LabelError, match=r"root .*/nowhere is not a directory"):
        read_dataset(spec("aptos2019", tmp_path / "nowhere"))
    (root / "train.csv").write_text("id_code,grade\nabc,1\n")
    with pytest.raises(
        LabelError, match=r"train\.csv: no column 'diagnosis'; columns are \['grade', 'id_code'\]"
    ):
        read_dataset(spec("aptos2019", root))


def test_idrid_trailing_space_column_and_empty_columns(tmp_path):
    root = B.idrid(tmp_path / "i")
    table = next(root.rglob("*Training Labels.csv"))
    assert table.read_text().splitlines()[0] == "Image name,Retinopathy grade,Risk of macular edema ,,"
    dr = read_dataset(spec("idrid", root))
    assert len(dr.lset) == 21 and dr.lset.classes == ("0", "1", "2")
    assert {r.split for r in dr.lset.rows} == {"train", "test"} and dr.lset.rows[0].id == "train/IDRiD_001"
    for folder in ("A. Segmentation/1. Original Images/a. Training Set", "C. Localization/2. Groundtruths"):
        (root / folder).mkdir(parents=True)  # the rest of the IDRiD folder does not confuse the reader
    B.image(root / "A. Segmentation/1. Original Images/a. Training Set/IDRiD_01.jpg", 0.0, 0)
    dme = read_dataset(spec("idrid", root, task="dme"))
    images = root / "B. Disease Grading" / "1. Original Images"
    (images / "b. Testing Set").rename(images / "b.TestingSet")  # a copy without spaces
    assert [r.image for r in read_dataset(spec("idrid", root)).lset.rows][-1].endswith(
        "b.TestingSet/IDRiD_006.jpg"
    )
    assert [r.label[0] for r in dme.lset.rows[:15]] == [0] * 5 + [1] * 5 + [2] * 5
    table.write_text(table.read_text().replace("Retinopathy grade", "DR grade"))
    with pytest.raises(LabelError, match=r"Training Labels\.csv: no column 'Retinopathy grade'"):
        read_dataset(spec("idrid", root))


def test_messidor2_excludes_and_counts_ungradable(tmp_path):
    root = B.messidor2(tmp_path / "m")
    (root / "IMAGES" / "IM000004.JPG").rename(root / "IMAGES" / "IM000004.tif")  # the CSV says .JPG
    bset = read_dataset(spec("messidor2", root))
    assert bset.lset.rows[4].image == "IMAGES/IM000004.tif"
    assert bset.excluded == {"ungradable": 2} and len(bset.lset) == 18
    assert bset.lset.rows[1].id == "20051020_00001_0100_PP.png" and bset.lset.rows[1].label == (0,)
    dme = read_dataset(spec("messidor2", tmp_path / "m", task="dme"))
    assert dme.lset.classes == ("0", "1") and sum(r.label[0] for r in dme.lset.rows) == 6


def test_rfmid_multilabel_ids_restart_per_split(tmp_path):
    bset = read_dataset(spec("rfmid", B.rfmid(tmp_path / "f")))
    lset = bset.lset
    assert lset.multilabel and lset.classes == B.RFMID_DISEASES and len(lset) == 28
    first_val = next(r for r in lset.rows if r.split == "val")
    assert first_val.id == "val/1" and first_val.image == "Evaluation_Set/Validation/1.png"
    assert lset.labels()[:4].tolist() == [[0, 0, 1], [1, 0, 1], [0, 1, 0], [1, 0, 0]]
    with_risk = read_dataset(spec("rfmid", tmp_path / "f", disease_risk=True, classes=["DR"]))
    assert with_risk.lset.classes == ("Disease_Risk", "DR")


def test_odir5k_patient_rows_with_both_eyes(tmp_path):
    bset = read_dataset(spec("odir5k", B.odir5k(tmp_path / "o")))
    assert bset.paired and len(bset.lset) == 30 and bset.lset.classes == B.ODIR
    assert bset.lset.rows[3].image.endswith("3_left.jpg") and bset.right[3].endswith("3_right.jpg")
    assert bset.groups[3] == "3"
    (tmp_path / "o" / "ODIR-5K_Training_Images" / "3_right.jpg").unlink()
    with pytest.raises(LabelError, match=r"V2\.csv:5: image '3_right\.jpg' not found"):
        read_dataset(spec("odir5k", tmp_path / "o"))


def test_table_layout_groups_by_patient_column(tmp_path):
    root = B.table(tmp_path / "t", n_patients=10)
    text = (root / "labels.csv").read_text().splitlines()
    lines = [text[0] + ",patient", *[f"{line},{line.split(',')[0].split('-')[0]}" for line in text[1:]]]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    text = (
        (root / "labels.csv")
        .read_text()
        .replace(",train,", ",,")
        .replace(",val,", ",,")
        .replace(",test,", ",,")
    )
    (root / "labels.csv").write_text(text)
    bset = read_dataset(spec("table", root, label_column="grade", patient_column="patient"))
    assert bset.groups[:2] == ("p00000", "p00000")
    for seed in (0, 1, 2):
        lset = split_for_seed(bset, SplitConfig(), seed)
        part = {}
        for row, group in zip(lset.rows, bset.groups, strict=True):
            assert part.setdefault(group, row.split) == row.split  # a patient never straddles parts


# -- splits and few-shot ------------------------------------------------------------------------------


def test_drawn_splits_are_stratified_seeded_and_official_ones_kept(tmp_path):
    aptos = read_dataset(spec("aptos2019", B.aptos2019(tmp_path / "a")))
    a0, a0b, a1 = (split_for_seed(aptos, SplitConfig(), s) for s in (0, 0, 1))
    assert [r.split for r in a0.rows] == [r.split for r in a0b.rows] != [r.split for r in a1.rows]
    idx = split_indices(a0)
    assert [len(idx[s]) for s in ("train", "val", "test")] == [20, 5, 5]
    for name, per_grade in (("train", 4), ("val", 1), ("test", 1)):  # 6 patients per grade
        assert np.bincount(a0.labels()[idx[name]], minlength=5).tolist() == [per_grade] * 5
    idrid = read_dataset(spec("idrid", B.idrid(tmp_path / "i")))
    drawn = split_for_seed(idrid, SplitConfig(), 0)
    assert [r.split for r in drawn.rows if r.split == "test"] == ["test"] * 6
    assert sum(r.split == "val" for r in drawn.rows) == 3  # one of five train images per grade
    fixed = read_dataset(spec("retfound_split", B.retfound_split(tmp_path / "r")))
    assert split_for_seed(fixed, SplitConfig(), 3) is fixed.lset


def test_few_shot_draw_is_class_balanced_and_seeded():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    train = np.arange(20)
    for k in (1, 2, 4, 8, 16):
        drawn = few_shot_draw(labels, train, k, seed=0, multilabel=False)
        assert np.bincount(labels[drawn], minlength=3).tolist() == [min(k, 10), min(k, 3), min(k, 7)]
    assert (
        few_shot_draw(labels, train, 2, 0, False).tolist()
        != few_shot_draw(labels, train, 2, 1, False).tolist()
    )
    multi = np.array([[1, 0], [1, 1], [0, 1], [0, 1], [1, 0], [0, 0]])
    drawn = few_shot_draw(multi, np.arange(6), 1, 0, True)
    assert (multi[drawn].sum(axis=0) >= 1).all() and len(drawn) <= 2


# -- fine-tuning recipe -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    return RetClip(tiny_model_config(write_vocab(root / "vocab.txt", synth.vocabulary()), image_size=32))


def test_layer_decay_groups_and_drop_path(tiny):
    net = BenchClassifier(tiny, 3, paired=False)
    assert [
        layer_id(n, 3)
        for n in (
            "tower.cls_token",
            "tower.patch_embed.proj.weight",
            "tower.blocks.1.mlp.fc1.weight",
            "head.weight",
        )
    ] == [0, 0, 2, 3]
    groups = param_groups(net, 0.05, 0.65)
    scale = {(round(g["lr_scale"], 6), g["weight_decay"]) for g in groups}
    assert scale == {
        (round(0.65**3, 6), 0.0),
        (round(0.65**3, 6), 0.05),
        (round(0.65**2, 6), 0.0),
        (round(0.65**2, 6), 0.05),
        (0.65, 0.0),
        (0.65, 0.05),
        (1.0, 0.0),
        (1.0, 0.05),
    }
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    set_drop_path(net.tower, 0.2)
    assert [b.drop_path1.__class__.__name__ for b in net.tower.blocks] == ["Identity", "DropPath"]
    assert net.tower.blocks[1].drop_path2.drop_prob == pytest.approx(0.2)
    paired = BenchClassifier(tiny, 8, paired=True)
    assert paired(torch.zeros(2, 2, 3, 32, 32)).shape == (2, 8)


def test_lr_schedule_warmup_then_cosine():
    r = FinetuneRecipe(epochs=50, warmup_epochs=10, min_lr=1e-6)
    assert lr_at(0, 1e-3, r) == 0 and lr_at(5, 1e-3, r) == pytest.approx(5e-4)
    assert lr_at(10, 1e-3, r) == pytest.approx(1e-3) and lr_at(30, 1e-3, r) == pytest.approx(
        (1e-3 + 1e-6) / 2
    )
    assert lr_at(50, 1e-3, r) == pytest.approx(1e-6)


# -- results --------------------------------------------------------------------------------------------


def test_t_interval_numbers():
    mean, low, high = t_interval([0.7, 0.8, 0.9])
    half = stats.t.ppf(0.975, 2) * 0.1 / np.sqrt(3)
    assert mean == pytest.approx(0.8) and (low, high) == pytest.approx((0.8 - half, 0.8 + half))
    assert half == pytest.approx(0.248413, abs=1e-6)


def test_binary_auprc_is_positive_class_ap_and_predictions_round_trip(tmp_path):
    labels = np.array([0, 1, 1, 0, 1, 0])
    p1 = np.array([0.2, 0.9, 0.4, 0.5, 0.7, 0.1])
    pred = Predictions(
        [f"r{i}" for i in range(6)], labels, np.stack([1 - p1, p1], 1), ["healthy", "glaucoma"], False
    )
    metrics = headline(pred.labels, pred.probs, pred.classes, False)
    assert metrics["auprc"] == average_precision_score(labels, p1)
    write_predictions(tmp_path / "p.csv", pred)
    assert (tmp_path / "p.csv").read_text().splitlines()[:2] == [
        "id,label,prob_healthy,prob_glaucoma",
        "r0,healthy,0.8,0.2",
    ]
    back = read_predictions(tmp_path / "p.csv")
    assert back.ids == pred.ids and (back.labels == labels).all() and (back.probs == pred.probs).all()
    low, high = bootstrap_intervals(pred)["auroc"]
    assert 0 <= low <= metrics["auroc"] <= high <= 1
    rows = aggregate({("ours", "GLAUCOMA", "linear_probe"): [pred]})
    auroc = next(r for r in rows if r["metric"] == "auroc")
    assert (auroc["model"], auroc["mean"], auroc["ci_low"], auroc["ci_high"], auroc["n_seeds"]) == (
        "ours",
        metrics["auroc"],
        low,
        high,
        1,
    )
    note = ModelNote("ours", "retclip", "m (sha256 0)", "32 px", "projected", "en, zh prompts", False)
    table = markdown(rows, [], ["linear_probe"], [note], ["GLAUCOMA: note"]).splitlines()
    at = table.index("## GLAUCOMA")
    assert (
        table[at + 2]
        == "| model | linear_probe auroc | linear_probe auprc | linear_probe accuracy | linear_probe macro_f1 | linear_probe kappa |"
    )
    assert table[at + 4].startswith(f"| ours | {metrics['auroc']:.3f} [{low:.3f}, {high:.3f}] |")
    assert table[-1] == "- GLAUCOMA: note"


# -- prompt packs ---------------------------------------------------------------------------------------


def test_shipped_packs_cover_their_layouts_in_both_languages():
    for name in DEFAULT_PACKS.values():
        pack = load_pack(str(PACK_DIR / name))
        assert set(pack.templates) == {"en", "zh"} and all(len(t) >= 2 for t in pack.templates.values())
    assert set(load_pack(str(PACK_DIR / "dr_grade.yaml")).phrases) == {"0", "1", "2", "3", "4"}
    assert set(load_pack(str(PACK_DIR / "odir5k.yaml")).phrases) == set(B.ODIR)
    assert len(load_pack(str(PACK_DIR / "rfmid.yaml")).phrases) == 46  # 45 diseases + Disease_Risk
    prompts = load_pack(str(PACK_DIR / "dme_messidor2.yaml")).prompts("zh", ["1"], "{}。")
    assert prompts == {"1": ["糖尿病黄斑水肿。", "黄斑区硬性渗出。"]}


# -- leakage --------------------------------------------------------------------------------------------


def test_leakage_guard_matches_source_images_of_the_shards(tmp_path):
    manifest, root = synth.write_raw_archive(tmp_path / "raw", 4, seed=3, image_size=64, layout="dir")
    args = build_argv(manifest, root, tmp_path / "shards", "--image-size", "32", "--min-side", "32")
    assert shards_cli.main([*args, "--no-progress"]) == 0
    digests = pretraining_hashes(str(tmp_path / "shards"))
    assert len(digests) == 8
    entry = json.loads((tmp_path / "shards" / "manifest.json").read_text())["shards"][0]
    assert entry["source_sha256"] == sorted(entry["source_sha256"])
    evalset = B.retfound_split(tmp_path / "eval")
    leaked = sorted(root.rglob("*.jpg"))[:2]
    for i, src in enumerate(leaked):
        shutil.copy(src, evalset / "test" / "anodr" / f"img{12 + i:03d}.jpg")  # overwrite two test images
    bset = read_dataset(spec("retfound_split", evalset))
    assert check_leakage(bset, str(tmp_path / "shards"), strict=False) == [
        "test/anodr/img012.jpg",
        "test/anodr/img013.jpg",
    ]
    with pytest.raises(LabelError, match=r"2 evaluation rows .* --strict refuses"):
        check_leakage(bset, str(tmp_path / "shards"), strict=True)


def test_leakage_guard_of_a_pseudonymised_set_needs_its_key(tmp_path):
    manifest, root = synth.write_raw_archive(tmp_path / "raw", 3, seed=3, image_size=64, layout="dir")
    key, other = tmp_path / "key", tmp_path / "other"
    key.write_bytes(b"0123456789abcdef0123456789abcdef")
    other.write_bytes(b"another-secret-key-of-32-bytes!!")
    args = build_argv(manifest, root, tmp_path / "shards", "--image-size", "32", "--min-side", "32")
    assert shards_cli.main([*args, "--no-progress", "--pseudonymise", str(key)]) == 0
    evalset = B.retfound_split(tmp_path / "eval")
    shutil.copy(sorted(root.rglob("*.jpg"))[0], evalset / "test" / "anodr" / "img012.jpg")
    bset = read_dataset(spec("retfound_split", evalset))
    shards = str(tmp_path / "shards")
    assert check_leakage(bset, shards, strict=False, key_file=str(key)) == ["test/anodr/img012.jpg"]
    with pytest.raises(ValueError, match=r"built with --pseudonymise.*--shards-key KEYFILE"):
        check_leakage(bset, shards, strict=False)
    with pytest.raises(ValueError, match=r"not the key .* was built with"):
        check_leakage(bset, shards, strict=False, key_file=str(other))
    with pytest.raises(ValueError, match=r"--shards-key .*cannot read the key file"):
        check_leakage(bset, shards, strict=False, key_file=str(tmp_path / "missing"))


@pytest.mark.slow
def test_benchmark_strict_refuses_a_leaking_suite_before_any_cell(tmp_path, tiny, capsys):
    manifest, root = synth.write_raw_archive(tmp_path / "raw", 2, seed=5, image_size=64, layout="dir")
    args = build_argv(manifest, root, tmp_path / "shards", "--image-size", "32", "--min-side", "32")
    assert shards_cli.main([*args, "--no-progress"]) == 0
    evalset = B.retfound_split(tmp_path / "eval")
    shutil.copy(sorted(root.rglob("*.jpg"))[0], evalset / "val" / "bmilddr" / "img015.jpg")
    suite = {
        "seeds": [0],
        "protocols": ["linear_probe"],
        "datasets": [{"name": "R", "layout": "retfound_split", "root": "eval"}],
    }
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    model = tiny.save_pretrained(tmp_path / "model")
    base = [
        "benchmark",
        "--suite",
        str(tmp_path / "suite.yaml"),
        "--model",
        str(model),
        "--shards",
        str(tmp_path / "shards"),
    ]
    assert eval_main([*base, "--output_dir", str(tmp_path / "strict"), "--strict"]) == 2
    assert "1 evaluation rows" in capsys.readouterr().err
    assert not (tmp_path / "strict" / "predictions").exists()
    assert eval_main([*base, "--output_dir", str(tmp_path / "lenient")]) == 0
    assert (
        "R: 1 evaluation images were in the pretraining shards (first val/bmilddr/img015.jpg)"
        in (tmp_path / "lenient" / "results.md").read_text()
    )


class _Interrupted(Exception):
    pass


def test_finetune_resumes_from_its_epoch_checkpoint_exactly(tiny, tmp_path, monkeypatch):
    import retclip_dist.eval.benchmark.recipe as recipe_mod

    bset = read_dataset(spec("retfound_split", B.retfound_split(tmp_path / "r")))
    images = load_images(bset.lset, 32)
    index = split_indices(bset.lset)
    args = (RetClipModel(tiny), images, bset.lset.labels(), index, list(bset.lset.classes), False)
    recipe = FinetuneRecipe(epochs=2, warmup_epochs=1, batch_size=8)
    whole, whole_history = recipe_mod.finetune_recipe(*args, recipe, 0)

    real, calls = recipe_mod._augment, []

    def dies_in_epoch_two(batch, transform):
        calls.append(1)
        if len(calls) == 3:  # 12 training images, batch 8: the first batch of the second epoch
            raise _Interrupted
        return real(batch, transform)

    monkeypatch.setattr(recipe_mod, "_augment", dies_in_epoch_two)
    with pytest.raises(_Interrupted):
        recipe_mod.finetune_recipe(*args, recipe, 0, tmp_path / "ckpt")
    progress = json.loads((tmp_path / "ckpt" / "latest" / "progress.json").read_text())
    assert progress["epoch"] == 1
    batches = []
    monkeypatch.setattr(
        recipe_mod, "_augment", lambda batch, transform: batches.append(1) or real(batch, transform)
    )
    resumed, history = recipe_mod.finetune_recipe(*args, recipe, 0, tmp_path / "ckpt")
    assert len(batches) == 2  # only the second epoch ran again
    assert history == whole_history
    np.testing.assert_array_equal(resumed, whole)
