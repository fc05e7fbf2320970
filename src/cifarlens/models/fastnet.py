"""FastNet: a small VGG-like network for short training schedules.

Built from what the CIFAR-10 speed records teach (Page 2018, "How to train your
ResNet"; Jordan 2024, "94% on CIFAR-10 in 3.29 seconds on a single GPU", arXiv:2404.00498),
written from those descriptions:

- the first layer is a 2x2 convolution initialised by *patch whitening*: its filters are
  the eigenvectors of the covariance of 2x2 training patches, scaled by
  1/sqrt(eigenvalue + whiten_eps), in +/- pairs, and kept frozen. It decorrelates the input
  so SGD makes progress at once (``whiten_eps`` bounds how much it amplifies faint
  high-frequency directions, and so noise: see WHITEN_EPS);
- three blocks of conv -> max-pool -> BatchNorm -> GELU -> conv -> BatchNorm -> GELU;
- BatchNorm with a high momentum (short schedules need running statistics that keep up)
  and learned shifts only;
- convolutions initialised as partial identities (Dirac), global max pooling and a
  linear head whose logits are scaled down.

Its 3x3 convolutions are :class:`~cifarlens.models.small_conv.SmallMapConv2d`: ``nn.Conv2d``,
trained through im2col matrix products on small maps where that is faster (CPUs with AMX, or
AVX2 only).

``data_init(images)`` must be called with a sample of normalised training images
before training (``cifarlens.api.train`` does it for any model that has it).
"""

from __future__ import annotations

import math

from typing import Sequence

import torch
from torch import nn

from cifarlens.errors import CifarlensError
from cifarlens.models.base import ClassifierBase
from cifarlens.models.registry import register_model
from cifarlens.models.small_conv import SmallMapConv2d

WHITEN_KERNEL = 2
# Added to each eigenvalue of the patch covariance before the whitening filters divide by its
# square root: it caps the gain of the faintest (highest-frequency) directions. airbench uses
# 5e-4; on the CIFAR-10 JPEG copy, whose smallest eigenvalues are ~1e-4 (JPEG removes high
# frequencies), that gain made Gaussian noise of std 0.04 (CIFAR-10-C's mildest) 11x the energy
# of the image after the first layer, and test accuracy under it fell to 30 %. 5e-2 keeps the
# clean accuracy (82.38 % vs 82.12 %, 4 epochs of fastnet_cpu + fast_cpu, 1 seed) and holds 76 %
# under that noise (docs/explain-and-report.md, *The noise collapse*).
WHITEN_EPS = 5e-2
# an eigenvalue this small against the largest: a direction along which the images do not vary (see data_init)
FLAT_DIRECTION = 1e-9


class _BatchNorm(nn.BatchNorm2d):
    """BatchNorm with a fixed unit scale (only the shift is learned) and fast-moving statistics."""

    def __init__(self, channels: int, momentum: float = 0.4, eps: float = 1e-12):
        super().__init__(channels, momentum=momentum, eps=eps)
        self.weight.requires_grad_(False)


