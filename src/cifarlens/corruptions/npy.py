"""Reader of the official CIFAR-10-C / CIFAR-100-C folders (Hendrycks & Dietterich 2019).

Layout: ``labels.npy`` (5 * N integer labels: the N test labels once per severity) and one
``<corruption>.npy`` per corruption, uint8 (5 * N, 32, 32, 3), severity 1 first, N images
each (N = 10,000 in the official release). Arrays are memory-mapped and never unpickled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cifarlens.corruptions.catalog import CORRUPTIONS, MAX_SEVERITY, list_corruptions
from cifarlens.errors import CifarlensError

IMAGE_SHAPE = (32, 32, 3)


def _open(path: Path, expected: str) -> np.ndarray:
    """np.load(mmap) with every failure turned into a one-line CifarlensError naming the file."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":  # numpy would call any other file "pickled data" and suggest unpickling it
            raise CifarlensError(f"{path}: not a .npy file (no NumPy header); expected {expected}")
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        reason = ("it holds Python objects, which are never unpickled" if "allow_pickle" in str(e)
                  else " ".join(str(e).split()))
        raise CifarlensError(f"{path}: not a readable .npy file ({reason}); expected {expected}") from None


class CorruptionsDir:
    """An official CIFAR-10-C / CIFAR-100-C folder.

    ``num_classes`` bounds the labels; None infers 10 (all labels < 10) or 100."""

    def __init__(self, path: str | Path, num_classes: int | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CifarlensError(f"{self.path}: no such CIFAR-C folder")
        labels_path = self.path / "labels.npy"
        if not labels_path.is_file():
            raise CifarlensError(f"{labels_path}: missing; a CIFAR-C folder holds labels.npy and "
                                 "<corruption>.npy files")
        expected = f"{MAX_SEVERITY} * N integer labels"
        labels = _open(labels_path, expected)
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) == 0 or len(labels) % MAX_SEVERITY:
            raise CifarlensError(f"{labels_path}: got {labels.dtype} {labels.shape}; expected {expected}")
        labels = np.array(labels, dtype=np.int64)  # a copy: the memmap is read-only
        low, high = int(labels.min()), int(labels.max())
        self.num_classes = num_classes if num_classes is not None else (10 if high < 10 else 100)
        if low < 0 or high >= self.num_classes:
            raise CifarlensError(f"{labels_path}: labels span {low}..{high}, outside 0..{self.num_classes - 1}")
        self.labels = torch.from_numpy(labels)  # (5 * N,)
        self.per_severity = len(labels) // MAX_SEVERITY  # N

    def __repr__(self) -> str:
        return f"CorruptionsDir({str(self.path)!r}, {len(self.corruptions())} corruptions, N={self.per_severity})"

    def corruptions(self) -> list[str]:
        """The names among the 15 whose .npy file is present, in the paper's order."""
        return [n for n in list_corruptions() if (self.path / f"{n}.npy").is_file()]

    def _array(self, name: str) -> np.ndarray:
        CORRUPTIONS.get(name)  # an unknown name is a CifarlensError listing the known ones
        path = self.path / f"{name}.npy"
        shape = (MAX_SEVERITY * self.per_severity, *IMAGE_SHAPE)
        expected = f"uint8 {shape} (5 severities x {self.per_severity} images, as labels.npy)"
        if not path.is_file():
            raise CifarlensError(f"{path}: missing; expected {expected}")
        array = _open(path, expected)
        if array.dtype != np.uint8 or array.shape != shape:
            raise CifarlensError(f"{path}: got {array.dtype} {array.shape}; expected {expected}")
        return array

    def check(self) -> list[str]:
        """Open every present corruption file (headers only) and return their names; raises on the first bad one."""
        names = self.corruptions()
        for name in names:
            self._array(name)
        return names

    def load(self, name: str, severity: int) -> tuple[Tensor, Tensor]:
        """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of corruption ``name`` at ``severity`` 1..5."""
        if not 1 <= severity <= MAX_SEVERITY:
            raise CifarlensError(f"severity must be 1..{MAX_SEVERITY} in a CIFAR-C folder, got {severity}")
        array = self._array(name)
        rows = slice((severity - 1) * self.per_severity, severity * self.per_severity)
        images = torch.from_numpy(np.array(array[rows])).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
        return images, self.labels[rows].clone()
