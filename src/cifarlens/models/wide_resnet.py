"""Wide ResNets (Zagoruyko & Komodakis 2016, "Wide Residual Networks").

WRN-d-k: a 16-channel stem, three stages of n = (d-4)/6 pre-activation wide basic blocks at
16k/32k/64k channels (32x32 -> 16x16 -> 8x8 maps at 32x32 input), final BN-ReLU, pool, FC.
It is the :class:`PreActResNet` skeleton with these widths, and optional dropout between convs.
"""

from __future__ import annotations

from cifarlens.errors import CifarlensError
from cifarlens.models.preact_resnet import PreActResNet
from cifarlens.models.registry import register_model


class WideResNet(PreActResNet):
    """WRN-``depth``-``widen_factor``; depth = 6n+4."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        dropout: float = 0.0,
        num_classes: int = 10,
        in_channels: int = 3,
    ):
        if depth < 10 or (depth - 4) % 6 or widen_factor < 1:
            raise CifarlensError(
                f"Wide ResNet needs depth = 6n+4 with n >= 1 and widen_factor >= 1, "
                f"got depth={depth}, widen_factor={widen_factor}"
            )
        n = (depth - 4) // 6
        super().__init__(
            num_classes,
            in_channels,
            stem_width=16,
            widths=(16 * widen_factor, 32 * widen_factor, 64 * widen_factor),
            depths=(n, n, n),
            dropout=dropout,
        )


@register_model(recipe="modern")
def wrn16_8(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    """WRN-16-8, 11.0M parameters."""
    return WideResNet(16, 8, dropout, num_classes, in_channels)


@register_model(recipe="modern")
def wrn28_10(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    """WRN-28-10, 36.5M parameters (the paper trains it with dropout 0.3 as well)."""
    return WideResNet(28, 10, dropout, num_classes, in_channels)
