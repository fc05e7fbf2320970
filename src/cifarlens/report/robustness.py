"""Robustness: accuracy under common corruptions, generated on the fly, per corruption,
severity and class.

The corruptions are the 15 of the CIFAR-10-C protocol (Hendrycks & Dietterich 2019,
"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ICLR), at
their five CIFAR severities, from :mod:`cifarlens.corruptions` (which says which ones follow
the paper's generator exactly and which approximate it). Randomness comes from a
``torch.Generator`` per (corruption, severity) seeded from (seed, corruption, severity), so a
table is repeatable and does not depend on the order corruptions are evaluated in.
``cifarlens robustness`` (:mod:`cifarlens.report.cifar_c`) runs the full protocol, or reads
the official CIFAR-10-C / CIFAR-100-C files; the report uses the same code on a subset.

Cost: one pass over the subset per corruption and severity (45 by default), with the run's
flip TTA two forwards per image. The clean row can come from predictions already made
(``clean_correct``). Under a time budget, :func:`plan_subset` chooses from a quick measure of
the model's speed whether the full grid, severity 3 alone (slow models) or nothing is worth
starting, and :func:`robustness` grows the subset in rounds until its deadline.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cifarlens.corruptions import (
    CORRUPTIONS,
    MAX_SEVERITY,
    corrupt,
    list_corruptions,
    make_generator,
    missing_requirement,
)

__all__ = [
    "CORRUPTIONS", "RobustnessTable", "corrupt", "list_corruptions", "plan_subset", "robustness", "robustness_within",
]

DEFAULT_SEVERITIES = (1, 3, 5)
DEFAULT_MAX_IMAGES = 2000  # robustness runs on a seeded subset this large (45 passes over it by default)
# Under a time budget: grids tried in order, the smallest subset worth showing (the standard error
# of an accuracy near 70 % is ~3 points at 200 images), and the rounds the subset grows by.
BUDGET_GRIDS = (DEFAULT_SEVERITIES, (3,))
MIN_IMAGES, SUBSET_STEP = 200, 100


# -- the table ------------------------------------------------------------------------------

@dataclass
class RobustnessTable:
    """Accuracy on ``num_images`` test images, clean and under each corruption and severity."""

    clean_accuracy: float
    num_images: int
    total_images: int
    severities: list[int]
    rows: list[dict]  # {"corruption", "severity", "parameter", "unit", "accuracy", "per_class": [K accuracies]}
    seed: int = 0
    classes: list[str] = field(default_factory=list)
    class_counts: list[int] = field(default_factory=list)  # images of each class in the subset
    clean_per_class: list[float] = field(default_factory=list)
    source: str = "generated"  # "generated" (cifarlens.corruptions) or "files in DIR" (official .npy)
    unavailable: dict[str, str] = field(default_factory=dict)  # corruptions left out: why (e.g. frost's extra)

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

    def class_accuracy(self, corruption: str) -> list[float]:
        """Accuracy of each class under ``corruption``, averaged over the table's severities."""
        rows = [r["per_class"] for r in self.rows if r["corruption"] == corruption and r.get("per_class")]
        return [sum(col) / len(col) for col in zip(*rows)] if rows else []

    def as_dict(self) -> dict:
        return {"source": self.source, "clean_accuracy": self.clean_accuracy, "num_images": self.num_images,
                "total_images": self.total_images, "severities": self.severities, "seed": self.seed,
                "mean_corrupted_accuracy": self.mean_accuracy(), "classes": self.classes,
                "class_counts": self.class_counts, "clean_per_class": self.clean_per_class,
                "unavailable": self.unavailable, "rows": self.rows}

    @classmethod
    def from_dict(cls, d: dict) -> "RobustnessTable":
        keys = ("clean_accuracy", "num_images", "total_images", "severities", "rows", "seed", "classes",
                "class_counts", "clean_per_class", "source", "unavailable")
        table = cls(**{k: d[k] for k in keys if k in d})
        if table.clean_accuracy is None:  # written as null where it was not measured (JSON has no NaN)
            table.clean_accuracy = float("nan")
        return table


def per_class(hits: Tensor, counts: Tensor) -> list[float]:
    """Accuracy per class from correct predictions (K,) and images (K,) per class (0 for absent classes)."""
    return (hits.double() / counts.clamp_min(1)).tolist()


