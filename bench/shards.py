"""Throughput of make-shards against a bare PIL decode-resize-encode loop over the same images, and
what --crop fundus adds per image.

    .venv/bin/python bench/shards.py --patients 300 --workers 1 2

The bare loop uses the same JPEG draft (DCT downscaling), bicubic resize and JPEG quality, so the ratio
shows what the pipeline's own work (archive reads, checks, tar packing, hashing, journal) costs. The
crop's cost is measured twice: the bare loop with the field search and crop in place of the resize,
and a one-worker build with --crop fundus against the same build without it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from retclip_dist import synth
from retclip_dist.shards.build import BuildOptions, build_shards
from retclip_dist.shards.crop import crop_to_field, find_fundus_field
from retclip_dist.shards.images import ImageOptions


def write_inputs(root: Path, patients: int, min_px: int, max_px: int, seed: int) -> Path:
    """Fundus JPEGs of random square sizes in [min_px, max_px] plus a manifest; returns the manifest."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    with (root / "patients.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient_id", "left_image", "right_image", "report"])
        for i in range(patients):
            p = synth.make_patient(rng, int(rng.integers(min_px, max_px + 1)))
            for eye in ("left", "right"):
                getattr(p, eye).save(root / "images" / f"p{i:05d}_{eye}.jpg", quality=92)
            writer.writerow([f"p{i:05d}", f"p{i:05d}_left.jpg", f"p{i:05d}_right.jpg", p.report])
    return root / "patients.csv"


def bare_loop(image_dir: Path, opts: ImageOptions, crop: bool = False) -> float:
    """Seconds to decode (with draft), convert, resize (or crop to the field) and encode every image once."""
    paths = sorted(image_dir.iterdir())
    start = time.perf_counter()
    for path in paths:
        img = Image.open(io.BytesIO(path.read_bytes()))
        img.draft("RGB", (opts.size, opts.size))
        img = img.convert("RGB")
        if crop:
            field = find_fundus_field(img)
            assert field is not None, path
            img = crop_to_field(img, field, min(opts.size, int(2 * field.r)))
        else:
            img = img.resize((opts.size, opts.size), Image.Resampling.BICUBIC)
        img.save(io.BytesIO(), "JPEG", quality=opts.quality)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--min-px", type=int, default=512)
    parser.add_argument("--max-px", type=int, default=1024)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    opts = ImageOptions()
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        root = Path(tmp)
        manifest = write_inputs(root / "raw", args.patients, args.min_px, args.max_px, args.seed)
        bare_loop(root / "raw" / "images", opts)  # warm the page cache so both sides read from memory
        bare = args.patients / bare_loop(root / "raw" / "images", opts)
        bare_crop = args.patients / bare_loop(root / "raw" / "images", opts, crop=True)
        rows = [("bare PIL loop", 1, bare), ("bare PIL loop, field search + crop", 1, bare_crop)]

        def build(name: str, workers: int, image: ImageOptions) -> float:
            result = build_shards(
                BuildOptions(
                    out=str(root / name),
                    manifest=str(manifest),
                    images=str(root / "raw" / "images"),
                    image=image,
                    workers=workers,
                    progress=False,
                )
            )
            return result.patients_per_second

        for workers in args.workers:
            rows.append(("make-shards", workers, build(f"out-{workers}", workers, opts)))
        one = [pps for name, workers, pps in rows if name == "make-shards" and workers == 1]
        plain = one[0] if one else build("out-plain", 1, opts)
        cropped = build("out-crop", 1, dataclasses.replace(opts, crop="fundus"))
        rows.append(("make-shards --crop fundus", 1, cropped))
    print(
        f"{args.patients} patients, 2 JPEGs each, {args.min_px}-{args.max_px} px -> {opts.size}x{opts.size}"
    )
    print("| runner | workers | patients/s | per worker vs bare |")
    print("|---|---|---|---|")
    for name, workers, pps in rows:
        print(f"| {name} | {workers} | {pps:.1f} | {pps / workers / bare:.2f}x |")
    per_image = (1 / bare_crop - 1 / bare) / 2 * 1000
    in_build = (1 / cropped - 1 / plain) / 2 * 1000
    print(
        f"--crop fundus: +{per_image:.1f} ms per image in the bare loop, +{in_build:.1f} ms in a 1-worker build"
    )


if __name__ == "__main__":
    main()
