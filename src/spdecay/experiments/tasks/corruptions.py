"""Deterministic image corruptions for OOD evaluation (the families of the paper's robustness
table: Gaussian noise, defocus blur, fog/contrast, brightness).

Inputs and outputs are N x C x H x W float tensors in [0, 1]. Each corruption draws any noise
from its own fixed generator, so the corrupted sets are identical across runs and machines.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

_SEED = 1234


def gaussian_noise(x: Tensor, sigma: float = 0.3) -> Tensor:
    gen = torch.Generator().manual_seed(_SEED)
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def defocus_blur(x: Tensor, radius: int = 2) -> Tensor:
    """Convolve with a normalised disk of the given radius (a defocused lens's point spread)."""
    r = torch.arange(-radius, radius + 1, dtype=x.dtype)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2 + 0.5).to(x.dtype)
    kernel = (disk / disk.sum()).expand(x.shape[1], 1, -1, -1)
    padded = F.pad(x, (radius,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=x.shape[1]).clamp(0, 1)


def fog(x: Tensor, contrast: float = 0.4, strength: float = 0.45) -> Tensor:
    """Lower the contrast and add a smooth, low-frequency haze."""
    gen = torch.Generator().manual_seed(_SEED + 1)
    n, _, h, w = x.shape
    haze = torch.rand((n, 1, 4, 4), generator=gen)
    haze = F.interpolate(haze, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + strength * haze).clamp(0, 1)


def brightness(x: Tensor, shift: float = 0.5) -> Tensor:
    return (x + shift).clamp(0, 1)


CORRUPTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "defocus_blur": defocus_blur,
    "fog": fog,
    "brightness": brightness,
}
