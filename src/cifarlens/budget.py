"""Fit a training run into a time budget (``--time-budget 10m``, ``train.time_budget`` in seconds).

A recipe fixes its number of epochs, but what they cost depends on the machine: the same
fastnet step takes 276 ms on one 2-core cloud CPU and 770 ms on another (docs/benchmarks.md,
*Machines*). With a budget, training first times a few real steps at each image width the
run could use, on a copy of the model and optimizer (the run itself is untouched), and then
trains the longest run whose estimated time fits in all but PLAN_MARGIN of the budget: the
most whole epochs that fit, and then as much of one more epoch as fits, in twentieths of an
epoch (``train.last_epoch_fraction``: the last epoch trains on that share of its batches, and
the schedule ends with them). Whole epochs alone left 16-27 % of a 10-minute budget unused on
the slower machines (fifth to seventh sessions). The recipe's schedule is stretched or shrunk
to that length: the progressive-resizing ramp and multistep milestones keep their share of the
run, warm-up keeps its length. config.yaml keeps the recipe's epochs beside the budget, so a run
started again from it (``--config``) plans afresh for its own machine, as the first one did; the
plan is in run.json (``time_budget``) and in the checkpoint, which ``--resume`` continues.

The budget covers what ``cifarlens bench`` counts as training time (the epochs with their
validation passes) plus the timing itself; reading the data, the final evaluation and the
report come on top. The estimate is only as steady as the machine (the epochs after the timing
have taken from 24 % less to 69 % more than estimated on shared cloud CPUs, a spell lasting
minutes, docs/benchmarks.md), hence the margin, and a re-plan after each epoch
(BudgetPlan.replan): when the pace so far puts the end over the budget, or more than twice the
margin under it, the rest of the run is fitted again the same way (fewer or more twentieths
of an epoch, up to MAX_STRETCH x the recipe's epochs; the ramp in proportion, never longer), and the
learning-rate schedule's end moves with it without a jump (schedules.StepSchedule.retarget). So
a run is as deterministic as any other while the machine keeps the pace it was timed at; a
re-plan is logged, saved in the checkpoint (``--resume`` keeps it) and in run.json. The log
warns once when even the shortest rest ends over the budget, and says at the end how the run
compared.
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
from cifarlens.ema import WeightEMA
from cifarlens.engine import Precision, evaluate, train_one_epoch
from cifarlens.epochs import epoch_steps, progressive_side
from cifarlens.errors import CifarlensError
from cifarlens.models import unwrap_model
from cifarlens.schedules import build_optimizer, param_groups

TIMED_STEPS = 4  # per image width, after one untimed step (oneDNN / cuDNN set themselves up on a new shape)
MAX_STRETCH = 4  # a budget may give at most 4x the recipe's epochs
PARTS = 20  # the last epoch may be cut to a twentieth of an epoch's batches, or a multiple of it
PLAN_MARGIN = 0.05  # the plan fills the budget but this share, for estimates that come out short
EVAL_BATCHES = 2  # validation batches timed to estimate a validation pass
PACE_SLACK = 0.05  # warn once when, at the pace of the epochs so far, training would end this far over

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
# seconds alone ("600"), or hours, minutes, seconds, each at most once and in that order ("1h30m")
_DURATION = re.compile(rf"\s*{_NUMBER}\s*|\s*(?:{_NUMBER}\s*h\s*)?(?:{_NUMBER}\s*(?:min|m)\s*)?(?:{_NUMBER}\s*s\s*)?")


def parse_duration(text: str) -> float:
    """Seconds in ``"600"``, ``"600s"``, ``"10m"``, ``"1.5h"`` or ``"1h30m"``; a one-line error
    for anything else (``"1h30"``, ``"1m1m"``, ``"1.5.5"``)."""
    match = _DURATION.fullmatch(text or "")
    if match is None or not any(match.groups()):
        raise CifarlensError(f"{text!r} is not a duration: give seconds (600) or a number with s, m or h "
                             "(600s, 10m, 1.5h, 1h30m)")
    alone, hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return alone + 3600 * hours + 60 * minutes + seconds


def epochs_text(cfg: TrainConfig, detail: str = "") -> str:
    """"5 epochs", or with a partial last epoch "5 epochs, the last on 75% of its batches";
    ``detail`` goes after the epochs (" (2 of them growing from 24 px)")."""
    text = f"{cfg.epochs} epoch{'s' * (cfg.epochs != 1)}{detail}"
    return text if cfg.last_epoch_fraction >= 1 else f"{text}, the last on {cfg.last_epoch_fraction:.0%} of its batches"


# what a plan sets and a re-plan may change: the checkpoint's FitState.replanned holds them, config.yaml the recipe's
REPLANNED = ("epochs", "last_epoch_fraction", "progressive_epochs", "progressive_res", "milestones")


def plan_settings(cfg: TrainConfig) -> dict:
    """The REPLANNED settings of ``cfg`` (milestones left out when there are none): what a plan chose."""
    return {key: getattr(cfg, key) for key in REPLANNED if key != "milestones" or cfg.milestones}


@dataclass
class BudgetPlan:
    train: TrainConfig  # the config with the epochs (and ramp, milestones) chosen
    probe_s: float  # time spent timing steps, counted in the budget
    step_s: dict[int, float]  # image width -> seconds per training step
    eval_s: float  # seconds per validation pass (0 without one)
    epoch_s: list[float]  # estimated seconds of each epoch (after a re-plan: the epochs done, then the new ones)
    steps_per_epoch: int = 0
    full_side: int = 0  # the training images' width
    most_epochs: int = 0  # a re-plan may lengthen the run up to this many epochs (MAX_STRETCH x the recipe's)
    now: TrainConfig | None = None  # the plan after the re-plans so far (replan); None: train
    warned: bool = False  # replan() has warned of an overrun (it warns once)
    planned_s: float = 0.0  # the plan's own estimate, before any re-plan (estimate_s: the latest)
    # image width -> seconds per step in the first train.whiten_bias_epochs epochs, where the whitening
    # bias still trains (FastNet; a step without its gradient is ~4.5 % cheaper on a 2-core Intel VM); {}: as step_s
    first_step_s: dict[int, float] | None = None

    def __post_init__(self):
        self.now = self.now or self.train
        self.most_epochs = max(self.most_epochs, self.train.epochs)
        self.planned_s = self.planned_s or sum(self.epoch_s)

    @property
    def estimate_s(self) -> float:  # estimated time of the epochs
        return sum(self.epoch_s)

    def _estimates(self, cfg: TrainConfig) -> list[float]:
        return epoch_seconds(cfg, self.full_side, self.steps_per_epoch, self.step_s, self.eval_s, self.first_step_s)

    def replan(self, epochs_done: int, seconds: float) -> tuple[TrainConfig | None, list[str]]:
        """After ``epochs_done`` epochs and ``seconds`` of training (timing included), before the
        last epoch: at the pace of the epochs so far (their time / their estimate), where would
        training end? Within the budget and not more than 2 x PLAN_MARGIN under it, the plan
        stays. Otherwise the rest of the run becomes the longest that ends within the budget
        but PLAN_MARGIN: the plan stretched to fewer epochs or twentieths of one (as the plan
        itself was fitted, the ramp in proportion but never longer), from a twentieth of one more
        epoch up to ``most_epochs`` (a faster machine gets more epochs at full size). The caller
        moves the end of the learning-rate schedule with it (StepSchedule.retarget), so the
        decay still ends at the last step. Returns (the new plan or None, lines for the log); one line warns,
        once, when even the shortest rest ends more than PACE_SLACK over the budget."""
        done = self.epoch_s[:epochs_done]
        if not done or epochs_done >= self.now.epochs or not self.steps_per_epoch:
            return None, []
        pace = (seconds - self.probe_s) / sum(done)  # actual / estimated
        budget = self.train.time_budget

        def end(cfg: TrainConfig) -> float:
            return seconds + pace * sum(self._estimates(cfg)[epochs_done:])

        new, lines = None, []
        if not budget * (1 - 2 * PLAN_MARGIN) <= end(self.now) <= budget:
            target = self.probe_s + (budget - self.probe_s) * (1 - PLAN_MARGIN)
            ramp = self.now.progressive_epochs  # the current plan's: a longer one would shrink the images again
            rests = [stretch(self.train, k / PARTS)
                     for k in range(epochs_done * PARTS + 1, self.most_epochs * PARTS + 1)]
            rests = [replace(c, progressive_epochs=min(c.progressive_epochs, ramp)) for c in rests]
            fitting = [c for c in rests if end(c) <= target]
            new = fitting[-1] if fitting else rests[0]
            if all(getattr(new, key) == getattr(self.now, key) for key in REPLANNED):
                new = None
        first = "epoch 1" if epochs_done == 1 else f"epochs 1-{epochs_done}"
        if new is not None:
            lines.append(f"time budget {budget:g} s: {first} took {pace:.2f}x the estimate; the run now ends after "
                         f"{epochs_text(new)}, at about {end(new):.0f} s (planned before: {epochs_text(self.now)})")
            self.epoch_s = done + self._estimates(new)[epochs_done:]
            self.now = new
        projected = end(self.now)
        if not self.warned and projected > budget * (1 + PACE_SLACK):
            self.warned = True
            lines.append(f"warning: {first} took {pace:.2f}x the estimate; at this pace training ends after about "
                         f"{projected:.0f} s, {projected / budget - 1:.0%} over the time budget of {budget:g} s (the "
                         f"machine is slower than when its steps were timed; the run is already as short as a "
                         f"re-plan makes it: a twentieth of one more epoch)")
        return new, lines

    def as_dict(self, milestones: list[float] | None = None) -> dict:
        """run.json's "time_budget"; ``milestones``: where a multistep lr drops after the re-plans."""
        replanned = plan_settings(self.now) if self.now != self.train else None
        if replanned and milestones:
            replanned["milestones"] = milestones
        if replanned:  # the epochs done as they went, then the new plan's
            replanned["estimate_s"] = round(self.estimate_s, 1)
        return {"seconds": self.train.time_budget, **plan_settings(self.train),
                "estimate_s": round(self.planned_s, 1), "timing_s": round(self.probe_s, 2),
                "step_ms": {str(s): round(t * 1000, 1) for s, t in self.step_s.items()},
                **({"first_epochs_step_ms": {str(s): round(t * 1000, 1) for s, t in self.first_step_s.items()}}
                   if self.first_step_s else {}),
                "val_pass_s": round(self.eval_s, 2),
                "replanned": replanned}

    def describe(self) -> str:
        t = self.train
        first = self.first_step_s or {}
        steps = ", ".join(f"{self.step_s[s] * 1000:.0f} ms at {s} px"
                          + (f" ({first[s] * 1000:.0f} ms while the whitening bias trains)" if s in first else "")
                          for s in sorted(self.step_s))
        ramp = f" ({t.progressive_epochs} of them growing from {t.progressive_res} px)" if t.progressive_res else ""
        return (f"time budget {t.time_budget:g} s: {epochs_text(t, ramp)}, "
                f"estimated {self.estimate_s:.0f} s "
                f"+ {self.probe_s:.1f} s of timing (a training step: {steps}"
                + (f"; a validation pass {self.eval_s:.1f} s" if self.eval_s else "") + ")")


