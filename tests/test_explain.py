"""Explanations: CAM methods against independent implementations, the pitfalls of the CAM library
our wrapper must handle, faithfulness on a model whose answer is known, figures, and the CLI."""

from __future__ import annotations

import functools
import json
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cifarlens.api import Run
from cifarlens.cli import main
from cifarlens.config import RunConfig
from cifarlens.data.base import DatasetInfo
from cifarlens.errors import CifarlensError
from cifarlens.explain import (
    METHODS,
    CoarseMapWarning,
    Explanation,
    class_average_maps,
    default_layer,
    explain,
    explain_run,
    faithfulness,
    list_methods,
    overlay,
    register_method,
    resolve_class,
)
from cifarlens.models import create_model, list_models
from conftest import CIFAR10_CLASSES, make_cifar10

ALL_METHODS = list_methods()
GRADIENT_METHODS = ["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam"]
TINY_LENSNET = dict(widths=(8, 16), depths=(1, 1))  # cam layer stages.1.blocks.0: 16x16 maps at 32x32


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These tests run many tiny ops: on 2 cores shared with other jobs, a 2-thread pool waits for
    a free core at every op (3x slower here). Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("lensnet", num_classes, 3, **TINY_LENSNET)
    _calibrate(model)
    return model.eval()


@functools.cache
def _resnet20() -> nn.Module:
    torch.manual_seed(0)
    return _calibrate(create_model("resnet20", 10)).eval()


def _calibrate(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so eval mode differs from train mode as in a trained model."""
    model.train()
    with torch.no_grad():
        for seed in range(2):
            model(batch(16, seed=100 + seed))
    return model


def batch(n: int = 2, size: int = 32, channels: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def library_class(method: str) -> type:
    """The pytorch-grad-cam class behind a registered method (its base, where we subclass it)."""
    cls = METHODS.get(method).cam_class
    return next(c for c in cls.__mro__ if c.__module__.startswith("pytorch_grad_cam"))


# ---------------------------------------------------------------------------
# Methods: shapes, and agreement with independent implementations
# ---------------------------------------------------------------------------


def test_registry_has_the_issue_methods_and_refuses_duplicates():
    for name in ["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "scorecam"]:
        assert name in ALL_METHODS
    with pytest.raises(ValueError, match="already registered"):
        register_method("gradcam", METHODS.get("gradcam").load, "again")
    with pytest.raises(CifarlensError, match="unknown CAM method 'nope'.*gradcam"):
        explain(tiny_model(), batch(), method="nope")


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_gives_maps_in_unit_range_at_input_resolution(method):
    model = tiny_model()
    ex = explain(model, batch(2), method=method)
    assert ex.maps.shape == (2, 32, 32) and ex.maps.dtype == torch.float32
    assert float(ex.maps.min()) >= 0.0 and float(ex.maps.max()) <= 1.0
    assert not ex.empty.any() and torch.allclose(ex.maps.flatten(1).amax(1), torch.ones(2))
    assert ex.targets.dtype == ex.predictions.dtype == torch.int64 and ex.empty.dtype == torch.bool
    assert torch.equal(ex.targets, ex.predictions)  # default target: the predicted class
    assert ex.probs.shape == (2, 10) and torch.allclose(ex.probs.sum(1), torch.ones(2))
    assert (ex.method, ex.layer, ex.layer_size) == (method, model.cam_layer, (16, 16))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_maps_match_pytorch_grad_cam_used_directly(method):
    """What a new user would do: the library's own class on the same layer and targets."""
    model = tiny_model()
    x = batch(3)
    targets = [0, 4, 9]
    ours = explain(model, x, method=method, target=targets)
    with library_class(method)(model, [model.get_submodule(model.cam_layer)]) as cam:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        ref = cam(x, [ClassifierOutputTarget(t) for t in targets])
    np.testing.assert_allclose(ours.maps.numpy(), ref, atol=1e-4)


def _captum_gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets) -> torch.Tensor:
    from captum.attr import LayerAttribution, LayerGradCam

    attr = LayerGradCam(model, layer).attribute(x, target=targets, relu_attributions=True)  # (B, 1, h, w)
    up = LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]
    lo, hi = up.flatten(1).amin(1)[:, None, None], up.flatten(1).amax(1)[:, None, None]
    return ((up - lo) / (hi - lo)).detach()


