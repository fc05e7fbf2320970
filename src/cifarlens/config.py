"""Typed configuration: frozen dataclasses, overlaid by a YAML file, then by flags.

Precedence: dataclass defaults < recipe defaults (for ``train`` fields left at
``None``) < ``--config FILE.yaml`` < command-line flags. A model and recipe left unset are
chosen for the device and the model (:func:`cifarlens.recipes.resolve_choices`). Unknown keys and values
of the wrong type are errors. The *resolved* config (no ``None`` left in
``train``) is written into every run folder and checkpoint, so any run can be
repeated from its own files.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from cifarlens.errors import CifarlensError
from cifarlens.registry import did_you_mean


# What DataConfig's None fields mean where no recipe sets them (a recipe's "data" dict may, e.g. the
# fixed-budget fast_cpu_10min: see cifarlens.recipes.resolve_choices).
DATA_DEFAULTS = {"val_fraction": 0.1, "crop_padding": 4, "flip": "random"}
LOADERS = ("batched", "perimage")  # DataConfig.loader


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "cifar10"
    data_dir: str = "data"
    download: bool = True
    # carved from train (stratified, seeded) unless the dataset ships val/; 0 = no validation split:
    # all images train, no validation pass, the final weights are kept, no calibration (fixed budgets).
    # None here and below: the recipe's, else DATA_DEFAULTS (0.1; fast_cpu_10min: 0)
    val_fraction: float | None = None
    augment: str | None = None  # see cifarlens.data.augment.AUGMENT_LEVELS; None = the dataset's default
    # added to the level, see cifarlens.data.policies: cutout, erasing, autoaugment, randaugment,
    # trivialaugment, mixup, cutmix, noise (CLI: --augment standard+cutout+autoaugment)
    policies: list[str] = field(default_factory=list)
    cutout_size: int = 16  # side of the Cutout square in pixels (DeVries & Taylor 2017: 16 for CIFAR-10, 8 for CIFAR-100)
    erasing_prob: float = 0.5  # RandomErasing: share of images erased (Zhong et al. 2017)
    randaugment_n: int = 2  # RandAugment: operations per image ...
    randaugment_m: int = 9  # ... at this magnitude bin of 0..30 (torchvision's defaults)
    mixup_alpha: float = 1.0  # MixUp: lambda ~ Beta(alpha, alpha) per image (Zhang et al. 2018: 1 for CIFAR)
    mixup_prob: float = 1.0  # share of images mixed up (of those not cut-mixed when both are on)
    cutmix_alpha: float = 1.0  # CutMix: lambda ~ Beta(alpha, alpha) per image (Yun et al. 2019: 1 for CIFAR)
    cutmix_prob: float = 0.5  # share of images cut-mixed (Yun et al. 2019 on CIFAR)
    noise_std: float = 0.1  # noise: Gaussian noise of std U(0, noise_std) (in [0, 1] pixel units) ...
    noise_prob: float = 0.5  # ... on this share of the images
    image_size: int | None = None  # None = the dataset's native size (imagefolder: 32)
    crop_padding: int | None = None  # pixels of padding for the random crop (4; fast_cpu_10min: 2)
    # "random" | "alternating": each image mirrored every other epoch (Jordan 2024); None: as val_fraction
    flip: str | None = None
    loader: str = "batched"  # "batched": augment whole batches on the device; "perimage": torchvision in workers
    workers: int = 2  # DataLoader workers for the per-image loader


def with_data_defaults(cfg: DataConfig) -> DataConfig:
    """``cfg`` with the fields left unset (None) at :data:`DATA_DEFAULTS`, for code that reads a
    config no recipe has resolved."""
    return replace(cfg, **{key: value for key, value in DATA_DEFAULTS.items() if getattr(cfg, key) is None})


@dataclass(frozen=True)
class ModelConfig:
    name: str | None = None  # None: the device's default model (fastnet_cpu on a CPU, fastnet on CUDA)
    # Extra constructor arguments, e.g. {"widths": [32, 64, 128], "depths": [2, 2, 2], "dropout": 0.2}
    kwargs: dict = field(default_factory=dict)
    # Starting weights, used when a training run starts (see cifarlens.models.weights):
    pretrained: bool = False  # ImageNet weights from torchvision (resnet18, resnet50, efficientnet_b0)
    weights: str | None = None  # a safetensors / PyTorch state dict file (torchvision or cifarlens layout)


@dataclass(frozen=True)
class TrainConfig:
    """Training hyperparameters. ``None`` means "take it from the recipe"."""

    # None: the model's own recipe (declared where it is registered; fast_cpu / fast for FastNet,
    # modern for the ResNet families and LensNet), or finetune for a pretrained / --weights start
    recipe: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None  # peak learning rate
    optimizer: str | None = None  # "adam" | "sgd" | "muon" (Muon on conv filters, Nesterov SGD on the rest)
    momentum: float | None = None  # SGD and muon
    nesterov: bool | None = None  # SGD and muon
    weight_decay: float | None = None
    label_smoothing: float | None = None
    schedule: str | None = None  # "plateau" | "onecycle" | "cosine" | "constant" | "multistep"
    milestones: list[float] | None = None  # multistep: epochs at which the lr is multiplied by ...
    gamma: float | None = None  # ... this factor (0.1: divided by 10)
    warmup_epochs: float | None = None  # linear warm-up before onecycle/cosine decay
    plateau_factor: float | None = None  # ReduceLROnPlateau: lr *= factor ...
    plateau_patience: int | None = None  # ... after this many epochs without val-loss improvement
    early_stopping: int | None = None  # stop after this many epochs without val-loss improvement; 0 = off
    grad_clip: float | None = None  # max gradient norm; 0 = off
    ema_decay: float | None = None  # exponential moving average of the weights per step; 0 = off
    tta: bool | None = None  # evaluate on the image and its mirror image, averaging logits
    tta_translate: int | None = None  # with tta: also the images moved by this many pixels (airbench94); 0 = off
    muon_lr: float | None = None  # optimizer muon: peak lr of the convolution filters (Muon); 0 = lr
    muon_momentum: float | None = None  # optimizer muon: the filters' momentum; 0 = momentum
    muon_renorm: bool | None = None  # optimizer muon: filters rescaled to norm sqrt(out) before each step
    muon_ns_steps: int | None = None  # optimizer muon: Newton-Schulz iterations per update (the post: 5, airbench: 3)
    whiten_bias_epochs: int | None = None  # FastNet's whitening bias trains for this many epochs only; 0 = always
    # the middle epochs leave out this fraction of the easier half of the images (lowest last loss),
    # the rest of that half weighted up (InfoBatch, cifarlens.data.pruning); 0 = off
    prune_easy: float | None = None
    # progressive resizing: the first epoch trains on images scaled down to this width (pixels), the
    # width grows linearly to full over progressive_epochs epochs (see engine.progressive_side); 0 = off
    progressive_res: int | None = None
    progressive_epochs: int | None = None
    freeze_epochs: int | None = None  # first epochs train the head only (backbone frozen, its BN in eval); 0 = off
    backbone_lr_scale: float | None = None  # backbone lr = lr * this (the head gets lr); 1 = same
    # after training, fit a temperature on the validation split (Guo et al. 2017), used by evaluate,
    # predict, the API, serve and export unless they are told --no-calibration
    calibrate: bool = True
    # seconds of training to fit the run into (cifarlens.budget): steps are timed first and the
    # recipe's schedule is stretched or shrunk to the epochs that fit; 0 = off (the recipe's epochs)
    time_budget: float = 0.0
    # the share of the last epoch's batches that are trained (the schedule ends with them): a time
    # budget sets it to spend the time that whole epochs leave over; 1 = the whole epoch
    last_epoch_fraction: float = 1.0
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    amp: bool = True  # mixed precision on CUDA (bf16 when supported, else fp16 + grad scaler)
    # bf16 autocast on CPU too; None: on where the CPU computes bf16 natively (AVX512-BF16 or AMX),
    # where it trains ~1.6x faster, and off elsewhere, where it is emulated and slower
    cpu_amp: bool | None = None
    channels_last: bool = True  # memory format on CUDA
    compile: bool = False  # torch.compile the model
    sync_bn: bool = False  # data-parallel on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm)


@dataclass(frozen=True)
class TrackConfig:
    """Experiment tracking (see cifarlens.tracking); it records a run and never changes its results."""

    loggers: list[str] = field(default_factory=list)  # "tensorboard" (events in RUN/tensorboard/), "mlflow"
    # MLflow server or store; None: $MLFLOW_TRACKING_URI, else MLflow's own default in the working
    # directory (sqlite:///mlflow.db, artifacts in ./mlruns/), where `mlflow ui` finds it
    tracking_uri: str | None = None
    experiment: str = "cifarlens"  # the MLflow experiment the runs go into


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    track: TrackConfig = field(default_factory=TrackConfig)


def _section_classes() -> dict[str, type]:
    return {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "track": TrackConfig}


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Validate (and gently coerce int -> float) a value against a field annotation."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except CifarlensError as err:
                errors.append(err)
        raise errors[0]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):  # model.kwargs: keyword arguments
                raise CifarlensError(f"config key {key!r} takes names as keys, got {next(k for k in value if not isinstance(k, str))!r}")
            return dict(value)
    elif origin is list:  # list[str]; "a,b" is read as [a, b], as the CLI reads its flags
        (item,) = typing.get_args(hint)
        if isinstance(value, str) and item is str:
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            return [_check_type(v, item, key) for v in value]
    else:  # pragma: no cover - only our own annotations reach here
        raise TypeError(f"unsupported annotation {hint!r} for {key}")
    name = getattr(hint, "__name__", str(hint))
    quote = " (YAML read it as a boolean: quote it, e.g. 'no')" if hint is str and isinstance(value, bool) else \
        " (YAML read it as a number: quote it, e.g. '1e3')" if hint is str and isinstance(value, (int, float)) else \
        " (in seconds, e.g. 600; the --time-budget flag reads 10m)" if key.endswith("time_budget") else ""
    raise CifarlensError(f"config key {key!r} must be {name}, got {value!r}{quote}")


def _overlay(section: Any, values: dict, section_name: str) -> Any:
    known = typing.get_type_hints(type(section))
    updates = {}
    for key, value in values.items():
        if key not in known:
            hint = did_you_mean(key, list(known), prefix=f"{section_name}.")
            raise CifarlensError(
                f"unknown config key '{section_name}.{key}'{hint}; known keys: {', '.join(sorted(known))}"
            )
        updates[key] = _check_type(value, known[key], f"{section_name}.{key}")
    return replace(section, **updates)


def absolute_data_dir(data: DataConfig, data_dir: str | None = None) -> DataConfig:
    """``data`` with its folder (or ``data_dir``, when given) absolute, ``~`` expanded: what a run
    records, so that evaluate, serve, --resume and a tune study's best.yaml work from any folder."""
    return dataclasses.replace(data, data_dir=os.path.abspath(os.path.expanduser(data_dir or data.data_dir)))


