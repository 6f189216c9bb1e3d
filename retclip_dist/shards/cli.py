"""``make-shards build|verify``: argument parsing, the summary table and exit codes.

Exit codes: 0 success; 1 verify found problems or --strict met a reject; 2 unusable input or options
(one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys

from retclip_dist.exit_codes import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from retclip_dist.shards.build import BuildOptions, BuildResult, StrictRejectError, build_shards
from retclip_dist.shards.images import ImageOptions
from retclip_dist.shards.records import ShardInputError
from retclip_dist.shards.verify import verify_shards


def _parser() -> argparse.ArgumentParser:
    d, di = BuildOptions(), ImageOptions()
    parser = argparse.ArgumentParser(
        prog="make-shards",
        description="Pack retinal patients (two eyes + report) into WebDataset shards, or verify a shard set. "
        "Any path may be s3://bucket/prefix; the endpoint comes from FSSPEC_S3_ENDPOINT_URL / "
        "FSSPEC_S3_KEY / FSSPEC_S3_SECRET or the AWS_* variables.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a shard set")
    b.add_argument(
        "--manifest",
        help="CSV or JSONL: patient_id,left_image,right_image,report[,left_report,right_report,split]",
    )
    b.add_argument("--images", help="image root of --manifest: directory, .zip, .tar or .tar.gz")
    b.add_argument("--retclip-dir", help="directory with RET-CLIP's {split}_imgs.tsv and {split}_texts.jsonl")
    b.add_argument("--out", required=True, help="output directory (local or s3://)")
    b.add_argument("--split", default=d.split, help="split of patients without one (default %(default)s)")
    b.add_argument("--val-fraction", type=float, default=d.val_fraction, help="share sent to val by id hash")
    b.add_argument("--image-size", type=int, default=di.size, help="target side (default %(default)s)")
    b.add_argument(
        "--resize", choices=["square", "shorter"], default=di.resize, help="square squashes (paper)"
    )
    b.add_argument("--jpeg-quality", type=int, default=di.quality, help="default %(default)s")
    b.add_argument(
        "--min-side", type=int, default=di.min_side, help="reject smaller images (default %(default)s)"
    )
    b.add_argument(
        "--max-pixels", type=int, default=di.max_pixels, help="reject larger images, from the header"
    )
    b.add_argument(
        "--max-count", type=int, default=d.max_count, help="patients per shard (default %(default)s)"
    )
    b.add_argument("--max-size", type=int, default=d.max_size, help="bytes per shard (default %(default)s)")
    b.add_argument("--seed", type=int, default=d.seed, help="shuffle and val-assignment seed")
    b.add_argument("--workers", type=int, default=d.workers, help="image-processing processes")
    b.add_argument("--strict", action="store_true", help="any reject is an error (exit 1, no manifest)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument(
        "--pseudonymise",
        metavar="KEYFILE",
        help="replace patient ids by HMAC-SHA256 pseudonyms keyed by this secret file (keep it in the "
        "hospital) and leave image paths out, so the output directory may leave the hospital",
    )
    v = sub.add_parser("verify", help="check a shard set against its manifest.json")
    v.add_argument("directory", help="shard-set directory (local or s3://)")
    return parser


def _options(args: argparse.Namespace) -> BuildOptions:
    return BuildOptions(
        out=args.out,
        manifest=args.manifest,
        images=args.images,
        retclip_dir=args.retclip_dir,
        split=args.split,
        val_fraction=args.val_fraction,
        image=ImageOptions(
            size=args.image_size,
            resize=args.resize,
            quality=args.jpeg_quality,
            min_side=args.min_side,
            max_pixels=args.max_pixels,
        ),
        max_count=args.max_count,
        max_size=args.max_size,
        seed=args.seed,
        workers=args.workers,
        strict=args.strict,
        progress=not args.no_progress,
        pseudonymise=args.pseudonymise,
    )


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
        print(summary(build_shards(_options(args))))
        return EXIT_OK
    except ShardInputError as exc:
        print(f"make-shards: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StrictRejectError as exc:
        print(f"make-shards: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
