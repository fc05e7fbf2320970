"""AutoAugment (CIFAR-10 policy), RandAugment and TrivialAugmentWide, batched, with an operation per image.

The papers sample the operation (AutoAugment: the sub-policy) and its magnitude for every
image. torchvision's transforms (0.29) draw once per call, so a batch tensor gets one
operation for all of its images, and kornia.augmentation.auto (0.9) likewise picks one
sub-policy per batch from the global RNG. Per-image PIL transforms in DataLoader workers
would be correct but are the slow path this package avoids (``benchmarks/``). So the
operations are ours, written for a batch with one operation index and one magnitude per
image, drawn from the loader's ``torch.Generator`` on the training device, with no host
read: the operations fall in three families (geometric: an affine warp; blends with a
degenerate image; 256-level lookup tables), each family runs once for the whole batch with
each image's own parameters, and each image keeps its own family's result (``torch.where``).

Operation definitions, magnitude ranges and the CIFAR-10 policy follow torchvision's
(``torchvision.transforms.v2.AutoAugment``/``RandAugment``/``TrivialAugmentWide``;
tests/test_policies.py compares the tables): fill 0 outside the warped image, nearest
interpolation, shears about the top-left corner, rotations about the centre.
Images are uint8 (B, C, H, W) in and out; in between they are float on the 0..255 scale, not
rounded after each operation as a uint8 pipeline would be (the lookups read rounded levels).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cifarlens.errors import CifarlensError

GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")

# AutoAugment's CIFAR-10 policy (Cubuk et al. 2019, arXiv:1805.09501, appendix; as in torchvision):
# 25 sub-policies of two (operation, probability, magnitude bin of 10) each
CIFAR10_POLICY: tuple[tuple[tuple[str, float, int | None], ...], ...] = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)


def magnitude_space(kind: str, num_bins: int, height: int, width: int) -> dict[str, tuple[list[float] | None, bool]]:
    """Operation -> (magnitude of each bin, or None; whether its sign is random), as torchvision defines them.

    ``kind`` "standard" is AutoAugment's and RandAugment's space, "wide" TrivialAugmentWide's.
    Posterize's magnitude is bits kept, Solarize's the threshold as a fraction of 255,
    translations are in pixels, rotations in degrees.
    """
    def linspace(top: float, start: float = 0.0) -> list[float]:
        return [start + (top - start) * i / (num_bins - 1) for i in range(num_bins)]

    wide = kind == "wide"
    colour = linspace(0.99 if wide else 0.9)
    steps = 6 if wide else 4  # Posterize goes from 8 bits down to 2 (wide) or 4
    space: dict[str, tuple[list[float] | None, bool]] = {
        "ShearX": (linspace(0.99 if wide else 0.3), True),
        "ShearY": (linspace(0.99 if wide else 0.3), True),
        "TranslateX": (linspace(32.0 if wide else 150.0 / 331.0 * width), True),
        "TranslateY": (linspace(32.0 if wide else 150.0 / 331.0 * height), True),
        "Rotate": (linspace(135.0 if wide else 30.0), True),
        "Brightness": (colour, True), "Color": (colour, True), "Contrast": (colour, True), "Sharpness": (colour, True),
        "Posterize": ([float(round(8 - i / ((num_bins - 1) / steps))) for i in range(num_bins)], False),
        "Solarize": (linspace(0.0, start=1.0), False),
        "AutoContrast": (None, False), "Equalize": (None, False), "Invert": (None, False),
    }
    return space


@dataclass(frozen=True)
class _Table:
    """A policy's operations as tensors on one device."""

    ops: tuple[str, ...]  # operation names; index 0 is Identity
    magnitudes: Tensor  # (num_ops, num_bins) float; 0 for operations without a magnitude
    signed: Tensor  # (num_ops,) bool


@functools.lru_cache(maxsize=32)
def _table(kind: str, ops: tuple[str, ...], num_bins: int, height: int, width: int, device: torch.device) -> _Table:
    # made once per (policy, image size, device): a host-to-device copy per batch would stall a GPU
    space = magnitude_space(kind, num_bins, height, width)
    none = ([0.0] * num_bins, False)  # Identity, and operations without a magnitude
    rows = [(space.get(op, none)[0] or none[0]) for op in ops]
    signs = [space.get(op, none)[1] for op in ops]
    with torch.inference_mode(False):
        return _Table(ops, torch.tensor(rows, device=device), torch.tensor(signs, device=device))


