"""The run configuration: one typed tree for model, data, optimisation, checkpoints and logging."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from retclip_dist.data.config import DataConfig
from retclip_dist.model.config import ModelConfig


@dataclass
class TrainSection:
    seed: int = 0  # seeds model init, data order and augmentation
    epochs: int = 10  # passes over the training split
    max_steps: int | None = None  # stop after this many optimiser steps (None: run all epochs)
    lr: float = 3e-5  # peak learning rate (paper: 3e-5 at batch 256 per GPU)
    weight_decay: float = 1e-3  # AdamW decay (see no_decay for what is exempt)
    # Exempt from decay. "1d": every bias, norm gain and logit scale (CLIP/open_clip practice: shrinking
    # gains and biases only rescales activations); "release": its name filter (bn/ln/bias/logit_scale),
    # which exempts the vision LayerNorms but decays BERT's (their name "LayerNorm" has no "ln").
    no_decay: Literal["1d", "release"] = "1d"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW betas (CLIP's)
    eps: float = 1e-6  # AdamW epsilon
    warmup_steps: int = 50  # linear warmup from 0 to lr
    schedule: Literal["cosine", "constant"] = "cosine"  # decay after warmup
    grad_clip: float | None = None  # max global grad norm (None: no clipping)
    accum_steps: int = 1  # split each rank's batch into this many chunks, keeping every negative
    precision: Literal["no", "bf16", "fp16"] = "bf16"  # autocast dtype (no: float32; release: fp16 + scaler)
    compile: bool = False  # torch.compile the model (GPU recipe)
    # float8 matmuls in the towers' block linears via torchao (optional extra `fp8`); needs a GPU of compute
    # capability >= 8.9 (Ada, Hopper), refused elsewhere; pays off with compile (train/fp8.py)
    fp8: bool = False
    allow_tf32: bool = True  # TF32 matmuls on Ampere+ GPUs
    # Parts to lock (LiT): "vision" (tower + shared projection), "text" (BERT), "heads" (six heads and the
    # scales). Locked parameters get no gradient, no update and no optimiser state.
    freeze: list[Literal["vision", "text", "heads"]] = field(default_factory=list)
    # lr multiplier per part, e.g. {vision: 0.1}; parts not named keep 1.0 (train/optim.py has the formula)
    lr_scale: dict[str, float] = field(default_factory=dict)
    # Layer-wise lr decay inside each tower (BEiT/RETFound, e.g. 0.65): block i of d gets decay^(d - i)
    # times the top's lr, the embeddings decay^(d + 1); 1.0 = off. Heads are not decayed.
    layer_decay: float = 1.0
    # A rank with no progress for this long in its own work (waiting for its next batch, validation, the
    # probe, writing a checkpoint, setting up) writes every thread's stack, its loader workers' too, and
    # ends with exit code 5, which the launchers requeue; a rank waiting for other ranks (a step, a
    # barrier) gets collective_timeout_s and a minute on top. 0: no stall check (runtime/watchdog.py)
    stall_timeout_s: float = 180.0
    # How long a collective waits for the other ranks (the process group's timeout): a dead or frozen node
    # ends the others with exit code 6, naming the silent ranks from their health records
    collective_timeout_s: float = 300.0
    # Times the launchers requeue a run that ended with exit code 5 or 6 without having saved a newer
    # checkpoint since the previous such end (launch/requeue.py); a stop signal's requeue is not counted
    max_fault_requeues: int = 3
    # Steps between the ranks' agreement on a stop signal and a non-finite loss (one all-reduce and one
    # host sync that stalls the GPU's queue); logged, checkpoint and last steps always agree, so a stop
    # is honoured within this many steps and a non-finite loss never reaches a checkpoint
    check_every_steps: int = 8


@dataclass
class LossSection:
    """Where the negatives come from. The loss kind is model.loss: the model owns the scales it needs."""

    # true: the global batch (exact all-gather with gradient, the paper's objective); false: each rank's own
    # batch only, as the release runs (--skip-aggregate), and DDP optimises the mean of the local losses.
    gather: bool = True
    # "mask": patients whose reports reach the text tower as the same token ids (after truncation to
    # data.context_length) are not each other's negatives (per level: the patient report at the patient
    # level, the eye reports at the eye levels; the own pair stays positive).
    # "keep": they are pushed apart like any other pair, as the release and CLIP do.
    duplicates: Literal["mask", "keep"] = "mask"


@dataclass
class CheckpointSection:
    every_steps: int = 1000  # save every N optimiser steps (0: only at the end and on signals)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted
    resume: str | None = None  # "auto" (latest complete checkpoint, if any) or a checkpoint path
    # Where the checkpoint's data position cannot be continued (no data_rank*.json; other shards, seed or
    # sample settings) its epoch starts again from the first patient with the data settings as they are
    # now, instead of being refused (patients that epoch used are read again); a position that can be
    # continued still is, so the flag may stay on for requeues. Weights, optimiser and step are restored.
    reset_data: bool = False
    # Also keep the checkpoint where this metric (kind/key of metrics.jsonl, higher is better) was best,
    # beside the last keep_last; "probe/auroc" needs val.probe. None: keep only the last ones.
    keep_best: Literal["probe/auroc"] | None = None


@dataclass
class LogSection:
    every_steps: int = 10  # metrics to metrics.jsonl and the trackers every N steps
    # Accelerate trackers that get every record besides metrics.jsonl: tensorboard, wandb, mlflow, comet_ml,
    # aim, clearml, dvclive, ... (whatever this Accelerate knows); each needs its package installed. The
    # tracker reads its own environment (WANDB_MODE=offline, MLFLOW_TRACKING_URI, ...).
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    project: str = "retclip"  # trackers' project name; TensorBoard writes to output_dir/tensorboard/<project>
    progress: bool = True  # tqdm bar on the main process
    # Old switch, an alias of log.trackers only: false drops "tensorboard" from trackers (with a warning)
    tensorboard: bool | None = None

    def __post_init__(self) -> None:
        # Folded into trackers at once, so that trackers is the one list everything reads (and config.json
        # records); the alias is then None again.
        if self.tensorboard is not None:
            print(
                f"warning: log.tensorboard={str(self.tensorboard).lower()} is an old switch; "
                'use log.trackers (e.g. --log.trackers "[]")',
                file=sys.stderr,
            )
            if not self.tensorboard:
                self.trackers = [t for t in self.trackers if t != "tensorboard"]
            self.tensorboard = None
        self.trackers = list(dict.fromkeys(self.trackers))  # each tracker once


@dataclass
class ProbeSection:
    """A linear probe of the current vision tower on a labelled table, on rank 0 (train/probe.py)."""

    table: str = ""  # retclip-eval's CSV/JSONL of labelled single-eye images ("": no probe)
    images: str = ""  # its image root: directory, .zip, .tar, s3:// prefix or shard set
    label: str = "label"  # label column of a single-label task
    labels: list[str] = field(default_factory=list)  # 0/1 columns of a multi-label task (label unused)
    every_epochs: int = 1  # probe every N epochs, and after the last step
    # Fit on train, pick C on val, score test from the table's split column; a table without one is split
    # 60/20/20 per row by a hash of (split_seed, row id)
    split_seed: int = 0


@dataclass
class ValSection:
    """Validation during training (retrieval recall on the held-out split); ``retclip-eval`` is separate."""

    every_epochs: int = 1  # validation recall every N epochs (0: never)
    max_samples: int | None = None  # cap on validation patients (None: the whole split)
    probe: ProbeSection = field(default_factory=ProbeSection)  # downstream linear probe (off by default)


@dataclass
class RunConfig:
    output_dir: str = "runs/retclip"  # checkpoints, logs and the final model go here
    model: ModelConfig = field(default_factory=ModelConfig)  # towers, heads, loss kind
    loss: LossSection = field(default_factory=LossSection)  # where the negatives come from
    data: DataConfig = field(default_factory=DataConfig)  # shard set, batch, augmentation
    train: TrainSection = field(default_factory=TrainSection)  # optimisation
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)  # saving and resuming
    log: LogSection = field(default_factory=LogSection)  # metrics
    val: ValSection = field(default_factory=ValSection)  # validation during training

    # Old spellings still read (with a warning): the section was called "eval" until retclip-eval took
    # that word.
    RENAMED: ClassVar[dict[str, str]] = {"eval": "val"}