@pytest.mark.parametrize("target", [None, 3, [1, 2, 7]])
def test_gradcam_matches_captum(target):
    """Independent oracle: Captum's LayerGradCam + ReLU + bilinear upsampling + per-image min-max."""
    model = _resnet20()
    x = batch(3, seed=5)
    ours = explain(model, x, method="gradcam", target=target)
    ref = _captum_gradcam(model, model.layer3, x, ours.targets.tolist())
    torch.testing.assert_close(ours.maps, ref, atol=1e-5, rtol=0)


def test_in_place_relu_after_the_layer_uses_the_layer_output_itself():
    """A torchvision-style model with ReLU(inplace=True) after the target conv: the map uses the conv's
    own output and its gradient (the library keeps post-ReLU activations on CPU, pre-ReLU on GPU)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = batch(2, size=16)
    ours = explain(model, x, layer="0", target=[1, 2])
    a = model[0](x)  # the same computation without in-place ops
    logits = model[2:](torch.relu(a))
    grads, = torch.autograd.grad(logits.gather(1, torch.tensor([[1], [2]])).sum(), a)
    cam = torch.relu((grads.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    up = torch.nn.functional.interpolate(cam, size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    lo, hi = up.flatten(1).amin(1)[:, None, None], up.flatten(1).amax(1)[:, None, None]
    torch.testing.assert_close(ours.maps, ((up - lo) / (hi - lo)).detach(), atol=1e-5, rtol=0)


def test_a_model_without_cam_layer_gets_the_last_stage_finer_than_2x2():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()  # ImageNet stem: 32 -> 8 after the stem; layer3 2x2, layer4 1x1
    x = batch(2, seed=3)
    assert default_layer(model, x) == "layer2"
    ex = explain(model, x)
    assert ex.layer == "layer2" and ex.layer_size == (4, 4)
    torch.testing.assert_close(ex.maps, _captum_gradcam(model, model.layer2, x, ex.targets.tolist()),
                               atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("name", list_models())
def test_default_layer_of_every_registered_model_is_finer_than_2x2(name, size):
    # on the meta device: shapes only, no weights, no compute, so the big models cost nothing
    shapes = []
    with torch.device("meta"):
        model = create_model(name, 10, 3).eval()
        layer = model.get_submodule(default_layer(model))
        handle = layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
        with torch.no_grad():
            model(torch.empty(1, 3, size, size))
        handle.remove()
    assert len(shapes) == 1, "the CAM layer must run exactly once per forward"
    assert len(shapes[0]) == 4 and min(shapes[0][-2:]) > 2, shapes


def test_unknown_layer_names_valid_ones():
    with pytest.raises(CifarlensError, match=r"no layer 'layer9'.*did you mean .*layer3"):
        explain(_resnet20(), batch(1), layer="layer9")
    with pytest.raises(CifarlensError, match=r"no layer 'xyz'.*top-level layers: stem, layer1.*\(default: layer3\)"):
        explain(_resnet20(), batch(1), layer="xyz")


def test_an_earlier_layer_can_be_chosen():
    ex = explain(_resnet20(), batch(1), layer="layer2")
    assert ex.layer == "layer2" and ex.layer_size == (16, 16) and ex.maps.shape == (1, 32, 32)


def test_a_2x2_layer_warns_and_a_finer_one_does_not():
    model = _resnet20()
    with pytest.warns(CoarseMapWarning, match=r"'layer3' gives 2x2 maps"):
        explain(model, batch(1, size=8))  # 8x8 input: layer3 is 2x2
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoarseMapWarning)
        explain(model, batch(1, size=32))


def test_a_layer_that_is_not_a_feature_map_is_refused():
    model = _resnet20()
    with pytest.raises(CifarlensError, match=r"'head.fc' outputs \(1, 10\)"):
        explain(model, batch(1), layer="head.fc")


# ---------------------------------------------------------------------------
# Pitfalls of the library, one test each
# ---------------------------------------------------------------------------


def test_training_mode_is_restored_per_module_and_maps_are_eval_mode_maps():
    model = tiny_model()
    expected = explain(model, batch(2)).maps  # eval model
    model.train()
    model.stem[1].eval()  # a mixed model: one BatchNorm frozen in eval mode
    before = {name: m.training for name, m in model.named_modules()}
    for method in ["gradcam", "eigencam", "scorecam"]:
        ex = explain(model, batch(2), method=method)
        assert {name: m.training for name, m in model.named_modules()} == before
    torch.testing.assert_close(explain(model, batch(2)).maps, expected)  # no dropout, running BN stats
    assert ex.maps.shape == (2, 32, 32)


@pytest.mark.parametrize("frozen", ["all", "backbone"])
def test_frozen_backbone_works_and_parameter_flags_and_grads_are_untouched(frozen):
    model = tiny_model()
    expected = explain(model, batch(2)).maps
    for name, p in model.named_parameters():
        p.requires_grad_(frozen == "backbone" and name.startswith("head."))
        p.grad = torch.full_like(p, 7.0)  # a caller's accumulated gradients must survive
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for method in GRADIENT_METHODS:
        ex = explain(model, batch(2), method=method)
        assert not ex.empty.any()
    torch.testing.assert_close(explain(model, batch(2)).maps, expected)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(torch.all(p.grad == 7.0) for p in model.parameters())


def test_works_inside_no_grad_and_inference_mode():
    model = tiny_model()
    expected = explain(model, batch(2)).maps
    with torch.no_grad():
        torch.testing.assert_close(explain(model, batch(2)).maps, expected)
        assert not torch.is_grad_enabled()  # the caller's mode is back
    with torch.inference_mode():
        x = batch(2)  # an inference tensor
        torch.testing.assert_close(explain(model, x).maps, expected)


def test_hooks_do_not_accumulate_over_100_calls():
    model = tiny_model()
    baseline = hook_count(model)
    x = batch(1)
    for _ in range(100):
        explain(model, x)
    for method in ALL_METHODS:
        explain(model, x, method=method)
    for bad in (dict(target=99), dict(layer="head.fc")):
        with pytest.raises(CifarlensError):
            explain(model, x, **bad)
    assert hook_count(model) == baseline


class Exploding(nn.Module):
    """Raises in forward after the CAM layer has run (so its hooks were live)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)
        self.cam_layer = "features"

    def forward(self, x):
        self.features(x)
        raise RuntimeError("boom in forward")