def apply_ops(x: Tensor, op: Tensor, magnitude: Tensor, ops: tuple[str, ...]) -> Tensor:
    """x float (B, C, H, W) on the 0..255 scale; image i gets operation ``ops[op[i]]`` with
    ``magnitude[i]`` (B,). Only the operations named in ``ops`` are computed.

    Each of the three families runs once for the whole batch, whichever of its operations an
    image drew (about 20 passes over the batch instead of 60 for one pass per operation, which
    made AutoAugment ~2x slower on a CPU): geometric operations are one warp, the blends one
    blend, the lookup-table operations one lookup.
    """
    out = x
    for family in (_warp, _blends, _lookups):
        chosen, result = family(x, op, magnitude, ops)
        if chosen is not None:
            out = torch.where(chosen, result, out)
    return out


def _chosen(op: Tensor, ops: tuple[str, ...], names) -> Tensor | None:
    """(B, 1, 1, 1) bool: the images whose operation is one of ``names``; None if ``ops`` has none."""
    present = [ops.index(name) for name in names if name in ops]
    if not present:
        return None
    mask = torch.zeros_like(op, dtype=torch.bool)
    for index in present:
        mask |= op == index
    return mask.view(-1, 1, 1, 1)


def _warp(x: Tensor, op: Tensor, magnitude: Tensor, ops: tuple[str, ...]):
    """ShearX/Y, TranslateX/Y, Rotate: each image's own affine map, nearest-neighbour, 0 outside,
    one ``grid_sample`` for the batch."""
    chosen = _chosen(op, ops, GEOMETRIC)
    if chosen is None:
        return None, None
    b, _, h, w = x.shape
    zero = torch.zeros_like(magnitude)

    def pick(name: str) -> Tensor:  # (B,) magnitude where the image's operation is ``name``, else 0
        return torch.where(op == ops.index(name), magnitude, zero) if name in ops else zero

    # inverse map, output pixel -> source pixel: src = A @ dst + t in pixel coordinates (origin top-left).
    # An image has one operation, so the others' magnitudes are 0 and the terms add up:
    # rotation about the centre c (counter-clockwise for a positive angle): A = R^T, t = c - R^T c;
    # shears about the origin: A = [[1, sx], [sy, 1]]; translations by whole pixels (torchvision's int()): t = -d
    shear_x, shear_y = pick("ShearX"), pick("ShearY")
    tx, ty = pick("TranslateX").trunc(), pick("TranslateY").trunc()
    angle = pick("Rotate") * (math.pi / 180)
    cos, sin = torch.cos(angle), torch.sin(angle)
    a11, a12, a21, a22 = cos, shear_x - sin, sin + shear_y, cos
    cx, cy = w / 2, h / 2
    t1 = cx - (cos * cx - sin * cy) - tx
    t2 = cy - (sin * cx + cos * cy) - ty
    ys = torch.arange(h, device=x.device, dtype=x.dtype) + 0.5  # pixel centres
    xs = torch.arange(w, device=x.device, dtype=x.dtype) + 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W)
    src_x = a11.view(b, 1, 1) * gx + a12.view(b, 1, 1) * gy + t1.view(b, 1, 1)  # (B, H, W)
    src_y = a21.view(b, 1, 1) * gx + a22.view(b, 1, 1) * gy + t2.view(b, 1, 1)
    grid = torch.stack((2 * src_x / w - 1, 2 * src_y / h - 1), dim=-1)  # (B, H, W, 2), align_corners=False
    return chosen, F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


BLENDS = ("Brightness", "Color", "Contrast", "Sharpness")


def _blends(x: Tensor, op: Tensor, magnitude: Tensor, ops: tuple[str, ...]):
    """Brightness, Color, Contrast, Sharpness blend the image with a degenerate image d by a factor
    1 + m: x' = d + (1 + m) (x - d), d black, grey, the mean grey or blurred (PIL's ImageEnhance)."""
    chosen = _chosen(op, ops, BLENDS)
    if chosen is None:
        return None, None
    degenerate = torch.zeros((), device=x.device, dtype=x.dtype)  # Brightness: black
    gray = _gray(x)  # (B, 1, H, W)
    for name, image in (("Color", lambda: gray), ("Contrast", lambda: gray.mean(dim=(1, 2, 3), keepdim=True)),
                        ("Sharpness", lambda: _blurred(x))):
        if name in ops:
            degenerate = torch.where(op.view(-1, 1, 1, 1) == ops.index(name), image(), degenerate)
    factor = 1 + magnitude.view(-1, 1, 1, 1)
    return chosen, (degenerate + factor * (x - degenerate)).clamp(0, 255)