class _ConvBlock(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU: halves the resolution."""

    def __init__(self, in_ch: int, out_ch: int, bn_momentum: float):
        super().__init__()
        self.conv1 = SmallMapConv2d(in_ch, out_ch)  # nn.Conv2d, faster to train on small maps with AMX
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _BatchNorm(out_ch, bn_momentum)
        self.act1 = nn.GELU()
        self.conv2 = SmallMapConv2d(out_ch, out_ch)
        self.norm2 = _BatchNorm(out_ch, bn_momentum)
        self.act2 = nn.GELU()
        for conv in (self.conv1, self.conv2):
            _dirac_init(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.norm1(self.pool(self.conv1(x))))
        return self.act2(self.norm2(self.conv2(x)))


def _dirac_init(conv: nn.Conv2d) -> None:
    # Default (Kaiming-uniform) init, with the first in_channels filters set to identities,
    # so that at step 0 each block passes its input through.
    n = min(conv.in_channels, conv.out_channels)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:n])


class _Head(nn.Module):
    def __init__(self, in_features: int, num_classes: int, scale: float):
        super().__init__()
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(in_features, num_classes, bias=False)
        self.scale = scale  # small logits at init: a calmer start with label smoothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1)) * self.scale  # (B, C, h, w) -> (B, K)


class FastNet(ClassifierBase):
    def __init__(self, num_classes: int, in_channels: int = 3, widths: Sequence[int] = (64, 256, 256),
                 bn_momentum: float = 0.4, logit_scale: float = 1 / 9, whiten_eps: float = WHITEN_EPS):
        super().__init__(num_classes, in_channels)
        self.whiten_eps = whiten_eps  # added to the eigenvalues before 1/sqrt: bounds the gain of faint directions
        if not isinstance(widths, (list, tuple)):
            raise CifarlensError(f"FastNet widths must be a list of positive integers, e.g. [32, 64, 128]; got {widths!r}")
        widths = tuple(widths)
        for name, value in (("whiten_eps", whiten_eps), ("logit_scale", logit_scale), ("bn_momentum", bn_momentum)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise CifarlensError(f"FastNet {name} must be a finite number > 0, got {value!r}")
        if bn_momentum >= 1:
            raise CifarlensError(f"FastNet bn_momentum must be below 1, got {bn_momentum!r}")
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise CifarlensError(f"FastNet widths must be a non-empty list of positive integers, got {widths!r}")
        whiten_out = 2 * in_channels * WHITEN_KERNEL**2  # +/- pairs of every eigenvector
        self.whiten = nn.Conv2d(in_channels, whiten_out, WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set by data_init, then frozen
        self.whiten_act = nn.GELU()
        blocks, prev = [], whiten_out
        for width in widths:
            blocks.append(_ConvBlock(prev, width, bn_momentum))
            prev = width
        self.blocks = nn.Sequential(*blocks)
        self.head = _Head(prev, num_classes, logit_scale)
        # the last block's output: 3x3 at 32x32 input (31 -> 15 -> 7 -> 3), so use the one before
        # it when there are several, whose map is 7x7
        self.cam_layer = f"blocks.{max(len(widths) - 2, 0)}"

    @torch.no_grad()
    def data_init(self, images: torch.Tensor, eps: float | None = None) -> None:
        """Set the whitening filters from normalised training images (N, C, H, W); ``eps``
        (default: the model's ``whiten_eps``) is added to each eigenvalue before its 1/sqrt."""
        eps = self.whiten_eps if eps is None else eps
        k = WHITEN_KERNEL
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # (N, C, H-1, W-1, k, k)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * k * k)  # (P, C*k*k)
        patches = patches - patches.mean(dim=0)
        cov = patches.T @ patches / len(patches)  # (C*k*k, C*k*k)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov.double())  # ascending
        filters = eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]
        # Directions the images never vary along (a channel that is constant, e.g. an image folder whose blue is
        # always 0, or equal to another: grey images read as RGB) give feature maps that are constant, whose zero
        # variance the blocks' BatchNorm (eps 1e-12, airbench's) turns into exploding gradients: NaN or a huge
        # validation loss in the first epoch. They take the filters of the strongest directions instead (duplicate
        # channels train as well). Natural images have no such direction: nothing changes for them.
        flat = eigenvalues <= eigenvalues[-1] * FLAT_DIRECTION
        if flat.any() and not flat.all():
            strongest = (~flat).nonzero()[:, 0].flip(0)  # the others, strongest first, in turn
            filters[flat] = filters[strongest[torch.arange(int(flat.sum())) % len(strongest)]]
        filters = filters.float()
        filters = filters.reshape(-1, images.shape[1], k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))
        self.whiten.bias.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.whiten_act(self.whiten(x)))  # (B, widths[-1], h, w)


@register_model("fastnet", recipe="fast_cpu_10min", gpu_recipe="fast")
def fastnet(num_classes: int, in_channels: int = 3, widths: Sequence[int] = (64, 256, 256),
            bn_momentum: float = 0.4, logit_scale: float = 1 / 9, whiten_eps: float = WHITEN_EPS) -> FastNet:
    """The airbench-style network at full width: the GPU default, and on a CPU the ~10-minute
    CIFAR-10 recipe (fast_cpu_10min)."""
    return FastNet(num_classes, in_channels, widths, bn_momentum, logit_scale, whiten_eps)


@register_model("fastnet_cpu", recipe="fast_cpu", gpu_recipe="fast")
def fastnet_cpu(num_classes: int, in_channels: int = 3, widths: Sequence[int] = (32, 64, 128),
                bn_momentum: float = 0.4, logit_scale: float = 1 / 9, whiten_eps: float = WHITEN_EPS) -> FastNet:
    """A narrower FastNet sized for a few CPU cores; the default model."""
    return FastNet(num_classes, in_channels, widths, bn_momentum, logit_scale, whiten_eps)
