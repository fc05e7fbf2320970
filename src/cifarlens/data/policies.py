"""Augmentation policies added to a level (``data.policies``): Cutout, RandomErasing, Gaussian
noise, AutoAugment, RandAugment, TrivialAugmentWide, MixUp and CutMix.

Each is registered in ``POLICIES`` with the stage of the batched pipeline it runs in, whatever
order they are listed in (see :class:`cifarlens.data.augment.BatchAugment`):

1. ``image``: uint8 (B, C, H, W) -> uint8, after the level's crop and flip (the auto policies);
2. ``tensor``: normalised float (B, C, H, W) -> float, after normalisation (Cutout, RandomErasing, noise);
3. ``mix``: images and labels -> images and soft targets (B, K), in the loader (MixUp, CutMix).

Every random parameter is drawn per image from the loader's ``torch.Generator`` on the training
device, and nothing reads a value back to the host, so a batch is a pure function of the seed
and a GPU's queue never waits. These are a few lines each over whole batches; torchvision's
MixUp/CutMix draw one lambda per batch and kornia draws from the global RNG (see
:mod:`cifarlens.data.autoaugment` for the auto policies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from cifarlens.config import LOADERS, DataConfig
from cifarlens.data.autoaugment import AutoAugment, RandAugment, TrivialAugmentWide
from cifarlens.data.augment import AUGMENT_LEVELS, FLIPS, LEVEL_WORDS, channel_constant
from cifarlens.data.base import DatasetInfo, check_image_size
from cifarlens.errors import CifarlensError
from cifarlens.registry import Registry, unknown_name


def _box_mask(h: int, w: int, top: Tensor, left: Tensor, bottom: Tensor, right: Tensor) -> Tensor:
    """(B, 1, H, W) bool: inside each image's box [top, bottom) x [left, right); bounds (B,) ints."""
    rows = torch.arange(h, device=top.device).view(1, h, 1)
    cols = torch.arange(w, device=top.device).view(1, 1, w)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < bottom.view(-1, 1, 1))
              & (cols >= left.view(-1, 1, 1)) & (cols < right.view(-1, 1, 1)))
    return inside.unsqueeze(1)


def _uniform(n: int, generator: torch.Generator, device: torch.device, low: float = 0.0, high: float = 1.0) -> Tensor:
    return low + (high - low) * torch.rand(n, device=device, generator=generator)


@dataclass(frozen=True)
class Cutout:
    """Cutout (DeVries & Taylor 2017, arXiv:1708.04552): one ``size`` x ``size`` square per image
    set to 0 after normalisation (the mean colour); its centre is anywhere in the image, so it
    may be cut by the border. 16 for CIFAR-10 (8 for CIFAR-100 in the paper)."""

    size: int = 16

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        b, _, h, w = x.shape
        cy = torch.randint(h, (b,), device=x.device, generator=generator)
        cx = torch.randint(w, (b,), device=x.device, generator=generator)
        half = self.size // 2
        inside = _box_mask(h, w, cy - half, cx - half, cy - half + self.size, cx - half + self.size)
        return x.masked_fill(inside, 0.0)


