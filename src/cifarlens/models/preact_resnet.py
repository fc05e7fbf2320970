"""Pre-activation ResNets (He et al. 2016, "Identity Mappings in Deep Residual Networks").

:class:`PreActResNet` is the skeleton shared with the Wide ResNets (:mod:`.wide_resnet`):
a 3x3 stem conv (no BN/ReLU: the first block's pre-activation does it), stages of
pre-activation basic blocks (the first stage at stride 1, the others at stride 2),
a final BN-ReLU, global average pool, FC. No max-pool: CIFAR images are only 32x32.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cifarlens.models.base import ClassifierBase, ClassifierHead, conv1x1, conv3x3, init_weights
from cifarlens.models.registry import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus shortcut, nothing after the add (fig. 4e).

    When shapes change, the shortcut is a 1x1 conv applied to the *pre-activated* input,
    as in the authors' code for both papers. Dropout sits between the convs (WRN paper).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.shortcut = None if stride == 1 and in_ch == out_ch else conv1x1(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.drop(F.relu(self.bn2(out))))
        return out + skip


class PreActResNet(ClassifierBase):
    """Pre-activation ResNet with stages of ``depths[i]`` blocks at ``widths[i]`` channels."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        stem_width: int = 64,
        widths: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 2, 2),
        dropout: float = 0.0,
    ):
        super().__init__(num_classes, in_channels)
        self.stem = conv3x3(in_channels, stem_width)
        stages, prev = [], stem_width
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            stride = 1 if i == 0 else 2  # halve the map at every stage but the first
            blocks = [PreActBlock(prev, width, stride, dropout)]
            blocks += [PreActBlock(width, width, 1, dropout) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            prev = width
        self.stages = nn.Sequential(*stages)
        # block outputs are un-normalised sums; the final BN-ReLU gives the activated map the
        # head sees, so it is also the Grad-CAM target (its own module so hooks can find it)
        self.final_norm = nn.BatchNorm2d(prev)
        self.final_act = nn.ReLU()
        self.head = ClassifierHead(prev, num_classes)
        self.cam_layer = "final_act"
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_act(self.final_norm(self.stages(self.stem(x))))


@register_model(recipe="modern")
def preact_resnet18(num_classes: int, in_channels: int = 3) -> PreActResNet:
    """Pre-activation ResNet-18: stages 64/128/256/512 x [2,2,2,2]; 11.17M params; 4x4 map at 32x32."""
    return PreActResNet(num_classes, in_channels)
