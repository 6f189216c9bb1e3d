"""Conventions every command-line tool shares: where its output goes, and old flag spellings.

Every tool writes under ``--output_dir`` (a config field ``output_dir`` where the tool takes a config).
A flag that was renamed keeps working for a while as a hidden alias that prints one warning line, so
scripts written against the old name do not break on upgrade; giving both spellings is a usage error.
Usage errors exit with ``EXIT_CONFIG`` (argparse's own code, 2) in every tool.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

OUTPUT_DIR_FLAG = "--output_dir"


class OldSpelling(argparse.Action):
    """A renamed flag's old name: stores into the new name's destination and warns on stderr."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ):
        print(
            f"{parser.prog}: warning: {option} is now {self.new}; the old name will be removed",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def add_output_dir(
    parser: argparse.ArgumentParser, help: str, default: str | None = None, old: tuple[str, ...] = ("--out",)
) -> None:
    """``--output_dir DIR`` (required unless ``default`` is given), with the ``old`` spellings accepted."""
    group = parser.add_mutually_exclusive_group(required=default is None)
    group.add_argument(OUTPUT_DIR_FLAG, dest="output_dir", default=default, metavar="DIR", help=help)
    for flag in old:
        group.add_argument(
            flag, dest="output_dir", action=OldSpelling, new=OUTPUT_DIR_FLAG, help=argparse.SUPPRESS
        )
