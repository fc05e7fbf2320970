"""Reading any common image into a uint8 tensor of the model's shape.

Used by the imagefolder reader, ``predict`` and the web app, so every path treats
16-bit, palette, transparent and grayscale images the same way.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cifarlens.errors import CifarlensError

# Decompression-bomb guard: refuse images with more pixels than this (PIL warns at 89 M).
MAX_PIXELS = 40_000_000

ImageSource = Union[str, Path, bytes, Image.Image]


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to "RGB" (channels=3) or "L" (channels=1)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grey: scale the actual range to 8 bits instead of clipping at 255
        array = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        if image.mode == "F":
            hi = 1.0 if array.max() <= 1.0 else float(array.max())
        image = Image.fromarray(np.clip(array / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparent pixels on white: their stored colour is often meaningless black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB" if channels == 3 else "L")


def open_image(source: ImageSource) -> Image.Image:
    """Open a path, bytes or PIL image; the first frame of animations; EXIF rotation applied."""
    if isinstance(source, Image.Image):
        return source
    name = "upload" if isinstance(source, bytes) else str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            if image.width * image.height > MAX_PIXELS:
                raise CifarlensError(
                    f"{name}: image of {image.width}x{image.height} pixels is too large (limit {MAX_PIXELS:,} pixels)"
                )
            image.seek(0)
            image.load()  # decode now, so truncated files fail here
        return ImageOps.exif_transpose(image)
    except CifarlensError:
        raise
    except FileNotFoundError:
        raise CifarlensError(f"image {name} not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise CifarlensError(f"{name}: image is too large (decompression bomb guard)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CifarlensError(f"cannot read image {name}: {str(err).splitlines()[0] if str(err) else 'not an image'}") from None


def load_image(source: ImageSource, channels: int, size: int) -> torch.Tensor:
    """Any image -> uint8 tensor (channels, size, size), resized with antialiasing."""
    image = to_mode(open_image(source), channels)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (C, H, W)
