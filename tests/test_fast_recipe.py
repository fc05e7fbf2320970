"""The optional pieces of the airbench-style recipe (issue 16): translation TTA, Muon, training
without a validation split, and FastNet's whitening bias trained for the first epochs only."""

import copy
import csv
import itertools
import json
import shutil
from dataclasses import replace

import pytest
import torch
import yaml
from conftest import fast_epoch_parts, train_tiny_cifar10
from test_engine import HostReads
from torch import nn

from cifarlens.config import RunConfig, merge
from cifarlens.data.base import Split
from cifarlens.data.loader import TensorLoader
from cifarlens.engine import (
    FitState,
    Precision,
    evaluate,
    fit,
    forward_tta,
    predict_logits,
    train_one_epoch,
)
from cifarlens.errors import CifarlensError
from cifarlens.models import create_model
from cifarlens.optim import MuonSGD, orthogonalize
from cifarlens.recipes import resolve_train
from cifarlens.schedules import build_optimizer, build_scheduler, param_groups
from cifarlens.tta import tta_views

CPU = torch.device("cpu")


def train_cfg(**train):
    return resolve_train(merge(RunConfig(), {"train": {"recipe": "fast_cpu", **train}}).train)


def learnable_loader(batches: int = 8, batch_size: int = 8, seed: int = 0) -> TensorLoader:
    """Batches of 8x8 grey images whose brightness gives the class (3 classes)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(batches * batch_size) % 3
    images = (labels[:, None, None, None] * 80 + torch.randint(0, 40, (len(labels), 1, 8, 8), generator=gen))
    return TensorLoader(Split(images.to(torch.uint8), labels), batch_size, lambda x, g: x.float() / 255, device=CPU)


def tiny_fastnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("fastnet", 10, 3, widths=[4, 8, 8])


# -- 1. translation test-time augmentation ----------------------------------------------------

def reflect_shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x`` with its content moved by (dy, dx) pixels, the border filled by reflection, by hand."""
    h, w = x.shape[-2:]

    def reflect(i: int, n: int) -> int:
        return -i if i < 0 else 2 * (n - 1) - i if i >= n else i

    rows = torch.tensor([reflect(i - dy, h) for i in range(h)])
    cols = torch.tensor([reflect(j - dx, w) for j in range(w)])
    return x[..., rows, :][..., :, cols]


def test_tta_views_are_the_mirror_and_the_reflect_padded_translations():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    flip_only = tta_views(x, 0)
    assert [w for w, _ in flip_only] == [0.5, 0.5]
    assert torch.equal(flip_only[0][1], x) and torch.equal(flip_only[1][1], x.flip(3))
    views = tta_views(x, 2)
    assert [w for w, _ in views] == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125] and sum(w for w, _ in views) == 1
    down_right, up_left = reflect_shift(x, 2, 2), reflect_shift(x, -2, -2)
    want = [x, x.flip(3), down_right, up_left, down_right.flip(3), up_left.flip(3)]
    for (_, got), expected in zip(views, want, strict=True):
        assert torch.equal(got, expected)
    assert torch.equal(views[2][1][..., 2:, 2:], x[..., :-2, :-2])  # moved down-right by 2 pixels
    with pytest.raises(ValueError, match="larger"):
        tta_views(x, 5)


def test_translate_zero_is_todays_flip_tta_and_tta_off_is_the_plain_forward():
    model = tiny_fastnet().eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(forward_tta(model, x, True, 0), 0.5 * (model(x) + model(x.flip(3))))
        assert torch.equal(forward_tta(model, x, True), forward_tta(model, x, True, 0))
        assert torch.equal(forward_tta(model, x, False, 3), model(x))


def test_translate_one_averages_six_views_as_airbench94_does():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).eval()
    x = torch.randn(3, 3, 6, 6)
    f = model
    with torch.no_grad():
        a, b = reflect_shift(x, 1, 1), reflect_shift(x, -1, -1)
        mirror = lambda v: 0.5 * (f(v) + f(v.flip(3)))
        want = 0.5 * mirror(x) + 0.5 * (0.5 * (mirror(a) + mirror(b)))
        got = forward_tta(model, x, True, 1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, forward_tta(model, x, True, 0))


