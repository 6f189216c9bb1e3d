"""Benchmark: our full training step (loader included) against the same towers run bare, same process tree.

    .venv/bin/python bench/train.py            # no GPU: small shapes, float32, 1-2 minutes on 2 cores
    .venv/bin/python bench/train.py            # with a GPU: ViT-B/16 + BERT-base, bf16, batch 256, 8 workers
    .venv/bin/python bench/train.py --compile --peak-tflops 989    # ours compiled; MFU against 989
    .venv/bin/python bench/train.py --batch 512 --grad-checkpointing selective --text-padding batch --fp8

Variants, each in a fresh process so that its peak memory is its own:
  bare towers            timm ViT + transformers BERT, one linear head each, plain single-level CLIP loss,
                         plain AdamW; inputs are already-augmented tensors resident on the device, text
                         always padded to --context (as a plain script pads); eager
  bare towers, compiled  the same under torch.compile (--variants to leave it out, e.g. on a slow CPU)
  ours, batch in memory  the trainer's step (host-to-device copy, batched device augmentation, RetClip,
                         tripartite loss, AdamW with parameter groups, lr schedule, scale clamp, the per-step
                         finiteness check) on one loader batch reused every step
  ours, with loader      the same step fed by ``build_train_data`` with --workers worker processes
The switches --text-padding, --grad-checkpointing, --fp8 and --compile apply to the two "ours" variants;
the bare towers stay the reference a user could assemble. Then the data loader alone, per core (main process, one torch thread), for both augmentation paths on
512 px JPEGs, set against what the step consumes.

Peak memory: torch.cuda.max_memory_allocated on a GPU; on CPU the peak resident set size of the variant's
process above its size after imports (loader worker processes are not included). FLOPs per patient are counted on meta tensors with
torch.utils.flop_counter for the configured shapes (ViT-B/16 at 224 px + BERT-base at context 100 give
about 262, the usual 264 GFLOP reference); MFU of every variant is reported against --peak-tflops (on a
GPU by default, on CPU when given), always on these nominal FLOPs at --context tokens, so that padding
fewer tokens (--text-padding batch) shows as a higher MFU, as the issue counts it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel

from retclip_dist.data.augment import DeviceAugment
from retclip_dist.data.config import DataConfig
from retclip_dist.data.loader import build_train_data
from retclip_dist.model.config import BERT_BASE_CHINESE, ImageInput, ModelConfig
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.towers import text_model_config
from retclip_dist.train.backend import build_accelerator
from retclip_dist.train.config import RunConfig, TrainSection
from retclip_dist.train.fp8 import fp8_unavailable_reason
from retclip_dist.train.loop import prepare_training, train_step
from retclip_dist.train.optim import lr_at
from retclip_dist.train.signals import any_rank

# The fake patients and shard sets are the tests' (tests/conftest.py), not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import (
    FakePatient,
    build_synth_shards,
    fake_patients,
    free_port,
    tiny_tokenizer,
    write_shard_set,
)

ROOT = Path(__file__).resolve().parent.parent
Variant = Literal["bare", "bare-compiled", "ours-memory", "ours-loader"]
VARIANT_NAMES: dict[Variant, str] = {
    "bare": "bare towers, tensors in memory",
    "bare-compiled": "bare towers, compiled",
    "ours-memory": "ours, batch in memory",
    "ours-loader": "ours, with loader",
}
# Distinct synthetic patients written to the step's shard set; they repeat under new keys because the
# cost of a sample depends on its size, not its content, and drawing thousands of discs would be slow.
POOL = 16

# Shapes per device: the paper's towers on a GPU, a model that runs a step in about a second on one core.
PRESETS: dict[str, dict[str, Any]] = {
    "cuda": {
        "vision": "vit_base_patch16_224",
        "vision_layers": None,
        "image_size": 224,
        "text_layers": 12,
        "text_width": 768,
        "batch": 256,
        "steps": 20,
        "warmup": 5,
        "precision": "bf16",
        "workers": 8,
        "threads": None,
        "rounds": 1,
    },
    "cpu": {
        "vision": "vit_tiny_patch16_224",
        "vision_layers": 4,
        "image_size": 96,
        "text_layers": 2,
        "text_width": 256,
        "batch": 32,
        "steps": 3,
        "warmup": 1,
        "precision": "fp32",
        "workers": 1,
        "threads": 1,
        "rounds": 2,
    },
}


@dataclass(frozen=True)
class Case:
    variant: Variant  # which step to time
    model: ModelConfig = field(default_factory=ModelConfig)  # towers shared by every variant
    data: DataConfig = field(default_factory=DataConfig)  # the step's shard set and loader settings
    device: Literal["cpu", "cuda"] = "cpu"  # where the step runs
    precision: Literal["fp32", "bf16"] = "fp32"  # autocast dtype of the towers
    compile: bool = False  # torch.compile the model
    fp8: bool = False  # ours only: torchao float8 linears in the tower blocks (train.fp8)
    steps: int = 3  # timed steps
    warmup: int = 1  # untimed steps first (compilation, allocator, worker start-up)
    threads: int | None = None  # torch CPU threads in the variant's process (None: torch's default)


@dataclass(frozen=True)
class Result:
    step_seconds: float  # median wall time of one timed step
    peak_bytes: float  # see the module docstring for what is measured where


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The towers of every variant; --grad-checkpointing is applied to ours only (see _run_ours)."""
    vision_kwargs: dict[str, Any] = {"img_size": args.image_size}
    if args.vision_layers is not None:
        vision_kwargs["depth"] = args.vision_layers
    text_config = dict(BERT_BASE_CHINESE)
    text_config.update(
        num_hidden_layers=args.text_layers,
        hidden_size=args.text_width,
        num_attention_heads=max(1, args.text_width // 64),
        intermediate_size=4 * args.text_width,
    )
    return ModelConfig(vision_name=args.vision, vision_kwargs=vision_kwargs, text_config=text_config)


class BareClip(nn.Module):
    """The towers as a plain script would use them: one linear head per modality, one logit scale."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.visual = timm.create_model(cfg.vision_name, pretrained=False, num_classes=0, **cfg.vision_kwargs)
        self.text = AutoModel.from_config(text_model_config(cfg), add_pooling_layer=False)
        self.image_head = nn.Linear(2 * self.visual.num_features, cfg.embed_dim, bias=False)
        self.text_head = nn.Linear(self.text.config.hidden_size, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(
        self, left: Tensor, right: Tensor, input_ids: Tensor, attention_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        eyes = self.visual(torch.cat([left, right]))
        image = self.image_head(torch.cat([eyes[: left.shape[0]], eyes[left.shape[0] :]], dim=-1))
        cls = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return F.normalize(image, dim=-1), F.normalize(self.text_head(cls), dim=-1)


def clip_loss(image: Tensor, text: Tensor, scale: Tensor) -> Tensor:
    logits = scale * image.float() @ text.float().T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def gflop_per_patient(cfg: ModelConfig, context: int) -> float:
    """Forward + backward GFLOP of the bare model for one patient, counted on meta tensors (no compute)."""
    with torch.device("meta"):
        model = BareClip(cfg)
        size = cfg.vision_kwargs["img_size"]
        eye = torch.empty(1, 3, size, size)
        ids = torch.zeros(1, context, dtype=torch.long)
    # A mask would make transformers inspect its values, which meta tensors do not have; it does not
    # change the FLOPs of the attention kernels.
    with FlopCounterMode(display=False) as counter:
        image, text = model(eye, eye, ids, None)
        (image.sum() + text.sum()).backward()
    return counter.get_total_flops() / 1e9


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(
    step: Callable[[int, Any], None], batches: Iterator[Any], case: Case, device: torch.device
) -> float:
    """Median seconds of the ``case.steps`` steps that follow ``case.warmup`` untimed ones.

    The median, because other processes on a shared machine stretch single steps; syncing after every
    step costs the GPU nothing measurable, and the trainer syncs every step anyway (its loss check).
    """
    times = []
    last = time.perf_counter()
    # Each step is timed from the end of the previous one, so that waiting for the batch counts.
    for i, batch in zip(range(case.warmup + case.steps), batches, strict=False):
        step(i, batch)
        _sync(device)
        now = time.perf_counter()
        if i >= case.warmup:
            times.append(now - last)
        last = now
    if len(times) != case.steps:
        raise RuntimeError(
            f"{case.variant}: the batches ran out after {case.warmup + len(times)} of "
            f"{case.warmup + case.steps} steps"
        )
    return statistics.median(times)


def _run_config(case: Case) -> RunConfig:
    precision = "bf16" if case.precision == "bf16" else "no"
    train = TrainSection(
        max_steps=case.warmup + case.steps,
        warmup_steps=case.warmup,
        precision=precision,
        compile=case.compile,
        fp8=case.fp8,
    )
    return RunConfig(model=case.model, data=case.data, train=train)


def _first_batch(data_cfg: DataConfig, seed: int) -> dict[str, Any]:
    # In-process loading: worker processes kept alive after one batch would compete for the cores.
    loader = build_train_data(replace(data_cfg, num_workers=0), tiny_tokenizer(), 0, 1, seed)
    return next(iter(loader))


def _run_ours(case: Case) -> float:
    # Built and stepped with the trainer's own helpers, private ones included, so that this times exactly
    # what train() runs between two batches (minus logging and checkpointing, which are periodic).
    cfg = _run_config(case)
    acc = build_accelerator(cfg)
    model = RetClip(cfg.model)
    data = build_train_data(cfg.data, tiny_tokenizer(), 0, 1, cfg.train.seed)
    device_augment = data.device_augment(acc.device)
    model, optimizer, loss_fn = prepare_training(acc, model, cfg)
    total = case.warmup + case.steps

    def step(i: int, batch: dict[str, Any]) -> None:
        lr = lr_at(i, total, cfg.train)
        loss, _ = train_step(model, optimizer, batch, device_augment, loss_fn, acc, cfg.train, lr)
        # The loop's agreement on stopping (a collective and a device sync) every train.check_every_steps
        # steps is part of the cost; in between, the finiteness flag stays on the device.
        bad = ~torch.isfinite(loss.detach())
        if (i + 1) % cfg.train.check_every_steps == 0:
            any_rank(acc, bool(bad.item()))

    if case.variant == "ours-loader":
        batches: Iterator[Any] = iter(data)
    else:
        batches = itertools.repeat(_first_batch(cfg.data, cfg.train.seed))
    return _timed(step, batches, case, acc.device)


def _run_bare(case: Case) -> float:
    device = torch.device(case.device)
    # What a plain script does: every report padded to the full context, no recomputation, no float8.
    batch = _first_batch(replace(case.data, text_padding="max"), 0)
    on_device = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    inputs = DeviceAugment(ImageInput.clip(case.data.image_size), device)(on_device)
    left, right = inputs["left"], inputs["right"]
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    model = BareClip(replace(case.model, grad_checkpointing="off")).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=1e-3, fused=device.type == "cuda")
    forward = torch.compile(model) if case.compile else model

    def step(i: int, _: None) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.precision == "bf16"):
            image, text = forward(left, right, ids, mask)
        clip_loss(image, text, model.logit_scale.exp()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _timed(step, itertools.repeat(None), case, device)


def _run(case: Case) -> Result:
    if case.threads is not None:
        torch.set_num_threads(case.threads)
    cuda = case.device == "cuda"
    if cuda:
        # As train() does: TF32 only matters for float32 runs, and both variants get the same setting.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    base = 0 if cuda else _rss_bytes()
    torch.manual_seed(0)
    seconds = _run_bare(case) if case.variant.startswith("bare") else _run_ours(case)
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    )
    return Result(seconds, float(peak))


def _child(case: Case, results: mp.Queue) -> None:
    results.put(_run(case))


def measure(case: Case) -> Result:
    """Run one variant in a fresh process so that its peak memory is its own."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_child, args=(case, results))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(
            f"variant {case.variant!r} failed (exit code {proc.exitcode}); see its traceback above"
        )
    return results.get()


