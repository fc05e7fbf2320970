"""CIFAR-10 and CIFAR-100 from the official "python version" files.

Looked for in ``data_dir``, in this order:

1. the extracted folder (``cifar-10-batches-py/``, ``cifar-100-python/``),
2. the official archive (``cifar-10-python.tar.gz``, ``cifar-100-python.tar.gz``), extracted
   into ``data_dir`` with ``tarfile``'s ``"data"`` filter,
3. an image-folder copy (``train/<class>/*``, ``test/<class>/*``, optional ``val/``; PNG or
   JPEG, 32x32), read by :mod:`cifarlens.data.cifar_folder` and recorded as such,
4. a download of that archive (only with ``download=True``), using the URL and md5 that
   torchvision's ``CIFAR10`` / ``CIFAR100`` classes define.

The official batch files are Python 2 pickles. They are read with a restricted unpickler
that can only rebuild numpy arrays, so a tampered file cannot run code.

If ``image_size`` differs from 32, images are resized with antialiased bilinear
interpolation (``resize_uint8``); mean/std stay the native 32x32 values.
"""

from __future__ import annotations

import codecs
import os
import pickle
import shutil
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass, replace
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
from cifarlens.data.cifar_folder import is_folder_copy, read_folder_copy, refuse_partial_copy
from cifarlens.errors import CifarlensError

HOMEPAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
# a temporary extraction folder this old is a killed extraction's, not one running (they take seconds)
STALE_EXTRACT_S = 3600

# mean/std: per-channel mean and population std over all 50,000 training images scaled to
# [0, 1] (what cifarlens.data.stats.channel_stats computes). The CIFAR-10 std is the true
# pixel std, not the (0.2023, 0.1994, 0.2010) copied across many repositories.
CIFAR10_INFO = DatasetInfo(
    name="cifar10",
    classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    in_channels=3,
    image_size=32,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    hflip=True,
    title="CIFAR-10",
)

# The 100 *fine* labels, in the order of meta["fine_label_names"].
CIFAR100_INFO = DatasetInfo(
    name="cifar100",
    classes=(
        "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
        "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
        "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
        "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
        "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
        "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
        "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
        "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
        "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
        "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
    ),  # fmt: skip
    in_channels=3,
    image_size=32,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    hflip=True,
    title="CIFAR-100",
)


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps what, in the official python-version layout."""

    info: DatasetInfo
    title: str  # for messages: "CIFAR-10"
    folder: str  # extracted folder name
    archive: str  # official archive name (== torchvision's ``filename``)
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str  # key of the labels in a batch dict
    names_key: str  # key of the class names in the meta dict
    torchvision_class: str  # torchvision.datasets class that holds url and tgz_md5
    train_per_class: int  # images per class in the official split
    test_per_class: int

    @property
    def files(self) -> tuple[str, ...]:
        """The extracted folder's files: meta, training batches, test batch."""
        return (self.meta_file, *self.train_files, self.test_file)


CIFAR10 = CifarLayout(
    info=CIFAR10_INFO,
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    archive="cifar-10-python.tar.gz",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    torchvision_class="CIFAR10",
    train_per_class=5000,
    test_per_class=1000,
)
CIFAR100 = CifarLayout(
    info=CIFAR100_INFO,
    title="CIFAR-100",
    folder="cifar-100-python",
    archive="cifar-100-python.tar.gz",
    train_files=("train",),
    test_file="test",
    meta_file="meta",
    label_key="fine_labels",  # the 100 fine labels, not the 20 coarse superclasses
    names_key="fine_label_names",
    torchvision_class="CIFAR100",
    train_per_class=500,
    test_per_class=100,
)


# ---------------------------------------------------------------------------
# Restricted unpickling
# ---------------------------------------------------------------------------

