"""Progressive resizing (train.progressive_res / progressive_epochs): the first epochs train on
scaled-down images, the last ones at full size."""

import pytest
import torch
from torch import nn

from cifarlens.config import RunConfig, merge
from cifarlens.data.base import Split
from cifarlens.data.loader import TensorLoader
from cifarlens.engine import FitState, Precision, fit, train_one_epoch
from cifarlens.epochs import progressive_side
from cifarlens.errors import CifarlensError
from cifarlens.recipes import resolve_train
from cifarlens.schedules import build_optimizer, build_scheduler, param_groups

CPU = torch.device("cpu")


def train_cfg(**train):
    return resolve_train(merge(RunConfig(), {"train": {"recipe": "fast_cpu", **train}}).train)


class ShapeRecorder(nn.Module):
    """A classifier of any input size that records the (H, W) of every batch it is trained on."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3, padding=1)
        self.seen: list[tuple[int, int]] = []

    def forward(self, x):
        if self.training:
            self.seen.append(tuple(x.shape[-2:]))
        return self.conv(x).amax(dim=(2, 3))


def loader(n: int = 32, batch_size: int = 16, size: tuple[int, int] = (32, 32)) -> TensorLoader:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, *size), dtype=torch.uint8, generator=gen)
    return TensorLoader(Split(images, torch.arange(n) % 10), batch_size, lambda x, g: x.float() / 255, device=CPU)


def test_the_side_ramps_from_the_smallest_to_full_in_steps_of_four_pixels():
    assert [progressive_side(32, e, 24, 3) for e in range(5)] == [24, 24, 28, 32, 32]
    assert [progressive_side(32, e, 16, 4) for e in range(5)] == [16, 20, 24, 28, 32]
    assert [progressive_side(32, e, 24, 1) for e in range(3)] == [24, 32, 32]
    assert progressive_side(32, 0, 0, 3) == 32  # off
    assert progressive_side(28, 0, 32, 3) == 28  # never upscales: Fashion-MNIST under a CIFAR setting


def test_an_epoch_trains_on_the_scaled_down_images_and_says_so():
    model = ShapeRecorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    row = train_one_epoch(model, loader(size=(32, 48)), optimizer, None, Precision(CPU), train_side=lambda full: 24)
    assert model.seen == [(16, 24), (16, 24)] and row["train_side"] == 24  # aspect ratio kept
    model.seen.clear()
    row = train_one_epoch(model, loader(), optimizer, None, Precision(CPU), train_side=lambda full: full)
    assert model.seen == [(32, 32), (32, 32)] and row["train_side"] is None  # full size: untouched


def test_the_scaled_images_are_the_antialiased_mean_of_the_full_ones():
    """Scaling a 1-pixel checkerboard from 32 to 24 pixels: antialiased, it becomes nearly uniform
    grey (0.46..0.54 inside the border); plain bilinear sampling would alias it into a coarser
    pattern of 0.28..0.72."""
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2  # 0/1 checkerboard
    images = (checker * 255).to(torch.uint8).expand(4, 3, 32, 32).contiguous()
    seen = []

    class Probe(ShapeRecorder):
        def forward(self, x):
            seen.append(x.detach().clone())
            return super().forward(x)

    model = Probe()
    data = TensorLoader(Split(images, torch.arange(4)), 4, lambda x, g: x.float() / 255, device=CPU)
    train_one_epoch(model, data, torch.optim.SGD(model.parameters(), lr=0.0), None, Precision(CPU),
                    train_side=lambda full: 24)
    inside = seen[0][..., 1:-1, 1:-1]
    assert seen[0].shape[-2:] == (24, 24) and (inside - 0.5).abs().max() < 0.05
    assert abs(seen[0].mean().item() - 0.5) < 1e-3


def test_fit_ramps_the_size_over_the_epochs_and_logs_it():
    model = ShapeRecorder()
    cfg = train_cfg(epochs=4, progressive_res=24, progressive_epochs=2, ema_decay=0.0)
    data = loader()
    optimizer = build_optimizer(param_groups(model, cfg), cfg)
    lines: list[str] = []
    fit(model, data, None, optimizer, build_scheduler(optimizer, cfg, len(data)), Precision(CPU), cfg, FitState(),
        on_improvement=lambda s: None, on_epoch_end=lambda s: None, log=lines.append)
    assert [model.seen[i][1] for i in range(0, 8, 2)] == [24, 28, 32, 32]
    epoch_lines = [line for line in lines if line.startswith("epoch ") and "train_loss" in line]
    assert ["trained at 24 px wide" in epoch_lines[0], "trained at 28 px wide" in epoch_lines[1]] == [True, True]
    assert not any("trained at" in line for line in epoch_lines[2:])


@pytest.mark.parametrize("train, message", [
    ({"progressive_res": 4, "progressive_epochs": 2}, "at least 8 pixels"),
    ({"progressive_res": 24, "progressive_epochs": 0}, "progressive_epochs must be >= 1"),
    ({"progressive_epochs": -1}, "progressive_epochs must be >= 1"),
])
def test_bad_settings_are_refused_with_the_fix(train, message):
    with pytest.raises(CifarlensError, match=message):
        train_cfg(**train)


@pytest.mark.parametrize("epochs, sides", [
    (4, [24, 28, 32, 32]),  # fast_cpu_10min's ramp of 4 of 8 epochs kept whole trained 24, 24, 28, 28 and never 32
    (2, [24, 32]),
    (1, [32]),
    (8, [24, 24, 28, 28, 32, 32, 32, 32]),  # the recipe's own
])
def test_epochs_given_for_a_growing_recipe_scale_its_ramp(epochs, sides):
    from cifarlens.budget import epoch_sides
    from cifarlens.config import TrainConfig

    assert epoch_sides(resolve_train(TrainConfig(recipe="fast_cpu_10min", epochs=epochs)), 32) == sides
    # a ramp the user set stays as set
    kept = resolve_train(TrainConfig(recipe="fast_cpu_10min", epochs=epochs, progressive_epochs=1))
    assert kept.progressive_epochs == 1 and kept.progressive_res == 24
    off = resolve_train(TrainConfig(recipe="fast_cpu_10min", epochs=epochs, progressive_epochs=0))  # "0 = off" (refused)
    assert (off.progressive_epochs, off.progressive_res) == (0, 0)
    if epochs == 4:  # a first width of your own, the ramp still in proportion
        assert epoch_sides(resolve_train(TrainConfig(recipe="fast_cpu_10min", epochs=4, progressive_res=28)), 32) == \
            [28, 28, 32, 32]
