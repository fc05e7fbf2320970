"""Whether the images a run reads again are the ones it was trained and evaluated on.

Two records, both taken when the data is read for training: a SHA-256 digest of each split's
pixels and labels (exact; in run.json), and a small signature of each image (in the run
folder's ``data_signatures.npz``): the mean of each channel, the mean of each quarter of the
image (its grey level: top left, top right, bottom left, bottom right) and the spread of its
pixels. The digest changes when a JPEG is decoded by another libjpeg or Pillow; the signature
hardly does (a fraction of a grey level), but it does when another image takes a place (files
replaced, or reordered within a class), or when an image is mirrored, rotated or has its
channels swapped.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from cifarlens.data.base import Split

SIGNATURES_FILE = "data_signatures.npz"
# an image whose signature moved by more than this anywhere (0-255 scale) is another image;
# decoding the same JPEG with another library moves it by well under one grey level
SIGNATURE_TOLERANCE = 1.0


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


def image_signatures(*splits: Split) -> np.ndarray:
    """Each image's signature (see the module), in order: (N, channels + 5) float32, computed a
    few tens of MB at a time."""
    out = []
    for split in splits:
        n, *shape = split.images.shape
        chunk = max(1, 2**24 // max(1, int(np.prod(shape))))
        for i in range(0, n, chunk):
            x = split.images[i : i + chunk].float()  # (B, C, H, W)
            grey = x.mean(dim=1)
            h, w = grey.shape[1] // 2 or 1, grey.shape[2] // 2 or 1
            quarters = [grey[:, rows, cols].mean(dim=(1, 2)) for rows in (slice(0, h), slice(h, None))
                        for cols in (slice(0, w), slice(w, None)) if grey[:, rows, cols].numel()]
            out.append(torch.cat([x.mean(dim=(2, 3)), torch.stack(quarters, dim=1),
                                  x.flatten(1).std(dim=1, correction=0)[:, None]], dim=1))
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def save_signatures(path: Path, signatures: dict[str, np.ndarray]) -> None:
    """``{"train": ..., "test": ...}`` to ``path`` (.npz, float16: 16 bytes an RGB image)."""
    from cifarlens.io import atomic_write

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez(f, **{name: values.astype(np.float16) for name, values in signatures.items()})

    atomic_write(path, write)


def load_signatures(path: Path) -> dict[str, np.ndarray] | None:
    """The signatures :func:`save_signatures` wrote (never unpickled); None when the file is
    missing or unreadable (a run from before it, or a damaged one: its images are then not
    checked this way)."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            return {name: saved[name].astype(np.float32) for name in saved.files}
    except (OSError, ValueError, EOFError):
        return None


def changed_positions(recorded: np.ndarray | None, now: np.ndarray) -> np.ndarray | None:
    """Indices of the images whose signature moved by more than :data:`SIGNATURE_TOLERANCE`
    (other images in those places); None when it cannot be told (nothing recorded, another number
    of images, or a signature of another kind)."""
    if recorded is None or recorded.shape != now.shape:
        return None
    return np.flatnonzero((np.abs(recorded - now) > SIGNATURE_TOLERANCE).any(axis=1))
