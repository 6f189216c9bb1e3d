"""A downstream check while pretraining: a linear probe of the current vision tower, on rank 0.

The contrastive loss and retrieval recall say little about what the image features are worth downstream
(the release probed RFMiD during training; open_clip runs zero-shot ImageNet). Every
``val.probe.every_epochs`` epochs, and after the last step, the main process runs ``retclip-eval
linear-probe``'s own code (eval/commands.py ``probe_model``) on the model as it is: features from the
shared projection (D-wide, the release's eval_*.py feature), logistic regression fitted on train, C picked
on val, macro AUROC on test. It writes one ``probe`` record to metrics.jsonl (TensorBoard ``probe/auroc``).

The other ranks wait in one collective that then hands them the value, so that every rank agrees whether
``checkpoint.keep_best`` saves this step. Under ZeRO-3, where every forward gathers each layer's shards
from all ranks, every rank runs the probe on the whole table (the same forwards, in the same order) and
rank 0's result is the record. The probe is deterministic: no random draw (the split without a split
column is a hash of the row ids), eval mode, float32 features, lbfgs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator

from retclip_dist.eval.config import DataConfig, EvalConfig
from retclip_dist.train.checkpoint import Checkpointer
from retclip_dist.train.config import ProbeSection
from retclip_dist.train.metrics_log import MetricsLog
from retclip_dist.train.signals import sum_over_ranks

if TYPE_CHECKING:
    from retclip_dist.eval.data import LabelledSet
    from retclip_dist.model.retclip import RetClip

log = logging.getLogger("retclip_dist.train")

KIND = "probe"  # the metrics.jsonl record kind
METRIC = "probe/auroc"  # its value as checkpoint.keep_best names it (kind/key)


def probe_eval_config(section: ProbeSection) -> EvalConfig:
    """The ``retclip-eval linear-probe`` config the in-training probe runs (its C grid, batch, columns)."""
    data = DataConfig(
        table=section.table,
        images=section.images,
        label_column=section.label,
        label_columns=list(section.labels),
    )
    cfg = EvalConfig(data=data)
    cfg.features.head = "projected"  # what the release's linear probes use, and retclip-eval's default
    return cfg


@dataclass
class ProbeSplits:
    table: LabelledSet  # every labelled row
    parts: tuple[LabelledSet, LabelledSet, LabelledSet]  # train, val, test
    source: str  # "split column" or "seeded 60/20/20 (split_seed N)"


def read_probe_splits(section: ProbeSection) -> ProbeSplits:
    """The table read and split, each part checked to give a defined AUROC (``LabelError`` otherwise).

    The table's split column when any row has one (rows without are unused, as in retclip-eval), else a
    seeded 60/20/20 draw per row id (eval/data.py ``seeded_split``).
    """
    # retclip-eval's commands bring scikit-learn and matplotlib: imported only by runs that probe.
    from retclip_dist.eval.commands import probe_splits
    from retclip_dist.eval.data import read_labelled, with_seeded_splits

    cfg = probe_eval_config(section)
    table = read_labelled(cfg.data)
    source = "split column"
    if all(r.split is None for r in table.rows):
        table = with_seeded_splits(table, section.split_seed)
        source = f"seeded 60/20/20 (split_seed {section.split_seed})"
    return ProbeSplits(table, probe_splits(table, cfg), source)


class TrainProbe:
    """The probe of one run; ``score`` on the main process (on every rank under ZeRO-3). The table is read
    and its images decoded once, at the first probe, and kept (uint8 at the model's input size) for the
    later ones."""

    def __init__(self, section: ProbeSection, every_rank: bool = False) -> None:
        self.section = section
        self.every_rank = every_rank  # ZeRO-3: every rank embeds the table with rank 0
        self.cfg = probe_eval_config(section)
        self._splits: ProbeSplits | None = None
        self._images: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.last_step = -1  # the step last probed

    def due(self, epoch: int) -> bool:
        """Whether the probe runs once ``epoch`` epochs are done."""
        return epoch % self.section.every_epochs == 0

    @torch.no_grad()
    def score(self, model: RetClip) -> dict[str, Any]:
        """The ``probe`` record of ``model`` as it is now (restored to its train/eval mode afterwards)."""
        from retclip_dist.eval.commands import probe_model
        from retclip_dist.eval.data import load_images
        from retclip_dist.eval.features import describe

        start = time.perf_counter()
        if self._splits is None or self._images is None:  # both or neither: a failed read is retried
            splits = read_probe_splits(self.section)
            a, b, c = (load_images(part, model.image_input.size) for part in splits.parts)
            self._splits, self._images = splits, (a, b, c)
        was_training = model.training
        # float32 matmuls as retclip-eval runs them: the trainer allows TF32 (train.allow_tf32) for speed.
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        model.eval()
        try:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            # Weights kept in half precision (DeepSpeed bf16/fp16) take float32 images through autocast.
            dtype = next(model.parameters()).dtype
            device = next(model.parameters()).device
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                outcome = probe_model(model, self._splits.table, self._splits.parts, self._images, self.cfg)
        finally:
            model.train(was_training)
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        overall = outcome.metrics["overall"]
        return {
            "auroc": overall["macro_auroc"],  # macro AUROC on the test split (None: undefined)
            "accuracy": overall.get("accuracy"),
            "C": outcome.fit.c,
            "test_images": outcome.metrics["n"],
            "features_from": describe(outcome.heads),
            "split": self._splits.source,
            "table": self.section.table,
            "seconds": time.perf_counter() - start,
        }


def build_probe(cfg_probe: ProbeSection, acc: Accelerator, zero_stage: int) -> TrainProbe | None:
    """The run's probe, None when ``val.probe.table`` is empty. Under ZeRO-3 each rank holds only a shard
    of the weights, so rank 0 cannot embed alone: every rank runs it."""
    if not cfg_probe.table:
        return None
    return TrainProbe(cfg_probe, every_rank=zero_stage == 3)


class ProbeStopped(Exception):
    """A stop signal arrived while the probe was embedding; the run saves and leaves without its value."""


@contextlib.contextmanager
def _between_batches(model: RetClip, stopping: Callable[[], bool] | None) -> Iterator[None]:
    # The probe embeds through the vision tower batch by batch (eval/features.py): before each batch,
    # report progress and look for a stop signal. Hooked only while the probe runs, so that a compiled
    # training step never sees the hook.
    if stopping is None:
        yield
        return

    def check(module: torch.nn.Module, args: Any) -> None:
        if stopping():
            raise ProbeStopped

    handle = model.visual.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


def run_probe(
    probe: TrainProbe,
    model: torch.nn.Module,
    acc: Accelerator,
    metrics: MetricsLog | None,
    checkpointer: Checkpointer,
    step: int,
    epoch: int,
    stopping: Callable[[], bool] | None = None,
    wait: Callable[[], None] | None = None,
) -> bool:
    """Probe on the main process and write its record; every rank must call it (one collective).

    Returns whether the value is a new best that ``checkpointer`` keeps: the caller then saves this step.
    A probe that fails (an image that cannot be read, a table changed since the check, a GPU out of memory
    beside the training state) is logged with its reason and gives no value; training goes on. Whatever
    the error, rank 0 must still join the collective below, or the other ranks would wait in it forever.
    ``stopping`` is asked before each batch the probe embeds (progress beat, stop signal): a stop ends the
    probe without a value or record. ``wait``: the barrier the other ranks wait at meanwhile (the
    trainer's ``LongWait``: a probe of minutes must not time out their collective).
    """
    value, record = math.nan, None
    if acc.is_main_process or probe.every_rank:
        inner = acc.unwrap_model(model)
        if probe.every_rank and stopping is not None:
            # ZeRO-3: every rank embeds in lockstep, so none may stop alone; a stop waits for the probe's end.
            beat = stopping
            stopping = lambda: beat() and False  # noqa: E731
        try:
            with _between_batches(inner, stopping):
                record = probe.score(inner)
        except ProbeStopped:
            log.warning("probe at step %d stopped by a signal; not recorded", step)
        except (ValueError, OSError) as exc:  # bad input (LabelError is a ValueError): its one line says why
            log.error("probe at step %d failed, training goes on: %s", step, exc)
            record = {"auroc": None, "error": str(exc)}
        except Exception as exc:
            log.exception("probe at step %d failed, training goes on", step)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # what the probe held, back for training
            record = {"auroc": None, "error": f"{type(exc).__name__}: {exc}"}
        if record is not None and record["auroc"] is not None:
            value = float(record["auroc"])
    if wait is not None:
        wait()  # the other ranks wait here while rank 0 probes
    # Then all hold rank 0's value.
    mine = torch.tensor([value if acc.is_main_process else 0.0], dtype=torch.float64, device=acc.device)
    record = record if acc.is_main_process else None
    value = float(sum_over_ranks(acc, mine).item())
    probe.last_step = step
    best = checkpointer.offer(METRIC, value, step)
    if record is not None:
        if checkpointer.keep_best == METRIC:
            record["kept_as_best"] = best
        if metrics is not None:
            metrics.write(KIND, step, {"epoch": epoch, **record})
        if "error" not in record:
            auroc = "n/a" if record["auroc"] is None else f"{record['auroc']:.4f}"
            log.info(
                "probe at step %d (epoch %d): macro AUROC %s on %d test images (C %g, %.1f s)%s",
                step,
                epoch,
                auroc,
                record["test_images"],
                record["C"],
                record["seconds"],
                "; a new best, its checkpoint is kept" if best else "",
            )
    return best
