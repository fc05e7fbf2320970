"""The training loop's decisions: early stopping, the plateau schedule, best-checkpoint choice."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from cifarlens import engine
from cifarlens.config import RunConfig, TrainConfig, merge
from cifarlens.data.base import Split
from cifarlens.data.loader import TensorLoader
from cifarlens.engine import FitState, Precision, cpu_bf16_pays, cpu_has_native_bf16, fit, resolve_device
from cifarlens.errors import CifarlensError
from cifarlens.models import create_model
from cifarlens.recipes import resolve_train
from cifarlens.schedules import build_optimizer, build_scheduler
from conftest import fast_epoch_parts


def setup(monkeypatch, val_losses, **train):
    """A tiny model and loader whose validation losses are scripted, epoch by epoch."""
    cfg = resolve_train(merge(RunConfig(), {"train": {"recipe": "fast_cpu", "epochs": len(val_losses), **train}}).train)
    model = create_model("lensnet_light", 3, 1, widths=[4], depths=[1])
    split = Split(torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8), torch.arange(16) % 3)
    loader = TensorLoader(split, 8, lambda x, g: x.float() / 255, device=torch.device("cpu"), shuffle=True)
    losses = iter(val_losses)
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: {"loss": next(losses), "acc": 0.5})
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, len(loader))
    return cfg, model, loader, optimizer, scheduler


def run(cfg, model, loader, optimizer, scheduler):
    improved = []
    state = fit(model, loader, loader, optimizer, scheduler, Precision(torch.device("cpu")), cfg, FitState(),
                on_improvement=lambda s: improved.append(s.epoch), on_epoch_end=lambda s: None, log=lambda s: None)
    return state, improved


def test_early_stopping_and_best_epoch(monkeypatch):
    parts = setup(monkeypatch, [1.0, 0.8, 0.9, 0.85, 0.95, 0.5, 0.4], early_stopping=3)
    state, improved = run(*parts)
    assert improved == [1, 2]  # the best weights are saved only when val loss improves
    assert state.stopped_early and state.epoch == 5 and len(state.history) == 5
    assert state.best_epoch == 2 and state.best_val_loss == 0.8


def test_plateau_schedule_lowers_lr_on_validation_loss(monkeypatch):
    parts = setup(monkeypatch, [1.0, 1.1, 1.2, 1.3, 1.4], recipe="reference", plateau_patience=1,
                  plateau_factor=0.5, lr=0.01)
    state, _ = run(*parts)
    lrs = [row["lr"] for row in state.history]
    # epochs 2 and 3 do not improve: more than `patience` bad epochs, so epoch 4 runs at half the lr
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.005, 0.005])
    assert not state.stopped_early


def test_onecycle_lr_rises_then_falls_to_zero(monkeypatch):
    parts = setup(monkeypatch, [1.0] * 4, warmup_epochs=1.0, lr=0.1)
    cfg, model, loader, optimizer, scheduler = parts
    run(*parts)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_a_partial_last_epoch_trains_its_share_of_the_batches_and_the_schedule_ends_with_them():
    cfg = resolve_train(merge(RunConfig(), {"train": {"recipe": "fast_cpu", "epochs": 3, "last_epoch_fraction": 0.3,
                                                      "warmup_epochs": 0.0, "lr": 0.1, "ema_decay": 0.0}}).train)
    model = create_model("lensnet_light", 3, 1, widths=[4], depths=[1])
    split = Split(torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8), torch.arange(40) % 3)
    loader = TensorLoader(split, 4, lambda x, g: x.float() / 255, device=torch.device("cpu"), shuffle=True)
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, len(loader))
    assert scheduler.total_steps == 2 * 10 + 3
    state = fit(model, loader, None, optimizer, scheduler, Precision(torch.device("cpu")), cfg, FitState(),
                on_improvement=lambda s: None, on_epoch_end=lambda s: None, log=lambda s: None)
    assert [row["train_samples"] for row in state.history] == [40, 40, 12]  # 3 of the last epoch's 10 batches
    assert state.epoch == 3 and optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert state.history[-1]["lr"] == pytest.approx(0.1 / 23)  # the last step's: the decay's last rung


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_a_last_epoch_fraction_outside_0_to_1_is_refused(fraction):
    with pytest.raises(CifarlensError, match=r"train.last_epoch_fraction must be in \(0, 1\]"):
        resolve_train(merge(RunConfig(), {"train": {"recipe": "fast_cpu", "last_epoch_fraction": fraction}}).train)


@pytest.mark.parametrize("check_every", [None, 1000])  # every step (a CPU's default), or only at the epoch's end
def test_nan_loss_stops_with_an_error(check_every):
    model = create_model("lensnet_light", 3, 1, widths=[4], depths=[1])
    # batch 0 is finite (log(2 - 1) = 0), batches 1 and 2 are not (log(0 - 1) = nan)
    images = torch.cat([torch.full((4, 1, 8, 8), 2), torch.zeros((8, 1, 8, 8))]).to(torch.uint8)
    split = Split(images, torch.zeros(12, dtype=torch.int64))
    loader = TensorLoader(split, 4, lambda x, g: torch.log(x.float() - 1), device=torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(engine.TrainingDiverged, match="became nan at step 2 of"):
        engine.train_one_epoch(model, loader, optimizer, None, Precision(torch.device("cpu")), check_every=check_every)


class CountingLoader:
    """A loader that counts the batches taken from it: how far an epoch got before it stopped."""

    def __init__(self, loader):
        self.loader, self.taken = loader, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.taken += 1
            yield batch


def learnable_loader(batches: int, batch_size: int = 8) -> TensorLoader:
    """Batches of 8x8 grey images whose brightness gives the class (3 classes)."""
    labels = torch.arange(batches * batch_size) % 3
    images = (labels[:, None, None, None] * 80 + torch.randint(0, 40, (len(labels), 1, 8, 8))).to(torch.uint8)
    return TensorLoader(Split(images, labels), batch_size, lambda x, g: x.float() / 255, device=torch.device("cpu"))


@pytest.mark.parametrize("check_every", [None, 3, 1000])  # every step (a CPU's default), every 3rd, epoch's end
def test_an_exploding_loss_stops_at_the_first_check_after_it(check_every):
    """Adam at lr 1e4 throws the loss to ~1e9 after one step and keeps it finite: it is stopped
    as exploded, naming the step, at the first check after it (not at the first NaN)."""
    torch.manual_seed(0)
    model = create_model("lensnet_light", 3, 1, widths=[4], depths=[1])
    loader = CountingLoader(learnable_loader(8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e4)
    with pytest.raises(engine.TrainingExploded) as stopped:
        engine.train_one_epoch(model, loader, optimizer, None, Precision(torch.device("cpu")), check_every=check_every,
                               desc="epoch 1/3")
    message = str(stopped.value)
    assert "\n" not in message and isinstance(stopped.value, engine.TrainingDiverged)
    loss = float(re.search(r"became (\S+) at step 2 of epoch 1/3, over the divergence limit 16\.0 ", message)[1])
    assert math.isfinite(loss) and loss > engine.exploded_loss_limit(3) and "--lr" in message
    # step 1 exploded; the check after step k runs when (k + 1) % check_every == 0, or at the epoch's end
    assert loader.taken == {None: 2, 3: 3, 1000: 8}[check_every]


def test_the_divergence_limit_is_far_above_chance_and_a_normal_run_stays_below_it():
    assert engine.exploded_loss_limit(10) == pytest.approx(10 * math.log(10) + 5)
    assert engine.exploded_loss_limit(2) > 10 and engine.exploded_loss_limit(100) > 50
    torch.manual_seed(0)
    model = create_model("lensnet_light", 3, 1, widths=[4], depths=[1])
    loader = learnable_loader(8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.8, momentum=0.85, nesterov=True)  # fast_cpu's peak lr
    losses = [engine.train_one_epoch(model, loader, optimizer, None, Precision(torch.device("cpu")))["train_loss"]
              for _ in range(4)]
    assert max(losses) < engine.exploded_loss_limit(3) / 4, losses


class HostReads(TorchFunctionMode):
    """Counts what would make a GPU's queue run dry: reading a tensor's value on the host
    (``if t``, ``t.item()``, ...) or making a tensor from host data (a host-to-device copy)."""

    WATCHED = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__,
               torch.Tensor.__index__, torch.Tensor.tolist, torch.tensor, torch.as_tensor}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in self.WATCHED
        return func(*args, **(kwargs or {}))


def test_a_training_step_never_waits_for_the_device():
    """With the fast recipe's pieces (batched crop, flip and colour jitter, label smoothing,
    per-step schedule, EMA), the host reads of an epoch and of an evaluation do not grow with
    their number of batches: none happens per step (on a CPU the loss check is, by default)."""
    cpu = torch.device("cpu")

    def reads(batches: int) -> tuple[int, int]:
        model, loader, optimizer, scheduler, ema, cfg = fast_epoch_parts(cpu, batches, 4, widths=[4, 8])
        with HostReads() as training:
            engine.train_one_epoch(model, loader, optimizer, scheduler, Precision(cpu),
                                   label_smoothing=cfg.label_smoothing, ema=ema, check_every=1000)
        with HostReads() as evaluation:
            engine.evaluate(ema.module, loader, Precision(cpu), tta=True)
        return training.count, evaluation.count

    reads(1)  # constants made once per device (normalisation, jitter) are made here
    assert reads(2) == reads(6)


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(CifarlensError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(CifarlensError, match="CUDA is not available"):
            resolve_device("cuda")


def test_the_cpu_is_described_with_its_instruction_set_and_threads():
    from cifarlens.device import device_description

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = device_description(torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
    isa = torch.backends.cpu.get_cpu_capability()
    bf16 = ", native bf16" if cpu_bf16_pays() else ", native bf16 unused" if cpu_has_native_bf16() else ""
    assert one.endswith(f"({isa}{bf16}), 1 thread")
    if before > 1:
        assert device_description(torch.device("cpu")).endswith(f"), {before} threads")


@pytest.mark.gpu
def test_cuda_mixed_precision_training_step():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    precision = Precision.for_device(device, amp=True, channels_last=True)
    assert precision.dtype in (torch.bfloat16, torch.float16)
    model = create_model("resnet20", 10).to(device).to(memory_format=torch.channels_last)
    split = Split(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.arange(64) % 10)
    loader = TensorLoader(split, 32, lambda x, g: x.float() / 255, device=device, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    out = engine.train_one_epoch(model, loader, optimizer, None, precision)
    assert math.isfinite(out["train_loss"])


def test_cpu_bf16_autocast_runs_in_bf16_and_keeps_fp32_weights():
    cpu = torch.device("cpu")
    assert Precision.for_device(cpu, amp=True, channels_last=True).dtype is None  # the CPU default: fp32
    precision = Precision.for_device(cpu, amp=True, channels_last=True, cpu_amp=True)  # train.cpu_amp
    assert precision.dtype == torch.bfloat16 and not precision.scaler.is_enabled()  # bf16 needs no scaler
    model = create_model("lensnet_light", 3, 1, widths=[4], depths=[1]).to(memory_format=torch.channels_last)
    outputs = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda module, args, out: outputs.append(out.dtype))
    split = Split(torch.randint(0, 256, (64, 1, 16, 16), dtype=torch.uint8), torch.arange(64) % 3)
    loader = TensorLoader(split, 32, lambda x, g: x.float() / 255, device=cpu, shuffle=True)
    before = [p.detach().clone() for p in model.parameters()]
    out = engine.train_one_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.05), None, precision)
    assert math.isfinite(out["train_loss"]) and outputs == [torch.bfloat16] * 2  # both batches in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay fp32
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_cpu_bf16_is_on_by_default_exactly_where_it_is_faster_than_fp32():
    # the CPU's own flags say whether it has AVX512-BF16 or AMX, and its vendor; bf16 is the default
    # with AMX or on AMD, not with Intel's AVX512-BF16 alone (1.6x slower than fp32 there)
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("needs /proc/cpuinfo (Linux) to know the CPU's bf16 support independently")
    text = Path("/proc/cpuinfo").read_text()
    flags = text.split()
    # ... unless PyTorch's kernels are held below AVX512 (ATEN_CPU_CAPABILITY): then bf16 is emulated
    native = ("avx512_bf16" in flags or "amx_bf16" in flags) and torch.backends.cpu.get_cpu_capability() == "AVX512"
    pays = native and ("amx_bf16" in flags or "GenuineIntel" not in text)
    assert cpu_has_native_bf16() == native and cpu_bf16_pays() == pays
    assert resolve_train(TrainConfig(recipe="fast_cpu")).cpu_amp == pays  # None: decided by the machine
    for asked in (True, False):  # an explicit choice is kept on every machine
        assert resolve_train(TrainConfig(recipe="fast_cpu", cpu_amp=asked)).cpu_amp is asked


def test_bf16_is_off_where_pytorch_kernels_are_held_below_avx512():
    # ATEN_CPU_CAPABILITY=avx2 (with ONEDNN_MAX_CPU_ISA=AVX2) makes a newer CPU run as an AVX2-only
    # one; bf16 is then emulated, so the default must be fp32 whatever the CPU's own flags say
    code = ("import torch; from cifarlens.device import cpu_bf16_pays, device_description; "
            "print(torch.backends.cpu.get_cpu_capability(), cpu_bf16_pays()); "
            "print(device_description(torch.device('cpu')))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    first, description = out.splitlines()
    capability, native = first.split()
    if capability != "AVX2":
        pytest.skip(f"this CPU has no AVX2 kernels to hold PyTorch to (capability {capability})")
    assert native == "False"
    assert "(AVX2)" in description  # run records and benchmarks name the instruction set used


def test_flip_tta_averages_the_logits_of_both_orientations():
    model = create_model("lensnet_light", 4, 1, widths=[4], depths=[1]).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        expected = (model(x) + model(x.flip(3))) / 2
        assert torch.allclose(engine.forward_tta(model, x, True), expected, atol=1e-6)
        assert torch.equal(engine.forward_tta(model, x, False), model(x))
        # invariant to mirroring the input, which plain logits are not
        assert torch.allclose(engine.forward_tta(model, x.flip(3), True), expected, atol=1e-5)


def test_patch_whitening_decorrelates_training_patches():
    torch.manual_seed(0)
    # correlated input: smooth images, so neighbouring pixels are strongly correlated
    images = torch.nn.functional.avg_pool2d(torch.randn(256, 3, 34, 34), 3, stride=1)
    model = create_model("fastnet_cpu", 10, 3)

    def whitened_cov(eps=None):
        model.data_init(images, eps)
        out = model.whiten(images)[:, :12]  # the 12 "+" filters; the other 12 are their negatives
        assert torch.allclose(model.whiten(images)[:, 12:], -out)
        return torch.cov(out.permute(1, 0, 2, 3).reshape(12, -1))

    assert torch.allclose(whitened_cov(1e-8), torch.eye(12), atol=0.05)  # (almost) no eps: white
    assert not model.whiten.weight.requires_grad  # frozen after initialisation
    # the default eps shrinks the faintest directions instead of blowing them up: still
    # decorrelated, each variance lambda / (lambda + eps) <= 1
    from cifarlens.models.fastnet import WHITEN_EPS

    cov = whitened_cov()
    assert torch.allclose(cov - torch.diag(cov.diagonal()), torch.zeros(12, 12), atol=0.05)
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    eigenvalues = torch.linalg.eigvalsh(torch.cov(patches.T))  # ascending, as the filters are ordered
    torch.testing.assert_close(cov.diagonal(), eigenvalues / (eigenvalues + WHITEN_EPS), atol=0.03, rtol=0)


def test_ema_tracks_the_weights_with_its_decay():
    from cifarlens.ema import make_ema

    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = make_ema(model, 0.9)
    assert make_ema(model, 0.0) is None
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update_parameters(model)  # the first update copies: 1.0
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update_parameters(model)  # warm-up: decay min(0.9, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.module.weight, torch.full((1, 2), d * 1.0 + (1 - d) * 2.0))
    for _ in range(200):  # long after warm-up the decay is 0.9
        ema.update_parameters(model)
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update_parameters(model)
    assert torch.allclose(ema.module.weight, 0.9 * before + 0.1 * 3.0)
    # loaded from a checkpoint, the average goes on averaging (a fresh one would copy the weights)
    resumed = make_ema(torch.nn.Linear(2, 1, bias=False), 0.9)
    resumed.load_state_dict(ema.state_dict())
    with torch.no_grad():
        model.weight.fill_(4.0)
    ema.update_parameters(model)
    resumed.update_parameters(model)
    assert torch.equal(resumed.module.weight, ema.module.weight) and resumed.module.weight[0, 0] < 4.0
