"""The training engine: ``train_one_epoch``, ``evaluate`` and ``fit``.

One device and precision path: autocast and the grad scaler are always present and
switched by ``enabled=``; nothing here calls ``.cuda()`` or ``.half()``.
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cifarlens.device import cpu_bf16_pays, cpu_has_native_bf16, device_description, gpu_has_native_bf16, resolve_device  # noqa: F401
from cifarlens.distributed import all_reduce_sum, broadcast_buffers, first_divergence
from cifarlens.epochs import epoch_steps, progressive_side, pruned_epoch
from cifarlens.errors import CifarlensError
from cifarlens.tta import tta_logits


class TrainingDiverged(CifarlensError):
    """The training loss became NaN or infinite (or exploded: :class:`TrainingExploded`)."""


class TrainingExploded(TrainingDiverged):
    """The training loss stayed finite but rose far above chance level (see :func:`exploded_loss_limit`)."""


# A training loss above EXPLODED_FACTOR x ln(C) + EXPLODED_MARGIN nats has exploded.
EXPLODED_FACTOR = 10.0
EXPLODED_MARGIN = 5.0


def exploded_loss_limit(num_classes: int) -> float:
    """The mean training loss of a batch above which training has exploded (28.0 for 10 classes).

    ln(C) is the cross-entropy of a model that guesses uniformly; a fresh model starts near it
    (2.7 for C = 10 in our runs) and a learning one stays below it, so no warm-up period is
    needed. A batch loss of 10 ln(C) means the model gives the true classes, on geometric
    average, a probability of C**-10 (1e-10 for C = 10): not a noisy step but weights blown up,
    typically by too high an lr (Adam at lr 1e4 sits at 1e6..1e9 for ever, never NaN). The
    margin keeps the limit far from reach for few classes (11.9 for C = 2). Only the training
    loss is watched: a rising validation loss (overfitting) is early stopping's business.
    """
    return EXPLODED_FACTOR * math.log(max(num_classes, 2)) + EXPLODED_MARGIN


@dataclass
class Precision:
    """How forward passes run: autocast dtype (None = full fp32) and the grad scaler."""

    device: torch.device
    dtype: torch.dtype | None = None
    channels_last: bool = False
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self):
        # The scaler only does something for fp16; bf16 has fp32's range.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    @classmethod
    def for_device(cls, device: torch.device, amp: bool, channels_last: bool, cpu_amp: bool = False) -> "Precision":
        if device.type != "cuda":
            # CPU: fp32 unless asked (train.cpu_amp, on by default where bf16 is faster: native bf16
            # with AMX or on AMD, ~1.6x faster for FastNet there; cifarlens.device.cpu_bf16_pays);
            # channels_last helps oneDNN convolutions
            return cls(device, torch.bfloat16 if cpu_amp else None, channels_last)
        dtype = None
        if amp:
            dtype = torch.bfloat16 if gpu_has_native_bf16(device) else torch.float16
        return cls(device, dtype, channels_last)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def prepare(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def _progress(iterable, total: int, desc: str):
    """A tqdm bar on an interactive terminal; the plain iterable otherwise (logs get one line per epoch)."""
    if not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


DIVERGED_FIX = ("lower --lr, lengthen the warm-up (train.warmup_epochs: on a few hundred images an epoch is a few "
                "steps) or set train.grad_clip, and start again with --force (a resumed run keeps its lr)")


def _raise_if_diverged(bad_step: Tensor, bad_loss: Tensor, desc: str, num_classes: int) -> None:
    if bad_step < 0:  # a host read
        return
    loss, fix = bad_loss.item(), DIVERGED_FIX
    if math.isfinite(loss):
        raise TrainingExploded(
            f"the training loss became {loss:.4g} at step {int(bad_step) + 1} of {desc}, over the divergence limit "
            f"{exploded_loss_limit(num_classes):.1f} (= {EXPLODED_FACTOR:g} ln({num_classes} classes) + "
            f"{EXPLODED_MARGIN:g}, far worse than guessing); {fix}")
    raise TrainingDiverged(f"the training loss became {loss} at step {int(bad_step) + 1} of {desc}; {fix}")


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    precision: Precision,
    *,
    label_smoothing: float = 0.0,
    grad_clip: float = 0.0,
    ema: nn.Module | None = None,  # WeightEMA of model, updated every step
    desc: str = "train",
    check_every: int | None = None,  # steps between loss checks; default: 1 on a CPU, 50 elsewhere
    train_side: Callable[[int], int] | None = None,  # full image width -> width to train at (progressive_side)
    steps: int | None = None,  # stop after this many batches (a partial last epoch, epoch_steps); None: all
    pruning=None,  # the loader's EasyPruning (train.prune_easy): per-image losses recorded and weighted
) -> dict:
    """One pass over ``loader``. Returns mean loss and accuracy over the epoch's samples
    (of every rank under data-parallel training) and how many samples that was.

    Nothing in a step reads a value back to the host (but fp16's grad scaler, on GPUs without
    bf16): on a GPU each read would wait for the queued kernels and stall the pipeline. So a
    diverged loss (non-finite, or finite above :func:`exploded_loss_limit`) is recorded on the
    device and raised at the next check (free on a CPU, hence every step there) or at the end
    of the epoch: :class:`TrainingDiverged`, or its subclass :class:`TrainingExploded`.
    """
    if check_every is None:
        check_every = 1 if precision.device.type == "cpu" else 50
    model.train()
    total_loss = torch.zeros((), device=precision.device)
    total_correct = torch.zeros((), device=precision.device)
    bad_step = torch.full((), -1, device=precision.device)  # the first step with a diverged loss
    bad_loss = torch.zeros((), device=precision.device)  # and that loss
    seen, lr, num_classes, side, width = 0, optimizer.param_groups[0]["lr"], 2, None, 0
    if steps is not None and steps < len(loader):
        loader, total = itertools.islice(loader, steps), steps
    else:
        total = len(loader)
    for step, (images, labels, *mixed) in enumerate(_progress(loader, total, desc)):
        # MixUp/CutMix batches carry soft targets (B, K) beside the labels (B,): the loss is the
        # soft cross-entropy (label smoothing blends them with the uniform distribution, as it does
        # one-hot labels), while accuracy below still counts the labels drawn
        targets = mixed[0] if mixed else labels
        if train_side is not None and (side_now := train_side(images.shape[-1])) != images.shape[-1]:
            side, (h, w) = side_now, images.shape[-2:]  # scaled down whole (progressive resizing), aspect kept
            images = F.interpolate(images, size=(max(1, round(h * side / w)), side), mode="bilinear",
                                   antialias=True, align_corners=False)
        width = images.shape[-1]  # as trained (a shape: no read)
        with precision.autocast():
            logits = model(precision.prepare(images))
            if pruning is None:
                loss = objective = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
            else:  # each image's loss is its score; the kept easy ones weigh more (cifarlens.data.pruning)
                losses = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing, reduction="none")
                pruning.record(losses)
                loss, objective = losses.mean(), (losses * pruning.batch_weights()).mean()
        num_classes = logits.shape[-1]  # a shape: known on the host, no read
        # two tests, because NaN > limit is False; comparing with a Python float reads nothing back
        diverged = ~torch.isfinite(loss) | (loss > exploded_loss_limit(num_classes))
        first_bad = (bad_step < 0) & diverged
        bad_step = torch.where(first_bad, step, bad_step)
        bad_loss = torch.where(first_bad, loss.detach(), bad_loss)
        if (step + 1) % check_every == 0:
            _raise_if_diverged(*first_divergence(bad_step, bad_loss), desc, num_classes)  # all ranks alike
        optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(objective).backward()
        if grad_clip > 0:
            precision.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        lr = optimizer.param_groups[0]["lr"]  # the lr this step used
        precision.scaler.step(optimizer)
        precision.scaler.update()
        if scheduler is not None and scheduler.per_step:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        # Accumulate on the device: no host sync per step.
        total_loss += loss.detach() * labels.shape[0]
        total_correct += (logits.argmax(1) == labels).sum()
        seen += labels.shape[0]
    _raise_if_diverged(*first_divergence(bad_step, bad_loss), desc, num_classes)
    total_loss, total_correct, seen = all_reduce_sum(total_loss, total_correct, seen)
    return {"train_loss": total_loss / max(seen, 1), "train_acc": total_correct / max(seen, 1),
            "lr": lr, "train_samples": int(seen), "train_side": side,  # lr of the epoch's last step; side: scaled width
            "train_px": width}  # the width trained at, scaled or not (compare's compute estimate)


def forward_tta(model: nn.Module, x: Tensor, tta: bool, translate: int = 0) -> Tensor:
    """Logits; with ``tta``, the weighted mean of the logits of the images and their mirror
    images, and with ``translate > 0`` of those moved by that many pixels too (:mod:`cifarlens.tta`)."""
    return tta_logits(model, x, translate) if tta else model(x)


@torch.no_grad()
def predict_logits(model: nn.Module, loader, precision: Precision, tta: bool = False,
                   translate: int = 0) -> tuple[Tensor, Tensor]:
    """(logits (N, K) float32 on CPU, labels (N,) on CPU) over the whole loader, in order
    (``tta``, ``translate``: see :func:`forward_tta`)."""
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    try:
        for images, labels in loader:
            with precision.autocast():
                logits = forward_tta(model, precision.prepare(images), tta, translate)
            all_logits.append(logits.float())  # kept on the device: one copy to the host at the end
            all_labels.append(labels)
    finally:
        model.train(was_training)
    if not all_logits:  # an empty shard: a validation split with fewer images than processes
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(all_logits).cpu(), torch.cat(all_labels).cpu()


def evaluate(model: nn.Module, loader, precision: Precision, tta: bool = False, translate: int = 0) -> dict:
    """Mean cross-entropy (without label smoothing) and accuracy over ``loader``
    (over every rank's shard under data-parallel training)."""
    logits, labels = predict_logits(model, loader, precision, tta, translate)
    loss_sum = F.cross_entropy(logits, labels, reduction="sum").item() if len(labels) else 0.0
    correct = (logits.argmax(1) == labels).sum() if len(labels) else 0
    loss_sum, correct, n = all_reduce_sum(loss_sum, correct, len(labels))
    return {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1)}


