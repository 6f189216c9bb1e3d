"""make-shards build flags are generated from BuildOptions: the flag names stay what users type, every
field gets one, its comment is the help, and parsing gives back exactly the options typed."""

import argparse
from dataclasses import dataclass, field

import pytest

from retclip_dist.shards import cli
from retclip_dist.shards.build import BuildOptions
from retclip_dist.shards.dicom import DicomOptions
from retclip_dist.shards.images import ImageOptions

# The interface users and scripts rely on (flag -> BuildOptions field path); it must not drift.
FLAGS = {
    "--output_dir": "out",
    "--manifest": "manifest",
    "--images": "images",
    "--retclip-dir": "retclip_dir",
    "--dicom": "dicom.root",
    "--reports": "dicom.reports",
    "--report-key": "dicom.report_key",
    "--dicom-visit": "dicom.visit",
    "--write-manifest": "dicom.write_manifest",
    "--split": "split",
    "--val-fraction": "val_fraction",
    "--image-size": "image.size",
    "--resize": "image.resize",
    "--jpeg-quality": "image.quality",
    "--min-side": "image.min_side",
    "--max-pixels": "image.max_pixels",
    "--crop": "image.crop",
    "--max-count": "max_count",
    "--max-size": "max_size",
    "--seed": "seed",
    "--workers": "workers",
    "--strict": "strict",
    "--no-progress": "progress",
    "--pseudonymise": "pseudonymise",
    "--scrub-reports": "scrub_reports",
    "--identifier-columns": "identifier_columns",
}


def _build_parser() -> argparse.ArgumentParser:
    sub = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["build"]


def test_flags_are_the_documented_interface_with_the_field_comments_as_help():
    # Hidden aliases of renamed flags (help suppressed) are not part of the documented interface.
    actions = [
        a
        for a in _build_parser()._actions
        if a.option_strings != ["-h", "--help"] and a.help != argparse.SUPPRESS
    ]
    assert {a.option_strings[0]: a.dest for a in actions} == FLAGS
    comments = {
        **cli.field_comments(BuildOptions),
        **cli.field_comments(ImageOptions),
        **cli.field_comments(DicomOptions),
    }
    for action in actions:
        assert action.help.replace("%%", "%").startswith(comments[action.dest.split(".")[-1]])
    assert comments["pseudonymise"].startswith("secret key file of the data owner")  # comment above
    assert comments["max_count"] == "patients per shard at most"  # comment on the line
    out = next(a for a in actions if a.dest == "out")
    assert out.default is None
    with pytest.raises(SystemExit) as exc:  # --output_dir (or its old spelling) is required
        cli._parser().parse_args(["build", "--manifest", "m.csv"])
    assert exc.value.code == 2


def test_parsing_every_flag_gives_exactly_those_options():
    argv = [
        "build", "--output_dir", "o", "--manifest", "m.csv", "--images", "i.zip", "--retclip-dir", "r",
        "--split", "test", "--val-fraction", "0.25", "--image-size", "64", "--resize", "shorter",
        "--jpeg-quality", "80", "--min-side", "32", "--max-pixels", "1000", "--max-count", "7",
        "--max-size", "9999", "--seed", "3", "--workers", "2", "--strict", "--no-progress",
        "--pseudonymise", "key", "--crop", "fundus", "--scrub-reports", "--identifier-columns", "name,mrn",
    ]  # fmt: skip
    got = cli._from_flags(BuildOptions, cli._parser().parse_args(argv))
    assert got == BuildOptions(
        out="o",
        manifest="m.csv",
        images="i.zip",
        retclip_dir="r",
        split="test",
        val_fraction=0.25,
        image=ImageOptions(
            size=64, resize="shorter", quality=80, min_side=32, max_pixels=1000, crop="fundus"
        ),
        max_count=7,
        max_size=9999,
        seed=3,
        workers=2,
        strict=True,
        progress=False,
        pseudonymise="key",
        scrub_reports=True,
        identifier_columns="name,mrn",
    )
    defaults = cli._from_flags(BuildOptions, cli._parser().parse_args(["build", "--output_dir", "o"]))
    assert defaults == BuildOptions(out="o")


def test_an_option_type_without_a_flag_is_refused_when_the_parser_is_built():
    @dataclass
    class Odd:
        sizes: list[int] = field(default_factory=list)  # no flag shape for a list

    with pytest.raises(TypeError, match=r"Odd\.sizes: no command-line flag"):
        cli._add_flags(argparse.ArgumentParser(), Odd)


def test_the_old_out_flag_still_works_with_one_warning(capsys):
    args = cli._parser().parse_args(["build", "--out", "o", "--manifest", "m.csv"])
    assert cli._from_flags(BuildOptions, args).out == "o"
    assert (
        capsys.readouterr().err.strip()
        == "make-shards build: warning: --out is now --output_dir; the old name will be removed"
    )
    with pytest.raises(SystemExit) as exc:
        cli._parser().parse_args(["build", "--out", "o", "--output_dir", "p"])
    assert exc.value.code == 2
