"""Shared helpers of the corruptions: the uint8 contract, seeded randomness, 1-D filters.

Every corruption takes uint8 images (B, C, H, W) with C = 1 or 3 and returns the same. Inside,
pixels are float32 in [0, 1]. The official generator ends every float corruption with
``np.uint8(x)``, which truncates, so :func:`to_uint8` truncates too (an epsilon of 1e-4 grey
levels absorbs float32 round-off such as 254.99998 for a value that is exactly 255). Where
the exact value is a whole number, the generator's float64 sometimes lands just under it
and gives one level less than we do: the one-level differences we measured against it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R 601 luma weights, as in cv2.cvtColor(RGB2GRAY) (snow) and for grey frost
LUMA = (0.299, 0.587, 0.114)


def check_images(images: Tensor, name: str) -> None:
    """A ValueError naming corruption ``name`` unless images are uint8 (B, C, H, W) with C in (1, 3)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name}: expected uint8 images (B, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")


def to_unit(images: Tensor, name: str) -> Tensor:
    """uint8 (B, C, H, W), C in (1, 3) -> float32 in [0, 1]; a ValueError naming ``name`` otherwise."""
    check_images(images, name)
    return images.float() / 255.0


def to_uint8(x: Tensor) -> Tensor:
    """[0, 1] floats -> uint8, truncating like the generator's ``np.uint8`` (clipped first)."""
    return (x * 255.0 + 1e-4).floor_().clamp_(0, 255).to(torch.uint8)


def uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator, device) -> Tensor:
    """U(low, high) samples drawn on the generator's device, then moved to ``device``."""
    u = torch.rand(shape, generator=generator, device=generator.device)
    return (low + (high - low) * u).to(device)


def numpy_rng(generator: torch.Generator) -> np.random.Generator:
    """A numpy Generator seeded from (and advancing) ``generator``, for the numpy-only parts."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return np.random.default_rng(seed)


def pad_index(n: int, r: int, mode: str, device) -> Tensor:
    """Indices into 0..n-1 of a signal padded by ``r`` on each side, in scipy.ndimage's modes:
    'nearest' (a a | a b c | c c), 'reflect' (b a | a b c | c b), 'mirror' (c b | a b c | b a)."""
    i = torch.arange(-r, n + r, device=device)
    if mode == "nearest":
        return i.clamp(0, n - 1)
    period = 2 * n if mode == "reflect" else max(2 * n - 2, 1)
    i = i.remainder(period)
    return torch.where(i < n, i, period - 1 - i if mode == "reflect" else period - i)


def conv_separable(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Correlate (..., H, W) with the 1-D ``kernel`` (odd length) along W then H, padded in ``mode``."""
    r = kernel.numel() // 2
    if r == 0:
        return x * kernel[0]
    shape = x.shape
    h, w = shape[-2:]
    y = x.reshape(-1, 1, h, w)
    k = kernel.to(x)
    y = y.index_select(-1, pad_index(w, r, mode, x.device))
    y = F.conv2d(y, k.view(1, 1, 1, -1))  # along W
    y = y.index_select(-2, pad_index(h, r, mode, x.device))
    y = F.conv2d(y, k.view(1, 1, -1, 1))  # along H
    return y.reshape(shape)


def gaussian_kernel(sigma: float, truncate: float) -> Tensor:
    """scipy.ndimage's 1-D Gaussian: radius int(truncate * sigma + 0.5), normalised to sum 1."""
    if sigma <= 1e-15:  # scipy leaves an axis with sigma 0 untouched
        return torch.ones(1, dtype=torch.float64)
    r = int(truncate * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_filter(x: Tensor, sigma: float, *, truncate: float = 4.0, mode: str = "nearest") -> Tensor:
    """scipy.ndimage.gaussian_filter over the last two axes of x (..., H, W), as skimage's
    ``gaussian`` calls it (default truncate 4, mode 'nearest')."""
    return conv_separable(x, gaussian_kernel(sigma, truncate), mode)


def to_gray(x: Tensor) -> Tensor:
    """(B, C, H, W) in [0, 1] -> (B, 1, H, W) luma (C = 1 is returned as is)."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def normal_tail_mean(mu: float, sigma: float, low: float, high: float = 1.0) -> float:
    """E[min(X, high) * 1{X >= low}] for X ~ N(mu, sigma^2): the mean of a thresholded, clipped layer."""
    def cdf(z: float) -> float:
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    def pdf(z: float) -> float:
        return math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)

    a, b = (low - mu) / sigma, (high - mu) / sigma
    inside = mu * (cdf(b) - cdf(a)) + sigma * (pdf(a) - pdf(b))  # E[X 1{low <= X < high}]
    return inside + high * (1 - cdf(b))