def repeated_patients(n: int, size: int) -> list[FakePatient]:
    """``n`` patients of ``size`` px JPEGs drawn from POOL distinct ones, each under its own key."""
    pool = fake_patients(min(n, POOL), size=size, seed=0)
    return [replace(pool[i % len(pool)], key=f"p{i:06d}") for i in range(n)]


def write_step_shards(root: Path, size: int, batch: int, batches: int, workers: int) -> None:
    """One batch per shard, and a shard count every worker divides, so that no worker runs dry first."""
    shards = workers * math.ceil(batches / workers)
    write_shard_set(root, {"train": repeated_patients(shards * batch, size)}, per_shard=batch)


def loader_rate(root: Path, augment_on: Literal["cpu", "device"], image_size: int, batch: int) -> float:
    """Patients/s of ``build_train_data`` read in this process (tar, shuffle, decode, augment, tokens)."""
    cfg = DataConfig(
        shards=str(root),
        batch_size=batch,
        num_workers=0,
        val_split=None,
        augment_on=augment_on,
        image_size=image_size,
    )
    loader = build_train_data(cfg, tiny_tokenizer(), 0, 1, 0)
    start = time.perf_counter()
    patients = sum(len(b["keys"]) for b in loader)
    return patients / (time.perf_counter() - start)