def merge(cfg: RunConfig, values: dict) -> RunConfig:
    """Overlay a nested ``{"data": {...}, "model": {...}, "train": {...}, "track": {...}}`` dict."""
    if not isinstance(values, dict):
        raise CifarlensError(f"a config must be a mapping with sections {'/'.join(_section_classes())}")
    classes = _section_classes()
    updates = {}
    for section_name, section_values in values.items():
        if section_name not in classes:
            raise CifarlensError(
                f"unknown config section {section_name!r}; known sections: {', '.join(classes)}"
            )
        if section_values is None:
            continue
        if not isinstance(section_values, dict):
            raise CifarlensError(f"config section {section_name!r} must be a mapping")
        updates[section_name] = _overlay(getattr(cfg, section_name), section_values, section_name)
    return replace(cfg, **updates)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error: PyYAML keeps the last
    silently, so a second ``lr:`` further down a file would win unseen."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor": its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # `{[1]: 2}`: Python's dict would raise a TypeError
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key cannot be a list or a mapping (line {key_node.start_mark.line + 1})",
                    key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """yaml.safe_dump, quoting the strings that :class:`_UniqueKeyLoader` would read as numbers."""


# YAML 1.1 (PyYAML) reads 5e-4 and 1e3 as strings: it wants a dot in a float. They are numbers,
# as in YAML 1.2 and Python, everywhere a config is read (model.kwargs are not typed, so nothing
# turned them into numbers later), and a string such as a folder named 1e3 is written quoted
_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
for _cls in (_UniqueKeyLoader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def dump_yaml(values, **options) -> str:
    """``values`` as YAML that :func:`load_yaml` reads back the same (options as yaml.safe_dump's)."""
    return yaml.dump(values, Dumper=_Dumper, **options)


def load_yaml(path: str | Path, what: str = "config file") -> Any:
    """The YAML file at ``path`` ({} when empty; a file of ``false`` or ``[]`` gives that, for the
    caller to refuse); a missing or malformed file is one error naming ``what``."""
    path = Path(path)
    if path.is_dir():
        raise CifarlensError(f"{what} {path} is a folder; give a YAML file")
    if not path.is_file():
        raise CifarlensError(f"{what} {path} not found")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.constructor.ConstructorError as err:
        raise CifarlensError(f"{what} {path}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise CifarlensError(f"{what} {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except UnicodeDecodeError as err:  # e.g. UTF-16, as PowerShell's > writes
        raise CifarlensError(f"{what} {path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8"
                             ) from None
    _check_expanded_size(values, f"{what} {path}")
    return {} if values is None else values


MAX_YAML_ITEMS = 100_000  # values in a config once its aliases are expanded (a 550-byte file held 10^8)


def _check_expanded_size(value, where: str) -> None:
    """Refuse YAML whose aliases (``*a``) expand to more than MAX_YAML_ITEMS values: the nested
    references of an "alias bomb" cost nothing to load, but hundreds of MB and seconds to check
    and print (an error message of 358 MB), and more for every level."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_YAML_ITEMS:
            raise CifarlensError(f"{where} holds more than {MAX_YAML_ITEMS:,} values once its aliases (*name) are "
                                 "expanded; write the values out")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_assignment(text: str, cfg: RunConfig | None = None) -> dict:
    """``"train.weight_decay=5e-4"`` -> ``{"train": {"weight_decay": 0.0005}}`` (value parsed as YAML).
    A key inside a mapping setting, ``"model.kwargs.widths=[32,64,128]"``, sets that key alone in
    ``cfg``'s mapping (the others kept), where ``model.kwargs={...}`` replaces the whole mapping."""
    key, sep, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise CifarlensError(f"--set expects SECTION.KEY=VALUE (e.g. train.weight_decay=5e-4), got {text!r}")
    if not raw.strip():  # `--set train.epochs=$EPOCHS` with EPOCHS unset: null, the recipe's value, silently
        raise CifarlensError(f"--set {text!r} has no value; give one (null: the recipe's default)")
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.constructor.ConstructorError as err:
        raise CifarlensError(f"--set {text!r}: {err.problem}") from None
    except yaml.YAMLError:
        raise CifarlensError(f"--set {text!r}: value is not valid YAML") from None
    _check_expanded_size(value, f"--set {key.strip()}")
    head, inner, sub = name.partition(".")
    if inner and cfg is not None and hasattr(cfg, section):  # an unknown section: merge names the known ones
        mapping = getattr(getattr(cfg, section), head, None)
        if not isinstance(mapping, dict) or not sub or "." in sub:
            raise CifarlensError(f"--set {key.strip()}: only a mapping setting takes a key after its name, one "
                                 "level deep (model.kwargs.widths=[32,64,128])")
        return {section: {head: {**mapping, sub: value}}}
    return {section: {name: value}}


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(values: dict) -> RunConfig:
    return merge(RunConfig(), values)


def save_yaml(cfg: RunConfig, path: Path, header: str = "") -> None:
    """Write ``cfg`` as YAML, after ``header`` (comment lines, e.g. why a value was chosen)."""
    from cifarlens.io import atomic_write_text

    atomic_write_text(path, header + dump_yaml(to_dict(cfg), sort_keys=False))
