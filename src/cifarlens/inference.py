"""A trained run, loaded to predict: its model, classes, preprocessing and calibration.

Probabilities are *calibrated* by default: when the run has a temperature (fitted on its
validation split after training, or later by ``cifarlens calibrate``; see
:mod:`cifarlens.calibration`), the logits are divided by it before the softmax. Top-1
predictions do not change. ``load_run(..., calibrated=False)`` gives the raw softmax.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from cifarlens.calibration import MAX_TEMPERATURE, MIN_TEMPERATURE
from cifarlens.checkpoint import load_checkpoint, load_state_into, load_weights
from cifarlens.config import RunConfig
from cifarlens.data.augment import normalize
from cifarlens.data.base import DatasetInfo, Split
from cifarlens.data.fingerprint import SIGNATURE_TOLERANCE, SIGNATURES_FILE, changed_positions, load_signatures
from cifarlens.data.pipeline import DataBundle, prepare_data
from cifarlens.engine import forward_tta, resolve_device
from cifarlens.errors import CifarlensError, NotThisDataset
from cifarlens.images import ImageSource, load_image
from cifarlens.models import create_model
from cifarlens.models.registry import check_options
from cifarlens.runs import RunDir


def build_model(cfg: RunConfig, info: DatasetInfo) -> nn.Module:
    check_options(cfg.model.kwargs)
    return create_model(cfg.model.name, num_classes=info.num_classes, in_channels=info.in_channels,
                        **cfg.model.kwargs)


def run_temperature(meta: dict) -> float | None:
    """The temperature recorded in a run's run.json (``calibration.temperature``), or None."""
    calibration = meta.get("calibration") or {}
    t = calibration.get("temperature") if isinstance(calibration, dict) else calibration
    if t is None:
        return None
    # a fit never leaves [0.05, 20]: beyond it run.json was damaged or edited (1e-300 turned every probability
    # into NaN, 1e308 every one into 1/K, and their argmax into one class)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:
        shown = f"{t:.3g}" if isinstance(t, float) else repr(t)
        warnings.warn(f"run.json's calibration temperature {shown} is not one a fit gives (a number from "
                      f"{MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}; damaged or edited): the raw softmax is used; "
                      "`cifarlens calibrate RUN` fits it again")
        return None
    return float(t)


@dataclass
class Prediction:
    """Top-k classes of one image, most probable first."""

    labels: list[str]
    probs: list[float]
    indices: list[int]

    def as_dict(self) -> dict:
        return {"top": [{"label": l, "index": i, "prob": p} for l, i, p in zip(self.labels, self.indices, self.probs)]}