def per_core_loader_rates(image_size: int, batch: int, rounds: int) -> dict[str, float]:
    """Best-of-``rounds`` per-core loader rates of both augmentation paths on 512 px JPEGs."""
    torch.set_num_threads(1)
    paths: tuple[Literal["cpu", "device"], ...] = ("cpu", "device")
    best = dict.fromkeys(paths, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        write_shard_set(Path(tmp), {"train": repeated_patients(2 * batch, 512)}, per_shard=batch)
        # Rounds interleave the paths so that load from other processes hits both alike.
        for _ in range(rounds):
            for path in paths:
                best[path] = max(best[path], loader_rate(Path(tmp), path, image_size, batch))
    return best


# Flags whose default depends on the device, with what each sets; the defaults come from PRESETS.
PRESET_FLAGS: dict[str, tuple[type, str]] = {
    "batch": (int, "patients per step"),
    "steps": (int, "timed steps per variant run (the median counts)"),
    "warmup": (int, "untimed steps first (compilation, allocator, worker start-up)"),
    "vision": (str, "timm architecture of the eye encoder"),
    "vision_layers": (int, "ViT depth override (None: the architecture's)"),
    "image_size": (int, "model input side in px"),
    "text_layers": (int, "BERT layers"),
    "text_width": (int, "BERT hidden size; heads = width / 64"),
    "precision": (str, "tower dtype: fp32 or bf16"),
    "workers": (int, "loader worker processes of 'ours, with loader'"),
    "threads": (int, "torch threads in each variant process (None: torch's default)"),
    "rounds": (int, "fresh runs of every variant; the fastest counts"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    for key, (kind, text) in PRESET_FLAGS.items():
        gpu, cpu = PRESETS["cuda"][key], PRESETS["cpu"][key]
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, help=f"{text} (GPU {gpu}, CPU {cpu})")
    parser.add_argument("--context", type=int, default=100, help="report tokens per patient")
    parser.add_argument(
        "--count-syncs",
        action="store_true",
        help="only count collectives and host reads per step of the trainer on 2 CPU processes",
    )
    parser.add_argument("--baseline", type=Path, help="with --count-syncs: another source tree to count too")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile ours (the bare towers: variants)"
    )
    parser.add_argument(
        "--text-padding",
        choices=["batch", "max"],
        default="batch",
        help="ours: pad each batch to its longest report rounded up to 16, or to --context (data.text_padding)",
    )
    parser.add_argument(
        "--grad-checkpointing",
        choices=["off", "selective", "full"],
        default="off",
        help="ours: activation recomputation of the towers (model.grad_checkpointing)",
    )
    parser.add_argument(
        "--fp8", action="store_true", help="ours: torchao float8 tower linears (train.fp8; GPU >= 8.9)"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANT_NAMES),
        default=list(VARIANT_NAMES),
        help="which step variants to time ('vs bare': the eager bare towers if timed, else the compiled)",
    )
    parser.add_argument(
        "--augment-on", choices=["cpu", "device"], default="device", help="the step's data path"
    )
    parser.add_argument("--loader-rounds", type=int, default=2, help="rounds of the per-core loader timing")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense peak for MFU (GPU default 989, the H100/H200 bf16 figure; CPU: no MFU unless given)",
    )
    args = parser.parse_args(argv)
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = 989.0
    if not any(v.startswith("bare") for v in args.variants) or not any(
        v.startswith("ours") for v in args.variants
    ):
        parser.error("--variants: name at least one bare variant (the reference) and one of ours")
    if "ours-memory" not in args.variants:
        parser.error("--variants: ours-memory is needed (the loader table compares against it)")
    if args.fp8 and (reason := fp8_unavailable_reason()) is not None:
        parser.error(f"--fp8 {reason}")
    for key, value in PRESETS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.precision not in ("fp32", "bf16"):
        parser.error(f"--precision {args.precision!r}: expected fp32 or bf16")
    return args


