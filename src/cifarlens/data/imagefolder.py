"""Your own images: ``DIR/train/<class>/*``, ``DIR/test/<class>/*`` and optionally ``DIR/val/<class>/*``.

Classes are the sorted subfolder names of ``train/``; ``test/`` and ``val/`` may hold a
subset of them but no others. Class folders are searched recursively; hidden files and
folders are ignored, and other files without an image extension are counted in a warning in
the run's log. Each image is decoded with PIL
(first frame, EXIF orientation applied), converted to RGB and resized to
``image_size`` x ``image_size`` (default 32; aspect ratio is not kept) with bilinear
filtering, which PIL antialiases when shrinking. Mean/std are computed from the resized
training images.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import torch

from cifarlens.data.base import DATASETS, DataSource, DatasetInfo, LoadedDataset, Split, check_image_size, relative_names
from cifarlens.data.stats import channel_stats
from cifarlens.errors import CifarlensError
from cifarlens.images import (IMAGE_EXTENSIONS, LOSSY_EXTENSIONS, check_read_once, format_names, list_images, load_image,
                              skipped_warning)

DEFAULT_IMAGE_SIZE = 32
OTHER_SPLIT_NAMES = ("valid", "validation", "dev", "eval")  # other datasets' names for val/
LAYOUT_HINT = "expected DIR/train/<class>/<image> and DIR/test/<class>/<image> (optional DIR/val/<class>/<image>)"


def _class_dirs(split_dir: Path) -> list[Path]:
    """In the order of their class names (NFC), so a copy whose names are decomposed (NFD, from a Mac)
    numbers its classes as the composed original did ("café" against "caff")."""
    return sorted((d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")), key=class_name)


def class_name(folder: Path) -> str:
    """The class a folder names: its name in Unicode NFC (macOS writes names decomposed, NFD, so "café"
    copied from a Mac matches "café" typed elsewhere); a name that is not text is a one-line error."""
    try:
        folder.name.encode("utf-8")
    except UnicodeEncodeError:
        raise CifarlensError(f"the class folder name {folder.name!r} in {folder.parent} is not valid UTF-8 "
                             "(a zip from another system?); rename the folder") from None
    return unicodedata.normalize("NFC", folder.name)


def _image_files(class_dir: Path, skipped: list[Path]) -> list[Path]:
    files = list_images(class_dir, skipped)
    if not files:
        raise CifarlensError(
            f"class folder {class_dir} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); add some or remove the folder"
        )
    return files


def _read_split(files: list[tuple[Path, int]], size: int, root: Path) -> Split:
    images = torch.empty((len(files), 3, size, size), dtype=torch.uint8)  # (N, 3, S, S)
    for i, (path, _) in enumerate(files):
        images[i] = load_image(path, 3, size)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return Split(images, labels, relative_names([p for p, _ in files], root))


def _list_split(split_dir: Path, classes: list[str] | None, skipped: list[Path]
                ) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(file, label)]) of one split; ``classes`` None means this is train. Files
    that are not read (other extensions, files beside the class folders) go to ``skipped``."""
    dirs = _class_dirs(split_dir)
    if not dirs:
        raise CifarlensError(f"{split_dir} has no class subfolders; {LAYOUT_HINT}")
    names = [class_name(d) for d in dirs]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise CifarlensError(f"{split_dir} has two folders for the class {twice[0]!r} (the same name in two "
                             "Unicode forms); merge them")
    if classes is None:
        classes = names
    else:
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise CifarlensError(
                f"{split_dir} has classes that train/ lacks: {', '.join(map(repr, unknown))}; "
                f"rename or remove them, or add them to train/ (train classes: {', '.join(map(repr, classes))})"
            )
    index = {name: i for i, name in enumerate(classes)}
    skipped += [f for f in split_dir.iterdir() if f.is_file() and not f.name.startswith(".")]
    files = [(p, index[name]) for d, name in zip(dirs, names) for p in _image_files(d, skipped)]
    return classes, files


@DATASETS.register("imagefolder")
def imagefolder(data_dir: Path, *, download: bool, image_size: int | None) -> LoadedDataset:
    """An image folder tree; ``download`` is ignored (there is nothing to download)."""
    check_image_size(image_size)
    data_dir = Path(data_dir)
    size = image_size or DEFAULT_IMAGE_SIZE
    if not data_dir.is_dir():
        raise CifarlensError(f"image folder {data_dir} does not exist or is not a folder; {LAYOUT_HINT}")
    for required in ("train", "test"):
        if not (data_dir / required).is_dir():
            raise CifarlensError(f"no {required}/ folder in {data_dir}; {LAYOUT_HINT}")
    skipped: list[Path] = []
    classes, train_files = _list_split(data_dir / "train", None, skipped)
    if len(classes) < 2:
        raise CifarlensError(f"{data_dir / 'train'} has only the class {classes[0]!r}; a classifier needs at least 2 classes")
    _, test_files = _list_split(data_dir / "test", classes, skipped)
    val_files = _list_split(data_dir / "val", classes, skipped)[1] if (data_dir / "val").is_dir() else None
    check_read_once(data_dir, [p for p, _ in (*train_files, *test_files, *(val_files or ()))])

    train = _read_split(train_files, size, data_dir)
    mean, std = channel_stats(train.images)  # of the resized training images
    info = DatasetInfo(
        name="imagefolder",
        classes=tuple(classes),
        in_channels=3,
        image_size=size,
        mean=mean,
        std=std,
        hflip=True,
        title="image folder",
    )
    suffixes = {p.suffix.lower() for p, _ in (*train_files, *test_files, *(val_files or ()))}
    others = [d.name + "/" for d in data_dir.iterdir() if d.is_dir() and d.name in OTHER_SPLIT_NAMES]
    warnings = [w for w in (skipped_warning(data_dir, skipped),) if w]
    if others:
        warnings.append(f"{data_dir} has {', '.join(others)}, which is not read: only train/, test/ and val/ are "
                        "(rename it val/ to use it as the validation split)")
    source = DataSource(kind="image folder", path=str(data_dir), formats=format_names(suffixes),
                        lossy=bool(suffixes & LOSSY_EXTENSIONS), warnings=tuple(warnings))
    return LoadedDataset(
        info=info,
        train=train,
        test=_read_split(test_files, size, data_dir),
        val=_read_split(val_files, size, data_dir) if val_files is not None else None,
        source=source,
    )
