"""What each epoch of a run trains on: how many of its batches (a partial last epoch, which a
time budget plans, cifarlens.budget) and at what image width (progressive resizing). Used by the
training loop (engine), the schedule (recipes) and the time budget's estimates (budget)."""

from __future__ import annotations

import math


def pruned_epoch(cfg, epoch: int) -> bool:
    """Whether epoch ``epoch`` (0-based) leaves out some easy images (``train.prune_easy``,
    :mod:`cifarlens.data.pruning`): every epoch but the first and the last."""
    return bool(getattr(cfg, "prune_easy", 0)) and 0 < epoch < cfg.epochs - 1


def whole_epoch_steps(cfg, epoch: int, steps_per_epoch: int) -> int:
    """Optimizer steps in a whole epoch ``epoch``: every batch, but in a pruned epoch
    (:func:`pruned_epoch`) 1 - prune_easy / 2 of them, rounded down (at least one), so that they
    hold only images kept (:mod:`cifarlens.data.pruning`)."""
    if pruned_epoch(cfg, epoch):
        return max(1, math.floor(steps_per_epoch * (1 - cfg.prune_easy / 2)))
    return steps_per_epoch


def epoch_steps(cfg, epoch: int, steps_per_epoch: int) -> int:
    """Optimizer steps in epoch ``epoch`` (0-based) of ``cfg`` (a TrainConfig): those of
    :func:`whole_epoch_steps`, but in the last epoch only ``cfg.last_epoch_fraction`` of its batches
    (at least one)."""
    if epoch < cfg.epochs - 1:
        return whole_epoch_steps(cfg, epoch, steps_per_epoch)
    return max(1, min(steps_per_epoch, round(cfg.last_epoch_fraction * steps_per_epoch)))


def progressive_side(full: int, epoch: int, min_side: int, epochs: int) -> int:
    """The width (pixels) of the training images in epoch ``epoch`` (0-based) under progressive
    resizing (fast.ai; FFCV's ramp): ``min_side`` in the first epoch, growing linearly towards
    ``full`` over ``epochs`` epochs in steps of 4 pixels (rounded down, never below ``min_side``),
    ``full`` from epoch ``epochs`` on. ``full`` when off (``min_side`` 0) or ``min_side >= full``.
    Early epochs cost less (FastNet at 24x24: about half the time of 32x32) and the last ones
    adapt the weights and BatchNorm statistics to the test images' scale."""
    if not min_side or epoch >= epochs or min_side >= full:
        return full
    return max(min_side, int(min_side + (full - min_side) * epoch / epochs) // 4 * 4)
