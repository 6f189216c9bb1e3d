"""``retclip-eval export``: a saved model in timm's or open_clip's own format.

    retclip-eval export --model runs/x/model --format timm --output_dir export/timm [--head projection]
    retclip-eval export --model runs/x/model --format open_clip --output_dir export/open_clip [--eye left]

The output folder appears only when complete and checked: everything is written under a temporary name
beside it, loaded back through timm or open_clip themselves and compared with the model on a fixed input
(1e-5), and only then renamed into place. Exit codes: 0 done; 2 bad usage or input (one line);
1 an export that does not reproduce the model (a bug: nothing is published).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from retclip_dist.cli_args import add_output_dir
from retclip_dist.eval.config import ZeroShotConfig
from retclip_dist.exit_codes import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from retclip_dist.export.check import ExportMismatch
from retclip_dist.export.timm_format import TIMM_HEADS, timm_usage, verify_timm, write_timm
from retclip_dist.model.card import README_FILE, export_card
from retclip_dist.model.retclip import RetClip

FORMATS = ("timm", "open_clip")
EYE_CHOICES = ("left", "right", "both")
# open_clip's tokenizer pads every text to this many tokens; retclip-eval zero-shot truncates there too.
DEFAULT_CONTEXT_LENGTH = ZeroShotConfig().context_length
_OPEN_CLIP_MISSING = "the open_clip format needs open_clip: pip install 'retclip-dist[open_clip]'"


def _export_timm(model: RetClip, model_dir: str, out: Path, head: str) -> dict[str, Any]:
    files = write_timm(model, out, head)
    diff = verify_timm(model, out, head)
    front = {"library_name": "timm", "pipeline_tag": "image-feature-extraction", "tags": ["retclip", "timm"]}
    (out / README_FILE).write_text(
        export_card(front, "RET-CLIP vision tower (timm)", timm_usage(model, head), model_dir),
        encoding="utf-8",
    )
    return {"files": [*files, README_FILE], "max_abs_diff": {"tower": diff}}


def _export_open_clip(
    model: RetClip, model_dir: str, partial: Path, final: Path, eyes: list[str], context_length: int
) -> dict[str, Any]:
    try:
        from retclip_dist.export import open_clip_format as oc
    except ImportError as exc:
        raise ValueError(f"{_OPEN_CLIP_MISSING} ({exc})") from exc
    report: dict[str, Any] = {}
    for eye in eyes:
        sub = partial / eye
        sub.mkdir()
        files = oc.write_open_clip(model, sub, eye, context_length, final / eye)
        diffs = oc.verify_open_clip(model, sub, eye, context_length)
        front = {
            "library_name": "open_clip",
            "pipeline_tag": "zero-shot-image-classification",
            "tags": ["retclip", "clip", "open_clip"],
        }
        title = f"RET-CLIP {eye}-eye level (open_clip)"
        (sub / README_FILE).write_text(
            export_card(front, title, oc.open_clip_usage(model, eye), model_dir), encoding="utf-8"
        )
        report[eye] = {"files": [*files, README_FILE], "max_abs_diff": diffs}
    return report


def _readable_as_umask_allows(root: Path) -> None:
    """mkdtemp makes the folder private (0700) and safetensors writes its files 0600: give both the modes
    any other new file gets here, so a colleague or a job under another account can read the export."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def export(
    model_dir: str, fmt: str, output_dir: str, head: str, eye: str, context_length: int
) -> dict[str, Any]:
    """Write and check the export; the folder ``output_dir`` appears only when both are done."""
    out = Path(output_dir)
    if out.exists():
        raise ValueError(f"--output_dir {out} already exists; choose a new directory")
    model = RetClip.from_pretrained(model_dir).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        if fmt == "timm":
            report = _export_timm(model, model_dir, partial, head)
        else:
            eyes = ["left", "right"] if eye == "both" else [eye]
            report = _export_open_clip(model, model_dir, partial, out.resolve(), eyes, context_length)
        _readable_as_umask_allows(partial)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {"format": fmt, "model": model_dir, "output_dir": str(out), **report}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retclip-eval export", description="Write a saved model in timm's or open_clip's format."
    )
    parser.add_argument("--model", required=True, help="directory written by RetClip.save_pretrained")
    parser.add_argument("--format", required=True, choices=FORMATS, help="timm (vision tower) or open_clip")
    add_output_dir(parser, help="output directory (must not exist)")
    parser.add_argument(
        "--head",
        choices=TIMM_HEADS,
        help="timm: none (default: the tower ends at its pooled feature) or projection (the shared image "
        "projection as timm's classifier head)",
    )
    parser.add_argument(
        "--eye",
        choices=EYE_CHOICES,
        help="open_clip: which eye level(s) to write, each as its own model in OUT/<eye> (default both)",
    )
    parser.add_argument(
        "--context_length",
        type=int,
        help=f"open_clip: tokens per text, the tokenizer pads and truncates to it (default {DEFAULT_CONTEXT_LENGTH})",
    )
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    given = [f for f, v in (("--eye", args.eye), ("--context_length", args.context_length)) if v is not None]
    if args.format == "timm" and given:
        print(f"retclip-eval export: error: {', '.join(given)} apply to --format open_clip", file=sys.stderr)
        return EXIT_CONFIG
    if args.format == "open_clip" and args.head is not None:
        print("retclip-eval export: error: --head applies to --format timm", file=sys.stderr)
        return EXIT_CONFIG
    try:
        report = export(
            args.model,
            args.format,
            args.output_dir,
            args.head or "none",
            args.eye or "both",
            DEFAULT_CONTEXT_LENGTH if args.context_length is None else args.context_length,
        )
    except ExportMismatch as exc:
        print(f"retclip-eval export: {exc}; nothing was written", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, OSError) as exc:
        print(f"retclip-eval export: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(report, indent=2))
    return EXIT_OK
