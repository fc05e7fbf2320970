"""Figures for a run: confusion matrix and training curves, written as PNG files.

Figures are built with ``matplotlib.figure.Figure`` directly rather than through
``pyplot``: nothing is registered in pyplot's global figure list, so there is
nothing to close or leak, no GUI backend is ever needed, and plotting from the
web app's worker threads is safe. Saving to PNG uses the Agg renderer. Agg is
also made pyplot's backend at import unless one was already chosen
(``MPLBACKEND``, ``matplotlib.use``, matplotlibrc, or an imported pyplot).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import matplotlib


def _backend_chosen() -> bool:
    # MPLBACKEND is how Jupyter selects its inline backend; rcParams holds matplotlib.use()
    # or a matplotlibrc choice; an imported pyplot may already have resolved one.
    get = getattr(matplotlib.rcParams, "_get_backend_or_none", lambda: None)  # private, mpl >= 3.8
    return "MPLBACKEND" in os.environ or get() is not None or "matplotlib.pyplot" in sys.modules


if not _backend_chosen():
    matplotlib.use("Agg")  # headless by default: never try to open a GUI

import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import Tensor  # noqa: E402

from cifarlens.io import atomic_write  # noqa: E402
from cifarlens.metrics import row_normalize  # noqa: E402

__all__ = ["plot_confusion_matrix", "plot_training_curves", "row_normalize", "save_figure"]

ANNOTATE_MAX_CLASSES = 20  # above this, numbers in cells are unreadable
DPI = 150
# Fonts that draw Chinese, Japanese and Korean class names, which matplotlib's own DejaVu Sans draws as
# boxes: the first one installed is added as the fallback for the glyphs the default font lacks.
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK KR", "Source Han Sans SC",
             "Source Han Sans", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Droid Sans Fallback", "Microsoft YaHei",
             "SimHei", "PingFang SC", "Hiragino Sans GB", "Hiragino Sans", "Yu Gothic", "Meiryo", "MS Gothic",
             "Malgun Gothic", "Apple SD Gothic Neo", "Arial Unicode MS")


def glyph_fallback() -> str | None:
    """The first installed font of :data:`CJK_FONTS`, to put behind matplotlib's default family
    (matplotlib >= 3.6 takes a glyph from the next family of the list that has it); None when there
    is none, or when the user chose a family (matplotlibrc, rcParams): theirs stands."""
    from matplotlib import font_manager

    if list(matplotlib.rcParams["font.family"]) != ["sans-serif"]:
        return None
    installed = {font.name for font in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in installed), None)


def with_glyph_fallback(plot):
    """Decorator of the functions that draw text into figures: :func:`glyph_fallback` behind the default
    family while they run (matplotlib's settings are the caller's again after: nothing global changes)."""
    import functools

    @functools.wraps(plot)
    def drawn(*args, **kwargs):
        fallback = glyph_fallback()
        if fallback is None:
            return plot(*args, **kwargs)
        with matplotlib.rc_context({"font.family": ["sans-serif", fallback]}):
            return plot(*args, **kwargs)

    return drawn


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG atomically: a temp file in the same folder, then ``os.replace``."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))  # mode follows the umask
    return path


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    # An Agg canvas caches its renderer; a bare Figure builds a new full-size one for
    # every text measurement (seaborn measures each tick label), which takes seconds.
    FigureCanvasAgg(fig)
    return fig


def _panel_size(num_classes: int) -> float:
    # Inches per square panel: ~0.45 in per class while cells are annotated, then
    # capped so 100 classes give ~0.14 in (≈10 pt) rows, enough for 4 pt tick labels.
    return float(min(max(5.0, 0.45 * num_classes), 14.0))


@with_glyph_fallback
def plot_confusion_matrix(
    cm: Tensor | np.ndarray | Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Counts and row-normalised confusion matrix side by side, saved as PNG.

    Rows are true labels, columns predictions. Cells carry numbers only up to
    20 classes; beyond that every class name is still shown, in small type.
    """
    counts = np.asarray(cm.detach().cpu() if isinstance(cm, Tensor) else cm).astype(np.int64)  # (C, C)
    n = counts.shape[0]
    if counts.shape != (n, n) or len(class_names) != n:
        raise ValueError(f"{len(class_names)} class names for a confusion matrix of shape {counts.shape}")
    normed = row_normalize(torch.from_numpy(counts)).numpy()  # (C, C) float64
    names = [str(s) for s in class_names]

    annotate = n <= ANNOTATE_MAX_CLASSES
    side = _panel_size(n)
    tick_fs = 8 if n <= 20 else (6 if n <= 50 else 4)
    annot_fs = 8 if n <= 10 else 6

    fig = _new_figure(2 * side + 2.5, side + 1.0)
    axes = fig.subplots(1, 2)
    panels = (
        (counts, "counts", "d", None, None),
        (normed, "normalised by row (recall on diagonal)", ".2f", 0.0, 1.0),
    )
    for ax, (data, subtitle, fmt, vmin, vmax) in zip(axes, panels):
        sns.heatmap(
            data,
            ax=ax,
            cmap="Blues",
            vmin=vmin,
            vmax=vmax,
            square=True,
            annot=annotate,
            fmt=fmt,
            annot_kws={"fontsize": annot_fs},
            # Tick labels are added only after both heatmaps exist: seaborn renders the
            # whole figure to check label overlap, which with 2 x 200 labels takes seconds.
            xticklabels=False,
            yticklabels=False,
            cbar_kws={"shrink": 0.8},
        )
        ax.set_title(subtitle, fontsize=10)
    centers = np.arange(n) + 0.5  # heatmap cell i spans [i, i + 1]
    for ax in axes:
        # every name, never thinned; parse_math off: a "$" in a name is text, not mathtext
        ax.set_xticks(centers, names, rotation=90, fontsize=tick_fs, parse_math=False)
        ax.set_yticks(centers, names, rotation=0, fontsize=tick_fs, parse_math=False)
        ax.tick_params(axis="both", length=0 if n > 20 else 3)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    if title:
        fig.suptitle(title, parse_math=False)  # it names the run folder
    return save_figure(fig, path)