# Taken from live objects so the names resolve on numpy 1.x and 2.x alike
# (numpy 2 renamed numpy.core to numpy._core; old pickles still say numpy.core).
_RECONSTRUCT = np.array(0).__reduce__()[0]
_SCALAR = np.float64(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5 (pickle.HIGHEST_PROTOCOL): out-of-band buffers
_ALLOWED_GLOBALS = {
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,  # np.frombuffer + reshape; refuses object dtypes
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("__builtin__", "bytes"): bytes,  # an empty array in a protocol-2 pickle
    ("builtins", "bytes"): bytes,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how Python 3 protocol-2 pickles store bytes
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays, dicts, lists and strings, and nothing else.

    Any other global (``os.system``, ``builtins.eval``, ...) raises instead of being imported.
    """

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(f"{module}.{name}") from None


def _unpickle(path: Path, title: str) -> dict[str, object]:
    """Load one official CIFAR pickle safely; keys come back as str whether stored as bytes or str."""
    fix = f"replace it with the official file from {HOMEPAGE}"
    try:
        with open(path, "rb") as f:
            # latin1: the official files are Python 2 pickles whose str objects hold raw bytes.
            obj = NumpyOnlyUnpickler(f, encoding="latin1").load()
    except _ForbiddenGlobal as e:
        raise CifarlensError(
            f"refusing to load {path}: it references {e}, which a {title} file never contains (possibly malicious); {fix}"
        ) from None
    except OSError as e:
        raise CifarlensError(f"cannot read {path} ({e.strerror or e}); check its permissions") from e
    except Exception as e:  # any other failure means the bytes are not a valid pickle
        raise CifarlensError(f"corrupt {title} file {path}: not a readable pickle ({type(e).__name__}: {e}); {fix}") from e
    if not isinstance(obj, dict):
        raise CifarlensError(f"corrupt {title} file {path}: expected a dict, found {type(obj).__name__}; {fix}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _get(d: dict[str, object], key: str, path: Path, title: str) -> object:
    if key not in d:
        raise CifarlensError(f"corrupt {title} file {path}: no {key!r} entry; replace it with the official file from {HOMEPAGE}")
    return d[key]


def _read_names(path: Path, layout: CifarLayout) -> tuple[str, ...]:
    d = _unpickle(path, layout.title)
    names = _get(d, layout.names_key, path, layout.title)
    expected = layout.info.num_classes
    if not isinstance(names, (list, tuple)) or len(names) != expected:
        raise CifarlensError(
            f"corrupt {layout.title} file {path}: {layout.names_key!r} should list {expected} class names; "
            f"replace it with the official file from {HOMEPAGE}"
        )
    names = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # two classes of one name: every figure would mix them up
        raise CifarlensError(f"corrupt {layout.title} file {path}: the class {twice[0]!r} is named twice; replace it "
                             f"with the official file from {HOMEPAGE}")
    return names


def _read_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> images (N, 3, 32, 32) uint8 and labels (N,) int64, validated."""
    d = _unpickle(path, layout.title)
    data = _get(d, "data", path, layout.title)
    labels = _get(d, layout.label_key, path, layout.title)

    def corrupt(problem: str) -> CifarlensError:
        return CifarlensError(f"corrupt {layout.title} file {path}: {problem}; replace it with the official file from {HOMEPAGE}")

    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise corrupt(f"'data' should be an (N, 3072) uint8 array, found {desc}")
    try:
        raw = np.asarray(labels)
        labels = raw.astype(np.int64)
        if raw.dtype.kind not in "iub" and not np.array_equal(labels, raw):  # 1.7 would become 1
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise corrupt(f"{layout.label_key!r} is not a list of integers") from None
    if labels.shape != (data.shape[0],):
        raise corrupt(f"{data.shape[0]} images but {layout.label_key!r} has shape {labels.shape}")
    k = layout.info.num_classes
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise corrupt(f"labels must be in [0, {k - 1}], found {labels.min()}..{labels.max()}")
    # Official row layout: 1024 red values, then 1024 green, then 1024 blue, each a 32x32
    # image in row-major order -- exactly a C-order reshape to (N, 3, 32, 32).
    return data.reshape(-1, 3, 32, 32), labels


def _read_folder(folder: Path, layout: CifarLayout) -> tuple[tuple[str, ...], Split, Split]:
    for name in layout.files:
        if not (folder / name).is_file():
            archive = folder.parent / layout.archive
            fix = (f"delete the folder, and {archive} beside it is extracted again" if archive.is_file() else
                   f"delete the folder and put {layout.archive} into {folder.parent} (from {HOMEPAGE}) to extract "
                   "it again")
            what = "is not a file" if (folder / name).exists() else "is missing"
            raise CifarlensError(f"{layout.title} folder {folder} is incomplete: {name} {what}; {fix}")
    classes = _read_names(folder / layout.meta_file, layout)
    parts = [_read_batch(folder / name, layout) for name in layout.train_files]
    train = Split(
        torch.from_numpy(np.ascontiguousarray(np.concatenate([p[0] for p in parts]))),
        torch.from_numpy(np.concatenate([p[1] for p in parts])),
    )
    images, labels = _read_batch(folder / layout.test_file, layout)
    test = Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))
    return classes, train, test


