"""CIFAR-10 / CIFAR-100 held as an image-folder copy instead of the official pickles.

Many people have CIFAR in this form (cifar2png output, Kaggle-style PNG folders, a JPEG
dump)::

    DIR/train/<class>/*.png|jpg     DIR/test/<class>/*     optional DIR/val/<class>/*

``--dataset cifar10 --data-dir DIR`` reads such a copy when DIR holds ``train/`` and
``test/`` but neither the official folder nor archive. It is then the real dataset: class
folders are matched to the official class names (so labels follow the official order),
the official normalisation statistics apply, and the literature table knows the run. What
differs from the official files is recorded in a :class:`DataSource` (format, and whether
it went through lossy JPEG), so a report says "CIFAR-10 (JPEG copy)", never plain CIFAR-10.

Strict where a mistake would silently change the data: an unknown or missing class folder
and an image that is not 32x32 are errors (a resized copy is not CIFAR; read it with
``--dataset imagefolder``). Counts that differ from the official split are only a warning,
since subsets are a common, deliberate choice. Nothing is written into DIR.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from cifarlens.data.base import DataSource, DatasetInfo, Split, count_warning, relative_names
from cifarlens.errors import CifarlensError, NotThisDataset
from cifarlens.images import (IMAGE_EXTENSIONS, LOSSY_EXTENSIONS, check_read_once, decoded_formats, format_names,
                              list_images, load_image, skipped_warning, to_mode)

NATIVE_SIZE = 32

# how train reads other images; a command on a run (evaluate, explain) says instead which data it needs
OTHER_DATA_HINT = "use --dataset imagefolder for other data"


def is_folder_copy(data_dir: Path) -> bool:
    """Whether ``data_dir`` is laid out as an image-folder copy (has ``train/`` and ``test/``)."""
    return (data_dir / "train").is_dir() and (data_dir / "test").is_dir()


def class_key(name: str) -> str:
    """Folder names match class names case-insensitively, with '-' or ' ' for '_' ("Aquarium Fish")."""
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _class_folders(split_dir: Path, info: DatasetInfo, title: str, *, need_all: bool) -> dict[int, Path]:
    """label -> class folder of one split; one-line error naming the first folder or class that does not match."""
    expected = ", ".join(info.classes)
    folders = sorted((d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")),
                     key=lambda d: d.name)
    by_name = {class_key(c): i for i, c in enumerate(info.classes)}
    # folders named 0..K-1 (some dumps use the label index): taken as the official label order
    numeric = bool(folders) and all(d.name.isdigit() for d in folders)
    found: dict[int, Path] = {}
    for d in folders:
        if numeric:
            label = int(d.name) if int(d.name) < info.num_classes else None
        else:
            label = by_name.get(class_key(d.name))
        if label is None:
            raise NotThisDataset(f"{split_dir}: folder {d.name!r} is not a {title} class, so this is not a {title} "
                                 f"copy; expected the {info.num_classes} official class folders: {expected}",
                                 OTHER_DATA_HINT)
        if label in found:
            raise CifarlensError(f"{split_dir}: folders {found[label].name!r} and {d.name!r} are both class "
                                 f"{info.classes[label]!r}; keep one")
        found[label] = d
    if need_all:
        missing = [info.classes[i] for i in range(info.num_classes) if i not in found]
        if missing:
            raise CifarlensError(f"{split_dir}: no folder for {title} class {missing[0]!r}"
                                 + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                 + f"; expected the {info.num_classes} official class folders: {expected}")
    return found


def _decode(path: Path, title: str) -> torch.Tensor:
    """One image -> (3, 32, 32) uint8; a one-line error for a wrong size or an unreadable file.

    Decodes with PIL as ``load_image`` does (the same pixels ``predict`` would see), without its
    resizing and EXIF steps, which a 32x32 copy never needs: ~1.4x faster on 60k files.
    """
    try:
        # only the formats load_image opens (an EPS file ran Ghostscript; an ICO decoded a huge PNG inside it),
        # and the size from the header, before any pixel is decoded
        with Image.open(path, formats=decoded_formats()) as opened:
            if opened.size != (NATIVE_SIZE, NATIVE_SIZE):
                raise CifarlensError(
                    f"{path} is {opened.size[0]}x{opened.size[1]} pixels, but {title} images are 32x32; a resized "
                    "copy is not the dataset (read it with --dataset imagefolder instead)")
            im = ImageOps.exif_transpose(opened)  # as load_image (predict, the web app) turns it
            array = np.asarray(to_mode(im, 3), dtype=np.uint8)  # (32, 32, 3)
    except CifarlensError:
        raise
    except Exception:  # truncated or not an image: load_image words the one-line error and names the file
        return load_image(path, 3, NATIVE_SIZE)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _read_split(split_dir: Path, info: DatasetInfo, title: str, *, need_all: bool,
                skipped: list[Path]) -> tuple[Split, list[Path]]:
    folders = _class_folders(split_dir, info, title, need_all=need_all)
    files: list[tuple[Path, int]] = []
    skipped += [f for f in split_dir.iterdir() if f.is_file() and not f.name.startswith(".")]
    for label, folder in sorted(folders.items()):
        found = list_images(folder, skipped)
        if not found:
            raise CifarlensError(f"class folder {folder} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        files += [(p, label) for p in found]
    images = torch.empty((len(files), 3, NATIVE_SIZE, NATIVE_SIZE), dtype=torch.uint8)  # (N, 3, 32, 32)
    for i, (path, _) in enumerate(files):  # ~22 s for 60k files on 2 cores; threads did not help there
        images[i] = _decode(path, title)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return Split(images, labels, relative_names([p for p, _ in files], split_dir.parent)), [p for p, _ in files]


def read_folder_copy(data_dir: Path, info: DatasetInfo, title: str, *, train_per_class: int, test_per_class: int
                     ) -> tuple[Split, Split, Split | None, DataSource]:
    """Read a CIFAR image-folder copy: train, test, val (None without ``val/``) and its source record."""
    skipped: list[Path] = []
    train, train_files = _read_split(data_dir / "train", info, title, need_all=True, skipped=skipped)
    test, test_files = _read_split(data_dir / "test", info, title, need_all=True, skipped=skipped)
    val, val_files = None, []
    if (data_dir / "val").is_dir():
        val, val_files = _read_split(data_dir / "val", info, title, need_all=False, skipped=skipped)
    check_read_once(data_dir, [*train_files, *test_files, *val_files])
    # a val/ carved from the official training set: train + val together should match it
    train_labels = train.labels if val is None else torch.cat([train.labels, val.labels])
    warnings = [w for w in (count_warning("train/" + (" + val/" if val is not None else ""), train_labels, info,
                                           train_per_class),
                            count_warning("test/", test.labels, info, test_per_class)) if w]
    suffixes = {p.suffix.lower() for p in (*train_files, *test_files, *val_files)}
    warnings += [w for w in (skipped_warning(data_dir, skipped),) if w]
    source = DataSource(
        kind="image folder copy", path=str(data_dir), formats=format_names(suffixes),
        lossy=bool(suffixes & LOSSY_EXTENSIONS),
        warnings=tuple(f"{title} copy {data_dir}: {w}" for w in warnings),
    )
    return train, test, val, source


def refuse_partial_copy(data_dir: Path, info: DatasetInfo, title: str) -> None:
    """One-line errors for a folder that looks like an image-folder copy but is not one: ``train/``
    without ``test/``, or a split folder itself (class folders directly inside). Downloading the
    official files into it instead would train on other data than the user's."""
    if not data_dir.is_dir():
        return
    names = {class_key(c) for c in info.classes}
    inside = [d for d in data_dir.iterdir() if d.is_dir() and class_key(d.name) in names]
    if (data_dir / "train").is_dir() and not (data_dir / "test").is_dir() and len(inside) < 2:
        raise CifarlensError(f"{data_dir} has train/ but no test/: an image-folder copy of {title} needs "
                             f"both (train/<class>/, test/<class>/); add test/, or pass the folder that has both")
    if len(inside) >= 2:  # (before train/ alone: "train" is a CIFAR-100 class, so its split folders hold a train/)
        raise CifarlensError(f"{data_dir} holds class folders ({', '.join(sorted(d.name for d in inside)[:3])}, ...): "
                             f"it looks like one split of an image-folder copy; pass the folder above it, which "
                             f"holds train/ and test/")
