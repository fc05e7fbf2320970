"""The training loop's decisions: early stopping, the plateau schedule, best-checkpoint choice."""

import math

import pytest
import torch

from cifarlens import engine
from cifarlens.config import RunConfig, merge
from cifarlens.data.base import Split
from cifarlens.data.loader import TensorLoader
from cifarlens.engine import FitState, Precision, fit, resolve_device
from cifarlens.errors import CifarlensError
from cifarlens.models import create_model
from cifarlens.recipes import build_optimizer, build_scheduler, resolve_train


def setup(monkeypatch, val_losses, **train):
    """A tiny model and loader whose validation losses are scripted, epoch by epoch."""
    cfg = resolve_train(merge(RunConfig(), {"train": {"epochs": len(val_losses), **train}}).train)
    model = create_model("lensnet_light", 3, 1, widths=[4], depths=[1])
    split = Split(torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8), torch.arange(16) % 3)
    loader = TensorLoader(split, 8, lambda x, g: x.float() / 255, device=torch.device("cpu"), shuffle=True)
    losses = iter(val_losses)
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: {"loss": next(losses), "acc": 0.5})
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, len(loader))
    return cfg, model, loader, optimizer, scheduler


def run(cfg, model, loader, optimizer, scheduler):
    improved = []
    state = fit(model, loader, loader, optimizer, scheduler, Precision(torch.device("cpu")), cfg, FitState(),
                on_improvement=lambda s: improved.append(s.epoch), on_epoch_end=lambda s: None, log=lambda s: None)
    return state, improved


def test_early_stopping_and_best_epoch(monkeypatch):
    parts = setup(monkeypatch, [1.0, 0.8, 0.9, 0.85, 0.95, 0.5, 0.4], early_stopping=3)
    state, improved = run(*parts)
    assert improved == [1, 2]  # the best weights are saved only when val loss improves
    assert state.stopped_early and state.epoch == 5 and len(state.history) == 5
    assert state.best_epoch == 2 and state.best_val_loss == 0.8


def test_plateau_schedule_lowers_lr_on_validation_loss(monkeypatch):
    parts = setup(monkeypatch, [1.0, 1.1, 1.2, 1.3, 1.4], recipe="reference", plateau_patience=1,
                  plateau_factor=0.5, lr=0.01)
    state, _ = run(*parts)
    lrs = [row["lr"] for row in state.history]
    # epochs 2 and 3 do not improve: more than `patience` bad epochs, so epoch 4 runs at half the lr
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.005, 0.005])
    assert not state.stopped_early


def test_onecycle_lr_rises_then_falls_to_zero(monkeypatch):
    parts = setup(monkeypatch, [1.0] * 4, warmup_epochs=1.0, lr=0.1)
    cfg, model, loader, optimizer, scheduler = parts
    run(*parts)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_nan_loss_stops_with_an_error():
    model = create_model("lensnet_light", 3, 1, widths=[4], depths=[1])
    split = Split(torch.zeros((4, 1, 8, 8), dtype=torch.uint8), torch.zeros(4, dtype=torch.int64))
    loader = TensorLoader(split, 4, lambda x, g: x.float() * math.nan, device=torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(engine.TrainingDiverged, match="became nan"):
        engine.train_one_epoch(model, loader, optimizer, None, Precision(torch.device("cpu")))


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(CifarlensError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(CifarlensError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.gpu
def test_cuda_mixed_precision_training_step():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    precision = Precision.for_device(device, amp=True, channels_last=True)
    assert precision.dtype in (torch.bfloat16, torch.float16)
    model = create_model("resnet20", 10).to(device).to(memory_format=torch.channels_last)
    split = Split(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.arange(64) % 10)
    loader = TensorLoader(split, 32, lambda x, g: x.float() / 255, device=device, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    out = engine.train_one_epoch(model, loader, optimizer, None, precision)
    assert math.isfinite(out["train_loss"])