def test_evaluation_passes_the_translation_and_reads_nothing_per_batch():
    model = tiny_fastnet().eval()
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    loader = TensorLoader(Split(images, torch.arange(24) % 10), 8, lambda x, g: x.float() / 255, device=CPU)
    logits, _ = predict_logits(model, loader, Precision(CPU), tta=True, translate=2)
    with torch.no_grad():
        want = forward_tta(model, images.float() / 255, True, 2)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)

    def reads(batches: int) -> int:
        with HostReads() as counted:
            evaluate(model, TensorLoader(Split(images[:8 * batches], torch.arange(8 * batches) % 10), 8,
                                         lambda x, g: x.float() / 255, device=CPU), Precision(CPU), True, 2)
        return counted.count

    assert reads(1) == reads(3)


# -- 2. Muon -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(16, 72), (72, 16), (8, 8)])
def test_newton_schulz_gives_a_near_orthogonal_matrix(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape) * 1e-3  # the scale does not matter: the iteration normalises first
    out = orthogonalize(g)
    assert out.shape == g.shape and out.dtype == g.dtype
    s = torch.linalg.svdvals(out)
    assert len(s) == min(shape) and 0.3 < s.min() and s.max() < 1.3, s  # the quintic's band, ~[0.7, 1.2]


@pytest.mark.parametrize("shape, rank", [((16, 72), 16), ((72, 16), 16), ((64, 576), 5), ((24, 30), 24)])
def test_newton_schulz_in_fp32_is_the_posts_iteration(shape, rank, monkeypatch):
    """In fp32 a wide matrix iterates on its Gram matrix (optim._gram_iteration): the result of
    the post's quintic iteration on the matrix itself (computed in float64 here), low-rank updates
    included, to 2e-4 relative (measured 3e-6..8e-5, against 1e-6..2e-5 for the plain iteration
    in fp32; Newton-Schulz in bf16 is ~1e-2 off)."""
    import cifarlens.optim as optim

    monkeypatch.setattr(optim, "cpu_bf16_pays", lambda: False)
    torch.manual_seed(0)
    g = torch.randn(shape[0], rank) @ torch.randn(rank, shape[1])
    a, b, c = optim.NS_COEFFICIENTS
    x = (g.T if shape[0] > shape[1] else g).double()
    x = x / (x.norm() + 1e-7)
    for _ in range(optim.NS_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    expected = x.T if shape[0] > shape[1] else x
    out = orthogonalize(g)
    assert out.shape == g.shape and torch.isfinite(out).all()
    assert out.dtype == torch.float32 and (out - expected).norm() / expected.norm() < 2e-4
    assert torch.equal(orthogonalize(torch.zeros(shape)), torch.zeros(shape))  # a zero update stays zero


def test_muon_groups_lrs_and_schedule():
    model = tiny_fastnet()
    cfg = train_cfg(optimizer="muon", lr=0.4, muon_lr=0.1, backbone_lr_scale=0.5)
    optimizer = build_optimizer(param_groups(model, cfg), cfg)
    assert isinstance(optimizer, MuonSGD)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["head", "backbone", "backbone.muon"]  # head first: its lr is the one logged
    assert [g["muon"] for g in groups.values()] == [False, False, True]
    assert all(p.ndim == 4 for p in groups["backbone.muon"]["params"])
    assert not any(p.ndim == 4 for g in ("head", "backbone") for p in groups[g]["params"])
    assert [g["lr"] for g in groups.values()] == pytest.approx([0.4, 0.2, 0.05])
    scheduler = build_scheduler(optimizer, replace(cfg, warmup_epochs=1.0), 10)  # one schedule scales all groups
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == pytest.approx([0.04, 0.02, 0.005])
    assert scheduler.per_step
    # muon_lr 0: the filters take lr
    default = build_optimizer(model.parameters(), train_cfg(optimizer="muon", lr=0.4, muon_lr=0.0))
    assert [g["lr"] for g in default.param_groups] == pytest.approx([0.4, 0.4])


def test_muon_sgd_groups_step_exactly_as_torch_sgd():
    model = tiny_fastnet()
    twin = tiny_fastnet()
    vectors = [p for p in model.parameters() if p.ndim != 4 and p.requires_grad]
    twin_vectors = [p for p in twin.parameters() if p.ndim != 4 and p.requires_grad]
    ours = MuonSGD([{"params": vectors, "muon": False}], lr=0.1, momentum=0.85, nesterov=True, weight_decay=5e-4)
    theirs = torch.optim.SGD(twin_vectors, lr=0.1, momentum=0.85, nesterov=True, weight_decay=5e-4)
    x = torch.randn(8, 3, 32, 32)
    for _ in range(3):
        for net, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(vectors, twin_vectors):
        assert torch.equal(a, b)


def test_muon_lowers_the_loss_of_a_small_model():
    torch.manual_seed(0)
    model = create_model("lensnet_light", 3, 1, widths=[8], depths=[1])
    cfg = train_cfg(optimizer="muon", lr=0.05, muon_lr=0.02, weight_decay=5e-4)
    optimizer = build_optimizer(param_groups(model, cfg), cfg)
    assert any(g["muon"] and g["params"] for g in optimizer.param_groups)
    loader = learnable_loader()
    losses = [train_one_epoch(model, loader, optimizer, None, Precision(CPU))["train_loss"] for _ in range(4)]
    assert losses[-1] < 0.6 * losses[0], losses


def test_muon_state_dict_round_trip_resumes_exactly():
    loader = learnable_loader(batches=4)
    cfg = train_cfg(optimizer="muon", lr=0.05, muon_lr=0.02)

    def parts(seed=0):
        torch.manual_seed(seed)
        model = create_model("lensnet_light", 3, 1, widths=[8], depths=[1])
        optimizer = build_optimizer(param_groups(model, cfg), cfg)
        return model, optimizer

    model, optimizer = parts()
    train_one_epoch(model, loader, optimizer, None, Precision(CPU))
    # copies, as a checkpoint file holds: state_dict()s share the live tensors
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    assert any("momentum_buffer" in s for s in saved_optimizer["state"].values())
    resumed, resumed_optimizer = parts(seed=1)  # other initial weights: all of it must come from the state
    resumed.load_state_dict(saved_model)
    resumed_optimizer.load_state_dict(saved_optimizer)
    for net, opt in ((model, optimizer), (resumed, resumed_optimizer)):
        torch.manual_seed(2)  # the same dropout draws
        train_one_epoch(net, loader, opt, None, Precision(CPU))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_muon_step_never_waits_for_the_device():
    def reads(batches: int) -> int:
        model, loader, _, _, ema, cfg = fast_epoch_parts(CPU, batches, 4, widths=[4, 8])
        cfg = replace(cfg, optimizer="muon")
        optimizer = build_optimizer(param_groups(model, cfg), cfg)
        scheduler = build_scheduler(optimizer, cfg, len(loader))
        with HostReads() as training:
            train_one_epoch(model, loader, optimizer, scheduler, Precision(CPU), label_smoothing=cfg.label_smoothing,
                            ema=ema, check_every=1000)
        return training.count

    reads(1)  # constants made once per device are made here
    assert reads(2) == reads(6)


# -- 3 and 4 in the engine: no validation split; the whitening bias's epochs ------------------------

def random_cifar_loader(n: int = 32, batch_size: int = 16) -> TensorLoader:
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen), torch.arange(n) % 10)
    return TensorLoader(split, batch_size, lambda x, g: x.float() / 255 - 0.5, device=CPU, shuffle=True)


