"""``make-shards build|verify|audit``: argument parsing, the summary table and exit codes.

The build flags are generated from BuildOptions (and its nested ImageOptions): one flag per field, its
comment as the help text, so an option is declared once.

Exit codes: 0 success; 1 verify found problems, --strict met a reject, or the audit (its own, or a
--pseudonymise build's) found an identifier; 2 unusable input or options (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import logging
import sys
import tokenize
import types
import typing
from typing import Any, TypeVar

from retclip_dist.cli_args import OldSpelling
from retclip_dist.exit_codes import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from retclip_dist.shards.audit import Identifiers, audit
from retclip_dist.shards.build import (
    AuditFailedError,
    BuildOptions,
    BuildResult,
    StrictRejectError,
    build_shards,
)
from retclip_dist.shards.records import ShardInputError
from retclip_dist.shards.sources import split_columns
from retclip_dist.shards.verify import verify_shards

T = TypeVar("T")


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in ``cls``'s source: the comment ending the declaration, else the comment
    lines right above it. This is how the fields' one-line comments become flag help."""
    tokens = list(tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline))
    names = {f.name for f in dataclasses.fields(cls)}
    found: dict[str, str] = {}
    above: list[str] = []  # comment lines since the last statement
    field_name = None  # the field whose declaration is being read
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if field_name is not None:
                found[field_name] = text
            else:
                above.append(text)
        elif tok.type == tokenize.NEWLINE:
            field_name, above = None, []
        elif (
            tok.type == tokenize.NAME
            and tok.string in names
            and tokens[i + 1].string == ":"
            and not found.get(tok.string)
        ):
            field_name = tok.string
            found[field_name] = " ".join(above)
    return found


def _add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, prefix: str = ""
) -> None:
    """One flag per field of ``cls`` (nested dataclasses flattened, their fields under their own names);
    the argparse dest is the dotted field path, which _from_flags reads back."""
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp, dest = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            _add_flags(parser.add_argument_group(comments[f.name]), tp, dest + ".")
            continue
        default = getattr(defaults, f.name)
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        help_text = comments[f.name].replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": dest, "default": default}
        if tp is bool:
            if default:
                flag = "--no-" + f.name.replace("_", "-")
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            optional = [a for a in typing.get_args(tp) if a is not type(None)]
            base = optional[0] if isinstance(tp, types.UnionType) and len(optional) == 1 else tp
            if typing.get_origin(base) is typing.Literal:
                kwargs["choices"] = list(typing.get_args(base))
            elif base in (int, float):
                kwargs["type"] = base
            elif base is not str:
                raise TypeError(f"{cls.__name__}.{f.name}: no command-line flag for type {tp}")
            if f.metadata.get("required"):
                kwargs.update(required=True, default=None)
            elif default is not None:
                help_text += " (default %(default)s)"
            if "choices" not in kwargs:
                kwargs["metavar"] = f.metadata.get("metavar", flag[2:].upper().replace("-", "_"))
        old = f.metadata.get("old", ())
        if old:
            # A renamed flag: the old spellings stay as hidden, warned aliases (cli_args), one of them required.
            required = kwargs.pop("required", False)
            group = parser.add_mutually_exclusive_group(required=required)
            group.add_argument(flag, help=help_text, **kwargs)
            for name in old:
                group.add_argument(
                    name,
                    dest=dest,
                    action=OldSpelling,
                    new=flag,
                    help=argparse.SUPPRESS,
                    default=kwargs["default"],
                )
        else:
            parser.add_argument(flag, help=help_text, **kwargs)


def _from_flags(cls: type[T], args: argparse.Namespace, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    values = {
        f.name: _from_flags(hints[f.name], args, f"{prefix}{f.name}.")
        if dataclasses.is_dataclass(hints[f.name])
        else getattr(args, prefix + f.name)
        for f in dataclasses.fields(cls)
    }
    return cls(**values)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make-shards",
        description="Pack retinal patients (two eyes + report) into WebDataset shards, or verify a shard set. "
        "Any path may be s3://bucket/prefix; the endpoint comes from FSSPEC_S3_ENDPOINT_URL / "
        "FSSPEC_S3_KEY / FSSPEC_S3_SECRET or the AWS_* variables.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_flags(sub.add_parser("build", help="build a shard set"), BuildOptions)
    v = sub.add_parser("verify", help="check a shard set against its manifest.json")
    v.add_argument("directory", help="shard-set directory (local or s3://)")
    a = sub.add_parser(
        "audit",
        help="search every byte of a shard set for the patient table's identifiers before it leaves the hospital",
    )
    a.add_argument("directory", help="shard-set directory (local or s3://): every file in it is searched")
    a.add_argument(
        "--manifest", required=True, help="the patient table the set was built from (CSV or JSONL)"
    )
    a.add_argument(
        "--identifier-columns",
        metavar="COL[,COL...]",
        help="table columns that identify a patient besides patient_id and the image paths (name, record number)",
    )
    a.add_argument(
        "--pattern",
        action="append",
        default=[],
        metavar="REGEX",
        help="also report every match of this Python regular expression (repeatable)",
    )
    return parser


def _audit(args: argparse.Namespace) -> int:
    identifiers = Identifiers.from_table(args.manifest, split_columns(args.identifier_columns))
    result = audit(args.directory, identifiers, args.pattern)
    for hit in result.hits:
        print(hit.line())
    print(result.summary())
    return EXIT_OK if result.ok else EXIT_FAILED


def summary(result: BuildResult) -> str:
    """Kept / rejected-per-reason table plus the throughput line."""
    rows = [("kept", result.kept)] + [(f"rejected: {k}", n) for k, n in result.rejected.items() if n]
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {n:>8}" for label, n in rows]
    lines.append(
        f"{len(result.shards)} shards in {result.out}; {result.processed} patients in {result.seconds:.1f} s "
        f"= {result.patients_per_second:.1f} patients/s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="make-shards: %(message)s", stream=sys.stderr)
    try:
        if args.command == "verify":
            result = verify_shards(args.directory)
            for problem in result.problems:
                print(f"PROBLEM {problem}")
            print(
                "pseudonymised: yes (patient ids are keyed hashes, no source paths)"
                if result.pseudonymised
                else "pseudonymised: no (samples carry patient ids and source paths)"
            )
            print(
                f"{result.shards} shards, {result.samples} samples checked: {'OK' if result.ok else 'FAILED'}"
            )
            return EXIT_OK if result.ok else EXIT_FAILED
        if args.command == "audit":
            return _audit(args)
        print(summary(build_shards(_from_flags(BuildOptions, args))))
        return EXIT_OK
    except ShardInputError as exc:
        print(f"make-shards: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except AuditFailedError as exc:
        for hit in exc.hits:
            print(hit.line())
        print(f"make-shards: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except StrictRejectError as exc:
        print(f"make-shards: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
