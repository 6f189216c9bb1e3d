"""``retclip-eval benchmark --suite suite.yaml --model DIR --output_dir OUT``: run every dataset x protocol x
seed of the suite (skipping cells whose predictions file exists) and write the table from all of them.

OUT/benchmark.json records the model's weight hash and the suite's settings; a rerun into the same OUT
with another model or other settings is refused, so finished cells are only ever reused for the run
that made them (adding seeds, protocols or datasets is fine).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from retclip_dist.cli_args import add_output_dir
from retclip_dist.config import ConfigError
from retclip_dist.eval.benchmark import protocols as P
from retclip_dist.eval.benchmark.layouts import layout_options, read_dataset
from retclip_dist.eval.benchmark.prompts import load_pack, pack_path
from retclip_dist.eval.benchmark.results import (
    Predictions,
    aggregate,
    markdown,
    plot,
    predictions_name,
    read_predictions,
    write_csv,
    write_predictions,
)
from retclip_dist.eval.benchmark.splits import split_for_seed, split_indices
from retclip_dist.eval.benchmark.suite import Suite, load_suite
from retclip_dist.eval.data import LabelError
from retclip_dist.eval.features import load_model
from retclip_dist.exit_codes import EXIT_CONFIG, EXIT_OK
from retclip_dist.launch.env import accelerator_placement
from retclip_dist.model.card import record_benchmark
from retclip_dist.model.retclip import WEIGHTS_FILE

log = logging.getLogger(__name__)
RECORD = "benchmark.json"


def cell_protocols(suite: Suite) -> list[str]:
    """Column names of the table: few_shot expands to few_shot_<k> per shot count."""
    out = []
    for protocol in suite.protocols:
        out.extend([f"few_shot_{k}" for k in suite.few_shot.shots] if protocol == "few_shot" else [protocol])
    return out


def _record(suite: Suite, model_dir: str) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(Path(model_dir) / WEIGHTS_FILE, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    settings = {
        k: v
        for k, v in asdict(suite).items()
        if k not in ("seeds", "protocols", "datasets", "device", "batch_size")
    }
    return {
        "model_sha256": digest.hexdigest(),
        "settings": settings,
        "datasets": {d.name: asdict(d) for d in suite.datasets},
    }


def _check_record(out: Path, record: dict[str, Any]) -> None:
    path = out / RECORD
    if path.is_file():
        old = json.loads(path.read_text())
        for key in ("model_sha256", "settings"):
            if old.get(key) != record[key]:
                raise ConfigError(
                    f"{path}: {key} differs from this run's; use a new --output_dir for another model or settings"
                )
        for name, spec in record["datasets"].items():
            if name in old.get("datasets", {}) and old["datasets"][name] != spec:
                raise ConfigError(
                    f"{path}: dataset {name} was run with other settings; rename it or use a new --output_dir"
                )
        record = {**record, "datasets": {**old.get("datasets", {}), **record["datasets"]}}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def _run_cell(
    ctx: P.DatasetContext,
    suite: Suite,
    protocol: str,
    seed: int,
    spec_pack: str | None,
    checkpoints: Path,
) -> tuple[Any, list[dict[str, Any]]]:
    lset = split_for_seed(ctx.bset, suite.splits, seed)
    index = split_indices(lset)
    extra: list[dict[str, Any]] = []
    if protocol == "zero_shot":
        assert spec_pack is not None
        probs, extra = P.zero_shot(ctx, lset, index, load_pack(spec_pack), suite)
    elif protocol == "linear_probe":
        probs = P.linear_probe(ctx, lset, index, suite)
    elif protocol.startswith("few_shot_"):
        probs = P.few_shot(ctx, lset, index, suite, int(protocol.rsplit("_", 1)[1]), seed)
    else:
        probs, extra = P.finetune(ctx, lset, index, suite, seed, checkpoints)
    test = index["test"]
    pred = Predictions(
        [lset.rows[i].id for i in test], lset.labels()[test], probs, list(lset.classes), lset.multilabel
    )
    return pred, extra


def run_benchmark(
    suite: Suite,
    model_dir: str,
    out_dir: str,
    shards: str | None = None,
    strict: bool = False,
    shards_key: str | None = None,
) -> dict[str, Any]:
    """Run the missing cells, then write results.csv, results.md, results_auroc.png; returns a summary."""
    for spec in suite.datasets:
        layout_options(spec)  # a typo in a dataset's options fails before any work
    if not (Path(model_dir) / WEIGHTS_FILE).is_file():
        raise ValueError(
            f"--model {model_dir}: no {WEIGHTS_FILE}; give a directory written by save_pretrained"
        )
    state = PartialState(**accelerator_placement(torch.cuda.is_available()))
    out = Path(out_dir)
    if state.is_main_process:
        _check_record(out, _record(suite, model_dir))
    state.wait_for_everyone()
    pred_dir = out / "predictions"
    protocols = cell_protocols(suite)
    packs = {d.name: pack_path(d) for d in suite.datasets} if "zero_shot" in protocols else {}
    for _name, path in packs.items():
        load_pack(path)  # a broken pack fails before any work
    # Under accelerate launch each process embeds on its own device (state.device), not all on cuda:0.
    model = load_model(model_dir, state.device if suite.device == "auto" else torch.device(suite.device))
    ran: list[str] = []
    reused: list[str] = []
    leaks: dict[str, list[str]] = {}
    for spec in suite.datasets:
        todo = [
            (p, s)
            for p in protocols
            for s in suite.seeds
            if not (pred_dir / predictions_name(spec.name, p, s)).is_file()
        ]
        reused += [f"{spec.name}/{p}/seed{s}" for p in protocols for s in suite.seeds if (p, s) not in todo]
        if not todo and shards is None:
            continue
        bset = read_dataset(spec)
        if shards is not None:
            from retclip_dist.eval.benchmark.leakage import check_leakage

            leaks[spec.name] = check_leakage(bset, shards, strict, shards_key)
        if state.is_main_process:
            _write_dataset_record(out, spec.name, bset, leaks.get(spec.name))
        ctx = P.DatasetContext(bset, model, suite.batch_size)
        for protocol, seed in todo:
            log.info("%s: %s seed %d", spec.name, protocol, seed)
            name = predictions_name(spec.name, protocol, seed)
            checkpoints = out / "checkpoints" / Path(name).stem
            pred, extra = _run_cell(ctx, suite, protocol, seed, packs.get(spec.name), checkpoints)
            if state.is_main_process:
                path = pred_dir / name
                pred_dir.mkdir(parents=True, exist_ok=True)
                if extra:
                    side = path.with_name(
                        path.stem + ("_templates.csv" if protocol == "zero_shot" else "_history.json")
                    )
                    _write_extra(side, extra, protocol)
                write_predictions(path, pred)  # last: its existence marks the cell finished
                shutil.rmtree(checkpoints, ignore_errors=True)  # an interrupted fine-tune resumes from it
            state.wait_for_everyone()
            ran.append(f"{spec.name}/{protocol}/seed{seed}")
    cells = {
        (d.name, p): [read_predictions(pred_dir / predictions_name(d.name, p, s)) for s in suite.seeds]
        for d in suite.datasets
        for p in protocols
    }
    rows = aggregate(cells)
    notes = [n for d in suite.datasets for n in _dataset_notes(out, d.name)]
    if state.is_main_process:
        write_csv(out / "results.csv", rows)
        (out / "results.md").write_text(markdown(rows, notes), encoding="utf-8")
        plot(out / "results_auroc.png", rows)
        _templates_table(out, suite, pred_dir)
        record_benchmark(model_dir, model, markdown(rows, []), len(suite.seeds))  # the model card's section
    return {"ran": ran, "reused": reused, "rows": rows, "notes": notes, "leaks": leaks}


def _write_dataset_record(out: Path, name: str, bset: Any, leaked: list[str] | None) -> None:
    """OUT/datasets/<name>.json: what the reader left out and, with --shards, the leaked rows, so that
    results.md states them on a resumed run too."""
    record = {
        "rows": len(bset.lset),
        "classes": list(bset.lset.classes),
        "missing_labels": bset.lset.missing_labels(),
        "excluded": bset.excluded,
        "leaked": leaked,
    }
    (out / "datasets").mkdir(parents=True, exist_ok=True)
    (out / "datasets" / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def _dataset_notes(out: Path, name: str) -> list[str]:
    path = out / "datasets" / f"{name}.json"
    if not path.is_file():
        return []
    record = json.loads(path.read_text(encoding="utf-8"))
    notes = []
    missing = record["missing_labels"]
    if missing["dropped"]:
        notes.append(
            f"{name}: {missing['dropped']} rows without a label left out (first {missing['rows'][0]})"
        )
    notes += [f"{name}: {count} rows excluded ({reason})" for reason, count in record["excluded"].items()]
    if record["leaked"]:
        notes.append(
            f"{name}: {len(record['leaked'])} evaluation images were in the pretraining shards "
            f"(first {record['leaked'][0]})"
        )
    return notes


def _write_extra(path: Path, extra: list[dict[str, Any]], protocol: str) -> None:
    if protocol != "zero_shot":
        path.write_text(json.dumps(extra, indent=1) + "\n")
        return
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["language", "template", "auroc"])
        writer.writeheader()
        writer.writerows(extra)


def _templates_table(out: Path, suite: Suite, pred_dir: Path) -> None:
    """zero_shot_templates.md: per dataset, each template's AUROC averaged over seeds."""
    if "zero_shot" not in suite.protocols:
        return
    lines = ["| dataset | language | template | auroc (mean over seeds) |", "|---|---|---|---|"]
    for spec in suite.datasets:
        per: dict[tuple[str, str], list[float]] = {}
        for seed in suite.seeds:
            side = pred_dir / predictions_name(spec.name, "zero_shot", seed).replace(".csv", "_templates.csv")
            with side.open(newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    if row["auroc"] not in ("", "None"):
                        per.setdefault((row["language"], row["template"]), []).append(float(row["auroc"]))
        for (language, template), values in per.items():
            lines.append(f"| {spec.name} | {language} | {template} | {sum(values) / len(values):.3f} |")
    (out / "zero_shot_templates.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="retclip-eval benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", required=True, help="suite YAML (seeds, protocols, datasets)")
    parser.add_argument("--model", required=True, help="directory written by RetClip.save_pretrained")
    add_output_dir(parser, help="results, predictions/ and the run record", old=("--out_dir",))
    parser.add_argument("--shards", help="pretraining shard set: report evaluation images found in it")
    parser.add_argument("--strict", action="store_true", help="with --shards: refuse to run on a leak")
    parser.add_argument(
        "--shards-key",
        metavar="KEYFILE",
        help="with --shards of a --pseudonymise set: the data owner's key file its source hashes are keyed with",
    )
    args = parser.parse_args(argv)
    if args.strict and not args.shards:
        print(
            "retclip-eval benchmark: error: --strict refuses leaked images, so it needs --shards",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if args.shards_key and not args.shards:
        print(
            "retclip-eval benchmark: error: --shards-key is the key of --shards; give both", file=sys.stderr
        )
        return EXIT_CONFIG
    try:
        summary = run_benchmark(
            load_suite(args.suite), args.model, args.output_dir, args.shards, args.strict, args.shards_key
        )
    except (ConfigError, LabelError, ValueError, OSError) as exc:
        print(f"retclip-eval benchmark: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if PartialState().is_main_process:
        print((Path(args.output_dir) / "results.md").read_text(encoding="utf-8"))
        print(f"cells run: {len(summary['ran'])}, reused: {len(summary['reused'])}")
    return EXIT_OK
