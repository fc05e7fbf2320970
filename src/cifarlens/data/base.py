"""What every dataset reader returns: facts about the dataset and uint8 tensors.

All datasets are materialised in memory as uint8 tensors of shape (N, C, H, W)
so that augmentation can run in batches on the training device (see
``cifarlens.data.augment``) instead of per image in DataLoader workers.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from cifarlens.errors import CifarlensError
from cifarlens.registry import Registry


@dataclass(frozen=True)
class DatasetInfo:
    """Facts about a dataset, defined once.

    mean/std are per-channel statistics of the *training* images scaled to [0, 1]
    (population std over all training pixels of that channel).
    """

    name: str
    classes: tuple[str, ...]
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = True  # whether a horizontal flip keeps the label valid
    augment: str = "standard"  # default augmentation level (data.augment left unset)
    title: str = ""  # as printed in reports ("CIFAR-10"); empty: the registry name

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def display_name(self) -> str:
        return self.title or self.name


@dataclass(frozen=True)
class DataSource:
    """Where the images of a run came from, and whether they are the official bytes.

    Recorded in run.json (``source``) so a report can say "CIFAR-10 (JPEG copy)" instead of
    claiming the official files for pixels that went through lossy compression.
    """

    kind: str = "official files"  # or "image folder copy", "image folder"
    path: str = ""
    formats: tuple[str, ...] = ()  # file formats of an image folder ("JPEG", "PNG")
    lossy: bool = False  # some images went through lossy compression (JPEG)
    warnings: tuple[str, ...] = ()  # what differs from the official data, for the run's log

    def label(self, info: DatasetInfo) -> str:
        """"CIFAR-10", "CIFAR-10 (JPEG copy)", "CIFAR-10 (PNG copy)"; an image folder is just its title."""
        if self.kind != "image folder copy":
            return info.display_name
        return f"{info.display_name} ({'/'.join(self.formats) or 'image'} copy)"


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    # where each image was read from, relative to the data folder ("test/cat/0001.jpg"), for the
    # folder datasets; None for the official files, whose position is the image's name
    files: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor) -> "Split":
        files = None if self.files is None else tuple(self.files[i] for i in index.tolist())
        return Split(self.images[index], self.labels[index], files)


@dataclass
class LoadedDataset:
    info: DatasetInfo
    train: Split
    test: Split
    val: Split | None = None  # only when the source ships its own validation split
    source: DataSource = DataSource()


class DatasetReader(Protocol):
    def __call__(self, data_dir: Path, *, download: bool, image_size: int | None) -> LoadedDataset: ...


# name -> reader; readers raise CifarlensError on missing/corrupt data, never fall back to other data
DATASETS: Registry[Callable[..., LoadedDataset]] = Registry("dataset")


# ---------------------------------------------------------------------------
# Helpers shared by the readers (added with the readers; the API above is unchanged).
# ---------------------------------------------------------------------------

# An offline machine must fail in seconds, not minutes: torchvision's download_url calls
# urlopen without a timeout, and a socket timeout does not bound DNS resolution, so a
# reachability probe with a hard deadline runs first.
CONNECT_TIMEOUT_S = 5.0  # deadline for DNS + TCP connect before a download starts
READ_TIMEOUT_S = 30.0  # per socket operation while downloading (not a total limit)


MAX_IMAGE_SIZE = 4096  # pixels a side: one 3 x 4096 x 4096 float image is 200 MB; CIFAR-sized models want 32


def check_image_size(image_size: int | None) -> None:
    """Raise CifarlensError unless image_size is None or a positive int up to MAX_IMAGE_SIZE."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or not 1 <= image_size <= MAX_IMAGE_SIZE):
        raise CifarlensError(f"image size must be a whole number of pixels from 1 to {MAX_IMAGE_SIZE}, "
                             f"got {image_size!r}")


def count_warning(split: str, labels: torch.Tensor, info: DatasetInfo, per_class: int) -> str | None:
    """What differs from the official split's ``per_class`` images of every class; None: nothing."""
    counts = torch.bincount(labels, minlength=info.num_classes).tolist()
    if all(c == per_class for c in counts):
        return None
    differ = [f"{info.classes[i]} {c:,}" for i, c in enumerate(counts) if c != per_class]
    shown = ", ".join(differ[:5]) + (f", ... ({len(differ)} classes differ)" if len(differ) > 5 else "")
    return (f"{split} has {sum(counts):,} images, the official split {per_class * info.num_classes:,} "
            f"({per_class:,} per class; here {shown})")


def relative_names(paths: list[Path], root: Path) -> tuple[str, ...]:
    """Each file's path below ``root`` with forward slashes ("test/cat/0001.jpg"): the names a
    predictions file gives, the same on any system and wherever the folder moves."""
    return tuple(path.relative_to(root).as_posix() for path in paths)


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Resize (N, C, H, W) uint8 images to (N, C, size, size) uint8 (bilinear, antialiased).

    Works in float32 chunks of ``chunk`` images so 50k images never exist as one float copy.
    Returns ``images`` itself when it already has the requested size.
    """
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for start in range(0, n, chunk):
        x = images[start : start + chunk].float()  # (B, C, H, W) in [0, 255]
        y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _one_line(reason: object) -> str:
    return " ".join(str(reason).split()) or type(reason).__name__


def _check_reachable(url: str, timeout: float) -> None:
    """Raise OSError unless a TCP connection to url's host opens within ``timeout`` seconds."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(host):
        return  # behind a proxy a direct probe says nothing; rely on the socket timeout
    result: dict[str, object] = {}

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result["ok"] = True
        except OSError as e:
            result["error"] = e

    # A daemon thread, because getaddrinfo cannot be interrupted: if DNS hangs we stop waiting.
    thread = threading.Thread(target=probe, name="cifarlens-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if "ok" not in result:
        raise OSError(result.get("error") or f"no connection to {host}:{port} within {timeout:g} s")


def download_file(url: str, root: Path, filename: str, md5: str | None, *, what: str, fix: str) -> Path:
    """Download ``url`` to ``root/filename`` with torchvision, checking ``md5``; return the path.

    The file is written as ``filename + ".part"`` and renamed only once its checksum matches,
    so an interrupted download never looks like a finished one; folders made for it are removed
    again when it fails (and nothing else is in them). Any failure raises
    ``CifarlensError("could not download {what} (<reason>); {fix}")`` within seconds when offline.
    """
    from torchvision.datasets.utils import download_url  # lazy: only needed when downloading

    created = [folder for folder in (root, *root.parents) if not folder.exists()]  # deepest first
    root.mkdir(parents=True, exist_ok=True)
    target = root / filename
    part = root / (filename + ".part")
    old_timeout = socket.getdefaulttimeout()
    try:
        _check_reachable(url, CONNECT_TIMEOUT_S)
        socket.setdefaulttimeout(READ_TIMEOUT_S)  # process-wide, restored below
        download_url(url, str(root), filename=part.name, md5=md5)
        os.replace(part, target)
    except (OSError, RuntimeError, ValueError, http.client.HTTPException) as e:
        part.unlink(missing_ok=True)
        for folder in created:  # the folders made for it, left empty: nothing is left behind
            try:
                folder.rmdir()
            except OSError:
                break
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise CifarlensError(f"could not download {what} ({_one_line(reason)}); {fix}") from e
    finally:
        socket.setdefaulttimeout(old_timeout)
    return target
