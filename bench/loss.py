"""Benchmark: the local-rows InfoNCE (b x B logits per rank) against the naive full B x B matrix per rank.

Simulates rank 0 of N ranks in one process: the gathered features are just a [B, D] tensor, the
local variant scores its b = B / N rows against all B columns, the naive one scores all B rows.
Forward + backward of one level is timed and its peak memory measured: on CUDA with
``torch.cuda.max_memory_allocated``; on CPU as the peak resident set size of a fresh subprocess above its
size just before the step (tracemalloc cannot see tensor memory, which torch allocates outside Python).

    .venv/bin/python bench/loss.py                       # CPU defaults: N = 8 ranks
    .venv/bin/python bench/loss.py --local-batch 256     # b = 256 per rank, N = B / 256
    .venv/bin/python bench/loss.py --dim 512 --world 8 --max-naive-gib 60   # on a GPU
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from retclip_dist.loss import infonce_local

# Forward + backward of a symmetric cross-entropy keeps about this many B x B float32 buffers alive.
NAIVE_BUFFERS = 5


@dataclass(frozen=True)
class Case:
    variant: str  # "local" or "naive"
    global_batch: int  # B
    world: int  # simulated number of ranks
    dim: int  # feature width D
    device: str  # "cpu" or "cuda"
    repeats: int  # timed steps after one warm-up step
    threads: int  # torch CPU threads


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _run(case: Case) -> tuple[float, float]:
    """(median step seconds, peak bytes above the pre-step footprint) of one variant."""
    torch.set_num_threads(case.threads)
    device = torch.device(case.device)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (case.global_batch, case.dim)
    image = F.normalize(torch.randn(shape, generator=gen, device=device), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(shape, generator=gen, device=device), dim=-1).requires_grad_()
    scale = torch.tensor(90.0, device=device, requires_grad=True)
    rows = case.global_batch // case.world if case.variant == "local" else case.global_batch

    def step() -> None:
        infonce_local(image[:rows], text[:rows], image, text, scale, 0).backward()
        image.grad = text.grad = scale.grad = None

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    step()
    times = []
    for _ in range(case.repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return statistics.median(times), float(peak - base)


def _child(case: Case, results: mp.Queue) -> None:
    results.put(_run(case))


def measure(case: Case) -> tuple[float, float]:
    """Run one case in a fresh process so that its peak memory is its own."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_child, args=(case, results))
    proc.start()
    out = results.get()
    proc.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--global-batch", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--world", type=int, default=8, help="simulated ranks N; local rows b = B / N")
    parser.add_argument(
        "--local-batch", type=int, default=None, help="fix b instead (N = B / b); overrides --world"
    )
    parser.add_argument("--dim", type=int, default=128, help="feature width D (512 in the paper)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per case, after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--max-naive-gib", type=float, default=4.0, help="skip naive cases predicted above this"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    # glibc otherwise keeps freed large blocks in its heap, so peak RSS would count fragmentation, not
    # tensors; a fixed mmap threshold returns every big tensor to the OS on free. Children inherit it.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")

    print(f"device={args.device} D={args.dim} float32, one level, forward+backward, rank 0 of N")
    header = (
        f"{'B':>6} {'N':>4} {'b':>5} | {'local ms':>9} {'local MiB':>10} | {'naive ms':>9} {'naive MiB':>10}"
    )
    print(f"{header} | mem ratio")
    for batch in args.global_batch:
        world = batch // args.local_batch if args.local_batch else args.world
        common = {"global_batch": batch, "world": world, "dim": args.dim, "device": args.device}
        common |= {"repeats": args.repeats, "threads": args.threads}
        local_s, local_mem = measure(Case("local", **common))
        naive_gib = NAIVE_BUFFERS * batch * batch * 4 / 2**30
        if naive_gib > args.max_naive_gib:
            naive = f"{'skipped':>9} {f'~{naive_gib:.0f} GiB':>10} | {'':>9}"
        else:
            naive_s, naive_mem = measure(Case("naive", **common))
            naive = f"{naive_s * 1e3:9.1f} {naive_mem / 2**20:10.1f} | {local_mem / naive_mem:9.3f}"
        local = f"{local_s * 1e3:9.1f} {local_mem / 2**20:10.1f}"
        print(f"{batch:6d} {world:4d} {batch // world:5d} | {local} | {naive}")


if __name__ == "__main__":
    main()
