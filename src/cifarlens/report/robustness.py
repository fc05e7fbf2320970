"""Robustness: accuracy under common corruptions, generated on the fly.

Each corruption is a pure, batched function of uint8 images (B, C, H, W) -> uint8
(B, C, H, W) with one physical parameter (a noise std, a blur sigma, ...). Severities
1..5 pick that parameter from a table; severity 0 is the identity. Randomness (only the
noise) comes from a ``torch.Generator`` seeded from (seed, corruption, severity), so a
table is repeatable and does not depend on the order corruptions are evaluated in.

The parameter tables follow the spirit of CIFAR-10-C (Hendrycks & Dietterich 2019,
"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations",
ICLR) for 32x32 images, but the implementations are our own simplifications
(brightness is an additive shift of all channels, not of HSV value), so the numbers
are *not* comparable with published CIFAR-10-C results.

Cost: one pass over the subset per corruption and severity (15 by default), with the run's
flip TTA two forwards per image. The clean row can come from predictions already made
(``clean_correct``). Under a time budget, :func:`plan_subset` chooses from a quick measure of
the model's speed whether the full grid, severity 3 alone (slow models) or nothing is worth
starting, and :func:`robustness` grows the subset in rounds until its deadline.
"""

from __future__ import annotations

import io
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cifarlens.registry import Registry

__all__ = [
    "CORRUPTIONS", "Corruption", "RobustnessTable", "brightness", "contrast", "corrupt", "gaussian_blur",
    "gaussian_noise", "jpeg", "list_corruptions", "plan_subset", "robustness", "robustness_within",
]

MAX_SEVERITY = 5
DEFAULT_SEVERITIES = (1, 3, 5)
DEFAULT_MAX_IMAGES = 2000  # robustness runs on a seeded subset this large (15 passes over it by default)
# Under a time budget: grids tried in order, the smallest subset worth showing (the standard error
# of an accuracy near 70 % is ~3 points at 200 images), and the rounds the subset grows by.
BUDGET_GRIDS = (DEFAULT_SEVERITIES, (3,))
MIN_IMAGES, SUBSET_STEP = 200, 100


# -- the corruptions, as functions of their physical parameter ------------------------------

def _to_unit(images: Tensor) -> Tensor:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    return images.float() / 255.0


def _to_uint8(x: Tensor) -> Tensor:
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def gaussian_noise(images: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """Add N(0, std^2) noise per pixel and channel; ``std`` in units of the [0, 1] range."""
    x = _to_unit(images)
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32, device=generator.device)
    return _to_uint8(x + std * noise.to(x.device))


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with standard deviation ``sigma`` pixels (reflect padding)."""
    x = _to_unit(images)
    if sigma <= 0:
        return images.clone()
    radius = max(1, math.ceil(3 * sigma))
    r = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)  # reflect padding needs radius < size
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()  # (2r+1,)
    b, c, h, w = x.shape
    y = x.reshape(b * c, 1, h, w)
    y = torch.nn.functional.pad(y, (r, r, r, r), mode="reflect")
    y = torch.nn.functional.conv2d(y, kernel.view(1, 1, 1, -1))  # along width
    y = torch.nn.functional.conv2d(y, kernel.view(1, 1, -1, 1))  # along height
    return _to_uint8(y.reshape(b, c, h, w))


def brightness(images: Tensor, shift: float) -> Tensor:
    """Add ``shift`` (in units of the [0, 1] range) to every pixel, clipped."""
    return _to_uint8(_to_unit(images) + shift)


def contrast(images: Tensor, factor: float) -> Tensor:
    """Scale each image's deviation from its own mean by ``factor`` (< 1 lowers contrast)."""
    x = _to_unit(images)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return _to_uint8((x - mean) * factor + mean)


