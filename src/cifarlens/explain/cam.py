"""Class activation maps behind one small interface: a method registry, :func:`explain`, :func:`explain_run`.

The method-specific math (how the target layer's channels are weighted) comes from
pytorch-grad-cam: each method is one of its classes, and we call its ``get_cam_image``.
The pipeline around it is ours, because the library's own ``__call__`` has side effects
that a model shared with a web app or a training loop cannot afford (grad-cam 1.5.x):

* ``BaseCAM.__init__`` puts the whole model in eval mode and never restores it;
* its hooks record every forward through the layer, from any thread, and are removed
  only by its ``with`` block or by garbage collection;
* its ``__exit__`` prints and swallows ``IndexError`` (e.g. a target class out of range);
* its gradient hook records nothing when the layer output does not require grad (frozen
  backbone, caller inside ``torch.no_grad``); ``backward`` then fails, or the method reads
  ``None`` gradients;
* ``model.zero_grad()`` + ``loss.backward()`` wipe and overwrite the caller's ``.grad``;
* on CPU the stored activation shares memory with the layer output, so an in-place op
  after the layer (``ReLU(inplace=True)``) changes it: CPU and GPU maps differ;
* an all-zero map comes back as zeros, with nothing to tell it from a real map;
* Score-CAM prints a progress bar per image.

:func:`explain` on a batch (B, C, H, W):

1. under a per-model lock, every module in eval mode, grad enabled (also inside a caller's
   ``no_grad``/``inference_mode``), the input cloned with ``requires_grad`` so activations carry
   a graph even when every parameter is frozen (parameter flags are never touched);
2. one forward with a hook on the target layer that, for the calling thread only, keeps a
   copy of its output (B, K, h, w) and puts a tensor hook on it for the gradient;
3. ``autograd.grad`` of the summed target logits w.r.t. the input (no parameter ``.grad`` is
   written); the tensor hook receives d(target logit)/d(activation);
4. the method's math: the library's ``get_cam_image`` -> raw map (B, h, w);
5. ReLU, bilinear upsampling to (H, W), per-image min-max to [0, 1] (what pytorch-grad-cam
   returns, up to its 1e-7 epsilon); maps with no spatial variation are zeroed and flagged ``empty``.

Hooks are removed and training flags restored on every exit, exceptions included.

The method registry is :mod:`cifarlens.explain.methods`; the lock, eval mode, hook and layer
lookup are :mod:`cifarlens.explain.hooks`; this module holds the result, the maths around the
method and :func:`explain` itself.
"""

from __future__ import annotations

import difflib
import numbers
import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cifarlens.errors import CifarlensError
from cifarlens.explain.hooks import (  # noqa: F401  (re-exported: they lived here)
    COARSE_MAP_SIZE,
    LayerRecorder,
    default_layer,
    exclusive_eval,
    get_layer,
    layer_names,
    model_lock,
)
from cifarlens.explain.methods import (  # noqa: F401  (re-exported: they lived here)
    METHODS,
    CamMethod,
    list_methods,
    register_method,
)
from cifarlens.models import unwrap_model

# A ReLU'd map whose spread (max - min) is below this fraction of its peak is flat: no evidence of "where".
FLAT_TOLERANCE = 1e-6

Target = Union[None, int, str, Sequence[Union[int, str]], Tensor]


class CoarseMapWarning(UserWarning):
    """The target layer's maps are 2x2 or smaller: the heatmap is too coarse to localise anything."""


# ---------------------------------------------------------------------------
# Method registry
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------