def budget_outcome(cfg: TrainConfig, plan: BudgetPlan | None, replanned: dict, epochs_done: int, seconds: float) -> str:
    """The log's line on how a budgeted run compared with its budget. ``plan``: None for a resumed run,
    which has no plan of its own (then the checkpoint's re-plan, ``replanned``, else the first plan)."""
    planned = plan.now if plan is not None else replace(cfg, **replanned)  # after the re-plans
    trained = planned if epochs_done == planned.epochs else replace(cfg, epochs=epochs_done, last_epoch_fraction=1.0)
    return (f"time budget {cfg.time_budget:g} s: trained {epochs_text(trained)}{',' * (trained.last_epoch_fraction < 1)} "
            f"in {seconds:.0f} s ({seconds / cfg.time_budget - 1:+.1%})")


def run_length(cfg: TrainConfig) -> float:
    """The epochs ``cfg`` trains, the last one counted by its share of batches (4.5: four and a half)."""
    return cfg.epochs - 1 + cfg.last_epoch_fraction


def stretch(cfg: TrainConfig, length: float) -> TrainConfig:
    """``cfg`` trained for ``length`` epochs (4.5: five, the last on half of its batches): the
    progressive ramp and multistep milestones scaled in proportion (a ramp that rounds to 0 epochs
    is switched off)."""
    ratio = length / run_length(cfg)
    epochs = max(1, math.ceil(length - 1e-9))
    ramp = round(cfg.progressive_epochs * ratio) if cfg.progressive_res else 0
    return replace(cfg, epochs=epochs, last_epoch_fraction=float(round(length - (epochs - 1), 6)),
                   progressive_epochs=ramp, progressive_res=cfg.progressive_res if ramp else 0,
                   milestones=[round(m * ratio, 3) for m in cfg.milestones or []])


