"""Weather: snow, frost, fog, brightness (CIFAR-10-C's third family).

* snow: the generator's steps, but its motion blur is our rebuild of ImageMagick's (the paper
  calls ImageMagick through Wand; see :mod:`.blur`, within one grey level of ImageMagick
  6.9.11). A thresholded, zoomed Gaussian snow layer, motion-blurred at an angle ~ U(-135,
  -45) degrees, added twice (as is and rotated by 180 degrees) to the image whitened towards
  1.5 * luma + 0.5; the layer passes through 8 bits twice, as in the generator.
* frost: exact given the photographs. The generator blends a random 32x32 crop of one of
  its frost photographs (frost1..frost5: its ``randint(5)`` never picks frost6) scaled by
  0.2 with cv2's bilinear resize. Those photographs ship, byte-identical, with the PyPI
  package ``imagecorruptions`` (``pip install 'cifarlens[corruptions]'``); we read them as
  image data only (no code of that package runs) and resize them with torch's bilinear
  resize at the same scale (cv2's fixed-point arithmetic may differ by one grey level).
  Grey images get the frost's luma.
* fog: exact in distribution. A diamond-square plasma fractal per image (numpy, seeded
  from the torch generator) added with ``strength`` and rescaled by max / (max + strength).
* brightness: exact. HSV value + shift, clipped, computed without the HSV round trip: at
  fixed hue and saturation RGB is proportional to the value, so RGB scales by V' / V.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from cifarlens.corruptions._common import (
    normal_tail_mean, numpy_rng, to_gray, to_uint8, to_unit, uniform,
)
from cifarlens.corruptions.blur import clipped_zoom, motion_blur_layer
from cifarlens.errors import CifarlensError

# -- snow -------------------------------------------------------------------------------------


def snow_amount(level: tuple[float, ...]) -> float:
    """Expected mean of the snow layer before its motion blur: E[min(X, 1) 1{X >= threshold}]."""
    loc, scale, _zoom, threshold = level[:4]
    return normal_tail_mean(loc, scale, threshold)


def snow(images: Tensor, level: tuple[float, ...], generator: torch.Generator) -> Tensor:
    """``level`` = (layer mean, layer std, layer zoom, threshold, blur radius px, blur sigma px,
    weight of the image against its whitened copy)."""
    loc, scale, zoom, threshold, radius, sigma, keep = level
    x = to_unit(images, "snow")  # (B, C, H, W)
    b, _, h, w = x.shape
    layer = loc + scale * torch.randn((b, 1, h, w), generator=generator, device=generator.device).to(x.device)
    layer = clipped_zoom(layer, zoom)
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer)
    layer = to_uint8(layer.clamp_(0, 1)).float() / 255.0  # the generator's 8-bit PNG of the layer
    angles = uniform((b,), -135.0, -45.0, generator, x.device)
    layer = motion_blur_layer(layer, radius, sigma, angles)
    layer = to_uint8(layer.clamp_(0, 1)).float() / 255.0  # ImageMagick's 8-bit output
    x = keep * x + (1 - keep) * torch.maximum(x, to_gray(x) * 1.5 + 0.5)
    return to_uint8((x + layer + layer.flip(-2, -1)).clamp_(0, 1))


# -- frost ------------------------------------------------------------------------------------

FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
FROST_SCALE = 0.2  # the generator shrinks the photographs to a fifth before cropping


def frost_folder() -> Path | None:
    """The folder of frost photographs bundled with ``imagecorruptions``, found without importing
    it (its import pulls in OpenCV and scikit-image); None when it is not installed."""
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "frost"
    return folder if all((folder / f).is_file() for f in FROST_FILES) else None


@functools.lru_cache(maxsize=1)
def frost_textures() -> tuple[Tensor, ...]:
    """The five frost photographs as uint8 (3, h, w), shrunk by FROST_SCALE like cv2.resize(INTER_LINEAR)."""
    folder = frost_folder()
    if folder is None:
        raise CifarlensError("frost needs the CIFAR-10-C frost photographs, which ship with imagecorruptions: "
                             "pip install 'cifarlens[corruptions]'")
    out = []
    for name in FROST_FILES:
        with Image.open(folder / name) as im:
            a = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float()  # (3, H, W)
        small = F.interpolate(a[None], scale_factor=FROST_SCALE, mode="bilinear", align_corners=False,
                              recompute_scale_factor=False)[0]  # source = (dst + 0.5) / 0.2 - 0.5, as cv2
        out.append(small.round_().clamp_(0, 255).to(torch.uint8))
    return tuple(out)


def frost_ratio(level: tuple[float, float]) -> float:
    """Weight of the frost relative to the image's."""
    return level[1] / level[0]