@dataclass(frozen=True)
class RandomErasing:
    """Random Erasing (Zhong et al. 2017, arXiv:1708.04896): with probability ``p`` per image, a
    rectangle of 2-40 % of the image, aspect ratio 0.3-3.3 (log-uniform), filled with random
    pixels (uniform colours, normalised like the image). The paper retries until the rectangle
    fits; here each image draws ``ATTEMPTS`` rectangles at once and keeps the first that fits
    (none fits: not erased), as torchvision's RandomErasing does with its 10 attempts."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    p: float = 0.5
    area: tuple[float, float] = (0.02, 0.4)
    ratio: tuple[float, float] = (0.3, 1 / 0.3)
    ATTEMPTS = 10

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        b, c, h, w = x.shape
        k, device = self.ATTEMPTS, x.device
        area = _uniform(b * k, generator, device, *self.area).view(b, k) * (h * w)
        log_ratio = _uniform(b * k, generator, device, *(math.log(r) for r in self.ratio)).view(b, k)
        eh = (area * log_ratio.exp()).sqrt().round().long()  # (B, K) heights
        ew = (area / log_ratio.exp()).sqrt().round().long()
        fits = (eh < h) & (ew < w) & (eh > 0) & (ew > 0)
        first = fits.int().argmax(dim=1, keepdim=True)  # the first attempt that fits (0 if none)
        eh, ew = eh.gather(1, first).squeeze(1), ew.gather(1, first).squeeze(1)  # (B,)
        erase = fits.any(dim=1) & (torch.rand(b, device=device, generator=generator) < self.p)
        top = (torch.rand(b, device=device, generator=generator) * (h - eh + 1)).long()
        left = (torch.rand(b, device=device, generator=generator) * (w - ew + 1)).long()
        inside = _box_mask(h, w, top, left, top + eh, left + ew) & erase.view(-1, 1, 1, 1)
        noise = torch.rand(x.shape, device=device, generator=generator, dtype=x.dtype)
        noise = (noise - channel_constant(self.mean, device, x.dtype)) / channel_constant(self.std, device, x.dtype)
        return torch.where(inside, noise, x)


@dataclass(frozen=True)
class GaussianNoise:
    """Additive Gaussian noise, a robustness augmentation: with probability ``p`` per image, noise of
    a standard deviation drawn uniformly from [0, ``max_std``] (in units of the [0, 1] pixel range,
    like CIFAR-10-C's gaussian_noise: 0.04-0.10) is added to every pixel and channel, and the result
    clipped to the range of real pixels, as CIFAR-10-C clips. Runs after normalisation, so noise and
    range are divided by each channel's std. Mild noise is what breaks whitened first layers
    (docs/explain-and-report.md, *The noise collapse*)."""

    mean: tuple[float, ...]  # the normalisation's per-channel mean and std
    std: tuple[float, ...]
    max_std: float = 0.1
    p: float = 0.5

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        b, device = x.shape[0], x.device
        sigma = _uniform(b, generator, device, 0.0, self.max_std) * (torch.rand(b, device=device, generator=generator) < self.p)
        noise = torch.randn(x.shape, device=device, generator=generator, dtype=x.dtype)  # (B, C, H, W)
        mean, std = channel_constant(self.mean, device, x.dtype), channel_constant(self.std, device, x.dtype)
        noisy = x + noise * sigma.view(-1, 1, 1, 1).to(x.dtype) / std
        return torch.maximum(torch.minimum(noisy, (1 - mean) / std), -mean / std)  # pixels stay in [0, 1]


def sample_beta(alpha: float, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """(n,) draws of Beta(alpha, alpha) from ``generator``. torch.distributions.Beta has no
    generator argument; Beta is G1 / (G1 + G2) for independent Gamma(alpha) draws, and
    ``torch._standard_gamma`` (the sampler torch.distributions.Gamma itself calls) takes one."""
    concentration = torch.full((2, n), float(alpha), device=device)
    g = torch._standard_gamma(concentration, generator=generator)
    return g[0] / (g[0] + g[1]).clamp_min(1e-12)


@dataclass(frozen=True)
class MixCut:
    """MixUp (Zhang et al. 2018, arXiv:1710.09412) and CutMix (Yun et al. 2019, arXiv:1905.04899),
    per image: image i is paired with image ``perm[i]`` of the same batch; with probability
    ``cutmix_prob`` a box of its partner covering 1 - lambda of it is pasted in (lambda ~ Beta,
    then set to the box's actual share), else with probability ``mixup_prob`` the two are blended
    by lambda ~ Beta; the others are left as they are. A probability of 0 switches one off.
    Targets are the same blend of the two one-hot labels, so they sum to 1."""

    num_classes: int
    mixup_alpha: float = 1.0
    mixup_prob: float = 0.0
    cutmix_alpha: float = 1.0
    cutmix_prob: float = 0.0

    def __call__(self, x: Tensor, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """x (B, C, H, W) float, labels (B,) -> mixed x, targets (B, K) float32."""
        b, _, h, w = x.shape
        device = x.device
        partner = torch.randperm(b, device=device, generator=generator)
        u = torch.rand(b, device=device, generator=generator)
        cut = u < self.cutmix_prob
        mix = ~cut & (torch.rand(b, device=device, generator=generator) < self.mixup_prob)
        # CutMix: a box of side sqrt(1 - lambda) of the image's, centred anywhere, clipped at the border
        lam_cut = sample_beta(self.cutmix_alpha, b, generator, device)
        side = (1 - lam_cut).sqrt()
        bh, bw = (h * side).long(), (w * side).long()
        cy = torch.randint(h, (b,), device=device, generator=generator)
        cx = torch.randint(w, (b,), device=device, generator=generator)
        top, bottom = (cy - bh // 2).clamp(0, h), (cy + bh - bh // 2).clamp(0, h)
        left, right = (cx - bw // 2).clamp(0, w), (cx + bw - bw // 2).clamp(0, w)
        box = _box_mask(h, w, top, left, bottom, right) & cut.view(-1, 1, 1, 1)  # (B, 1, H, W)
        lam_cut = 1 - ((bottom - top) * (right - left)).float() / (h * w)  # the share left after clipping
        lam_mix = sample_beta(self.mixup_alpha, b, generator, device)
        lam = torch.where(cut, lam_cut, torch.where(mix, lam_mix, torch.ones_like(lam_mix)))  # (B,)
        other = x[partner]
        blend = torch.where(mix, lam_mix, torch.ones_like(lam_mix)).view(-1, 1, 1, 1)
        mixed = torch.where(box, other, blend * x + (1 - blend) * other)
        one_hot = torch.nn.functional.one_hot(labels, self.num_classes).float()  # (B, K)
        targets = lam.view(-1, 1) * one_hot + (1 - lam.view(-1, 1)) * one_hot[partner]
        return mixed, targets


class Policy(NamedTuple):
    stage: str  # "image", "tensor" or "mix" (see the module docstring)
    build: Callable[[DataConfig, DatasetInfo], object]
    describe: Callable[[DataConfig], str]  # for the run's report, e.g. "Cutout 16x16"
    settings: tuple[str, ...] = ()  # the DataConfig fields it reads ("cutout_size"): unused without it


POLICIES: Registry[Policy] = Registry("augmentation policy")
POLICIES.register("cutout")(Policy("tensor", lambda cfg, info: Cutout(cfg.cutout_size),
                                   lambda cfg: f"Cutout {cfg.cutout_size}x{cfg.cutout_size}", ("cutout_size",)))
POLICIES.register("erasing")(Policy("tensor", lambda cfg, info: RandomErasing(info.mean, info.std, cfg.erasing_prob),
                                    lambda cfg: f"RandomErasing p={cfg.erasing_prob:g}", ("erasing_prob",)))
POLICIES.register("noise")(Policy("tensor", lambda cfg, info: GaussianNoise(info.mean, info.std, cfg.noise_std, cfg.noise_prob),
                                  lambda cfg: f"Gaussian noise std U(0, {cfg.noise_std:g}) p={cfg.noise_prob:g}",
                                  ("noise_std", "noise_prob")))
POLICIES.register("autoaugment")(Policy("image", lambda cfg, info: AutoAugment(),
                                        lambda cfg: "AutoAugment (CIFAR-10 policy)"))
POLICIES.register("randaugment")(Policy("image", lambda cfg, info: RandAugment(cfg.randaugment_n, cfg.randaugment_m),
                                        lambda cfg: f"RandAugment N={cfg.randaugment_n} M={cfg.randaugment_m}",
                                        ("randaugment_n", "randaugment_m")))
POLICIES.register("trivialaugment")(Policy("image", lambda cfg, info: TrivialAugmentWide(),
                                           lambda cfg: "TrivialAugmentWide"))
POLICIES.register("mixup")(Policy("mix", lambda cfg, info: None,
                                  lambda cfg: f"MixUp alpha={cfg.mixup_alpha:g} p={cfg.mixup_prob:g}",
                                  ("mixup_alpha", "mixup_prob")))
POLICIES.register("cutmix")(Policy("mix", lambda cfg, info: None,
                                   lambda cfg: f"CutMix alpha={cfg.cutmix_alpha:g} p={cfg.cutmix_prob:g}",
                                   ("cutmix_alpha", "cutmix_prob")))


def list_policies() -> list[str]:
    return POLICIES.names()


def check_policies(cfg: DataConfig, image_size: int | None = None) -> None:
    """One-line errors for unknown or repeated policies and parameters out of range; with
    ``image_size`` (the side of the images, once read), also for a crop padding or a Cutout
    square that could leave no image at all."""
    for name in cfg.policies:
        POLICIES.get(name)
    repeated = sorted({name for name in cfg.policies if cfg.policies.count(name) > 1})
    if repeated:
        raise CifarlensError(f"data.policies lists {', '.join(repeated)} more than once")
    checks = [
        (cfg.cutout_size >= 1, f"data.cutout_size must be >= 1 pixel, got {cfg.cutout_size}"),
        (0.0 <= cfg.erasing_prob <= 1.0, f"data.erasing_prob must be in [0, 1], got {cfg.erasing_prob}"),
        (cfg.mixup_alpha > 0, f"data.mixup_alpha must be > 0, got {cfg.mixup_alpha}"),
        (cfg.cutmix_alpha > 0, f"data.cutmix_alpha must be > 0, got {cfg.cutmix_alpha}"),
        (0.0 <= cfg.mixup_prob <= 1.0, f"data.mixup_prob must be in [0, 1], got {cfg.mixup_prob}"),
        (0.0 <= cfg.cutmix_prob <= 1.0, f"data.cutmix_prob must be in [0, 1], got {cfg.cutmix_prob}"),
        (cfg.noise_std > 0, f"data.noise_std must be > 0, got {cfg.noise_std}"),
        (0.0 <= cfg.noise_prob <= 1.0, f"data.noise_prob must be in [0, 1], got {cfg.noise_prob}"),
        (cfg.workers >= 0, f"data.workers must be >= 0 (0: load in the main process), got {cfg.workers}"),
    ]
    padding = cfg.crop_padding
    if padding is not None:
        checks.append((isinstance(padding, int) and padding >= 0,
                       f"data.crop_padding must be a whole number of pixels >= 0, got {padding!r}"))
    if image_size and isinstance(padding, int) and padding >= image_size:
        checks.append((False, f"data.crop_padding {padding} is not smaller than the {image_size}-pixel images: a "
                              "random crop could hold no image at all (4 is usual for 32 pixels)"))
    if image_size and "cutout" in cfg.policies and cfg.cutout_size >= image_size:
        checks.append((False, f"data.cutout_size {cfg.cutout_size} is not smaller than the {image_size}-pixel "
                              "images: Cutout could blank a whole image (16 is usual for 32 pixels)"))
    for ok, message in checks:
        if not ok:
            raise CifarlensError(message)
    if "randaugment" in cfg.policies:
        RandAugment(cfg.randaugment_n, cfg.randaugment_m)  # checks N and M


def check_settings(cfg: DataConfig, image_size: int | None = None) -> None:
    """:func:`check_policies`, and the level, flip, loader and validation share, each named with
    the closest valid choice when misspelt: what a run checks before it reads (or downloads) data."""
    check_policies(cfg, image_size)
    check_image_size(cfg.image_size)
    choices = [("augmentation level", cfg.augment, list(AUGMENT_LEVELS)), ("data.flip", cfg.flip, list(FLIPS)),
               ("data.loader", cfg.loader, list(LOADERS))]
    for kind, value, names in choices:
        if value is not None and value not in names:
            raise CifarlensError(unknown_name(kind, value, names))
    if cfg.val_fraction is not None and not 0 <= cfg.val_fraction < 1:
        raise CifarlensError(f"data.val_fraction must be in [0, 1) (0 = no validation split), got {cfg.val_fraction}")


def unused_policy_settings(cfg: DataConfig) -> list[str]:
    """Warnings for the policy settings set away from their default whose policy is not on
    (``--set data.cutout_size=8`` without ``+cutout`` changed nothing, silently), and for
    ``data.workers`` beside the batched loader, which has no workers."""
    defaults = DataConfig()
    unused = [f"data.{key}={getattr(cfg, key)} is not used (no {name} in data.policies; add it with "
              f"--augment LEVEL+{name})"
              for name in POLICIES.names() if name not in cfg.policies
              for key in POLICIES.get(name).settings if getattr(cfg, key) != getattr(defaults, key)]
    if cfg.loader == "batched" and cfg.workers != defaults.workers:
        unused.append(f"data.workers={cfg.workers} is not used (the batched loader augments on the training "
                      "device, in this process; workers belong to data.loader=perimage)")
    return unused


def build_policies(cfg: DataConfig, info: DatasetInfo) -> tuple[tuple, tuple, MixCut | None]:
    """(image policies, tensor policies, the MixUp/CutMix mixer or None) for ``cfg.policies``."""
    check_policies(cfg)
    stages: dict[str, list] = {"image": [], "tensor": []}
    for name in cfg.policies:
        policy = POLICIES.get(name)
        if policy.stage != "mix":
            stages[policy.stage].append(policy.build(cfg, info))
    mixer = None
    if "mixup" in cfg.policies or "cutmix" in cfg.policies:
        mixer = MixCut(info.num_classes,
                       mixup_alpha=cfg.mixup_alpha, mixup_prob=cfg.mixup_prob if "mixup" in cfg.policies else 0.0,
                       cutmix_alpha=cfg.cutmix_alpha, cutmix_prob=cfg.cutmix_prob if "cutmix" in cfg.policies else 0.0)
    return tuple(stages["image"]), tuple(stages["tensor"]), mixer


def describe_augmentation(cfg: DataConfig | dict) -> str:
    """The level and policies in words, e.g. "standard crop+flip + Cutout 16x16", for reports;
    ``cfg`` may be a run's saved ``data`` section (keys this version does not know are ignored)."""
    if isinstance(cfg, dict):
        known = {f.name for f in fields(DataConfig)}
        cfg = DataConfig(**{k: v for k, v in cfg.items() if k in known})
    level = cfg.augment or "default"
    return " + ".join([LEVEL_WORDS.get(level, level)]
                      + [POLICIES.get(n).describe(cfg) if n in POLICIES else n for n in cfg.policies])
