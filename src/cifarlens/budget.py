"""Fit a training run into a time budget (``--time-budget 10m``, ``train.time_budget`` in seconds).

A recipe fixes its number of epochs, but what they cost depends on the machine: the same
fastnet step takes 276 ms on one 2-core cloud CPU and 770 ms on another (docs/benchmarks.md,
*Machines*). With a budget, training first times a few real steps at each image width the
run could use, on a copy of the model and optimizer (the run itself is untouched), and then
trains the largest number of epochs whose estimated time fits. The recipe's schedule is
stretched or shrunk to those epochs: the progressive-resizing ramp and multistep milestones
keep their share of the run, warm-up keeps its length. From there the run is as
deterministic as any other: config.yaml holds the epochs chosen, ``--resume`` continues them.

The budget covers what ``cifarlens bench`` counts as training time (the epochs with their
validation passes) plus the timing itself; reading the data, the final evaluation and the
report come on top. Epochs are whole, so a run of few long epochs can end well under its
budget (on the slowest machine seen, 3 epochs of ~150 s used 74-82 % of 10 minutes), and the
estimate is only as steady as the machine: the log warns once when the epochs run slow enough
to end over the budget, and says at the end how the run compared.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
import statistics
import time
from dataclasses import dataclass, replace

import torch

from cifarlens.config import TrainConfig
from cifarlens.engine import Precision, WeightEMA, evaluate, progressive_side, train_one_epoch
from cifarlens.errors import CifarlensError

TIMED_STEPS = 4  # per image width, after one untimed step (oneDNN / cuDNN set themselves up on a new shape)
MAX_STRETCH = 4  # a budget may give at most 4x the recipe's epochs
EVAL_BATCHES = 2  # validation batches timed to estimate a validation pass
PACE_SLACK = 0.05  # warn once when, at the pace of the epochs so far, training would end this far over

_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds in ``"600"``, ``"600s"``, ``"10m"``, ``"1.5h"`` or ``"1h30m"``."""
    parts = re.fullmatch(r"\s*((?:\d+(?:\.\d*)?|\.\d+)\s*(?:s|min|m|h)?\s*)+", text or "")
    if parts is None:
        raise CifarlensError(f"{text!r} is not a duration: give seconds (600) or a number with s, m or h "
                             "(600s, 10m, 1.5h, 1h30m)")
    return sum(float(n) * _UNITS[unit] for n, unit in re.findall(r"(\d+(?:\.\d*)?|\.\d+)\s*(min|s|m|h)?", text))


@dataclass
class BudgetPlan:
    train: TrainConfig  # the config with the epochs (and ramp, milestones) chosen
    probe_s: float  # time spent timing steps, counted in the budget
    step_s: dict[int, float]  # image width -> seconds per training step
    eval_s: float  # seconds per validation pass (0 without one)
    epoch_s: list[float]  # estimated seconds of each epoch
    warned: bool = False  # pace() has warned (it warns once)

    @property
    def estimate_s(self) -> float:  # estimated time of the epochs
        return sum(self.epoch_s)

    def pace(self, epochs_done: int, seconds: float) -> str | None:
        """A warning, the first time the epochs so far ran slow enough against their estimate
        that the rest, at the same pace, would end training more than PACE_SLACK over the
        budget; ``seconds``: the training time so far, timing included. The plan stays: a
        schedule is not cut short mid-run, but the user learns now rather than at the end."""
        done, left = self.epoch_s[:epochs_done], self.epoch_s[epochs_done:]
        if self.warned or not done or not left:
            return None
        pace = (seconds - self.probe_s) / sum(done)  # actual / estimated
        projected = seconds + pace * sum(left)
        budget = self.train.time_budget
        if projected <= budget * (1 + PACE_SLACK):
            return None
        self.warned = True
        first = "epoch 1" if epochs_done == 1 else f"epochs 1-{epochs_done}"
        return (f"warning: {first} took {pace:.2f}x the estimate; at this pace training ends after about "
                f"{projected:.0f} s, {projected / budget - 1:.0%} over the time budget of {budget:g} s (the "
                f"machine is slower than when its steps were timed; the {len(done) + len(left)} planned epochs go on)")

    def as_dict(self) -> dict:  # run.json's "time_budget"
        return {"seconds": self.train.time_budget, "epochs": self.train.epochs,
                "estimate_s": round(self.estimate_s, 1), "timing_s": round(self.probe_s, 2),
                "step_ms": {str(s): round(t * 1000, 1) for s, t in self.step_s.items()},
                "val_pass_s": round(self.eval_s, 2)}

    def describe(self) -> str:
        t = self.train
        steps = ", ".join(f"{self.step_s[s] * 1000:.0f} ms at {s} px" for s in sorted(self.step_s))
        ramp = f" ({t.progressive_epochs} of them growing from {t.progressive_res} px)" if t.progressive_res else ""
        return (f"time budget {t.time_budget:.0f} s: {t.epochs} epoch{'s' * (t.epochs != 1)}{ramp}, "
                f"estimated {self.estimate_s:.0f} s "
                f"+ {self.probe_s:.1f} s of timing (a training step: {steps}"
                + (f"; a validation pass {self.eval_s:.1f} s" if self.eval_s else "") + ")")


