"""ImageNet backbones from torchvision, for transfer learning: ResNet-18/50, EfficientNet-B0.

Each model wraps the torchvision network as ``self.backbone`` (its ImageNet classifier
removed) and our :class:`ClassifierHead` as ``self.head``, so the uniform API, the CAM
layer and the fine-tuning methods of :class:`ClassifierBase` work as for every other model.
Built with random weights; the ImageNet (or a file's) weights are loaded at the start of a
training run only (``model.pretrained`` / ``model.weights``, see :mod:`cifarlens.models.weights`).

Why torchvision and not timm: torchvision is already a dependency, its ``Weights`` API
downloads into the torch hub cache with a hash check, and three backbones do not justify
another package.

Small images, two ways (factory option ``stem``):

- ``"resize"`` (default): the input is upsampled inside ``forward_features`` (bilinear) to
  ``input_size`` (default 224, the resolution the weights were trained at). Keeps the
  pretrained network exactly as it is; costs (224/32)^2 = 49x the compute of a 32x32 pass.
- ``"native"``: the input keeps its size and the stem downsamples 4x less (ResNet: stride-1
  first conv, no max-pool; EfficientNet: stride-1 first conv and stride-1 first stage). The
  pretrained 7x7 / 3x3 kernels are kept; the network then sees 32x32 CIFAR images like
  128x128 ones (final map 4x4), for about a third of the compute of ``resize`` at 224.

Grey images (``in_channels=1``): the first conv takes one channel; loading RGB weights sums
its filters over the three colour channels (as timm's ``adapt_input_conv`` does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cifarlens.errors import CifarlensError
from cifarlens.models.base import ClassifierBase, ClassifierHead
from cifarlens.models.registry import register_model

# What torchvision's ImageNet weights expect (their transforms()' mean/std, RGB in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STEMS = ("resize", "native")
NATIVE_NOMINAL_SIZE = 32  # the input size "native" models choose their CAM layer for (CIFAR)
MIN_MAP_FOR_CAM = 7  # prefer a CAM layer with maps at least this fine, as torchvision's 224 -> 7x7


@dataclass(frozen=True)
class Backbone:
    """One torchvision network: how to build it and which ImageNet weights belong to it."""

    builder: str  # torchvision.models function, called with weights=None
    weights: str  # torchvision.models Weights enum; its DEFAULT member is used
    classifier: str  # key prefix of the ImageNet classifier in torchvision's state dict (dropped)
    stem_conv: str  # the first convolution, inside the backbone


BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone("resnet18", "ResNet18_Weights", "fc.", "conv1"),
    "resnet50": Backbone("resnet50", "ResNet50_Weights", "fc.", "conv1"),
    "efficientnet_b0": Backbone("efficientnet_b0", "EfficientNet_B0_Weights", "classifier.", "features.0.0"),
}


def list_pretrained() -> list[str]:
    """Registered models that have ImageNet weights (``--pretrained``)."""
    return sorted(BACKBONES)


def _stride(module: nn.Module) -> int:
    """How much ``module`` downsamples: the largest stride of its convs and pools (1 if none)."""
    strides = [1]
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            s = m.stride
            strides.append(s[0] if isinstance(s, tuple) else s)
    return max(strides)


class PretrainedClassifier(ClassifierBase):
    """A torchvision ImageNet backbone with a new :class:`ClassifierHead`; see the module docstring."""

    def __init__(
        self,
        arch: str,
        num_classes: int,
        in_channels: int = 3,
        stem: str = "resize",
        input_size: int = 224,
        dropout: float = 0.0,
    ):
        super().__init__(num_classes, in_channels)
        if stem not in STEMS:
            raise CifarlensError(f"{arch}: stem must be one of {', '.join(STEMS)}, got {stem!r}")
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 16:
            raise CifarlensError(f"{arch}: input_size must be an integer >= 16, got {input_size!r}")
        spec = BACKBONES[arch]
        if not 0.0 <= dropout < 1.0:
            raise CifarlensError(f"{arch}: dropout must be in [0, 1), got {dropout!r}")
        self.arch, self.spec, self.stem_mode, self.input_size = arch, spec, stem, input_size
        import torchvision.models  # here, not at import: it takes ~2 s, which every CLI command would pay

        self.backbone = getattr(torchvision.models, spec.builder)(weights=None)
        if in_channels != 3:
            self._replace_stem_conv(in_channels)
        features = self._remove_classifier()
        if stem == "native":
            self._native_stem()
        self.head = ClassifierHead(features, num_classes, dropout)
        self.cam_layer = self._choose_cam_layer()

    # -- family specifics ------------------------------------------------------------------
    def _remove_classifier(self) -> int:
        """Drop the ImageNet classifier from the backbone; return the feature width."""
        raise NotImplementedError

    def _native_stem(self) -> None:
        raise NotImplementedError

    def _stages(self) -> list[tuple[str, nn.Module]]:
        """(name in self, module) of every top-level step of forward_features, in order."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------
    def weights_enum(self):
        """torchvision's ImageNet weights for this architecture (the DEFAULT, best published)."""
        import torchvision.models

        return getattr(torchvision.models, self.spec.weights).DEFAULT

    def _replace_stem_conv(self, in_channels: int) -> None:
        old: nn.Conv2d = self.backbone.get_submodule(self.spec.stem_conv)
        new = nn.Conv2d(
            in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None
        )
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
        self.backbone.set_submodule(self.spec.stem_conv, new)

    def _choose_cam_layer(self) -> str:
        """The last stage whose map is >= 7x7 at the nominal input size; else the last finer than 2x2.

        Nominal size: ``input_size`` for ``resize``, 32 (CIFAR) for ``native``: at 224, ResNet's
        layer4 and EfficientNet's last conv give 7x7; native at 32, layer3 / features.5 give 8x8.
        """
        size = self.input_size if self.stem_mode == "resize" else NATIVE_NOMINAL_SIZE
        sizes = []
        for i, (name, module) in enumerate(self._stages()):
            size = math.ceil(size / _stride(module))  # 3x3/s2/pad-1 convs and pools: ceil(h / 2)
            if i >= self._first_cam_candidate:
                sizes.append((name, size))
        for minimum in (MIN_MAP_FOR_CAM, 3):
            fine = [name for name, s in sizes if s >= minimum]
            if fine:
                return fine[-1]
        return sizes[0][0]

    _first_cam_candidate = 0  # stages before this index (the stem) are never CAM layers

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem_mode == "resize" and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            # bilinear, no antialias (upsampling): (B, C, H, W) -> (B, C, input_size, input_size)
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._resize(x)
        for _, module in self._stages():
            x = module(x)
        return x


