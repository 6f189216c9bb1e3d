"""The held-out split: every patient exactly once across ranks, unaugmented, with keys and report texts."""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from retclip_dist.data.config import DataConfig
from retclip_dist.data.loader import data_loader, guarded
from retclip_dist.data.samples import SampleDecoder, collate
from retclip_dist.data.skips import SkipCounter, skipped_total
from retclip_dist.data.streams import read_range
from retclip_dist.model.config import ImageInput
from retclip_dist.shardset import EYES, IMAGE_MEMBER, REPORT_MEMBER, ShardInfo, read_manifest

log = logging.getLogger("retclip_dist.data")


class ValStream(IterableDataset):
    """A worker's share of this rank's shards, in order, batched; the last batch may be short."""

    def __init__(
        self, cfg: DataConfig, image: ImageInput, tokenizer: PreTrainedTokenizerBase, shards: list[ShardInfo]
    ) -> None:
        self.cfg = cfg
        self.image = image
        self.tokenizer = tokenizer
        self.shards = shards

    def __iter__(self) -> Iterator[tuple[dict[str, Any] | None, dict[str, int]]]:
        info = get_worker_info()
        mine = self.shards[info.id :: info.num_workers] if info else self.shards
        counter = SkipCounter()
        # Validation batches carry identity parameters: resize to the model size and normalise only.
        decode = SampleDecoder(self.cfg, self.image, seed=0, epoch=0, train=False, counter=counter)
        patients = []
        for shard in mine:
            for raw in read_range(shard, self.cfg.storage_options, counter):
                patient = decode(raw)
                if patient is not None:
                    patients.append(patient)
                if len(patients) == self.cfg.batch_size:
                    yield collate(patients, self.tokenizer, self.cfg, with_texts=True), counter.take()
                    patients = []
        # A final item even without patients, so that skips after the last full batch are still reported.
        yield (
            (collate(patients, self.tokenizer, self.cfg, with_texts=True) if patients else None),
            counter.take(),
        )


class ValLoader:
    """Rank ``rank`` reads shards[rank::world_size] of the split; ranks may get unequal shares."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: PreTrainedTokenizerBase,
        shards: list[ShardInfo],
        rank: int,
        world_size: int,
        image: ImageInput,
    ) -> None:
        self.cfg = cfg
        self.shards = shards[rank::world_size]
        self.dataset = ValStream(cfg, image, tokenizer, self.shards)
        self.skip_counts: Counter[str] = Counter()  # skips of the latest pass, by reason
        self._blank = (cfg, image, tokenizer)

    @property
    def skipped(self) -> int:
        return skipped_total(self.skip_counts)

    def blank_batch(self) -> dict[str, Any]:
        """One blank patient (black eyes, empty report) batched like the split's: the forward a rank whose
        share is done runs while the others still embed, where a forward is a collective (ZeRO-3)."""
        cfg, image, tokenizer = self._blank
        black = io.BytesIO()
        Image.new("RGB", (cfg.decode_size, cfg.decode_size)).save(black, format="JPEG")
        raw = {
            "__key__": "blank",
            **{IMAGE_MEMBER[eye]: black.getvalue() for eye in EYES},
            REPORT_MEMBER: b"",
        }
        patient = SampleDecoder(cfg, image, seed=0, epoch=0, train=False, counter=SkipCounter())(raw)
        return collate([patient], tokenizer, cfg, with_texts=True)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Each pass counts its own skips: a val record's skipped_samples is that validation's, beside its
        # samples, not a total over every validation so far.
        self.skip_counts.clear()
        for batch, skips in guarded(
            data_loader(self.dataset, self.cfg), f"validation data ({self.cfg.val_split})"
        ):
            self.skip_counts.update(skips)
            if batch is not None:
                yield batch


def build_val_data(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    rank: int,
    world_size: int,
    image: ImageInput | None = None,
) -> ValLoader | None:
    """The validation loader, or None when no validation split is configured or the shard set has none.

    ``image`` as for ``build_train_data``: the model's input, or CLIP normalisation at ``data.image_size`` (CLIP's side when null).
    """
    if cfg.val_split is None:
        return None
    manifest = read_manifest(cfg.shards, cfg.storage_options)
    if not manifest.has_split(cfg.val_split):
        log.warning("%s has no %r split; training runs without validation", manifest.location, cfg.val_split)
        return None
    image = image or ImageInput.clip(cfg.image_size)
    return ValLoader(cfg, tokenizer, manifest.split(cfg.val_split), rank, world_size, image)
