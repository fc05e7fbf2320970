"""Starting weights for a training run: ImageNet (``--pretrained``) or a file (``--weights FILE``).

Only ``cifarlens.api.train`` calls :func:`load_initial_weights`, once, before the first
epoch; evaluate/predict/serve/export load the run's own ``model.safetensors``.

A weights file is safetensors, or a PyTorch state dict read with
``torch.load(weights_only=True)`` (tensors and plain containers only: a pickle that asks
to run code is refused), possibly nested under ``"state_dict"`` or ``"model"`` (so a run's
``checkpoints/last.pt`` works too). Two layouts:

- **torchvision** (keys ``conv1.weight``, ``fc.weight``, ``features.0.0.weight``,
  ``classifier.1.weight``, ...), for the pretrained-backbone models: every backbone key
  must fit; the file's ImageNet classifier is dropped and the head starts fresh, sized for
  the dataset. RGB stem weights are summed over colour for grey (1-channel) data.
- **cifarlens** (the model's own keys, e.g. ``backbone.*`` and ``head.*``, as in another
  run's ``model.safetensors``), for every registered model: every key must fit, head included.

Anything missing, unexpected or of another shape is a :class:`CifarlensError` naming the keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import urllib.error
import urllib.parse
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from cifarlens.checkpoint import UnreadableFile, load_weights, torch_load_safely
from cifarlens.errors import CifarlensError
from cifarlens.models.pretrained import (
    BACKBONES, IMAGENET_MEAN, IMAGENET_STD, PretrainedClassifier, list_pretrained,
)

SHOW_KEYS = 5  # keys named per kind of problem in an error message
NESTED = ("state_dict", "model", "model_state_dict")  # where checkpoints of other tools keep the weights


def uses_imagenet_input(model_cfg) -> bool:
    """Whether a run with this model config normalises with ImageNet's mean/std: a pretrained
    backbone started from ImageNet or a file (from scratch, it uses the dataset's own)."""
    return model_cfg.name in BACKBONES and bool(model_cfg.pretrained or model_cfg.weights)


def input_info(model_cfg, info):
    """``info`` (a DatasetInfo) with the mean/std the model's starting weights expect: those a
    cifarlens weights file was trained with, ImageNet's for a pretrained backbone, else the data's."""
    stats = file_input_stats(model_cfg.weights) if model_cfg.weights else None
    if stats is None and not uses_imagenet_input(model_cfg):
        return info
    mean, std = stats or (IMAGENET_MEAN, IMAGENET_STD)
    if len(mean) != info.in_channels:  # e.g. RGB statistics for grey images: their mean per channel
        mean, std = (sum(mean) / len(mean),) * info.in_channels, (sum(std) / len(std),) * info.in_channels
    return replace(info, mean=tuple(mean), std=tuple(std))


def file_input_stats(path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The input mean/std a cifarlens weights file was trained with: from the metadata of a file
    cifarlens wrote (a run's model.safetensors, or ``export``'s), else from the run.json of the
    run folder it is in (model.safetensors from before the metadata had them, checkpoints/*.pt);
    None for other files (torchvision's, timm's) or values that are not statistics of [0, 1] pixels."""
    path = Path(path)
    values: dict = {}
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        kind = meta.get("format") or ""
        kind = json.loads(kind) if kind.startswith('"') else kind  # export's metadata values are JSON
        if kind in ("cifarlens-weights", "cifarlens-export"):
            values = json.loads(meta["dataset"]) if "dataset" in meta else \
                {key: json.loads(meta[key]) for key in ("mean", "std") if key in meta}
    except (SafetensorError, OSError, ValueError, TypeError):  # not safetensors, or other metadata
        values = {}
    run_json = path.parent / "run.json" if path.name == "model.safetensors" else \
        path.parent.parent / "run.json" if path.parent.name == "checkpoints" else None
    if not (isinstance(values, dict) and {"mean", "std"} <= set(values)) and run_json and run_json.is_file():
        try:
            values = json.loads(run_json.read_text()).get("dataset") or {}
        except (OSError, ValueError, AttributeError):
            values = {}
    try:
        mean, std = tuple(float(v) for v in values["mean"]), tuple(float(v) for v in values["std"])
    except (KeyError, TypeError, ValueError):
        return None
    if not mean or len(mean) != len(std) or not all(0 <= m <= 1 for m in mean) or not all(0 < v <= 1 for v in std):
        return None
    return mean, std


def load_initial_weights(model: nn.Module, model_cfg) -> dict | None:
    """Load what ``model_cfg.pretrained`` / ``model_cfg.weights`` ask for into ``model``.

    Returns a record for run.json (``{"source": "imagenet" | "file", ...}``), or None when
    the model starts from its random initialisation.
    """
    if model_cfg.pretrained and model_cfg.weights:
        raise CifarlensError("--pretrained and --weights FILE both give starting weights; choose one")
    if model_cfg.pretrained:
        if not isinstance(model, PretrainedClassifier):
            raise CifarlensError(
                f"model {model_cfg.name!r} has no pretrained weights; models with ImageNet weights: "
                f"{', '.join(list_pretrained())} (or start any model from a file with --weights FILE)"
            )
        weights = model.weights_enum()
        state, digest = _download(weights)
        source = f"torchvision {type(weights).__name__}.{weights.name}"
        layout = fit_weights(model, state, source, model_cfg.name)
        return {
            "source": "imagenet",
            "weights": f"{type(weights).__name__}.{weights.name}",
            "url": weights.url,
            "sha256": digest,
            "layout": layout,
        }
    if model_cfg.weights:
        path = Path(model_cfg.weights)
        state = read_state_dict(path)
        layout = fit_weights(model, state, path.name, model_cfg.name)
        return {"source": "file", "file": str(path.resolve()), "sha256": _sha256(path), "layout": layout}
    return None


def describe_init(record: dict | None) -> str:
    """One line for reports: how a run's weights were initialised."""
    if not record or record.get("source") == "scratch":
        return "scratch (random init)"
    if record.get("source") == "imagenet":
        return f"ImageNet (torchvision {record.get('weights', '?')})"
    name = Path(str(record.get("file", "?"))).name
    return f"file {name} ({record.get('layout', '?')} layout, sha256 {str(record.get('sha256', '?'))[:12]})"


# -- reading -----------------------------------------------------------------------------------


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A flat name -> tensor dict from a safetensors file or a PyTorch state dict (safely)."""
    path = Path(path)
    if path.is_dir():
        raise CifarlensError(f"weights file {path} is a folder; give the file (e.g. {path / 'model.safetensors'})")
    if not path.is_file():
        raise CifarlensError(f"weights file {path} not found")
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then JSON
        return load_weights(path)
    try:
        payload = torch_load_safely(path)
    except UnreadableFile as reason:  # corrupt file, or a pickle that asks for code (refused, never run)
        raise CifarlensError(
            f"{path} is neither a safetensors file nor a PyTorch state dict that loads safely ({reason}); "
            "save the weights with torch.save(model.state_dict(), FILE) or as safetensors"
        ) from None
    for key in NESTED:
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    if (
        not isinstance(payload, dict)
        or not payload
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in payload.items())
    ):
        raise CifarlensError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    for prefix in ("module.", "_orig_mod."):  # saved from DistributedDataParallel / torch.compile
        if all(k.startswith(prefix) for k in payload):
            payload = {k[len(prefix) :]: v for k, v in payload.items()}
    return payload


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(weights) -> tuple[dict[str, Tensor], str]:
    """torchvision's own download (hash-checked, into the torch hub cache), failing fast offline;
    the state dict and the file's SHA-256. A file already in the cache (perhaps copied there by
    hand, as the offline advice says) is checked against the hash its name carries, as torch
    checks a download: torch would take any file of that name."""
    from cifarlens.data.base import CONNECT_TIMEOUT_S, READ_TIMEOUT_S, _check_reachable

    url = weights.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlsplit(url).path)
    named = re.search(r"-([a-f0-9]{6,})\.", cached.name)  # torch.hub's HASH_REGEX: resnet18-f37072fd.pth
    if cached.is_file() and named and not _sha256(cached).startswith(named.group(1)):
        raise CifarlensError(f"the cached ImageNet weights {cached} are not the published file (their SHA-256 does "
                             f"not start with {named.group(1)}, as the name says): delete it and run again online, "
                             "or pass the weights with --weights FILE")
    old_timeout = socket.getdefaulttimeout()
    try:
        if not cached.is_file():
            _check_reachable(url, CONNECT_TIMEOUT_S)  # seconds, not minutes, when offline
            socket.setdefaulttimeout(READ_TIMEOUT_S)
        state = weights.get_state_dict(progress=sys.stderr.isatty(), check_hash=True, weights_only=True)
        return state, _sha256(cached)
    except Exception as err:  # offline, a refused download, a file the safe unpickler cannot read (KeyError)
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        reason = " ".join(str(reason).split())[:200] or type(err).__name__
        raise CifarlensError(
            f"could not get the ImageNet weights {type(weights).__name__}.{weights.name} ({reason}); "
            f"offline, download {url} elsewhere and pass it with --weights FILE (or put it in {cached.parent})"
        ) from None
    finally:
        socket.setdefaulttimeout(old_timeout)


# -- fitting -----------------------------------------------------------------------------------


def _is_cifarlens_layout(model: nn.Module, state: dict[str, Tensor]) -> bool:
    if not isinstance(model, PretrainedClassifier):
        return True  # other models have no torchvision counterpart: their own keys only
    return any(k.startswith(("backbone.", "head.")) for k in state)


def _from_torchvision(model: PretrainedClassifier, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision keys -> ours: drop the ImageNet classifier, prefix ``backbone.``, adapt the stem to the channels."""
    spec = model.spec
    out = {f"backbone.{k}": v for k, v in state.items() if not k.startswith(spec.classifier)}
    stem = f"backbone.{spec.stem_conv}.weight"
    if stem in out:
        out[stem] = adapt_input_conv(out[stem], model.in_channels)
    return out


def adapt_input_conv(weight: Tensor, in_channels: int) -> Tensor:
    """RGB conv filters (O, 3, k, k) for ``in_channels`` inputs: summed for grey, tiled otherwise (as timm)."""
    if weight.ndim != 4 or weight.shape[1] == in_channels or weight.shape[1] != 3:
        return weight  # nothing to adapt (a wrong shape is reported by fit_weights)
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = -(-in_channels // 3)
    return weight.repeat(1, repeat, 1, 1)[:, :in_channels] * (3 / in_channels)


def _natural(key: str) -> tuple:
    """Sort key: parameters before buffers, numbers in numeric order (layer2 < layer10)."""
    buffer = key.endswith(("running_mean", "running_var", "num_batches_tracked"))
    return (buffer, [int(part) if part.isdigit() else part for part in key.split(".")])


def _shape(t: Any) -> str:
    return str(tuple(t.shape))


def _some(keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOW_KEYS} more)" if len(keys) > SHOW_KEYS else ""
    return ", ".join(keys[:SHOW_KEYS]) + more


def fit_weights(model: nn.Module, state: dict[str, Tensor], source: str, model_name: str) -> str:
    """Check that ``state`` fits ``model`` exactly, then load it; return the layout ("torchvision" / "cifarlens").

    torchvision layout: every backbone key must be in the file (the head stays as built);
    cifarlens layout: every key of the model. Raises CifarlensError naming the keys that do not fit.
    """
    own = model.state_dict()
    if _is_cifarlens_layout(model, state):
        layout, expected = "cifarlens", own
    else:
        layout = "torchvision"
        state = _from_torchvision(model, state)
        expected = {k: v for k, v in own.items() if not k.startswith("head.")}
    wrong_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    missing = sorted((k for k in expected if k not in state), key=lambda k: _natural(k)[0])  # parameters first
    unexpected = sorted((k for k in state if k not in expected), key=_natural)  # file order is arbitrary
    if wrong_shape or missing or unexpected:
        # keys as the file names them (torchvision layout: without our "backbone." prefix)
        name = (lambda k: k.removeprefix("backbone.")) if layout == "torchvision" else (lambda k: k)
        problems = [
            f"{name(k)} is {_shape(state[k])} in the file, {_shape(expected[k])} in the model"
            for k in wrong_shape[:SHOW_KEYS]
        ]
        if len(wrong_shape) > SHOW_KEYS:
            problems.append(f"{len(wrong_shape) - SHOW_KEYS} more keys of another shape")
        if missing:
            problems.append(
                f"{len(missing)} of the model's keys are missing from the file: {_some([name(k) for k in missing])}"
            )
        if unexpected:
            problems.append(
                f"{len(unexpected)} keys in the file are not in the model: {_some([name(k) for k in unexpected])}"
            )
        fitting = len(expected) - len(missing) - len(wrong_shape)
        raise CifarlensError(
            f"{source} does not fit {model_name} ({layout} layout, {fitting} of {len(expected)} keys fit): "
            + "; ".join(problems)
            + ". Was it saved from another architecture, number of classes or input channels?"
        )
    model.load_state_dict(state, strict=layout == "cifarlens")  # torchvision layout: the head stays new
    return layout
