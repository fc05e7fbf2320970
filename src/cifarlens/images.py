"""Reading any common image into a uint8 tensor of the model's shape.

The one image decoder of cifarlens: the imagefolder reader, ``predict`` and the web
app all use it, so 16-bit, palette, transparent and grayscale images are treated the
same way in training and at inference.
"""

from __future__ import annotations

import functools
import io
import os
import re
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cifarlens.errors import CifarlensError

# Decompression-bomb guard, checked from the header before any pixel is decoded (thread-safe,
# unlike PIL's warning filter). PIL itself refuses images over 2 x MAX_IMAGE_PIXELS.
MAX_PIXELS = 40_000_000

ImageSource = Union[str, Path, bytes, Image.Image, np.ndarray]

# the files the folder readers take as images: torchvision.datasets.folder.IMAGE_EXTENSIONS plus GIF,
# the other names of JPEG files (.jpe, .jfif: web downloads), AVIF, APNG, Netpbm and TGA, all of which
# Pillow reads (AVIF since Pillow 11.2)
JPEG_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif"})
IMAGE_EXTENSIONS = JPEG_EXTENSIONS | frozenset(
    {".apng", ".avif", ".bmp", ".gif", ".pbm", ".pgm", ".png", ".pnm", ".ppm", ".tga", ".tif", ".tiff", ".webp"})
LOSSY_EXTENSIONS = JPEG_EXTENSIONS | frozenset({".webp", ".avif"})  # WebP and AVIF may be lossless: lossy to be safe


@functools.cache
def decoded_formats() -> tuple[str, ...]:
    """The Pillow formats :func:`load_image` opens: those of IMAGE_EXTENSIONS (JPEG, PNG, GIF, BMP,
    TIFF, WebP, AVIF, Netpbm, TGA), the folder readers' images. Not every format Pillow knows:
    an EPS file is rendered by running Ghostscript on it (an uploaded file handed to an
    interpreter), and an ICO or ICNS file decodes its embedded PNG inside ``Image.open``, before
    the pixel-count guard below could refuse a bomb (a 657 KB ICO held 13000 x 13000 pixels)."""
    Image.init()
    known = Image.registered_extensions()
    return tuple(sorted({known[ext] for ext in IMAGE_EXTENSIONS if ext in known}))