def _gray(x: Tensor) -> Tensor:
    """(B, 1, H, W) luma, torchvision's weights; grey images are their own."""
    if x.shape[1] == 1:
        return x
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blurred(x: Tensor) -> Tensor:
    # PIL's SMOOTH kernel (1s around a 5, / 13) is (the 3x3 sum + 4 x the centre) / 13; sums of shifted
    # slices compute it several times faster than avg_pool2d or a depthwise conv2d on a CPU (1 thread,
    # 256 CIFAR images: 1.4 ms against 8 and 5). Border pixels keep their value, as in PIL
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]  # (B, C, H-2, W)
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]  # (B, C, H-2, W-2)
    blurred = x.clone()
    blurred[:, :, 1:-1, 1:-1] = ((box + 4 * x[:, :, 1:-1, 1:-1]) / 13).round()
    return blurred


LOOKUPS = ("Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")


def _lookups(x: Tensor, op: Tensor, magnitude: Tensor, ops: tuple[str, ...]):
    """Posterize, Solarize, AutoContrast, Equalize, Invert map each of a channel's 256 levels through
    a table: a (B, C, 256) table, each image's from its own operation, and one lookup per pixel."""
    chosen = _chosen(op, ops, LOOKUPS)
    if chosen is None:
        return None, None
    b, c, h, w = x.shape
    # uint8 levels, as in torchvision's uint8 pipeline (x is in 0..255: every family's output is)
    q = x.round().long().view(b, c, h * w)
    levels = torch.arange(256, device=x.device, dtype=x.dtype).view(1, 1, 256)
    m = magnitude.view(-1, 1, 1)
    tables = {
        "Posterize": lambda: torch.floor(levels / torch.exp2(8 - m.clamp(0, 8))) * torch.exp2(8 - m.clamp(0, 8)),
        "Solarize": lambda: torch.where(levels >= 255 * m, 255 - levels, levels),  # threshold: a share of 255
        "Invert": lambda: 255 - levels,
        "AutoContrast": lambda: _autocontrast_table(hist, levels),
        "Equalize": lambda: _equalize_table(hist, levels),
    }
    if "AutoContrast" in ops or "Equalize" in ops:
        hist = torch.zeros(b, c, 256, device=x.device, dtype=torch.long)
        hist.scatter_add_(2, q, hist.new_ones(1).expand_as(q))  # (B, C, 256) pixels per level
    table = levels.expand(b, c, 256)
    for name in LOOKUPS:
        if name in ops:
            table = torch.where(op.view(-1, 1, 1) == ops.index(name), tables[name](), table)
    return chosen, table.gather(2, q).view(b, c, h, w)


def _autocontrast_table(hist: Tensor, levels: Tensor) -> Tensor:
    """Stretch each channel's lowest..highest level to 0..255 (a one-level channel is left alone)."""
    present = (hist > 0).int()
    low = present.argmax(2, keepdim=True)  # (B, C, 1) the first level present
    high = 255 - present.flip(2).argmax(2, keepdim=True)  # the last
    stretched = ((levels - low) * (255 / (high - low).clamp_min(1))).clamp(0, 255)
    return torch.where(high > low, stretched, levels)


