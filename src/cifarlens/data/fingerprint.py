"""Whether the images a run reads again are the ones it was trained and evaluated on.

Two records, both taken when the data is read for training: a SHA-256 digest of each split's
pixels and labels (exact; in run.json), and each image's mean pixel value and standard deviation
(in the run folder's ``data_means.npz``). The digest changes when a JPEG is decoded by another
libjpeg or Pillow, the means hardly do (a fraction of a grey level), so the means tell the same
images decoded otherwise from other images in their places: files replaced, or reordered within
a class.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from cifarlens.data.base import Split

MEANS_FILE = "data_means.npz"
# an image whose mean pixel value or standard deviation moved by more than this (0-255 scale) is
# another image; decoding the same JPEG with another library moves them by well under one grey level
MEAN_TOLERANCE = 1.0


def fingerprint(*splits: Split, labels_only: bool = False) -> str:
    """SHA-256 (first 16 hex digits) of the splits' images and labels (or their labels alone),
    in order: whether the data a run is evaluated on is still the data it was trained on (~0.1 s
    for CIFAR-10's 50,000)."""
    digest = hashlib.sha256()
    for split in splits:
        for tensor in ((split.labels.to(torch.int64),) if labels_only else (split.images, split.labels.to(torch.int64))):
            digest.update(tensor.detach().cpu().contiguous().numpy())  # a buffer: hashed without a copy
    return digest.hexdigest()[:16]


def fingerprints(train: Split, val: Split | None, test: Split) -> dict[str, str]:
    """A DataBundle's ``fingerprints``: of the training images (with a shipped val/) and of the
    test images, and of their labels alone ("train_labels", "test_labels": the seeded validation
    split depends on these only, so when they are the same it holds the same images' places)."""
    trained = (train, *([val] if val is not None else []))
    return {"train": fingerprint(*trained), "train_labels": fingerprint(*trained, labels_only=True),
            "test": fingerprint(test), "test_labels": fingerprint(test, labels_only=True)}


def image_means(*splits: Split, chunk: int = 4096) -> np.ndarray:
    """Each image's mean pixel value and its standard deviation (0-255), in order: (N, 2) float32
    (a few MB of work at a time)."""
    out = []
    for split in splits:
        for i in range(0, len(split), chunk):
            pixels = split.images[i : i + chunk].flatten(1).float()
            out.append(torch.stack([pixels.mean(dim=1), pixels.std(dim=1, correction=0)], dim=1))
    return torch.cat(out).numpy() if out else np.zeros((0, 2), np.float32)


def save_means(path: Path, means: dict[str, np.ndarray]) -> None:
    """``{"train": ..., "test": ...}`` to ``path`` (.npz, float16: 4 bytes an image)."""
    from cifarlens.io import atomic_write

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez(f, **{name: values.astype(np.float16) for name, values in means.items()})

    atomic_write(path, write)


def load_means(path: Path) -> dict[str, np.ndarray] | None:
    """The means :func:`save_means` wrote (never unpickled); None when the file is missing or
    unreadable (a run from before it, or a damaged one: its images are then not checked this way)."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            return {name: saved[name].astype(np.float32) for name in saved.files}
    except (OSError, ValueError, EOFError):
        return None


def changed_positions(recorded: np.ndarray | None, now: np.ndarray) -> np.ndarray | None:
    """Indices of the images whose mean or standard deviation moved by more than
    :data:`MEAN_TOLERANCE` (other images in those places); None when it cannot be told (nothing
    recorded, or another number of images)."""
    if recorded is None or recorded.shape != now.shape:
        return None
    return np.flatnonzero((np.abs(recorded - now) > MEAN_TOLERANCE).any(axis=1))
