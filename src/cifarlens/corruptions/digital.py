"""Digital: contrast, elastic_transform, pixelate, jpeg_compression (CIFAR-10-C's last family).

* contrast: exact. Each channel's deviation from its own mean, scaled by ``factor``.
* elastic_transform: exact up to interpolation round-off. A random affine warp (three
  points around the centre moved by up to ``affine`` px, cv2.warpAffine's bilinear sampling
  with reflect-101 borders), then a smooth random displacement field (uniform noise, Gaussian
  smoothed, scaled by ``alpha``), sampled as scipy's map_coordinates(order=1, mode='reflect').
  Both resamplings are ``grid_sample``. In the paper's CIFAR table the affine jitter *falls*
  with severity (2.56 -> 0.96 px) while the elastic displacement grows from nothing.
* pixelate: exact. Pillow's BOX resize down to ``int(32 * factor)`` and back up, rebuilt as
  two separable weight matrices per pass with Pillow's 22-bit fixed-point rounding and its
  order (horizontal pass, 8-bit, vertical pass), batched on the images' device.
* jpeg_compression: exact. Pillow's JPEG encoder at the paper's qualities (per image, CPU).
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from cifarlens.corruptions._common import check_images, gaussian_filter, gaussian_kernel, to_uint8, to_unit, uniform


def contrast(images: Tensor, factor: float) -> Tensor:
    """(x - channel mean) * ``factor`` + channel mean."""
    x = to_unit(images, "contrast")  # (B, C, H, W)
    mean = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    return to_uint8(((x - mean) * factor + mean).clamp_(0, 1))


# -- elastic ----------------------------------------------------------------------------------


def elastic_rms_displacement(level: tuple[float, float, float]) -> float:
    """RMS length (px) of the elastic displacement, away from the borders: U(-1, 1) noise
    (variance 1/3) through the separable Gaussian k has variance (sum k^2)^2 / 3 per axis."""
    alpha, sigma, _affine = level
    k = gaussian_kernel(sigma, truncate=3.0)
    return float(alpha * math.sqrt(2 / 3) * (k**2).sum())


def _affine_grid(b: int, h: int, w: int, affine: float, generator: torch.Generator, device) -> Tensor:
    """Sampling grid (B, H, W, 2) of a random affine warp, for grid_sample(align_corners=True)."""
    cx, cy, s = w // 2, h // 2, min(h, w) // 3
    src = torch.tensor([[cx + s, cy + s], [cx + s, cy - s], [cx - s, cy - s]], dtype=torch.float64, device=device)
    dst = src + uniform((b, 3, 2), -affine, affine, generator, device).double()  # (B, 3, 2), (x, y) px
    ones = torch.ones(b, 3, 1, dtype=torch.float64, device=device)
    # cv2.warpAffine samples the source at M^-1(p), M taking src to dst: solve for dst -> src directly
    back = torch.linalg.solve(torch.cat([dst, ones], dim=2), src.expand(b, 3, 2))  # (B, 3, 2)
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    p = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).double().view(1, h * w, 3)
    q = (p @ back).view(b, h, w, 2)  # source (x, y) px of each output pixel
    scale = torch.tensor([w - 1, h - 1], dtype=torch.float64, device=device)
    return 2 * q / scale - 1


def elastic_transform(images: Tensor, level: tuple[float, float, float], generator: torch.Generator) -> Tensor:
    """``level`` = (displacement scale alpha px, smoothing sigma px, affine jitter px)."""
    alpha, sigma, affine = level
    # float64: sample positions must land on whole pixels exactly where the warp is the identity
    x = to_unit(images, "elastic_transform").double()
    b, _, h, w = x.shape
    # reflect-101 borders = reflection about the outer pixel centres = align_corners=True
    x = F.grid_sample(x, _affine_grid(b, h, w, affine, generator, x.device), mode="bilinear",
                      padding_mode="reflection", align_corners=True)
    noise = uniform((b, 2, h, w), -1.0, 1.0, generator, x.device).double()
    field = alpha * gaussian_filter(noise, sigma, truncate=3.0, mode="reflect")  # (B, 2, H, W): dx, dy px
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    # scipy's 'reflect' (about the outer pixel edges) = reflection with align_corners=False
    gx = (2 * (xs + field[:, 0]) + 1) / w - 1
    gy = (2 * (ys + field[:, 1]) + 1) / h - 1
    x = F.grid_sample(x, torch.stack([gx, gy], dim=-1), mode="bilinear", padding_mode="reflection",
                      align_corners=False)
    return to_uint8(x.clamp_(0, 1).float())


# -- pixelate ---------------------------------------------------------------------------------

PIL_PRECISION_BITS = 22  # Pillow's fixed-point coefficients for 8-bit images


@functools.lru_cache(maxsize=64)
def pil_box_weights(n_in: int, n_out: int) -> Tensor:
    """(n_out, n_in) integer weights of Pillow's BOX resample (scaled by 2^22), as its
    ``precompute_coeffs``: the input pixels whose centres fall in each output pixel's box
    (half-open (-1/2, 1/2]), equally weighted, each weight rounded to fixed point."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        centre = (o + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        taps = [i for i in range(lo, hi) if -0.5 < (i - centre + 0.5) / filterscale <= 0.5]
        for i in taps:
            weights[o, i] = math.floor(0.5 + (1 << PIL_PRECISION_BITS) / len(taps))
    return weights


def _pil_box_pass(x: Tensor, weights: Tensor, dim: int) -> Tensor:
    """One Pillow pass along ``dim`` (-1: W, -2: H) of integer-valued float64 x (B, C, H, W)."""
    w = weights.to(x.device)
    y = x @ w.T if dim == -1 else (w @ x)
    return torch.floor((y + (1 << (PIL_PRECISION_BITS - 1))) / (1 << PIL_PRECISION_BITS)).clamp_(0, 255)


def pil_box_resize(images: Tensor, h_out: int, w_out: int) -> Tensor:
    """uint8 (B, C, H, W) -> uint8 (B, C, h_out, w_out) as PIL's ``resize(..., Image.BOX)``."""
    h, w = images.shape[-2:]
    x = images.double()
    if w_out != w:
        x = _pil_box_pass(x, pil_box_weights(w, w_out), -1)  # horizontal first, to 8 bits
    if h_out != h:
        x = _pil_box_pass(x, pil_box_weights(h, h_out), -2)
    return x.to(torch.uint8)


def pixelate(images: Tensor, factor: float) -> Tensor:
    """BOX-resize to ``int(size * factor)`` and back (each output pixel copies one input pixel)."""
    check_images(images, "pixelate")
    h, w = images.shape[-2:]
    small = pil_box_resize(images, int(h * factor), int(w * factor))
    return pil_box_resize(small, h, w)


# -- jpeg -------------------------------------------------------------------------------------


def jpeg_compression(images: Tensor, quality: int) -> Tensor:
    """Encode each image as JPEG at ``quality`` with Pillow (its default 4:2:0 chroma) and decode."""
    check_images(images, "jpeg_compression")
    arrays = images.cpu().permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
    out = np.empty_like(arrays)
    for i, a in enumerate(arrays):
        pil = Image.fromarray(np.ascontiguousarray(a[..., 0] if a.shape[-1] == 1 else a))  # "L" or "RGB"
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=int(quality))
        with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
            out[i] = np.asarray(decoded.convert(pil.mode)).reshape(a.shape)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(images.device)
