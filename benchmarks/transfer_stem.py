"""Training throughput of the pretrained backbones with each way of handling 32x32 images.

    python benchmarks/transfer_stem.py [--device auto] [--batch-size 64] [--steps 3]

For resnet18, resnet50 and efficientnet_b0 (10 classes): ``stem: resize`` to 224 (the
pretrained resolution) and to 64, and ``stem: native`` at 32 (no upsampling, 4x less
downsampling in the stem). Prints parameters, forward FLOPs per image (counted, a
multiply-add is 2) and training images per second (forward, backward and SGD step on
every layer, batches of random 32x32 images, as in full fine-tuning) after warm-up steps.
Throughput only: which stem transfers better needs ImageNet weights and a real dataset.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cifarlens.engine import Precision, device_description, resolve_device
from cifarlens.models import create_model, model_info
from cifarlens.models.registry import forward_flops

MODELS = ("resnet18", "resnet50", "efficientnet_b0")
VARIANTS = (
    ("resize 224", {"stem": "resize", "input_size": 224}),
    ("resize 64", {"stem": "resize", "input_size": 64}),
    ("native 32", {"stem": "native"}),
)


def images_per_second(model, precision: Precision, batch_size: int, warmup: int, steps: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, 32, 32, generator=gen).to(precision.device)  # (B, 3, 32, 32), normalised
    y = torch.randint(0, 10, (batch_size,), generator=gen).to(precision.device)
    model.train()
    start = None
    for i in range(warmup + steps):
        if i == warmup:  # after the warm-up: allocator, oneDNN / cuDNN kernel choice
            if precision.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with precision.autocast():
            loss = F.cross_entropy(model(precision.prepare(x)).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if precision.device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()

    device = resolve_device(args.device)
    precision = Precision.for_device(device, amp=True, channels_last=True)  # what `cifarlens train` uses
    print(
        f"device: {device_description(device)}, torch {torch.__version__}; batch {args.batch_size} of "
        f"32x32 RGB images, 10 classes, {args.warmup} warm-up + {args.steps} timed steps, full fine-tuning"
    )
    print(f"{'model':<16}{'stem':<12}{'params':>9}{'GFLOPs/img':>12}{'images/s':>10}")
    for name in args.models.split(","):
        for label, kwargs in VARIANTS:
            torch.manual_seed(0)
            model = create_model(name, 10, 3, **kwargs).to(device)
            if precision.channels_last:
                model = model.to(memory_format=torch.channels_last)
            flops = forward_flops(name, 10, 3, 32, **kwargs)
            rate = images_per_second(model, precision, args.batch_size, args.warmup, args.steps)
            print(
                f"{name:<16}{label:<12}{model_info(model)['params'] / 1e6:>8.2f}M{flops / 1e9:>12.2f}{rate:>10.1f}",
                flush=True,
            )
            del model


if __name__ == "__main__":
    main()
