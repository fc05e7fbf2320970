"""Test-time augmentation: the views of a batch whose weighted logits a TTA prediction averages.

One definition for every predictor: the engine (validation, evaluation), a loaded run, the
report and the ONNX backend of ``cifarlens serve`` (which calls :func:`tta_logits` with
onnxruntime as ``forward``), so that they all average the same views with the same weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor


def tta_views(x: Tensor, translate: int = 0) -> list[tuple[float, Tensor]]:
    """``(weight, view)`` pairs of a normalised batch ``x`` (B, C, H, W); the weights sum to 1.

    ``translate == 0``: the images and their mirror images, 0.5 each. ``translate > 0``: as
    airbench94's ``tta_level=2`` (Jordan 2024, arXiv:2404.00498), those two together weigh 0.5,
    and the other 0.5 goes to the images moved by ``translate`` pixels down-right and up-left
    (reflect padding fills the uncovered border), each with its mirror image: 0.125 each.
    """
    if translate < 0:
        raise ValueError(f"translate must be >= 0 pixels, got {translate}")
    views = [x, x.flip(3)]
    if translate == 0:
        return [(0.5, v) for v in views]
    h, w = x.shape[-2:]
    t = translate
    if t >= min(h, w):
        raise ValueError(f"a translation of {t} px needs images larger than {t} px, got {h}x{w}")
    padded = F.pad(x, (t, t, t, t), mode="reflect")  # (B, C, H + 2t, W + 2t)
    # output pixel (i, j) shows input pixel (i - t, j - t): the content moved down-right; then up-left
    moved = [padded[..., :h, :w], padded[..., 2 * t:2 * t + h, 2 * t:2 * t + w]]
    moved += [v.flip(3) for v in moved]
    return [(0.25, v) for v in views] + [(0.125, v) for v in moved]


def tta_logits(forward: Callable[[Tensor], Tensor], x: Tensor, translate: int = 0) -> Tensor:
    """The weighted sum of ``forward``'s logits (B, K) over :func:`tta_views` of ``x``; with
    ``translate == 0`` exactly ``0.5 * (forward(x) + forward(x.flip(3)))`` (halving is exact)."""
    logits = None
    for weight, view in tta_views(x, translate):
        term = forward(view) * weight
        logits = term if logits is None else logits + term
    return logits
