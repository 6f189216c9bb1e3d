"""The docs are true: README.md and docs/*.md link only to pages and headings that exist, and every shell
command in them either runs here as written or is parsed by the tool it names, with the reason it is not
run written down below. The Python blocks run in tests/test_api.py and tests/test_export.py."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from retclip_dist import synth
from retclip_dist.config import load_config
from retclip_dist.eval.benchmark.layouts import READERS, layout_options
from retclip_dist.eval.benchmark.suite import load_suite
from retclip_dist.eval.cli import main as eval_main
from retclip_dist.eval.models.registry import ADAPTERS
from retclip_dist.exit_codes import EXIT_OK
from retclip_dist.launch.submit import parse_args as submit_args
from retclip_dist.shards.cli import main as shards_main
from retclip_dist.shardset import PSEUDONYMISED_FIELD
from retclip_dist.train.cli import main as train_main
from retclip_dist.train.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Also linked to and from the pages; their links are held to the same rule.
OTHER_PAGES = [ROOT / "shards" / "README.md", ROOT / "TESTING.md", ROOT / "BENCHMARKS.md"]

FENCE = re.compile(r"^ *```(\S*)\s*$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`[^`]*`")


# --- reading markdown -------------------------------------------------------------------------------------


def fenced_blocks(text: str) -> Iterator[tuple[str, int, list[str]]]:
    """(language, line number of the opening fence, body lines) of every fenced block."""
    lang, start, body = None, 0, []
    for n, line in enumerate(text.split("\n"), 1):
        m = FENCE.match(line)
        if m and lang is None:
            lang, start, body = m.group(1), n, []
        elif m:
            yield lang, start, body
            lang = None
        elif lang is not None:
            body.append(line)


def prose(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced blocks."""
    inside = False
    for n, line in enumerate(text.split("\n"), 1):
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (word characters, spaces and hyphens
    stay), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    out, seen = set(), {}
    for _, line in prose(text):
        m = re.match(r"#{1,6} +(.*)", line)
        if m:
            base = slug(m.group(1))
            out.add(f"{base}-{seen[base]}" if base in seen else base)
            seen[base] = seen.get(base, 0) + 1
    return out