# the first bytes of formats Pillow (or nobody) decodes here, to name them in the error: a user with
# an .ico, .heic or .svg file learns what it is and that converting it helps
_SIGNATURES = ((b"\x00\x00\x01\x00", "an ICO icon"), (b"\x00\x00\x02\x00", "a CUR cursor"), (b"icns", "an ICNS icon"),
               (b"%!PS", "a PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "an EPS"), (b"%PDF", "a PDF"),
               (b"8BPS", "a Photoshop PSD"), (b"<svg", "an SVG"), (b"<?xml", "an XML (SVG?)"), (b"DDS ", "a DDS"),
               (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000"), (b"\xff\x4f\xff\x51", "a JPEG 2000"))
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1")


def sniffed_format(head: bytes) -> str | None:
    """"an ICO icon" for a file starting with ICO's signature, and so on for the formats
    :func:`decoded_formats` leaves out and a few Pillow does not know (HEIC, SVG, PDF); None
    for anything else."""
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "a HEIC/HEIF"
    return next((what for magic, what in _SIGNATURES if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(magic)), None)


def _head(source, n: int = 16) -> bytes:
    """The first ``n`` bytes of a path, bytes or seekable file object (b"" when they cannot be read);
    leaves a file object anywhere, as a failed ``Image.open`` does."""
    try:
        if isinstance(source, bytes):
            return source[:n]
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                return f.read(n)
        source.seek(0)  # where Image.open reads from
        head = source.read(n)
        return head if isinstance(head, bytes) else b""
    except (OSError, ValueError, AttributeError):
        return b""


def format_names(suffixes) -> tuple[str, ...]:
    """("JPEG", "PNG") for the file suffixes {".jpg", ".png", ".jpeg"}: what a run records as its data's formats."""
    return tuple(sorted({"JPEG" if s.lower() in JPEG_EXTENSIONS else "TIFF" if s.lower() == ".tif" else
                         s.lstrip(".").upper() for s in suffixes}))


def list_images(folder: Path, skipped: list[Path] | None = None) -> list[Path]:
    """The image files under ``folder`` (by extension, any depth), sorted; hidden files and folders
    (a leading dot) left out, other files appended to ``skipped`` when given. Links to folders are
    followed, as torchvision's ImageFolder follows them (``Path.rglob`` does not before Python
    3.13), each real folder once, so a link that loops back cannot recurse; a link to a folder
    above ``folder`` (it would bring other classes' images in) and a folder that cannot be read
    are one-line errors."""
    top = os.path.realpath(folder)

    def unreadable(err: OSError):
        raise CifarlensError(f"cannot read the folder {err.filename} ({err.strerror}); fix its permissions "
                             "or move it out of the dataset")

    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True, onerror=unreadable):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        if real != top and top.startswith(real.rstrip(os.sep) + os.sep):
            raise CifarlensError(f"{root} links to {real}, a folder above {folder}: the images there would be "
                                 "counted again, in this class; remove the link")
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            path = Path(root) / f
            if f.startswith(".") or not os.path.isfile(path):
                if skipped is not None and not f.startswith(".") and not os.path.exists(path):
                    skipped.append(path)  # a link to a file that is gone: counted, not dropped without a word
                continue
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(path)
            elif skipped is not None:
                skipped.append(path)
    return sorted(found)


def check_read_once(root: Path, files: Sequence[Path]) -> None:
    """Refuse a dataset in which a link makes one image file two of its images (a class folder
    linked into another class, or into another split): it would be counted twice, under two
    labels, or both trained and tested on."""
    seen: dict[tuple[int, int] | str, Path] = {}
    for path in files:
        stat = os.stat(path)  # one call a file (realpath took 1.3 s for CIFAR-10's 60,000)
        # (a file system without file numbers gives 0, on Windows: the resolved path then)
        key: tuple[int, int] | str = (stat.st_dev, stat.st_ino) if stat.st_ino else os.path.realpath(path)
        if key in seen:
            first, again = (os.path.relpath(p, root) for p in (seen[key], path))
            raise CifarlensError(f"{again} and {first} in {root} are one file, reached through a link: its image "
                                 "would count twice (under two labels, or in two splits); remove the link")
        seen[key] = path


def skipped_warning(where: Path, skipped: list[Path]) -> str | None:
    """"7 files under DIR are not read (not an image extension: .txt 4, .heic 3)", or None."""
    if not skipped:
        return None
    broken = [path for path in skipped if not os.path.exists(path)]  # links to files that are gone
    files = [path for path in skipped if os.path.exists(path)]
    loose = sum(path.suffix.lower() in IMAGE_EXTENSIONS for path in files)  # images a reader left: in no class
    counts: dict[str, int] = {}
    for path in files:
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            counts[path.suffix.lower() or "no extension"] = counts.get(path.suffix.lower() or "no extension", 0) + 1
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])[:5])
    reasons = ([f"{loose:,} beside the class folders, in no class"] if loose else []) + \
        ([f"not an image extension: {kinds}; read: {', '.join(sorted(IMAGE_EXTENSIONS))}"] if counts else []) + \
        ([f"{len(broken):,} link(s) to files that do not exist, e.g. {broken[0]}"] if broken else [])
    return f"{len(skipped):,} file(s) under {where} are not read ({'; '.join(reasons)})"


class ImageTooLarge(CifarlensError):
    """The image has more pixels than MAX_PIXELS (a decompression-bomb guard)."""


def expand_folders(items: list[str]) -> tuple[list[str], list[str]]:
    """The files given, with each folder replaced by the image files under it (sorted, any depth);
    and a warning for each folder with other files in it. A folder without images is an error."""
    paths, warnings = [], []
    for item in items:
        if not Path(item).is_dir():
            paths.append(item)
            continue
        skipped: list[Path] = []
        found = list_images(Path(item), skipped)
        warnings += [w for w in (skipped_warning(Path(item), skipped),) if w]
        if not found:
            raise CifarlensError(f"{item} is a folder without image files")
        paths += [str(f) for f in found]
    return paths, warnings


