"""The paper's image augmentation as explicit per-sample parameters, applied on CPU or batched in torch.

Parameters are drawn in the loader worker from an RNG seeded by (seed, epoch, sample key), so the
augmentation of a patient does not depend on worker count, shard order or which path applies it. The CPU
path (PIL resize + torchvision ops on one image) and the device path (one batched ``grid_sample`` plus
tensor maths on the GPU) read the same parameter row, which is what lets tests hold them against each other.

Parameter row layout (float32, ``PARAM_COLUMNS`` wide):
  0-3  crop box x0, y0, width, height as fractions of the source image
  4    horizontal flip (1.0) or not (0.0)
  5-7  brightness, contrast, saturation factors (1.0: unchanged)
  8-11 erase box top, left, height, width as fractions of the output (zero size: no erasing)
Colour jitter runs in the fixed order brightness, contrast, saturation (torchvision permutes it per call);
a fixed order is what makes the two paths comparable and costs little diversity at a strength of 0.2.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from retclip_dist.data.config import DataConfig
from retclip_dist.model.config import ImageInput

# torchvision's rgb_to_grayscale weights: contrast and saturation are defined against this grey.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
PARAM_COLUMNS = 12
# RandomErasing's defaults (timm and torchvision): area fraction and log-uniform aspect range.
ERASE_AREA = (0.02, 1 / 3)
ERASE_RATIO = (0.3, 1 / 0.3)
ATTEMPTS = 10


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """RNG of one sample's augmentation, independent of where and when the sample is read."""
    digest = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed % 2**64, epoch, digest])


def identity_params() -> np.ndarray:
    """Parameters that only resize and normalise: whole image, no flip, no jitter, no erasing."""
    row = np.zeros(PARAM_COLUMNS, dtype=np.float32)
    row[2:4] = 1.0
    row[5:8] = 1.0
    return row


def _crop_box(rng: np.random.Generator, width: int, height: int, cfg: DataConfig) -> tuple[float, ...]:
    log_ratio = (math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]))
    for _ in range(ATTEMPTS):
        area = rng.uniform(*cfg.crop_scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        # Fractions of width and height whose pixel aspect is `ratio` and whose area fraction is `area`.
        w = math.sqrt(area * ratio * height / width)
        h = math.sqrt(area / ratio * width / height)
        if w <= 1.0 and h <= 1.0:
            return rng.uniform(0.0, 1.0 - w), rng.uniform(0.0, 1.0 - h), w, h
    return 0.0, 0.0, 1.0, 1.0


def _erase_box(rng: np.random.Generator) -> tuple[float, ...]:
    log_ratio = (math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]))
    for _ in range(ATTEMPTS):
        area = rng.uniform(*ERASE_AREA)
        ratio = math.exp(rng.uniform(*log_ratio))
        h, w = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if h < 1.0 and w < 1.0:
            return rng.uniform(0.0, 1.0 - h), rng.uniform(0.0, 1.0 - w), h, w
    return 0.0, 0.0, 0.0, 0.0


def sample_params(rng: np.random.Generator, width: int, height: int, cfg: DataConfig) -> np.ndarray:
    """One image's random augmentation parameters for a ``width`` x ``height`` source image."""
    row = identity_params()
    row[0:4] = _crop_box(rng, width, height, cfg)
    # Every draw is made whatever the settings, so turning one option on does not reshuffle the others.
    flip_draw = rng.random()
    row[4] = float(cfg.hflip and flip_draw < 0.5)
    row[5:8] = rng.uniform(1.0 - cfg.jitter, 1.0 + cfg.jitter, size=3)
    erase_draw = rng.random()
    box = _erase_box(rng)
    if erase_draw < cfg.erase_prob:
        row[8:12] = box
    return row


