"""Exact global-batch contrastive losses for RET-CLIP's three levels.

Layout: one collective helper (``gather_features``), pure per-level maths on local rows against global
columns, and ``TripartiteLoss`` summing the three levels.

Why the result is exact. Each rank holds b of the B = N * b pairs. It scores only its own b rows against
all B columns, so its logits take O(b * B) memory instead of O(B^2), and returns L_k, the mean over its
rows. Every global row belongs to exactly one rank, hence the global-batch loss is L = mean_k L_k.
Gradients: the all-gather's backward sums, for each rank's slice, the gradients coming from every rank's
loss, so rank r's features receive sum_k dL_k/dx_r = N * dL/dx_r, and its parameters get N times their
share of dL/dtheta. DDP (and DeepSpeed/Accelerate, which do the same) averages parameter gradients over
the N ranks, which cancels that factor: the averaged gradient is exactly dL/dtheta, the gradient of the
single-process loss on the concatenated batch. Parameters used directly in the loss (the logit scales and
biases) get dL_k/ds locally and their average is dL/ds as well.

``TripartiteLoss(gather=False)`` is the public release's only distributed mode (``--skip-aggregate``):
each rank's negatives are its own b rows, and the averaged gradient is that of mean_k L_k(local batch).

Identical reports (``duplicates="mask"``). Two patients whose reports reach the text tower as the same
token ids are not a negative pair: the tower cannot tell their texts apart, so pushing them apart only
teaches it noise. Each sample carries a 64-bit hash of those ids per level (data/samples.py
``token_hash``: after truncation to context_length and the tokenizer's normalisation);
``gather_report_hashes`` gathers them beside the features, and every row's logits against columns with
its own hash are removed from the softmax (-inf), except the row's own column, which stays the positive.
The mask depends only on the hashes, so each global row has the same mask on every world size and the
loss stays exact across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from retclip_dist.model.config import LEVELS

# torch 2.14 renamed the single-tensor collectives and deprecated the old names; clusters pinned to an
# older torch only have the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) inside ``group``; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _check_equal_rows(x: Tensor, group: dist.ProcessGroup | None, world: int) -> None:
    # Unequal shards would make the gather fail with an opaque size error or, worse, hang; every rank
    # runs this same check on the same gathered sizes, so all of them raise together.
    local = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=group)
    counts = torch.cat(sizes).tolist()
    if len(set(counts)) != 1:
        raise ValueError(
            f"gather_features: local batch sizes differ across ranks {counts}; every rank must contribute "
            "the same number of rows (drop the last partial batch; padding rows would change the loss)"
        )


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the sum of every rank's gradient for its rows."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None, world: int) -> Tensor:
        ctx.group = group
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        world = dist.get_world_size(ctx.group)
        local = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        _reduce_scatter_single(local, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return local, None, None


def gather_features(x: Tensor, group: dist.ProcessGroup | None = None, check_rows: bool = True) -> Tensor:
    """Rank-ordered concatenation of ``x`` from every rank, differentiable back to each rank's ``x``.

    Without an initialised process group (or with one rank) ``x`` is returned unchanged. ``check_rows``
    first compares every rank's row count (a small all-gather and a host read); a caller that knows the
    counts are as checked before passes False, and every rank must pass the same.
    """
    _, world = _world(group)
    if world == 1:
        return x
    if check_rows:
        _check_equal_rows(x, group, world)
    return _AllGather.apply(x, group, world)


def gather_report_hashes(hashes: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Rank-ordered concatenation of every rank's report hashes (int64, no gradient); unchanged on 1 rank.

    Call it after ``gather_features`` on the same rows: that gather has already checked that every rank
    holds the same number of rows.
    """
    _, world = _world(group)
    if world == 1:
        return hashes
    out = hashes.new_empty((world * hashes.shape[0], *hashes.shape[1:]))
    _all_gather_single(out, hashes.contiguous(), group=group)
    return out


def duplicate_mask(local_hashes: Tensor, all_hashes: Tensor, offset: int) -> Tensor:
    """[b, B] True where column j's report equals row i's report and j is not the row's own column."""
    same = local_hashes[:, None] == all_hashes[None, :]
    rows = torch.arange(local_hashes.shape[0], device=same.device)
    same[rows, rows + offset] = False
    return same


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _row_offset(local_rows: int, group: dist.ProcessGroup | None) -> int:
    rank, _ = _world(group)
    return rank * local_rows


def infonce_local(
    image_local: Tensor,
    text_local: Tensor,
    image_all: Tensor,
    text_all: Tensor,
    logit_scale: Tensor,
    offset: int,
    mask: Tensor | None = None,
) -> Tensor:
    """Symmetric InfoNCE of the local rows (global indices offset..offset+b) against all columns.

    ``mask`` [b, B] (``duplicate_mask``): columns left out of each row's softmax, in both directions
    (the relation "same report" is symmetric, so the text->image rows drop the same columns).
    """
    labels = torch.arange(image_local.shape[0], device=image_local.device) + offset
    i2t_logits = logit_scale * image_local @ text_all.T
    t2i_logits = logit_scale * text_local @ image_all.T
    if mask is not None:
        # -inf drops a column from the softmax exactly; the diagonal is never masked, so every row keeps
        # a finite logit and the loss and its gradient stay finite (0 for a row whose batch shares one report).
        i2t_logits = i2t_logits.masked_fill(mask, float("-inf"))
        t2i_logits = t2i_logits.masked_fill(mask, float("-inf"))
    image_to_text = F.cross_entropy(i2t_logits, labels)
    text_to_image = F.cross_entropy(t2i_logits, labels)
    return (image_to_text + text_to_image) / 2


