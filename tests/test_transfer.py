"""Transfer learning: pretrained backbones, starting weights from files, freezing, fine-tuning,
and the rest of cifarlens (evaluate, explain, report, serve, export, compare) on the result.

No ImageNet weights can be downloaded where these tests run: every "pretrained" file here is a
randomly initialised torchvision network saved to disk, which is all that loading needs.
Models stay small (``stem: native`` at 32x32, or ``input_size`` 64) so each test takes seconds.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from conftest import make_cifar10, make_fashion_mnist, synthetic_images
from safetensors.torch import load_file, save_file
from torch import nn

from cifarlens.api import load_run
from cifarlens.checkpoint import save_weights
from cifarlens.cli import main
from cifarlens.config import ModelConfig, RunConfig, merge
from cifarlens.data.base import Split
from cifarlens.data.loader import TensorLoader
from cifarlens.engine import FitState, Precision, fit
from cifarlens.errors import CifarlensError
from cifarlens.explain import default_layer
from cifarlens.models import create_model
from cifarlens.models.pretrained import IMAGENET_MEAN, IMAGENET_STD, list_pretrained
from cifarlens.models.weights import load_initial_weights, read_state_dict
from cifarlens.recipes import resolve_train
from cifarlens.schedules import build_optimizer, param_groups

NATIVE = "model.kwargs={stem: native}"


def torchvision_state(arch: str, seed: int = 0, calibrate: bool = False) -> dict[str, torch.Tensor]:
    """A randomly initialised torchvision network's state dict: what an ImageNet file holds, in shape.

    With ``calibrate``, its BatchNorm running statistics are those of its own activations (on
    random images), as in a trained network, so that frozen BatchNorm layers behave sensibly.
    """
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)()
    if calibrate:
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average over the calibration batches
        with torch.no_grad():
            for _ in range(3):
                net.train()(torch.randn(8, 3, 64, 64))
    return net.state_dict()


def backbone_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


def assert_same_backbone(model_state: dict, tv_state: dict, classifier: str = "fc.") -> None:
    ours = backbone_of(model_state)
    theirs = {k: v for k, v in tv_state.items() if not k.startswith(classifier)}
    assert ours.keys() == theirs.keys()
    for k, v in theirs.items():
        assert torch.equal(ours[k].cpu(), v), k


def cifar_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--dataset",
        "cifar10",
        "--data-dir",
        str(data_dir),
        "--no-download",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--batch-size",
        "16",
        "--no-report",
        *extra,
    ]


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory) -> Path:
    """40 training images (30 train / 10 val), 20 test: a training epoch of resnet18 takes a few seconds."""
    return make_cifar10(tmp_path_factory.mktemp("cifar") / "data", n_train_per_batch=8, n_test=20).data_dir


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("weights") / "resnet18-imagenet.safetensors"
    state = torchvision_state("resnet18", calibrate=True)
    save_file(state, str(path))
    return path, state


# ---------------------------------------------------------------------------
# Registry, stems, CAM layers
# ---------------------------------------------------------------------------


def test_pretrained_backbones_are_registered_and_listed(capsys):
    assert {"resnet18", "resnet50", "efficientnet_b0"} <= set(list_pretrained())
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "resnet50" in out and "efficientnet_b0" in out and "finetune:" in out


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "efficientnet_b0"])
def test_with_imagenet_classes_the_parameters_are_torchvisions(name):
    # our backbone + a 1000-class head has exactly the published network's parameter count
    with torch.device("meta"):
        model = create_model(name, 1000)
    published = model.weights_enum().meta["num_params"]
    assert sum(p.numel() for p in model.parameters()) == published


@pytest.mark.parametrize("kwargs", [{}, {"stem": "native"}, {"input_size": 64}])
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "efficientnet_b0"])
@pytest.mark.parametrize("size", [28, 32])
def test_default_cam_layer_is_usable_with_both_stems(name, kwargs, size):
    # meta device: shapes only, so resnet50 at 224 costs nothing
    shapes = []
    with torch.device("meta"):
        model = create_model(name, 10, 3, **kwargs).eval()
        layer = model.get_submodule(default_layer(model))
        handle = layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
        with torch.no_grad():
            feats = model.forward_features(torch.empty(1, 3, size, size))
        handle.remove()
    assert len(shapes) == 1, "the CAM layer must run exactly once per forward"
    assert min(shapes[0][-2:]) >= 7, shapes  # as fine as the pretrained networks' own 7x7 at 224
    if not kwargs:  # resize to 224: the last stage, at the resolution the weights were trained at
        assert shapes[0][-2:] == (7, 7) and feats.shape[-2:] == (7, 7)


def test_native_stem_keeps_the_input_size_and_resize_upsamples():
    x = torch.randn(2, 3, 32, 32)
    native = create_model("resnet18", 10, stem="native").eval()
    assert native.backbone.conv1.stride == (1, 1) and isinstance(native.backbone.maxpool, nn.Identity)
    with torch.no_grad():
        assert native.forward_features(x).shape == (2, 512, 4, 4)
        resized = create_model("resnet18", 10, input_size=64).eval()
        assert resized.forward_features(x).shape == (2, 512, 2, 2)  # 64 / 32
        eff = create_model("efficientnet_b0", 10, stem="native").eval()
        assert eff.forward_features(x).shape == (2, 1280, 4, 4)
    with pytest.raises(CifarlensError, match="stem must be one of resize, native"):
        create_model("resnet18", 10, stem="big")


# ---------------------------------------------------------------------------
# Starting weights from a file
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt-nested-ddp"])
def test_torchvision_layout_file_fills_the_backbone_and_a_new_head(tmp_path, fmt):
    state = torchvision_state("resnet18")
    path = tmp_path / f"r18.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "safetensors":
        save_file(state, str(path))
    elif fmt == "pt":
        torch.save(state, path)
    else:  # a training checkpoint of another tool: nested, saved from DistributedDataParallel
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    torch.manual_seed(1)
    model = create_model("resnet18", 7, stem="native")
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    record = load_initial_weights(model, ModelConfig(name="resnet18", weights=str(path)))
    assert record["source"] == "file" and record["layout"] == "torchvision" and len(record["sha256"]) == 64
    assert_same_backbone(model.state_dict(), state)
    assert model.head.fc.weight.shape == (7, 512) and model.head.fc.bias.shape == (7,)
    assert all(torch.equal(model.head.state_dict()[k], v) for k, v in head_before.items())  # the head is new


def test_efficientnet_torchvision_layout(tmp_path):
    state = torchvision_state("efficientnet_b0")
    path = tmp_path / "b0.safetensors"
    save_file(state, str(path))
    model = create_model("efficientnet_b0", 10, input_size=64)
    assert (
        load_initial_weights(model, ModelConfig(name="efficientnet_b0", weights=str(path)))["layout"] == "torchvision"
    )
    assert_same_backbone(model.state_dict(), state, classifier="classifier.")
    assert model.head.fc.weight.shape == (10, 1280)


def test_grey_images_sum_the_rgb_stem_filters(tmp_path):
    state = torchvision_state("resnet18")
    path = tmp_path / "r18.pt"
    torch.save(state, path)
    model = create_model("resnet18", 10, in_channels=1, stem="native")
    load_initial_weights(model, ModelConfig(name="resnet18", weights=str(path)))
    torch.testing.assert_close(model.backbone.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_cifarlens_layout_restores_every_key_including_the_head(tmp_path):
    torch.manual_seed(3)
    source = create_model("resnet18", 10, stem="native")
    path = tmp_path / "model.safetensors"
    save_weights(source.state_dict(), path)
    torch.manual_seed(4)
    model = create_model("resnet18", 10, stem="native")
    assert load_initial_weights(model, ModelConfig(name="resnet18", weights=str(path)))["layout"] == "cifarlens"
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_any_registered_model_continues_from_a_cifarlens_file(tmp_path):
    torch.manual_seed(0)
    source = create_model("resnet20", 10)
    path = tmp_path / "r20.pt"
    torch.save(source.state_dict(), path)
    model = create_model("resnet20", 10)
    assert load_initial_weights(model, ModelConfig(name="resnet20", weights=str(path)))["layout"] == "cifarlens"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())


def test_another_architecture_is_rejected_naming_the_keys(tmp_path):
    path = tmp_path / "efficientnet.safetensors"
    save_file(torchvision_state("efficientnet_b0"), str(path))
    model = create_model("resnet18", 10, stem="native")
    with pytest.raises(CifarlensError) as err:
        load_initial_weights(model, ModelConfig(name="resnet18", weights=str(path)))
    message = str(err.value)
    assert message.startswith("efficientnet.safetensors does not fit resnet18 (torchvision layout, 0 of ")
    # named as in the file (torchvision layout: no "backbone." prefix), parameters first
    assert "120 of the model's keys are missing from the file: conv1.weight, bn1.weight, bn1.bias" in message
    assert re.search(r"\d+ keys in the file are not in the model: [^;]*features\.0\.0\.weight", message)
    assert "\n" not in message


def test_another_number_of_classes_is_rejected_naming_the_shapes(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_weights(create_model("resnet18", 100, stem="native").state_dict(), path)
    model = create_model("resnet18", 10, stem="native")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        CifarlensError,
        match=re.escape(
            "weights.safetensors does not fit resnet18 (cifarlens layout, 120 of 122 keys fit): "
            "head.fc.weight is (100, 512) in the file, (10, 512) in the model; "
            "head.fc.bias is (100,) in the file, (10,) in the model"
        ),
    ):
        load_initial_weights(model, ModelConfig(name="resnet18", weights=str(path)))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing half-loaded


def test_wrong_input_channels_are_named(tmp_path):
    path = tmp_path / "grey.safetensors"
    save_weights(create_model("resnet18", 10, in_channels=1, stem="native").state_dict(), path)
    with pytest.raises(
        CifarlensError, match=r"backbone\.conv1\.weight is \(64, 1, 7, 7\) in the file, \(64, 3, 7, 7\)"
    ):
        load_initial_weights(
            create_model("resnet18", 10, stem="native"), ModelConfig(name="resnet18", weights=str(path))
        )


def test_missing_and_unreadable_files(tmp_path):
    model = create_model("resnet18", 10, stem="native")
    with pytest.raises(CifarlensError, match="weights file .*nope.safetensors not found"):
        load_initial_weights(model, ModelConfig(name="resnet18", weights=str(tmp_path / "nope.safetensors")))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CifarlensError, match="neither a safetensors file nor a PyTorch state dict"):
        load_initial_weights(model, ModelConfig(name="resnet18", weights=str(junk)))
    torch.save({"lr": 0.1, "epochs": 3}, tmp_path / "not-weights.pt")
    with pytest.raises(CifarlensError, match="does not hold a state dict"):
        read_state_dict(tmp_path / "not-weights.pt")
    (tmp_path / "notes.pt").write_text("hello, these are no weights\n")  # the safe unpickler's KeyError: 104
    with pytest.raises(CifarlensError, match=r"loads safely \(not a PyTorch file: KeyError \d+\)"):
        read_state_dict(tmp_path / "notes.pt")
    with pytest.raises(CifarlensError, match="is a folder; give the file"):
        read_state_dict(tmp_path)


def test_a_pickled_payload_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    torch.save({"conv1.weight": Exploit()}, evil)
    with pytest.raises(CifarlensError, match="neither a safetensors file nor a PyTorch state dict that loads safely") \
            as refused:
        read_state_dict(evil)
    assert not marker.exists()
    # what was refused, not torch's advice to load the file unsafely (cut off before its warning)
    assert "the safe loader refused it: Unsupported global: GLOBAL getattr was not an allowed" in str(refused.value)
    assert "weights_only" not in str(refused.value)


def test_pretrained_needs_a_model_with_imagenet_weights_and_excludes_weights(tmp_path):
    with pytest.raises(CifarlensError, match="model 'resnet20' has no pretrained weights; .*resnet50"):
        load_initial_weights(create_model("resnet20", 10), ModelConfig(name="resnet20", pretrained=True))
    with pytest.raises(CifarlensError, match="choose one"):
        load_initial_weights(
            create_model("resnet20", 10), ModelConfig(name="resnet20", pretrained=True, weights="x.pt")
        )


def test_pretrained_offline_is_one_clear_line(tmp_path, monkeypatch, capsys, tiny_cifar):
    from cifarlens.data import base

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached download

    def offline(url, timeout):  # what an offline machine answers, without touching the network
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(base, "_check_reachable", offline)
    out = tmp_path / "run"
    assert main(cifar_args(tiny_cifar, out, "--model", "resnet18", "--set", NATIVE, "--pretrained")) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "cifarlens: error: could not get the ImageNet weights ResNet18_Weights.IMAGENET1K_V1 "
        "([Errno -2] Name or service not known)"
    )
    assert "--weights FILE" in err and "download.pytorch.org" in err and err.count("\n") == 1
    assert "Traceback" not in err and not out.exists()


def test_pretrained_reads_torchvisions_cache_without_network(tmp_path, monkeypatch):
    """--pretrained goes through torchvision's Weights API; a file already in the hub cache is used as is."""
    from cifarlens.data import base

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(base, "_check_reachable", lambda url, timeout: pytest.fail("must not reach the network"))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    state = torchvision_state("resnet18", seed=5)
    torch.save(state, cache / Path(weights.url).name)
    model = create_model("resnet18", 10, stem="native")
    # a file of that name that is not the published one (this one: random weights) is refused, as torch
    # refuses a download whose SHA-256 does not start with the hash in the name (it took any cached file)
    with pytest.raises(CifarlensError, match=r"are not the published file .*f37072fd.*delete it"):
        load_initial_weights(model, ModelConfig(name="resnet18", pretrained=True))
    (cache / "junk").write_text("junk")  # nor a damaged one
    (cache / "junk").replace(cache / Path(weights.url).name)
    with pytest.raises(CifarlensError, match="are not the published file"):
        load_initial_weights(model, ModelConfig(name="resnet18", pretrained=True))
    torch.save(state, cache / Path(weights.url).name)  # taken as the published file (its hash, stood in for)
    published = "f37072fd" + "0" * 56
    import cifarlens.models.weights as weights_module

    monkeypatch.setattr(weights_module, "_sha256", lambda path: published)
    record = load_initial_weights(model, ModelConfig(name="resnet18", pretrained=True))
    assert record == {
        "source": "imagenet",
        "weights": "ResNet18_Weights.IMAGENET1K_V1",
        "url": weights.url,
        "sha256": published,
        "layout": "torchvision",
    }
    assert_same_backbone(model.state_dict(), state)