class Run:
    """A trained run, ready to predict: the model (eval mode), its classes and preprocessing.

    ``temperature``: the logits are divided by it before the softmax (None: raw softmax).
    """

    def __init__(self, path: Path, config: RunConfig, info: DatasetInfo, model: nn.Module, device: torch.device,
                 temperature: float | None = None):
        self.path, self.config, self.info, self.model, self.device = path, config, info, model, device
        self.temperature = temperature

    @property
    def calibrated(self) -> bool:
        """Whether :meth:`predict_proba` gives temperature-scaled (calibrated) probabilities."""
        return self.temperature is not None

    def calibration_info(self) -> dict:
        """``{"calibrated": bool, "temperature": T or None}``, for JSON answers and pages."""
        return {"calibrated": self.calibrated, "temperature": self.temperature}

    def scale(self, logits: Tensor) -> Tensor:
        """``logits`` divided by the run's temperature (unchanged when it has none)."""
        return logits if self.temperature is None else logits / self.temperature

    @property
    def classes(self) -> tuple[str, ...]:
        return self.info.classes

    @property
    def status(self) -> str:
        """The run's status in run.json: "finished", or "running", "interrupted", "failed", "diverged"
        (its weights are then the best so far; :meth:`RunDir.unfinished_warning` says what it lacks)."""
        return str(RunDir(self.path).meta().get("status", "finished"))

    def __repr__(self) -> str:
        return (f"Run({str(self.path)!r}, model={self.config.model.name!r}, {len(self.classes)} classes, "
                f"{self.info.image_size}px, status={self.status!r}, temperature={self.temperature})")

    @property
    def tta(self) -> bool:
        """Whether this run's predictions average the image and its mirror image (as its metrics did)."""
        return bool(self.config.train.tta) and self.info.hflip

    @property
    def tta_translate(self) -> int:
        """Pixels of the translations the TTA also averages (train.tta_translate; 0 = flip only,
        and for runs written before the option existed)."""
        return int(self.config.train.tta_translate or 0) if self.tta else 0

    def data(self, data_dir: str | None = None, bundle: DataBundle | None = None) -> DataBundle:
        """The run's dataset with its own seeded train/val split, read from ``data_dir``
        (default: where it was trained from); refuses data with other classes. Downloads only
        when the run was trained on the downloadable official files (never over a copy's place).
        :meth:`split` also checks that the images are the run's own."""
        cfg = self.config.data if data_dir is None else replace(self.config.data, data_dir=data_dir)
        if bundle is None:
            cfg = RunDir(self.path).data_settings(self.config.data, data_dir)
            try:
                bundle = prepare_data(cfg, self.config.train.seed)
            except NotThisDataset as err:  # the reader speaks to `train`: not its --dataset, which no run command takes
                raise err.with_hint(f"{self.path} was trained on {self.config.data.dataset}: point --data-dir at "
                                    "that dataset") from None
        if tuple(bundle.info.classes) != tuple(self.classes):
            raise CifarlensError(
                f"the data in {cfg.data_dir} has classes {list(bundle.info.classes)[:5]}..., but the run was "
                f"trained on {list(self.classes)[:5]}...; point --data-dir at the run's dataset"
            )
        return bundle

    def split(self, name: str, data_dir: str | None = None, bundle: DataBundle | None = None) -> Split:
        """The run's ``name`` split ("train", "val" or "test") of :meth:`data`, after checking the
        images against those the run recorded (:func:`check_same_data`)."""
        return self.checked_split(name, data_dir, bundle)[0]

    def checked_split(self, name: str, data_dir: str | None = None, bundle: DataBundle | None = None
                      ) -> tuple[Split, bool]:
        """:meth:`split`, and whether its images are the run's own (False: others, with a warning)."""
        if name not in ("train", "val", "test"):  # getattr gave the DataBundle's other fields, or an AttributeError
            raise CifarlensError(f"unknown split {name!r}; choose train, val or test")
        bundle = self.data(data_dir, bundle)
        own = check_same_data(RunDir(self.path).meta(), bundle, name, self.path)
        return getattr(bundle, name), own

    def preprocess(self, images: Sequence[ImageSource] | ImageSource | Tensor) -> Tensor:
        """Images (paths, bytes, file objects, PIL images, uint8 numpy arrays; one alone counts as a list of
        one), each resized to the run's size, or a tensor (B, C, H, W) or (C, H, W) at that size, uint8 or
        float in [0, 1] -> normalised float batch. Anything else is a CifarlensError saying what is expected
        (a float tensor of 0-255 values, or one already normalised, gave confident nonsense)."""
        images = _items(images)
        return self._normalized(self._checked(images) if isinstance(images, Tensor) else images)

    def _normalized(self, images: list | Tensor) -> Tensor:
        """:meth:`preprocess` of a list of images, or of a tensor already :meth:`_checked`."""
        if isinstance(images, Tensor):
            batch = images
        elif images:
            batch = torch.stack([load_image(img, self.info.in_channels, self.info.image_size) for img in images])
        else:
            batch = torch.zeros((0, self.info.in_channels, self.info.image_size, self.info.image_size), dtype=torch.uint8)
        return normalize(batch.to(self.device), self.info.mean, self.info.std)

    def _checked(self, x: Tensor) -> Tensor:
        """A tensor of images as :meth:`preprocess` takes it, (B, C, H, W); else a CifarlensError."""
        x = x[None] if x.ndim == 3 else x
        shape = (self.info.in_channels, self.info.image_size, self.info.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise CifarlensError(f"a tensor of images for this run is (B, {', '.join(map(str, shape))}) (B, C, H, W); got "
                                 f"{tuple(x.shape)} (a tensor is not resized: files, PIL images and numpy arrays are)")
        if x.is_floating_point() and x.numel():
            low, high = float(x.min()), float(x.max())
            if not (0.0 <= low and high <= 1.0):  # NaN fails too
                raise CifarlensError(f"a float tensor of images holds pixels / 255, in [0, 1], not normalised; got "
                                     f"values in [{low:g}, {high:g}] (uint8 0-255 is taken as it is)")
        elif x.dtype != torch.uint8 and not x.is_floating_point():
            raise CifarlensError(f"a tensor of images is uint8 (0-255) or float in [0, 1]; got {x.dtype}")
        return x

    @torch.no_grad()
    def predict_logits(self, images: Sequence[ImageSource] | ImageSource | Tensor) -> Tensor:
        """Raw logits (B, num_classes) on the CPU (with the run's TTA, before any temperature), computed
        :data:`PREDICT_CHUNK` images at a time (all at once took 4 GB for 10,000 CIFAR images)."""
        images = _items(images)
        if isinstance(images, Tensor):
            images = self._checked(images)
        parts = [self.logits_of(self._normalized(images[i:i + PREDICT_CHUNK]))  # checked once, above
                 for i in range(0, len(images), PREDICT_CHUNK)]
        return torch.cat(parts) if parts else torch.zeros((0, len(self.classes)))

    @torch.no_grad()
    def logits_of(self, x: Tensor) -> Tensor:
        """:meth:`predict_logits` of a batch already preprocessed (:meth:`preprocess`)."""
        return forward_tta(self.model, x, self.tta, self.tta_translate).float().cpu()

    @torch.no_grad()
    def predict_proba(self, images: Sequence[ImageSource] | Tensor) -> Tensor:
        """Class probabilities (B, num_classes): softmax of the logits, divided by the run's
        temperature when it is calibrated."""
        return self.scale(self.predict_logits(images)).softmax(dim=1)

    def predict(self, images: Sequence[ImageSource] | ImageSource | Tensor, topk: int = 5) -> list[Prediction]:
        """The ``topk`` most probable classes of each image (one path, bytes or PIL image counts as a list of one)."""
        if isinstance(topk, bool) or not isinstance(topk, numbers.Integral) or topk < 1:
            raise CifarlensError(f"topk must be a whole number >= 1, got {topk!r}")
        probs = self.predict_proba(images)
        values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
        return [
            Prediction([self.classes[i] for i in idx.tolist()], vals.tolist(), idx.tolist())
            for vals, idx in zip(values, indices)
        ]


PREDICT_CHUNK = 256  # images decoded and predicted at once by Run.predict*: memory bounded for any number of them


def _items(images) -> list | Tensor:
    """What Run.predict* and preprocess take, as a list of images (one alone, e.g. a path, whose characters
    are no images, is a list of one; a generator is read) or the tensor it is."""
    if isinstance(images, Tensor):
        return images
    if isinstance(images, (str, Path, bytes, bytearray, memoryview, np.ndarray)) or hasattr(images, "getpixel") \
            or hasattr(images, "read"):  # a PIL image, a file object
        return [images]
    try:
        return list(images)
    except TypeError:
        raise CifarlensError(f"images are a list of paths, bytes, file objects, PIL images or numpy arrays, or a "
                             f"tensor; got {type(images).__name__}") from None


def check_same_data(meta: dict, bundle: DataBundle, split: str, run_path: Path) -> bool:
    """Compare ``bundle`` with what a run recorded at training (run.json's ``data_fingerprint``,
    and the images' signatures in :data:`SIGNATURES_FILE`; runs from before them are not checked that way)
    and say whether ``split``'s images are the run's own.

    The validation split is carved from the training labels by seed, so when they changed
    (images added, removed, relabelled) it would now hold images the run trained on: an error for
    "train" and "val"; so is a validation split with other images in its places (files replaced
    or reordered). The same images decoded otherwise (every image's signature within
    :data:`SIGNATURE_TOLERANCE`)
    are the run's own, with a warning; other training or test images give a warning and False:
    the figures are then about those images."""
    recorded, now = meta.get("data_fingerprint") or {}, bundle.fingerprints
    key = "test" if split == "test" else "train"
    if key == "train" and recorded.get("train") == now.get("train") and meta.get("val_split") \
            and meta["val_split"] != bundle.val_digest():  # the same images, split otherwise
        raise CifarlensError(f"the validation split is not the one {run_path} was trained with: its config.yaml's "
                             "train.seed or data.val_fraction differs from the training's (run.json's split_sizes: "
                             f"{meta.get('split_sizes')}); restore them, or train a new run")
    if not recorded.get(key) or not now.get(key) or recorded[key] == now[key]:
        return True
    sizes = meta.get("split_sizes") or {}
    then = sizes.get("test") if key == "test" else \
        sizes["train"] + sizes["val"] if {"train", "val"} <= set(sizes) else None
    count = len(bundle.test) if key == "test" else len(bundle.train) + len(bundle.val)
    labels_changed = recorded.get(f"{key}_labels") != now.get(f"{key}_labels")
    recorded_signatures = None if labels_changed else (load_signatures(run_path / SIGNATURES_FILE) or {}).get(key)
    changed = None if recorded_signatures is None else changed_positions(recorded_signatures, bundle.signatures(key))
    what = f"{count:,} images now, {then:,} then" if isinstance(then, int) and then != count else \
        f"{len(changed):,} of the {count:,} images are others" if changed is not None else \
        f"{count:,} images, as then, but not the same ones"
    if key == "train" and labels_changed:
        raise CifarlensError(
            f"the training images are not those {run_path} was trained on ({what}): its validation split, carved "
            "from them, would now hold images it trained on; point --data-dir at the run's data as it was, or "
            "train a new run")
    kind = "test" if key == "test" else "training"
    if changed is not None and len(changed) == 0:
        warnings.warn(f"the {kind} images' pixels differ a little from those {run_path} was trained and evaluated "
                      f"on, but each image's signature is within {SIGNATURE_TOLERANCE:g} grey level of its own: "
                      "the same images, decoded otherwise; the figures may differ slightly", stacklevel=3)
        return True
    if split == "val" and changed is not None and bundle.val_positions is not None:
        others = int(np.isin(bundle.val_positions, changed).sum())
        if others:
            raise CifarlensError(
                f"{others:,} of the validation split's {len(bundle.val):,} images are not those it held when "
                f"{run_path} was trained (files replaced or reordered): it may now hold images the run trained on; point "
                "--data-dir at the run's data as it was, or train a new run")
        warnings.warn(f"{len(changed):,} of the training images are not those {run_path} was trained on, but none "
                      "in its validation split, whose images are its own (each within "
                      f"{SIGNATURE_TOLERANCE:g} grey level; their pixels may differ a little)", stacklevel=3)
        return True  # other training images only: the validation images are the run's own
    warnings.warn(f"the {kind} images are not those {run_path} was trained and evaluated on ({what}"
                  + ("" if labels_changed or changed is not None else ", with the same labels: files replaced, or "
                     "decoded otherwise") + "): the figures are about these images", stacklevel=3)
    return False


def last_weights(checkpoint: dict) -> dict:
    """The weights a checkpoint's run validates and saves as its best: the EMA's when it has one."""
    ema = checkpoint.get("ema")
    if not ema:
        return checkpoint["model"]
    return {key.removeprefix("module."): value for key, value in ema.items() if key.startswith("module.")}


def load_run(run_dir: str | Path, device: str = "cpu", *, calibrated: bool = True) -> Run:
    """Load a run folder's best weights (safetensors) into its model, in eval mode; with
    ``calibrated`` (default) its probabilities use the run's temperature when it has one."""
    if not isinstance(run_dir, (str, Path)) or not isinstance(device, (str, torch.device)) or \
            not isinstance(calibrated, bool):  # None, 3, "no" (which was true): a TypeError from deep inside, or wrong
        raise CifarlensError(f"load_run(run_dir: a path, device: a str such as 'cpu', calibrated: a bool); got "
                             f"{type(run_dir).__name__}, {device!r}, {calibrated!r}")
    run = RunDir(run_dir)
    run.require_run()
    cfg, info = run.config(), run.info()
    dev = resolve_device(device)
    model = build_model(cfg, info)
    if run.weights.is_file():
        state, source = load_weights(run.weights), run.weights
    elif run.last_checkpoint.is_file():  # no best weights saved (or the file was lost): the last epoch's
        state, source = last_weights(load_checkpoint(run.last_checkpoint)), run.last_checkpoint
        warnings.warn(f"{run.weights} is missing: using the last epoch's weights from {source}, which may not be "
                      "the best epoch's", stacklevel=2)
    else:
        raise CifarlensError(f"{run.path} has no trained weights yet (model.safetensors); train it first")
    load_state_into(model, state, source)
    model.to(dev).eval()
    temperature = run_temperature(run.meta()) if calibrated else None
    return Run(run.path, cfg, info, model, dev, temperature)