def stretch(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """``cfg`` with ``epochs`` epochs: the progressive ramp and multistep milestones scaled in
    proportion (a ramp that rounds to 0 epochs is switched off)."""
    ratio = epochs / cfg.epochs
    ramp = round(cfg.progressive_epochs * ratio) if cfg.progressive_res else 0
    return replace(cfg, epochs=epochs, progressive_epochs=ramp, progressive_res=cfg.progressive_res if ramp else 0,
                   milestones=[m * ratio for m in cfg.milestones or []])


def epoch_sides(cfg: TrainConfig, full: int) -> list[int]:
    """The training image width of every epoch of ``cfg``."""
    return [progressive_side(full, e, cfg.progressive_res, cfg.progressive_epochs) if cfg.progressive_res else full
            for e in range(cfg.epochs)]


def epoch_seconds(cfg: TrainConfig, full: int, steps_per_epoch: int, step_s: dict[int, float],
                  eval_s: float) -> list[float]:
    return [steps_per_epoch * step_s[side] + eval_s for side in epoch_sides(cfg, full)]


def estimate_seconds(cfg: TrainConfig, full: int, steps_per_epoch: int, step_s: dict[int, float],
                     eval_s: float) -> float:
    return sum(epoch_seconds(cfg, full, steps_per_epoch, step_s, eval_s))


def smaller_costs_no_more(step_s: dict[int, float]) -> dict[int, float]:
    """Step times with each width's capped at the next larger width's. A width whose timed steps
    met a busy spell of a shared CPU would otherwise be over-estimated (seen: 1.2 s a step at
    28 px against 1.0 s at 32 px, where the epoch at 28 px then ran at 0.65 s a step)."""
    capped, cap = {}, math.inf
    for side in sorted(step_s, reverse=True):
        cap = capped[side] = min(step_s[side], cap)
    return dict(sorted(capped.items()))


def plan_budget(model: torch.nn.Module, train_loader, val_loader, precision: Precision, cfg: TrainConfig,
                *, tta: bool = False) -> BudgetPlan:
    """Time training steps (and a validation pass) of ``model`` on this machine and choose the
    epochs for ``cfg.time_budget`` seconds. ``cfg``: resolved, its epochs the recipe's. Raises
    :class:`CifarlensError` when not even one epoch fits."""
    from cifarlens.recipes import build_optimizer, param_groups  # recipes builds on this layer's engine

    start = time.perf_counter()
    budget, steps_per_epoch = cfg.time_budget, len(train_loader)
    batches = iter(train_loader)
    first = next(batches)
    full_side = first[0].shape[-1]  # the training images' width, (B, C, H, W)
    batches = itertools.chain([first], batches)
    candidates = [stretch(cfg, e) for e in range(1, MAX_STRETCH * cfg.epochs + 1)]
    sides = sorted({s for c in candidates for s in epoch_sides(c, full_side)})
    probe = copy.deepcopy(model)
    optimizer = build_optimizer(param_groups(probe, cfg), cfg)
    for group in optimizer.param_groups:  # the same work at lr 0: no warm-up here, and nothing to diverge
        group["lr"] = 0.0
    ema = WeightEMA(probe, cfg.ema_decay) if cfg.ema_decay else None
    sync = torch.cuda.synchronize if precision.device.type == "cuda" else (lambda: None)
    step_s: dict[int, float] = {}
    for side in sides:
        times = []
        for i in range(TIMED_STEPS + 1):
            began = time.perf_counter()  # the batch's augmentation included, as in training
            batch = next(batches, None)
            if batch is None:  # a dataset of a few batches: start it again
                batches = iter(train_loader)
                batch = next(batches)
            train_one_epoch(probe, [batch], optimizer, None, precision, label_smoothing=cfg.label_smoothing,
                            grad_clip=cfg.grad_clip, ema=ema, desc="timing", train_side=lambda full, s=side: s)
            sync()
            if i:
                times.append(time.perf_counter() - began)
        step_s[side] = statistics.median(times)
    step_s = smaller_costs_no_more(step_s)
    eval_s = 0.0
    if val_loader is not None:
        began = time.perf_counter()
        some = list(itertools.islice(iter(val_loader), EVAL_BATCHES))
        evaluate(ema.module if ema is not None else probe, some, precision, tta, cfg.tta_translate or 0)
        sync()
        eval_s = (time.perf_counter() - began) / len(some) * len(val_loader)
    del probe, optimizer, ema
    probe_s = time.perf_counter() - start
    left = budget - probe_s
    fitting = [c for c in candidates if estimate_seconds(c, full_side, steps_per_epoch, step_s, eval_s) <= left]
    if not fitting:
        one = estimate_seconds(candidates[0], full_side, steps_per_epoch, step_s, eval_s)
        raise CifarlensError(
            f"the time budget of {budget:.0f} s is too short for one epoch here: timing took {probe_s:.1f} s and an "
            f"epoch takes about {one:.0f} s on this machine; give at least {math.ceil(one + probe_s)} s "
            "(--time-budget), or train a smaller model")
    chosen = fitting[-1]
    epoch_s = epoch_seconds(chosen, full_side, steps_per_epoch, step_s, eval_s)
    return BudgetPlan(chosen, probe_s, step_s, eval_s, epoch_s)