def epoch_sides(cfg: TrainConfig, full: int) -> list[int]:
    """The training image width of every epoch of ``cfg``."""
    return [progressive_side(full, e, cfg.progressive_res, cfg.progressive_epochs) if cfg.progressive_res else full
            for e in range(cfg.epochs)]


def epoch_seconds(cfg: TrainConfig, full: int, steps_per_epoch: int, step_s: dict[int, float],
                  eval_s: float, first_step_s: dict[int, float] | None = None) -> list[float]:
    """Each epoch's estimated seconds; ``first_step_s``: the step times of the first
    ``cfg.whiten_bias_epochs`` epochs where they differ (BudgetPlan.first_step_s)."""
    first = first_step_s or {}
    return [epoch_steps(cfg, e, steps_per_epoch) * (first.get(side) if e < cfg.whiten_bias_epochs and side in first
                                                    else step_s[side]) + eval_s
            for e, side in enumerate(epoch_sides(cfg, full))]


def estimate_seconds(cfg: TrainConfig, full: int, steps_per_epoch: int, step_s: dict[int, float],
                     eval_s: float, first_step_s: dict[int, float] | None = None) -> float:
    return sum(epoch_seconds(cfg, full, steps_per_epoch, step_s, eval_s, first_step_s))


def possible_sides(cfg: TrainConfig, full: int) -> list[int]:
    """Every width a stretched ``cfg`` can train at: those of each ramp length up to MAX_STRETCH
    times the recipe's, and the full width."""
    if not cfg.progressive_res:
        return [full]
    most = math.ceil(cfg.progressive_epochs * MAX_STRETCH * cfg.epochs / run_length(cfg))
    return sorted({full} | {progressive_side(full, e, cfg.progressive_res, r)
                            for r in range(1, most + 1) for e in range(r)})


