"""Where a training step of the full-width fastnet spends its time on this CPU.

    python benchmarks/cpu_step.py [--batch 256] [--compile] [--sides 32,28,24,20,16] [--threads T]
    python benchmarks/cpu_step.py --trace 400 [--threads T]
    python benchmarks/cpu_step.py --layers [--sides 32] [--batch 256]
    python benchmarks/cpu_step.py --precisions [--sides 32,24]
    python benchmarks/cpu_step.py --whiten-bias [--sides 32,24]
    python benchmarks/cpu_step.py --widths 64/256/256,64/192/192 [--sides 32,24]

Prints, for random CIFAR-shaped batches (the data does not change the cost): the time of one
forward + backward + SGD step at 32x32 and at 24x24 (progressive resizing's first epochs; any
widths with --sides) with its page faults and kernel time (freed memory kept in the process as
training keeps it; ``CIFARLENS_KEEP_MEMORY=0`` to compare), the time of one optimizer step
(SGD, and Muon with the Newton-Schulz iterations in fp32 and in bf16), and with --compile the
same step under torch.compile. bf16 autocast (where training uses it) and channels_last, as
`cifarlens train` runs. Median of 6 timed steps after 2 warm-up steps; run it alone on the machine.

``--trace STEPS`` shows instead how steady the machine is: the spread of that many consecutive
32-px steps, and how far the few steps a time budget times (cifarlens.budget) can be from the
epoch after them. A shared cloud CPU can swing by 2x within a minute (docs/benchmarks.md).

``--precisions`` times the step in bf16 autocast and in fp32, alternately, to see whether bf16
pays on a new CPU (cifarlens.device.cpu_bf16_pays decides what training uses).

``--whiten-bias`` times the step with the whitening layer's bias training and frozen, alternately
(``train.whiten_bias_epochs``: frozen, the backward stops above the first convolution's input).

``--widths`` times the step of fastnet at each of the given widths (``model.kwargs.widths``),
alternately: what a narrower network saves on this CPU, to weigh against the epochs it buys.

``--layers`` times each 3x3 convolution of fastnet alone, in the training's precision: oneDNN's
forward, input gradient and weight gradient against the same products over the image patches
(im2col; cifarlens.models.small_conv), to see on a new CPU where that path would pay.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

import cifarlens.optim as optim
from cifarlens.device import cpu_bf16_pays, device_description, retain_freed_memory
from cifarlens.models import create_model
from cifarlens.models.small_conv import SmallMapConv2d, _filter_rows, _patches


STEPS, WARMUP = 6, 2  # timed steps, and untimed ones before them


def median_ms(fn, steps: int = STEPS, warmup: int = WARMUP) -> float:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def fresh_model(widths: tuple[int, ...] = (64, 256, 256)) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("fastnet", 10, 3, widths=widths)
    model.data_init(torch.randn(512, 3, 32, 32))
    return model.to(memory_format=torch.channels_last)


def make_step(batch: int, side: int, compiled: bool = False, bf16: bool | None = None, whiten_bias: bool = True,
              widths: tuple[int, ...] = (64, 256, 256)):
    """One forward + backward + SGD step of a fresh fastnet on a fixed random batch, as a closure;
    under bf16 autocast where training uses it (cifarlens.device.cpu_bf16_pays), or as ``bf16`` says;
    ``whiten_bias`` False: the whitening layer's bias frozen, as after train.whiten_bias_epochs;
    ``widths``: fastnet's (model.kwargs.widths)."""
    bf16 = cpu_bf16_pays() if bf16 is None else bf16
    model = fresh_model(widths)
    model.whiten.bias.requires_grad_(whiten_bias)
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.85, nesterov=True)
    x = torch.randn(batch, 3, side, side).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_step_ms(batch: int, side: int, compiled: bool = False) -> tuple[float, float, float]:
    """The median step in ms, and the page faults and kernel (system) CPU ms of an average step."""
    step = make_step(batch, side, compiled)
    before = resource.getrusage(resource.RUSAGE_SELF)
    ms = median_ms(step)
    after = resource.getrusage(resource.RUSAGE_SELF)
    steps = STEPS + WARMUP  # all that median_ms ran
    return ms, (after.ru_minflt - before.ru_minflt) / steps, 1000 * (after.ru_stime - before.ru_stime) / steps


