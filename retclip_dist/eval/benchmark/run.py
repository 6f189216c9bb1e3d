"""``retclip-eval benchmark --suite suite.yaml [--model ...] --output_dir OUT``: run every model x dataset x
protocol x seed of the suite (skipping cells whose predictions file exists) and write the table from all
of them.

OUT/benchmark.json records each model's weight hash and options and the suite's settings; a rerun into
the same OUT with other weights under a model's name, or other settings, is refused, so finished cells
are only ever reused for the run that made them. Adding models, seeds, protocols or datasets is fine:
only the new cells run.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import logging
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from retclip_dist.cli_args import add_output_dir
from retclip_dist.config import ConfigError, parse_yaml
from retclip_dist.eval.benchmark import protocols as P
from retclip_dist.eval.benchmark.layouts import BenchSet, layout_options, read_dataset
from retclip_dist.eval.benchmark.prompts import load_pack, pack_path
from retclip_dist.eval.benchmark.results import (
    DIFFERENCE_COLUMNS,
    ModelNote,
    Predictions,
    Scores,
    aggregate,
    markdown,
    paired_differences,
    plot,
    predictions_name,
    read_predictions,
    write_csv,
    write_predictions,
)
from retclip_dist.eval.benchmark.splits import split_for_seed, split_indices
from retclip_dist.eval.benchmark.suite import DatasetSpec, ModelSpec, Suite, check_models, load_suite
from retclip_dist.eval.data import LabelError
from retclip_dist.eval.models.registry import Resolved, resolve
from retclip_dist.exit_codes import EXIT_CONFIG, EXIT_OK
from retclip_dist.model.card import record_benchmark
from retclip_dist.runtime.env import accelerator_placement

log = logging.getLogger(__name__)
RECORD = "benchmark.json"
MODELS_DIR = "models"  # OUT/models/<name>.json: what results.md states about each model, written when loaded
# Fields of a --model key=value list (options go as options.KEY=VALUE).
_CLI_FIELDS = ("name", "kind", "path", "arch")


def cell_protocols(suite: Suite) -> list[str]:
    """Column names of the table: few_shot expands to few_shot_<k> per shot count."""
    out = []
    for protocol in suite.protocols:
        out.extend([f"few_shot_{k}" for k in suite.few_shot.shots] if protocol == "few_shot" else [protocol])
    return out


def model_protocols(resolved: Resolved, protocols: list[str]) -> list[str]:
    """The columns ``resolved`` has: an image-only model has no zero_shot."""
    declared = resolved.adapter.protocols()
    return [p for p in protocols if ("few_shot" if p.startswith("few_shot_") else p) in declared]


def _top_level_parts(text: str) -> list[str]:
    """``text`` split at commas outside YAML flow brackets, so ``options.kwargs={a: 1, b: 2}`` is one."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def parse_model_arg(text: str) -> ModelSpec:
    """One --model: ``PATH`` or ``NAME=PATH`` (ours, kind retclip; name "retclip" by default), or
    ``name=N,kind=K,path=P[,arch=A][,options.KEY=VALUE...]`` for any kind (name defaults to the kind)."""
    first = text.split("=", 1)[0]
    if "=" in text and (first in _CLI_FIELDS or first.startswith("options.")):
        fields: dict[str, str] = {}
        options: dict[str, Any] = {}
        for part in _top_level_parts(text):
            key, sep, value = part.partition("=")
            if not sep:
                raise ConfigError(f"--model {text}: {part!r} is not key=value")
            if key.startswith("options."):
                options[key[len("options.") :]] = parse_yaml(value)
            elif key in _CLI_FIELDS:
                fields[key] = value
            else:
                raise ConfigError(
                    f"--model {text}: unknown key {key!r}; use {list(_CLI_FIELDS)} or options.KEY"
                )
        fields.setdefault("kind", "retclip")
        fields.setdefault("name", fields["kind"])
        return ModelSpec(**fields, options=options)
    name, sep, path = text.partition("=")
    return ModelSpec(name=name, path=path) if sep else ModelSpec(name="retclip", path=text)


def _record(suite: Suite, models: list[Resolved]) -> dict[str, Any]:
    settings = {
        k: v
        for k, v in asdict(suite).items()
        if k not in ("seeds", "protocols", "datasets", "models", "device", "batch_size")
    }
    return {
        "settings": settings,
        "datasets": {d.name: asdict(d) for d in suite.datasets},
        "models": {m.spec.name: m.record() for m in models},
    }


def _check_record(out: Path, record: dict[str, Any]) -> None:
    path = out / RECORD
    if path.is_file():
        old = json.loads(path.read_text())
        if "models" not in old:
            raise ConfigError(
                f"{path}: written by an earlier retclip-eval (one model, no model column); use a new --output_dir"
            )
        if old.get("settings") != record["settings"]:
            raise ConfigError(
                f"{path}: settings differ from this run's; use a new --output_dir for other settings"
            )
        for section, what in (("datasets", "dataset"), ("models", "model")):
            for name, spec in record[section].items():
                before = old[section].get(name)
                # A model without a finished cell (its first load failed, say) may change freely.
                done = section == "datasets" or any((out / "predictions" / name).glob("*.csv"))
                if before is not None and before != spec and done:
                    changed = sorted(k for k in spec if before.get(k) != spec[k])
                    raise ConfigError(
                        f"{path}: {what} {name} was run with other {', '.join(changed)}; rename it or use a new "
                        "--output_dir"
                    )
            record = {**record, section: {**old[section], **record[section]}}
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