def link_problems(page: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of ``page`` whose file or heading does not exist, as ``page:line: target``."""
    problems = []
    for n, line in prose(page.read_text(encoding="utf-8")):
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            path = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.relative_to(root)}:{n}: {target}"
            if not path.exists():
                problems.append(f"{where} (no such file)")
            elif anchor and (path.suffix != ".md" or anchor not in anchors(path.read_text(encoding="utf-8"))):
                problems.append(f"{where} (no such heading)")
    return problems


# --- links ------------------------------------------------------------------------------------------------


def test_slugs_are_githubs():
    # Anchors GitHub gives these headings (punctuation dropped, each space one hyphen, underscores kept).
    assert slug("DICOM exports: `--dicom`") == "dicom-exports---dicom"
    assert slug("In Python: `retclip_dist.load`") == "in-python-retclip_distload"
    assert slug("Speed switches (issue 16)") == "speed-switches-issue-16"
    assert slug("Recipes: the release's run and ours") == "recipes-the-releases-run-and-ours"
    assert anchors("# A\n\n## A\n\n```text\n## B\n```\n") == {
        "a",
        "a-1",
    }  # a repeat gets -1; code is no heading


def test_link_check_finds_a_missing_file_a_missing_heading_and_a_link_to_code(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## Here it is\n")
    (tmp_path / "docs" / "code.py").write_text("")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#here-it-is) [ok](#page) [ok](https://example.org/x#y) `[no](nowhere.md)`\n"
        "[bad](missing.md) [bad](#nowhere) [bad](other.md#there) [bad](code.py#top)\n"
        "```text\n[not a link](missing.md)\n```\n"
    )
    found = link_problems(page, root=tmp_path)
    assert [p.split(": ", 1)[1] for p in found] == [
        "missing.md (no such file)",
        "#nowhere (no such heading)",
        "other.md#there (no such heading)",
        "code.py#top (no such heading)",
    ]
    assert all(p.startswith("docs/page.md:4: ") for p in found)


@pytest.mark.parametrize("page", PAGES + OTHER_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    assert link_problems(page) == []


def test_every_page_is_on_the_front_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert [p for p in PAGES[1:] if f"](docs/{p.name})" not in readme] == []


def test_docs_named_in_code_and_comments_exist():
    """A comment, docstring, config or test that sends the reader to docs/X.md names a page that exists."""
    files = [p for p in ROOT.iterdir() if p.is_file()]
    for folder in ("retclip_dist", "tests", "configs", "launch", "tools", "bench", "shards", "docs", ".ci"):
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    named = set()
    for path in files:
        if path == Path(__file__):  # its own examples
            continue
        with contextlib.suppress(UnicodeDecodeError, OSError):
            text = path.read_text(encoding="utf-8")
            named |= {(doc, str(path.relative_to(ROOT))) for doc in re.findall(r"docs/[\w-]+\.md", text)}
    assert named, "no file names a docs page (the pattern broke?)"
    assert sorted(f"{where}: {doc}" for doc, where in named if not (ROOT / doc).is_file()) == []


def test_every_fenced_block_names_its_language():
    """Shell blocks are ```bash (the commands below read them), output and listings ```text."""
    untagged = [
        f"{page.name}:{start}"
        for page in PAGES
        for lang, start, _ in fenced_blocks(page.read_text())
        if not lang
    ]
    assert untagged == []


# --- shell commands ---------------------------------------------------------------------------------------


def shell_commands() -> list[tuple[str, str]]:
    """(page:line, command) of every command in the pages' bash blocks: continuation lines joined,
    comments dropped."""
    out = []
    for page in PAGES:
        for lang, start, body in fenced_blocks(page.read_text(encoding="utf-8")):
            if lang != "bash":
                continue
            joined = "\n".join(body).replace("\\\n", " ")
            for i, line in enumerate(joined.split("\n")):
                command = re.sub(r"(^|\s)#.*$", "", line).strip()
                if command:
                    out.append((f"{page.relative_to(ROOT)}:{start + 1 + i}", " ".join(command.split())))
    return out


def argv_of(command: str) -> list[str]:
    """The words of a documented command with its placeholders read as the docs mean them: ``...`` (more
    of the same) dropped, an optional ``[--flag X]`` given, the first of ``a|b|c`` chosen, leading
    ``VAR=value`` assignments dropped."""
    words = []
    for word in shlex.split(command):
        word = word.strip("[]")
        if word in ("", "..."):
            continue
        if "|" in word and not word.startswith("s3:"):
            word = word.split("|")[0]
        words.append(word)
    while words and re.match(r"[A-Z_]+=", words[0]):
        words.pop(0)
    return words


class _Parsed(Exception):
    pass


@contextlib.contextmanager
def parse_only(monkeypatch):
    """A tool's main() parses its arguments with argparse and stops there (raising _Parsed)."""
    original = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
    try:
        yield
    finally:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)


def _argparse_accepts(main, argv: list[str], monkeypatch) -> None:
    with parse_only(monkeypatch), pytest.raises(_Parsed):
        main(argv)


def _trainer_accepts(argv: list[str]) -> None:
    """retclip-train reads the config and every override (keys and types) and prints the result."""
    assert train_main([*argv, "--print-config"]) == EXIT_OK