# ---------------------------------------------------------------------------
# The CLI: --weights, normalisation, errors
# ---------------------------------------------------------------------------


def test_cli_weights_round_trip_with_a_frozen_backbone(tmp_path, tiny_cifar, resnet18_file):
    """--weights FILE, then a linear probe for the whole run: the saved backbone is the file's, exactly
    (parameters and BatchNorm statistics), and the head has the dataset's 10 classes."""
    path, state = resnet18_file
    out = tmp_path / "run"
    args = cifar_args(tiny_cifar, out, "--model", "resnet18", "--set", NATIVE, "--weights", str(path),
                      "--epochs", "1")  # no --recipe: a --weights start gets finetune
    assert main(args) == 0
    assert (out / "config.yaml").read_text().startswith("# recipe: finetune (default for a --weights start)\n")
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["recipe"] == "finetune"
    saved = load_file(str(out / "model.safetensors"))
    assert_same_backbone(saved, state)
    assert saved["head.fc.weight"].shape == (10, 512)
    meta = json.loads((out / "run.json").read_text())
    assert meta["init"]["source"] == "file" and meta["init"]["layout"] == "torchvision"
    assert tuple(meta["dataset"]["mean"]) == IMAGENET_MEAN and tuple(meta["dataset"]["std"]) == IMAGENET_STD
    assert meta["model"]["forward_flops"] > 0
    assert "backbone frozen" in (out / "train.log").read_text()
    run = load_run(out)  # evaluate/predict rebuild the model without the weights file, from the run's own
    assert run.info.mean == IMAGENET_MEAN and run.config.model.weights == str(path)