def set_epoch_seed(loader, seed: int, epoch: int) -> None:
    """Make epoch ``epoch`` a pure function of (weights at its start, seed, epoch):
    the loader's shuffle/augmentation and the global RNG (dropout) are re-seeded."""
    from cifarlens.data.loader import epoch_seed
    from cifarlens.distributed import current_world

    loader.set_epoch(epoch)
    torch.manual_seed(epoch_seed(seed, epoch, stream=1) + current_world().rank)  # own dropout draws per rank


def set_backbone_frozen(model: nn.Module, frozen: bool, epoch: int, log: Callable[[str], None] = print) -> None:
    """Freeze (linear probe) or unfreeze the backbone for ``epoch``; a pure function of the epoch
    number, so a resumed run freezes exactly as an uninterrupted one. Models that are not
    :class:`ClassifierBase` (no head/backbone split) train whole."""
    from cifarlens.models import unwrap_model

    net = unwrap_model(model)
    if not hasattr(net, "freeze_backbone") or net.backbone_frozen == frozen:
        return
    net.freeze_backbone(frozen)
    if frozen:
        log(f"epoch {epoch + 1}: backbone frozen (its BatchNorm statistics kept), training the head only")
    else:
        log(f"epoch {epoch + 1}: backbone unfrozen, fine-tuning every layer")