def alternately(batch: int, sides: list[int], variants: dict[str, dict], rounds: int = 3) -> None:
    """The step of each of ``variants`` (name -> make_step's keywords), alternately (``rounds`` times
    each, so that a drift of the machine hits all alike), at each width; the ratio of the last to the
    first."""
    first, last = list(variants)[0], list(variants)[-1]
    for side in sides:
        times = {name: [] for name in variants}
        for _ in range(rounds):
            for name, kwargs in variants.items():
                times[name].append(median_ms(make_step(batch, side, **kwargs)))
        text = ", ".join(f"{name} {' / '.join(f'{t:.0f}' for t in ms)} ms" for name, ms in times.items())
        ratio = statistics.median(times[last]) / statistics.median(times[first])
        print(f"fastnet train step at {side}x{side}: {text} ({last} / {first}: {ratio:.3f}x)")


def precisions(batch: int, sides: list[int]) -> None:
    """The step in bf16 autocast and in fp32: whether bf16 pays on this CPU."""
    alternately(batch, sides, {"bf16": {"bf16": True}, "fp32": {"bf16": False}})


def whiten_bias(batch: int, sides: list[int]) -> None:
    """The step with the whitening bias training and frozen (train.whiten_bias_epochs)."""
    alternately(batch, sides, {"bias training": {"whiten_bias": True}, "bias frozen": {"whiten_bias": False}})


def widths(batch: int, sides: list[int], choices: list[tuple[int, ...]]) -> None:
    """The step at each of fastnet's ``choices`` of widths: what a narrower network saves."""
    alternately(batch, sides, {"/".join(map(str, w)): {"widths": w} for w in choices})


def trace(batch: int, steps: int, window: int = 25, probe: int = 4, epoch: int = 176) -> None:
    """How steady this machine is: ``steps`` consecutive 32-px steps, their spread, the means of
    windows of ``window`` steps, and how well the median of ``probe`` steps (what a time budget
    times, cifarlens.budget) predicts the mean of the ``epoch`` steps after them (176 = a
    CIFAR-10 epoch at batch 256)."""
    step = make_step(batch, 32)
    for _ in range(2):
        step()
    ms = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        ms.append(1000 * (time.perf_counter() - began))
    q = statistics.quantiles(ms, n=20)  # q[1] = 10th percentile, q[17] = 90th
    print(f"{steps} consecutive steps at 32x32: min {min(ms):.0f}, p10 {q[1]:.0f}, median {statistics.median(ms):.0f}, "
          f"mean {statistics.mean(ms):.0f}, p90 {q[17]:.0f}, max {max(ms):.0f} ms")
    print(f"means of {window} steps in turn: " + " ".join(f"{statistics.mean(ms[i:i + window]):.0f}"
                                                      for i in range(0, steps - window + 1, window)))
    if steps >= probe + epoch + 20:
        errors = [statistics.median(ms[i:i + probe]) / statistics.mean(ms[i + probe:i + probe + epoch]) - 1
                  for i in range(steps - probe - epoch + 1)]
        e = statistics.quantiles(errors, n=20)
        print(f"median of {probe} steps against the mean of the {epoch} after them: 5th percentile {e[0]:+.0%}, "
              f"median {statistics.median(errors):+.0%}, 95th percentile {e[-1]:+.0%} (negative: an estimate short)")


