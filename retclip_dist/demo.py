"""``make demo``: the whole story on CPU in a few minutes, starting where a user starts.

synthetic raw archive (zip + CSV) -> ``make-shards build`` -> ``make-shards verify`` -> ``retclip-train
--launch`` (checks the config once, then ``accelerate launch``) of configs/tiny.yaml on 2 CPU processes ->
validation recall -> saved model -> linear probe. Each stage is the same command a user would type; they
are printed before they run. A failed stage ends the demo with that stage's exit code (2: bad usage or
config) and one line saying which.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from retclip_dist import synth
from retclip_dist.cli_args import add_output_dir
from retclip_dist.eval.commands import run_linear_probe
from retclip_dist.eval.config import DataConfig, EvalConfig
from retclip_dist.eval.report import markdown_table
from retclip_dist.exit_codes import EXIT_OK
from retclip_dist.train.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parent.parent


class StageFailed(RuntimeError):
    """A demo stage (one command) exited with ``code``; its own output said why."""

    def __init__(self, cmd: list[str], code: int) -> None:
        super().__init__(f"{Path(cmd[0]).name} {cmd[1]} exited with code {code}; see its output above")
        self.code = code


def run(cmd: list[str]) -> None:
    print("\n$ " + shlex.join(cmd), flush=True)
    code = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    if code != EXIT_OK:
        raise StageFailed(cmd, code)


def bin_path(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def recall_table(metrics_path: Path) -> str:
    rows = read_metrics(metrics_path, "val")
    if not rows:
        return "(no validation recorded)"
    last = rows[-1]
    lines = [
        f"validation after step {last['step']} ({int(last['samples'])} held-out patients)",
        "level    i2t R@1  i2t R@5  t2i R@1  t2i R@5  chance R@1  chance R@5",
    ]
    for level in ("patient", "left", "right"):
        values = [
            last[f"{level}/{k}"] for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "chance_r1", "chance_r5")
        ]
        lines.append(
            f"{level:<8} "
            + "  ".join(f"{v:7.3f}" for v in values[:4])
            + "".join(f"  {v:10.3f}" for v in values[4:])
        )
    return "\n".join(lines)


def demo_probe(
    model_dir: str | Path,
    out_dir: str | Path,
    n_images: int = 400,
    seed: int = 0,
    label: str = "hard_exudates",
) -> str:
    """Linear probe for one lesion's presence on a trained model's image features (the default feature:
    the shared projection, as the release's probes); a Markdown table.

    Writes ``n_images`` synthetic eye photos (two per patient) and the probe's metrics.json, metrics.md
    and roc.png under ``out_dir``. ``label`` is a column of synth.write_labelled_set: a lesion or ``grade``.
    """
    out = Path(out_dir)
    table = synth.write_labelled_set(out / "data", max(n_images // 2, 5), seed=seed)
    cfg = EvalConfig(
        model=str(model_dir),
        output_dir=str(out / "linear_probe"),
        data=DataConfig(table=str(table), images=str(out / "data" / "images"), label_column=label),
    )
    return markdown_table(run_linear_probe(cfg))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retclip_dist.demo", description=__doc__)
    add_output_dir(parser, help="working directory for every demo artefact", default="demo")
    parser.add_argument("--patients", type=int, default=1200, help="synthetic patients to generate")
    parser.add_argument("--processes", type=int, default=2, help="CPU training processes")
    args, overrides = parser.parse_known_args(argv)
    try:
        return _demo(Path(args.output_dir).resolve(), args.patients, args.processes, overrides)
    except StageFailed as exc:
        # The stage's own code: 2 (a bad override or config) stays 2, as the tool said.
        print(f"demo: {exc}", file=sys.stderr)
        return exc.code


def _demo(out: Path, patients: int, processes: int, overrides: list[str]) -> int:

    print(f"1. synthetic hospital export: {patients} patients -> {out / 'raw'}", flush=True)
    # With per-eye reports (configs/tiny.yaml reads them) the left and right levels each learn their own
    # eye's findings instead of picking them out of the patient report.
    manifest, images = synth.write_raw_archive(
        out / "raw", patients, seed=0, image_size=256, layout="zip", eye_reports=True
    )

    shards = out / "shards"
    run(
        [
            bin_path("make-shards"), "build",
            "--manifest", str(manifest), "--images", str(images), "--output_dir", str(shards),
            "--image-size", "128", "--min-side", "128", "--max-count", "100",
            "--val-fraction", "0.15", "--workers", "2",
        ]
    )  # fmt: skip
    run([bin_path("make-shards"), "verify", str(shards)])

    run_dir = out / "run"
    # Each demo trains from scratch; an earlier demo's checkpoints would make the trainer refuse.
    shutil.rmtree(run_dir, ignore_errors=True)
    run(
        [
            bin_path("retclip-train"),
            "--launch", str(ROOT / "configs/accelerate/cpu_2proc.yaml"),
            "--num_processes", str(processes),
            "--config", str(ROOT / "configs/tiny.yaml"),
            "--data.shards", str(shards),
            "--output_dir", str(run_dir),
            *overrides,
        ]
    )  # fmt: skip
    print("\n" + recall_table(run_dir / "metrics.jsonl"))
    print(f"\nmodel saved with save_pretrained in {run_dir / 'model'}")

    print(
        "\n5. downstream: linear probe of hard exudates on the trained model's image features (retclip-eval)"
    )
    print(demo_probe(run_dir / "model", out / "eval"))

    print("\n6. the downstream table: retclip-eval benchmark, one dataset (the synthetic grades), two seeds")
    suite = out / "bench_suite.yaml"
    # A rerun trains a new model, and benchmark refuses an output_dir made with another one.
    shutil.rmtree(out / "bench", ignore_errors=True)
    suite.write_text(
        "seeds: [0, 1]\nprotocols: [zero_shot, linear_probe]\n"
        f"datasets:\n  - {{name: synthetic, layout: table, root: {out / 'eval' / 'data'}, "
        f"prompts: {ROOT / 'configs/prompts/dr_grade.yaml'}, options: {{label_column: grade}}}}\n"
    )
    run([bin_path("retclip-eval"), "benchmark", "--suite", str(suite), "--model", str(run_dir / "model"),
         "--output_dir", str(out / "bench")])  # fmt: skip
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