def stop_whiten_bias(model: nn.Module, epoch: int, epochs: int, log: Callable[[str], None] = print) -> None:
    """From epoch ``epochs`` on (0-based ``epoch``; ``epochs`` 0 = never), the bias of the model's
    patch-whitening layer ``whiten`` (FastNet) stops training, as airbench94 trains it for its
    first 3 epochs only (Jordan 2024). ``requires_grad`` off: it gets no gradient, so the
    optimizer skips it (no weight decay, no momentum), at no cost per step. A pure function of
    the epoch, called after :func:`set_backbone_frozen` (whose unfreezing would switch it back
    on), so a resumed run matches an uninterrupted one."""
    from cifarlens.models import unwrap_model

    bias = getattr(getattr(unwrap_model(model), "whiten", None), "bias", None)
    if not epochs or epoch < epochs or bias is None or not bias.requires_grad:
        return
    bias.requires_grad_(False)
    log(f"epoch {epoch + 1}: the whitening layer's bias stops training (train.whiten_bias_epochs={epochs})")


@dataclass
class FitState:
    """Everything that changes during training, saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    history: list[dict] = field(default_factory=list)
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the last validation-loss improvement
    stopped_early: bool = False
    setup_seconds: float = 0.0  # training time before the first epoch (timing steps for train.time_budget)
    # train settings a time budget's re-plan changed mid-run (cifarlens.budget: epochs,
    # last_epoch_fraction, progressive_epochs, progressive_res); they override the config's
    replanned: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        """Training time so far: what ``cifarlens bench`` times and run.json's ``train_seconds``."""
        return self.setup_seconds + sum(row["seconds"] for row in self.history)