def test_cli_grey_data_uses_the_mean_imagenet_statistics(tmp_path, resnet18_file):
    path, _ = resnet18_file
    data = make_fashion_mnist(tmp_path / "fm", n_train=40, n_test=10)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--device", "cpu",
                 "--model", "resnet18", "--set", NATIVE, "--weights", str(path), "--epochs", "1",
                 "--batch-size", "16", "--set", "train.freeze_epochs=1", "--out", str(out), "--no-report"]) == 0
    dataset = json.loads((out / "run.json").read_text())["dataset"]
    assert dataset["mean"] == pytest.approx([sum(IMAGENET_MEAN) / 3])
    assert dataset["std"] == pytest.approx([sum(IMAGENET_STD) / 3])


@pytest.mark.slow  # ~5 s; CI runs it with the slow set
def test_a_start_from_a_cifarlens_run_normalises_as_that_run_did(tmp_path):
    """Its inputs were normalised with the source run's statistics (here: those of other images);
    the new run used its own data's (and a pretrained backbone's, ImageNet's)."""
    from conftest import make_imagefolder

    from cifarlens.api import train
    from cifarlens.checkpoint import load_weights

    common = {"model": {"name": "lensnet_light", "kwargs": {"widths": [8], "depths": [1]}},
              "train": {"epochs": 1, "batch_size": 16}}
    stats = {}
    for name, seed in (("source", 0), ("other", 5)):
        data = make_imagefolder(tmp_path / f"{name}-data", classes=("a", "b"), n_per_class=12, n_test_per_class=2,
                                seed=seed, junk=False)
        cfg = merge(RunConfig(), {**common, "data": {"dataset": "imagefolder", "data_dir": str(data.data_dir)}})
        train(cfg, tmp_path / name, report=False)
        stats[name] = json.loads((tmp_path / name / "run.json").read_text())["dataset"]["mean"]
    assert stats["source"] != stats["other"]
    source = tmp_path / "source" / "model.safetensors"
    older = tmp_path / "older" / "model.safetensors"  # a run's file from before the metadata had them
    older.parent.mkdir()
    save_weights(load_weights(source), older)
    (older.parent / "run.json").write_text((tmp_path / "source" / "run.json").read_text())
    exported = tmp_path / "exported.safetensors"
    assert main(["export", str(tmp_path / "source"), "--format", "safetensors", "--out", str(exported)]) == 0
    nonsense = tmp_path / "nonsense.safetensors"  # statistics no image has: not used (std 0 gave a NaN loss)
    save_weights(load_weights(source), nonsense, {"mean": [0, 0, 0], "std": [0, 0, 0]})
    last = tmp_path / "source" / "checkpoints" / "last.pt"
    for start, expected in ((source, "source"), (older, "source"), (exported, "source"), (last, "source"),
                            (nonsense, "other")):
        out = tmp_path / f"from-{start.stem}-{start.parent.name}"
        cfg = merge(RunConfig(), {**common, "data": {"dataset": "imagefolder", "data_dir": str(tmp_path / "other-data")},
                                  "model": {**common["model"], "weights": str(start)}})
        train(cfg, out, report=False)
        assert json.loads((out / "run.json").read_text())["dataset"]["mean"] == pytest.approx(stats[expected]), start


