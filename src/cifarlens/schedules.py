"""The optimizer and the learning-rate schedule a resolved :class:`TrainConfig` describes (its
recipe, :mod:`cifarlens.recipes`, fills the values): parameter groups, SGD / AdamW / Muon, and
warm-up with one-cycle, cosine, constant or multistep decay stepped per optimizer step, or
ReduceLROnPlateau per epoch."""

from __future__ import annotations

import math

import torch

from cifarlens.config import TrainConfig
from cifarlens.epochs import epoch_steps, whole_epoch_steps
from cifarlens.optim import MuonSGD, muon_groups

OPTIMIZERS = ("adam", "sgd", "muon")  # muon: Muon on convolution filters, Nesterov SGD on the rest
SCHEDULES = ("plateau", "onecycle", "cosine", "constant", "multistep")


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """The trainable parameters as two named groups: ``head`` at ``lr``, ``backbone`` at
    ``lr * backbone_lr_scale`` (head first: logs report the head's lr). The schedules scale
    both alike. A frozen backbone's parameters are in their group too: they get no gradient
    (``grad`` None), so SGD/AdamW skip them and create no state until they are unfrozen."""
    from cifarlens.models import unwrap_model

    net = unwrap_model(model)
    frozen = set(getattr(net, "_frozen_by_us", ()))
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad or n in frozen]
    head = [p for n, p in trainable if n.startswith("head.")]
    backbone = [p for n, p in trainable if not n.startswith("head.")]
    return [{"name": "head", "params": head, "lr": cfg.lr},
            {"name": "backbone", "params": backbone, "lr": cfg.lr * cfg.backbone_lr_scale}]


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``params``: parameters, or parameter groups such as :func:`param_groups` gives. ``muon``:
    :class:`cifarlens.optim.MuonSGD`, with each group's convolution filters in a Muon group of
    their own at ``muon_lr`` (0: ``lr``; times ``backbone_lr_scale`` in the backbone)."""
    if cfg.optimizer == "muon":
        groups = muon_groups(params, cfg.lr, cfg.muon_lr or cfg.lr, cfg.muon_momentum or None, cfg.muon_renorm)
        return MuonSGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                       ns_steps=cfg.muon_ns_steps)
    if cfg.optimizer == "adam":
        # AdamW: decoupled weight decay (identical to Adam when weight_decay == 0).
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def decay_progress(step: int, total_steps: int, warmup_steps: int,
                   retargeted: tuple[int, float] | None = None) -> float:
    """How far (0 to 1) the decay after warm-up is at step ``step`` (``retargeted``: see lr_factor)."""
    if retargeted is not None and step >= retargeted[0]:
        at, done = retargeted
        progress = done + (1.0 - done) * (step - at) / max(1, total_steps - at)
    else:
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min(max(progress, 0.0), 1.0)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str,
              milestones: tuple[int, ...] = (), gamma: float = 0.1,
              retargeted: tuple[int, float] | None = None) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based) for step-wise schedules;
    ``milestones`` (multistep) are optimizer steps: from each one on, the lr is ``gamma`` times lower.
    ``retargeted`` (step s, progress p): the decay had reached p at step s when its end moved to
    ``total_steps``; from s on it covers the rest, 1 - p, in the steps left (StepSchedule.retarget)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps  # linear warm-up, never exactly 0
    if schedule == "constant":
        return 1.0
    if schedule == "multistep":
        return gamma ** sum(step >= m for m in milestones)
    progress = decay_progress(step, total_steps, warmup_steps, retargeted)
    if schedule == "onecycle":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(schedule)


class StepSchedule(torch.optim.lr_scheduler.LambdaLR):
    """Warm-up + decay, stepped after every optimizer step (multistep too: its milestones,
    given in epochs, become steps, so a drop lands at the first step of its epoch)."""

    per_step = True

    def __init__(self, optimizer, total_steps: int, warmup_steps: int, schedule: str,
                 milestones: tuple[int, ...] = (), gamma: float = 0.1):
        self.total_steps, self.warmup_steps, self.schedule = total_steps, warmup_steps, schedule
        self.milestones, self.gamma = tuple(milestones), gamma
        self.retargeted: tuple[int, float] | None = None  # saved with the rest of __dict__ (state_dict)
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.warmup_steps, self.schedule, self.milestones, self.gamma,
                         self.retargeted)

    def retarget(self, total_steps: int) -> None:
        """End the schedule at ``total_steps`` instead, from the next step on, without a jump: the
        decay goes on from where it is to its end over the steps now left (a time budget's re-plan
        of the last epoch, cifarlens.budget). Multistep milestones still ahead move in proportion
        to the steps left (a run re-planned from 376 to 156 epochs dropped its lr once of three),
        and stay before the new end (a drop rounded onto it would never come); warm-up is not moved."""
        step = max(self.last_epoch, self.warmup_steps)  # LambdaLR's count of steps taken
        if total_steps <= step:
            raise ValueError(f"cannot end the schedule at step {total_steps}: {step} steps are taken")
        if self.total_steps > step:
            ratio = (total_steps - step) / (self.total_steps - step)
            self.milestones = tuple(m if m <= step else min(step + max(1, round((m - step) * ratio)), total_steps - 1)
                                    for m in self.milestones)
        progress = decay_progress(step, self.total_steps, self.warmup_steps, self.retargeted)
        self.retargeted, self.total_steps = (step, progress), total_steps
        # the lr of the next step was set before: set it again (the same, but where a milestone moved onto it)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self._factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class PlateauSchedule(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """ReduceLROnPlateau on validation loss, stepped once per epoch."""

    per_step = False


def steps_before(cfg: TrainConfig, epochs: float, steps_per_epoch: int) -> int:
    """The optimizer steps before ``epochs`` (a fraction of one: that share of its steps) of
    ``cfg``'s epochs, where multistep milestones and the warm-up's end fall: a pruned epoch
    (train.prune_easy) counts its fewer batches."""
    whole = int(epochs)
    done = sum(whole_epoch_steps(cfg, epoch, steps_per_epoch) for epoch in range(whole))
    return done + round((epochs - whole) * whole_epoch_steps(cfg, whole, steps_per_epoch))


def epochs_before(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The epochs (with a fraction) before optimizer step ``step``: :func:`steps_before`'s inverse."""
    epoch = 0
    while step >= (n := whole_epoch_steps(cfg, epoch, steps_per_epoch)) and epoch < cfg.epochs - 1:
        step, epoch = step - n, epoch + 1
    return epoch + step / n


def schedule_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps in all of ``cfg``'s epochs (a partial last epoch counts its batches)."""
    return sum(epoch_steps(cfg, epoch, steps_per_epoch) for epoch in range(cfg.epochs))


def build_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    if cfg.schedule == "plateau":
        return PlateauSchedule(optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
    total = schedule_steps(cfg, steps_per_epoch)
    # at most half the run: a one-epoch run of modern (1 epoch of warm-up) ended at its peak lr, never decaying
    # (a warm-up given in more epochs than the run has, 1e300, counted them all: capped first)
    warmup = min(steps_before(cfg, min(cfg.warmup_epochs, cfg.epochs), steps_per_epoch), total // 2)
    # milestones are multistep's alone (checked there; another schedule's, even nan or inf, are unread)
    milestones = tuple(steps_before(cfg, m, steps_per_epoch) for m in cfg.milestones or ()) \
        if cfg.schedule == "multistep" else ()
    return StepSchedule(optimizer, total, warmup, cfg.schedule, milestones, cfg.gamma)