def sigmoid_local(
    image_local: Tensor,
    text_all: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    offset: int,
    mask: Tensor | None = None,
) -> Tensor:
    """SigLIP loss of the local images against all texts, summed over texts, mean over local images.

    Each (image, text) pair is scored once, on the rank that holds the image, so texts are the only side
    that needs gathering. ``mask`` [b, B]: pairs left out of the sum (neither positive nor negative).
    """
    logits = logit_scale * image_local @ text_all.T + logit_bias
    rows = torch.arange(image_local.shape[0], device=image_local.device)
    signs = -torch.ones_like(logits)
    signs[rows, rows + offset] = 1.0
    terms = -F.logsigmoid(signs * logits)
    if mask is not None:
        terms = terms.masked_fill(mask, 0.0)
    return terms.sum(dim=1).mean()


def contrastive_loss(
    image_features: Tensor, text_features: Tensor, logit_scale: Tensor, group: dist.ProcessGroup | None = None
) -> Tensor:
    """One level's symmetric InfoNCE over the global batch; returns this rank's mean over its rows."""
    image_all = gather_features(image_features, group)
    text_all = gather_features(text_features, group)
    offset = _row_offset(image_features.shape[0], group)
    return infonce_local(image_features, text_features, image_all, text_all, logit_scale, offset)


def sigmoid_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """One level's SigLIP loss over the global batch; returns this rank's mean over its images."""
    text_all = gather_features(text_features, group)
    offset = _row_offset(image_features.shape[0], group)
    return sigmoid_local(image_features, text_all, logit_scale, logit_bias, offset)


class TripartiteLoss(nn.Module):
    """L = L_patient + L_left + L_right, each with its own scale (and bias for the sigmoid kind).

    All levels travel in one all-gather (features stacked on a level axis), so a step costs one gather
    instead of six. The rows of every rank are compared (a collective and a host read) at the first call
    and whenever this rank's row count changes, not at every step: every rank runs the same batch size
    and chunking, so they change together (a process that resumes or reshapes is a new process, and
    checks again at its first step).
    """

    def __init__(
        self,
        kind: Literal["infonce", "sigmoid"] = "infonce",
        group: dist.ProcessGroup | None = None,
        gather: bool = True,
        duplicates: Literal["mask", "keep"] = "keep",
    ):
        super().__init__()
        if kind not in ("infonce", "sigmoid"):
            raise ValueError(f"TripartiteLoss: unknown kind {kind!r}; expected 'infonce' or 'sigmoid'")
        self.kind = kind
        self.group = group
        # False: each rank scores its own batch against its own negatives only (the release's
        # --skip-aggregate); DDP's gradient average then optimises the mean of the per-rank losses.
        self.gather = gather
        if duplicates not in ("mask", "keep"):
            raise ValueError(f"TripartiteLoss: unknown duplicates {duplicates!r}; expected 'mask' or 'keep'")
        # "mask": same-report columns are not negatives (forward then needs report_hash); "keep": they are.
        # The trainer passes loss.duplicates (default "mask"); "keep" here keeps this module's plain maths
        # usable without hashes.
        self.duplicates = duplicates
        self._rows_checked: int | None = None  # local row count the ranks last agreed on

    def forward(
        self,
        image: Sequence[Tensor],
        text: Sequence[Tensor],
        logit_scale: Sequence[Tensor],
        logit_bias: Sequence[Tensor] | None = None,
        report_hash: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and {level: detached loss} for logging.

        Each argument holds one entry per level in LEVELS order, e.g. the model's PerLevel tuples; the
        argument names are RetClipOutput's field names (train/step.py ``output_loss`` passes them by name).
        ``report_hash`` [b, 3] int64: each local row's report token-id hash per level (the batch's
        ``report_hash``), needed with ``duplicates="mask"``.
        """
        if self.duplicates == "mask" and report_hash is None:
            raise ValueError(
                "TripartiteLoss(duplicates='mask') needs report_hash (the batch's report hashes)"
            )
        if self.kind == "sigmoid" and logit_bias is None:
            raise ValueError(
                "TripartiteLoss(kind='sigmoid') needs logit_bias; build the model with loss='sigmoid'"
            )
        # Towers may run in bf16 under autocast; logits over the global batch need float32's mantissa.
        image, text = [_at_least_fp32(x) for x in image], [_at_least_fp32(x) for x in text]
        rows = image[0].shape[0]
        check = rows != self._rows_checked
        self._rows_checked = rows
        gather = (
            partial(gather_features, group=self.group, check_rows=check) if self.gather else (lambda x: x)
        )
        offset = _row_offset(image[0].shape[0], self.group) if self.gather else 0
        if self.kind == "infonce":
            stacked = gather(torch.stack([*image, *text], dim=1))
            image_all, text_all = stacked[:, :3], stacked[:, 3:]
        else:
            text_all = gather(torch.stack(list(text), dim=1))
        masks: list[Tensor | None] = [None] * len(LEVELS)
        if self.duplicates == "mask":
            hashes_all = gather_report_hashes(report_hash, self.group) if self.gather else report_hash
            masks = [duplicate_mask(report_hash[:, i], hashes_all[:, i], offset) for i in range(len(LEVELS))]
        per_level: dict[str, Tensor] = {}
        for i, level in enumerate(LEVELS):
            if self.kind == "infonce":
                per_level[level] = infonce_local(
                    image[i], text[i], image_all[:, i], text_all[:, i], logit_scale[i], offset, masks[i]
                )
            else:
                per_level[level] = sigmoid_local(
                    image[i], text_all[:, i], logit_scale[i], logit_bias[i], offset, masks[i]
                )
        total = per_level["patient"] + per_level["left"] + per_level["right"]
        return total, {level: value.detach() for level, value in per_level.items()}