@dataclass
class Explanation:
    """Maps for a batch, with what the model said about each image.

    ``empty[i]`` is True where the ReLU'd raw map was zero everywhere (or had no spatial
    variation at all); ``maps[i]`` is then all zeros and must be shown as "no evidence",
    never drawn as a confident heatmap.
    """

    maps: Tensor  # (B, H, W) float32 in [0, 1], at input resolution, on CPU
    targets: Tensor  # (B,) int64, the class each map explains
    predictions: Tensor  # (B,) int64, argmax of the logits
    probs: Tensor  # (B, num_classes) float32, softmax of the logits
    empty: Tensor  # (B,) bool
    method: str
    layer: str
    layer_size: tuple[int, int] = (0, 0)  # (h, w) of the layer's map before upsampling

    def __len__(self) -> int:
        return int(self.maps.shape[0])

    @property
    def confidence(self) -> Tensor:
        """(B,) probability of the predicted class."""
        return self.probs.gather(1, self.predictions[:, None])[:, 0]

    @property
    def target_probs(self) -> Tensor:
        """(B,) probability of the explained (target) class."""
        return self.probs.gather(1, self.targets[:, None])[:, 0]

    def select(self, index) -> "Explanation":
        """The explanations of ``index`` (a slice, list or tensor of positions)."""
        if isinstance(index, int):
            index = [index]
        return Explanation(self.maps[index], self.targets[index], self.predictions[index], self.probs[index],
                           self.empty[index], self.method, self.layer, self.layer_size)

    @staticmethod
    def cat(parts: Sequence["Explanation"]) -> "Explanation":
        """Concatenate explanations of consecutive batches (same method and layer)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        if any((p.method, p.layer) != (first.method, first.layer) for p in parts):
            raise ValueError("explanations of different methods or layers cannot be concatenated")
        return Explanation(*(torch.cat([getattr(p, f) for p in parts]) for f in
                             ("maps", "targets", "predictions", "probs", "empty")),
                           first.method, first.layer, first.layer_size)


# ---------------------------------------------------------------------------
# explain
# ---------------------------------------------------------------------------


def _check_images(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise CifarlensError(f"explain needs a batch of images (B, C, H, W), got {shape}")
    if not images.is_floating_point():
        raise CifarlensError(
            f"explain needs normalised float images, got {images.dtype}; use explain_run(run, images) "
            "or run.preprocess(images) for uint8 images or files"
        )
    if images.shape[0] == 0:
        raise CifarlensError("no images to explain")
    return images


def _resolve_targets(target, logits: Tensor) -> Tensor:
    """None -> predicted class; an int -> that class for every image; a sequence -> one per image."""
    batch, num_classes = logits.shape
    if target is None:
        return logits.detach().argmax(dim=1)
    if isinstance(target, Tensor):
        t = target.detach().to(device=logits.device).long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
    elif isinstance(target, (bool, str)):
        raise CifarlensError(f"target must be a class index (int) or None here, got {target!r}; "
                             "class names are resolved by explain_run")
    elif isinstance(target, int):
        t = torch.full((batch,), target, dtype=torch.long, device=logits.device)
    else:
        values = list(target)
        if any(isinstance(v, (bool, str)) or not isinstance(v, int) for v in values):
            raise CifarlensError(f"targets must be class indices (ints), got {values!r}")
        t = torch.tensor(values, dtype=torch.long, device=logits.device)
    if t.shape[0] != batch:
        raise CifarlensError(f"{t.shape[0]} targets for {batch} images; give one per image, one for all, or None")
    if bool(((t < 0) | (t >= num_classes)).any()):
        raise CifarlensError(f"target class {t.tolist()} out of range: the model has {num_classes} classes "
                             f"(0..{num_classes - 1})")
    return t


def normalise_maps(raw: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Raw maps (B, h, w) -> (maps (B, H, W) in [0, 1], empty (B,) bool).

    ReLU (only evidence *for* the target counts), bilinear upsampling (align_corners=False,
    like OpenCV's resize in pytorch-grad-cam and Captum's ``LayerAttribution.interpolate``),
    then per-image min-max. Upsampling is linear and min-max is affine, so the order of the
    two does not matter. A map with no spread is set to zero and flagged ``empty``.
    """
    cam = raw.float().clamp(min=0)  # (B, h, w)
    flat = cam.flatten(1)
    peak, low = flat.amax(dim=1), flat.amin(dim=1)
    tiny = torch.finfo(torch.float32).tiny
    empty = (peak - low) <= torch.clamp(FLAT_TOLERANCE * peak, min=tiny)  # all zero, or constant
    up = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]  # (B, H, W)
    lo = up.flatten(1).amin(dim=1)[:, None, None]
    hi = up.flatten(1).amax(dim=1)[:, None, None]
    maps = ((up - lo) / (hi - lo).clamp(min=tiny)).clamp_(0.0, 1.0)
    maps[empty] = 0.0
    return maps, empty