def layers(batch: int, side: int) -> None:
    """Each 3x3 convolution of fastnet at ``side`` px alone: oneDNN against im2col products."""
    shapes = []
    model = fresh_model().eval()
    for conv in model.modules():
        if isinstance(conv, SmallMapConv2d):
            conv.register_forward_hook(lambda mod, args, out: shapes.append((mod.in_channels, mod.out_channels,
                                                                              args[0].shape[-1])))
    with torch.no_grad():
        model(torch.randn(1, 3, side, side))
    dtype = torch.bfloat16 if cpu_bf16_pays() else torch.float32
    def backward(grad, x, w, which):  # oneDNN's input (which=0) or weight (1) gradient of a 3x3 "same" conv
        mask = [which == 0, which == 1, False]
        return torch.ops.aten.convolution_backward(grad, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

    for cin, cout, width in shapes:
        x = torch.randn(batch, cin, width, width, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(cout, cin, 3, 3, dtype=dtype)
        grad = torch.randn(batch, cout, width, width, dtype=dtype).contiguous(memory_format=torch.channels_last)
        rows = grad.permute(0, 2, 3, 1).reshape(-1, cout)
        ms = {
            "forward": median_ms(lambda: torch.nn.functional.conv2d(x, w, padding=1)),
            "input grad": median_ms(lambda: backward(grad, x, w, 0)),
            "weight grad": median_ms(lambda: backward(grad, x, w, 1)),
            "im2col forward": median_ms(lambda: _patches(x) @ _filter_rows(w).T),
            "im2col weight grad": median_ms(lambda: rows.T @ _patches(x)),
            "patches alone": median_ms(lambda: _patches(x)),
        }
        gflop = 2 * batch * width * width * cin * 9 * cout / 1e9
        print(f"conv {cin} -> {cout} on {width}x{width} ({gflop:.1f} GFLOP, {str(dtype)[6:]}): "
              + ", ".join(f"{name} {t:.1f} ms" for name, t in ms.items()))


def optimizer_step_ms() -> dict[str, float]:
    params = [p for p in fresh_model().parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.85, nesterov=True, weight_decay=5e-4)
    muon = optim.MuonSGD(optim.muon_groups(params, 0.1, 0.2), lr=0.1, momentum=0.85, weight_decay=5e-4)
    out = {"SGD": median_ms(sgd.step)}
    native = optim.cpu_bf16_pays
    for name, bf16 in (("Muon, Newton-Schulz in fp32", False), ("Muon, Newton-Schulz in bf16", True)):
        optim.cpu_bf16_pays = lambda bf16=bf16: bf16  # the precision orthogonalize picks
        try:
            out[name] = median_ms(muon.step)
        finally:
            optim.cpu_bf16_pays = native
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    parser.add_argument("--sides", default="32,24", help="image widths to time the step at (progressive resizing)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--trace", type=int, metavar="STEPS",
                        help="instead: time STEPS consecutive 32-px steps and show how steady the machine is")
    parser.add_argument("--precisions", action="store_true",
                        help="instead: the step in bf16 autocast and in fp32, alternately, at each of --sides")
    parser.add_argument("--whiten-bias", action="store_true",
                        help="instead: the step with the whitening bias training and frozen, alternately")
    parser.add_argument("--widths", metavar="A/B/C,...",
                        help="instead: the step at each of these fastnet widths (e.g. 64/256/256,64/192/192), "
                             "alternately, at each of --sides")
    parser.add_argument("--layers", action="store_true",
                        help="instead: time each 3x3 convolution alone, oneDNN against im2col "
                             "(at the first of --sides)")
    args = parser.parse_args()
    if args.trace is not None and args.trace < 2:
        parser.error("--trace needs at least 2 steps (200 or more for the time-budget line)")
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = retain_freed_memory()  # as training does (CIFARLENS_KEEP_MEMORY=0: not)
    print(f"{device_description(torch.device('cpu'))}, torch {torch.__version__}, "
          f"bf16 autocast {'on' if cpu_bf16_pays() else 'off (fp32 is faster here)'}, batch {args.batch}, "
          f"freed memory {'kept' if kept else 'given back'} (cifarlens.device.retain_freed_memory)")
    if args.trace:
        trace(args.batch, args.trace)
        return
    sides = [int(s) for s in args.sides.split(",")]
    if args.precisions:
        precisions(args.batch, sides)
        return
    if args.whiten_bias:
        whiten_bias(args.batch, sides)
        return
    if args.widths:
        try:
            choices = [tuple(int(w) for w in choice.split("/")) for choice in args.widths.split(",")]
        except ValueError:
            parser.error(f"--widths takes widths like 64/256/256,64/192/192; got {args.widths!r}")
        widths(args.batch, sides, choices)
        return
    if args.layers:
        layers(args.batch, sides[0])
        return
    first = None  # the first width's step is the reference
    for side in sides:
        ms, faults, kernel_ms = train_step_ms(args.batch, side)
        first = first or ms
        print(f"fastnet train step at {side}x{side}: {ms:.0f} ms ({1000 * args.batch / ms:.0f} images/s, "
              f"{ms / first:.2f}x the {sides[0]}-px step; {faults:.0f} page faults and {kernel_ms:.0f} ms of kernel "
              "CPU time a step)")
    if args.compile:
        ms = train_step_ms(args.batch, 32, compiled=True)[0]
        print(f"fastnet train step at 32x32, torch.compile: {ms:.0f} ms ({1000 * args.batch / ms:.0f} images/s)")
    for name, ms in optimizer_step_ms().items():
        print(f"optimizer step, {name}: {ms:.1f} ms")


if __name__ == "__main__":
    main()