def check_parses(argv: list[str], monkeypatch) -> None:
    """The command's program takes these arguments (the files it names in this repository exist)."""
    program, args = argv[0], argv[1:]
    if program == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        assert set(args) <= set(targets), f"no Makefile target {set(args) - set(targets)}"
    elif program == "make-shards":
        _argparse_accepts(shards_main, args, monkeypatch)
    elif program == "retclip-eval" and args[0] in ("benchmark", "export", "convert-release"):
        _argparse_accepts(eval_main, args, monkeypatch)
    elif program == "retclip-eval":
        assert eval_main([*args, "--print-config"]) == EXIT_OK
    elif program == "retclip-train":
        launch = args[args.index("--launch") + 1]
        assert (ROOT / launch).is_file(), launch
        _trainer_accepts(args)
    elif argv[:2] == ["accelerate", "launch"]:
        config_file = args[args.index("--config_file") + 1]
        assert (ROOT / config_file).is_file(), config_file
        module = args.index("-m")
        assert args[module + 1] == "retclip_dist.train"
        _trainer_accepts(args[module + 2 :])
    elif program == "sbatch":
        script = next(i for i, a in enumerate(args) if a.endswith(".sh"))
        assert (ROOT / args[script]).is_file(), args[script]
        _trainer_accepts(["--config", *args[script + 1 :]])
    elif argv[:3] == ["python", "-m", "retclip_dist.launch.submit"]:
        parsed = submit_args(argv[3:])
        _trainer_accepts(["--config", parsed.config, *parsed.overrides])
    elif program == "sudo":
        assert (ROOT / args[0]).is_file(), args[0]
    elif program in ("openssl", "mkdir"):
        pass  # system tools: run (openssl) or listed in NOT_RUN
    else:
        raise AssertionError(f"no check for {program!r}: add one to tests/test_docs.py")


# Commands run here as written, in this order, by test_shard_commands_run_as_written (in a folder laid out
# as they assume).
RUN_HERE = [
    "make-shards build --manifest patients.csv --images images.zip --output_dir shards/cohort-v1 "
    "--val-fraction 0.02",
    "make-shards verify shards/cohort-v1",
    "openssl rand -hex 32 > /secure/pseudonym.key",
    "make-shards build --manifest patients.csv --images images.zip --output_dir shards/cohort-v1-ext "
    "--pseudonymise /secure/pseudonym.key --crop fundus --scrub-reports --identifier-columns name,mrn",
    "make-shards audit shards/cohort-v1-ext --manifest patients.csv --identifier-columns name,mrn",
    "make-shards audit shards/cohort-v1-ext --manifest patients.csv --identifier-columns name,mrn "
    "[--pattern REGEX ...]",
]

# Every other command, with why it is not run here (each is still parsed by check_parses).
_WEIGHTS = "needs the CLIP ViT-B/16 and Chinese-RoBERTa weights and a cohort's shards"
NOT_RUN = {
    "make demo": "tests/test_demo.py runs the demo module that the Makefile's demo target runs",
    "make test": "it is the suite this test belongs to",
    "sbatch": "needs a Slurm cluster with GPU nodes and " + _WEIGHTS + "; tests/test_slurm.py runs "
    "launch/pretrain.sh on the local one-node Slurm with configs/tiny.yaml",
    "RETCLIP_REQUEUE_SIGNAL=USR1 sbatch": "as sbatch; tests/test_slurm.py and tests/test_stop_signals.py "
    "run the USR1 requeue signal",
    "python -m retclip_dist.launch.submit": "submits to a Slurm cluster with GPU nodes; tests/test_submit.py "
    "submits configs/tiny.yaml to the local Slurm",
    "accelerate launch": "needs 8 GPUs and " + _WEIGHTS,
    "retclip-train --launch": "needs 8 GPUs and " + _WEIGHTS,
    "mkdir -p logs": "creates the folder sbatch writes its log to; nothing to check",
    "sudo launch/local_slurm.sh start": "installs Slurm from Debian packages as root; .ci/run runs it before "
    "the suite",
    "GPUS_PER_NODE=2 ACCELERATE_CONFIG=configs/accelerate/cpu_2proc.yaml sbatch": "needs the local Slurm and "
    "make demo's shards; tests/test_slurm.py runs this sbatch on the local cluster with a tiny shard set",
    "make-shards build --manifest patients.csv --images images.zip --output_dir shards/cohort-v1 --workers 8": (
        "the README's build with 8 workers; the same build runs here (tests/test_shards_build.py: the output "
        "does not depend on --workers)"
    ),
    "make-shards build --retclip-dir": "reads the original release under /data; tests/test_shards_sources.py "
    "builds from a look-alike",
    "make-shards build --dicom": "reads a PACS export under /data; tests/test_shards_dicom.py builds from a "
    "synthetic DICOM export",
    "retclip-eval": "needs a trained model and a labelled image set at the paths shown; the evaluation tests "
    "(tests/test_eval_commands.py, test_eval_benchmark_e2e.py, test_export.py, test_convert.py) run each "
    "command on a tiny model",
}


