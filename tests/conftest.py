"""Shared test fixtures: small SYNTHETIC datasets written in the exact official on-disk layouts.

Every ``make_*`` helper writes files that the real readers must accept as if they were the
official downloads, and returns a :class:`SyntheticData` describing what was written (in
the order the reader returns it), so tests can compare pixel for pixel. The images are
learnable: each class has its own colour (or brightness) and its own spatial pattern,
plus Gaussian noise, so a small CNN separates the classes within an epoch or two.

Helpers (import them with ``from conftest import make_cifar10`` etc.):

* ``make_cifar10(root, ...)``   -> ``root/cifar-10-batches-py/`` (data_batch_1..5, test_batch, batches.meta)
* ``make_cifar100(root, ...)``  -> ``root/cifar-100-python/`` (train, test, meta)
* ``make_cifar_archive(root, "cifar10" | "cifar100", ...)`` -> ``root/cifar-10-python.tar.gz`` (or -100-)
* ``make_fashion_mnist(root, ..., gz=True, layout="flat" | "torchvision" | "fashion-mnist")``
* ``make_imagefolder(root, classes, ...)`` -> ``root/train/<class>/*``, ``root/test/<class>/*`` [, ``root/val/...``]
* ``write_cifar_pickle(path, obj, style)`` -> one pickle in the py2 / py3-str / py3-bytes style

Fixtures (each a fresh ``tmp_path``-based data dir, built in well under a second):
``cifar10_dir``, ``cifar100_dir``, ``fashion_dir``, ``imagefolder_dir``.
"""

from __future__ import annotations

import gzip
import pickle
import shutil
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
from PIL import Image

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# All image formats/modes make_imagefolder can write; MIXED_FORMATS cycles through them.
IMAGE_FORMATS = ("png", "jpeg", "png-rgba", "gif", "png-gray", "png-16", "bmp", "webp", "tiff")
MIXED_FORMATS = IMAGE_FORMATS
MIXED_SIZES = ((32, 32), (40, 28), (24, 48), (64, 64))  # (width, height)


# CLI flags for a tiny LensNet that trains on the synthetic datasets in a few seconds.
TINY = ["--model", "lensnet_light", "--set", "model.kwargs={widths: [8, 16], depths: [1, 1]}", "--batch-size", "32"]


def train_tiny_cifar10(root: Path, *flags: str, epochs: int = 1) -> tuple[Path, Path]:
    """(run folder, data dir): fastnet_cpu trained through the CLI on a synthetic CIFAR-10 of 200
    training (20 of them validation) and 50 test images in ``root``, with extra ``flags``."""
    from cifarlens.cli import main

    data = make_cifar10(root / "data", n_train_per_batch=40, n_test=50).data_dir
    out = root / "run"
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(data), "--no-download", "--model", "fastnet_cpu",
                 "--epochs", str(epochs), "--batch-size", "32", "--device", "cpu", "--no-report", "--out", str(out),
                 *flags]) == 0
    return out, data


@dataclass
class SyntheticData:
    """What a ``make_*`` helper wrote; arrays are in the order the reader returns them."""

    data_dir: Path  # pass this as data_dir / --data-dir
    classes: tuple[str, ...]
    train_labels: np.ndarray  # (N,) int64
    test_labels: np.ndarray
    train_images: np.ndarray | None = None  # (N, C, H, W) uint8; None where the format is lossy
    test_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None


# ---------------------------------------------------------------------------
# Learnable synthetic images
# ---------------------------------------------------------------------------