def fit(
    model: nn.Module,
    train_loader,
    val_loader,
    optimizer,
    scheduler,
    precision: Precision,
    cfg,  # TrainConfig, resolved
    state: FitState,
    *,
    on_improvement: Callable[[FitState], None],
    on_epoch_end: Callable[[FitState], None],
    log: Callable[[str], None] = print,
    train_model: nn.Module | None = None,  # e.g. torch.compile(model); defaults to model
    ema: nn.Module | None = None,  # WeightEMA of model: validated and saved instead of model
    tta: bool = False,
) -> FitState:
    """Train from ``state.epoch`` to ``cfg.epochs`` (or a re-plan's, ``state.replanned``); validation drives the plateau
    schedule, early stopping and the choice of the best weights.

    ``val_loader`` None (no validation split, ``data.val_fraction: 0``): no validation pass,
    history rows have no ``val_loss``/``val_acc``, and every epoch's weights replace the
    previous ones as the "best" (``on_improvement``), so the kept weights are the final ones."""
    if val_loader is None and (scheduler is not None and not scheduler.per_step or cfg.early_stopping):
        raise CifarlensError("the plateau schedule and early stopping need a validation split (data.val_fraction > 0)")
    train_model = model if train_model is None else train_model  # not `or`: a compiled module has no truth value
    eval_model = ema.module if ema is not None else model
    while state.epoch < (run_cfg := replace(cfg, **state.replanned) if state.replanned else cfg).epochs:
        epoch = state.epoch
        start = time.perf_counter()
        set_epoch_seed(train_loader, cfg.seed, epoch)
        set_backbone_frozen(model, epoch < (cfg.freeze_epochs or 0), epoch, log)
        stop_whiten_bias(model, epoch, cfg.whiten_bias_epochs or 0, log)
        pruning = getattr(train_loader, "pruning", None)
        if pruning is not None:
            pruning.active = pruned_epoch(run_cfg, epoch)
        row = {"epoch": epoch + 1}
        row |= train_one_epoch(train_model, train_loader, optimizer, scheduler, precision,
                               label_smoothing=cfg.label_smoothing, grad_clip=cfg.grad_clip, ema=ema,
                               desc=f"epoch {epoch + 1}/{run_cfg.epochs}", steps=epoch_steps(run_cfg, epoch, len(train_loader)),
                               pruning=pruning,
                               train_side=functools.partial(progressive_side, epoch=epoch, min_side=run_cfg.progressive_res,
                                                            epochs=run_cfg.progressive_epochs) if run_cfg.progressive_res else None)
        side = row.pop("train_side")
        if val_loader is not None:  # every rank validates its shard with rank 0's statistics: the saved model's
            broadcast_buffers(eval_model)
        val = None if val_loader is None else evaluate(eval_model, val_loader, precision, tta, cfg.tta_translate or 0)
        if val is not None and not math.isfinite(val["loss"]):  # weights blown up while the training loss looked fine
            raise TrainingDiverged(f"the validation loss became {val['loss']} after epoch {epoch + 1} (training loss "
                                   f"{float(row['train_loss']):.4g}); {DIVERGED_FIX}")
        if val is not None:
            row |= {"val_loss": val["loss"], "val_acc": val["acc"]}
        row["seconds"] = time.perf_counter() - start
        if scheduler is not None and not scheduler.per_step:
            scheduler.step(val["loss"])
        state.epoch = epoch + 1
        state.history.append(row)
        improved = val is None or val["loss"] < state.best_val_loss
        if improved:
            state.best_epoch, state.bad_epochs = epoch + 1, 0
            if val is not None:
                state.best_val_loss = val["loss"]
            on_improvement(state)
        else:
            state.bad_epochs += 1
        shown = "no validation split" if val is None else f"val_loss {val['loss']:.4f}  val_acc {val['acc']:.2%}"
        log(
            f"epoch {epoch + 1}/{run_cfg.epochs}  train_loss {row['train_loss']:.4f}  train_acc {row['train_acc']:.2%}  "
            f"{shown}  lr {row['lr']:.3g}  {row['seconds']:.1f}s" + (f"  trained at {side} px wide" if side else "")
            + (f"  on {row['train_samples']:,} of {len(pruning.scores):,} images" if pruning is not None and pruning.active
               else "") + ("  *best*" if improved and val is not None else "")
        )
        if cfg.early_stopping and state.bad_epochs >= cfg.early_stopping:
            state.stopped_early = True
        on_epoch_end(state)
        if state.stopped_early:
            log(f"early stopping: validation loss has not improved for {state.bad_epochs} "
                f"epoch{'s' * (state.bad_epochs != 1)}")
            break
    return state