def _packs(suite: Suite, models: list[Resolved], protocols: list[str]) -> dict[tuple[str, str], str]:
    """(model, dataset) -> prompt pack of every zero-shot cell: the model's own pack for the dataset, else
    the dataset's; each is read once here, so a broken pack fails before any work."""
    packs = {}
    for m in models:
        if "zero_shot" in model_protocols(m, protocols):
            for d in suite.datasets:
                packs[m.spec.name, d.name] = m.spec.prompts.get(d.name) or pack_path(d)
    for path in set(packs.values()):
        load_pack(path)
    return packs


def _release_memory() -> None:
    """After a model's last cell: its weights and images go before the next model loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_benchmark(
    suite: Suite,
    out_dir: str,
    shards: str | None = None,
    strict: bool = False,
    shards_key: str | None = None,
) -> dict[str, Any]:
    """Run the missing cells of every model of ``suite.models``, then write results.csv, differences.csv,
    results.md, results.png; returns a summary (its rows and differences on the main process only)."""
    for spec in suite.datasets:
        layout_options(spec)  # a typo in a dataset's options fails before any work
    if not suite.models:
        raise ConfigError("no model to benchmark: give --model or models: in the suite file")
    models = [resolve(m, f"models[{i}]") for i, m in enumerate(suite.models)]
    if not any(model_protocols(m, cell_protocols(suite)) for m in models):
        raise ConfigError(
            "protocols: every model is image-only and zero_shot is the only protocol: nothing to run"
        )
    state = PartialState(**accelerator_placement(torch.cuda.is_available()))
    out = Path(out_dir)
    if state.is_main_process:
        _check_record(out, _record(suite, models))
    state.wait_for_everyone()
    pred_dir = out / "predictions"
    protocols = cell_protocols(suite)
    packs = _packs(suite, models, protocols)
    # Under accelerate launch each process embeds on its own device (state.device), not all on cuda:0.
    device = state.device if suite.device == "auto" else torch.device(suite.device)
    bsets: dict[str, BenchSet] = {}
    leaks: dict[str, list[str]] = {}

    def dataset(spec: DatasetSpec) -> BenchSet:
        if spec.name not in bsets:
            bsets[spec.name] = read_dataset(spec)
            if shards is not None:
                from retclip_dist.eval.benchmark.leakage import check_leakage

                leaks[spec.name] = check_leakage(bsets[spec.name], shards, strict, shards_key)
            if state.is_main_process:
                _write_dataset_record(out, spec.name, bsets[spec.name], leaks.get(spec.name))
        return bsets[spec.name]

    if shards is not None:
        for spec in suite.datasets:  # --strict refuses a leak before any cell runs
            dataset(spec)
    ran: list[str] = []
    reused: list[str] = []
    skipped = [
        f"{m.spec.name}/{d.name}/{p}"
        for m in models
        for d in suite.datasets
        for p in protocols
        if p not in model_protocols(m, protocols)
    ]
    for m in models:
        name = m.spec.name
        mine = model_protocols(m, protocols)
        todo = {
            d.name: [
                (p, s)
                for p in mine
                for s in suite.seeds
                if not (pred_dir / name / predictions_name(d.name, p, s)).is_file()
            ]
            for d in suite.datasets
        }
        reused += [
            f"{name}/{d.name}/{p}/seed{s}"
            for d in suite.datasets
            for p in mine
            for s in suite.seeds
            if (p, s) not in todo[d.name]
        ]
        if not any(todo.values()):
            continue
        model = m.load(device)
        if state.is_main_process:
            (out / MODELS_DIR).mkdir(parents=True, exist_ok=True)
            (out / MODELS_DIR / f"{name}.json").write_text(json.dumps(model.describe(), indent=1) + "\n")
        for spec in suite.datasets:
            if not todo[spec.name]:
                continue
            ctx = P.DatasetContext(dataset(spec), model, suite.batch_size)
            for protocol, seed in todo[spec.name]:
                log.info("%s: %s: %s seed %d", name, spec.name, protocol, seed)
                file = predictions_name(spec.name, protocol, seed)
                checkpoints = out / "checkpoints" / name / Path(file).stem
                pack = packs.get((name, spec.name))
                pred, extra = _run_cell(ctx, suite, protocol, seed, pack, checkpoints)
                if state.is_main_process:
                    path = pred_dir / name / file
                    path.parent.mkdir(parents=True, exist_ok=True)
                    if extra:
                        side = path.with_name(
                            path.stem + ("_templates.csv" if protocol == "zero_shot" else "_history.json")
                        )
                        _write_extra(side, extra, protocol)
                    write_predictions(path, pred)  # last: its existence marks the cell finished
                    shutil.rmtree(checkpoints, ignore_errors=True)  # an interrupted fine-tune resumes from it
                state.wait_for_everyone()
                ran.append(f"{name}/{spec.name}/{protocol}/seed{seed}")
            del ctx  # its decoded images: the next dataset's replace them
        del model
        _release_memory()
    rows: list[dict[str, object]] = []
    differences: list[dict[str, object]] = []
    notes = [n for d in suite.datasets for n in _dataset_notes(out, d.name)]
    if state.is_main_process:  # the bootstraps are the costly part: once, not once per process
        scores = Scores(
            {
                (m.spec.name, d.name, p): [
                    read_predictions(pred_dir / m.spec.name / predictions_name(d.name, p, s))
                    for s in suite.seeds
                ]
                for m in models
                for d in suite.datasets
                for p in model_protocols(m, protocols)
            }
        )
        rows = aggregate(scores)
        differences = paired_differences(scores, models[0].spec.name)
        write_csv(out / "results.csv", rows)
        write_csv(out / "differences.csv", differences, DIFFERENCE_COLUMNS)
        text = markdown(rows, differences, protocols, [_model_note(out, m) for m in models], notes)
        (out / "results.md").write_text(text, encoding="utf-8")
        plot(out / "results.png", rows, protocols, [m.spec.name for m in models])
        _templates_table(out, suite, models, protocols, pred_dir)
        for m in models:  # our saved models get their own rows in their model card
            if m.spec.kind == "retclip":
                mine = [r for r in rows if r["model"] == m.spec.name]
                note = _model_note(out, m)  # its weights by digest only: the card names no path
                note = replace(note, weights=note.weights.rsplit("(", 1)[-1].rstrip(")"))
                table = markdown(mine, [], protocols, [note], [])
                record_benchmark(m.spec.path, table, len(suite.seeds))
    return {
        "ran": ran,
        "reused": reused,
        "skipped": skipped,
        "rows": rows,
        "differences": differences,
        "notes": notes,
        "leaks": leaks,
    }


def _model_note(out: Path, m: Resolved) -> ModelNote:
    """What results.md says about a model: from OUT/models/<name>.json, written when it was loaded."""
    path = out / MODELS_DIR / f"{m.spec.name}.json"
    described = json.loads(path.read_text()) if path.is_file() else {}
    record = json.loads((out / RECORD).read_text())["models"][m.spec.name]
    return ModelNote(
        name=m.spec.name,
        kind=m.spec.kind + (f" {m.spec.arch}" if m.spec.arch else ""),
        weights=f"{m.spec.path} (sha256 {record['sha256'][:12]})",
        preprocessing=described.get("preprocessing", "?"),
        features=described.get("features", "?"),
        zero_shot=described.get("zero_shot", "?"),
        image_only=not m.adapter.text,
    )


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


def _templates_table(
    out: Path, suite: Suite, models: list[Resolved], protocols: list[str], pred_dir: Path
) -> None:
    """zero_shot_templates.md: per model and dataset, each template's AUROC averaged over seeds."""
    lines = ["| model | dataset | language | template | auroc (mean over seeds) |", "|---|---|---|---|---|"]
    for m in models:
        if "zero_shot" not in model_protocols(m, protocols):
            continue
        for spec in suite.datasets:
            per: dict[tuple[str, str], list[float]] = {}
            for seed in suite.seeds:
                name = predictions_name(spec.name, "zero_shot", seed).replace(".csv", "_templates.csv")
                with (pred_dir / m.spec.name / name).open(newline="", encoding="utf-8") as fh:
                    for row in csv.DictReader(fh):
                        if row["auroc"] not in ("", "None"):
                            per.setdefault((row["language"], row["template"]), []).append(float(row["auroc"]))
            for (language, template), values in per.items():
                lines.append(
                    f"| {m.spec.name} | {spec.name} | {language} | {template} | {sum(values) / len(values):.3f} |"
                )
    if len(lines) > 2:
        (out / "zero_shot_templates.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="retclip-eval benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", required=True, help="suite YAML (models, seeds, protocols, datasets)")
    parser.add_argument(
        "--model",
        action="append",
        metavar="SPEC",
        help="a model to compare, replacing the suite's models (repeat for several; the first is the "
        "baseline): PATH or NAME=PATH of a save_pretrained directory, or "
        "name=N,kind=K,path=P[,arch=A][,options.KEY=VALUE]",
    )
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
        suite = load_suite(args.suite)
        if args.model:
            if suite.models:
                log.info("--model replaces the %d models of %s", len(suite.models), args.suite)
            suite.models = [parse_model_arg(text) for text in args.model]
            check_models(suite.models, "--model")
        summary = run_benchmark(suite, args.output_dir, args.shards, args.strict, args.shards_key)
    except (ConfigError, LabelError, ValueError, OSError) as exc:
        print(f"retclip-eval benchmark: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if PartialState().is_main_process:
        print((Path(args.output_dir) / "results.md").read_text(encoding="utf-8"))
        print(
            f"cells run: {len(summary['ran'])}, reused: {len(summary['reused'])}, "
            f"n/a (image-only): {len(summary['skipped'])}"
        )
    return EXIT_OK