@pytest.mark.parametrize("case", ["other-architecture", "other-classes", "missing"])
def test_cli_rejects_weights_that_do_not_fit_in_one_line(tmp_path, tiny_cifar, capsys, case):
    if case == "other-architecture":
        path = tmp_path / "b0.pt"
        torch.save(torchvision_state("efficientnet_b0"), path)
        expected = "b0.pt does not fit resnet18 (torchvision layout"
    elif case == "other-classes":
        path = tmp_path / "c100.safetensors"
        save_weights(create_model("resnet18", 100, stem="native").state_dict(), path)
        expected = "head.fc.weight is (100, 512) in the file, (10, 512) in the model"
    else:
        path = tmp_path / "nowhere.safetensors"
        expected = "not found"
    out = tmp_path / "run"
    assert main(cifar_args(tiny_cifar, out, "--model", "resnet18", "--set", NATIVE, "--weights", str(path))) == 2
    err = capsys.readouterr().err
    assert expected in err and err.startswith("cifarlens: error: ") and err.count("\n") == 1, err
    assert not out.exists()  # nothing is written before the weights fit


def test_config_file_pretrained_is_not_overridden_by_absent_flag(tmp_path):
    from cifarlens.cli import build_parser
    from cifarlens.config_flags import config_from_args

    config = tmp_path / "c.yaml"
    config.write_text("model: {name: resnet50, pretrained: true}\n")
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(config)]))
    assert cfg.model.pretrained is True and cfg.model.weights is None
    cfg = config_from_args(build_parser().parse_args(["train", "--model", "resnet18", "--weights", "w.pt"]))
    assert (cfg.model.pretrained, cfg.model.weights) == (False, "w.pt")


