"""LensNet: the project's own configurable seed family.

stem (3x3 conv-BN-ReLU at widths[0]) -> stages -> global average pool -> dropout -> FC.
Stage i is ``depths[i]`` residual basic blocks at ``widths[i]`` channels (option-B 1x1
projection where the width changes), then MaxPool2d(2) and Dropout. Every stage halves
the map: 32 -> 16 -> 8 -> 4 for three stages at 32x32 input, 28 -> 14 -> 7 -> 3 at 28x28.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Sequence

import torch
from torch import nn

from cifarlens.errors import CifarlensError
from cifarlens.models.base import ClassifierBase, ClassifierHead, conv3x3, init_weights
from cifarlens.models.registry import register_model
from cifarlens.models.resnet_cifar import BasicBlock


def _positive_ints(what: str, values: Sequence[int]) -> tuple[int, ...]:
    out = tuple(values)
    if not out or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out):
        raise CifarlensError(f"LensNet {what} must be a non-empty list of positive integers, got {values!r}")
    return out


class LensNet(ClassifierBase):
    """Configurable residual CNN; the defaults are the ``lensnet_medium`` preset."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256),
        depths: Sequence[int] = (1, 1, 1),
        dropout: float = 0.1,
        head_dropout: float = 0.2,
    ):
        super().__init__(num_classes, in_channels)
        widths = _positive_ints("widths", widths)
        depths = _positive_ints("depths", depths)
        if len(widths) != len(depths):
            raise CifarlensError(
                f"LensNet widths and depths need one entry per stage, got {len(widths)} widths "
                f"{widths} and {len(depths)} depths {depths}"
            )
        for what, p in (("dropout", dropout), ("head_dropout", head_dropout)):
            if not 0.0 <= p < 1.0:
                raise CifarlensError(f"LensNet {what} must be in [0, 1), got {p!r}")
        self.widths, self.depths = widths, depths

        self.stem = nn.Sequential(conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, prev = [], widths[0]
        for width, depth in zip(widths, depths):
            # blocks keep the resolution; the max-pool after them halves it
            blocks = [BasicBlock(prev if i == 0 else width, width, shortcut="B") for i in range(depth)]
            stages.append(
                nn.Sequential(
                    OrderedDict(blocks=nn.Sequential(*blocks), pool=nn.MaxPool2d(2), drop=nn.Dropout(dropout))
                )
            )
            prev = width
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(widths[-1], num_classes, head_dropout)
        # last residual block, before the last pool: 2x the final map (8x8 for three stages at
        # 32x32 input, 4x4 for four), so even lensnet_heavy's CAM is finer than 2x2
        self.cam_layer = f"stages.{len(widths) - 1}.blocks.{depths[-1] - 1}"
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))  # (B, widths[-1], H / 2**stages, W / 2**stages)


register_model("lensnet", recipe="modern")(LensNet)

# presets: fixed widths/depths by default, still overridable (e.g. create_model(..., depths=(2, 2, 2)))
_PRESETS = {
    "lensnet_light": dict(widths=(32, 64, 128), depths=(1, 1, 1)),
    "lensnet_medium": dict(widths=(64, 128, 256), depths=(1, 1, 1)),
    "lensnet_heavy": dict(widths=(64, 128, 256, 512), depths=(2, 2, 2, 2)),
}
for _name, _arch in _PRESETS.items():
    register_model(_name, recipe="modern")(partial(LensNet, **_arch))