def jpeg(images: Tensor, quality: int) -> Tensor:
    """Encode each image as JPEG at ``quality`` with PIL and decode it again."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images (B, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
    arrays = images.cpu().permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
    out = np.empty_like(arrays)
    for i, a in enumerate(arrays):
        im = Image.fromarray(np.ascontiguousarray(a[..., 0] if a.shape[-1] == 1 else a))  # "L" or "RGB"
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as decoded:
            out[i] = np.asarray(decoded.convert(im.mode)).reshape(a.shape)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(images.device)


# -- the registry: severity -> parameter -----------------------------------------------------

@dataclass(frozen=True)
class Corruption:
    name: str
    levels: tuple[float, ...]  # the parameter at severity 1..5
    unit: str  # what the parameter is, for tables
    fn: Callable[..., Tensor] = field(repr=False)
    random: bool = False  # takes a generator

    def parameter(self, severity: int) -> float:
        if not 1 <= severity <= len(self.levels):
            raise ValueError(f"severity must be 0..{len(self.levels)}, got {severity}")
        return self.levels[severity - 1]


CORRUPTIONS: Registry[Corruption] = Registry("corruption")


def _register(c: Corruption) -> None:
    CORRUPTIONS.register(c.name)(c)


_register(Corruption("gaussian_noise", (0.04, 0.06, 0.08, 0.09, 0.10), "noise std", gaussian_noise, random=True))
_register(Corruption("gaussian_blur", (0.4, 0.6, 0.7, 0.8, 1.0), "sigma (px)", gaussian_blur))
_register(Corruption("brightness", (0.05, 0.10, 0.15, 0.20, 0.30), "added brightness", brightness))
_register(Corruption("contrast", (0.75, 0.50, 0.40, 0.30, 0.15), "contrast factor", contrast))
_register(Corruption("jpeg", (80, 65, 58, 50, 40), "JPEG quality", jpeg))


def list_corruptions() -> list[str]:
    """Registered corruption names, sorted."""
    return CORRUPTIONS.names()


def _generator(name: str, severity: int, seed: int) -> torch.Generator:
    # crc32, not hash(): str hashes change between Python processes
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()) * 7 + severity)


def corrupt(images: Tensor, name: str, severity: int, *, seed: int = 0,
            generator: torch.Generator | None = None) -> Tensor:
    """Apply corruption ``name`` at ``severity`` (0 = unchanged copy) to uint8 (B, C, H, W) images."""
    c = CORRUPTIONS.get(name)
    if severity == 0:
        return images.clone()
    value = c.parameter(severity)
    if c.random:
        return c.fn(images, value, generator if generator is not None else _generator(name, severity, seed))
    return c.fn(images, value)


# -- the table ------------------------------------------------------------------------------

@dataclass
class RobustnessTable:
    """Accuracy on ``num_images`` test images, clean and under each corruption and severity."""

    clean_accuracy: float
    num_images: int
    total_images: int
    severities: list[int]
    rows: list[dict]  # {"corruption", "severity", "parameter", "unit", "accuracy"}
    seed: int = 0

    def accuracy(self, corruption: str, severity: int) -> float:
        for row in self.rows:
            if row["corruption"] == corruption and row["severity"] == severity:
                return row["accuracy"]
        raise KeyError((corruption, severity))

    def corruptions(self) -> list[str]:
        return list(dict.fromkeys(row["corruption"] for row in self.rows))

    def mean_accuracy(self, corruption: str | None = None) -> float:
        accs = [r["accuracy"] for r in self.rows if corruption is None or r["corruption"] == corruption]
        return float(sum(accs) / len(accs)) if accs else float("nan")

    def as_dict(self) -> dict:
        return {"clean_accuracy": self.clean_accuracy, "num_images": self.num_images,
                "total_images": self.total_images, "severities": self.severities, "seed": self.seed,
                "mean_corrupted_accuracy": self.mean_accuracy(), "rows": self.rows}


def subset_indices(n: int, max_images: int | None, seed: int) -> Tensor:
    """All of 0..n-1, or a seeded random subset of ``max_images`` of them in increasing order."""
    if max_images is None or n <= max_images:
        return torch.arange(n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:max_images].sort().values


def plan_subset(budget_s: float, per_image_s: float, available: int, *, corruptions: int,
                max_images: int | None = DEFAULT_MAX_IMAGES,
                grids: Sequence[Sequence[int]] = BUDGET_GRIDS) -> tuple[tuple[int, ...], int] | None:
    """(severities, number of images) of the first grid in ``grids`` whose passes over at least
    ``MIN_IMAGES`` images (or all ``available`` ones, if fewer) fit in ``budget_s`` seconds at
    ``per_image_s`` seconds per image and pass; None when none fits. (No safety margin: the
    deadline of :func:`robustness` keeps the budget; this only chooses what is worth starting.)"""
    cap = available if max_images is None else min(available, max_images)
    for severities in grids:
        passes = corruptions * len(severities)
        fits = int(budget_s / (passes * per_image_s)) if per_image_s > 0 else cap
        n = cap if fits >= cap else fits // SUBSET_STEP * SUBSET_STEP
        if n >= min(MIN_IMAGES, cap) and n > 0:
            return tuple(severities), n
    return None


def _rounds(n: int, max_images: int | None, seed: int) -> list[Tensor]:
    """The subset of :func:`subset_indices` as rounds of SUBSET_STEP images, each sorted: prefixes of
    one seeded permutation, so a subset cut short is still a random sample of the split."""
    cap = n if max_images is None else min(n, max_images)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:cap]
    return [order[i : i + SUBSET_STEP].sort().values for i in range(0, cap, SUBSET_STEP)]


class _Grid:
    """Correct predictions per (corruption, severity) cell, accumulated over rounds of images.

    One noise generator per cell, carried across rounds, so the noise an image gets depends on
    the images before it, never on timing. The cell (None, 0) is the clean images.
    """

    def __init__(self, run, split, seed: int, batch_size: int):
        self.run, self.split, self.seed, self.batch_size = run, split, seed, batch_size
        self.correct: dict[tuple[str | None, int], int] = {}
        self.generators: dict[tuple[str, int], torch.Generator] = {}
        self.done: list[Tensor] = []  # the rounds every cell has seen

    def add(self, cell: tuple[str | None, int], index: Tensor) -> None:
        name, severity = cell
        images, labels = self.split.images[index], self.split.labels[index]
        if name is not None and cell not in self.generators:
            self.generators[cell] = _generator(name, severity, self.seed)
        hits = 0
        for b in range(0, len(labels), self.batch_size):
            batch = images[b : b + self.batch_size]
            if name is not None:
                batch = corrupt(batch, name, severity, generator=self.generators[cell])
            hits += int((self.run.predict_proba(batch).argmax(dim=1) == labels[b : b + self.batch_size]).sum())
        self.correct[cell] = self.correct.get(cell, 0) + hits

    def run_rounds(self, rounds: list[Tensor], cells: list, deadline: float | None, skip=frozenset()) -> None:
        """Every cell on every round (but the cells in ``skip`` on the first, already done), stopping
        before a round that would end after ``deadline``; the first round always runs."""
        start = last = time.perf_counter()
        for r, index in enumerate(rounds):
            for cell in cells:
                if not (r == 0 and cell in skip):
                    self.add(cell, index)
            self.done.append(index)
            now = time.perf_counter()
            # the slower of the mean round and the last one: a machine that got busier stops sooner
            per_round, last = max((now - start) / len(self.done), now - last), now
            if deadline is not None and now + per_round > deadline:
                break

    def table(self, severities: Sequence[int], names: list[str], clean_correct: Tensor | None) -> RobustnessTable:
        used = torch.cat(self.done) if self.done else torch.zeros(0, dtype=torch.int64)
        n = max(len(used), 1)
        rows = [{"corruption": name, "severity": int(s), "parameter": CORRUPTIONS.get(name).parameter(s),
                 "unit": CORRUPTIONS.get(name).unit, "accuracy": self.correct[(name, int(s))] / n}
                for name in names for s in severities]
        if clean_correct is not None:
            clean = float(clean_correct[used].float().mean()) if len(used) else 0.0
        else:
            clean = self.correct.get((None, 0), 0) / n
        return RobustnessTable(clean_accuracy=clean, num_images=len(used), total_images=len(self.split),
                               severities=[int(s) for s in severities], rows=rows, seed=self.seed)


def _check(split, names: list[str], grids, clean_correct: Tensor | None) -> None:
    for name in names:
        CORRUPTIONS.get(name)  # unknown names fail before any work
    for s in (s for grid in grids for s in grid):
        if not 1 <= s <= MAX_SEVERITY:
            raise ValueError(f"severities must lie in 1..{MAX_SEVERITY}, got {s}")
    if clean_correct is not None and clean_correct.shape != (len(split),):
        raise ValueError(f"clean_correct must be ({len(split)},), got {tuple(clean_correct.shape)}")


def _cells(names: list[str], severities: Sequence[int], clean: bool) -> list[tuple[str | None, int]]:
    return [(name, int(s)) for name in names for s in severities] + ([(None, 0)] if clean else [])


def robustness(
    run,
    split,
    severities: Sequence[int] = DEFAULT_SEVERITIES,
    *,
    corruptions: Sequence[str] | None = None,
    max_images: int | None = DEFAULT_MAX_IMAGES,
    seed: int = 0,
    batch_size: int = 256,
    clean_correct: Tensor | None = None,
    deadline: float | None = None,
) -> RobustnessTable:
    """Accuracy of ``run`` (a :class:`cifarlens.api.Run`) on ``split`` (uint8 images and labels)
    under each corruption at each severity.

    At most ``max_images`` images are used (a seeded random subset) to keep the report fast.
    ``clean_correct`` (N,) bool, whether each image of ``split`` is already predicted right
    (the test evaluation), spares the clean pass. With ``deadline`` (a ``time.perf_counter()``
    value), the subset grows in rounds of ``SUBSET_STEP`` images and stops before a round that
    would end after the deadline. Corruptions run on the CPU (JPEG needs PIL); the model runs
    on the run's device.
    """
    names = list(corruptions) if corruptions is not None else list_corruptions()
    _check(split, names, [severities], clean_correct)
    grid = _Grid(run, split, seed, batch_size)
    rounds = [subset_indices(len(split), max_images, seed)] if deadline is None else _rounds(len(split), max_images, seed)
    grid.run_rounds(rounds, _cells(names, severities, clean_correct is None), deadline)
    return grid.table(severities, names, clean_correct)


def robustness_within(
    run,
    split,
    seconds: float,
    *,
    grids: Sequence[Sequence[int]] = BUDGET_GRIDS,
    corruptions: Sequence[str] | None = None,
    max_images: int | None = DEFAULT_MAX_IMAGES,
    seed: int = 0,
    batch_size: int = 256,
    clean_correct: Tensor | None = None,
) -> tuple[RobustnessTable | None, float]:
    """:func:`robustness` within about ``seconds``: (table, or None when nothing worth showing
    fits, and the measured seconds per image and pass).

    The speed is measured on real work: the first cell of the first round (at the severity
    the grids share, timed on its second half), which counts towards the table. From it :func:`plan_subset` chooses the
    first of ``grids`` worth starting; the subset then grows in rounds until the time is spent.
    """
    deadline = time.perf_counter() + seconds
    names = list(corruptions) if corruptions is not None else list_corruptions()
    _check(split, names, grids, clean_correct)
    rounds = _rounds(len(split), max_images, seed)
    if not rounds:
        return None, 0.0
    shared = set(grids[0]).intersection(*grids[1:])
    first = (names[0], int(min(shared) if shared else grids[-1][0]))
    grid = _Grid(run, split, seed, batch_size)
    # timed on its second half: the first half sets up the kernels (the first call of a shape is slower)
    half = len(rounds[0]) // 2
    grid.add(first, rounds[0][:half])
    start = time.perf_counter()
    grid.add(first, rounds[0][half:])
    per_image = (time.perf_counter() - start) / len(rounds[0][half:])
    plan = plan_subset(seconds, per_image, sum(len(r) for r in rounds), corruptions=len(names),
                       max_images=None, grids=grids)
    if plan is None:
        return None, per_image
    severities = plan[0]
    cells = _cells(names, severities, clean_correct is None)
    grid.run_rounds(rounds, cells, deadline, skip={first} if first in cells else frozenset())
    return grid.table(severities, names, clean_correct), per_image