# ---------------------------------------------------------------------------
# Freezing, parameter groups, BatchNorm
# ---------------------------------------------------------------------------


@pytest.mark.slow  # a two-process torchrun, ~8 s: with the slow set, which CI runs too
def test_freezing_under_data_parallel_training(tmp_path, tiny_cifar, resnet18_file):
    """torchrun, 2 CPU processes: DDP is told about the frozen backbone's missing gradients."""
    import subprocess
    import sys

    path, _ = resnet18_file
    out = tmp_path / "ddp"
    args = cifar_args(
        tiny_cifar,
        out,
        "--model",
        "resnet18",
        "--set",
        "model.kwargs={input_size: 32}",
        "--weights",
        str(path),
        "--recipe",
        "finetune",
        "--epochs",
        "2",
        "--nproc",
        "2",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "cifarlens.cli", *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "2 processes" in log and "backbone frozen" in log and "backbone unfrozen" in log


@pytest.mark.slow  # ~5-7 s; CI runs it with the slow set (the default suite passed 7 minutes)
def test_resume_inside_the_frozen_epochs_ends_where_an_uninterrupted_run_would(tmp_path, tiny_cifar, resnet18_file):
    import csv

    from cifarlens.api import train

    path, _ = resnet18_file
    cfg = merge(
        RunConfig(),
        {
            "data": {"dataset": "cifar10", "data_dir": str(tiny_cifar), "download": False},
            "model": {"name": "resnet18", "kwargs": {"input_size": 32}, "weights": str(path)},
            "train": {"recipe": "finetune", "epochs": 3, "freeze_epochs": 2, "batch_size": 16, "device": "cpu"},
        },
    )
    train(cfg, tmp_path / "full", evaluate_test=False, report=False)

    def stop_after_one(state, model):
        if state.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", on_epoch_end=stop_after_one, report=False)
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-report"]) == 0
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def rows(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader((run / "history.csv").open())]

    assert rows(tmp_path / "full") == rows(tmp_path / "cut")


def finetune_cfg(**overrides):
    return resolve_train(merge(RunConfig(), {"train": {"recipe": "finetune", **overrides}}).train)


def test_freezing_switches_exactly_the_backbone_and_keeps_its_batchnorm_in_eval():
    model = create_model("resnet18", 10, stem="native").train()
    head = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    model.freeze_backbone(True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == head == {"head.fc.weight", "head.fc.bias"}
    model.train()  # what train_one_epoch does: must not put the frozen BatchNorms back in training mode
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and model.training and model.head.training
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in head), n
    model.freeze_backbone(False)
    assert all(p.requires_grad for p in model.parameters()) and all(m.training for m in bns)


def test_fastnet_whitening_stays_frozen_after_unfreezing():
    model = create_model("fastnet_cpu", 10)
    always_frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "whiten.weight" in always_frozen
    model.freeze_backbone(True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.fc.weight"}
    model.freeze_backbone(False)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == always_frozen


def test_optimizer_has_head_and_backbone_groups_at_the_scaled_lr():
    model = create_model("resnet18", 10, stem="native")
    cfg = finetune_cfg(lr=0.04, backbone_lr_scale=0.25)
    optimizer = build_optimizer(param_groups(model, cfg), cfg)
    head, backbone = optimizer.param_groups
    assert (head["name"], backbone["name"]) == ("head", "backbone")
    assert head["lr"] == pytest.approx(0.04) and backbone["lr"] == pytest.approx(0.01)
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head_parameters()}
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone_parameters()}
    # frozen at the time: still in its group, so unfreezing needs no new optimizer
    model.freeze_backbone(True)
    assert len(build_optimizer(param_groups(model, cfg), cfg).param_groups[1]["params"]) == len(backbone["params"])