def frost(images: Tensor, level: tuple[float, float], generator: torch.Generator) -> Tensor:
    """``level`` = (image weight, frost weight): clip(a * image + b * frost crop)."""
    image_w, frost_w = level
    x = to_unit(images, "frost")
    b, c, h, w = x.shape
    textures = frost_textures()
    if any(t.shape[1] <= h or t.shape[2] <= w for t in textures):
        raise ValueError(f"frost: images of {h}x{w} are too large for the shrunk frost photographs")
    which = torch.randint(0, len(textures), (b,), generator=generator, device=generator.device).tolist()
    u = torch.rand((b, 2), generator=generator, device=generator.device).tolist()
    crops = []
    for i, (t, (uy, ux)) in enumerate(zip((textures[k] for k in which), u)):
        top, left = int(uy * (t.shape[1] - h)), int(ux * (t.shape[2] - w))  # randint(0, size - 32)
        crops.append(t[:, top : top + h, left : left + w])
    layer = torch.stack(crops).to(x.device).float() / 255.0  # (B, 3, H, W)
    if c == 1:
        layer = to_gray(layer)
    return to_uint8((image_w * x + frost_w * layer).clamp_(0, 1))


# -- fog --------------------------------------------------------------------------------------


def plasma_fractal(batch: int, size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """(batch, size, size) diamond-square height maps scaled to [0, 1]; ``size`` a power of two.

    Each step sets the centres of the squares (the mean of their 4 corners) and then the
    mid-edges (the mean of their 4 diamond neighbours, wrapping around), each plus uniform
    jitter of +-wibble^2 (the generator's "wibble * uniform(-wibble, wibble)"); wibble starts
    at 100 and shrinks by ``decay`` per step."""
    if size & (size - 1):
        raise ValueError(f"plasma_fractal: size must be a power of two, got {size}")
    m = np.zeros((batch, size, size))
    wibble = 100.0
    step = size
    while step >= 2:
        half = step // 2

        def jittered(total: np.ndarray, wibble: float = wibble) -> np.ndarray:
            return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

        corners = m[:, ::step, ::step]  # (B, n, n)
        square = corners + np.roll(corners, -1, axis=1)
        square = square + np.roll(square, -1, axis=2)
        m[:, half::step, half::step] = jittered(square)
        centres, corners = m[:, half::step, half::step], m[:, ::step, ::step]
        m[:, ::step, half::step] = jittered(centres + np.roll(centres, 1, axis=1)
                                            + corners + np.roll(corners, -1, axis=2))
        m[:, half::step, ::step] = jittered(centres + np.roll(centres, 1, axis=2)
                                            + corners + np.roll(corners, -1, axis=1))
        step = half
        wibble /= decay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / m.max(axis=(1, 2), keepdims=True)


def fog(images: Tensor, level: tuple[float, float], generator: torch.Generator) -> Tensor:
    """``level`` = (fog strength, plasma decay: smaller is rougher)."""
    strength, decay = level
    x = to_unit(images, "fog")
    b, _, h, w = x.shape
    size = 1 << (max(h, w, 2) - 1).bit_length()  # the next power of two (32 for CIFAR)
    plasma = torch.from_numpy(plasma_fractal(b, size, decay, numpy_rng(generator))[:, :h, :w]).float()
    top = x.amax(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1), before the fog
    x = x + strength * plasma.to(x.device).unsqueeze(1)
    return to_uint8((x * top / (top + strength)).clamp_(0, 1))


# -- brightness -------------------------------------------------------------------------------


def brightness(images: Tensor, shift: float) -> Tensor:
    """HSV value + ``shift`` (clipped to [0, 1]) at the same hue and saturation."""
    x = to_unit(images, "brightness")
    v = x.amax(dim=1, keepdim=True)  # (B, 1, H, W), the HSV value
    v_new = (v + shift).clamp(0, 1)
    # black has no hue: it becomes grey at the new value
    out = torch.where(v > 0, x * (v_new / v.clamp_min(1e-12)), v_new.expand_as(x))
    return to_uint8(out.clamp_(0, 1))
