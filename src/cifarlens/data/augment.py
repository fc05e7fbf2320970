"""Batched augmentation on the training device.

Images stay uint8 (B, C, H, W) until a batch is drawn; every transform below works
on the whole batch at once, with a ``torch.Generator`` so a seed fixes the result.
This is much faster than per-image PIL transforms in DataLoader workers (see
``benchmarks/``) and it is the one place the augmentation levels are defined.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from cifarlens.errors import CifarlensError
from cifarlens.registry import unknown_name

# level -> which transforms run (crop = random crop with padding; jitter = colour jitter)
AUGMENT_LEVELS: dict[str, dict[str, bool]] = {
    "none": {"crop": False, "flip": False, "jitter": False},
    "flip": {"crop": False, "flip": True, "jitter": False},
    "standard": {"crop": True, "flip": True, "jitter": False},
    "strong": {"crop": True, "flip": True, "jitter": True},
}
FLIPS = ("random", "alternating")  # data.flip: see alternating_flips

# each level in the words of the literature table (cifarlens.report.baselines: "standard crop+flip")
LEVEL_WORDS = {"none": "none", "flip": "random flip", "standard": "standard crop+flip",
               "strong": "standard crop+flip + colour jitter"}


def normalize(images: Tensor, mean, std) -> Tensor:
    """uint8 or [0, 1] float (B, C, H, W) -> float32 normalised with per-channel mean/std."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    return (x - channel_constant(mean, x.device, x.dtype)) / channel_constant(std, x.device, x.dtype)


def channel_constant(values, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``values`` (C floats) as a (1, C, 1, 1) tensor on ``device``, made once per device:
    a new ``torch.tensor(..., device="cuda")`` every batch is a host-to-device copy that
    waits for the GPU, one pipeline stall per training step."""
    return _cached_constant(tuple(float(v) for v in values), device, dtype)


@functools.lru_cache(maxsize=64)
def _cached_constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    # a normal tensor even when first asked for under inference_mode: an inference tensor
    # could not be saved for backward by a later caller that differentiates through normalize
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)  # never written to


def random_crop(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad by ``padding`` pixels and take a random HxW window per image."""
    if padding <= 0:
        return images
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)  # (B, C, H+2p, W+2p), black border
    dy = torch.randint(0, 2 * padding + 1, (b,), device=images.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), device=images.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    chans = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_hflip(images: Tensor, generator: torch.Generator) -> Tensor:
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    return hflip_where(images, flip)


def hflip_where(images: Tensor, flip: Tensor) -> Tensor:
    """Mirror the images whose ``flip`` (B,) bool is set."""
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def alternating_flips(base: Tensor, epoch: int) -> Tensor:
    """Alternating flip (Jordan 2024, arXiv:2404.00498): an image is mirrored in epoch 0 by a
    fixed coin toss ``base`` (N,) bool, and in every later epoch the opposite of the epoch
    before, so each image is seen both ways every two epochs instead of at random."""
    return base ^ bool(epoch % 2)


def colour_jitter(x: Tensor, strength: float, generator: torch.Generator) -> Tensor:
    """Brightness, contrast and (for RGB) saturation, each scaled by U(1-s, 1+s). x in [0, 1]."""
    b = x.shape[0]

    def factor() -> Tensor:
        u = torch.rand(b, 1, 1, 1, device=x.device, generator=generator)
        return 1.0 + strength * (2 * u - 1)

    x = x * factor()  # brightness
    gray = _grayscale(x)
    x = (x - gray.mean(dim=(2, 3), keepdim=True)) * factor() + gray.mean(dim=(2, 3), keepdim=True)
    if x.shape[1] == 3:
        gray = _grayscale(x)
        x = gray + (x - gray) * factor()  # saturation
    return x.clamp(0.0, 1.0)


def _grayscale(x: Tensor) -> Tensor:
    if x.shape[1] != 3:
        return x
    return (x * channel_constant((0.299, 0.587, 0.114), x.device, x.dtype)).sum(dim=1, keepdim=True)


@dataclass(frozen=True)
class BatchAugment:
    """uint8 (B, C, H, W) -> augmented, normalised float32 (B, C, H, W).

    Order: crop, flip, ``image_policies`` (uint8 -> uint8: AutoAugment, RandAugment,
    TrivialAugmentWide), colour jitter, normalisation, ``tensor_policies`` (Cutout,
    RandomErasing: 0 is the mean colour there); see cifarlens.data.policies.
    """

    level: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = True  # False for datasets where a mirror image changes the label
    padding: int = 4
    jitter_strength: float = 0.2
    alternating_flip: bool = False  # the loader then passes each image's flip (see alternating_flips)
    image_policies: tuple = ()  # callables (uint8 images, generator) -> uint8 images
    tensor_policies: tuple = ()  # callables (normalised float images, generator) -> float images

    def __post_init__(self):
        if self.level not in AUGMENT_LEVELS:
            raise CifarlensError(unknown_name("augmentation level", self.level, list(AUGMENT_LEVELS)))

    def __call__(self, images: Tensor, generator: torch.Generator, flip: Tensor | None = None) -> Tensor:
        """``flip`` (B,) bool: which images to mirror (alternating flip); random when None."""
        steps = AUGMENT_LEVELS[self.level]
        if steps["crop"]:
            images = random_crop(images, self.padding, generator)
        if steps["flip"] and self.hflip:
            images = random_hflip(images, generator) if flip is None else hflip_where(images, flip)
        for policy in self.image_policies:
            images = policy(images, generator)
        x = images.float() / 255.0
        if steps["jitter"]:
            x = colour_jitter(x, self.jitter_strength, generator)
        x = normalize(x, self.mean, self.std)
        for policy in self.tensor_policies:
            x = policy(x, generator)
        return x
