"""Noise: gaussian_noise, shot_noise, impulse_noise (CIFAR-10-C's first family).

All three follow the generator exactly in distribution: per pixel and channel, independent.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cifarlens.corruptions._common import to_uint8, to_unit, uniform


def gaussian_noise(images: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """clip(x + N(0, std^2)); ``std`` in units of the [0, 1] range."""
    x = to_unit(images, "gaussian_noise")  # (B, C, H, W)
    noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
    return to_uint8((x + std * noise).clamp_(0, 1))


def shot_noise(images: Tensor, photons: float, generator: torch.Generator) -> Tensor:
    """Poisson(x * photons) / photons: fewer photons, more noise (its std is sqrt(x / photons))."""
    x = to_unit(images, "shot_noise")
    counts = torch.poisson((x * photons).to(generator.device), generator=generator).to(x.device)
    return to_uint8((counts / photons).clamp_(0, 1))


def impulse_noise(images: Tensor, amount: float, generator: torch.Generator) -> Tensor:
    """Salt and pepper as skimage's ``random_noise(mode='s&p')``: each value is replaced with
    probability ``amount``, by 1 or 0 with equal odds."""
    x = to_unit(images, "impulse_noise")
    flipped = uniform(x.shape, 0, 1, generator, x.device) < amount
    salted = uniform(x.shape, 0, 1, generator, x.device) < 0.5
    x = torch.where(flipped & salted, torch.ones_like(x), x)
    x = torch.where(flipped & ~salted, torch.zeros_like(x), x)
    return to_uint8(x)
