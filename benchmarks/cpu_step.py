"""Where a training step of the full-width fastnet spends its time on this CPU.

    python benchmarks/cpu_step.py [--batch 256] [--compile] [--sides 32,28,24,20,16]

Prints, for random CIFAR-shaped batches (the data does not change the cost): the time of one
forward + backward + SGD step at 32x32 and at 24x24 (progressive resizing's first epochs; any
widths with --sides), the time of one optimizer step (SGD, and Muon with the Newton-Schulz
iterations in fp32 and in bf16), and with --compile the same step under torch.compile. bf16
autocast and channels_last as `cifarlens train` uses them on a CPU with native bf16. Median of
6 timed steps after 2 warm-up steps; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import cifarlens.optim as optim
from cifarlens.device import cpu_has_native_bf16, device_description
from cifarlens.models import create_model


def median_ms(fn, steps: int = 6, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def fresh_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("fastnet", 10, 3)
    model.data_init(torch.randn(512, 3, 32, 32))
    return model.to(memory_format=torch.channels_last)


def train_step_ms(batch: int, side: int, compiled: bool = False) -> float:
    model = fresh_model()
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.85, nesterov=True)
    x = torch.randn(batch, 3, side, side).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_native_bf16()):
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return median_ms(step)


def optimizer_step_ms() -> dict[str, float]:
    params = [p for p in fresh_model().parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.85, nesterov=True, weight_decay=5e-4)
    muon = optim.MuonSGD(optim.muon_groups(params, 0.1, 0.2), lr=0.1, momentum=0.85, weight_decay=5e-4)
    out = {"SGD": median_ms(sgd.step)}
    native = optim.cpu_has_native_bf16
    for name, bf16 in (("Muon, Newton-Schulz in fp32", False), ("Muon, Newton-Schulz in bf16", True)):
        optim.cpu_has_native_bf16 = lambda bf16=bf16: bf16  # the precision orthogonalize picks
        try:
            out[name] = median_ms(muon.step)
        finally:
            optim.cpu_has_native_bf16 = native
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    parser.add_argument("--sides", default="32,24", help="image widths to time the step at (progressive resizing)")
    args = parser.parse_args()
    print(f"{device_description(torch.device('cpu'))}, torch {torch.__version__}, "
          f"bf16 autocast {'on' if cpu_has_native_bf16() else 'off (no native bf16)'}, batch {args.batch}")
    sides = [int(s) for s in args.sides.split(",")]
    first = None  # the first width's step is the reference
    for side in sides:
        ms = train_step_ms(args.batch, side)
        first = first or ms
        print(f"fastnet train step at {side}x{side}: {ms:.0f} ms ({1000 * args.batch / ms:.0f} images/s, "
              f"{ms / first:.2f}x the {sides[0]}-px step)")
    if args.compile:
        ms = train_step_ms(args.batch, 32, compiled=True)
        print(f"fastnet train step at 32x32, torch.compile: {ms:.0f} ms ({1000 * args.batch / ms:.0f} images/s)")
    for name, ms in optimizer_step_ms().items():
        print(f"optimizer step, {name}: {ms:.1f} ms")


if __name__ == "__main__":
    main()