def _equalize_table(hist: Tensor, levels: Tensor) -> Tensor:
    """PIL's ImageOps.equalize table per channel, as torchvision computes it (its equalize_image)."""
    cum = hist.cumsum(2)  # (B, C, 256)
    top = cum.argmax(2, keepdim=True)  # the highest level present: where the cumulative count stops growing
    step = (cum[..., -1:] - hist.gather(2, top)) // 255  # pixels below the highest level, / 255
    table = ((cum[..., :-1] + step // 2) // step.clamp_min(1)).clamp(0, 255)
    table = torch.cat((torch.zeros_like(table[..., :1]), table), dim=2).to(levels.dtype)
    return torch.where(step > 0, table, levels)  # a near-flat channel is left alone, as PIL does


def _signed(table: _Table, op: Tensor, bin_index: Tensor, generator: torch.Generator) -> Tensor:
    """(B,) magnitudes of each image's operation and bin, negated at random where the operation is signed."""
    magnitude = table.magnitudes[op, bin_index]
    flip = (torch.rand(op.shape, device=op.device, generator=generator) < 0.5) & table.signed[op]
    return torch.where(flip, -magnitude, magnitude)


def _check_uint8(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise CifarlensError(f"auto-augmentation takes uint8 (B, C, H, W) images, got {images.dtype} "
                             f"{tuple(images.shape)}")


def _to_uint8(x: Tensor) -> Tensor:
    return x.round().clamp(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class _PolicyTensors:
    op: Tensor  # (25, 2) long, index into the operation tuple
    prob: Tensor  # (25, 2) float
    bin: Tensor  # (25, 2) long, magnitude bin (0 where the operation has none)


@functools.lru_cache(maxsize=8)
def _policy_tensors(ops: tuple[str, ...], device: torch.device) -> _PolicyTensors:
    with torch.inference_mode(False):
        return _PolicyTensors(
            torch.tensor([[ops.index(op) for op, _, _ in sub] for sub in CIFAR10_POLICY], device=device),
            torch.tensor([[p for _, p, _ in sub] for sub in CIFAR10_POLICY], device=device),
            torch.tensor([[b or 0 for _, _, b in sub] for sub in CIFAR10_POLICY], device=device))


@dataclass(frozen=True)
class AutoAugment:
    """AutoAugment's CIFAR-10 policy: per image, one of 25 sub-policies of two operations,
    each applied with its own probability and fixed magnitude (sign at random)."""

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        _check_uint8(images)
        b, _, h, w = images.shape
        ops = ("Identity",) + tuple(sorted({op for sub in CIFAR10_POLICY for op, _, _ in sub}))
        table = _table("standard", ops, 10, h, w, images.device)
        policy = _policy_tensors(ops, images.device)  # (25, 2) operation, probability, bin
        device = images.device
        choice = torch.randint(len(CIFAR10_POLICY), (b,), device=device, generator=generator)  # (B,)
        x = images.float()
        for slot in range(2):
            op = policy.op[choice, slot]
            applied = torch.rand(b, device=device, generator=generator) <= policy.prob[choice, slot]
            op = torch.where(applied, op, torch.zeros_like(op))  # 0: Identity
            x = apply_ops(x, op, _signed(table, op, policy.bin[choice, slot], generator), ops)
        return _to_uint8(x)


# RandAugment's and TrivialAugmentWide's operations (torchvision's: no Invert)
UNIFORM_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
               "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")


@dataclass(frozen=True)
class RandAugment:
    """RandAugment (Cubuk et al. 2020, arXiv:1909.13719): ``n`` operations in a row, each chosen
    uniformly per image, all at magnitude bin ``m`` of 31 (0..30; sign at random)."""

    n: int = 2
    m: int = 9

    def __post_init__(self):
        if self.n < 1:
            raise CifarlensError(f"data.randaugment_n must be >= 1, got {self.n}")
        if not 0 <= self.m <= 30:
            raise CifarlensError(f"data.randaugment_m must be a magnitude bin in 0..30, got {self.m}")

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        _check_uint8(images)
        b, _, h, w = images.shape
        table = _table("standard", UNIFORM_OPS, 31, h, w, images.device)
        x = images.float()
        bins = torch.full((b,), self.m, device=images.device)
        for _ in range(self.n):
            op = torch.randint(len(UNIFORM_OPS), (b,), device=images.device, generator=generator)
            x = apply_ops(x, op, _signed(table, op, bins, generator), UNIFORM_OPS)
        return _to_uint8(x)


@dataclass(frozen=True)
class TrivialAugmentWide:
    """TrivialAugment (Müller & Hutter 2021, arXiv:2103.10158), wide space: one operation per image,
    chosen uniformly, at a magnitude bin chosen uniformly of 31 (sign at random)."""

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        _check_uint8(images)
        b, _, h, w = images.shape
        table = _table("wide", UNIFORM_OPS, 31, h, w, images.device)
        op = torch.randint(len(UNIFORM_OPS), (b,), device=images.device, generator=generator)
        bins = torch.randint(31, (b,), device=images.device, generator=generator)
        return _to_uint8(apply_ops(images.float(), op, _signed(table, op, bins, generator), UNIFORM_OPS))
