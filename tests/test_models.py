"""Every registered model: shapes, gradients, the uniform API, the CAM layer; plus registry and LensNet config."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from cifarlens.errors import CifarlensError
from cifarlens.models import MODELS, create_model, list_models, model_info, register_model, unwrap_model
from cifarlens.models.base import ClassifierBase
from cifarlens.models.resnet_cifar import BasicBlock

ALL_MODELS = list_models()
FMNIST_CLASSES = 7  # not 10, so a hard-coded class count would show


@functools.cache
def _model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """Build each model once per configuration: the big ones take ~1 s to initialise on CPU."""
    torch.manual_seed(0)
    return create_model(name, num_classes, in_channels)


def cifar_model(name: str) -> nn.Module:
    return _model(name, 3, 10)


def _batch(channels: int, size: int) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward_cifar(name):
    model = cifar_model(name).train()
    model.zero_grad(set_to_none=True)
    logits = model(_batch(3, 32))
    assert logits.shape == (2, 10)
    nn.functional.cross_entropy(logits, torch.tensor([0, 9])).backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{pname} has non-finite gradient"
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_grayscale_28(name):
    model = _model(name, 1, FMNIST_CLASSES).eval()
    assert (model.in_channels, model.num_classes) == (1, FMNIST_CLASSES)
    with torch.no_grad():
        assert model(_batch(1, 28)).shape == (2, FMNIST_CLASSES)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_uniform_api(name):
    model = cifar_model(name).eval()
    assert isinstance(model, ClassifierBase)
    x = _batch(3, 32)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        proba = model.predict_proba(x)
        assert feats.ndim == 4 and feats.shape[0] == 2  # (B, C, h, w), before pooling
        torch.testing.assert_close(model.forward_head(feats), logits)
    torch.testing.assert_close(proba.sum(dim=1), torch.ones(2))
    assert (proba >= 0).all()
    # forward returns logits; the softmax happens only in predict_proba
    torch.testing.assert_close(proba, logits.softmax(dim=1))
    assert not torch.allclose(logits.sum(dim=1), torch.ones(2))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_cam_layer_gives_map_larger_than_2x2(name):
    model = cifar_model(name).eval()
    layer = model.get_submodule(model.cam_layer)
    seen = []
    handle = layer.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        with torch.no_grad():
            model(_batch(3, 32))
    finally:
        handle.remove()
    assert len(seen) == 1, "cam_layer should run exactly once per forward"
    (out,) = seen
    assert out.ndim == 4 and out.shape[0] == 2
    assert out.shape[2] > 2 and out.shape[3] > 2, f"{name}: CAM map {tuple(out.shape[2:])} too coarse"


# Parameter counts at 10 classes, as printed in the papers (M = 1e6). The value printed is
# ours rounded to the same number of decimals, so e.g. "0.27" means 0.265M..0.275M.
PAPER_PARAMS_M = {
    "resnet20": "0.27",  # He et al. 2016, table 6
    "resnet32": "0.46",
    "resnet56": "0.85",
    "resnet110": "1.7",
    "wrn16_8": "11.0",  # Zagoruyko & Komodakis 2016, table 4
    "wrn28_10": "36.5",
    "preact_resnet18": "11.17",  # the usual figure for the CIFAR PreAct-ResNet-18 with final BN
}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_param_counts_match_papers(name):
    printed = PAPER_PARAMS_M[name]
    decimals = len(printed.split(".")[1])
    params = model_info(cifar_model(name))["params"]
    assert round(params / 1e6, decimals) == float(printed), f"{name}: {params:,} params"


def test_resnet20_exact_count_has_parameter_free_shortcuts():
    # stem 3*16*9 + 2*16, 18 3x3 convs + their BNs, FC 64*10 + 10; option-A shortcuts add nothing
    # (1x1 projection shortcuts would add 2,752 and give 272,474)
    convs = 3 * 16 * 9 + (6 * 16 * 16 + 16 * 32 + 5 * 32 * 32 + 32 * 64 + 5 * 64 * 64) * 9
    bns = 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)
    assert model_info(cifar_model("resnet20"))["params"] == convs + bns + 64 * 10 + 10 == 269_722


@pytest.mark.parametrize("name,depth", [("resnet20", 20), ("resnet32", 32), ("resnet56", 56), ("resnet110", 110)])
def test_resnet_depth_is_6n_plus_2_weight_layers(name, depth):
    assert model_info(cifar_model(name))["weight_layers"] == depth


# --- registry -------------------------------------------------------------------------------


def test_registry_lists_every_family():
    names = set(list_models())
    assert {"lensnet", "lensnet_light", "lensnet_medium", "lensnet_heavy", "preact_resnet18"} <= names
    assert {"resnet20", "resnet32", "resnet56", "resnet110", "wrn16_8", "wrn28_10"} <= names
    assert list_models() == sorted(names)


def test_unknown_model_name_lists_choices():
    with pytest.raises(CifarlensError, match="unknown model 'resnet21'") as err:
        create_model("resnet21", 10)
    for name in list_models():
        assert name in str(err.value)


@pytest.mark.parametrize(
    "name,kwargs,options",
    [
        ("resnet20", {"width": 2}, "(none)"),
        ("lensnet_light", {"widht": (8,)}, "widths"),
        ("wrn16_8", {"drop": 0.3}, "dropout"),
    ],
)
def test_unknown_option_is_a_clear_error(name, kwargs, options):
    with pytest.raises(CifarlensError, match=f"has no option '{next(iter(kwargs))}'") as err:
        create_model(name, 10, **kwargs)
    assert options in str(err.value)


def test_known_option_is_passed_through():
    model = create_model("wrn16_8", 10, dropout=0.3)
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout) and m is not model.head.drop} == {0.3}


def test_bad_num_classes_is_a_clear_error():
    with pytest.raises(CifarlensError, match="num_classes"):
        create_model("resnet20", 0)


def test_duplicate_registration_is_refused():
    original = MODELS.get("resnet20")
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet20")(lambda num_classes, in_channels=3: nn.Linear(1, 1))

    def lensnet(num_classes, in_channels=3):  # same __name__ as a registered model
        return nn.Linear(1, 1)

    with pytest.raises(ValueError, match="already registered"):
        register_model()(lensnet)
    assert MODELS.get("resnet20") is original
    assert isinstance(create_model("lensnet", 10, widths=(8,), depths=(1,)), ClassifierBase)


def test_unwrap_model_strips_wrappers():
    model = create_model("lensnet", 10, widths=(8,), depths=(1,))
    assert unwrap_model(model) is model
    assert unwrap_model(AveragedModel(model)).__class__ is type(model)  # AveragedModel deep-copies
    ema = AveragedModel(model)
    assert unwrap_model(ema) is ema.module
    assert unwrap_model(torch.compile(model)) is model
    nested = torch.compile(nn.DataParallel(ema))
    assert unwrap_model(nested) is ema.module
    assert model_info(nested)["architecture"] == "LensNet"
    assert model_info(nested)["cam_layer"] == model.cam_layer


# --- LensNet configuration -------------------------------------------------------------------


def _blocks(model: nn.Module) -> int:
    return sum(isinstance(m, BasicBlock) for m in model.modules())


def test_lensnet_depth_adds_blocks_and_their_parameters():
    base = create_model("lensnet", 10, widths=(16, 32, 64), depths=(1, 1, 1))
    deeper = create_model("lensnet", 10, widths=(16, 32, 64), depths=(1, 3, 1))
    assert (_blocks(base), _blocks(deeper)) == (3, 5)
    # each extra block at width w: two 3x3 convs w->w (9 w^2 each) and two BNs (2 w each)
    w = 32
    assert model_info(deeper)["params"] - model_info(base)["params"] == 2 * (18 * w * w + 4 * w)
    assert model_info(deeper)["weight_layers"] - model_info(base)["weight_layers"] == 4
    assert deeper.cam_layer == "stages.2.blocks.0"
    assert create_model("lensnet", 10, widths=(16, 32, 64), depths=(1, 1, 2)).cam_layer == "stages.2.blocks.1"


def test_lensnet_widths_set_stages_channels_and_resolution():
    model = create_model("lensnet", 10, widths=(8, 24), depths=(1, 1)).eval()
    assert len(model.stages) == 2
    assert model.head.fc.in_features == 24
    with torch.no_grad():
        assert model.forward_features(_batch(3, 32)).shape == (2, 24, 8, 8)  # two max-pools
    wider = create_model("lensnet", 10, widths=(8, 48), depths=(1, 1))
    assert model_info(wider)["params"] > model_info(model)["params"]


def test_lensnet_presets_and_overrides():
    light, medium, heavy = (
        model_info(cifar_model(n))["params"] for n in ("lensnet_light", "lensnet_medium", "lensnet_heavy")
    )
    assert light < medium < heavy
    assert medium == model_info(cifar_model("lensnet"))["params"]  # plain lensnet = medium defaults
    assert _blocks(cifar_model("lensnet_heavy")) == 8
    assert cifar_model("lensnet_heavy").cam_layer == "stages.3.blocks.1"

    heavy_shallow = create_model("lensnet_heavy", 10, depths=(1, 1, 1, 1), widths=(8, 8, 8, 8))
    assert _blocks(heavy_shallow) == 4
    light = create_model("lensnet_light", 10, dropout=0.3, head_dropout=0.0)
    assert {m.p for s in light.stages for m in s.modules() if isinstance(m, nn.Dropout)} == {0.3}
    assert light.head.drop.p == 0.0
    assert light.widths == (32, 64, 128)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"widths": (16, 32), "depths": (1, 1, 1)}, "one entry per stage"),
        ({"widths": (16, 0, 32)}, "widths"),
        ({"depths": (1, -1, 1)}, "depths"),
        ({"widths": (), "depths": ()}, "widths"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_lensnet_rejects_bad_config(kwargs, match):
    with pytest.raises(CifarlensError, match=match):
        create_model("lensnet", 10, **kwargs)


@pytest.mark.parametrize("kind", ["constant blue", "grey as RGB"])
def test_fastnet_whitening_gives_no_constant_channel_on_images_that_never_vary_along_a_direction(kind, tmp_path):
    """An image folder whose blue channel is always 0, or of grey images (read as RGB: three equal
    channels), gave whitened channels that never vary; BatchNorm's eps 1e-12 turned their zero
    variance into NaN (or a validation loss of 500,000) in the first epoch of the default model."""
    import numpy as np
    from PIL import Image

    from cifarlens.cli import main

    g = torch.Generator().manual_seed(0)
    grey = torch.rand(64, 1, 32, 32, generator=g)
    images = torch.cat([grey, grey, grey], 1) if kind == "grey as RGB" else \
        torch.cat([torch.rand(64, 2, 32, 32, generator=g), torch.zeros(64, 1, 32, 32)], 1)
    x = images - images.mean((0, 2, 3), keepdim=True)  # normalised as cifarlens does (a constant channel: std 1)
    x = x / torch.where(x.std((0, 2, 3), keepdim=True) > 0, x.std((0, 2, 3), keepdim=True), torch.ones(()))
    net = create_model("fastnet_cpu", 10)
    net.data_init(x)
    with torch.no_grad():
        assert bool((net.whiten(x).var(dim=(0, 2, 3)) > 1e-6).all())  # every whitened channel varies
    # the user's path: the default model trains on such a folder
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for label, channel in (("red", 0), ("green", 1)):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.zeros((32, 32, 3), np.uint8)
                pixels[..., channel] = rng.integers(100, 255, (32, 32))
                if kind == "grey as RGB":
                    pixels[...] = pixels[..., channel:channel + 1] // (1 + channel)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "images"), "--epochs", "1",
                 "--batch-size", "8", "--no-report", "--out", str(tmp_path / "run")]) == 0
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert float(history[1].split(",")[3]) < 10  # the validation loss


def test_fastnet_whitening_caps_the_gain_of_faint_directions():
    """Patch whitening divides by sqrt(eigenvalue + whiten_eps): on images with almost no high
    frequencies (as JPEG leaves them), white noise must not come out of the first layer far
    stronger than it went in, or mild noise drowns the image (docs/explain-and-report.md)."""
    import torch.nn.functional as F

    from cifarlens.models.fastnet import WHITEN_EPS

    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.randn(64, 3, 8, 8, generator=g), size=32, mode="bilinear")  # (64, 3, 32, 32)
    noise = 0.16 * torch.randn(64, 3, 32, 32, generator=g)  # std 0.04 of the [0, 1] range, normalised by ~0.25

    def noise_gain(eps: float) -> float:
        net = create_model("fastnet_cpu", 10, whiten_eps=eps)
        net.data_init(smooth)
        with torch.no_grad():
            return float((net.whiten(smooth + noise) - net.whiten(smooth)).pow(2).mean() / noise.pow(2).mean()) ** 0.5

    assert noise_gain(WHITEN_EPS) < 4  # measured 3.1 (per direction at most 1/sqrt(eps))
    assert noise_gain(5e-4) > 2.5 * noise_gain(WHITEN_EPS)  # airbench's 5e-4: 10.0