def test_recipes_have_fine_tuning_defaults_and_check_them():
    plain = resolve_train(merge(RunConfig(), {"train": {"recipe": "modern"}}).train)
    assert (plain.freeze_epochs, plain.backbone_lr_scale) == (0, 1.0)
    tuned = finetune_cfg()
    assert (tuned.freeze_epochs, tuned.backbone_lr_scale, tuned.optimizer) == (1, 0.1, "sgd")
    with pytest.raises(CifarlensError, match="backbone_lr_scale must be > 0"):
        finetune_cfg(backbone_lr_scale=0.0)
    with pytest.raises(CifarlensError, match="freeze_epochs must be >= 0"):
        finetune_cfg(freeze_epochs=-1)


def synthetic_loader(n: int = 32, batch: int = 16, seed: int = 0) -> TensorLoader:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = torch.from_numpy(synthetic_images(labels, 3, 32, 32, rng))
    split = Split(images, torch.from_numpy(labels).long())
    return TensorLoader(
        split, batch, lambda x, g: (x.float() / 255 - 0.45) / 0.225, device=torch.device("cpu"), shuffle=True
    )


def test_fit_freezes_then_unfreezes_by_epoch_number():
    """Epoch 1 frozen: backbone parameters, BatchNorm statistics and momentum untouched; epoch 2 trains them."""
    torch.manual_seed(0)
    model = create_model("resnet18", 10, input_size=32)  # the ImageNet stem at 32x32: cheap, same mechanics
    cfg = finetune_cfg(epochs=2, lr=0.01, warmup_epochs=0.0)
    loader = synthetic_loader()
    optimizer = build_optimizer(param_groups(model, cfg), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scheduler.per_step = True
    start = {k: v.clone() for k, v in model.state_dict().items()}
    after: list[dict] = []
    lines: list[str] = []

    def end(state):
        after.append({k: v.clone() for k, v in model.state_dict().items()})
        backbone = optimizer.param_groups[1]["params"]
        after[-1]["momentum"] = sum(p in optimizer.state for p in backbone)

    fit(
        model,
        loader,
        loader,
        optimizer,
        scheduler,
        Precision(torch.device("cpu")),
        cfg,
        FitState(),
        on_improvement=lambda s: None,
        on_epoch_end=end,
        log=lines.append,
    )
    frozen, unfrozen = after
    for k, v in start.items():
        if k.startswith("backbone."):
            assert torch.equal(frozen[k], v), f"{k} changed during the frozen epoch"
    assert not torch.equal(frozen["head.fc.weight"], start["head.fc.weight"])
    assert frozen["momentum"] == 0  # no optimizer state for parameters that never had a gradient
    assert not torch.equal(unfrozen["backbone.bn1.running_mean"], start["backbone.bn1.running_mean"])
    assert not torch.equal(unfrozen["backbone.layer1.0.conv1.weight"], start["backbone.layer1.0.conv1.weight"])
    assert unfrozen["momentum"] == len(optimizer.param_groups[1]["params"])
    assert any("backbone frozen" in line for line in lines) and any("backbone unfrozen" in line for line in lines)


def test_a_few_fine_tuning_steps_reduce_the_loss(resnet18_file):
    path, _ = resnet18_file
    torch.manual_seed(0)
    model = create_model("resnet18", 10, input_size=64)  # 4x cheaper than the native stem at 32x32
    load_initial_weights(model, ModelConfig(name="resnet18", weights=str(path)))
    # a small lr: random "pretrained" features are far larger than ImageNet ones, and 0.05 overshoots
    cfg = finetune_cfg(lr=0.002)
    optimizer = build_optimizer(param_groups(model, cfg), cfg)
    images, labels = next(iter(synthetic_loader(n=20, batch=20)))

    def loss() -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model.eval()(images), labels))

    before = loss()
    for step in range(8):
        model.freeze_backbone(step < 4)  # linear probe, then everything
        model.train()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    assert loss() < 0.8 * before  # eval mode: the model as evaluated and served


