"""The CUDA paths, as a user meets them: batched augmentation on the GPU, a training run with
``--device cuda`` whose weights then serve on the CPU, and ``bench`` naming the GPU.

Every test here skips without CUDA (``pytest -m gpu`` selects them on a machine with one;
benchmarks/gpu_check.sh runs them with the GPU benchmarks)."""

from __future__ import annotations

import json

import pytest
import torch

from cifarlens.api import load_run
from cifarlens.cli import main
from cifarlens.data.augment import BatchAugment, random_crop, random_hflip
from cifarlens.data.base import Split
from cifarlens.data.loader import TensorLoader
from conftest import fast_epoch_parts, make_cifar10

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
CUDA = torch.device("cuda")
TINY_FASTNET = ["--model", "fastnet", "--set", "model.kwargs={widths: [16, 32, 32]}"]


def cuda_gen(seed: int) -> torch.Generator:
    return torch.Generator(device=CUDA).manual_seed(seed)


def ramp_images(b: int, c: int = 3, h: int = 8, w: int = 8) -> torch.Tensor:
    # every pixel of an image distinct and > 0, so a crop or a flip can be located exactly
    base = torch.arange(1, h * w + 1, dtype=torch.uint8).view(1, 1, h, w)
    return (base.repeat(b, c, 1, 1) + torch.arange(c, dtype=torch.uint8).view(1, c, 1, 1)).to(CUDA)


def test_batched_crops_and_flips_on_cuda_are_what_they_claim():
    images = ramp_images(64)
    out = random_crop(images, 2, cuda_gen(0))
    assert out.device.type == "cuda" and out.dtype == torch.uint8 and out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2,) * 4).cpu()
    for i, crop in enumerate(out.cpu()):
        assert any(torch.equal(padded[i, :, dy:dy + 8, dx:dx + 8], crop) for dy in range(5) for dx in range(5))
    assert torch.equal(out, random_crop(images, 2, cuda_gen(0)))  # the same seed, the same crops

    images = ramp_images(400)
    flipped = random_hflip(images, cuda_gen(1))
    mirrored = (flipped == images.flip(3)).flatten(1).all(1)
    same = (flipped == images).flatten(1).all(1)
    assert bool((mirrored | same).all()) and 150 < int(mirrored.sum()) < 250


def test_the_loader_keeps_the_dataset_on_the_gpu_and_is_seeded():
    split = Split(torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8), torch.arange(300) % 10)
    augment = BatchAugment("standard", (0.5,) * 3, (0.25,) * 3)
    loader = TensorLoader(split, 128, augment, device=CUDA, shuffle=True, seed=3)
    assert loader.images.device.type == "cuda" and loader.images.dtype == torch.uint8
    first = [(x.clone(), y.clone()) for x, y in loader]
    assert all(x.device.type == "cuda" and x.dtype == torch.float32 for x, _ in first)
    assert sum(len(y) for _, y in first) == 300
    again = TensorLoader(split, 128, augment, device=CUDA, shuffle=True, seed=3)
    assert all(torch.equal(a, b) and torch.equal(ya, yb) for (a, ya), (b, yb) in zip(first, again))


def test_a_run_trained_on_cuda_predicts_the_same_on_the_cpu(tmp_path):
    data = make_cifar10(tmp_path / "data", n_train_per_batch=40, n_test=50)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(data.data_dir), "--no-download",
                 *TINY_FASTNET, "--recipe", "fast", "--epochs", "2", "--batch-size", "64",
                 "--device", "cuda", "--out", str(out), "--no-report"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split_size"] == 50
    images = torch.from_numpy(data.test_images)
    on_gpu, on_cpu = load_run(out, device="cuda"), load_run(out, device="cpu")
    assert next(on_cpu.model.parameters()).device.type == "cpu"
    gpu_top1 = on_gpu.predict_proba(images).argmax(1)
    cpu_top1 = on_cpu.predict_proba(images).argmax(1)
    # fp32 on both; kernels differ in summation order, so allow a near-tie or two to flip
    assert (gpu_top1 == cpu_top1).float().mean() >= 0.96


def test_bench_on_cuda_names_the_gpu_and_measures_its_memory(tmp_path):
    data = make_cifar10(tmp_path / "data", n_train_per_batch=40, n_test=50)
    report = tmp_path / "bench.json"
    assert main(["bench", "--dataset", "cifar10", "--data-dir", str(data.data_dir), "--no-download",
                 *TINY_FASTNET, "--recipe", "fast", "--epochs", "1", "--batch-size", "64",
                 "--device", "cuda", "--seeds", "2", "--targets", "0.5", "--json", str(report)]) == 0
    summary = json.loads(report.read_text())
    assert torch.cuda.get_device_name(CUDA) in summary["device"]
    assert summary["seeds"] == [0, 1] and len(summary["test_acc"]) == 2
    assert 0 < summary["peak_memory_mb"] < torch.cuda.get_device_properties(CUDA).total_memory / 2**20
    assert all(ips > 0 for ips in summary["images_per_second"])


def test_a_training_step_on_cuda_does_not_synchronize():
    """No step waits for the GPU (a host read or a pageable host-to-device copy): CUDA's sync
    debug mode warns at each, and an epoch of 6 steps warns no more often than one of 2."""
    import warnings

    from cifarlens.engine import Precision, train_one_epoch

    precision = Precision.for_device(CUDA, amp=True, channels_last=True)

    def synchronizations(batches: int) -> int:
        model, loader, optimizer, scheduler, ema, cfg = fast_epoch_parts(CUDA, batches, 32, widths=[16, 32, 32],
                                                                         recipe="fast", channels_last=True)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_one_epoch(model, loader, optimizer, scheduler, precision,
                                label_smoothing=cfg.label_smoothing, ema=ema, check_every=1000)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    synchronizations(1)  # constants made once per device are made here
    assert synchronizations(2) == synchronizations(6)


def test_a_time_budget_on_cuda_times_synchronised_steps_and_trains_the_epochs_it_chose(tmp_path):
    data = make_cifar10(tmp_path / "data", n_train_per_batch=40, n_test=20).data_dir
    out = tmp_path / "run"
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(data), "--no-download", "--device", "cuda",
                 "--batch-size", "32", "--no-report", "--time-budget", "2m", "--out", str(out), *TINY_FASTNET]) == 0
    meta = json.loads((out / "run.json").read_text())
    plan = meta["time_budget"]
    assert meta["epochs_done"] == (plan["replanned"] or plan)["epochs"] >= 1 and meta["status"] == "finished"
    assert all(ms > 0 for ms in plan["step_ms"].values())
    assert meta["train_seconds"] <= 120  # it kept to its budget (a tiny model: at most 4x the recipe's epochs)