def measure_variants(args: argparse.Namespace, model: ModelConfig) -> dict[Variant, Result]:
    """Best of ``args.rounds`` fresh runs of every variant, on a shard set at the model's input size."""
    with tempfile.TemporaryDirectory() as tmp:
        write_step_shards(Path(tmp), args.image_size, args.batch, args.warmup + args.steps, args.workers)
        data = DataConfig(
            shards=tmp,
            val_split=None,
            batch_size=args.batch,
            num_workers=args.workers,
            context_length=args.context,
            text_padding=args.text_padding,
            augment_on=args.augment_on,
            image_size=args.image_size,
            decode_size=args.image_size,
        )
        common = {"data": data, "device": args.device, "precision": args.precision}
        common |= {"steps": args.steps, "warmup": args.warmup, "threads": args.threads}
        ours = {
            "model": replace(model, grad_checkpointing=args.grad_checkpointing),
            "compile": args.compile,
            "fp8": args.fp8,
        }
        per_variant: dict[Variant, dict[str, Any]] = {
            "bare": {"model": model, "compile": False},
            "bare-compiled": {"model": model, "compile": True},
            "ours-memory": ours,
            "ours-loader": ours,
        }
        runs: dict[Variant, list[Result]] = {variant: [] for variant in args.variants}
        # Rounds interleave the variants so that load from other processes hits them alike.
        for _ in range(args.rounds):
            for variant, done in runs.items():
                done.append(measure(Case(variant=variant, **per_variant[variant], **common)))
    return {variant: min(done, key=lambda r: r.step_seconds) for variant, done in runs.items()}


