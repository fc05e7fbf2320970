"""Checkpoints (full training state) and shareable weights (safetensors).

Checkpoints are written atomically and read with ``torch.load(weights_only=True)``,
which only rebuilds tensors and plain containers: a hostile file cannot run code.
Weights meant to be shared or served are safetensors, which hold nothing but tensors.
Both are checked for bytes damaged on disk when read: a checkpoint by its zip entries' CRC-32s,
which ``torch.load`` does not check, and a weights file by a SHA-256 of its tensors written into
its metadata (safetensors keeps no checksum); either would otherwise load as wrong weights.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cifarlens.errors import CifarlensError
from cifarlens.io import atomic_write

FORMAT = "cifarlens-checkpoint"
VERSION = 1
DIGEST_KEY = "tensors_sha256"  # in a weights file's metadata; files without it (older, or not ours) load unchecked


def save_checkpoint(path: Path, payload: dict) -> None:
    payload = {"format": FORMAT, "version": VERSION, **payload}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # closed even when the disk fills up, so the partial file's space is freed
            torch.save(payload, f)

    _written(path, write)


def _written(path: Path, write) -> None:
    """``atomic_write(path, write)``; a writer's failure on a full disk (torch's zip writer says
    only "unexpected pos", safetensors "os error 28") becomes the OSError the CLI names in one
    line, and any other failure of theirs a one-line error naming the file."""
    def checked(tmp: Path) -> None:
        try:
            write(tmp)
        except (RuntimeError, SafetensorError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            # measured while the partial file still fills the disk (once it is removed, the space is back)
            if "os error 28" in first or shutil.disk_usage(tmp.parent).free < 2**20:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
            raise CifarlensError(f"could not write {path} ({first})") from None

    atomic_write(Path(path), checked)


class UnreadableFile(Exception):
    """:func:`torch_load_safely` could not load a file; the message is one line saying why."""


# torch's generic lines around what its safe unpickler refused (advice to load the file unsafely)
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation of torch.load")


def torch_load_safely(path: Path, map_location="cpu"):
    """``torch.load(weights_only=True)``: tensors and plain containers only, a pickle that asks
    for code is refused and never run. A failure raises :class:`UnreadableFile` with the reason
    in one line: what the safe loader refused ("unsupported GLOBAL posix.system ..."), not torch's
    advice to load the file unsafely; else the error's first line."""
    import warnings

    problem = _zip_problem(path)
    if problem is not None:
        raise UnreadableFile(problem)
    with warnings.catch_warnings():  # a pickle of another protocol: the failure below says enough
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # corrupt zip, truncated file, or a pickle that asks for code
            text = str(err).strip()
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            if "WeightsUnpickler error:" in text:  # "Unsupported global: GLOBAL getattr ...", "Unsupported operand 33"
                detail = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n")[0].split(" Please use")[0]
            elif lines and lines[0].startswith(_TORCH_BOILERPLATE[0]):  # "... unsupported GLOBAL posix.system ..."
                detail = next((line for line in lines if not line.startswith(_TORCH_BOILERPLATE)), "")
            elif isinstance(err, KeyError) or len(text) < 12:  # the unpickler lost in bytes that are no pickle: "101"
                raise UnreadableFile(f"not a PyTorch file: {type(err).__name__} {text}".strip()[:200]) from None
            else:  # "PytorchStreamReader failed reading zip archive: failed finding central directory. This is ..."
                raise UnreadableFile(_first_sentence(lines[0]) if lines else type(err).__name__) from None
            raise UnreadableFile(f"the safe loader refused it: {detail.strip() or 'unsupported content'}"[:200]) from None


def _first_sentence(line: str, limit: int = 200) -> str:
    """The line's first sentence, or its first ``limit`` characters and an ellipsis (torch's messages
    go on with advice, and were cut mid-word)."""
    first = line.split(". ", 1)[0].rstrip(".")
    return first if len(first) <= limit else first[: limit - 3].rstrip() + "..."


def _zip_problem(path: Path) -> str | None:
    """What is wrong with a zip file (torch.save's format): an entry whose bytes fail their CRC-32, or
    a file cut short (a zip's directory is at its end); None for an intact zip and for a file that is
    no zip at all (``torch.load`` then says why)."""
    try:
        with zipfile.ZipFile(path) as archive:
            member = archive.testzip()
        return None if member is None else f"damaged: the bytes of its entry {member} do not match their checksum"
    except zipfile.BadZipFile:
        with path.open("rb") as f:
            starts_as_zip = f.read(4) == b"PK\x03\x04"
        return "truncated: its zip archive ends before its directory (cut short, e.g. by a full disk)" \
            if starts_as_zip else None
    except Exception:  # OSError, EOFError, zlib.error...
        return None


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CifarlensError(f"checkpoint {path} not found")
    try:
        payload = torch_load_safely(path, map_location)
    except UnreadableFile as err:
        reason = str(err)
        raise CifarlensError(
            f"{path} is corrupt or not a cifarlens checkpoint ({reason}); "
            "start a new run with --force, or restore the file"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CifarlensError(f"{path} is not a cifarlens checkpoint (no '{FORMAT}' marker)")
    if payload.get("version") != VERSION:
        raise CifarlensError(f"{path} has checkpoint version {payload.get('version')}; this cifarlens reads {VERSION}")
    return payload


def save_weights(state_dict: dict, path: Path, metadata: dict | None = None) -> None:
    # safetensors wants contiguous tensors that share no storage
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    meta = {"format": "cifarlens-weights", DIGEST_KEY: tensors_digest(tensors),
            **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    _written(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_weights(path: Path, device="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CifarlensError(f"weights file {path} not found")
    try:
        with safe_open(str(path), "pt") as f:
            expected = (f.metadata() or {}).get(DIGEST_KEY)
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CifarlensError(f"{path} is corrupt or not a safetensors file ({err})") from None
    if expected is not None and tensors_digest(tensors) != expected:
        raise CifarlensError(f"{path} is damaged: its tensors do not match the checksum written with them; "
                             "restore the file from a copy (or train the run again)")
    return tensors


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_state_into(model: torch.nn.Module, state_dict: dict, source: Path) -> None:
    """``model.load_state_dict`` with a one-line error when the weights belong to another model."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CifarlensError(f"{source} does not fit this model ({first}); was it written by another model or dataset?") from None