def explain(
    model: nn.Module,
    images: Tensor,
    *,
    method: str = "gradcam",
    target: Target = None,
    layer: str | None = None,
) -> Explanation:
    """Class activation maps of ``images`` (normalised float (B, C, H, W)) for ``target`` classes.

    ``target``: None (each image's predicted class), a class index for every image, or one
    index per image. ``layer``: a dotted submodule name (default ``model.cam_layer``).
    Safe to call from several threads on one model; the model's training flags, parameters'
    ``requires_grad`` and ``.grad`` are left as they were. Errors are raised, never printed.
    """
    spec = METHODS.get(method)
    model = unwrap_model(model)
    images = _check_images(images)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)  # the model's input layer
    if first is not None and images.shape[1] != first.in_channels:  # torch's error named a layer's weight shape
        raise CifarlensError(f"the model takes {first.in_channels}-channel images; got {images.shape[1]} channel(s) "
                             f"{tuple(images.shape)}")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = images.device
    with exclusive_eval(model), torch.inference_mode(False), torch.enable_grad():
        # clone: a normal tensor even when the caller made it under inference_mode
        x = images.detach().to(device).clone()  # (B, C, H, W)
        name = layer if layer is not None else default_layer(model, x)
        module = get_layer(model, name)
        cam = spec.cam_class(model, [module])  # used for its math only (get_cam_image) ...
        cam.activations_and_grads.release()  # ... so its own hooks go at once: ours replace them
        uses_gradients = bool(cam.uses_gradients)
        # The input carries the graph, so the layer output has a gradient even when every
        # parameter is frozen; parameters themselves are never touched.
        x.requires_grad_(uses_gradients)
        with LayerRecorder(module, name) as rec:
            logits = model(x)
            if not isinstance(logits, Tensor) or logits.ndim != 2:
                shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise CifarlensError(f"explain needs a classifier returning logits (B, num_classes), got {shape}")
            targets = _resolve_targets(target, logits)
            if len(rec.activations) != 1:
                raise CifarlensError(
                    f"layer {name!r} ran {len(rec.activations)} times in one forward pass; a CAM needs a layer "
                    "that runs exactly once (not a shared module such as a reused ReLU)"
                )
            grads = None
            if uses_gradients:
                if not logits.requires_grad:
                    raise CifarlensError("the model's output does not depend differentiably on its input; "
                                         f"use a gradient-free method (eigencam, scorecam) instead of {method}")
                score = logits.gather(1, targets[:, None]).sum()  # images are independent in eval mode
                # w.r.t. the input, not backward(): no parameter .grad is written
                torch.autograd.grad(score, x, allow_unused=True)
                if len(rec.gradients) != 1:
                    raise CifarlensError(
                        f"the output of layer {name!r} does not influence the logits through a gradient; "
                        f"choose a layer on the path to the classifier or a gradient-free method"
                    )
                grads = rec.gradients[0].float().cpu().numpy()
        acts = rec.activations[0]  # (B, K, h, w)
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        raw = cam.get_cam_image(x.detach(), module, [ClassifierOutputTarget(int(t)) for t in targets],
                                acts.float().cpu().numpy(), grads, False)
    raw = torch.as_tensor(raw, dtype=torch.float32)  # (B, h, w)
    if raw.shape != acts.shape[:1] + acts.shape[2:]:
        raise RuntimeError(f"{method} returned maps of shape {tuple(raw.shape)} for activations {tuple(acts.shape)}")
    if not torch.isfinite(raw).all():
        raise CifarlensError(f"{method} produced non-finite values at layer {name!r}; "
                             "check that the model's outputs are finite for these images")
    h, w = acts.shape[-2:]
    if min(h, w) <= COARSE_MAP_SIZE:
        warnings.warn(CoarseMapWarning(
            f"layer {name!r} gives {h}x{w} maps: too coarse to localise; choose an earlier layer"), stacklevel=2)
    maps, empty = normalise_maps(raw, tuple(images.shape[-2:]))
    probs = logits.detach().float().softmax(dim=1).cpu()
    return Explanation(maps=maps, targets=targets.cpu(), predictions=probs.argmax(dim=1), probs=probs,
                       empty=empty, method=method, layer=name, layer_size=(int(h), int(w)))