def print_step_table(args: argparse.Namespace, results: dict[Variant, Result], gflop: float) -> None:
    cuda = args.device == "cuda"
    rate = {v: args.batch / r.step_seconds for v, r in results.items()}
    ref: Variant = "bare" if "bare" in results else "bare-compiled"
    layers = f"x{args.vision_layers}" if args.vision_layers else ""
    print(
        f"device {args.device}, {args.precision}, batch {args.batch}, {args.vision}{layers} at "
        f"{args.image_size} px, BERT {args.text_layers}x{args.text_width} at context {args.context}, "
        f"ours: compile {args.compile}, text padding {args.text_padding}, grad checkpointing "
        f"{args.grad_checkpointing}, fp8 {args.fp8}; threads {args.threads or 'default'}, median of {args.steps} steps after "
        f"{args.warmup}, best of {args.rounds} rounds; {gflop:.1f} GFLOP per patient per step (counted)"
    )
    unit = "GPU" if cuda else "process"
    memory = "max_memory_allocated" if cuda else "peak RSS above start"
    mfu = args.peak_tflops is not None
    header = f"{'step':<34} {f'patients/s/{unit}':>18} {'vs bare':>8} {'peak MiB':>9} {'vs bare':>8}"
    print(header + ("    MFU" if mfu else "") + f"   (peak: {memory}; vs bare: {VARIANT_NAMES[ref]})")
    for variant in results:
        name = VARIANT_NAMES[variant]
        label = f"{name} ({args.workers} workers)" if variant == "ours-loader" else name
        peak = results[variant].peak_bytes
        line = (
            f"{label:<34} {rate[variant]:>18.1f} {rate[variant] / rate[ref]:>8.3f} "
            f"{peak / 2**20:>9.0f} {peak / results[ref].peak_bytes:>8.3f}"
        )
        if mfu:
            line += f" {rate[variant] * gflop * 1e9 / (args.peak_tflops * 1e12):>6.1%}"
        print(line)


def print_loader_table(args: argparse.Namespace, per_core: dict[str, float], consumed: float) -> None:
    print(
        f"\nloader, 1 process, 1 thread, 512 px JPEG -> {args.image_size} px, best of {args.loader_rounds} "
        f"(the step, batch in memory, consumes {consumed:.1f} patients/s)"
    )
    workers = f"{args.workers} workers vs step"
    print(f"{'path':<34} {'patients/s/core':>18} {'cores for 1.5x':>15} {workers:>18}")
    for path, rate in per_core.items():
        need = 1.5 * consumed / rate
        print(f"{path + ' path':<34} {rate:>18.1f} {need:>15.1f} {args.workers * rate / consumed:>18.2f}")