def to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode -> "RGB" (channels=3) or "L" (channels=1).

    High-bit-depth grey is scaled, not clipped: 16-bit 0..65535 -> 0..255 by x/257;
    32-bit integers ("I", also older Pillows' 16-bit PNGs) likewise, unless they fit in
    0..255 (8-bit values saved wider, which x/257 would turn black); 32-bit float is taken
    as [0, 1] when it fits there, else as [0, 255]. Alpha is dropped, as torchvision's
    default loader does.
    """
    # in place: a 6300x6300 16-bit upload took 1.5 GB through five float64 copies
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.int32)  # (a copy: np.asarray of a PIL image is read-only)
        if im.mode != "I" or np.max(a, initial=0) > 255:  # x / 257 rounded, in integers (257 is odd: no ties)
            np.clip(a, 0, 65535, out=a)
            a += 128
            a //= 257
        im = Image.fromarray(np.clip(a, 0, 255, out=a).astype(np.uint8))
    elif im.mode == "F":
        a = np.asarray(im).astype(np.float64)  # (float32 would round x * 255 differently)
        if np.nanmax(a, initial=0.0) <= 1.0:
            a *= 255.0
        np.nan_to_num(a, copy=False)
        im = Image.fromarray(np.clip(np.rint(a, out=a), 0, 255, out=a).astype(np.uint8))
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # Pillow asks palette transparency to go through RGBA
    if channels == 1 and im.mode in ("LAB", "HSV", "YCbCr", "CMYK"):  # Pillow has no direct way to grey from LAB
        im = im.convert("RGB")
    return im.convert("RGB" if channels == 3 else "L")


def _from_array(a: np.ndarray) -> Image.Image:
    """A uint8 numpy image, (H, W) or (H, W, C) with C 1, 3 or 4 (``np.asarray(pil_image)``), as a PIL image."""
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise CifarlensError(f"a numpy image must be uint8 (H, W) or (H, W, C) with C 1, 3 or 4, as np.asarray(a PIL "
                             f"image) gives; got {a.dtype} {tuple(a.shape)} (a batch: a list of images, or a "
                             "(B, C, H, W) tensor)")
    return Image.fromarray(a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else np.ascontiguousarray(a))


def load_image(source: ImageSource, channels: int, size: int, name: str | None = None) -> torch.Tensor:
    """A path, bytes (or bytearray), a file object, a PIL image or a uint8 numpy array (H, W) or
    (H, W, C), as ``np.asarray(pil_image)`` gives -> uint8 tensor (channels, size, size).

    First frame of animations (a PIL image's own frame is left as it was), EXIF orientation
    applied, resized (bilinear, antialiased when shrinking; aspect ratio not kept). Raises
    CifarlensError naming ``name`` (or the path) when the image cannot be decoded or is too large.
    """
    if isinstance(source, (bytearray, memoryview)):
        source = bytes(source)
    if isinstance(source, np.ndarray):
        name = name or f"(a numpy array, {source.dtype} {tuple(source.shape)})"
        source = _from_array(source)
    if not isinstance(source, (str, os.PathLike, bytes, Image.Image)) and not hasattr(source, "read"):
        raise CifarlensError(f"an image is a path, bytes, a file object, a PIL image or a uint8 numpy array (H, W) "
                             f"or (H, W, C); got {type(source).__name__}")
    name = name or ("upload" if isinstance(source, bytes) else
                    f"(a PIL image, mode {source.mode}, {source.width}x{source.height})" if isinstance(source, Image.Image)
                    else str(source))
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        raise CifarlensError(f"{name} is a folder, not an image (cifarlens predict takes folders; in Python, list its "
                             "images)")
    frame = source.tell() if isinstance(source, Image.Image) else None
    try:
        if isinstance(source, Image.Image):
            im = source
        else:
            im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=decoded_formats())
        limit = min(MAX_PIXELS, Image.MAX_IMAGE_PIXELS or MAX_PIXELS)
        if not im.width or not im.height:  # resized, it would be a blank image with a prediction of its own
            raise CifarlensError(f"cannot read image {name}: it is {im.width}x{im.height} pixels, an empty image")
        if im.width * im.height > limit:
            raise ImageTooLarge(
                f"refusing to decode {name}: {im.width}x{im.height} pixels is over the limit of {limit:,} "
                "(a guard against decompression bombs); shrink it first, e.g. to 4000 pixels on its long side"
            )
        im.seek(0)  # first frame of GIF/WebP/TIFF animations and multi-page files
        im = ImageOps.exif_transpose(im)
        im = to_mode(im, channels)
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        array = np.asarray(im, dtype=np.uint8)
    except CifarlensError:
        raise
    except FileNotFoundError:
        raise CifarlensError(f"image {name} not found") from None
    except Image.DecompressionBombError:  # PIL's own guard, at twice its limit, fires at open() already
        raise ImageTooLarge(f"refusing to decode {name}: more pixels than the limit of {MAX_PIXELS:,} (a guard "
                            "against decompression bombs); shrink it first, e.g. to 4000 pixels on its long side"
                            ) from None
    except UnidentifiedImageError:
        what = sniffed_format(_head(source))
        reads = ", ".join(decoded_formats())
        if what:
            raise CifarlensError(f"cannot read image {name}: it is {what} file, not an image in a format cifarlens "
                                 f"reads ({reads}); convert it to PNG or JPEG first") from None
        raise CifarlensError(f"cannot read image {name}: not an image in a format cifarlens reads ({reads})") from None
    except Exception as err:  # PIL's decoders raise many types (OSError, SyntaxError, ValueError, ...)
        reason = re.sub(r"<_io\.\w+ object at 0x[0-9a-f]+>", "the upload", str(err))  # no memory addresses
        hint = "" if isinstance(source, Image.Image) else "; is it an image file?"
        raise CifarlensError(f"cannot read image {name} ({type(err).__name__}: {reason}){hint}") from None
    finally:
        if frame:  # the caller's animation, back at its frame
            source.seek(frame)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, H, W)