# ---------------------------------------------------------------------------
# Everything else on a fine-tuned run: evaluate, predict, explain, report, serve, export, compare
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_cifar, resnet18_file):
    """resnet18 (native stem) fine-tuned from a file for 2 epochs (1 frozen), and 1 epoch of it from scratch."""
    path, _ = resnet18_file
    root = tmp_path_factory.mktemp("finetuned")
    common = ["--model", "resnet18", "--set", NATIVE, "--recipe", "finetune", "--lr", "0.01"]
    assert main(cifar_args(tiny_cifar, root / "transfer", *common, "--epochs", "2", "--weights", str(path))) == 0
    assert (
        main(cifar_args(tiny_cifar, root / "scratch", *common, "--epochs", "1", "--set", "train.freeze_epochs=0")) == 0
    )
    return root / "transfer", root / "scratch", tiny_cifar


def test_evaluate_and_predict_on_a_finetuned_run(finetuned, capsys):
    run_dir, _, data_dir = finetuned
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert main(["evaluate", str(run_dir), "--device", "cpu"]) == 0
    again = json.loads((run_dir / "metrics.json").read_text())
    assert again["accuracy"] == metrics["accuracy"]  # the same normalisation (ImageNet's) both times
    images = torch.from_numpy(make_cifar10(data_dir.parent / "again", n_train_per_batch=8, n_test=4).test_images)
    preds = load_run(run_dir).predict(images, topk=3)
    assert len(preds) == 4 and all(len(p.labels) == 3 for p in preds)