def _not_run_reason(command: str) -> str | None:
    return next((why for prefix, why in NOT_RUN.items() if command.startswith(prefix)), None)


COMMANDS = shell_commands()


def test_make_demo_is_what_the_demo_test_runs():
    """``make demo`` is not run here: tests/test_demo.py runs the module its Makefile recipe runs."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n\t(.*)$", makefile, re.M).group(1)
    assert recipe.endswith("-m retclip_dist.demo --output_dir demo")
    assert '"-m", "retclip_dist.demo", "--output_dir"' in (ROOT / "tests" / "test_demo.py").read_text()


def test_every_command_is_run_or_has_a_reason():
    assert len(COMMANDS) > 20  # the blocks were found
    assert [(w, c) for w, c in COMMANDS if c not in RUN_HERE and _not_run_reason(c) is None] == []
    missing = set(RUN_HERE) - {c for _, c in COMMANDS}
    assert missing == set(), "run here but no longer in the docs: update RUN_HERE"


@pytest.mark.parametrize("command", [c for _, c in COMMANDS], ids=[w for w, _ in COMMANDS])
def test_command_parses(command, monkeypatch, capsys):
    check_parses(argv_of(command), monkeypatch)


def test_parse_check_refuses_what_the_tools_refuse(monkeypatch, capsys):
    """A misspelt flag, an unknown config key, a missing config file or Makefile target fails the check."""
    for bad in (
        "make-shards build --manifest p.csv --images i.zip --output_dir o --val-fractoin 0.02",
        "retclip-eval export --model m --format onnx --output_dir o",
        "retclip-eval linear-probe --model m --data.tabel labels.csv --output_dir o",
        "sbatch --nodes 4 launch/pretrain.sh configs/retclip_vitb16.yaml --data.shard s",
        "accelerate launch --config_file configs/accelerate/none.yaml -m retclip_dist.train --config x.yaml",
        "python -m retclip_dist.launch.submit --config configs/retclip_vitb16.yaml -- --train.lrr 1",
        "make dmeo",
    ):
        with pytest.raises((AssertionError, SystemExit)):
            check_parses(argv_of(bad), monkeypatch)


@pytest.mark.slow
def test_shard_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """The README's build, verify, and the three commands of "Taking shards off site", in a folder with a
    synthetic hospital export (names and record numbers in the table, the photos and the reports)."""
    synth.write_raw_archive(tmp_path, 12, image_size=256, identifying=True)
    with (tmp_path / "patients.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with (tmp_path / "patients.csv").open("w", newline="", encoding="utf-8") as f:  # the docs' column name
        fields = ["name" if k == "patient_name" else k for k in rows[0]]
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows([{("name" if k == "patient_name" else k): v for k, v in r.items()} for r in rows])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secure").mkdir()
    assert set(RUN_HERE) <= {c for _, c in COMMANDS}
    for command in RUN_HERE:
        command = command.replace("/secure/", "secure/")  # the hospital's secure folder, here
        argv = argv_of(command)
        if argv[0] == "openssl":
            if shutil.which("openssl") is None:
                pytest.skip("openssl is not installed")
            subprocess.run(command, shell=True, check=True, timeout=60)
            continue
        code = shards_main(argv[1:])
        assert code == EXIT_OK, (command, capsys.readouterr())
    assert len((tmp_path / "secure" / "pseudonym.key").read_text().strip()) == 64
    plain, ext = (
        json.loads((tmp_path / d / "manifest.json").read_text())
        for d in ("shards/cohort-v1", "shards/cohort-v1-ext")
    )
    assert plain[PSEUDONYMISED_FIELD] is False and ext[PSEUDONYMISED_FIELD] is True
    # The same patients in each split with or without --pseudonymise (the split is drawn on the original id).
    assert {s: v["samples"] for s, v in plain["splits"].items()} == {
        s: v["samples"] for s, v in ext["splits"].items()
    }


# --- YAML blocks ------------------------------------------------------------------------------------------


def _yaml_blocks(page: str) -> list[str]:
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    return ["\n".join(body) + "\n" for lang, _, body in fenced_blocks(text) if lang == "yaml"]


def test_yaml_blocks_are_all_checked_below():
    found = {p.name: len(_yaml_blocks(p.name)) for p in PAGES[1:] if _yaml_blocks(p.name)}
    assert found == {"training.md": 1, "evaluation.md": 1}  # a new block: add its check here


def test_training_yaml_block_is_a_run_config(tmp_path, capsys):
    """The val.probe example read as a preset: every key exists and has its type, the probe is on."""
    (block,) = _yaml_blocks("training.md")
    (tmp_path / "probe.yaml").write_text(block)
    cfg = load_config(RunConfig, tmp_path / "probe.yaml")
    assert cfg.val.probe.labels == ["DR", "ARMD", "MH"] and cfg.checkpoint.keep_best == "probe/auroc"


def test_suite_yaml_block_is_a_suite(tmp_path):
    """The benchmark's example suite loads (every key, type and rule of a suite file), names only model
    kinds and layouts that exist, with options those layouts take, and prompt packs in configs/."""
    (block,) = _yaml_blocks("evaluation.md")
    (tmp_path / "suite.yaml").write_text(block)
    suite = load_suite(tmp_path / "suite.yaml")
    assert {m.kind for m in suite.models} <= set(ADAPTERS)
    assert {d.layout for d in suite.datasets} <= set(READERS)
    for ds in suite.datasets:
        layout_options(ds)
    shipped = [d.prompts for d in suite.datasets if d.prompts and "configs/prompts/" in d.prompts]
    # Relative to the suite file, which the docs keep at the repository's root.
    assert shipped and all((ROOT / Path(p).relative_to(tmp_path)).is_file() for p in shipped)


# --- headings people link to ------------------------------------------------------------------------------

# Every heading of the README before it became a front page, and the page that holds it now: links from
# outside (wikis, issues, bookmarks) find the section by the same heading, on its new page.
MOVED = {
    "Start here": "README.md",
    "Building shards from your archive: `make-shards`": "docs/shards.md",
    "DICOM exports: `--dicom`": "docs/shards.md",
    "Taking shards off site": "docs/shards.md",
    "Training: `retclip-train`": "docs/training.md",
    "A downstream check while pretraining: `val.probe`": "docs/training.md",
    "Continuing from a model, locking towers, identical reports": "docs/training.md",
    "Model and loss": "docs/training.md",
    "Speed switches (issue 16)": "docs/performance.md",
    "Finding the slow rank": "docs/performance.md",
    "Training data path": "docs/training.md",
    "A job never stalls": "docs/training.md",
    "Running on a cluster": "docs/cluster.md",
    "Docker": "docs/install.md",
    "Evaluating a model: `retclip-eval`": "docs/evaluation.md",
    "The downstream table: `retclip-eval benchmark`": "docs/evaluation.md",
    "The model card": "docs/evaluation.md",
    "Exporting: `retclip-eval export`": "docs/evaluation.md",
    "In Python: `retclip_dist.load`": "docs/evaluation.md",
    "What happens when": "docs/training.md",
    "Layout": "docs/layout.md",
    "Benchmarks": "docs/performance.md",
    "Tests": "docs/layout.md",
}


def test_the_old_readme_headings_are_kept_on_their_new_pages():
    missing = [
        f"{page}#{slug(heading)}"
        for heading, page in MOVED.items()
        if slug(heading) not in anchors((ROOT / page).read_text(encoding="utf-8"))
    ]
    assert missing == []
