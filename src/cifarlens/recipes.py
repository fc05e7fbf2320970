"""Training recipes: named sets of defaults for :class:`TrainConfig` (the optimizer and
learning-rate schedule they describe are built by :mod:`cifarlens.schedules`).

A recipe only fills the ``TrainConfig`` fields the user left at ``None``; every
value can still be set from YAML or flags.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace

from cifarlens.config import RunConfig, TrainConfig, with_data_defaults
from cifarlens.engine import cpu_bf16_pays
from cifarlens.errors import CifarlensError
from cifarlens.optim import NS_STEPS
from cifarlens.registry import Registry, unknown_name
from cifarlens.schedules import OPTIMIZERS, SCHEDULES

RECIPES: Registry[dict] = Registry("recipe")

# Options that every recipe below leaves off (or at the Muon post's 5 Newton-Schulz steps) unless
# it says otherwise: the speed-record techniques of the fast recipes (cifarlens/config.py's
# TrainConfig describes each).
OFF = dict(tta_translate=0, muon_lr=0.0, muon_momentum=0.0, muon_renorm=False, muon_ns_steps=NS_STEPS,
           whiten_bias_epochs=0, progressive_res=0, progressive_epochs=0, prune_easy=0.0)

# The seed project's recipe: Adam, cross-entropy, ReduceLROnPlateau on validation loss.
RECIPES.register("reference")(
    dict(
        **OFF, epochs=30, batch_size=128, lr=1e-3, optimizer="adam", momentum=0.9, nesterov=False,
        weight_decay=0.0, label_smoothing=0.0, schedule="plateau", warmup_epochs=0.0,
        plateau_factor=0.5, plateau_patience=2, early_stopping=0, grad_clip=0.0, ema_decay=0.0, tta=False,
        freeze_epochs=0, backbone_lr_scale=1.0, milestones=[], gamma=0.1,
    )
)

# A modern recipe: Nesterov SGD, linear warm-up then one-cycle (linear) decay to zero,
# weight decay and label smoothing (as in torchvision's and timm's CIFAR references).
RECIPES.register("modern")(
    dict(
        **OFF, epochs=15, batch_size=128, lr=0.1, optimizer="sgd", momentum=0.9, nesterov=True,
        weight_decay=5e-4, label_smoothing=0.1, schedule="onecycle", warmup_epochs=1.0,
        plateau_factor=0.5, plateau_patience=2, early_stopping=0, grad_clip=0.0, ema_decay=0.0, tta=False,
        freeze_epochs=0, backbone_lr_scale=1.0, milestones=[], gamma=0.1,
    )
)

# The speed-record recipe (for fastnet on a GPU): large batches, Nesterov SGD with a short
# warm-up and linear decay, label smoothing, an EMA of the weights and flip test-time
# augmentation (after Jordan 2024, arXiv:2404.00498, which smooths by 0.2; 0.1 did better in
# our Fashion-MNIST CPU runs).
FAST = dict(
    **OFF, epochs=10, batch_size=512, lr=0.2, optimizer="sgd", momentum=0.85, nesterov=True,
    weight_decay=5e-4, label_smoothing=0.1, schedule="onecycle", warmup_epochs=0.5,
    plateau_factor=0.5, plateau_patience=2, early_stopping=0, grad_clip=0.0, ema_decay=0.99, tta=True,
    freeze_epochs=0, backbone_lr_scale=1.0, milestones=[], gamma=0.1,
)
RECIPES.register("fast")(FAST)

# The same recipe sized for fastnet_cpu on a few CPU cores; the default. On a CPU a smaller
# batch costs little speed, and twice the steps per epoch at 4x the peak lr reach a given
# accuracy in fewer epochs: on Fashion-MNIST (2-core AVX2 CPU) 4 epochs end where `fast`'s 10
# did (93.7 %), with 93 % after 3 epochs instead of 6 (README, *Measured results*).
RECIPES.register("fast_cpu")({**FAST, "epochs": 4, "batch_size": 256, "lr": 0.8})

# Real CIFAR-10 in about 10 minutes on a 2-core AMD EPYC with native bf16 (issue 16; slower CPUs: add
# --time-budget 10m, cifarlens.budget, which shrinks the schedule to fit), for the full-width
# fastnet, whose CPU default it is (`--model fastnet`). fast_cpu, plus what measured better at a
# fixed time budget (docs/benchmarks.md, *Toward 90 %*, every row with its command):
# - Muon on the convolution filters (lr 0.2) and Nesterov SGD on the rest: +0.9 points at 4 epochs;
# - airbench94's augmentation: 2-pixel translations and alternating flips instead of 4-pixel crops
#   and random flips: +0.9 points (short schedules underfit; lighter augmentation helps them);
# - progressive resizing: epochs at 24x24 and 28x28 cost about 50 % and 75 % of a full one, so
#   8 epochs (24, 24, 28, 28, 32, 32, 32, 32 px) cost what 6.5 full-size ones would. The full-size
#   epochs at the end matter most: at the cost of 6, a ramp over 5 epochs (three at 32 px) gave
#   90.09 % (seed 0), one with a single 32-px epoch in 9 89.25 %, four from 20 px 89.90 %;
# - no validation split (a fixed budget needs no model selection): 10 % more training images;
# - airbench94's test-time augmentation: the mirror image and 1-pixel translations (+0.2-0.3).
# Tried and left out (within seed noise or worse): label smoothing 0.2, no EMA, no warm-up, batch
# 512 with 3 Newton-Schulz steps, Muon's momentum 0.6 and weight renormalisation, a 20-px start,
# Muon lr 0.3, weight decay 1e-3, airbench's higher lr for the BatchNorm shifts, more TTA views.
RECIPES.register("fast_cpu_10min")(
    {**RECIPES.get("fast_cpu"), "epochs": 8, "optimizer": "muon", "muon_lr": 0.2, "tta_translate": 1,
     "progressive_res": 24, "progressive_epochs": 4,
     "data": {"val_fraction": 0.0, "crop_padding": 2, "flip": "alternating"}}
)

# Fine-tuning a pretrained backbone (--pretrained / --weights): one epoch of linear probe (backbone
# frozen, its BatchNorm statistics kept), then everything with the backbone at a tenth of the head's
# lr, Nesterov SGD with a short warm-up and cosine decay (both groups), weight decay 1e-4 as in
# torchvision's ImageNet recipe, label smoothing and flip TTA. The usual starting point of
# fine-tuning references (lower backbone lr, short schedule); not tuned here: no pretrained weights
# could be downloaded where cifarlens is developed.
RECIPES.register("finetune")(
    dict(
        **OFF, epochs=8, batch_size=128, lr=0.05, optimizer="sgd", momentum=0.9, nesterov=True,
        weight_decay=1e-4, label_smoothing=0.1, schedule="cosine", warmup_epochs=0.5,
        plateau_factor=0.5, plateau_patience=2, early_stopping=0, grad_clip=0.0, ema_decay=0.0, tta=True,
        freeze_epochs=1, backbone_lr_scale=0.1, milestones=[], gamma=0.1,
    )
)

# The recipes of the papers whose CIFAR-10 numbers the report's literature table lists, named after
# them. Add an augmentation policy to any recipe with --augment standard+cutout (data.policies).
#
# He et al. 2016, "Deep Residual Learning for Image Recognition", arXiv:1512.03385, section 4.2 (the
# CIFAR ResNets, resnet20...resnet110): SGD with momentum 0.9 (not Nesterov), weight decay 1e-4,
# batch 128, lr 0.1 divided by 10 at 32k and 48k iterations, training stopped at 64k iterations;
# standard crop+flip, no label smoothing. cifarlens trains on a 45k/5k train/val split, as the paper
# did when it chose the schedule: 351 steps per epoch at batch 128, so 32k/48k/64k iterations are
# epochs 91, 137 and 182. (On all 50k training images, 391 steps, they would be 82, 123 and 164.)
# For ResNet-110 the paper warms up at lr 0.01 for about 400 iterations: --set train.warmup_epochs=1.
RECIPES.register("he2016")(
    dict(
        **OFF, epochs=182, batch_size=128, lr=0.1, optimizer="sgd", momentum=0.9, nesterov=False,
        weight_decay=1e-4, label_smoothing=0.0, schedule="multistep", warmup_epochs=0.0,
        plateau_factor=0.5, plateau_patience=2, early_stopping=0, grad_clip=0.0, ema_decay=0.0, tta=False,
        freeze_epochs=0, backbone_lr_scale=1.0, milestones=[91, 137], gamma=0.1,
    )
)

# Zagoruyko & Komodakis 2016, "Wide Residual Networks", arXiv:1605.07146, section 3 (wrn16_8, wrn28_10):
# SGD with Nesterov momentum 0.9 (dampening 0), weight decay 5e-4, batch 128, lr 0.1 multiplied by
# 0.2 at epochs 60, 120 and 160, 200 epochs; standard crop+flip (the paper's ZCA-whitened runs are
# another setting), no label smoothing, no dropout (the paper's dropout rows are a separate result).
RECIPES.register("wrn2016")(
    dict(
        **OFF, epochs=200, batch_size=128, lr=0.1, optimizer="sgd", momentum=0.9, nesterov=True,
        weight_decay=5e-4, label_smoothing=0.0, schedule="multistep", warmup_epochs=0.0,
        plateau_factor=0.5, plateau_patience=2, early_stopping=0, grad_clip=0.0, ema_decay=0.0, tta=False,
        freeze_epochs=0, backbone_lr_scale=1.0, milestones=[60, 120, 160], gamma=0.2,
    )
)

def list_recipes() -> list[str]:
    return RECIPES.names()


def describe_recipe(name: str) -> str:
    """A recipe's settings on one line, as ``--set`` names them ("train." omitted), in TrainConfig's
    order, without those it leaves off (Muon's, progressive resizing, grad_clip 0...) or that its
    optimizer or schedule does not read; then the data settings it brings."""
    recipe, off = RECIPES.get(name), {**OFF, "early_stopping": 0, "grad_clip": 0.0, "ema_decay": 0.0,
                                      "freeze_epochs": 0, "backbone_lr_scale": 1.0}
    unread = unread_settings(recipe)
    shown = [f"{f.name}={recipe[f.name]}" for f in fields(TrainConfig) if f.name in recipe
             and f.name not in unread and not (f.name in off and recipe[f.name] == off[f.name])]
    data = recipe.get("data") or {}
    return ", ".join(shown) + (f"; data: {', '.join(f'{k}={v}' for k, v in data.items())}" if data else "")


def unread_settings(train: dict) -> dict[str, str]:
    """The train settings that ``train`` (a recipe, or a resolved TrainConfig as a dict) does not
    read, given its optimizer, schedule, TTA and resizing, each with why."""
    schedule, optimizer, unread = train["schedule"], train["optimizer"], {}
    if schedule != "plateau":
        unread |= dict.fromkeys(("plateau_factor", "plateau_patience"), f"schedule {schedule}; they are plateau's")
    else:
        unread["warmup_epochs"] = "schedule plateau; warm-up is the step-wise schedules'"
    if schedule != "multistep":
        unread |= dict.fromkeys(("milestones", "gamma"), f"schedule {schedule}; they are multistep's")
    if optimizer == "adam":
        unread |= dict.fromkeys(("momentum", "nesterov"), "optimizer adam")
    if optimizer != "muon":
        unread |= dict.fromkeys(("muon_lr", "muon_momentum", "muon_renorm", "muon_ns_steps"),
                                f"optimizer {optimizer}; they are muon's")
    if not train["tta"]:
        unread["tta_translate"] = "train.tta is off"
    if train.get("prune_easy") and train["epochs"] <= 2:
        unread["prune_easy"] = f"{train['epochs']} epoch(s): the first and the last see every image"
    if not train["progressive_res"]:
        unread["progressive_epochs"] = "train.progressive_res is 0"
    elif not train["progressive_epochs"]:
        unread["progressive_res"] = "train.progressive_epochs is 0"
    return unread


def unread_given(given: TrainConfig, resolved: TrainConfig) -> list[str]:
    """Warnings for the settings given (``given``: before :func:`resolve_train`) at other values than
    the recipe's that ``resolved`` does not read: ``--set train.milestones=[30,60]`` under a
    one-cycle schedule changed nothing, silently."""
    recipe = RECIPES.get(resolved.recipe)
    # an "off" value (0, [], false) unread says nothing wrong: a config resolved once and given again (bench,
    # tune's trials, best.yaml) holds progressive_epochs 0 beside progressive_res 0 for a ramp cut to none
    return [f"train.{key}={getattr(given, key)} is not used ({why})"
            for key, why in unread_settings(vars(resolved)).items()
            if getattr(given, key) not in (None, 0, False, []) and getattr(given, key) != recipe.get(key)]


def resolve_choices(cfg: RunConfig, device_type: str) -> tuple[RunConfig, dict[str, str]]:
    """Fill ``model.name``, ``train.recipe`` and the data settings a recipe may set where they were left unset.

    The model defaults to the one sized for ``device_type`` ("cpu" or "cuda"); the recipe to
    ``finetune`` for a pretrained or ``--weights`` start, else to the model family's own
    (``register_model(recipe=...)``); ``data.val_fraction``, ``crop_padding`` and ``flip`` to the
    recipe's (its ``data`` dict), else to DATA_DEFAULTS. Returns the config and, for each value chosen here, why
    (``{"recipe": "default for resnet20"}``), for the run's log, config.yaml and run.json.
    An explicit value always wins and gets no entry.
    """
    from cifarlens.models import default_model, default_recipe

    why: dict[str, str] = {}
    where = "a GPU" if device_type == "cuda" else "a CPU"
    model = cfg.model.name
    if model is None:
        model = default_model(device_type)
        why["model"] = f"default model on {where}"
    recipe = cfg.train.recipe
    if recipe is None:
        if cfg.model.pretrained or cfg.model.weights:
            recipe = "finetune"
            why["recipe"] = "default for a pretrained start" if cfg.model.pretrained else "default for a --weights start"
        else:
            recipe = default_recipe(model, device_type)
            cpu, gpu = default_recipe(model, "cpu"), default_recipe(model, "cuda")
            why["recipe"] = f"default for {model}" + (f" on {where}" if cpu != gpu else "")
    recipe_data = {key: value for key, value in RECIPES.get(recipe).get("data", {}).items()
                   if getattr(cfg.data, key) is None}
    if recipe_data:  # e.g. {"data": "val_fraction=0.0, crop_padding=2, flip=alternating (recipe fast_cpu_10min)"}
        why["data"] = ", ".join(f"{k}={v}" for k, v in recipe_data.items()) + f" (recipe {recipe})"
    data = with_data_defaults(replace(cfg.data, **recipe_data))
    return replace(cfg, data=data, model=replace(cfg.model, name=model), train=replace(cfg.train, recipe=recipe)), why


def describe_choice(value: str, why: dict[str, str], key: str) -> str:
    """``"fast_cpu (default for fastnet_cpu on a CPU)"``, or the value alone when it was given."""
    return f"{value} ({why[key]})" if key in why else value


def resolve_train(cfg: TrainConfig) -> TrainConfig:
    """Fill every ``None`` from the recipe and check the values."""
    if cfg.recipe is None:
        raise CifarlensError("train.recipe is unset: resolve the run config with "
                             "cifarlens.recipes.resolve_choices(cfg, device_type) first")
    defaults = RECIPES.get(cfg.recipe)
    if cfg.progressive_epochs == 0 and cfg.progressive_res is None:  # "0 = off", for a recipe that grows its images
        cfg = replace(cfg, progressive_res=0)
    if cfg.epochs is not None and cfg.progressive_epochs is None and defaults["progressive_epochs"] \
            and cfg.progressive_res != 0 and cfg.epochs != defaults["epochs"]:
        # --epochs N of a recipe that grows its images: the ramp in proportion, as a time budget scales
        # it (fast_cpu_10min's 4 of 8 epochs kept at --epochs 4 never trained at full size)
        ramp = round(defaults["progressive_epochs"] * cfg.epochs / defaults["epochs"])
        res = defaults["progressive_res"] if cfg.progressive_res is None else cfg.progressive_res
        cfg = replace(cfg, progressive_epochs=ramp, progressive_res=res if ramp else 0)
    if cfg.epochs is not None and cfg.milestones is None and defaults["milestones"] and cfg.epochs != defaults["epochs"]:
        # --epochs N of a multistep recipe: its lr drops at the same shares of the run (he2016's 91 and 137 of
        # 182 epochs lay beyond --epochs 20, which was refused), as a time budget scales them
        cfg = replace(cfg, milestones=[round(m * cfg.epochs / defaults["epochs"], 3) for m in defaults["milestones"]])
    if cfg.cpu_amp is None:  # a property of the machine, not of the recipe
        cfg = replace(cfg, cpu_amp=cpu_bf16_pays())
    filled = {f.name: defaults[f.name] for f in fields(cfg) if getattr(cfg, f.name) is None}
    filled = {k: [float(m) for m in v] if k == "milestones" else v for k, v in filled.items()}  # a copy, as floats
    cfg = replace(cfg, **filled)
    checks = [
        (cfg.epochs >= 1, "train.epochs must be >= 1"),
        (0 < cfg.last_epoch_fraction <= 1, "train.last_epoch_fraction must be in (0, 1] (1 = the whole last epoch)"),
        (cfg.batch_size >= 1, "train.batch_size must be >= 1"),
        (0 <= cfg.seed < 2**63, f"train.seed must be a whole number from 0 to 2**63 - 1, got {cfg.seed}"),
        (0 < cfg.lr < math.inf, "train.lr must be > 0 and finite"),
        (0 <= cfg.momentum < 1 and (cfg.momentum > 0 or not cfg.nesterov or cfg.optimizer != "sgd"),
         "train.momentum must be in [0, 1), and > 0 with train.nesterov (or set train.nesterov=false)"),
        (0 < cfg.plateau_factor < 1, "train.plateau_factor must be in (0, 1): the lr is multiplied by it on a plateau"),
        (cfg.plateau_patience >= 0, "train.plateau_patience must be >= 0 epochs"),
        (cfg.optimizer in OPTIMIZERS, unknown_name("train.optimizer", cfg.optimizer, list(OPTIMIZERS))),
        (cfg.schedule in SCHEDULES, unknown_name("train.schedule", cfg.schedule, list(SCHEDULES))),
        (0.0 <= cfg.label_smoothing < 1.0, "train.label_smoothing must be in [0, 1)"),
        (0 <= cfg.weight_decay < math.inf, "train.weight_decay must be >= 0 and finite"),
        (0 <= cfg.warmup_epochs < math.inf, "train.warmup_epochs must be >= 0 and finite"),
        (0 <= cfg.grad_clip < math.inf, "train.grad_clip must be >= 0 and finite (0 = off)"),
        (cfg.early_stopping >= 0, "train.early_stopping must be >= 0 (0 = off)"),
        (0.0 <= cfg.ema_decay < 1.0, "train.ema_decay must be in [0, 1) (0 = off)"),
        (cfg.freeze_epochs >= 0, "train.freeze_epochs must be >= 0 (0 = off)"),
        (0 < cfg.backbone_lr_scale < math.inf, "train.backbone_lr_scale must be > 0 and finite (1 = the same lr as "
                                                "the head)"),
        (0 < cfg.gamma < math.inf, "train.gamma must be > 0 and finite (the lr factor at each milestone; 0.1 divides "
                                   "by 10)"),
        (cfg.tta_translate >= 0, "train.tta_translate must be >= 0 pixels (0 = flip TTA only)"),
        (0 <= cfg.muon_lr < math.inf, "train.muon_lr must be >= 0 and finite (0 = train.lr)"),
        (0 <= cfg.muon_momentum < 1, "train.muon_momentum must be in [0, 1) (0 = train.momentum)"),
        (cfg.muon_ns_steps >= 1, "train.muon_ns_steps must be >= 1 (Newton-Schulz iterations per Muon update)"),
        (0 <= cfg.time_budget < math.inf, "train.time_budget must be a finite number of seconds >= 0 (0 = off, the "
                                          "recipe's epochs)"),
        (cfg.whiten_bias_epochs >= 0, "train.whiten_bias_epochs must be >= 0 (0 = the bias always trains)"),
        (0 <= cfg.prune_easy < 1, "train.prune_easy must be in [0, 1): the share of the easier half of the images "
                                  "left out of the middle epochs (0 = off; InfoBatch's is 0.5)"),
        (cfg.progressive_res == 0 or cfg.progressive_res >= 8,
         "train.progressive_res must be 0 (off) or a width of at least 8 pixels, e.g. 24 for 32x32 images"),
        (cfg.progressive_epochs >= 0 and (cfg.progressive_epochs > 0 or cfg.progressive_res == 0),
         "train.progressive_epochs must be >= 1 when train.progressive_res is set: the epochs over which the "
         "training images grow to full size"),
    ]
    if cfg.schedule == "multistep":
        ms = cfg.milestones
        checks += [
            (len(ms) > 0, "train.schedule multistep needs train.milestones, e.g. --set train.milestones=[82,123]"),
            (all(a < b for a, b in zip([0.0] + ms, ms + [cfg.epochs])),  # 0 < m1 < m2 < ... < epochs
             f"train.milestones {ms} must be increasing epochs between 0 and train.epochs ({cfg.epochs}); "
             f"set them for this number of epochs, e.g. --set train.milestones=[{cfg.epochs / 2:g},{cfg.epochs * 3 / 4:g}]"),
        ]
    for ok, message in checks:
        if not ok:
            raise CifarlensError(message)
    return cfg