def erase_pixels(row: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """Erase box (top, left, height, width) in output pixels; the device path rounds identically."""
    top, left, h, w = (math.floor(float(v) * size + 0.5) for v in row[8:12])
    return top, left, h, w


def augment_cpu(image: Image.Image, row: np.ndarray, spec: ImageInput) -> torch.Tensor:
    """Apply one parameter row to a decoded RGB image: float tensor [3, size, size], normalised as ``spec``
    (the model's ImageInput) says."""
    size = spec.size
    x0, y0, w, h = (float(v) for v in row[0:4])
    width, height = image.size
    box = (x0 * width, y0 * height, (x0 + w) * width, (y0 + h) * height)
    out = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if row[4] > 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = TF.pil_to_tensor(out).float().div_(255.0)
    x = TF.adjust_brightness(x, float(row[5]))
    x = TF.adjust_contrast(x, float(row[6]))
    x = TF.adjust_saturation(x, float(row[7]))
    x = TF.normalize(x, spec.mean, spec.std)
    top, left, eh, ew = erase_pixels(row, size)
    if eh > 0 and ew > 0:
        x = TF.erase(x, top, left, eh, ew, torch.zeros(()))
    return x


def _sampling_grid(params: torch.Tensor, size: int) -> torch.Tensor:
    # Output pixel centres as fractions; the crop maps them into the source, align_corners=False style.
    u = (torch.arange(size, device=params.device, dtype=torch.float32) + 0.5) / size
    ux = torch.where(params[:, 4:5] > 0.5, 1.0 - u, u)
    gx = params[:, 0:1] + ux * params[:, 2:3]
    gy = params[:, 1:2] + u * params[:, 3:4]
    gx, gy = torch.broadcast_tensors(gx[:, None, :], gy[:, :, None])
    return torch.stack((gx, gy), dim=-1) * 2.0 - 1.0


def _erase_mask(params: torch.Tensor, size: int) -> torch.Tensor:
    # float64 so the pixel rounding matches erase_pixels() exactly.
    top, left, h, w = torch.floor(params[:, 8:12].double() * size + 0.5).long().unbind(1)
    idx = torch.arange(size, device=params.device)
    rows = (idx >= top[:, None]) & (idx < (top + h)[:, None])
    cols = (idx >= left[:, None]) & (idx < (left + w)[:, None])
    return (rows[:, :, None] & cols[:, None, :])[:, None]


def augment_batch(images: torch.Tensor, params: torch.Tensor, spec: ImageInput) -> torch.Tensor:
    """Batched ``augment_cpu``: uint8 [B, 3, S, S] and parameter rows [B, 12] -> normalised [B, 3, size, size]."""
    size = spec.size
    params = params.to(device=images.device, dtype=torch.float32)
    x = images.float().div_(255.0)
    x = F.grid_sample(
        x, _sampling_grid(params, size), mode="bicubic", padding_mode="border", align_corners=False
    )
    x = x.clamp_(0.0, 1.0)
    gray_w = torch.tensor(GRAY_WEIGHTS, device=x.device).view(1, 3, 1, 1)
    brightness, contrast, saturation = (params[:, i].view(-1, 1, 1, 1) for i in (5, 6, 7))
    x = (x * brightness).clamp_(0.0, 1.0)
    mean_gray = (x * gray_w).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    x = (contrast * x + (1.0 - contrast) * mean_gray).clamp_(0.0, 1.0)
    gray = (x * gray_w).sum(1, keepdim=True)
    x = (saturation * x + (1.0 - saturation) * gray).clamp_(0.0, 1.0)
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.masked_fill_(_erase_mask(params, size), 0.0)


class DeviceAugment:
    """Applies the parameters a device-path batch carries to its uint8 eye images, on ``device``.

    Batches from the CPU path carry no parameters and pass through unchanged, so the trainer can call
    this on every batch (training and evaluation alike: evaluation batches carry identity parameters).
    """

    def __init__(self, image: ImageInput, device: torch.device | str) -> None:
        self.image = image
        self.device = torch.device(device)

    def __call__(self, batch: dict) -> dict:
        if "left_params" not in batch:
            return batch
        out = {k: v for k, v in batch.items() if not k.endswith("_params")}
        for eye in ("left", "right"):
            images = batch[eye].to(self.device, non_blocking=True)
            out[eye] = augment_batch(images, batch[f"{eye}_params"], self.image)
        return out