def cell_row(name: str, severity: int, hits: Tensor, counts: Tensor) -> dict:
    """One row of a table: a corruption at a severity, from correct predictions per class (K,)."""
    c = CORRUPTIONS.get(name)
    return {"corruption": name, "severity": severity, "parameter": c.levels[severity - 1], "unit": c.unit,
            "accuracy": int(hits.sum()) / max(int(counts.sum()), 1), "per_class": per_class(hits, counts)}


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
        self.num_classes = len(run.classes)
        self.correct: dict[tuple[str | None, int], Tensor] = {}  # (K,) correct predictions per class
        self.generators: dict[tuple[str, int], torch.Generator] = {}
        self.done: list[Tensor] = []  # the rounds every cell has seen

    def add(self, cell: tuple[str | None, int], index: Tensor) -> None:
        name, severity = cell
        images, labels = self.split.images[index], self.split.labels[index]
        if name is not None and cell not in self.generators:
            self.generators[cell] = make_generator(name, severity, self.seed)
        hits = torch.zeros(self.num_classes, dtype=torch.int64)
        for b in range(0, len(labels), self.batch_size):
            batch, truth = images[b : b + self.batch_size], labels[b : b + self.batch_size]
            if name is not None:
                batch = corrupt(batch, name, severity, generator=self.generators[cell])
            right = self.run.predict_proba(batch).argmax(dim=1) == truth  # (b,)
            hits += torch.bincount(truth[right], minlength=self.num_classes)
        self.correct[cell] = self.correct.get(cell, torch.zeros_like(hits)) + hits

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
        counts = torch.bincount(self.split.labels[used], minlength=self.num_classes)  # (K,)
        if clean_correct is not None:
            clean_hits = torch.bincount(self.split.labels[used][clean_correct[used].cpu()], minlength=self.num_classes)
        else:
            clean_hits = self.correct.get((None, 0), torch.zeros_like(counts))
        rows = [cell_row(name, int(s), self.correct[(name, int(s))], counts) for name in names for s in severities]
        return RobustnessTable(clean_accuracy=int(clean_hits.sum()) / max(len(used), 1), num_images=len(used),
                               total_images=len(self.split), severities=[int(s) for s in severities], rows=rows,
                               seed=self.seed, classes=list(self.run.classes), class_counts=counts.tolist(),
                               clean_per_class=per_class(clean_hits, counts))


def _check(split, names: list[str], grids, clean_correct: Tensor | None) -> None:
    for name in names:
        CORRUPTIONS.get(name)  # unknown names fail before any work
    for s in (s for grid in grids for s in grid):
        if not 1 <= s <= MAX_SEVERITY:
            raise ValueError(f"severities must lie in 1..{MAX_SEVERITY}, got {s}")
    if clean_correct is not None and clean_correct.shape != (len(split),):
        raise ValueError(f"clean_correct must be ({len(split)},), got {tuple(clean_correct.shape)}")


def _names(corruptions: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """The corruptions to run, and those left out with why: all 15 by default, less those this
    installation cannot run (frost without its extra); a name asked for explicitly always runs
    (and fails with its own message when it cannot)."""
    if corruptions is not None:
        return list(corruptions), {}
    missing = {n: missing_requirement(n) for n in list_corruptions()}
    return [n for n, why in missing.items() if why is None], {n: why for n, why in missing.items() if why}


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
    would end after the deadline. Corruptions run on the CPU (some need PIL or numpy); the model
    runs on the run's device.
    """
    names, unavailable = _names(None if corruptions is None else list(dict.fromkeys(corruptions)))
    severities = list(dict.fromkeys(int(s) for s in severities))  # each cell once: a repeat would count twice
    _check(split, names, [severities], clean_correct)
    grid = _Grid(run, split, seed, batch_size)
    rounds = [subset_indices(len(split), max_images, seed)] if deadline is None else _rounds(len(split), max_images, seed)
    grid.run_rounds(rounds, _cells(names, severities, clean_correct is None), deadline)
    table = grid.table(severities, names, clean_correct)
    table.unavailable = unavailable
    return table


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
    names, unavailable = _names(corruptions)
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
    table = grid.table(severities, names, clean_correct)
    table.unavailable = unavailable
    return table, per_image