# ---------------------------------------------------------------------------
# Archive and download
# ---------------------------------------------------------------------------


def _safe_member(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
    """tarfile's "data" filter (no absolute paths, no links or files outside the folder, no devices),
    and no modes from the archive: the files get those open() gives, as the user's umask says (the
    archive's 0644 made them readable by all under umask 077)."""
    member = tarfile.data_filter(member, path)
    return member.replace(mode=None, deep=False) if member is not None else None


def _extract(archive: Path, data_dir: Path, layout: CifarLayout) -> None:
    """Extract the official archive into data_dir/<folder>, via a temporary folder so an
    interrupted extraction never leaves a half-written folder that looks complete."""
    fix = f"delete it and put the official {layout.archive} there (from {HOMEPAGE})"
    for stale in data_dir.glob(f".{layout.folder}-extract-*"):  # a killed extraction's (50 MB); not one running now
        if stale.is_dir() and time.time() - stale.stat().st_mtime > STALE_EXTRACT_S:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{layout.folder}-extract-", dir=data_dir))
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(tmp, filter=_safe_member)
        extracted = tmp / layout.folder
        if not extracted.is_dir():
            raise CifarlensError(f"archive {archive} does not contain {layout.folder}/; {fix}")
        missing = [name for name in layout.files if not (extracted / name).is_file()]
        if missing:  # not put in place: the folder's own error would say to extract this archive again
            raise CifarlensError(f"archive {archive} is incomplete: it lacks {layout.folder}/{missing[0]}; {fix}")
        os.replace(extracted, data_dir / layout.folder)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]  # tarfile's messages run over several lines
        raise CifarlensError(f"could not extract {archive} ({type(e).__name__}: {first}); {fix}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download(data_dir: Path, layout: CifarLayout) -> Path:
    import torchvision.datasets  # lazy: only needed when downloading

    tv = getattr(torchvision.datasets, layout.torchvision_class)
    return download_file(
        tv.url,
        data_dir,
        layout.archive,
        tv.tgz_md5,
        what=layout.title,
        fix=f"put {layout.archive} or the extracted {layout.folder}/ into {data_dir} (from {HOMEPAGE})",
    )


def read_cifar(layout: CifarLayout, data_dir: Path, *, download: bool, image_size: int | None) -> LoadedDataset:
    """Read one CIFAR variant from data_dir (its extracted folder, or that folder itself, else the
    archive, else an image-folder copy, else download)."""
    check_image_size(image_size)
    data_dir = Path(data_dir)
    folder = data_dir / layout.folder
    if not folder.exists() and any((data_dir / name).is_file() for name in layout.files):
        # the extracted cifar-10-batches-py/ itself, whole or not (its own error names what it lacks): a download
        # would nest the official files inside it and train on them, not on the user's (files: CIFAR-100's "train"
        # and "test" are an image-folder copy's folders)
        folder = data_dir
    archive = data_dir / layout.archive
    if data_dir.exists() and not data_dir.is_dir():
        raise CifarlensError(f"data dir {data_dir} is a file; pass the folder that holds {layout.folder}/ or {layout.archive}")
    val, source = None, DataSource(kind="official files", path=str(data_dir))
    if not folder.is_dir() and not archive.is_file() and is_folder_copy(data_dir):
        train, test, val, source = read_folder_copy(data_dir, layout.info, layout.title,
                                                    train_per_class=layout.train_per_class,
                                                    test_per_class=layout.test_per_class)
        info = layout.info
    else:
        if folder.is_dir() and archive.is_file() and not any(folder.iterdir()):
            folder.rmdir()  # an empty folder where the archive beside it goes: extracted as if it were not there
        if folder.exists() and not folder.is_dir():
            raise CifarlensError(f"{folder} is a file where the extracted {layout.title} folder goes; move it away")
        if not folder.is_dir():
            if not archive.is_file():
                refuse_partial_copy(data_dir, layout.info, layout.title)  # never download over the user's copy
                if not download:
                    raise CifarlensError(
                        f"{layout.title} not found: put {layout.archive} or the extracted {layout.folder}/ into "
                        f"{data_dir} (from {HOMEPAGE}), or an image-folder copy (train/<class>/, test/<class>/), "
                        "or, for a new run, leave out --no-download to download it"
                    )
                archive = _download(data_dir, layout)  # makes data_dir (removed again if it fails)
            _extract(archive, data_dir, layout)
        classes, train, test = _read_folder(folder, layout)
        info = replace(layout.info, classes=classes)
        reordered = classes != layout.info.classes and sorted(classes) == sorted(layout.info.classes)
        # a subset (or a file from somewhere else) under the official names is not the official split
        counts = (count_warning("..".join(dict.fromkeys([layout.train_files[0], layout.train_files[-1]])), train.labels, info, layout.train_per_class),
                  count_warning(layout.test_file, test.labels, info, layout.test_per_class))
        if reordered:  # the labels follow the file, so every figure names other classes than the literature's
            counts += (f"{layout.meta_file} lists the {layout.title} classes in another order than the official "
                       f"one ({', '.join(classes[:3])}, ... instead of {', '.join(layout.info.classes[:3])}, ...)",)
        elif classes != layout.info.classes:  # other names: another dataset in the official layout
            other = [c for c in classes if c not in layout.info.classes]
            counts += (f"{layout.meta_file} names {len(other)} class(es) the official {layout.title} does not have "
                       f"({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}): this is not {layout.title}",)
            info = replace(info, title=f"another dataset in the {layout.title} layout")  # the log's, the report's name
        source = replace(source, warnings=tuple(f"{layout.title} files in {folder}: {w}" for w in counts if w))
    if image_size is not None and image_size != info.image_size:
        train = replace(train, images=resize_uint8(train.images, image_size))
        test = replace(test, images=resize_uint8(test.images, image_size))
        val = replace(val, images=resize_uint8(val.images, image_size)) if val is not None else None
        info = replace(info, image_size=image_size)
    return LoadedDataset(info=info, train=train, test=test, val=val, source=source)


@DATASETS.register("cifar10")
def cifar10(data_dir: Path, *, download: bool, image_size: int | None) -> LoadedDataset:
    """CIFAR-10: 50,000 train / 10,000 test RGB 32x32 images, 10 classes."""
    return read_cifar(CIFAR10, data_dir, download=download, image_size=image_size)


@DATASETS.register("cifar100")
def cifar100(data_dir: Path, *, download: bool, image_size: int | None) -> LoadedDataset:
    """CIFAR-100: 50,000 train / 10,000 test RGB 32x32 images, 100 fine classes."""
    return read_cifar(CIFAR100, data_dir, download=download, image_size=image_size)