class TorchvisionResNet(PretrainedClassifier):
    """torchvision ResNet: conv1-bn1-relu-maxpool, layer1..layer4 (strides 4, 8, 16, 32 at ``resize``)."""

    _first_cam_candidate = 4  # layer1

    def _remove_classifier(self) -> int:
        features = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()  # no parameters: the backbone's state dict has no fc.*
        return features

    def _native_stem(self) -> None:
        self.backbone.conv1.stride = (1, 1)  # the pretrained 7x7 kernel, applied densely
        self.backbone.maxpool = nn.Identity()

    def _stages(self) -> list[tuple[str, nn.Module]]:
        b = self.backbone
        return [
            ("backbone.conv1", b.conv1),
            ("backbone.bn1", b.bn1),
            ("backbone.relu", b.relu),
            ("backbone.maxpool", b.maxpool),
            ("backbone.layer1", b.layer1),
            ("backbone.layer2", b.layer2),
            ("backbone.layer3", b.layer3),
            ("backbone.layer4", b.layer4),
        ]


class TorchvisionEfficientNet(PretrainedClassifier):
    """torchvision EfficientNet: features.0 (stem conv), features.1..7 (MBConv stages), features.8 (1x1 conv)."""

    _first_cam_candidate = 1

    def _remove_classifier(self) -> int:
        features = self.backbone.classifier[-1].in_features
        self.backbone.classifier = nn.Identity()
        return features

    def _native_stem(self) -> None:
        self.backbone.features[0][0].stride = (1, 1)
        # and the first stride-2 stage (its depthwise conv): 4x less downsampling, as for ResNet
        conv = next(m for m in self.backbone.features[2].modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2))
        conv.stride = (1, 1)

    def _stages(self) -> list[tuple[str, nn.Module]]:
        return [(f"backbone.features.{i}", m) for i, m in enumerate(self.backbone.features)]


@register_model(recipe="modern")
def resnet18(
    num_classes: int, in_channels: int = 3, stem: str = "resize", input_size: int = 224, dropout: float = 0.0
) -> TorchvisionResNet:
    """ResNet-18 (He et al. 2016, ImageNet version), torchvision; ImageNet weights with --pretrained. 11.2M."""
    return TorchvisionResNet("resnet18", num_classes, in_channels, stem, input_size, dropout)


@register_model(recipe="modern")
def resnet50(
    num_classes: int, in_channels: int = 3, stem: str = "resize", input_size: int = 224, dropout: float = 0.0
) -> TorchvisionResNet:
    """ResNet-50 (He et al. 2016), torchvision; ImageNet weights (IMAGENET1K_V2) with --pretrained. 23.5M."""
    return TorchvisionResNet("resnet50", num_classes, in_channels, stem, input_size, dropout)


@register_model(recipe="modern")
def efficientnet_b0(
    num_classes: int, in_channels: int = 3, stem: str = "resize", input_size: int = 224, dropout: float = 0.2
) -> TorchvisionEfficientNet:
    """EfficientNet-B0 (Tan & Le 2019), torchvision; ImageNet weights with --pretrained. 4.0M."""
    return TorchvisionEfficientNet("efficientnet_b0", num_classes, in_channels, stem, input_size, dropout)
