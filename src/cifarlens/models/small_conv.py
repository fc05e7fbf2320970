"""A 3x3 convolution that trains faster on small feature maps on some CPUs.

On a CPU with AMX (Intel Xeon, 4th generation on), oneDNN's convolution kernels handle the
last blocks of FastNet badly: at 32 px the 256 -> 256 convolution on 3x3 maps runs its
weight gradient at ~60 GFLOP/s and the ones on 7x7 maps at ~165, where a plain bf16 matrix
product of the same size runs at ~430 (docs/benchmarks.md, *An im2col path for AMX*). So in
training, under bf16 autocast, on such a CPU, :class:`SmallMapConv2d` computes (PLANS[bf16])

- on maps of at most 3x3: the whole convolution (forward, input and weight gradients) as
  matrix products over the image patches (im2col);
- on maps of at most 7x7: the forward pass and the input gradient with oneDNN as usual, the
  weight gradient as one matrix product over the patches;
- anywhere else (larger maps, evaluation, a GPU, torch.compile): ``nn.Conv2d``.

A full-width fastnet step then took 14-25 % less time on the one AMX machine measured (a 2-core
Intel Xeon VM); on larger maps building the patch matrix costs more than it saves, and with
oneDNN held below AMX the path was no faster at 24 px, hence the gate.

On an AVX2-only CPU, in fp32, oneDNN's forward and input gradient run near the arithmetic's
peak but its weight gradient does not, so there (PLANS[fp32]) the weight gradient alone is a
product over the patches, on maps up to 7x7 and for layers of 128 filters or more (FastNet's
256 -> 256 convolutions; the 64 -> 256 one on 11x11 to 15x15 maps won at some sides and lost at
others): a step 4-6 % shorter at 32 px, level at 24 px (docs/benchmarks.md, *The issue's AVX2
machine*).

The arithmetic is the same (the same products, fp32 accumulation), only its order differs; the
module is an ``nn.Conv2d`` with the same parameters, so weights, exports and CAM hooks do not
see it. ``CIFARLENS_IM2COL=0`` (or ``1``) in the environment turns the path off (or on where
it would not be chosen), to compare the two.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Plan(NamedTuple):
    """Where the path runs, for one precision: the whole convolution on maps up to ``whole_side``,
    the weight gradient alone on maps up to ``weight_side`` with at least ``min_out`` filters."""
    whole_side: int
    weight_side: int
    min_out: int


# Per compute dtype, as measured (docs/benchmarks.md): bf16 products on a CPU with AMX (*An im2col
# path for AMX*); fp32 on an AVX2-only CPU, where oneDNN's weight gradient of the 256 -> 256
# convolutions on 7x7 maps ran at ~125 GFLOP/s against ~150 for the product (*The AVX2 machine*).
PLANS = {torch.bfloat16: Plan(whole_side=3, weight_side=7, min_out=1),
         torch.float32: Plan(whole_side=0, weight_side=7, min_out=128)}


@functools.cache
def im2col_dtypes() -> frozenset[torch.dtype]:
    """The compute dtypes whose plan this process takes: bf16 on a CPU whose oneDNN uses AMX, fp32
    on an AVX2-only CPU (where the path was measured to pay), both or neither if ``CIFARLENS_IM2COL``
    is 1 or 0. Asked once per process."""
    forced = os.environ.get("CIFARLENS_IM2COL", "").strip()
    if forced in ("0", "1"):
        return frozenset(PLANS) if forced == "1" else frozenset()
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX2":
        return frozenset({torch.float32})
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()  # oneDNN held below AMX: no AMX products
    if capped and capped not in ("ALL", "DEFAULT") and "AMX" not in capped:
        return frozenset()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return frozenset({torch.bfloat16}) if capability == "AVX512" and amx() else frozenset()


def _patches(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, 9*C): each position's 3x3 neighbourhood (zero padded), in the
    order (ky, kx, c), read through a strided view of the padded channels-last image."""
    b, c, h, w = x.shape
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (B, H+2, W+2, C), contiguous
    sb, sh, sw, sc = padded.stride()
    return padded.as_strided((b, h, w, 3, 3, c), (sb, sh, sw, sh, sw, sc)).reshape(b * h * w, 9 * c)


def _filter_rows(weight: torch.Tensor) -> torch.Tensor:
    """(out, C, 3, 3) -> (out, 9*C), in the patches' order (ky, kx, c)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


class _Im2colConv3x3(torch.autograd.Function):
    """3x3, stride 1, padding 1, no bias, one group; ``whole``: forward and input gradient as
    matrix products too, else those two by ``F.conv2d`` and its backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, whole: bool) -> torch.Tensor:
        ctx.whole = whole
        ctx.save_for_backward(x, weight)
        if not whole:
            return F.conv2d(x, weight, padding=1)
        b, c, h, w = x.shape
        out = _patches(x) @ _filter_rows(weight).T  # (B*H*W, out)
        return out.view(b, h, w, -1).permute(0, 3, 1, 2)  # NCHW, channels-last in memory

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        b, c, h, w = x.shape
        out_ch = weight.shape[0]
        grad_rows = grad.permute(0, 2, 3, 1).reshape(b * h * w, out_ch)
        grad_x = None
        if ctx.needs_input_grad[0] and ctx.whole:  # col2im: each patch's gradient back onto its pixels
            grad_patches = (grad_rows @ _filter_rows(weight)).view(b, h, w, 3, 3, c)
            padded = grad_patches.new_zeros(b, h + 2, w + 2, c, dtype=torch.float32)  # sums in fp32, as oneDNN's
            for i in range(3):
                for j in range(3):
                    padded[:, i:i + h, j:j + w] += grad_patches[:, :, :, i, j]
            grad_x = padded[:, 1:h + 1, 1:w + 1].permute(0, 3, 1, 2).to(x.dtype)
        elif ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [1, 1], [1, 1], False,
                                                         [0, 0], 1, [True, False, False])[0]
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_rows.T @ _patches(x)).view(out_ch, 3, 3, c).permute(0, 3, 1, 2).to(weight.dtype)
        return grad_x, grad_w, None


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d(in_ch, out_ch, 3, padding="same", bias=False)`` that takes the im2col path
    (module docstring) where it pays."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding="same", bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training or not torch.is_grad_enabled() or x.device.type != "cpu"
                or torch.compiler.is_compiling()):
            return super().forward(x)
        # the dtype the convolution computes in: autocast's (fp16 has no plan), else the input's
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        plan = PLANS[dtype] if dtype in im2col_dtypes() else None
        side = max(x.shape[-2:])
        if plan is None or side > plan.weight_side or self.out_channels < plan.min_out:
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):  # the products in the dtype autocast would run the conv in
            return _Im2colConv3x3.apply(x.to(dtype), self.weight.to(dtype), side <= plan.whole_side)
