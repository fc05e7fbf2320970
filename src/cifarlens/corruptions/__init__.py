"""CIFAR-10-C: the 15 corruptions of Hendrycks & Dietterich 2019 ("Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations", ICLR), generated on the fly, and a reader
of the official CIFAR-10-C / CIFAR-100-C .npy folders.

Parameters are those of the script that wrote CIFAR-10-C, ``ImageNet-C/create_c/make_cifar_c.py``
in github.com/hendrycks/robustness; the implementations are our own, batched in torch on the
images' device (fog's fractal and JPEG run on the CPU). Every corruption maps uint8 (B, C, H, W),
C = 1 or 3, to the same; like the generator's ``np.uint8`` the result is truncated, not rounded.

Exact (the generator's operation; in distribution where random): gaussian_noise, shot_noise,
impulse_noise, defocus_blur, glass_blur (which does what the generator's loop does, copy rather
than swap: see :mod:`.blur`), zoom_blur, frost (with the generator's photographs, from the
``imagecorruptions`` package: ``pip install 'cifarlens[corruptions]'``), fog, brightness,
contrast, elastic_transform, pixelate (Pillow's BOX resize rebuilt) and jpeg_compression
(Pillow itself).

Rebuilt, not the paper's code path: motion_blur, and the motion blur inside snow. The paper
calls ImageMagick's MotionBlurImage through Wand, which is not a dependency; we rebuild its
kernel (a one-sided Gaussian line with rounded offsets, replicated edges, truncated 8-bit
output). Other ImageMagick builds than the one we checked may differ by round-off.

How close: we ran the generator's own functions (today's numpy, scipy, scikit-image, OpenCV,
and ImageMagick 6.9.11 through Wand) on the same images and, for the random ones, the same
random numbers. Identical, or one grey level apart: snow, frost, contrast, pixelate and JPEG
identical; motion_blur off by one on under 0.5 % of values; elsewhere on ties, where the exact
value is a whole number and the generator's float64 lands just under it (up to 11 % of values
for defocus severity 4, under 5 % otherwise). The three noises were compared by their statistics.

Randomness comes only from a ``torch.Generator`` (numpy parts from a numpy Generator seeded by
it), by default seeded from (seed, name, severity) with crc32, so a seed gives one result.
The draws follow the generator's distributions, not its random streams: images match
CIFAR-10-C's in distribution, not pixel for pixel.

Public API: :data:`CORRUPTIONS` (registry of :class:`Corruption`), :func:`corrupt`,
:func:`list_corruptions`, :func:`missing_requirement`, :func:`severity_measure`, :class:`CorruptionsDir`.
"""

from cifarlens.corruptions.catalog import (
    CORRUPTIONS, FAMILIES, MAX_SEVERITY, Corruption, corrupt, list_corruptions, make_generator, missing_requirement,
    severity_measure,
)
from cifarlens.corruptions.npy import CorruptionsDir

__all__ = [
    "CORRUPTIONS", "FAMILIES", "MAX_SEVERITY", "Corruption", "CorruptionsDir", "corrupt", "list_corruptions",
    "make_generator", "missing_requirement", "severity_measure",
]
