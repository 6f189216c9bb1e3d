"""The training loader: partitioned WebDataset streams, per-worker batches and an exact resume position.

Data flow per logical worker w of W, for each partition p this rank serves:
  sample ranges of stream (p, w) (plan) -> raw samples -> seeded shuffle buffer -> skip resumed positions
  -> decode and augment -> micro-batch; the worker concatenates one micro-batch per partition into the
  rank's batch and tags it with w and its stream positions. ``TrainLoader`` hands the batches out in the
  planned order, remembers the positions behind the last batch of every worker, and resumes from them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from retclip_dist.data import position
from retclip_dist.data.augment import DeviceAugment
from retclip_dist.data.config import DataConfig, sized_for
from retclip_dist.data.plan import EpochPlan, Layout, plan_epoch, stream_seed
from retclip_dist.data.reshape import Segment, replan
from retclip_dist.data.samples import SampleDecoder, collate
from retclip_dist.data.skips import SkipCounter, skipped_total
from retclip_dist.data.streams import stream_samples
from retclip_dist.model.config import ImageInput
from retclip_dist.runtime.stop_signals import stop_signals
from retclip_dist.runtime.workers import WorkerSetup, worker_context
from retclip_dist.shardset import Manifest, read_manifest

log = logging.getLogger("retclip_dist.data")


def _as_is(item: Any) -> Any:
    return item


class LoaderError(RuntimeError):
    """A loader worker (or the in-process reader) failed with an error that is not a counted skip."""


# Slurm signals every process of a job on preemption or before a time limit (the stop signals, defined in
# retclip_dist.runtime.stop_signals). The trainer answers by saving a checkpoint, which needs its loader
# workers alive until then; they ignore the signals and stop when it exits (runtime/workers.py).


def data_loader(dataset: IterableDataset, cfg: DataConfig) -> DataLoader:
    """A DataLoader that passes worker-made batches through untouched; its workers come from the fork
    server (``runtime/workers.py``), never from a fork of this multi-threaded process."""
    workers = {}
    if cfg.num_workers:
        workers = {
            "multiprocessing_context": worker_context(),
            "worker_init_fn": WorkerSetup.of_this_process(stop_signals()),
        }
    return DataLoader(
        dataset,
        batch_size=None,
        collate_fn=_as_is,
        num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        # Each new iterator draws a base seed; from its own generator it leaves the global RNG (dropout,
        # init) untouched, so a resumed run and an uninterrupted one consume the same random numbers.
        generator=torch.Generator().manual_seed(0),
        **workers,
    )


def _last_line(exc: BaseException) -> str:
    # The DataLoader re-raises a worker's error with the worker's traceback in the message; its last
    # line is the original "Type: message".
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1:
        return lines[-1]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _kill_workers(it: Iterator[Any]) -> None:
    # Private to torch's multiprocessing DataLoader iterator (torch 2.x): its workers, and the registry
    # of worker pids whose SIGCHLD handler would raise "worker killed" in the middle of our exit.
    workers = getattr(it, "_workers", [])
    if getattr(it, "_worker_pids_set", False):
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(it))
        it._worker_pids_set = False
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()
    if hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()


def guarded(loader: Iterable[Any], what: str) -> Iterator[Any]:
    """Iterate a DataLoader; an error that is not a counted skip ends its workers and becomes one line.

    The workers ignore SIGTERM (see ``WorkerSetup``), so neither the DataLoader's own shutdown nor
    multiprocessing's exit handler could stop them: the rank would hang after the error. They are
    killed here, at once.
    """
    it = iter(loader)
    try:
        yield from it
    except Exception as exc:
        _kill_workers(it)
        raise LoaderError(f"{what}: {_last_line(exc)}") from exc


class TrainStream(IterableDataset):
    """What each DataLoader worker runs: the batches of one logical worker, from a given position."""

    def __init__(
        self,
        cfg: DataConfig,
        image: ImageInput,
        tokenizer: PreTrainedTokenizerBase,
        layout: Layout,
        plan: EpochPlan,
        seed: int,
        epoch: int,
        first_worker: int,
        served: list[int],
        positions: list[list[int]],
        generation: int = 0,
    ) -> None:
        self.cfg = cfg
        self.image = image
        self.tokenizer = tokenizer
        self.layout = layout
        self.plan = plan
        self.seed = seed
        self.epoch = epoch
        self.first_worker = first_worker
        self.served = served
        self.positions = positions
        self.generation = generation

    def __iter__(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        info = get_worker_info()
        workers = len(self.plan.caps)
        # The DataLoader polls its workers from 0; rotating roles makes that poll order continue the
        # planned step order after a resume.
        w = (self.first_worker + (info.id if info else 0)) % workers
        quota = self.plan.caps[w] - self.served[w]
        if quota <= 0:
            return
        counters, streams = [], []
        for i, p in enumerate(self.layout.local_partitions):
            counter = SkipCounter()
            decoder = SampleDecoder(self.cfg, self.image, self.seed, self.epoch, train=True, counter=counter)
            stream = stream_samples(
                self.plan.streams[p][w],
                stream_seed(self.seed, self.epoch, p, w, self.generation),
                self.cfg.shuffle_buffer,
                self.positions[w][i],
                decoder,
                self.cfg.storage_options,
                counter,
            )
            counters.append(counter)
            streams.append(stream)
        positions = list(self.positions[w])
        for _ in range(quota):
            patients = []
            for i, stream in enumerate(streams):
                for _ in range(self.layout.micro_batch):
                    positions[i], patient = next(stream)
                    patients.append(patient)
            skips: Counter[str] = Counter()
            for counter in counters:
                skips.update(counter.take())
            meta = {"worker": w, "positions": list(positions), "skips": dict(skips)}
            yield collate(patients, self.tokenizer, self.cfg, with_texts=False), meta


class TrainLoader:
    """One rank's training batches for an epoch, with a checkpointable position.

    Handed rank, world size and seed; every rank runs ``steps_per_epoch`` steps, derived from the
    manifest alone. ``state_dict()`` after a batch was used, loaded into a fresh loader, continues with
    exactly the batches the uninterrupted loader would have produced next.
    """

    def __init__(
        self,
        cfg: DataConfig,
        manifest: Manifest,
        tokenizer: PreTrainedTokenizerBase,
        rank: int,
        world_size: int,
        seed: int,
        image: ImageInput,
    ) -> None:
        self.cfg = sized_for(cfg, image.size)  # data.image_size follows the model's input
        self.image = image  # the model's input size and normalisation
        self.tokenizer = tokenizer
        self.seed = seed
        self.shards = manifest.split(cfg.train_split)
        self.layout = Layout(rank, world_size, cfg.partitions or world_size, cfg.batch_size)
        self.workers = max(cfg.num_workers, 1)
        self.skip_counts: Counter[str] = Counter()  # since the run started
        self.epoch_skip_counts: Counter[str] = Counter()  # since the current epoch started
        self.set_epoch(0)

    def _plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(
            self.shards, self.layout.partitions, self.workers, self.layout.micro_batch, self.seed, epoch
        )

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first step."""
        self.epoch = epoch
        self.step = 0  # steps taken under the current plan
        self.plan = self._plan(epoch)
        self.history: list[Segment] = []  # earlier parts of this epoch, read on other layouts
        self.base_step = 0  # steps of this epoch taken before the current plan
        self.positions = [[0] * len(self.layout.local_partitions) for _ in range(self.workers)]
        self.epoch_skip_counts = Counter()
        # position.patient_id of every row handed out this epoch, repeats included: what the epoch's
        # record counts (patients used, read twice), kept across a resume with the position.
        self.epoch_patients: list[int] = []
        if self.plan.steps == 0:
            raise ValueError(
                f"split {self.cfg.train_split!r} ({sum(s.count for s in self.shards)} samples in "
                f"{len(self.shards)} shards) cannot fill one step of {self.layout.micro_batch} patients per "
                f"partition over {self.layout.partitions} partitions and {self.workers} workers"
            )
        log.info(
            "epoch %d: %d steps; %d of the %d samples of split %r unused this epoch (past the last "
            "whole global batch of %d)",
            epoch,
            self.plan.steps,
            self.plan.unused,
            self.plan.samples,
            self.cfg.train_split,
            self.layout.micro_batch * self.layout.partitions,
        )

    def _continue_reshaped(self, history: list[Segment], base_step: int) -> None:
        """Serve the rest of the current epoch after ``history``, on this loader's layout."""
        self.history = history
        self.base_step = base_step
        self.step = 0
        self.plan = replan(
            self.shards,
            self.seed,
            self.epoch,
            history,
            self.layout.partitions,
            self.workers,
            self.layout.micro_batch,
        )
        self.positions = [[0] * len(self.layout.local_partitions) for _ in range(self.workers)]
        log.info(
            "epoch %d continues on another data layout after step %d: %d more steps over the %d samples "
            "not used yet (%d left over, under one global batch)",
            self.epoch,
            base_step,
            self.plan.steps,
            self.plan.steps * self.layout.micro_batch * self.layout.partitions + self.plan.unused,
            self.plan.unused,
        )

    @property
    def steps_per_epoch(self) -> int:
        """Steps of the current epoch (equal on every rank)."""
        return self.base_step + self.plan.steps

    def steps_in_epoch(self, epoch: int) -> int:
        """Steps of any epoch, for schedules that must know the total in advance."""
        return self._plan(epoch).steps

    @property
    def samples_per_epoch(self) -> int:
        """Samples of the training split, as the manifest counts them (all ranks)."""
        return self.plan.samples

    @property
    def unused_per_epoch(self) -> int:
        """Samples of the split (all ranks) that no step of the current epoch reads: under a global batch."""
        return self.plan.unused

    @property
    def skipped(self) -> int:
        """Samples lost to damaged data so far (by reason: ``skip_counts``)."""
        return skipped_total(self.skip_counts)

    @property
    def epoch_skipped(self) -> int:
        """Samples of this rank's streams lost to damaged data in the current epoch."""
        return skipped_total(self.epoch_skip_counts)

    def __len__(self) -> int:
        return self.plan.steps

    def epoch_done(self) -> bool:
        return self.step >= self.plan.steps

    def device_augment(self, device: torch.device | str) -> DeviceAugment:
        """The batched augmentation the trainer applies on ``device`` (a no-op on CPU-path batches)."""
        return DeviceAugment(self.image, device)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.epoch_done():
            return
        served = [0] * self.workers
        for w in self.plan.order[: self.step]:
            served[w] += 1
        dataset = TrainStream(
            self.cfg,
            self.image,
            self.tokenizer,
            self.layout,
            self.plan,
            self.seed,
            self.epoch,
            self.plan.order[self.step],
            served,
            [list(p) for p in self.positions],
            len(self.history),
        )
        where = f"training data (epoch {self.epoch})"
        for batch, meta in guarded(data_loader(dataset, self.cfg), where):
            expected = self.plan.order[self.step]
            if meta["worker"] != expected:
                raise RuntimeError(
                    f"step {self.step} of epoch {self.epoch} came from worker {meta['worker']}, planned "
                    f"{expected}: the DataLoader no longer polls workers round-robin"
                )
            self.positions[expected] = list(meta["positions"])
            self.skip_counts.update(meta["skips"])
            self.epoch_skip_counts.update(meta["skips"])
            self.epoch_patients.extend(position.patient_id(key) for key in batch["keys"])
            self.step += 1
            yield batch
        if not self.epoch_done():
            raise RuntimeError(
                f"loader stopped at step {self.step} of {self.plan.steps} in epoch {self.epoch}"
            )

    def _layout_record(self) -> dict[str, Any]:
        return position.layout_record(self.cfg, self.shards, self.layout, self.workers, self.seed)

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready position after the last batch handed out."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "positions": [list(p) for p in self.positions],
            "skips": dict(self.skip_counts),
            "epoch_skips": dict(self.epoch_skip_counts),
            "epoch_patients": list(self.epoch_patients),
            "layout": self._layout_record(),
            # Only after a resume on another layout: what the epoch read before, to replay it.
            "history": [seg.record() for seg in self.history],
            "base_step": self.base_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict()``, or from ``{"ranks": [the state of every saved rank]}``.

        On the layout it was saved with, the loader continues exactly as the uninterrupted one would.
        On another one (ranks, partitions, workers or shuffle buffer) with the same global batch, the rest
        of the epoch is re-planned over the samples not used yet (``data/reshape.py``); that needs the
        state of every saved rank, or a single rank's state. What cannot be continued (other shards, seed
        or sample settings: ``data/position.py``) raises ``position.PositionError``.
        """
        ranks = state.get("ranks", [state])
        if "ranks" not in state:
            own = state
        else:
            own = ranks[self.layout.rank] if len(ranks) == self.layout.world_size else None
        mine = self._layout_record()
        position.check(ranks[0], mine)
        if own is not None and not position.changed(own, mine):
            self._load_exact(own)
            return
        saved = ranks[0]["layout"]
        changes = position.describe(position.changed(ranks[0], {**mine, "rank": 0}))
        if len(ranks) != saved["world_size"]:
            raise position.PositionError(
                f"the data layout changed ({changes}): continuing the epoch on it needs the positions of all "
                f"{saved['world_size']} saved ranks, got {len(ranks)}",
                ranks[0]["epoch"],
            )
        log.info(
            "data position saved on another layout (%s): epoch %d is re-planned", changes, ranks[0]["epoch"]
        )
        self._load_reshaped(ranks)

    def _load_exact(self, state: dict[str, Any]) -> None:
        self.set_epoch(state["epoch"])
        history = [Segment.from_record(rec) for rec in state.get("history", [])]
        if history:
            self._continue_reshaped(history, state["base_step"])
        self.step = state["step"]
        self.positions = [list(p) for p in state["positions"]]
        self.skip_counts = Counter(state["skips"])
        # Older states lack it: the epoch's losses before the checkpoint are then not in the epoch's count.
        self.epoch_skip_counts = Counter(state.get("epoch_skips", {}))
        self.epoch_patients = list(state.get("epoch_patients", []))

    def _load_reshaped(self, ranks: list[dict[str, Any]]) -> None:
        first = ranks[0]
        saved = first["layout"]
        world, partitions, workers = saved["world_size"], saved["partitions"], saved["workers"]
        positions = [[0] * workers for _ in range(partitions)]
        for r, rank_state in enumerate(ranks):
            for w in range(workers):
                for i, p in enumerate(range(r, partitions, world)):
                    positions[p][w] = rank_state["positions"][w][i]
        history = [Segment.from_record(rec) for rec in first.get("history", [])]
        if first["step"]:
            micro = saved["batch_size"] // (partitions // world)
            rows = tuple(tuple(row) for row in positions)
            history.append(Segment(partitions, workers, micro, rows, saved["shuffle_buffer"]))
        self.set_epoch(first["epoch"])
        if history:
            self._continue_reshaped(history, first.get("base_step", 0) + first["step"])
        # The saved ranks' counts, summed, go to rank 0 so that the run's totals (summed over ranks) stay.
        if self.layout.rank == 0:
            for rank_state in ranks:
                self.skip_counts.update(rank_state["skips"])
                self.epoch_skip_counts.update(rank_state.get("epoch_skips", {}))
                self.epoch_patients.extend(rank_state.get("epoch_patients", []))


def build_train_data(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    rank: int,
    world_size: int,
    seed: int,
    image: ImageInput | None = None,
) -> TrainLoader:
    """The training loader of ``rank`` of ``world_size`` for the shard set ``cfg.shards``.

    ``image``: the model's input (``RetClip.image_input``); the trainer always passes it. Without a model
    (tests, benchmarks) it is CLIP normalisation at ``data.image_size`` (CLIP's side when null).
    """
    manifest = read_manifest(cfg.shards, cfg.storage_options)
    return TrainLoader(
        cfg, manifest, tokenizer, rank, world_size, seed, image or ImageInput.clip(cfg.image_size)
    )
