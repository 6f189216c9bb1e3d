"""``retclip-eval``: evaluate a save_pretrained model on labelled single-eye images, or convert weights.

    retclip-eval linear-probe --model runs/x/model --data.table labels.csv --data.images imgs.zip \\
        --output_dir results/probe [--config eval.yaml] [--section.key value ...]
    retclip-eval convert-release epoch_latest.pt --vocab vocab.txt --output_dir converted/
    retclip-eval benchmark --suite suite.yaml --model runs/x/model --output_dir results/bench [--shards DIR]
    retclip-eval export --model runs/x/model --format timm|open_clip --output_dir export/

Every evaluation subcommand takes the same options: an optional YAML preset (``--config``) and
``--section.key value`` overrides of retclip_dist.eval.config.EvalConfig. Exit codes: 0 success; 2 bad
usage, input, config or labels (one line on stderr naming the file and row). The old spellings
``--out_dir`` and (convert-release) ``--out`` still work, with a warning.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from retclip_dist.cli_args import add_output_dir
from retclip_dist.config import ConfigError, load_config, to_dict
from retclip_dist.eval.commands import COMMANDS
from retclip_dist.eval.config import EvalConfig
from retclip_dist.eval.data import LabelError
from retclip_dist.eval.report import markdown_table
from retclip_dist.exit_codes import EXIT_CONFIG, EXIT_OK
from retclip_dist.model.convert_retclip import convert_release


def _convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="retclip-eval convert-release",
        description="Convert a checkpoint of the public RET-CLIP release into a save_pretrained directory.",
    )
    parser.add_argument("checkpoint", help="the release's .pt file (training checkpoint or bare state dict)")
    parser.add_argument(
        "--vocab", required=True, help="the release's WordPiece vocab.txt (Chinese, 21,128 lines)"
    )
    add_output_dir(parser, help="output directory for RetClip.from_pretrained (must not exist)")
    args = parser.parse_args(argv)
    try:
        report = convert_release(args.checkpoint, args.vocab, args.output_dir)
    except (OSError, ValueError) as exc:
        print(f"retclip-eval convert-release: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(report, indent=2))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = [*COMMANDS, "convert-release", "benchmark", "export"]
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        print(f"subcommands: {', '.join(commands)}")
        return EXIT_OK
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        print(f"subcommands: {', '.join(commands)}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv[0] == "convert-release":
        return _convert(argv[1:])
    if argv[0] == "benchmark":
        from retclip_dist.eval.benchmark.run import main as benchmark_main

        return benchmark_main(argv[1:])
    if argv[0] == "export":
        from retclip_dist.export.cli import main as export_main

        return export_main(argv[1:])
    parser = argparse.ArgumentParser(prog=f"retclip-eval {argv[0]}")
    parser.add_argument("--config", help="YAML preset of EvalConfig")
    parser.add_argument("--print-config", action="store_true", help="print the final config and exit")
    parser.add_argument(
        "--strict", action="store_true", help="refuse rows without a label (same as --data.strict true)"
    )
    args, overrides = parser.parse_known_args(argv[1:])
    try:
        cfg = load_config(EvalConfig, args.config, overrides)
        cfg.data.strict = cfg.data.strict or args.strict
        if args.print_config:
            print(json.dumps(to_dict(cfg), indent=2))
            return EXIT_OK
        result = COMMANDS[argv[0]](cfg)
    except (ConfigError, LabelError, ValueError, OSError) as exc:
        # OSError: a model or output path that cannot be read or written (missing, a file, no permission).
        print(f"retclip-eval {argv[0]}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(markdown_table(result) if "metrics" in result else json.dumps(result, indent=2))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
