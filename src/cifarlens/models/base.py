"""What every model shares: the timm-like API, the classifier head and weight init.

Every registered model is a :class:`ClassifierBase`:

- ``forward_features(x)``: (B, C_in, H, W) -> last feature map (B, C, h, w), before pooling;
- ``forward_head(feats)``: (B, C, h, w) -> logits (B, num_classes);
- ``forward(x)``: logits, i.e. ``forward_head(forward_features(x))``;
- ``predict_proba(x)``: softmax probabilities (B, num_classes);
- ``num_classes``, ``in_channels`` and ``cam_layer``, the dotted name (for
  ``model.get_submodule``) of the default Grad-CAM target layer;
- ``head_parameters()`` / ``backbone_parameters()`` (the backbone is everything outside
  ``self.head``) and ``freeze_backbone(frozen)``, for fine-tuning schedules.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from cifarlens.errors import CifarlensError


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    # no bias: every conv is followed by BatchNorm, whose shift makes a bias redundant
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


def init_weights(model: nn.Module) -> None:
    """He (Kaiming) init for convs, identity BatchNorm; Linear keeps PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # fan_out as in He et al. 2015 / torchvision: keeps the backward signal's variance
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ClassifierHead(nn.Module):
    """Global average pool, dropout, fully-connected: (B, C, h, w) -> (B, num_classes).

    The adaptive pool is what lets every model take any input size >= 28.
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(x).flatten(1)))  # (B, C, 1, 1) -> (B, C) -> (B, K)


class ClassifierBase(nn.Module):
    """Base of every model: subclasses build ``self.head`` and implement ``forward_features``."""

    head: ClassifierHead
    cam_layer: str

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        for what, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CifarlensError(f"{what} must be a positive integer, got {value!r}")
        self.num_classes = num_classes
        self.in_channels = in_channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C, h, w), the last feature map before pooling."""
        raise NotImplementedError

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> logits (B, num_classes)."""
        return self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes): losses take logits, softmax is for inference only."""
        return self.forward_head(self.forward_features(x))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, num_classes). Gradients flow; wrap in no_grad for plain inference."""
        return self(x).softmax(dim=1)

    # -- fine-tuning: the head is ``self.head``, the backbone every other parameter ----------------
    _backbone_frozen = False
    _frozen_by_us: tuple[str, ...] = ()  # the backbone parameters freeze_backbone() switched off

    def named_backbone_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if not n.startswith("head."))

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_backbone_parameters()]

    @property
    def backbone_frozen(self) -> bool:
        return self._backbone_frozen

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Freeze (linear probe) or unfreeze the backbone.

        Freezing switches off ``requires_grad`` of the backbone parameters that were trainable,
        and keeps the backbone's BatchNorm layers in eval mode (their running statistics, e.g.
        ImageNet's, are used and not updated) even under ``model.train()``. Unfreezing restores
        exactly those parameters: ones frozen for good (FastNet's whitening) stay frozen.
        """
        if frozen == self._backbone_frozen:
            return
        if frozen:
            trainable = [(n, p) for n, p in self.named_backbone_parameters() if p.requires_grad]
            for _, p in trainable:
                p.requires_grad_(False)
            self._frozen_by_us = tuple(n for n, _ in trainable)
        else:
            params = dict(self.named_parameters())
            for name in self._frozen_by_us:
                params[name].requires_grad_(True)
            self._frozen_by_us = ()
        self._backbone_frozen = frozen
        self.train(self.training)  # (re)apply the BatchNorm modes

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self._backbone_frozen:
            for name, m in self.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not name.startswith("head."):
                    m.eval()
        return self
