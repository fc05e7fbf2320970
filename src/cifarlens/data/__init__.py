"""Datasets: a registry of readers that return whole datasets as uint8 tensors.

``load_dataset(name, data_dir)`` is the one entry point; ``list_datasets()`` gives the
names (CLI choices and test parametrisation come from it). Importing this package
imports the reader modules, which register themselves in ``DATASETS``.
"""

from __future__ import annotations

from pathlib import Path

from cifarlens.data import cifar, fashion_mnist, imagefolder  # noqa: F401  (registers the readers)
from cifarlens.data.base import DATASETS, DatasetInfo, LoadedDataset, Split, check_image_size
from cifarlens.data.stats import channel_stats
from cifarlens.errors import CifarlensError

__all__ = ["DATASETS", "DatasetInfo", "LoadedDataset", "Split", "channel_stats", "list_datasets", "load_dataset"]


def list_datasets() -> list[str]:
    """Names of the registered datasets, sorted."""
    return DATASETS.names()


def load_dataset(
    name: str, data_dir: str | Path, *, download: bool = True, image_size: int | None = None
) -> LoadedDataset:
    """Read dataset ``name`` from ``data_dir`` (downloading into it where the reader can).

    ``image_size=None`` keeps the native size (32 for CIFAR, 28 for Fashion-MNIST, 32 for
    imagefolder). Raises CifarlensError for an unknown name or missing/corrupt data.
    """
    reader = DATASETS.get(name)
    check_image_size(image_size)
    data_dir = Path(data_dir).expanduser()
    above = next((p for p in data_dir.parents if p.exists() and not p.is_dir()), None)
    if above is not None:  # "a.py/sub": a download's mkdir said only "Not a directory"
        raise CifarlensError(f"data dir {data_dir}: {above} is a file, not a folder; pass the data's folder")
    try:
        return reader(data_dir, download=download, image_size=image_size)
    except (MemoryError, RuntimeError) as err:  # every image is held in memory, as uint8
        if not isinstance(err, MemoryError) and "allocate" not in str(err):
            raise
        size = f"{image_size}x{image_size}" if image_size else "their own size"
        raise CifarlensError(f"not enough memory to hold the {name} images at {size}: choose a smaller "
                             "data.image_size") from None
