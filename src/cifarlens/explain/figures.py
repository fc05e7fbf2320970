"""Pictures of explanations: overlays, per-image panels, galleries and per-class average maps.

House pattern of :mod:`cifarlens.plots`: ``matplotlib.figure.Figure`` with its own Agg canvas,
never pyplot, written with the atomic :func:`cifarlens.plots.save_figure`. Text that may hold
class names is drawn with ``parse_math=False`` (a ``$`` in a name would start mathtext).
An empty map (no evidence) is never drawn as a heatmap: the plain image and "no evidence".
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

COLORMAP = "jet"  # the usual CAM colormap (pytorch-grad-cam's default), so figures look familiar
NO_EVIDENCE = "no evidence (all-zero map)"


def _numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)


def _image_hwc(image) -> np.ndarray:
    """uint8 (C, H, W) with C = 1 or 3 -> uint8 (H, W, 3)."""
    img = _numpy(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"expected a uint8 image (C, H, W) with C = 1 or 3, got {img.dtype} {img.shape}")
    img = img.transpose(1, 2, 0)
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def _cam_hw(cam, size: tuple[int, int]) -> np.ndarray:
    """(h, w) map -> float64 (H, W) in [0, 1], bilinearly resized when its size differs."""
    c = torch.as_tensor(_numpy(cam), dtype=torch.float32)
    if c.ndim != 2:
        raise ValueError(f"expected a map (H, W), got shape {tuple(c.shape)}")
    if tuple(c.shape) != tuple(size):
        c = torch.nn.functional.interpolate(c[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return np.clip(np.nan_to_num(c.numpy().astype(np.float64)), 0.0, 1.0)


def with_glyph_fallback(plot):
    """:func:`cifarlens.plots.with_glyph_fallback` (class names in any script), imported when a figure is drawn:
    this module's overlays (the web app's) need no matplotlib settings."""
    import functools

    @functools.wraps(plot)
    def drawn(*args, **kwargs):
        from cifarlens.plots import with_glyph_fallback as fallback

        return fallback(plot)(*args, **kwargs)

    return drawn


def heatmap_rgb(cam) -> np.ndarray:
    """(H, W) map in [0, 1] -> float (H, W, 3) colours of the CAM colormap."""
    from matplotlib import colormaps

    c = _numpy(cam).astype(np.float64)
    return colormaps[COLORMAP](np.clip(c, 0.0, 1.0))[..., :3]


def overlay(image, cam, alpha: float = 0.5) -> np.ndarray:
    """A colormap heatmap of ``cam`` blended on ``image`` -> uint8 (H, W, 3).

    ``image``: uint8 (C, H, W), C = 1 or 3; ``cam``: (H, W) in [0, 1] (resized if its size
    differs). The blend weight of each pixel is ``alpha * cam``: where the map is zero the
    image shows unchanged, so an all-zero map gives the plain image, not a blue veil.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = _image_hwc(image).astype(np.float64) / 255.0  # (H, W, 3)
    c = _cam_hw(cam, img.shape[:2])
    weight = alpha * c[..., None]  # (H, W, 1)
    out = (1.0 - weight) * img + weight * heatmap_rgb(c)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def caption(classes: Sequence[str], *, pred: int, confidence: float, target: int, true: int | None = None) -> str:
    """ "true: cat  pred: dog (87%)  target: dog" (no "true" part for images without a label)."""
    parts = [f"true: {classes[true]}"] if true is not None else []
    parts += [f"pred: {classes[pred]} ({confidence:.0%})", f"target: {classes[target]}"]
    return "  ".join(parts)


def _new_figure(width: float, height: float):
    from cifarlens.plots import _new_figure as new_figure  # also selects the Agg backend

    return new_figure(width, height)