def fit_without_validation(whiten_bias_epochs: int, epochs: int = 3):
    """fit() with no validation loader; the whitening bias after each epoch, the epochs saved, the log."""
    model = tiny_fastnet()
    cfg = train_cfg(epochs=epochs, whiten_bias_epochs=whiten_bias_epochs)
    loader = random_cifar_loader()
    optimizer = build_optimizer(param_groups(model, cfg), cfg)
    scheduler = build_scheduler(optimizer, cfg, len(loader))
    biases, saved, lines = [model.whiten.bias.detach().clone()], [], []
    state = fit(model, loader, None, optimizer, scheduler, Precision(CPU), cfg, FitState(),
                on_improvement=lambda s: saved.append(s.epoch),
                on_epoch_end=lambda s: biases.append(model.whiten.bias.detach().clone()), log=lines.append)
    return state, biases, saved, lines


def test_whitening_bias_stops_training_after_its_epochs():
    _, biases, _, lines = fit_without_validation(whiten_bias_epochs=1)
    assert not torch.equal(biases[0], biases[1])  # epoch 1 trains it
    assert torch.equal(biases[1], biases[2]) and torch.equal(biases[2], biases[3])  # epochs 2 and 3 do not
    assert sum("whitening layer's bias stops training" in line for line in lines) == 1
    _, always, _, _ = fit_without_validation(whiten_bias_epochs=0)
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(always))  # 0: every epoch trains it