# ---------------------------------------------------------------------------
# Runs: files and class names
# ---------------------------------------------------------------------------


def resolve_class(target, classes: Sequence[str]):
    """A class name, index, sequence of them, or None -> index / list of indices / None."""
    if target is None:
        return None
    if isinstance(target, (str, numbers.Integral)) and not isinstance(target, bool):  # numpy's int64 too
        return _class_index(target, classes)
    if isinstance(target, Tensor):
        return target
    return [_class_index(t, classes) for t in target]


def _class_index(target, classes: Sequence[str]) -> int:
    if isinstance(target, str):
        target = unicodedata.normalize("NFC", target)  # class names are NFC (a folder's name from a Mac is NFD)
        if target in classes:
            return list(classes).index(target)
        number = re.fullmatch(r"\s*-?[0-9]+\s*", target)  # ASCII digits: "²".isdigit() is true, int("²") fails
        if number and 0 <= int(target) < len(classes):
            return int(target)  # numeric class names were matched above; this is an index
        if number:
            raise CifarlensError(f"class index {target.strip()} out of range: the model has {len(classes)} classes "
                                 f"(0..{len(classes) - 1}), and none is named {target!r}")
        close = difflib.get_close_matches(target, list(classes), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        listed = ", ".join(classes[:20]) + (f", ... ({len(classes)} in all)" if len(classes) > 20 else "")
        raise CifarlensError(f"unknown class {target!r}; {hint}classes: {listed}")
    if isinstance(target, bool) or not isinstance(target, numbers.Integral) or not 0 <= target < len(classes):
        raise CifarlensError(f"class index {target!r} out of range: the model has {len(classes)} classes")
    return int(target)


def explain_run(run, images, *, method: str = "gradcam", target=None, layer: str | None = None) -> Explanation:
    """:func:`explain` for a loaded :class:`cifarlens.api.Run`, with its own preprocessing.

    ``images``: file paths, bytes or PIL images (or one of them), or a uint8 tensor (B, C, H, W)
    or (C, H, W). ``target``: None (predicted class), a class name or index, or one per image.
    ``predictions`` and ``probs`` are the run's own (its TTA, calibrated when it is), as
    :meth:`Run.predict` gives them; the map is of the plain image.
    """
    from PIL import Image

    if isinstance(images, (str, Path, bytes, Image.Image)):
        images = [images]
    if isinstance(images, Tensor) and images.ndim == 3:
        images = images[None]
    x = run.preprocess(images)  # normalised with the run's own mean/std
    # the prediction and its probability as predict, evaluate and serve give them (the run's TTA and
    # temperature); the map explains the predicted class of that, unless told another
    probs = run.scale(run.logits_of(x)).softmax(dim=1)
    predicted = probs.argmax(dim=1)
    chosen = resolve_class(target, run.classes)
    expl = explain(run.model, x, method=method, target=predicted.tolist() if chosen is None else chosen, layer=layer)
    expl.predictions, expl.probs = predicted, probs
    return expl