# Ten well-separated RGB colours; class k uses colour k % 10.
PALETTE = np.array(
    [
        [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [128, 128, 128],
    ],
    dtype=np.float64,
)  # fmt: skip


def class_pattern(pattern: int, height: int, width: int) -> np.ndarray:
    """One of 10 spatial patterns as an (H, W) array of -1/+1 (most are mirror-symmetric)."""
    yy, xx = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")
    masks = [
        np.zeros_like(yy, dtype=bool),  # flat
        (yy * 8).astype(int) % 2 == 0,  # horizontal stripes
        (xx * 8).astype(int) % 2 == 0,  # vertical stripes
        ((yy * 4).astype(int) + (xx * 4).astype(int)) % 2 == 0,  # checkerboard
        (abs(yy - 0.5) < 0.25) & (abs(xx - 0.5) < 0.25),  # centre square
        yy < 0.5,  # top half
        np.minimum.reduce([yy, xx, 1 - yy, 1 - xx]) < 0.15,  # border
        (abs(yy - 0.5) < 0.1) | (abs(xx - 0.5) < 0.1),  # plus
        (abs(yy - xx) < 0.1) | (abs(yy + xx - 1) < 0.1),  # X
        abs(np.hypot(yy - 0.5, xx - 0.5) - 0.3) < 0.08,  # ring
    ]
    return np.where(masks[pattern % 10], 1.0, -1.0)


def synthetic_images(
    labels: np.ndarray, channels: int, height: int, width: int, rng: np.random.Generator, noise: float = 12.0
) -> np.ndarray:
    """(N, C, H, W) uint8 images; class k = colour (or grey level) k % 10 + pattern (k % 10 + k // 10) % 10.

    Colour and pattern together are unique for up to 100 classes.
    """
    out = np.empty((len(labels), channels, height, width), dtype=np.uint8)
    for i, k in enumerate(labels.tolist()):
        pattern = class_pattern((k % 10 + k // 10) % 10, height, width)  # (H, W)
        if channels == 3:
            base = PALETTE[k % 10][:, None, None] * 0.7 + 30  # (3, 1, 1)
        else:
            base = np.full((channels, 1, 1), 40.0 + 17.0 * (k % 10))
        img = base + 45.0 * pattern[None] + rng.normal(0.0, noise, (channels, height, width))
        out[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """n labels covering every class as evenly as possible, shuffled."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


# ---------------------------------------------------------------------------
# CIFAR pickles
# ---------------------------------------------------------------------------

_RECONSTRUCT = np.array(0).__reduce__()[0]


class Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table we can extend
    """Writes pickles as Python 2's cPickle wrote the official CIFAR files: protocol 2,
    every str/bytes as a Python 2 byte string (SHORT_BINSTRING/BINSTRING), and numpy's
    ``_reconstruct`` under its old module name ``numpy.core.multiarray``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, obj: str | bytes) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string

    def save_global(self, obj, name=None):
        if obj is _RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _bytes_keys(obj):
    """str -> bytes in dict keys and string lists (how py2 files look under encoding='bytes')."""
    if isinstance(obj, dict):
        return {k.encode("latin1"): _bytes_keys(v) for k, v in obj.items()}
    if isinstance(obj, list) and obj and isinstance(obj[0], str):
        return [s.encode("latin1") for s in obj]
    return obj


def write_cifar_pickle(path: Path, obj: dict, style: str = "py2") -> None:
    """Write one CIFAR dict. style: "py2" (like the official files), "str" (Python 3,
    protocol 2, str keys) or "bytes" (Python 3, protocol 2, bytes keys and names)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        if style == "py2":
            Py2Pickler(f, protocol=2).dump(obj)
        elif style == "str":
            pickle.dump(obj, f, protocol=2)
        elif style == "bytes":
            pickle.dump(_bytes_keys(obj), f, protocol=2)
        else:
            raise ValueError(f"unknown pickle style {style!r}")


def _rows(images: np.ndarray) -> np.ndarray:
    # Official row layout: 1024 R, 1024 G, 1024 B, each 32x32 row-major = C-order flatten.
    return np.ascontiguousarray(images.reshape(len(images), 3 * 32 * 32))


def make_cifar10(
    root: Path,
    n_train_per_batch: int = 40,
    n_test: int = 50,
    seed: int = 0,
    classes: Sequence[str] = CIFAR10_CLASSES,
    style: str = "py2",
) -> SyntheticData:
    """Write ``root/cifar-10-batches-py/`` with 5 training batches of ``n_train_per_batch``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    train_labels = balanced_labels(5 * n_train_per_batch, 10, rng)
    train_images = synthetic_images(train_labels, 3, 32, 32, rng)
    test_labels = balanced_labels(n_test, 10, rng)
    test_images = synthetic_images(test_labels, 3, 32, 32, rng)
    meta = {"num_cases_per_batch": n_train_per_batch, "label_names": list(classes), "num_vis": 3072}
    write_cifar_pickle(folder / "batches.meta", meta, style)
    for b in range(5):
        part = slice(b * n_train_per_batch, (b + 1) * n_train_per_batch)
        batch = {
            "batch_label": f"training batch {b + 1} of 5",
            "labels": train_labels[part].tolist(),
            "data": _rows(train_images[part]),
            "filenames": [f"synthetic_{b}_{i:05d}.png" for i in range(n_train_per_batch)],
        }
        write_cifar_pickle(folder / f"data_batch_{b + 1}", batch, style)
    test = {
        "batch_label": "testing batch 1 of 1",
        "labels": test_labels.tolist(),
        "data": _rows(test_images),
        "filenames": [f"synthetic_test_{i:05d}.png" for i in range(n_test)],
    }
    write_cifar_pickle(folder / "test_batch", test, style)
    return SyntheticData(Path(root), tuple(classes), train_labels, test_labels, train_images, test_images)


def make_cifar100(
    root: Path,
    n_train: int = 500,
    n_test: int = 200,
    seed: int = 0,
    classes: Sequence[str] | None = None,
    style: str = "py2",
) -> SyntheticData:
    """Write ``root/cifar-100-python/`` (train, test, meta); coarse label = fine // 5."""
    rng = np.random.default_rng(seed)
    from cifarlens.data.cifar import CIFAR100_INFO

    classes = tuple(classes) if classes is not None else CIFAR100_INFO.classes  # the official names
    folder = Path(root) / "cifar-100-python"
    train_labels = balanced_labels(n_train, 100, rng)
    train_images = synthetic_images(train_labels, 3, 32, 32, rng)
    test_labels = balanced_labels(n_test, 100, rng)
    test_images = synthetic_images(test_labels, 3, 32, 32, rng)
    meta = {"fine_label_names": list(classes), "coarse_label_names": [f"coarse_{k:02d}" for k in range(20)]}
    write_cifar_pickle(folder / "meta", meta, style)
    for name, labels, images, title in (
        ("train", train_labels, train_images, "training batch 1 of 1"),
        ("test", test_labels, test_images, "testing batch 1 of 1"),
    ):
        batch = {
            "filenames": [f"synthetic_{name}_{i:05d}.png" for i in range(len(labels))],
            "batch_label": title,
            "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(),
            "data": _rows(images),
        }
        write_cifar_pickle(folder / name, batch, style)
    return SyntheticData(Path(root), classes, train_labels, test_labels, train_images, test_images)


def make_cifar_archive(root: Path, dataset: str = "cifar10", **kwargs) -> SyntheticData:
    """Write the official archive (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``)
    into ``root``, holding the folder ``make_cifar10`` / ``make_cifar100`` would write."""
    root = Path(root)
    build = root / ".build-archive"
    make, folder, archive = {
        "cifar10": (make_cifar10, "cifar-10-batches-py", "cifar-10-python.tar.gz"),
        "cifar100": (make_cifar100, "cifar-100-python", "cifar-100-python.tar.gz"),
    }[dataset]
    data = make(build, **kwargs)
    with tarfile.open(root / archive, "w:gz") as tar:
        tar.add(build / folder, arcname=folder)
    shutil.rmtree(build)
    data.data_dir = root
    return data


# ---------------------------------------------------------------------------
# Fashion-MNIST IDX files
# ---------------------------------------------------------------------------

FASHION_LAYOUTS = {"flat": ".", "torchvision": "FashionMNIST/raw", "fashion-mnist": "fashion-mnist"}


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """IDX: magic (0, 0, 0x08 = uint8, ndim), big-endian uint32 dims, then the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = struct.pack(">I", 0x800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb", compresslevel=1) as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def make_fashion_mnist(
    root: Path, n_train: int = 200, n_test: int = 50, seed: int = 0, gz: bool = True, layout: str = "flat"
) -> SyntheticData:
    """Write the four official IDX files into ``root`` (layout "flat"), ``root/FashionMNIST/raw``
    ("torchvision") or ``root/fashion-mnist``; ``gz`` picks ``.gz`` or uncompressed files."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / FASHION_LAYOUTS[layout]
    train_labels = balanced_labels(n_train, 10, rng)
    train_images = synthetic_images(train_labels, 1, 28, 28, rng)
    test_labels = balanced_labels(n_test, 10, rng)
    test_images = synthetic_images(test_labels, 1, 28, 28, rng)
    write_idx(folder / "train-images-idx3-ubyte", train_images[:, 0], gz)
    write_idx(folder / "train-labels-idx1-ubyte", train_labels, gz)
    write_idx(folder / "t10k-images-idx3-ubyte", test_images[:, 0], gz)
    write_idx(folder / "t10k-labels-idx1-ubyte", test_labels, gz)
    return SyntheticData(Path(root), FASHION_CLASSES, train_labels, test_labels, train_images, test_images)


# ---------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------


def save_image(path: Path, rgb: np.ndarray, fmt: str) -> Path:
    """Save an (H, W, 3) uint8 array as ``fmt`` (one of IMAGE_FORMATS); returns the file path."""
    img = Image.fromarray(rgb)
    ext = {"jpeg": ".jpg", "gif": ".gif", "bmp": ".bmp", "webp": ".webp", "tiff": ".tif"}.get(fmt, ".png")
    path = path.with_suffix(ext)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "png":
        img.save(path)
    elif fmt == "png-rgba":
        alpha = np.full(rgb.shape[:2], 200, dtype=np.uint8)
        Image.fromarray(np.dstack([rgb, alpha])).save(path)
    elif fmt == "jpeg":
        img.save(path, quality=95)
    elif fmt == "gif":
        img.quantize(colors=64).save(path)  # palette ("P") image
    elif fmt == "png-gray":
        img.convert("L").save(path)
    elif fmt == "png-16":
        gray16 = np.asarray(img.convert("L"), dtype=np.uint16) * 257  # 8-bit v -> 16-bit v*257
        Image.fromarray(gray16).save(path)  # mode I;16
    elif fmt in ("bmp", "webp", "tiff"):
        img.save(path, **({"lossless": True} if fmt == "webp" else {}))
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return path


def make_imagefolder(
    root: Path,
    classes: Sequence[str] = tuple(f"class_{k}" for k in range(10)),
    n_per_class: int = 20,
    n_test_per_class: int = 5,
    n_val_per_class: int = 0,
    formats: Sequence[str] = MIXED_FORMATS,
    sizes: Sequence[tuple[int, int]] = MIXED_SIZES,
    seed: int = 0,
    junk: bool = True,
) -> SyntheticData:
    """Write ``root/{train,test[,val]}/<class>/NNN.<ext>``, cycling image formats and sizes.

    With ``junk``, also writes files the reader must ignore: a ``.txt`` note, a hidden
    garbage ``.png`` and a hidden folder of garbage. Labels follow the reader's order
    (sorted class names, then sorted file names).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    order = sorted(classes)
    splits = {"train": n_per_class, "test": n_test_per_class}
    if n_val_per_class:
        splits["val"] = n_val_per_class
    labels: dict[str, list[int]] = {s: [] for s in splits}
    i = 0
    for split, n in splits.items():
        for label, name in enumerate(order):
            k = classes.index(name)  # pattern follows the caller's class index
            for j in range(n):
                w, h = sizes[i % len(sizes)]
                img = synthetic_images(np.array([k]), 3, h, w, rng)[0].transpose(1, 2, 0)  # (H, W, 3)
                save_image(root / split / name / f"{j:03d}", img, formats[i % len(formats)])
                labels[split].append(label)
                i += 1
    if junk:
        first = root / "train" / order[0]
        (first / "notes.txt").write_text("not an image")
        (first / ".hidden.png").write_bytes(b"garbage, must be ignored")
        (root / "train" / ".ipynb_checkpoints").mkdir()
        (root / "train" / ".ipynb_checkpoints" / "x.png").write_bytes(b"garbage")
    as_array = lambda s: np.array(labels[s], dtype=np.int64)  # noqa: E731
    return SyntheticData(
        root, tuple(order), as_array("train"), as_array("test"), val_labels=as_array("val") if n_val_per_class else None
    )


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    """Data dir with a synthetic ``cifar-10-batches-py/``: 200 train (20 per class), 50 test."""
    return make_cifar10(tmp_path / "cifar10", n_train_per_batch=40, n_test=50).data_dir


@pytest.fixture
def cifar100_dir(tmp_path: Path) -> Path:
    """Data dir with a synthetic ``cifar-100-python/``: 500 train (5 per fine class), 200 test."""
    return make_cifar100(tmp_path / "cifar100", n_train=500, n_test=200).data_dir


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    """Data dir with the four synthetic Fashion-MNIST ``.gz`` IDX files: 200 train, 50 test."""
    return make_fashion_mnist(tmp_path / "fashion", n_train=200, n_test=50).data_dir


@pytest.fixture
def imagefolder_dir(tmp_path: Path) -> Path:
    """Image folder with 10 classes x 20 train / 5 test images of mixed formats, sizes and modes."""
    return make_imagefolder(tmp_path / "images").data_dir


def fast_epoch_parts(device, batches: int, batch_size: int, widths: Sequence[int], recipe: str = "fast_cpu",
                     channels_last: bool = False):
    """What one epoch of the fast recipe needs, on random CIFAR-shaped data of ``batches``
    batches: (model, loader with batched strong augmentation, optimizer, scheduler, EMA, cfg)."""
    import torch

    from cifarlens.ema import make_ema
    from cifarlens.config import RunConfig, merge
    from cifarlens.data.augment import BatchAugment
    from cifarlens.data.base import Split
    from cifarlens.data.loader import TensorLoader
    from cifarlens.models import create_model
    from cifarlens.recipes import resolve_train
    from cifarlens.schedules import build_optimizer, build_scheduler

    cfg = resolve_train(merge(RunConfig(), {"train": {"recipe": recipe, "epochs": 1, "batch_size": batch_size}}).train)
    model = create_model("fastnet", 10, 3, widths=list(widths)).to(device)
    if channels_last:  # before the EMA copies it, as cifarlens.api.train does
        model = model.to(memory_format=torch.channels_last)
    n = batch_size * batches
    split = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.arange(n) % 10)
    loader = TensorLoader(split, batch_size, BatchAugment("strong", (0.5,) * 3, (0.25,) * 3), device=device,
                          shuffle=True, drop_last=True)
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, len(loader))
    return model, loader, optimizer, scheduler, make_ema(model, cfg.ema_decay), cfg


def fake_ghostscript(tmp_path: Path, monkeypatch) -> Path:
    """A ``gs`` first on PATH that records its arguments (Pillow renders EPS by running Ghostscript);
    the file it writes to: it exists only when something ran Ghostscript."""
    import os

    marker = tmp_path / "gs-ran"
    gs = tmp_path / "bin" / "gs"
    gs.parent.mkdir()
    gs.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\n[ \"$1\" = --version ] && echo 10.0.0\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{gs.parent}{os.pathsep}{os.environ['PATH']}")
    return marker
