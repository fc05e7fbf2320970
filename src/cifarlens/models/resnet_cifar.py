"""CIFAR ResNets of He et al. 2016, "Deep Residual Learning for Image Recognition", section 4.2.

6n+2 weight layers: a 3x3 stem, three stages of n basic blocks at 16/32/64 channels
(32x32 -> 16x16 -> 8x8 maps for 32x32 input), global average pool, FC. Shortcuts are
option A (parameter-free), so the counts match the paper's table 6: 0.27M/0.46M/0.85M/1.7M.

:class:`BasicBlock` is also the block of :mod:`cifarlens.models.lensnet`, with option-B shortcuts.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cifarlens.errors import CifarlensError
from cifarlens.models.base import ClassifierBase, ClassifierHead, conv1x1, conv3x3, init_weights
from cifarlens.models.registry import register_model


class ShortcutA(nn.Module):
    """Option A: subsample by striding and zero-pad the new channels; no parameters."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ::stride gives ceil(H/stride), the same size as the 3x3/stride/pad-1 conv on the main path
        x = x[:, :, :: self.stride, :: self.stride]  # (B, C_in, H/s, W/s)
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))  # (B, C_out, H/s, W/s)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, ReLU after the add (He et al. 2016, fig. 2 left).

    The shortcut is the identity when shapes match, else option A (zero-pad, no parameters)
    or option B (1x1 conv + BN projection).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, shortcut: Literal["A", "B"] = "B"):
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if stride == 1 and in_ch == out_ch:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA(in_ch, out_ch, stride)
        else:
            self.shortcut = nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no in-place ReLU anywhere: block outputs are Grad-CAM targets and hooks need them intact
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(ClassifierBase):
    """ResNet-``depth`` for CIFAR, depth = 6n+2 (20, 32, 44, 56, 110, ...)."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        super().__init__(num_classes, in_channels)
        if depth < 8 or (depth - 2) % 6:
            raise CifarlensError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(conv3x3(in_channels, 16), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = self._stage(16, 16, n, stride=1)  # (B, 16, 32, 32) at 32x32 input
        self.layer2 = self._stage(16, 32, n, stride=2)  # (B, 32, 16, 16)
        self.layer3 = self._stage(32, 64, n, stride=2)  # (B, 64, 8, 8)
        self.head = ClassifierHead(64, num_classes)
        self.cam_layer = "layer3"  # last stage, 8x8 at 32x32 input
        init_weights(self)

    @staticmethod
    def _stage(in_ch: int, out_ch: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_ch, out_ch, stride, shortcut="A")]
        blocks += [BasicBlock(out_ch, out_ch, shortcut="A") for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(self.stem(x))))


@register_model(recipe="modern")
def resnet20(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (n=3), 0.27M parameters."""
    return CifarResNet(20, num_classes, in_channels)


@register_model(recipe="modern")
def resnet32(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 (n=5), 0.46M parameters."""
    return CifarResNet(32, num_classes, in_channels)


@register_model(recipe="modern")
def resnet56(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 (n=9), 0.85M parameters."""
    return CifarResNet(56, num_classes, in_channels)


@register_model(recipe="modern")
def resnet110(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-110 (n=18), 1.7M parameters."""
    return CifarResNet(110, num_classes, in_channels)