def test_whitening_bias_stays_frozen_on_resume_and_under_a_frozen_backbone():
    from cifarlens.engine import set_backbone_frozen, stop_whiten_bias

    model = tiny_fastnet()
    stop_whiten_bias(model, 0, 2, log=lambda s: None)
    assert model.whiten.bias.requires_grad
    stop_whiten_bias(model, 5, 2, log=lambda s: None)  # a fresh model, as a run resumed at epoch 6 builds
    assert not model.whiten.bias.requires_grad
    net = tiny_fastnet()  # backbone frozen for 3 epochs, whitening bias trained for 1
    for epoch in range(4):
        set_backbone_frozen(net, epoch < 3, epoch, log=lambda s: None)
        stop_whiten_bias(net, epoch, 1, log=lambda s: None)
    assert not net.whiten.bias.requires_grad and net.blocks[0].conv1.weight.requires_grad


def test_fit_without_validation_keeps_every_epoch_and_logs_it():
    state, _, saved, lines = fit_without_validation(whiten_bias_epochs=0, epochs=2)
    assert saved == [1, 2] and state.best_epoch == 2  # the kept weights are the final ones
    assert all("val_loss" not in row and "val_acc" not in row for row in state.history)
    assert all("no validation split" in line for line in lines if line.startswith("epoch ") and "train_loss" in line)


def test_fit_refuses_plateau_or_early_stopping_without_validation():
    model = tiny_fastnet()
    loader = random_cifar_loader()
    for train in ({"recipe": "reference", "epochs": 1}, {"epochs": 1, "early_stopping": 2}):
        cfg = resolve_train(merge(RunConfig(), {"train": train}).train) if "recipe" in train else train_cfg(**train)
        optimizer = build_optimizer(param_groups(model, cfg), cfg)
        with pytest.raises(CifarlensError, match="validation split"):
            fit(model, loader, None, optimizer, build_scheduler(optimizer, cfg, len(loader)), Precision(CPU), cfg,
                FitState(), on_improvement=lambda s: None, on_epoch_end=lambda s: None, log=lambda s: None)


# -- a whole run: no validation split, Muon, translation TTA, whitening bias for 1 epoch -------------

@pytest.fixture(scope="module")
def fixed_budget_run(tmp_path_factory):
    return train_tiny_cifar10(tmp_path_factory.mktemp("fixed"), "--set", "model.kwargs={widths: [8, 16, 16]}",
                              "--set", "data.val_fraction=0", "--set", "train.optimizer=muon", "--set", "train.muon_lr=0.1",
                              "--set", "train.tta_translate=1", "--set", "train.whiten_bias_epochs=1", epochs=2)


