"""Per-channel dataset statistics, as stored in ``DatasetInfo.mean`` / ``DatasetInfo.std``."""

from __future__ import annotations

import math

import torch

# A channel whose std is under one grey level (1/255) is constant for the network: e.g. the blue
# channel of a folder of red and green images, or RGB copies of grey scans. Dividing by its std
# would give NaN (std 0) or blow a stray pixel's difference up hundreds of times; its std is
# then reported as 1.0, so normalisation only centres it.
FLAT_STD = 1 / 255


def channel_stats(images_uint8: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of (N, C, H, W) uint8 images, on the [0, 1] scale.

    Works on a 256-bin histogram per channel, accumulated over chunks of ``chunk`` images
    (so 50k images never exist as one wide copy); sums come out as exact integers and are
    combined in float64: std = sqrt(E[x^2] - E[x]^2) over all N*H*W pixels of a channel; 1.0
    for a channel whose std is under FLAT_STD.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) uint8 images, got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    n, c, h, w = images_uint8.shape
    if n * h * w == 0:
        raise ValueError("cannot compute statistics of an empty image set")
    hist = torch.zeros(c, 256, dtype=torch.int64)  # (C, 256) pixel counts per value
    for start in range(0, n, chunk):
        batch = images_uint8[start : start + chunk]  # (B, C, H, W)
        for ch in range(c):
            hist[ch] += torch.bincount(batch[:, ch].reshape(-1), minlength=256)
    values = torch.arange(256, dtype=torch.int64)
    count = n * h * w
    means, stds = [], []
    for s, s2 in zip((hist * values).sum(1).tolist(), (hist * values * values).sum(1).tolist()):
        # Exact integer variance numerator, count*sum(x^2) - sum(x)^2 (Python ints do not overflow).
        var = (count * s2 - s * s) / (count * count * 255.0**2)
        means.append(s / (count * 255.0))
        stds.append(math.sqrt(var) if math.sqrt(var) >= FLAT_STD else 1.0)
    return tuple(means), tuple(stds)