def _show_image(ax, img_hwc: np.ndarray) -> None:
    ax.imshow(img_hwc, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


@with_glyph_fallback
def plot_explanation(image, cam, path: str | os.PathLike, *, title: str = "", empty: bool = False,
                     alpha: float = 0.5) -> Path:
    """Original | heatmap | overlay for one image, saved as PNG; ``empty`` shows "no evidence"."""
    from cifarlens.plots import save_figure

    img = _image_hwc(image)
    fig = _new_figure(9.0, 3.5)
    axes = fig.subplots(1, 3)
    _show_image(axes[0], img)
    axes[0].set_title("original", fontsize=9)
    if empty:
        _show_image(axes[1], np.full_like(img, 255))
        axes[1].text(0.5, 0.5, "no evidence\n(all-zero map)", ha="center", va="center", fontsize=10,
                     color="gray", transform=axes[1].transAxes)
        _show_image(axes[2], img)
    else:
        c = _cam_hw(cam, img.shape[:2])
        heat = axes[1].imshow(c, cmap=COLORMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
        axes[1].set_xticks([])
        axes[1].set_yticks([])
        fig.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.04)
        _show_image(axes[2], overlay(image, c, alpha))
    axes[1].set_title("heatmap", fontsize=9)
    axes[2].set_title("overlay", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10, parse_math=False)
    return save_figure(fig, path)


@with_glyph_fallback
def plot_gallery(images, maps, captions: Sequence[str], path: str | os.PathLike, *, empty=None,
                 title: str = "", columns: int = 8, alpha: float = 0.5) -> Path:
    """A grid of overlays (N images (N, C, H, W) uint8, maps (N, H, W)) with a caption under each."""
    from cifarlens.plots import save_figure

    n = len(images)
    if n == 0 or len(maps) != n or len(captions) != n:
        raise ValueError(f"gallery needs as many maps and captions as images, got {n}, {len(maps)}, {len(captions)}")
    empty = [False] * n if empty is None else [bool(e) for e in empty]
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = _new_figure(1.9 * cols, 2.1 * rows + (0.4 if title else 0.0))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes[n:]:
        ax.axis("off")
    for i in range(n):
        if empty[i]:
            _show_image(axes[i], _image_hwc(images[i]))
            text = f"{captions[i]}\n{NO_EVIDENCE}"
        else:
            _show_image(axes[i], overlay(images[i], maps[i], alpha))
            text = captions[i]
        axes[i].set_title(text, fontsize=6, parse_math=False)
    if title:
        fig.suptitle(title, fontsize=10, parse_math=False)
    return save_figure(fig, path)


def class_average_maps(maps: Tensor, classes: Tensor, num_classes: int, empty: Tensor | None = None
                       ) -> tuple[Tensor, Tensor]:
    """Mean map per class: maps (N, H, W), classes (N,) -> (averages (K, H, W), counts (K,)).

    Empty maps are left out (they carry no evidence, and zeros would dilute the average);
    a class without maps has an all-zero average and count 0.
    """
    maps = torch.as_tensor(maps, dtype=torch.float32)
    classes = torch.as_tensor(classes, dtype=torch.long)
    keep = torch.ones_like(classes, dtype=torch.bool) if empty is None else ~torch.as_tensor(empty, dtype=torch.bool)
    sums = torch.zeros((num_classes, *maps.shape[1:]))
    sums.index_add_(0, classes[keep], maps[keep])
    counts = torch.bincount(classes[keep], minlength=num_classes)
    return sums / counts.clamp(min=1)[:, None, None], counts


@with_glyph_fallback
def plot_class_averages(averages: Tensor, counts: Tensor, class_names: Sequence[str], path: str | os.PathLike,
                        *, title: str = "") -> Path:
    """One panel per class with its average map, all on one colour scale (so classes compare)."""
    from cifarlens.plots import save_figure

    averages, counts = _numpy(averages), _numpy(counts)
    k = len(class_names)
    cols = min(k, 10)
    rows = math.ceil(k / cols)
    fig = _new_figure(1.6 * cols + 0.8, 1.8 * rows + (0.4 if title else 0.0))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    vmax = float(averages.max()) if averages.size and averages.max() > 0 else 1.0
    heat = None
    for i, ax in enumerate(axes):
        if i >= k:
            ax.axis("off")
            continue
        ax.set_xticks([])
        ax.set_yticks([])
        if counts[i] == 0:
            ax.text(0.5, 0.5, "no maps", ha="center", va="center", fontsize=7, color="gray", transform=ax.transAxes)
        else:
            heat = ax.imshow(averages[i], cmap=COLORMAP, vmin=0.0, vmax=vmax, interpolation="bilinear")
        ax.set_title(f"{class_names[i]} (n={int(counts[i])})", fontsize=7, parse_math=False)
    if heat is not None:
        fig.colorbar(heat, ax=list(axes[:k]), fraction=0.02, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=10, parse_math=False)
    return save_figure(fig, path)