def test_a_run_without_validation_trains_on_every_image_and_skips_calibration(fixed_budget_run):
    from cifarlens.checkpoint import load_checkpoint, load_weights

    out, _ = fixed_budget_run
    meta = json.loads((out / "run.json").read_text())
    assert meta["split_sizes"] == {"train": 200, "val": 0, "test": 50}
    assert meta["status"] == "finished" and meta["best_epoch"] == 2 and meta["best_val_loss"] is None
    assert "calibration" not in meta
    log = (out / "train.log").read_text()
    assert "no validation split (data.val_fraction 0)" in log
    assert "calibration skipped: the run has no validation images" in log
    assert "epoch 2: the whitening layer's bias stops training" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["split_size"] == 50
    with (out / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["val_loss"] == "" and r["val_acc"] == "" for r in rows)
    # the weights kept are the final EMA weights (fast_cpu averages them)
    ema = load_checkpoint(out / "checkpoints" / "last.pt")["ema"]
    kept = load_weights(out / "model.safetensors")
    assert all(torch.equal(value, ema[f"module.{key}"]) for key, value in kept.items())
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["optimizer"] == "muon" and cfg["train"]["tta_translate"] == 1


def test_a_run_without_validation_refuses_evaluation_on_it(fixed_budget_run, capsys):
    from cifarlens.cli import main

    out, _ = fixed_budget_run
    assert main(["evaluate", str(out), "--split", "val", "--device", "cpu"]) == 2
    assert "no validation images" in capsys.readouterr().err


def test_plateau_or_early_stopping_without_validation_is_an_error_before_any_run_folder(fixed_budget_run, tmp_path,
                                                                                          capsys):
    from cifarlens.cli import main

    _, data = fixed_budget_run
    for extra in (["--set", "train.schedule=plateau"], ["--set", "train.early_stopping=2"]):
        out = tmp_path / "refused"
        assert main(["train", "--dataset", "cifar10", "--data-dir", str(data), "--no-download", "--model",
                     "fastnet_cpu", "--epochs", "1", "--device", "cpu", "--out", str(out),
                     "--set", "data.val_fraction=0", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "need a validation split, and data.val_fraction is 0" in err[0]
        assert not out.exists()


def test_the_run_predicts_with_its_translation_tta_and_old_configs_mean_none(fixed_budget_run, tmp_path):
    from cifarlens.api import load_run

    out, data = fixed_budget_run
    run = load_run(out)
    assert run.tta and run.tta_translate == 1
    images = run.data(str(data)).test.images[:4]
    with torch.no_grad():
        want = forward_tta(run.model, run.preprocess(images), True, 1)
    torch.testing.assert_close(run.predict_logits(images), want)
    old = tmp_path / "old"  # a run written before tta_translate existed
    shutil.copytree(out, old)
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    del cfg["train"]["tta_translate"]
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    from cifarlens.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(old / "checkpoints" / "last.pt")  # its checkpoint lacks it too (else it is taken from there)
    del ckpt["config"]["train"]["tta_translate"]
    save_checkpoint(old / "checkpoints" / "last.pt", ckpt)
    assert load_run(old).tta_translate == 0


def test_onnx_backend_averages_the_same_translated_views(fixed_budget_run, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from cifarlens.api import load_run
    from cifarlens.export import export_onnx
    from cifarlens.serve.service import OnnxBackend, TorchBackend

    out, data = fixed_budget_run
    run = load_run(out)
    path, _ = export_onnx(out, tmp_path / "model.onnx", images=[])
    images = run.data(str(data)).test.images[:6]
    onnx = OnnxBackend(run, path).predict_proba(images)
    torch.testing.assert_close(onnx, TorchBackend(run).predict_proba(images), atol=1e-4, rtol=1e-4)
    flip_only = replace(run.config, train=replace(run.config.train, tta_translate=0))
    run.config = flip_only  # the translations change the answer: the agreement above is not vacuous
    assert not torch.allclose(OnnxBackend(run, path).predict_proba(images), onnx, atol=1e-6)


def test_tuning_refuses_a_config_without_validation(tmp_path):
    pytest.importorskip("optuna")
    from cifarlens.tune.search import Tuner

    with pytest.raises(CifarlensError, match="val_fraction"):
        Tuner(merge(RunConfig(), {"data": {"val_fraction": 0}}), tmp_path, trials=1)
