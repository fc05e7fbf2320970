"""Throughput of each augmentation policy, batched as training runs it, on CIFAR-shaped uint8 images.

    python benchmarks/augment_throughput.py [--device cpu] [--batch-size 256] [--seconds 3] [--threads N]

For the ``standard`` level alone (crop + flip + normalisation) and for ``standard`` plus each
policy of ``cifarlens.data.policies`` (MixUp/CutMix included, with their labels), prints images
per second: the batch size over the median time of a batch, timed for about ``--seconds`` each
after one warm-up batch (the median resists other work on a shared machine). For the three auto
policies it also times torchvision's transform applied image by image in a loop (what the
per-image DataLoader path does in each worker; torchvision given a whole batch draws one
operation for all its images, so that is not the same augmentation). The CPU is named with the
instruction sets that matter to torch (AVX2, AVX512-BF16), with the load average: on a CPU
shared with other work, torch's two-thread ops wait for each other (try --threads 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from cifarlens.config import DataConfig
from cifarlens.data.base import DatasetInfo
from cifarlens.data.pipeline import train_transform
from cifarlens.data.policies import build_policies, list_policies
from cifarlens.engine import device_description, resolve_device

CIFAR10 = DatasetInfo("cifar10", tuple(str(k) for k in range(10)), 3, 32,
                      (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def cpu_flags() -> str:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    return ", ".join(f for f in ("avx2", "avx512_bf16", "amx_bf16") if f" {f}" in flags) or "none of avx2/avx512_bf16"


def median_rates(steps: dict, batch_size: int, seconds: float, device: torch.device) -> dict[str, float]:
    """images/s of each ``steps[name]()``: ``batch_size`` over its median duration. The steps take
    turns, one batch each, for about ``seconds`` per step, so that other work on a shared machine
    slows them alike."""
    for step in steps.values():
        step()  # warm-up: caches, tables made once per device, lazy imports
    times: dict[str, list[float]] = {name: [] for name in steps}
    end = time.perf_counter() + seconds * len(steps)
    while time.perf_counter() < end or min(len(t) for t in times.values()) < 3:
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: batch_size / statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--no-torchvision", action="store_true", help="skip the per-image torchvision reference")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device)
    labels = (torch.arange(args.batch_size) % 10).to(device)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"device: {device_description(device)} ({cpu_flags()}), load average {load}, torch {torch.__version__}; "
          f"batches of {args.batch_size} uint8 3x32x32 images, ~{args.seconds:g} s each, median batch time")
    steps = {}
    for policy in [None] + list_policies():
        cfg = DataConfig(augment="standard", policies=[policy] if policy else [])
        transform = train_transform(CIFAR10, cfg)
        _, _, mixer = build_policies(cfg, CIFAR10)
        g = torch.Generator(device=device).manual_seed(0)

        def step(transform=transform, mixer=mixer, g=g):
            x = transform(images, g)
            return mixer(x, labels, g) if mixer is not None else x

        steps["standard" + (" + " + policy if policy else "")] = step
    if not args.no_torchvision:
        from torchvision.transforms import v2

        host = images.cpu()
        for name, transform in [("autoaugment", v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)),
                                ("randaugment", v2.RandAugment()), ("trivialaugment", v2.TrivialAugmentWide())]:
            steps[f"torchvision {name} per image*"] = lambda t=transform: torch.stack([t(img) for img in host])
    print(f"{'augmentation':<40}{'images/s':>12}")
    for name, rate in median_rates(steps, args.batch_size, args.seconds, device).items():
        print(f"{name:<40}{rate:>12,.0f}")
    if not args.no_torchvision:
        print("* the policy alone, on the CPU, one image at a time (torchvision given a batch draws one operation "
              "for all its images)")


if __name__ == "__main__":
    main()
