"""Defaults that fit the model and the machine: the model and recipe a run gets without --model/--recipe."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_cifar10, synthetic_images

from cifarlens.cli import main
from cifarlens.config import RunConfig, merge
from cifarlens.engine import exploded_loss_limit
from cifarlens.models import MODELS, create_model, default_model, default_recipe, list_models
from cifarlens.models.registry import forward_flops
from cifarlens.recipes import RECIPES, resolve_choices, resolve_train
from cifarlens.schedules import build_optimizer, build_scheduler, param_groups

TORCHVISION = {"resnet18", "resnet50", "efficientnet_b0"}


def cfg_of(**sections) -> RunConfig:
    return merge(RunConfig(), sections)


def test_no_model_no_recipe_follows_the_device():
    cfg, why = resolve_choices(RunConfig(), "cpu")
    assert (cfg.model.name, cfg.train.recipe) == ("fastnet_cpu", "fast_cpu")
    assert why == {"model": "default model on a CPU", "recipe": "default for fastnet_cpu on a CPU"}
    cfg, why = resolve_choices(RunConfig(), "cuda")
    assert (cfg.model.name, cfg.train.recipe) == ("fastnet", "fast")
    assert why == {"model": "default model on a GPU", "recipe": "default for fastnet on a GPU"}


@pytest.mark.parametrize("model", ["resnet20", "preact_resnet18", "wrn16_8", "lensnet_light", "resnet18"])
def test_other_families_get_their_own_recipe(model):
    cfg, why = resolve_choices(cfg_of(model={"name": model}), "cpu")
    assert cfg.train.recipe == "modern" and why == {"recipe": f"default for {model}"}


@pytest.mark.parametrize("start, reason", [({"pretrained": True}, "default for a pretrained start"),
                                           ({"weights": "r18.pth"}, "default for a --weights start")])
def test_a_pretrained_or_weights_start_gets_finetune(start, reason):
    for device in ("cpu", "cuda"):
        cfg, why = resolve_choices(cfg_of(model={"name": "resnet18", **start}), device)
        assert cfg.train.recipe == "finetune" and why == {"recipe": reason}


def test_an_explicit_recipe_always_wins():
    cfg, why = resolve_choices(cfg_of(model={"name": "resnet18", "weights": "x.pth"}, train={"recipe": "fast_cpu"}),
                               "cpu")
    assert cfg.train.recipe == "fast_cpu" and why == {}


def test_every_registered_model_declares_registered_recipes():
    assert set(list_models()) == set(MODELS.names())
    for name in list_models():
        for device in ("cpu", "cuda"):
            assert default_recipe(name, device) in RECIPES
    assert default_model("cpu") in MODELS and default_model("cuda") in MODELS


def _options(name: str) -> dict:
    return {"stem": "native"} if name in TORCHVISION else {}  # 32x32 input: the same network, cheaper


def _heavy(name: str) -> bool:
    """Over 0.1 GFLOPs a 32x32 image (ResNet-32 and up, WRNs, EfficientNet, ...): seconds to a
    minute a step on 2 CPU cores, so their check runs with the slow tests."""
    return (forward_flops(name, 10, 3, 32, **_options(name)) or 0) > 1e8


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if _heavy(n) else n
                                  for n in list_models()])
def test_every_model_learns_with_its_default_recipe(name):
    """12 optimizer steps of the default recipe, its warm-up and decay compressed into them, on one
    batch of learnable synthetic images: the loss must go down, and never blow up."""
    torch.manual_seed(0)
    cfg, _ = resolve_choices(cfg_of(model={"name": name}), "cpu")
    tc = resolve_train(cfg.train)
    # the schedule's shape in 12 steps, at the batch of 16 this test affords with the peak lr
    # scaled linearly from the recipe's batch (the usual rule: lr 0.1 at 128 is 0.0125 at 16)
    tc = replace(tc, warmup_epochs=tc.warmup_epochs / tc.epochs, epochs=1, lr=tc.lr * 16 / tc.batch_size)
    model = create_model(name, num_classes=10, **_options(name))
    labels = np.arange(16) % 10
    x = torch.from_numpy(synthetic_images(labels, 3, 32, 32, np.random.default_rng(0))).float() / 255
    x = (x - 0.5) / 0.25  # (16, 3, 32, 32), roughly normalised
    y = torch.from_numpy(labels)
    optimizer = build_optimizer(param_groups(model, tc), tc)
    scheduler = build_scheduler(optimizer, tc, steps_per_epoch=12)
    model.train()
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(x).float(), y, label_smoothing=tc.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler.per_step:
            scheduler.step()
        losses.append(loss.item())
    # never past the divergence guard's limit, and lower at the end than at the start
    assert all(np.isfinite(losses)) and max(losses) < exploded_loss_limit(10), f"{name} with {tc.recipe}: {losses}"
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), f"{name} with {tc.recipe}: {losses}"


def test_the_fast_cpu_recipe_would_fail_resnet20_which_is_why_it_is_not_its_default():
    """The failure the per-model defaults prevent: at fast_cpu's own batch (256) and peak lr (0.8),
    a ResNet's loss passes the divergence guard's limit within a few steps (measured here: 2.6,
    14.9, 24.2, 117.8, 772.5, ...), where FastNet, which the recipe was tuned for, trains."""
    torch.manual_seed(0)
    tc = resolve_train(cfg_of(train={"recipe": "fast_cpu"}).train)
    model = create_model("resnet20", num_classes=10)
    labels = np.arange(tc.batch_size) % 10
    x = (torch.from_numpy(synthetic_images(labels, 3, 32, 32, np.random.default_rng(0))).float() / 255 - 0.5) / 0.25
    optimizer = build_optimizer(param_groups(model, tc), tc)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(x), torch.from_numpy(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert max(losses) > exploded_loss_limit(10) or not np.isfinite(losses).all(), losses


def test_the_cli_says_what_it_chose_and_why(tmp_path):
    data = make_cifar10(tmp_path / "data", n_train_per_batch=8, n_test=20).data_dir
    out = tmp_path / "run"
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(data), "--device", "cpu", "--epochs", "1",
                 "--set", "model.kwargs={widths: [8, 16, 16]}", "--out", str(out), "--no-report"]) == 0
    first = (out / "train.log").read_text().splitlines()[0]
    assert "fastnet_cpu (default model on a CPU) on CIFAR-10" in first
    assert "recipe fast_cpu (default for fastnet_cpu on a CPU)" in first
    text = (out / "config.yaml").read_text()
    assert text.startswith("# model: fastnet_cpu (default model on a CPU)\n"
                           "# recipe: fast_cpu (default for fastnet_cpu on a CPU)\n")
    meta = json.loads((out / "run.json").read_text())
    assert meta["chosen"] == {"model": "default model on a CPU", "recipe": "default for fastnet_cpu on a CPU"}
    # the saved config is complete: resuming or repeating it chooses nothing
    from cifarlens.runs import RunDir

    saved = RunDir(out).config()
    assert (saved.model.name, saved.train.recipe) == ("fastnet_cpu", "fast_cpu")
    assert resolve_choices(saved, "cuda")[1] == {}
