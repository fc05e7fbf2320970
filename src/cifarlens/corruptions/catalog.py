"""The 15 CIFAR-10-C corruptions with the generator's CIFAR parameters, in the paper's order.

Parameters: ``ImageNet-C/create_c/make_cifar_c.py`` of github.com/hendrycks/robustness (the
script that wrote CIFAR-10-C and CIFAR-100-C). ``levels`` holds its per-severity values in
its own units; ``measure`` turns a level into the one scalar that grows with severity.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# module by module: importing the package here would tie it into an import circle
from cifarlens.corruptions._common import check_images
from cifarlens.corruptions.blur import (
    defocus_blur, defocus_rms_radius, glass_blur, glass_rms_radius, motion_blur, motion_rms_length, zoom_blur,
    zoom_factors,
)
from cifarlens.corruptions.digital import (
    contrast, elastic_rms_displacement, elastic_transform, jpeg_compression, pixelate,
)
from cifarlens.corruptions.noise import gaussian_noise, impulse_noise, shot_noise
from cifarlens.corruptions.weather import brightness, fog, frost, frost_ratio, snow, snow_amount
from cifarlens.registry import Registry

MAX_SEVERITY = 5
FAMILIES = ("noise", "blur", "weather", "digital")


def _same(level: float) -> float:
    return float(level)


@dataclass(frozen=True)
class Corruption:
    name: str  # the official .npy file stem
    family: str  # one of FAMILIES
    levels: tuple[Any, ...]  # the generator's parameter(s) at severity 1..5
    unit: str  # what ``levels`` holds
    fn: Callable[..., Tensor] = field(repr=False)  # fn(images, level[, generator])
    random: bool = False  # fn takes a torch.Generator
    measure: Callable[[Any], float] = field(default=_same, repr=False)  # level -> scalar growing with severity
    measure_unit: str = ""  # what ``measure`` returns

    def parameter(self, severity: int) -> Any:
        if not 1 <= severity <= len(self.levels):
            raise ValueError(f"{self.name}: severity must be 0..{len(self.levels)}, got {severity}")
        return self.levels[severity - 1]

    def severity_measure(self, severity: int) -> float:
        return 0.0 if severity == 0 else float(self.measure(self.parameter(severity)))


CORRUPTIONS: Registry[Corruption] = Registry("corruption")
_PAPER_ORDER: list[str] = []  # registration order below is the paper's


def _register(c: Corruption) -> None:
    if c.family not in FAMILIES or len(c.levels) != MAX_SEVERITY:
        raise ValueError(f"corruption {c.name!r}: family {c.family!r}, {len(c.levels)} levels")
    CORRUPTIONS.register(c.name)(c)
    _PAPER_ORDER.append(c.name)


_register(Corruption("gaussian_noise", "noise", (0.04, 0.06, 0.08, 0.09, 0.10), "noise std ([0, 1] units)",
                     gaussian_noise, random=True, measure_unit="noise std"))
_register(Corruption("shot_noise", "noise", (500, 250, 100, 75, 50), "photons per unit intensity",
                     shot_noise, random=True, measure=lambda p: 1 / p, measure_unit="1 / photons"))
_register(Corruption("impulse_noise", "noise", (0.01, 0.02, 0.03, 0.05, 0.07), "fraction of values replaced",
                     impulse_noise, random=True, measure_unit="fraction replaced"))
_register(Corruption("defocus_blur", "blur", ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
                     "(disk radius px, anti-alias sigma px)", defocus_blur,
                     measure=defocus_rms_radius, measure_unit="kernel RMS radius (px)"))
_register(Corruption("glass_blur", "blur", ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
                     "(Gaussian sigma px, max_delta px, iterations)", glass_blur, random=True,
                     measure=glass_rms_radius, measure_unit="RMS spread (px)"))
_register(Corruption("motion_blur", "blur", ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
                     "(ImageMagick radius px, sigma px)", motion_blur, random=True,
                     measure=motion_rms_length, measure_unit="streak RMS length (px)"))
_register(Corruption("zoom_blur", "blur", (1.06, 1.11, 1.16, 1.21, 1.26), "stop of np.arange(1, stop, 0.01) zooms",
                     zoom_blur, measure=lambda stop: zoom_factors(stop)[-1], measure_unit="largest zoom factor"))
_register(Corruption("snow", "weather",
                     ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
                      (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
                      (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
                     "(layer mean, layer std, layer zoom, threshold, blur radius px, blur sigma px, image weight)",
                     snow, random=True, measure=snow_amount, measure_unit="mean snow-layer intensity"))
_register(Corruption("frost", "weather", ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
                     "(image weight, frost weight)", frost, random=True,
                     measure=frost_ratio, measure_unit="frost weight / image weight"))
_register(Corruption("fog", "weather", ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
                     "(fog strength, plasma decay)", fog, random=True,
                     measure=lambda level: level[0], measure_unit="fog strength"))
_register(Corruption("brightness", "weather", (0.05, 0.1, 0.15, 0.2, 0.3), "HSV value shift",
                     brightness, measure_unit="value shift"))
_register(Corruption("contrast", "digital", (0.75, 0.5, 0.4, 0.3, 0.15), "contrast factor",
                     contrast, measure=lambda f: 1 - f, measure_unit="1 - factor"))
_register(Corruption("elastic_transform", "digital",
                     tuple((32 * a, 32 * s, 32 * j) for a, s, j in  # the paper's IMSIZE * fractions, in px
                           ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))),
                     "(alpha px, sigma px, affine jitter px)", elastic_transform, random=True,
                     measure=elastic_rms_displacement, measure_unit="elastic RMS displacement (px)"))
_register(Corruption("pixelate", "digital", (0.95, 0.9, 0.85, 0.75, 0.65), "resize factor",
                     pixelate, measure=lambda f: 1 - f, measure_unit="1 - factor"))
_register(Corruption("jpeg_compression", "digital", (80, 65, 58, 50, 40), "JPEG quality",
                     jpeg_compression, measure=lambda q: 100 - q, measure_unit="100 - quality"))


def list_corruptions(family: str | None = None) -> list[str]:
    """The corruption names in the paper's order (noise, blur, weather, digital), or one family's."""
    return [n for n in _PAPER_ORDER if family is None or CORRUPTIONS.get(n).family == family]


def missing_requirement(name: str) -> str | None:
    """Why corruption ``name`` cannot run in this installation (None: it can). Only frost needs
    more than cifarlens itself: the paper's frost photographs, from the ``corruptions`` extra."""
    CORRUPTIONS.get(name)
    if name == "frost":
        from cifarlens.corruptions.weather import frost_folder

        if frost_folder() is None:
            return "needs the paper's frost photographs: pip install 'cifarlens[corruptions]'"
    return None


def severity_measure(name: str, severity: int) -> float:
    """The scalar corruption ``name`` claims grows with severity (0.0 at severity 0)."""
    return CORRUPTIONS.get(name).severity_measure(severity)


def make_generator(name: str, severity: int, seed: int = 0) -> torch.Generator:
    """The CPU generator of (seed, corruption, severity); crc32, not hash(), which changes per process."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()) * 7 + severity)


def corrupt(images: Tensor, name: str, severity: int, *, seed: int = 0,
            generator: torch.Generator | None = None) -> Tensor:
    """Corruption ``name`` at ``severity`` (1..5; 0 = unchanged copy) of uint8 images (B, C, H, W).

    Random corruptions draw from ``generator`` if given, else from one seeded by (seed, name,
    severity), so the result does not depend on what ran before."""
    c = CORRUPTIONS.get(name)
    check_images(images, name)
    if severity == 0:
        return images.clone()
    level = c.parameter(severity)
    if c.random:
        return c.fn(images, level, generator if generator is not None else make_generator(name, severity, seed))
    return c.fn(images, level)
