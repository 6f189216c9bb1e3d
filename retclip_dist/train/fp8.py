"""train.fp8: float8 training of the towers' linear layers through torchao (an optional extra, `fp8`).

Only the transformer blocks' linears convert (ViT ``visual.blocks.*``, BERT ``text.encoder.layer.*``):
they hold nearly all the FLOPs. The patch embedding (a convolution), the shared image projection, the six
heads and the scales stay in the autocast dtype, since they are cheap and set the embedding geometry the
loss compares. float8 matrix multiplies need both sides of each linear divisible by 16; others stay too.
Converted layers keep their parameter names (``weight``, ``bias``), so checkpoints and optimiser groups
are unchanged.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

# float8 tensor cores: Ada (8.9) and Hopper (9.0) or newer.
FP8_MIN_CAPABILITY = (8, 9)
# The parts of the model whose linears convert, as name prefixes.
FP8_PREFIXES = ("visual.blocks.", "text.encoder.layer.")
# torch._scaled_mm needs each matrix dimension of a float8 linear to be a multiple of this.
FP8_DIM_MULTIPLE = 16


def fp8_unavailable_reason() -> str | None:
    """Why train.fp8 cannot run in this process (one line), or None when it can."""
    if importlib.util.find_spec("torchao") is None:
        return "needs torchao, which is not installed (pip install 'retclip-dist[fp8]')"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); none is visible"
    capability = torch.cuda.get_device_capability()
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name()
        return (
            f"needs compute capability 8.9 or newer (Ada, Hopper); {name} has {capability[0]}.{capability[1]}"
        )
    return None


def fp8_filter(module: nn.Module, fqn: str) -> bool:
    """torchao's module_filter_fn: convert a tower block's Linear whose both sides divide by 16."""
    return (
        type(module) is nn.Linear
        and fqn.startswith(FP8_PREFIXES)
        and module.in_features % FP8_DIM_MULTIPLE == 0
        and module.out_features % FP8_DIM_MULTIPLE == 0
    )


def fp8_linear_names(model: nn.Module) -> list[str]:
    """Names of the linears convert_fp8_ converts, in module order."""
    return [name for name, module in model.named_modules() if fp8_filter(module, name)]


def convert_fp8_(model: nn.Module) -> list[str]:
    """Swap the selected linears for torchao Float8Linear in place (before compile and wrapping); returns
    their names. Raises ImportError without torchao; validate() refuses train.fp8 before that."""
    from torchao.float8 import convert_to_float8_training  # optional extra: imported only when asked

    names = fp8_linear_names(model)
    convert_to_float8_training(model, module_filter_fn=fp8_filter)
    return names
