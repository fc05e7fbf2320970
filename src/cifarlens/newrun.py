"""The start of a new training run: the files its run folder gets before the first step, and
the lines that tell the user what is about to train (what was chosen, and why).

:func:`cifarlens.api.train` calls these once it has read the data, built the model and, with a
time budget, planned the epochs; a resumed run has its folder already and says less.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from cifarlens.budget import BudgetPlan, epochs_text
from cifarlens.config import RunConfig
from cifarlens.data.base import DatasetInfo
from cifarlens.data.fingerprint import SIGNATURES_FILE, save_signatures
from cifarlens.data.pipeline import DataBundle
from cifarlens.environment import environment_record
from cifarlens.io import atomic_write_json
from cifarlens.models import model_info, unwrap_model
from cifarlens.models.registry import forward_flops
from cifarlens.models.weights import describe_init
from cifarlens.recipes import describe_choice
from cifarlens.runs import RunDir, info_to_dict, source_to_dict


def record_new_run(run: RunDir, cfg: RunConfig, why: dict[str, str], bundle: DataBundle, info: DatasetInfo,
                   model: nn.Module, init: dict | None, plan: BudgetPlan | None, report: bool,
                   device: torch.device, world_size: int) -> None:
    """Write a just-created run folder's config.yaml (with the reason for each choice), run.json
    (status "running"), environment.json and the data's signatures. On any failure (a full disk,
    Ctrl-C) the half-made folder is removed, so the same command can be given again."""
    try:
        # "data" has its reason only; "epochs" has one when a time budget chose them (config.yaml keeps the
        # recipe's: the note says what the budget made of them)
        epochs = (f"{epochs_text(plan.train)}, fitted from train.epochs {cfg.train.epochs} below" if plan is not None
                  else str(cfg.train.epochs))
        chosen = {"model": cfg.model.name, "recipe": cfg.train.recipe, "epochs": epochs}
        run.write_config(cfg, notes={key: describe_choice(chosen[key], why, key) if key in chosen else reason
                                     for key, reason in why.items()})
        flops = forward_flops(cfg.model.name, info.num_classes, info.in_channels, info.image_size, **cfg.model.kwargs)
        run.write_meta(dataset=info_to_dict(info), source=source_to_dict(bundle.source, info),
                       model={"name": cfg.model.name, **model_info(model), "forward_flops": flops},
                       init=init or {"source": "scratch"},
                       split_sizes={"train": len(bundle.train), "val": len(bundle.val), "test": len(bundle.test)},
                       data_fingerprint=bundle.fingerprints, val_split=bundle.val_digest(),
                       chosen=why, **({"time_budget": plan.as_dict()} if plan is not None else {}),
                       report=report, status="running")
        atomic_write_json(run / "environment.json",
                          environment_record(device, cfg.train.seed) | {"world_size": world_size})
        save_signatures(run / SIGNATURES_FILE, {key: bundle.signatures(key) for key in ("train", "test")})
    except BaseException:
        run.discard()
        raise


def log_new_run(log: Callable[[str], None], run: RunDir, cfg: RunConfig, why: dict[str, str], bundle: DataBundle,
                info: DatasetInfo, model: nn.Module, init: dict | None, plan: BudgetPlan | None,
                warnings: list[str], device: torch.device, world_size: int) -> None:
    """The opening lines of a new run: what trains on what (and why it was chosen), the data's and
    the budget's settings, then each warning (``warnings``, and those about freezing)."""
    tc = cfg.train
    log(f"run folder {run.path}: {describe_choice(cfg.model.name, why, 'model')} on {bundle.source.label(info)} "
        f"({len(bundle.train)} train / {len(bundle.val)} val / {len(bundle.test)} test), "
        f"recipe {describe_choice(tc.recipe, why, 'recipe')}, {epochs_text(tc)}, device {device}"
        + (f", {world_size} processes" if world_size > 1 else ""))
    if "data" in why:
        log(f"data settings of the recipe: {why['data']}")
    if bundle.shipped_val:
        log(f"validation split: the data's own val/ ({len(bundle.val)} images); data.val_fraction is not used")
    if plan is not None:
        log(plan.describe())
    if not len(bundle.val):
        why_none = "data.val_fraction 0" if not cfg.data.val_fraction else "too few images for data.val_fraction"
        log(f"no validation split ({why_none}): no validation pass, the final weights are kept")
    for warning in warnings:
        log(f"warning: {warning}")
    if init is not None:
        log(f"starting weights: {describe_init(init)}; input normalised with mean {info.mean}, std {info.std}")
    frozen = tc.freeze_epochs if hasattr(unwrap_model(model), "freeze_backbone") else 0
    if frozen and init is None:
        log(f"warning: train.freeze_epochs {frozen} with a model from scratch: its first epochs train the head on "
            "random features (freezing is for a pretrained or --weights start; --set train.freeze_epochs=0)")
    elif frozen >= tc.epochs:
        log(f"warning: train.freeze_epochs {frozen} of {tc.epochs} epochs: the backbone never trains (a linear probe)")