def _series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) for rows where ``key`` holds a finite number."""
    xs, ys = [], []
    for i, row in enumerate(history):
        v = row.get(key)
        if v is None or not math.isfinite(float(v)):
            continue
        epoch = row.get("epoch")
        xs.append(float(i + 1 if epoch is None else epoch))
        ys.append(float(v))
    return xs, ys


@with_glyph_fallback
def plot_training_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Loss, accuracy and learning rate per epoch in three panels, saved as PNG.

    ``history`` rows carry ``epoch``, ``train_loss``, ``val_loss``, ``train_acc``,
    ``val_acc`` and ``lr``; any of them may be missing or None.
    """
    fig = _new_figure(15, 4.2)
    axes = fig.subplots(1, 3)
    panels = (
        ("loss", ("train_loss", "val_loss")),
        ("accuracy", ("train_acc", "val_acc")),
        ("learning rate", ("lr",)),
    )
    colors = {"train": "C0", "val": "C1", "lr": "C2"}  # the same split has the same colour in every panel
    for ax, (ylabel, keys) in zip(axes, panels):
        epochs: set[float] = set()
        for key in keys:
            xs, ys = _series(history, key)
            if not xs:
                continue
            epochs.update(xs)
            split = key.split("_")[0]
            # Markers keep a single-epoch history visible; they get in the way for long runs.
            marker = "o" if len(xs) <= 30 else None
            ax.plot(xs, ys, marker=marker, markersize=4, color=colors[split], label=split)
            if key == "lr" and min(ys) > 0 and max(ys) / min(ys) > 10:
                ax.set_yscale("log")
        if not epochs:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        elif len(keys) > 1:
            ax.legend()
        if epochs and max(epochs) - min(epochs) < 2:
            # A locator given one or two epochs invents fractional ticks; show the epochs themselves.
            ax.set_xticks(sorted(epochs))
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(ylabel)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    return save_figure(fig, path)