def first_sides(cfg: TrainConfig, full: int) -> list[int]:
    """Every width the first ``cfg.whiten_bias_epochs`` epochs of a stretched ``cfg`` can train at
    (24 px alone for fast_cpu_10min's ramp and one such epoch). Not the full width of a ramp stretched
    away (a run cut to about one epoch): those steps are estimated as the later ones, ~5 % short."""
    if not cfg.progressive_res:
        return [full]
    most = math.ceil(cfg.progressive_epochs * MAX_STRETCH * cfg.epochs / run_length(cfg))
    return sorted({progressive_side(full, e, cfg.progressive_res, r)
                   for r in range(1, most + 1) for e in range(cfg.whiten_bias_epochs)})


def longest_fitting(cfg: TrainConfig, seconds: float, estimate) -> TrainConfig | None:
    """``cfg`` stretched to the longest run whose ``estimate(stretched cfg)`` is at most
    ``seconds``: the most whole epochs (1 to MAX_STRETCH times the recipe's), then as many
    PARTS-ths of one more as fit; None when not even one epoch fits."""
    whole = [e for e in range(1, MAX_STRETCH * cfg.epochs + 1) if estimate(stretch(cfg, e)) <= seconds]
    if not whole:
        return None
    best = stretch(cfg, whole[-1])
    if whole[-1] < MAX_STRETCH * cfg.epochs:
        for part in range(1, PARTS):
            longer = stretch(cfg, whole[-1] + part / PARTS)
            if estimate(longer) <= seconds:
                best = longer
    return best


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
    start = time.perf_counter()
    budget, steps_per_epoch = cfg.time_budget, len(train_loader)
    batches = iter(train_loader)
    first = next(batches)
    full_side = first[0].shape[-1]  # the training images' width, (B, C, H, W)
    batches = itertools.chain([first], batches)
    sides = possible_sides(cfg, full_side)
    probe = copy.deepcopy(model)
    # a whitening bias that stops training after the first epochs: the later steps are timed without
    # its gradient (the backward then stops above the first convolution's input), the first ones with it
    bias = getattr(getattr(unwrap_model(probe), "whiten", None), "bias", None)
    early = first_sides(cfg, full_side) if cfg.whiten_bias_epochs and bias is not None and bias.requires_grad else []
    timed = [(side, False) for side in sides] + [(side, True) for side in early]
    precision = Precision(precision.device, precision.dtype, precision.channels_last)  # its own fp16 loss scale
    optimizer = build_optimizer(param_groups(probe, cfg), cfg)
    for group in optimizer.param_groups:  # the same work at lr 0: no warm-up here, and nothing to diverge
        group["lr"] = 0.0
    ema = WeightEMA(probe, cfg.ema_decay) if cfg.ema_decay else None
    sync = torch.cuda.synchronize if precision.device.type == "cuda" else (lambda: None)
    times: dict[tuple[int, bool], list[float]] = {key: [] for key in timed}
    for i in range(TIMED_STEPS + 1):  # the widths in turn: a slow spell of a shared CPU slows them all alike
        for side, first in timed:
            if early:
                bias.requires_grad_(first)
            began = time.perf_counter()  # the batch's augmentation included, as in training
            batch = next(batches, None)
            if batch is None:  # a dataset of a few batches: start it again
                batches = iter(train_loader)
                batch = next(batches)
            train_one_epoch(probe, [batch], optimizer, None, precision, label_smoothing=cfg.label_smoothing,
                            grad_clip=cfg.grad_clip, ema=ema, desc="timing", train_side=lambda full, s=side: s)
            sync()
            if i:
                times[side, first].append(time.perf_counter() - began)
    step_s = smaller_costs_no_more({side: statistics.median(times[side, False]) for side in sides})
    first_step_s = {side: max(statistics.median(times[side, True]), step_s[side]) for side in early}
    eval_s = 0.0
    if val_loader is not None:
        some = list(itertools.islice(iter(val_loader), EVAL_BATCHES + 1))
        evaluated = ema.module if ema is not None else probe
        evaluate(evaluated, some[:1], precision, tta, cfg.tta_translate or 0)  # untimed: cuDNN/oneDNN set up
        sync()
        some = some[1:] or some
        began = time.perf_counter()
        evaluate(evaluated, some, precision, tta, cfg.tta_translate or 0)
        sync()
        eval_s = (time.perf_counter() - began) / len(some) * len(val_loader)
    del probe, optimizer, ema
    probe_s = time.perf_counter() - start
    def estimate(c: TrainConfig) -> float:
        return estimate_seconds(c, full_side, steps_per_epoch, step_s, eval_s, first_step_s)

    chosen = longest_fitting(cfg, (budget - probe_s) * (1 - PLAN_MARGIN), estimate)
    if chosen is None:
        one = estimate(stretch(cfg, 1))
        raise CifarlensError(
            f"the time budget of {budget:g} s is too short for one epoch here: timing took {probe_s:.1f} s and an "
            f"epoch takes about {one:.0f} s on this machine; give at least "
            f"{math.ceil((one + probe_s) / (1 - PLAN_MARGIN))} s "
            "(--time-budget), or train a smaller model")
    epoch_s = epoch_seconds(chosen, full_side, steps_per_epoch, step_s, eval_s, first_step_s)
    return BudgetPlan(chosen, probe_s, step_s, eval_s, epoch_s, steps_per_epoch, full_side, MAX_STRETCH * cfg.epochs,
                      first_step_s=first_step_s)
