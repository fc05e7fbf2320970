"""What an explanation does to a model, and undoes: a per-model lock, every module in eval mode
with each one's flag restored, a forward hook recording one layer's output and its gradient
for the calling thread only; and the layers themselves (names, lookup, the default layer).
"""

from __future__ import annotations

import difflib
import functools
import threading
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from cifarlens.errors import CifarlensError
from cifarlens.models import unwrap_model

# A map whose layer resolution is this or coarser (in either direction) says little about "where".
COARSE_MAP_SIZE = 2


# ---------------------------------------------------------------------------
# Model state: lock, eval mode, restore
# ---------------------------------------------------------------------------

_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock that serialises explanations on ``model`` (one per model object, freed with it)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextmanager
def exclusive_eval(model: nn.Module) -> Iterator[None]:
    """Hold ``model``'s lock with every module in eval mode; restore each module's own flag after.

    Per module, not ``model.train(was_training)``: a model may mix modes (BatchNorm frozen in
    eval inside a training model), and that mix must survive an explanation.
    """
    with model_lock(model):
        modes = [(m, m.training) for m in model.modules()]
        model.eval()  # explanations describe the deployed model: no dropout, running BN statistics
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode


class LayerRecorder:
    """Forward hook on one layer keeping, for the calling thread only, its output and output gradient.

    Other threads may run the same model meanwhile (the web app predicts while it explains);
    their forwards pass through the hook and are ignored. The output is cloned because an
    in-place op after the layer would otherwise change it; the tensor hook is registered
    before any such op, so it receives the gradient w.r.t. this (unmodified) value.
    """

    def __init__(self, module: nn.Module, name: str):
        self.module, self.name = module, name
        self.thread = threading.get_ident()
        self.activations: list[Tensor] = []  # (B, K, h, w) per call of the layer
        self.gradients: list[Tensor] = []
        self._handle = None

    def __enter__(self) -> "LayerRecorder":
        self._handle = self.module.register_forward_hook(self._forward_hook)
        return self

    def __exit__(self, *exc) -> bool:
        self._handle.remove()
        return False  # never swallow an exception

    def _forward_hook(self, module, inputs, output) -> None:
        if threading.get_ident() != self.thread:
            return
        if not isinstance(output, Tensor) or output.ndim != 4:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise CifarlensError(
                f"layer {self.name!r} outputs {shape}; a CAM needs a convolutional feature map (B, C, h, w), "
                "choose a convolutional layer or block"
            )
        self.activations.append(output.detach().clone())
        if output.requires_grad:
            output.register_hook(self._gradient_hook)

    def _gradient_hook(self, grad: Tensor) -> None:
        self.gradients.append(grad.detach())


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


def layer_names(model: nn.Module) -> list[str]:
    """Dotted names of every submodule (what ``layer=`` accepts), in definition order."""
    return [name for name, _ in unwrap_model(model).named_modules() if name]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)``; an unknown name raises CifarlensError naming a few valid ones."""
    model = unwrap_model(model)
    if isinstance(name, str) and name:
        try:
            return model.get_submodule(name)
        except AttributeError:
            pass
    names = layer_names(model)
    close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.6)
    default = getattr(model, "cam_layer", None)
    some = close or [n for n in names if "." not in n]
    hint = f"did you mean {', '.join(close)}?" if close else f"top-level layers: {', '.join(some[:10])}"
    extra = f" (default: {default})" if default else ""
    raise CifarlensError(f"{type(model).__name__} has no layer {name!r}; {hint}{extra}")


def default_layer(model: nn.Module, sample: Tensor | None = None) -> str:
    """The model's ``cam_layer``; for a model without one, the last layer with a map larger than 2x2.

    The guess runs ``sample`` (one image is enough) through the model and takes the
    last-finishing module whose output is a (B, C, h, w) map with h, w > 2 and that runs once
    per forward, i.e. the last convolutional stage at a useful resolution.
    """
    model = unwrap_model(model)
    name = getattr(model, "cam_layer", None)
    if isinstance(name, str) and name:
        return name
    if sample is None:
        raise CifarlensError(f"{type(model).__name__} has no cam_layer; pass layer= (one of its module names)")
    return _guess_layer(model, sample[:1])


def _guess_layer(model: nn.Module, sample: Tensor) -> str:
    thread = threading.get_ident()
    calls: dict[str, int] = {}
    finished: list[tuple[str, tuple[int, ...]]] = []

    def record(name, module, inputs, output):
        if threading.get_ident() == thread and isinstance(output, Tensor) and output.ndim == 4:
            calls[name] = calls.get(name, 0) + 1
            finished.append((name, tuple(output.shape)))

    handles = [m.register_forward_hook(functools.partial(record, n)) for n, m in model.named_modules() if n]
    try:
        with exclusive_eval(model), torch.inference_mode(False), torch.no_grad():
            model(sample.detach().clone())
    finally:
        for h in handles:
            h.remove()
    once = [(n, s) for n, s in finished if calls[n] == 1]
    fine = [n for n, s in once if min(s[-2:]) > COARSE_MAP_SIZE]
    if fine:
        return fine[-1]
    if once:
        return once[-1][0]  # only coarse maps: explain() will warn
    raise CifarlensError(f"{type(model).__name__} has no layer with a (B, C, h, w) output; pass layer=")