def test_exceptions_propagate_not_printed(capsys):
    model = Exploding().train()
    baseline = hook_count(model)
    with pytest.raises(RuntimeError, match="boom in forward"):
        explain(model, batch(1))
    assert hook_count(model) == baseline and model.training
    # a target out of range: the library's `with` block would print the IndexError and go on
    with pytest.raises(CifarlensError, match="out of range"):
        explain(tiny_model(), batch(2), target=[0, 10])
    with pytest.raises(CifarlensError, match="2 targets for 1 images"):
        explain(tiny_model(), batch(1), target=[0, 1])
    with pytest.raises(CifarlensError, match="normalised float images"):
        explain(tiny_model(), torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    # greyscale images for an RGB model: torch's error named a weight's shape
    with pytest.raises(CifarlensError, match=r"the model takes 3-channel images; got 1 channel\(s\) \(1, 1, 32, 32\)"):
        explain(tiny_model(), torch.zeros(1, 1, 32, 32))
    assert capsys.readouterr() == ("", "")


class DeadHead(nn.Module):
    """Logits that ignore the features: every gradient at the CAM layer is exactly zero."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 3)
        self.cam_layer = "features"

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3))) * 0.0 + torch.tensor([0.0, 1.0, 0.0])


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "layercam", "gradcam++"])
def test_an_all_zero_map_is_flagged_empty_not_normalised_into_a_heatmap(method):
    ex = explain(DeadHead().eval(), batch(2), method=method)
    assert ex.empty.tolist() == [True, True]
    assert torch.count_nonzero(ex.maps) == 0
    image = (torch.rand(3, 32, 32) * 255).to(torch.uint8)
    assert np.array_equal(overlay(image, ex.maps[0]), image.permute(1, 2, 0).numpy())  # the plain image


def test_concurrent_calls_on_one_model_match_sequential_calls():
    model = tiny_model()
    jobs = [(seed, method) for seed in range(2) for method in ("gradcam", "layercam", "eigencam")]
    expected = {job: explain(model, batch(3, seed=job[0]), method=job[1]).maps for job in jobs}

    def run(job):
        return job, explain(model, batch(3, seed=job[0]), method=job[1]).maps

    def check(results):
        for job, maps in results:
            torch.testing.assert_close(maps, expected[job], atol=1e-6, rtol=0)

    # a model in train mode: 4 threads interleave, the flags must still come back right
    model.train()
    with ThreadPoolExecutor(4) as pool:
        check(pool.map(run, jobs))
    assert model.training and all(m.training for m in model.modules())

    # the web app's case: an eval model that also predicts (no lock, no_grad) while it explains;
    # those forwards pass through the explanation's hooks and must not be recorded
    model.eval()
    stop = threading.Event()

    def predict_meanwhile():
        with torch.no_grad():
            while not stop.is_set():
                model(batch(1, seed=99))
                time.sleep(0.001)  # interleave, do not starve the explaining threads

    predictor = threading.Thread(target=predict_meanwhile)
    predictor.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            check(pool.map(run, jobs))
    finally:
        stop.set()
        predictor.join()
    assert hook_count(model) == 0


def test_batch_of_one_and_target_as_int():
    ex = explain(_resnet20(), batch(1), target=4)
    assert ex.maps.shape == (1, 32, 32) and ex.targets.tolist() == [4]


# ---------------------------------------------------------------------------
# Runs: class names, files, uint8 tensors
# ---------------------------------------------------------------------------


def fake_run(tmp_path: Path, size: int = 32) -> Run:
    info = DatasetInfo("synthetic", CIFAR10_CLASSES, 3, size, (0.5, 0.4, 0.3), (0.25, 0.25, 0.25))
    return Run(tmp_path, RunConfig(), info, tiny_model(), torch.device("cpu"))  # no TTA, no temperature


def test_explain_run_takes_class_names_files_and_uint8(tmp_path):
    run = fake_run(tmp_path)
    images = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    ex = explain_run(run, images, target="cat")
    assert ex.targets.tolist() == [3, 3]
    # the run's own normalisation is what the maps see
    direct = explain(run.model, run.preprocess(images), target=3)
    torch.testing.assert_close(ex.maps, direct.maps)
    assert explain_run(run, images, target=["dog", 1]).targets.tolist() == [5, 1]
    import numpy as np  # numpy's integers (np.argmax gives one) and a name in the other Unicode form
    assert explain_run(run, images, target=np.int64(5)).targets.tolist() == [5, 5]
    assert resolve_class("cafe\u0301", ("caf\u00e9", "b")) == 0
    path = tmp_path / "a.png"
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(path)
    single = explain_run(run, str(path), target="cat")  # one path, not a list
    torch.testing.assert_close(single.maps, ex.maps[:1])
    with pytest.raises(CifarlensError, match=r"unknown class 'kat'; did you mean 'cat'\? classes: airplane"):
        explain_run(run, images, target="kat")


# ---------------------------------------------------------------------------
# Faithfulness
# ---------------------------------------------------------------------------


class TopLeft(nn.Module):
    """Class 0's logit is the mean of the top-left quadrant of channel 0; nothing else matters."""

    def forward(self, x):
        q = x[:, 0, : x.shape[2] // 2, : x.shape[3] // 2].mean(dim=(1, 2))
        return torch.stack([4 * q, -4 * q], dim=1)


def quadrant_explanation(n: int, where: str) -> Explanation:
    maps = torch.zeros(n, 16, 16)
    if where == "top-left":
        maps[:, :8, :8] = 1.0
    else:
        maps[:, 8:, 8:] = 1.0
    return Explanation(maps, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                       torch.full((n, 2), 0.5), torch.zeros(n, dtype=torch.bool), where, "x", (4, 4))


def test_faithfulness_prefers_the_map_that_points_at_the_evidence():
    model = TopLeft()
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.3
    x[:, 0, :8, :8] += 1.0  # strong evidence for class 0 in the top-left quadrant only
    good = faithfulness(model, x, quadrant_explanation(6, "top-left"), steps=8)
    bad = faithfulness(model, x, quadrant_explanation(6, "bottom-right"), steps=8)
    rand = good["random"]
    assert good["deletion_auc"] < rand["deletion_auc"] < bad["deletion_auc"]
    assert good["insertion_auc"] > rand["insertion_auc"] > bad["insertion_auc"]
    assert good["score"] > rand["score"] > bad["score"]
    assert len(good["deletion_curve"]) == 9 and good["fractions"][-1] == 1.0
    p0 = torch.sigmoid(8 * x[:, 0, :8, :8].mean((1, 2))).mean()  # softmax of (4q, -4q) at class 0
    assert good["deletion_curve"][0] == pytest.approx(float(p0), abs=1e-5)
    assert good["insertion_curve"][-1] == pytest.approx(float(p0), abs=1e-5)
    assert good["deletion_curve"][-1] == pytest.approx(0.5) and good["insertion_curve"][0] == pytest.approx(0.5)
    assert all(0.0 <= v <= 1.0 for v in good["per_image"]["deletion_auc"])
    json.dumps(good)  # JSON-ready
    blur = faithfulness(model, x, quadrant_explanation(6, "top-left"), steps=4, baseline="blur")
    assert 0.0 <= blur["deletion_auc"] <= 1.0
    with pytest.raises(CifarlensError, match="baseline"):
        faithfulness(model, x, quadrant_explanation(6, "top-left"), baseline="zero")


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def test_overlay_blends_by_map_strength_and_handles_grayscale():
    image = torch.full((1, 4, 4), 100, dtype=torch.uint8)
    cam = torch.zeros(4, 4)
    cam[0, 0] = 1.0
    out = overlay(image, cam, alpha=0.5)
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    assert np.all(out[1:, :] == 100) and np.all(out[0, 1:] == 100)  # zero map: image unchanged
    assert not np.all(out[0, 0] == 100)  # hot pixel: coloured
    assert np.array_equal(overlay(image, torch.zeros(2, 2)), np.full((4, 4, 3), 100, np.uint8))  # resized map
    with pytest.raises(ValueError):
        overlay(image.float(), cam)


def test_class_average_maps_skip_empty_maps():
    maps = torch.stack([torch.full((2, 2), v) for v in (0.2, 0.4, 0.0, 1.0)])
    averages, counts = class_average_maps(maps, torch.tensor([0, 0, 0, 2]), 3,
                                          empty=torch.tensor([False, False, True, False]))
    assert counts.tolist() == [2, 0, 1]
    torch.testing.assert_close(averages[:, 0, 0], torch.tensor([0.3, 0.0, 1.0]))


# ---------------------------------------------------------------------------
# CLI, end to end on a tiny trained run
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    """A tiny run trained for one epoch (about 5 s): weak enough to make mistakes."""
    from cifarlens.api import train
    from cifarlens.config import RunConfig, merge

    root = tmp_path_factory.mktemp("explain")
    data = make_cifar10(root / "data", n_train_per_batch=40, n_test=50)
    cfg = merge(RunConfig(), {
        "data": {"dataset": "cifar10", "data_dir": str(data.data_dir), "download": False},
        "model": {"name": "lensnet", "kwargs": {"widths": [8, 16], "depths": [1, 1]}},
        "train": {"batch_size": 32, "epochs": 1, "device": "cpu"},
    })
    train(cfg, root / "run", evaluate_test=False)
    return root / "run", data


def test_cli_mistakes_with_maps(cifar_run, capsys):
    from cifarlens.api import load_run

    run_dir, data = cifar_run
    probs = load_run(run_dir).predict_proba(torch.from_numpy(data.test_images))
    confidence, prediction = probs.max(1)
    wrong = (prediction != torch.from_numpy(data.test_labels)).nonzero()[:, 0]
    assert len(wrong) >= 3, "the one-epoch run should make mistakes"
    expected = [f"test_{i:05d}" for i in wrong[confidence[wrong].argsort(descending=True)][:3].tolist()]
    assert main(["explain", str(run_dir), "--mistakes", "3", "--save-maps"]) == 0
    out = run_dir / "explain" / "gradcam"
    stdout = capsys.readouterr().out
    assert str(out) in stdout and "gallery.png" in stdout and "the 3 most confident mistake(s) on test" in stdout
    assert sorted(p.name for p in out.glob("test_*.png")) == sorted(f"{n}.png" for n in expected)
    for name in expected:
        cam = np.load(out / "maps" / f"{name}.npy")
        assert cam.shape == (32, 32) and cam.dtype == np.float32 and 0.0 <= cam.min() and cam.max() <= 1.0
    assert (out / "gallery.png").is_file() and (out / "class_average.png").is_file()
    import csv  # what each panel shows, for the user's own analysis

    rows = list(csv.DictReader((out / "explanations.csv").open()))
    classes = load_run(run_dir).classes
    assert [r["panel"] for r in rows] == [f"{n}.png" for n in expected]
    assert [r["source"] for r in rows] == [f"test #{int(n[5:])}" for n in expected]
    for r, i in zip(rows, (int(n[5:]) for n in expected)):
        assert r["label"] == classes[data.test_labels[i]] and r["prediction"] == classes[int(prediction[i])] != r["label"]
        assert float(r["confidence"]) == pytest.approx(float(confidence[i]), abs=1e-5)
        assert r["explained"] == r["prediction"]  # no --target: the predicted class


def test_cli_replaces_an_earlier_selection_and_keeps_other_images_apart(cifar_run, tmp_path, capsys):
    """A smaller selection left the earlier panels beside its own (167 files for 2 listed); a split of
    other images (--data-dir) wrote into the run's own explain/ folder, test_00007.png replacing the run's."""
    import shutil

    run_dir, data = cifar_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    out = run / "explain" / "gradcam"
    assert main(["explain", str(run), "--indices", "0,1,2", "--save-maps"]) == 0
    assert main(["explain", str(run), "--indices", "2,7"]) == 0
    assert sorted(p.name for p in out.glob("test_*.png")) == ["test_00002.png", "test_00007.png"]
    # test_00002's map was not made again: an earlier one would be another target's or image's
    assert not list((out / "maps").glob("*.npy"))
    own = (out / "test_00007.png").read_bytes()
    other = make_cifar10(tmp_path / "other", n_train_per_batch=40, n_test=50, seed=3).data_dir
    with pytest.warns(UserWarning, match="test images are not those"):
        assert main(["explain", str(run), "--indices", "7", "--data-dir", str(other)]) == 0
    assert (out / "test_00007.png").read_bytes() == own
    [apart] = (run / "other-data").glob("test-*/explain/gradcam/test_00007.png")
    assert apart.read_bytes() != own and str(apart.parent) in capsys.readouterr().out


def test_an_explain_stopped_half_way_leaves_no_panel_the_next_one_keeps(cifar_run, tmp_path, monkeypatch):
    """The panels were written before explanations.csv: a Ctrl-C between them left panels no list
    named, and the next explain into the folder kept them beside its own."""
    import shutil

    import cifarlens.explain.figures as figures

    run = tmp_path / "run"
    shutil.copytree(cifar_run[0], run)
    out = run / "explain" / "gradcam"
    plot, drawn = figures.plot_explanation, []

    def stop_at_the_second(*args, **kwargs):
        if drawn:
            raise KeyboardInterrupt
        drawn.append(plot(*args, **kwargs))

    monkeypatch.setattr(figures, "plot_explanation", stop_at_the_second)
    assert main(["explain", str(run), "--indices", "3,4,5"]) == 130  # "cifarlens: interrupted"
    monkeypatch.undo()
    assert [p.name for p in out.glob("test_*.png")] == ["test_00003.png"]
    assert main(["explain", str(run), "--indices", "8"]) == 0
    assert [p.name for p in out.glob("test_*.png")] == ["test_00008.png"]


def test_explain_never_replaces_a_file_of_the_users_in_its_folder(cifar_run, tmp_path, capsys):
    """--out FOLDER replaced the user's files there without a word: the very image explained (dog.png
    became its own panel), another dog.png, their gallery.png."""
    from PIL import Image

    run_dir, data = cifar_run
    out = tmp_path / "photos"
    out.mkdir()
    dog = out / "dog.png"
    Image.fromarray(data.test_images[0].transpose(1, 2, 0)).save(dog)
    before = dog.read_bytes()
    assert main(["explain", str(run_dir), str(dog), "--out", str(out)]) == 2
    assert "explain would write dog.png over" in capsys.readouterr().err and dog.read_bytes() == before
    other = tmp_path / "elsewhere" / "dog.png"
    other.parent.mkdir()
    other.write_bytes(before)
    assert main(["explain", str(run_dir), str(other), "--out", str(out)]) == 2
    assert f"--out {out} holds dog.png, which explain would replace" in capsys.readouterr().err
    assert dog.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["dog.png"]
    fresh = tmp_path / "fresh"
    assert main(["explain", str(run_dir), str(other), "--out", str(fresh)]) == 0
    assert main(["explain", str(run_dir), "--indices", "1", "--out", str(fresh)]) == 0  # its own files: replaced
    (fresh / "gallery.png").unlink()
    (tmp_path / "gallery.png").write_bytes(before)
    (tmp_path / "gallery.png").rename(fresh / "gallery.png")  # the user's, once explain's is gone
    (fresh / "explanations.csv").unlink()
    assert main(["explain", str(run_dir), "--indices", "2", "--out", str(fresh)]) == 2
    assert "holds gallery.png, which explain would replace" in capsys.readouterr().err


def test_cli_per_class(cifar_run, tmp_path, capsys):
    run_dir, data = cifar_run
    out = tmp_path / "pc"
    assert main(["explain", str(run_dir), "--per-class", "1", "--method", "gradcam++", "--out", str(out)]) == 0
    first = [int(np.flatnonzero(data.test_labels == k)[0]) for k in range(10)]
    assert sorted(p.name for p in out.glob("test_*.png")) == sorted(f"test_{i:05d}.png" for i in first)
    assert (out / "gallery.png").is_file() and (out / "class_average.png").is_file()
    assert not (out / "maps").exists() and not (out / "faithfulness.json").exists()


def test_cli_faithfulness_compares_every_method_with_random(cifar_run, tmp_path, capsys):
    run_dir, _ = cifar_run
    out = tmp_path / "faith"
    assert main(["explain", str(run_dir), "--indices", "0,1,2", "--out", str(out), "--faithfulness"]) == 0
    stdout = capsys.readouterr().out
    report = json.loads((out / "faithfulness.json").read_text())
    assert set(report["methods"]) == set(ALL_METHODS) and report["images"] == 3
    for r in [*report["methods"].values(), report["random"]]:
        assert 0.0 <= r["deletion_auc"] <= 1.0 and 0.0 <= r["insertion_auc"] <= 1.0
        assert r["score"] == pytest.approx(r["insertion_auc"] - r["deletion_auc"], abs=1e-6)
    assert "(random maps)" in stdout and "gradcam++" in stdout and "faithfulness.json" in stdout
    # another selection without --faithfulness: the scores of images 0-2 stayed beside its panels
    assert main(["explain", str(run_dir), "--indices", "5", "--out", str(out)]) == 0
    assert not (out / "faithfulness.json").exists()


def test_cli_image_files_and_indices(cifar_run, tmp_path, capsys):
    run_dir, data = cifar_run
    paths = []
    for i in range(2):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(data.test_images[i].transpose(1, 2, 0)).save(path)
        paths.append(str(path))
    out = tmp_path / "files"
    assert main(["explain", str(run_dir), *paths, "--target", "cat", "--out", str(out), "--save-maps"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["gallery.png", "img0.png", "img1.png"]
    assert np.load(out / "maps" / "img0.npy").shape == (32, 32)
    out2 = tmp_path / "idx"
    assert main(["explain", str(run_dir), "--indices", "0,7", "--split", "test", "--method", "eigencam",
                 "--out", str(out2)]) == 0
    assert {"test_00000.png", "test_00007.png", "gallery.png", "class_average.png"} <= {p.name for p in out2.glob("*")}
    # image files after a split's selection in the same folder: its class averages went (they stayed, stale)
    assert main(["explain", str(run_dir), *paths, "--out", str(out2)]) == 0
    assert sorted(p.name for p in out2.glob("*.png")) == ["gallery.png", "img0.png", "img1.png"]


def test_cli_warns_in_one_line_for_a_2x2_layer(tmp_path, capsys):
    from cifarlens.explain.cli import _explain_all

    run = fake_run(tmp_path, size=8)
    images = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    ex = _explain_all(run, images, "gradcam", None, "stages.1")  # 8x8 input: 2x2 after the last pool
    assert ex.layer_size == (2, 2)
    err = capsys.readouterr().err
    assert err.startswith("cifarlens: warning: layer 'stages.1' gives 2x2 maps: too coarse") and err.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["--mistakes", "2", "--method", "nope"], "unknown CAM method 'nope'; choose one of: eigencam"),
    (["--mistakes", "2", "--target", "kat"], "unknown class 'kat'"),
    (["--mistakes", "2", "--layer", "stages.9"], "has no layer 'stages.9'"),
    ([], "nothing to explain"),
    (["x.png", "--mistakes", "2"], "not both"),
    (["--indices", "0,500"], "--indices must lie in 0..49"),
    (["--mistakes", "2", "--target", "10"], "class index 10 out of range: the model has 10 classes (0..9)"),
    (["--mistakes", "2", "--layer", ""], "--layer needs a layer name"),
])
def test_cli_errors_are_one_line(cifar_run, capsys, args, message):
    run_dir, _ = cifar_run
    assert main(["explain", str(run_dir), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0, err


def test_cli_repeated_indices_count_once_and_an_out_file_is_refused(cifar_run, tmp_path, capsys):
    run_dir, _ = cifar_run
    assert main(["explain", str(run_dir), "--indices", "3,3,3", "--out", str(tmp_path / "ex")]) == 0
    assert "for 1 image(s) of test" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "ex").glob("test_*.png")) == ["test_00003.png"]
    (tmp_path / "taken.jpg").write_bytes(b"a photo")
    assert main(["explain", str(run_dir), "--indices", "0", "--out", str(tmp_path / "taken.jpg")]) == 2
    assert "is a file; explain writes a folder" in capsys.readouterr().err
    assert (tmp_path / "taken.jpg").read_bytes() == b"a photo"
    # nor the run folder itself: an image named curves.jpg would replace the run's curves.png
    curves = (run_dir / "curves.png").read_bytes()
    Image.new("RGB", (8, 8)).save(tmp_path / "curves.jpg")
    assert main(["explain", str(run_dir), str(tmp_path / "curves.jpg"), "--out", str(run_dir)]) == 2
    assert "is the run folder " in capsys.readouterr().err and (run_dir / "curves.png").read_bytes() == curves
    # nor another run's folder, nor a folder of a run's own other than explain/
    import shutil

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    for out in (other, other / "other-data" / "test-x", other / "checkpoints"):
        assert main(["explain", str(run_dir), str(tmp_path / "curves.jpg"), "--out", str(out)]) == 2
        assert "explain writes a folder of figures of its own" in capsys.readouterr().err
    assert (other / "curves.png").read_bytes() == curves and not (other / "other-data").exists()
    assert main(["explain", str(run_dir), str(tmp_path / "curves.jpg"), "--out", str(other / "explain" / "mine")]) == 0


def test_cli_a_folder_of_images_is_explained_as_predict_reads_it(cifar_run, tmp_path, capsys):
    run_dir, _ = cifar_run
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "a.png")
    Image.new("RGB", (20, 20), (10, 200, 10)).save(folder / "more" / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    assert main(["explain", str(run_dir), str(folder), "--out", str(tmp_path / "ex")]) == 0
    printed = capsys.readouterr()
    assert "for 2 image file(s)" in printed.out and "notes.txt" not in printed.out and "1 file(s)" in printed.err
    assert sorted(p.name for p in (tmp_path / "ex").glob("*.png")) == ["a.png", "b.png", "gallery.png"]
    import csv

    rows = list(csv.DictReader((tmp_path / "ex" / "explanations.csv").open()))
    assert [(r["panel"], r["source"], r["label"]) for r in rows] == [("a.png", str(folder / "a.png"), ""),
                                                                     ("b.png", str(folder / "more" / "b.jpg"), "")]
    (tmp_path / "empty").mkdir()
    assert main(["explain", str(run_dir), str(tmp_path / "empty")]) == 2
    assert "is a folder without image files" in capsys.readouterr().err


def test_cli_an_unreadable_file_is_named_and_the_others_are_explained(cifar_run, tmp_path, capsys):
    run_dir, _ = cifar_run
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "good.png")
    Image.new("RGB", (32, 32), (10, 10, 200)).save(tmp_path / "two\nlines.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    files = [str(tmp_path / n) for n in ("good.png", "broken.png", "two\nlines.png")]
    assert main(["explain", str(run_dir), *files, "--out", str(tmp_path / "ex")]) == 1  # as predict: 1, the rest done
    printed = capsys.readouterr()
    assert "broken.png" in printed.err and "1 of 3 images could not be read" in printed.err
    assert "for 2 image file(s)" in printed.out
    assert sorted(p.name for p in (tmp_path / "ex").glob("*.png")) == ["gallery.png", "good.png", "two_lines.png"]
    assert all("lines.png" not in line or "two_lines" in line for line in printed.out.splitlines())
    assert main(["explain", str(run_dir), files[1], "--out", str(tmp_path / "ex2")]) == 2  # alone: its own error
    assert "broken.png" in capsys.readouterr().err and not (tmp_path / "ex2").exists()


def test_cli_val_split_of_a_run_without_one_is_a_one_line_error(cifar_run, tmp_path, capsys):
    """--mistakes crashed in torch.cat on the empty split; --indices said 'must lie in 0..-1'."""
    from cifarlens.api import train
    from cifarlens.config import merge
    from cifarlens.runs import RunDir

    run_dir, _ = cifar_run
    cfg = merge(RunDir(run_dir).config(), {"data": {"val_fraction": 0.0}, "train": {"epochs": 1}})
    train(cfg, tmp_path / "noval", evaluate_test=False)
    for flags in (["--mistakes", "3"], ["--indices", "0"]):
        assert main(["explain", str(tmp_path / "noval"), "--split", "val", *flags]) == 2
        err = capsys.readouterr().err
        assert err.strip().endswith("has no val images (data.val_fraction 0); explain --split test"), err


def test_an_interrupted_explain_is_not_described_as_a_run_folder(cifar_run, tmp_path, monkeypatch, capsys):
    """Ctrl-C in explain --out DIR said "nothing was written" (train's hint about a run folder), after
    it had written panels there."""
    import cifarlens.explain.cli as explain_cli

    run_dir, _ = cifar_run

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(explain_cli, "_explain_all", stop)
    assert main(["explain", str(run_dir), "--indices", "0", "--out", str(tmp_path / "x")]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "cifarlens: interrupted"
