"""The CAM method registry: a name, a loader for the pytorch-grad-cam class that holds the
method's math, a one-line summary. ``explain(method=...)`` and the CLI choices read it.

Adding a method is one ``register_method(name, loader, summary)`` call; ``loader()`` returns
a pytorch-grad-cam ``BaseCAM`` subclass, of which :func:`cifarlens.explain.cam.explain` uses
only ``get_cam_image`` (and ``uses_gradients``).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from cifarlens.registry import Registry


@dataclass(frozen=True)
class CamMethod:
    """A registered CAM method: its name, a loader for the pytorch-grad-cam class, a one-line summary.

    The class is imported on first use: pytorch-grad-cam pulls in OpenCV, SciPy and scikit-learn,
    seconds of start-up that ``cifarlens --help`` and the other commands should not pay.
    """

    name: str
    load: Callable[[], type]
    summary: str
    class_specific: bool = True  # False: the map is the same whatever the target class

    @property
    def cam_class(self) -> type:
        return self.load()


METHODS: Registry[CamMethod] = Registry("CAM method")


def list_methods() -> list[str]:
    """Registered CAM method names, sorted."""
    return METHODS.names()


def register_method(name: str, load: Callable[[], type], summary: str, class_specific: bool = True) -> CamMethod:
    method = CamMethod(name, load, summary, class_specific)
    METHODS.register(name)(method)
    return method


def _library(class_name: str) -> Callable[[], type]:
    @functools.cache
    def load() -> type:
        return getattr(importlib.import_module("pytorch_grad_cam"), class_name)

    return load


@functools.cache
def _quiet_score_cam() -> type:
    from pytorch_grad_cam import ScoreCAM

    class QuietScoreCAM(ScoreCAM):
        """ScoreCAM's channel weights (Wang et al. 2020) without its per-image tqdm progress bar.

        The same computation as ``ScoreCAM.get_cam_weights``: each activation channel, upsampled
        (align_corners=True, as ``UpsamplingBilinear2d``) and min-max scaled, masks the input; the
        weights are the softmax over channels of the target logits of the masked inputs.
        """

        batch_size = 64  # masked copies per forward; the weights do not depend on it

        def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
            with torch.no_grad():
                acts = torch.from_numpy(activations).to(self.device)  # (B, K, h, w)
                up = F.interpolate(acts, size=input_tensor.shape[-2:], mode="bilinear", align_corners=True)
                flat = up.flatten(2)
                lo, hi = flat.min(-1).values[..., None, None], flat.max(-1).values[..., None, None]
                masks = (up - lo) / (hi - lo + 1e-8)  # (B, K, H, W) in [0, 1]
                scores = []
                for target, image, image_masks in zip(targets, input_tensor, masks):
                    masked = image[None] * image_masks[:, None]  # (K, C, H, W)
                    for start in range(0, masked.shape[0], self.batch_size):
                        scores.append(target(self.model(masked[start : start + self.batch_size])).float().cpu())
                scores = torch.cat(scores).view(activations.shape[0], activations.shape[1])  # (B, K)
                return scores.softmax(dim=-1).numpy()

    return QuietScoreCAM


register_method("gradcam", _library("GradCAM"),
                "Grad-CAM (Selvaraju et al. 2017): channels weighted by their spatially averaged gradient")
register_method("gradcam++", _library("GradCAMPlusPlus"),
                "Grad-CAM++ (Chattopadhyay et al. 2018): positive gradients with higher-order pixel weights")
register_method("hirescam", _library("HiResCAM"),
                "HiResCAM (Draelos & Carin 2020): gradient x activation per location, summed over channels")
register_method("gradcam-elementwise", _library("GradCAMElementWise"),
                "element-wise Grad-CAM: like HiResCAM with a ReLU on each gradient x activation term")
register_method("xgradcam", _library("XGradCAM"),
                "XGrad-CAM (Fu et al. 2020): gradients weighted by normalised activations")
register_method("layercam", _library("LayerCAM"),
                "LayerCAM (Jiang et al. 2021): positive gradient x activation per location")
register_method("eigengradcam", _library("EigenGradCAM"),
                "Eigen-Grad-CAM: first principal component of gradient x activation")
register_method("eigencam", _library("EigenCAM"),
                "Eigen-CAM (Muhammad & Yeasin 2020): first principal component of the activations; "
                "gradient-free and the same for every target class (its sign is arbitrary)", class_specific=False)
register_method("scorecam", _quiet_score_cam,
                "Score-CAM (Wang et al. 2020): channels weighted by the target score of the input masked by "
                "each channel; gradient-free, one forward per channel and image (slow on wide layers)")
