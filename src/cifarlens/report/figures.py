"""The report's figures, rendered straight to PNG bytes (they are embedded, never written).

Same house pattern as :mod:`cifarlens.plots`: ``matplotlib.figure.Figure`` with its own
Agg canvas, never pyplot, so nothing is left open and no backend is ever selected. Class
names go into matplotlib text only with ``parse_math=False`` (mathtext would interpret a ``$``
in them); captions are HTML, escaped by :mod:`cifarlens.report.html`.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from cifarlens.calibration import ReliabilityBins
from cifarlens.plots import with_glyph_fallback
from cifarlens.report.robustness import RobustnessTable

DPI = 110  # figures are shown at about page width; the house DPI (150) makes the HTML heavy


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # cached renderer, see cifarlens.plots._new_figure
    return fig


def figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def file_png(render, *args, **kwargs) -> bytes:
    """Bytes of a PNG written by one of :mod:`cifarlens.plots`' path-taking functions."""
    with tempfile.TemporaryDirectory(prefix="cifarlens-report-") as tmp:
        path = Path(tmp) / "figure.png"
        render(*args, path, **kwargs)
        return path.read_bytes()


def read_history(path: Path) -> list[dict]:
    """history.csv rows with numbers as floats (empty cells as None)."""
    if not path.is_file():
        return []

    def number(v: str | None) -> float | None:
        try:
            return float(v) if v not in (None, "") else None
        except ValueError:
            return None

    with path.open(newline="", encoding="utf-8") as f:
        return [{k: number(v) for k, v in row.items()} for row in csv.DictReader(f)]


@with_glyph_fallback
def reliability_diagram(bins: ReliabilityBins, subtitle: str = "") -> bytes:
    """Accuracy per confidence bin against the diagonal, with the bin counts below."""
    fig = _figure(6.0, 6.0)
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    edges = np.asarray(bins.edges)
    width = np.diff(edges)  # (n_bins,)
    counts = np.asarray(bins.counts)
    filled = counts > 0
    acc = np.where(filled, bins.accuracy, 0.0)
    conf = np.asarray(bins.confidence)
    top.bar(edges[:-1], acc, width=width, align="edge", color="C0", edgecolor="white", label="accuracy")
    # The gap to the mean confidence of each bin, drawn as a hatched band
    top.bar(edges[:-1][filled], (conf - acc)[filled], bottom=acc[filled], width=width[filled], align="edge",
            color="none", edgecolor="C3", hatch="//", linewidth=0.5, label="gap to confidence")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"reliability diagram{', ' + subtitle if subtitle else ''}\n(ECE {bins.ece:.2%}, "
                  f"{bins.num_samples} images)", fontsize=10)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(edges[:-1], counts, width=width, align="edge", color="C7", edgecolor="white")
    bottom.set_xlabel("confidence (top softmax probability)")
    bottom.set_ylabel("images")
    return figure_png(fig)


@with_glyph_fallback
def robustness_plot(table: RobustnessTable) -> bytes:
    """Accuracy against severity, one line per corruption, with clean accuracy dashed."""
    fig = _figure(7.0, 4.0)
    ax = fig.subplots()
    colours = matplotlib.colormaps["tab20"].colors  # 15 corruptions: more than the 10 default colours
    for i, name in enumerate(table.corruptions()):
        rows = [r for r in table.rows if r["corruption"] == name]
        ax.plot([r["severity"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o",
                color=colours[i % len(colours)], linestyle="-" if i < 10 else "--", label=name.replace("_", " "))
    ax.axhline(100 * table.clean_accuracy, color="black", linestyle="--", label="clean")
    ax.set_xticks(table.severities)
    ax.set_xlabel("severity")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: lines stay visible
    ax.set_title(f"accuracy under corruptions ({table.num_images} test images)")
    return figure_png(fig)


@with_glyph_fallback
def robustness_class_heatmap(table: RobustnessTable) -> bytes | None:
    """Accuracy per class (rows) under each corruption (columns, mean over severities), clean first."""
    names = table.corruptions()
    if not table.classes or not table.clean_per_class or not names:
        return None
    grid = np.array([table.clean_per_class] + [table.class_accuracy(n) for n in names]).T * 100  # (K, 1 + C)
    k = len(table.classes)
    absent = [i for i, n in enumerate(table.class_counts) if n == 0]  # no image of it in the subset
    grid[absent] = np.nan  # drawn blank: not an accuracy of 0
    fig = _figure(max(6.0, 0.45 * len(names) + 2.5), max(3.0, 0.3 * k + 1.5))
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(names) + 1), ["clean"] + [n.replace("_", " ") for n in names], rotation=60, ha="right",
                  fontsize=8)
    labels = [f"{c} (no images)" if i in absent else c for i, c in enumerate(table.classes)]
    ax.set_yticks(range(k), labels if k <= 30 else [""] * k, fontsize=8, parse_math=False)
    if k <= 20:  # numbers in the cells while they stay legible
        for i in set(range(k)) - set(absent):
            for j in range(len(names) + 1):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if grid[i, j] < 55 else "black")
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ax.set_title(f"per-class accuracy under corruption ({table.num_images} test images)")
    return figure_png(fig)


def image_png(image_hwc: np.ndarray, height: int = 112) -> bytes:
    """A uint8 (H, W, 3) or (H, W) array as PNG, scaled up by a whole factor to about ``height``
    pixels (nearest neighbour, so the model's pixels stay visible)."""
    im = Image.fromarray(np.ascontiguousarray(image_hwc))
    scale = max(1, math.floor(height / im.height))
    im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def side_by_side(images: Sequence[np.ndarray], gap: int = 2) -> np.ndarray:
    """(H, W, 3) uint8 arrays of equal height next to each other on a white background."""
    h = max(a.shape[0] for a in images)
    w = sum(a.shape[1] for a in images) + gap * (len(images) - 1)
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    x = 0
    for a in images:
        out[: a.shape[0], x : x + a.shape[1]] = a
        x += a.shape[1] + gap
    return out


def to_rgb(image_chw: np.ndarray) -> np.ndarray:
    """uint8 (C, H, W) with C = 1 or 3 -> (H, W, 3)."""
    a = np.asarray(image_chw).transpose(1, 2, 0)
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a