# The trainer with counters around every torch.distributed collective the loop can call from Python and
# every .item()/.tolist() (a host read: on a GPU, a sync that stops the CPU queueing kernels), with the
# retclip_dist function that made it, written per rank at exit. The loader runs in a worker process
# (data.num_workers 1), whose CPU-side reads are not the step's and are not counted. Installed before the trainer is imported, so that modules binding a collective at import
# (loss.py's single-tensor gather) bind the counted one. DDP's gradient all-reduce runs in C++ and is not
# seen: it is one bucketed all-reduce per step either way.
COUNTING_TRAINER = """
import atexit, json, os, sys
import torch
import torch.distributed as dist


def where(frame):
    return os.path.basename(frame.f_code.co_filename) + ":" + frame.f_code.co_name


def caller(name):
    # The library function that made the call (e.g. torch.optim reading its CPU step counters), and the
    # retclip_dist function it was made under.
    frame = first = sys._getframe(2)
    while frame is not None and "retclip_dist" not in frame.f_code.co_filename:
        frame = frame.f_back
    if frame is None:
        return name + " in " + where(first) + " (outside retclip_dist)"
    if frame is first:
        return name + " in " + where(frame)
    return name + " in " + where(first) + " under " + where(frame)


def counted(counts, owner, name, key):
    real = getattr(owner, name, None)
    if real is None:
        return
    def wrapper(*args, **kwargs):
        counts[key] += 1
        where = caller(name)
        counts["where"][where] = counts["where"].get(where, 0) + 1
        return real(*args, **kwargs)
    setattr(owner, name, wrapper)


# Loader workers import this file as __mp_main__: only the trainer's own process counts and trains.
if __name__ == "__main__":
    counts = {"collectives": 0, "host_syncs": 0, "where": {}}
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
                 "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "all_gather_object", "barrier"):
        counted(counts, dist, name, "collectives")
    for name in ("item", "tolist"):
        counted(counts, torch.Tensor, name, "host_syncs")
    out = os.environ["RETCLIP_COUNT_TO"] + "." + os.environ.get("RANK", "0")
    atexit.register(lambda: open(out, "w").write(json.dumps(counts)))
    from retclip_dist.train.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def count_syncs(tree: Path, steps: tuple[int, int]) -> dict[str, float]:
    """Collectives and host reads per training step of ``tree``'s trainer on 2 gloo processes: the
    difference between runs of ``steps[1]`` and ``steps[0]`` steps, so that setup and the last step's
    record cancel out (one epoch, no checkpoint or validation inside)."""
    work = Path(tempfile.mkdtemp(prefix="bench-syncs-"))
    shards = build_synth_shards(
        work / "shards", 130, seed=3, raw_size=64, size=48, max_count=16, val_fraction=0.2
    )
    script = work / "counting_trainer.py"
    script.write_text(COUNTING_TRAINER)
    totals = []
    for n in steps:
        out = work / f"run{n}"
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(ROOT / "configs/accelerate/cpu_2proc.yaml"),
            "--main_process_port", str(free_port()), str(script),
            "--config", str(ROOT / "configs/tiny.yaml"),
            "--model.tokenizer_path", str(ROOT / "configs/tiny_vocab.txt"),
            "--data.shards", str(shards), "--output_dir", str(out),
            "--data.batch_size", "2", "--data.num_workers", "1", "--train.epochs", "1",
            "--train.max_steps", str(n), "--log.every_steps", "1000", "--log.progress", "false",
            "--checkpoint.every_steps", "0", "--val.every_epochs", "0",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree), "RETCLIP_COUNT_TO": str(out)}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tree)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        totals.append(json.loads(Path(f"{out}.0").read_text()))
    span = steps[1] - steps[0]
    where = {k: (n - totals[0]["where"].get(k, 0)) / span for k, n in totals[1]["where"].items()}
    per_step = {key: (totals[1][key] - totals[0][key]) / span for key in ("collectives", "host_syncs")}
    return {**per_step, "where": {k: v for k, v in sorted(where.items()) if v}}


def print_sync_table(trees: list[tuple[str, Path]], steps: tuple[int, int]) -> None:
    print(f"per training step, rank 0 of 2 gloo processes (steps {steps[0]}..{steps[1]}):")
    print(f"{'tree':<12} {'collectives':>12} {'host reads':>11}")
    for name, tree in trees:
        got = count_syncs(tree, steps)
        print(f"{name:<12} {got['collectives']:>12.2f} {got['host_syncs']:>11.2f}")
        for where, n in got["where"].items():
            print(f"    {n:5.2f} {where}")


def main() -> None:
    args = parse_args()
    if args.count_syncs:
        trees = [("this tree", ROOT)] + ([("baseline", args.baseline)] if args.baseline else [])
        print_sync_table(trees, (8, 24))
        return
    # glibc otherwise keeps freed large blocks in its heap, so peak RSS would count fragmentation, not
    # tensors; a fixed mmap threshold returns every big tensor to the OS on free. Children inherit it.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    model = model_config(args)
    results = measure_variants(args, model)
    print_step_table(args, results, gflop_per_patient(model, args.context))
    per_core = per_core_loader_rates(args.image_size, args.batch, args.loader_rounds)
    print_loader_table(args, per_core, args.batch / results["ours-memory"].step_seconds)


if __name__ == "__main__":
    main()