def test_explain_on_a_finetuned_run(finetuned, tmp_path, capsys):
    run_dir, _, _ = finetuned
    out = tmp_path / "explain"
    assert main(["explain", str(run_dir), "--indices", "0,1", "--out", str(out), "--save-maps"]) == 0
    stdout = capsys.readouterr().out
    assert "layer backbone.layer3 (8x8 maps)" in stdout
    assert np.load(out / "maps" / "test_00000.npy").shape == (32, 32)


def test_export_on_a_finetuned_run(finetuned, tmp_path):
    from cifarlens import export

    run_dir, _, _ = finetuned
    onnx_path, diff = export.export_onnx(run_dir, out=tmp_path / "model.onnx")
    assert onnx_path.is_file() and diff < 1e-3
    assert main(["export", str(run_dir), "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")]) == 0


def test_report_and_compare_show_transfer_against_scratch(finetuned, capsys):
    transfer, scratch, _ = finetuned
    assert main(["report", str(transfer), "--device", "cpu", "--no-robustness"]) == 0
    page = (transfer / "report.html").read_text()
    assert "initial weights" in page and "resnet18-imagenet.safetensors (torchvision layout" in page
    assert "FLOPs per 32x32 image" in page
    capsys.readouterr()
    assert main(["compare", str(transfer), str(scratch)]) == 0
    out = capsys.readouterr().out
    compute = [line for line in out.splitlines() if "random init" in line or "torchvision layout" in line]
    assert len(compute) == 2 and compute[0].startswith("transfer ") and compute[1].startswith("scratch ")
    assert "file resnet18-imagenet.safetensors" in compute[0] and "scratch (random init)" in compute[1]
    for line, run_dir in zip(compute, (transfer, scratch)):
        rows = list(csv.DictReader((run_dir / "history.csv").open()))  # the batches trained (the last partial one dropped)
        images = sum(int(row["train_samples"]) for row in rows)
        assert 0 < images <= len(rows) * json.loads((run_dir / "run.json").read_text())["split_sizes"]["train"]
        assert "11.18M" in line and line.count("GFLOPs") == 2 and f" {images} " in line
    assert re.search(r"model\.weights\s+\S*resnet18-imagenet\.safetensors\s+None", out)
    assert re.search(r"train\.freeze_epochs\s+1\s+0", out)


def test_serve_predicts_and_explains_a_finetuned_run(finetuned):
    import io

    import httpx
    from PIL import Image
    from test_serve import LiveServer

    from cifarlens.serve.app import create_app

    run_dir, _, _ = finetuned
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buf, "PNG")
    upload = {"file": ("x.png", buf.getvalue(), "image/png")}
    with (
        LiveServer(create_app(run_dir, log=lambda line: None)) as live,
        httpx.Client(base_url=live.url, timeout=60) as c,
    ):
        r = c.post("/api/predict", files=upload)
        assert r.status_code == 200 and len(r.json()["top"]) == 5 and r.json()["model"] == "resnet18"
        r = c.post("/api/explain", files=upload)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def test_freezing_a_model_from_scratch_or_for_every_epoch_is_warned(tmp_path):
    """The head trained on random features (loss 8.9 in an exploratory run), without a word."""
    from conftest import make_imagefolder

    from cifarlens.api import train

    data = make_imagefolder(tmp_path / "data", classes=("a", "b"), n_per_class=12, n_test_per_class=2, junk=False)
    model = {"name": "lensnet_light", "kwargs": {"widths": [8], "depths": [1]}}
    base = {"data": {"dataset": "imagefolder", "data_dir": str(data.data_dir)}, "model": model,
            "train": {"epochs": 2, "batch_size": 16, "freeze_epochs": 1}}
    train(merge(RunConfig(), base), tmp_path / "scratch", report=False)
    assert "warning: train.freeze_epochs 1 with a model from scratch" in (tmp_path / "scratch" / "train.log").read_text()
    start = tmp_path / "scratch" / "model.safetensors"
    probe = merge(RunConfig(), {**base, "model": {**model, "weights": str(start)},
                                "train": {**base["train"], "freeze_epochs": 2}})
    train(probe, tmp_path / "probe", report=False)
    log = (tmp_path / "probe" / "train.log").read_text()
    assert "train.freeze_epochs 2 of 2 epochs: the backbone never trains" in log and "from scratch" not in log
