"""The model registry: ``@register_model``, ``create_model``, ``list_models``, plus wrapper helpers."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from cifarlens.errors import CifarlensError
from cifarlens.registry import Registry

# name -> factory(num_classes, in_channels, **options) returning a ClassifierBase
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
# name -> (recipe on a CPU, recipe on a GPU): each family's default training recipe, declared
# where it is registered (as timm keeps a default config beside each model)
MODEL_RECIPES: dict[str, tuple[str, str]] = {}
# the model a run gets without --model: sized for the device it trains on
DEFAULT_MODELS = {"cpu": "fastnet_cpu", "cuda": "fastnet"}


def register_model(name: str | None = None, *, recipe: str = "modern", gpu_recipe: str | None = None):
    """Decorator registering a model factory under ``name`` (default: the function's name).

    ``recipe`` is the training recipe a run of this model gets without ``--recipe`` (on a
    GPU ``gpu_recipe``, when the family has a GPU-sized one); a pretrained or ``--weights``
    start gets ``finetune`` whatever the family says.
    """

    def decorator(factory):
        key = name or factory.__name__
        MODELS.register(key)(factory)
        MODEL_RECIPES[key] = (recipe, gpu_recipe or recipe)
        return factory

    return decorator


def default_model(device_type: str) -> str:
    """The model a run gets without ``--model`` on a ``device_type`` ("cpu", "cuda") device."""
    return DEFAULT_MODELS.get(device_type, DEFAULT_MODELS["cpu"])


def default_recipe(name: str, device_type: str) -> str:
    """Model ``name``'s own recipe on a ``device_type`` device."""
    MODELS.get(name)  # an unknown name is a one-line error listing the models
    cpu, gpu = MODEL_RECIPES[name]
    return gpu if device_type == "cuda" else cpu

_ALWAYS = ("num_classes", "in_channels")  # passed by create_model itself, not options


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return MODELS.names()


def check_options(kwargs: dict) -> None:
    """model.kwargs may not set what create_model passes itself (Python refused the call with
    "got multiple values for keyword argument", a traceback)."""
    reserved = sorted(set(kwargs) & set(_ALWAYS))
    if reserved:
        raise CifarlensError(f"model.kwargs cannot set {', '.join(reserved)}: it comes from the dataset "
                             "(its classes, its images' channels)")


def create_model(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build a registered model; ``kwargs`` are the factory's options (e.g. ``depths`` for LensNet)."""
    factory = MODELS.get(name)
    params = inspect.signature(factory).parameters
    # a factory with **kwargs cannot be checked here; every registered one names its options
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        options = [p for p in params if p not in _ALWAYS]
        unknown = sorted(set(kwargs) - set(options))
        if unknown:
            raise CifarlensError(
                f"model {name!r} has no option {', '.join(map(repr, unknown))}; "
                f"its options are: {', '.join(options) or '(none)'}"
            )
    try:
        return factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except (TypeError, ValueError) as err:
        if not kwargs:  # no option of the user's in play: a bug, with its traceback
            raise
        raise CifarlensError(f"model {name!r} cannot be built with the options {kwargs} ({type(err).__name__}: "
                             f"{err}); its options and their defaults are in docs/models-and-recipes.md") from None


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DataParallel/DDP, ``torch.compile`` and AveragedModel (EMA/SWA) wrappers, however nested."""
    while True:
        if isinstance(model, (DataParallel, DistributedDataParallel, AveragedModel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            # torch.compile returns an OptimizedModule holding the original as _orig_mod
            model = model._orig_mod
        else:
            return model


def model_info(model: nn.Module) -> dict[str, Any]:
    """Plain facts about a (possibly wrapped) model, for logs, reports and the web app."""
    m = unwrap_model(model)
    return {
        "architecture": type(m).__name__,
        "params": sum(p.numel() for p in m.parameters()),
        "trainable_params": sum(p.numel() for p in m.parameters() if p.requires_grad),
        # conv + linear layers; for the option-A CIFAR ResNets this is the paper's depth 6n+2
        "weight_layers": sum(isinstance(x, (nn.Conv2d, nn.Linear)) for x in m.modules()),
        "num_classes": getattr(m, "num_classes", None),
        "in_channels": getattr(m, "in_channels", None),
        "cam_layer": getattr(m, "cam_layer", None),
    }


def check_input_size(model: nn.Module, in_channels: int, sides: Iterable[int], name: str) -> None:
    """Raise :class:`CifarlensError` when ``model`` (``name``) cannot take images of one of these
    widths, e.g. 8x8 images for a network that halves them four times: one zero image each, in
    eval mode, so a run can refuse them before it creates its folder."""
    import torch

    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    try:
        for side in sorted(set(sides)):
            try:
                with torch.no_grad():
                    model(torch.zeros(1, in_channels, side, side, device=device))
            except RuntimeError as err:
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                raise CifarlensError(f"model {name} cannot take {side}x{side} images ({first}); give larger "
                                     "images (data.image_size, train.progressive_res) or another model") from None
    finally:
        model.train(was_training)


def forward_flops(name: str, num_classes: int, in_channels: int, image_size: int, **kwargs: Any) -> int | None:
    """FLOPs (a multiply-add counts 2) of one forward pass of one image through model ``name``.

    Counted by torch's FlopCounterMode on the meta device: shapes only, no weights, no compute,
    so it costs well under a second even for ResNet-50. None when the counter cannot run the model.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            model = create_model(name, num_classes, in_channels, **kwargs).eval()
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(torch.empty(1, in_channels, image_size, image_size))
    except (RuntimeError, NotImplementedError, TypeError):  # an op without a meta kernel: leave the figure out
        return None
    return int(counter.get_total_flops())
