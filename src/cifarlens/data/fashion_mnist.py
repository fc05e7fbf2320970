"""Fashion-MNIST from the four official IDX files (``.gz`` or uncompressed).

Looked for in ``data_dir``, ``data_dir/FashionMNIST/raw/`` (torchvision's layout; ``data_dir/raw/``
when ``data_dir`` is its ``FashionMNIST/``) and ``data_dir/fashion-mnist/``; the first folder
holding all four files wins. With
``download=True`` and no complete set, the files are downloaded into
``data_dir/FashionMNIST/raw/`` from torchvision's mirrors, checked against its md5s.

On Debian/Ubuntu, ``apt-get install dataset-fashion-mnist`` puts the files in
``/usr/share/datasets/fashion-mnist``.

If ``image_size`` differs from 28, images are resized with antialiased bilinear
interpolation (``resize_uint8``); mean/std stay the native 28x28 values.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cifarlens.data.base import (
    DATASETS,
    DataSource,
    DatasetInfo,
    LoadedDataset,
    Split,
    check_image_size,
    count_warning,
    download_file,
    resize_uint8,
)
from cifarlens.errors import CifarlensError

HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"
SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"

# mean/std: channel_stats() (cifarlens.data.stats) over all 60,000 images of the official
# train-images-idx3-ubyte.gz (from dataset-fashion-mnist), scaled to [0, 1], rounded to 4 decimals.
INFO = DatasetInfo(
    name="fashion-mnist",
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    in_channels=1,
    image_size=28,
    mean=(0.2860,),
    std=(0.3530,),
    title="Fashion-MNIST",
    hflip=True,  # garments, shoes and bags have no handedness: a mirrored item keeps its label
    # Items are centred and size-normalised in every image, so random crops mostly teach
    # shifts the test set never shows; flips alone trained better in our short CPU runs
    # (benchmarks/fashion_mnist_cpu.py, README).
    augment="flip",
)

IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension

# key -> official file name (without .gz)
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SEARCH_DIRS = (".", "FashionMNIST/raw", "raw", "fashion-mnist")  # relative to data_dir, in order ("raw":
# data_dir is torchvision's FashionMNIST/ itself)
DOWNLOAD_DIR = "FashionMNIST/raw"
TRAIN_PER_CLASS, TEST_PER_CLASS = 6000, 1000  # the official split's images of each class


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one IDX file (optionally gzipped) whose magic number must be ``magic``.

    Layout: 4-byte big-endian magic (0, 0, dtype code 0x08 = uint8, number of dims),
    one big-endian uint32 per dimension, then the values in C order.
    """
    fix = f"replace it with the official file (from {HOMEPAGE} or `apt-get install dataset-fashion-mnist`)"
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise CifarlensError(f"corrupt IDX file {path}: cannot read it ({type(e).__name__}: {e}); {fix}") from e
    if len(raw) < 4:
        raise CifarlensError(f"corrupt IDX file {path}: only {len(raw)} bytes; {fix}")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise CifarlensError(f"corrupt IDX file {path}: magic number 0x{found:08x}, expected 0x{magic:08x}; {fix}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CifarlensError(f"corrupt IDX file {path}: truncated header; {fix}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise CifarlensError(
            f"corrupt IDX file {path}: {len(raw)} bytes but its header {dims} implies {expected} (truncated?); {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_files(data_dir: Path) -> tuple[dict[str, Path] | None, Path, list[str]]:
    """The first search folder holding all four files -> ({key: path}, folder, []);
    otherwise (None, best folder, names missing there)."""
    best: tuple[Path, list[str]] | None = None
    for sub in SEARCH_DIRS:
        folder = data_dir / sub  # pathlib drops the "."
        found: dict[str, Path] = {}
        for key, stem in FILES.items():
            for candidate in (folder / stem, folder / f"{stem}.gz"):  # uncompressed first: faster
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(FILES):
            return found, folder, []
        missing = [f"{stem}[.gz]" for key, stem in FILES.items() if key not in found]
        if best is None or len(missing) < len(best[1]):
            best = (folder, missing)
    assert best is not None
    return None, best[0], best[1]


def _download(data_dir: Path) -> None:
    import torchvision.datasets  # lazy: only needed when downloading

    tv = torchvision.datasets.FashionMNIST
    root = data_dir / DOWNLOAD_DIR
    fix = (
        f"run `apt-get install dataset-fashion-mnist` and pass --data-dir {SYSTEM_DIR}, "
        f"or put the four IDX files into {data_dir} (from {HOMEPAGE})"
    )
    for filename, md5 in tv.resources:
        if (root / filename).is_file():
            continue
        error: CifarlensError | None = None
        for mirror in tv.mirrors:
            try:
                download_file(f"{mirror}{filename}", root, filename, md5, what=f"Fashion-MNIST {filename}", fix=fix)
                break
            except CifarlensError as e:  # try the next mirror; report the first failure
                error = error or e
        else:
            assert error is not None
            raise error


def _split(images_path: Path, labels_path: Path) -> Split:
    images = read_idx(images_path, IMAGES_MAGIC)  # (N, 28, 28)
    labels = read_idx(labels_path, LABELS_MAGIC)  # (N,)
    fix = f"replace it with the official file (from {HOMEPAGE})"
    if images.shape[1:] != (28, 28):
        raise CifarlensError(f"corrupt IDX file {images_path}: images are {images.shape[1:]}, expected (28, 28); {fix}")
    if labels.shape[0] != images.shape[0]:
        raise CifarlensError(
            f"corrupt IDX file {labels_path}: {labels.shape[0]} labels for the {images.shape[0]} images in {images_path.name}; {fix}"
        )
    if labels.size and labels.max() >= INFO.num_classes:
        raise CifarlensError(f"corrupt IDX file {labels_path}: label {labels.max()} is not in [0, 9]; {fix}")
    # np.frombuffer views are read-only; copy into tensors that own their memory.
    return Split(torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels.astype(np.int64)))


@DATASETS.register("fashion-mnist")
def fashion_mnist(data_dir: Path, *, download: bool, image_size: int | None) -> LoadedDataset:
    """Fashion-MNIST: 60,000 train / 10,000 test grayscale 28x28 images, 10 classes."""
    check_image_size(image_size)
    data_dir = Path(data_dir)
    if data_dir.is_file():  # e.g. one of the four IDX files
        raise CifarlensError(f"data dir {data_dir} is a file; pass the folder that holds the four Fashion-MNIST "
                             "files (train-images-idx3-ubyte.gz, ...)")
    files, folder, missing = _find_files(data_dir)
    if files is None and download and len(missing) < len(FILES) and folder != data_dir / DOWNLOAD_DIR:
        # some of the user's own files: a download would put the official ones beside them and train on those
        raise CifarlensError(f"Fashion-MNIST in {folder} is incomplete: {', '.join(missing)} missing; add "
                             f"{'it' if len(missing) == 1 else 'them'} (from {HOMEPAGE}); nothing is downloaded "
                             "over your files")
    if files is None and download:
        _download(data_dir)
        files, folder, missing = _find_files(data_dir)
    if files is None:
        raise CifarlensError(
            f"Fashion-MNIST not found: {', '.join(missing)} missing in {folder} "
            f"(looked in {', '.join(str(data_dir / d) for d in SEARCH_DIRS)}); "
            f"run `apt-get install dataset-fashion-mnist` and pass --data-dir {SYSTEM_DIR}, "
            f"or put the official files there (from {HOMEPAGE})"
        )
    train = _split(files["train_images"], files["train_labels"])
    test = _split(files["test_images"], files["test_labels"])
    info = INFO
    # a subset (or other files) under the official names is not the official split: said in the run's log and report
    counts = (count_warning(files["train_images"].name, train.labels, info, TRAIN_PER_CLASS),
              count_warning(files["test_images"].name, test.labels, info, TEST_PER_CLASS))
    source = DataSource(path=str(folder), warnings=tuple(f"Fashion-MNIST files in {folder}: {w}" for w in counts if w))
    if image_size is not None and image_size != info.image_size:
        train = replace(train, images=resize_uint8(train.images, image_size))
        test = replace(test, images=resize_uint8(test.images, image_size))
        info = replace(info, image_size=image_size)
    return LoadedDataset(info=info, train=train, test=test, source=source)
