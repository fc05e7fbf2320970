"""Throughput of the batched data path against the per-image (torchvision + DataLoader) path,
for the same network and the same augmentation, on the device at hand.

    python benchmarks/data_path.py [--data-dir /usr/share/datasets/fashion-mnist] [--model fastnet_cpu]
        [--batch-size 256] [--steps 20] [--cpu-amp | --no-cpu-amp]

Prints, for the batched path and for the per-image path with 0 and 2 workers, training
images per second (augmentation, forward, backward and optimizer step) and images per
second of the loader alone (augmented batches produced and nothing else), so one can see
how much of a training step the data path is. ``--cpu-amp``: bf16 autocast on the CPU;
the default follows ``train.cpu_amp`` (on where the CPU has native bf16).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cifarlens.config import RunConfig, TrainConfig, merge
from cifarlens.data.pipeline import make_loader, prepare_data
from cifarlens.engine import Precision, device_description, resolve_device
from cifarlens.models import create_model, default_recipe
from cifarlens.recipes import RECIPES, resolve_train


def images_per_second(loader, precision, steps: int, model=None) -> float:
    """Images per second over ``steps`` batches after 3 warm-up batches: training steps of
    ``model``, or, without one, the loader alone (augmented batches, no network)."""
    if model is not None:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        model.train()
    seen, start = 0, None
    for i, (x, y) in enumerate(loader):
        if i == 3:  # warm-up: worker start-up, allocator, oneDNN kernels
            if precision.device.type == "cuda":
                torch.cuda.synchronize()
            start, seen = time.perf_counter(), 0
        if model is not None:
            with precision.autocast():
                loss = F.cross_entropy(model(precision.prepare(x)).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seen += len(y)
        if i == steps + 3:
            break
    if precision.device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--model", default="fastnet_cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the model's CPU recipe's")
    parser.add_argument("--augment", default="standard")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cpu-amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast on CPU (train.cpu_amp; default: where the CPU has native bf16)")
    args = parser.parse_args()
    args.batch_size = args.batch_size or RECIPES.get(default_recipe(args.model, "cpu"))["batch_size"]

    device = resolve_device(args.device)
    cfg = merge(RunConfig(), {"data": {"dataset": args.dataset, "data_dir": args.data_dir, "download": False,
                                       "augment": args.augment}})
    bundle = prepare_data(cfg.data, 0)
    cpu_amp = resolve_train(TrainConfig(recipe="fast_cpu", cpu_amp=args.cpu_amp)).cpu_amp  # None: train's rule for this CPU
    precision = Precision.for_device(device, amp=True, channels_last=True, cpu_amp=cpu_amp)
    print(f"device: {device_description(device)}; {args.dataset}, {args.model}, batch {args.batch_size}, "
          f"augment {args.augment}, autocast {precision.dtype or 'off'}, {args.steps} timed steps")
    variants = [("batched", {"loader": "batched"}), ("per-image, 0 workers", {"loader": "perimage", "workers": 0}),
                ("per-image, 2 workers", {"loader": "perimage", "workers": 2})]
    results, alone = {}, {}
    print(f"{'loader':>22}  {'training':>17}  {'loader alone':>17}")
    for name, data in variants:
        torch.manual_seed(0)
        model = create_model(args.model, bundle.info.num_classes, bundle.info.in_channels).to(device)
        if precision.channels_last:
            model = model.to(memory_format=torch.channels_last)

        def loader():
            return make_loader(bundle.train, bundle.info, args.batch_size, device,
                               train_cfg=merge(cfg, {"data": data}).data)

        results[name] = images_per_second(loader(), precision, args.steps, model)
        alone[name] = images_per_second(loader(), precision, args.steps)
        print(f"{name:>22}: {results[name]:8.0f} images/s  {alone[name]:8.0f} images/s", flush=True)
    best = max((k for k in results if k != "batched"), key=results.get)
    best_alone = max((k for k in alone if k != "batched"), key=alone.get)
    print(f"batched / best per-image: {results['batched'] / results[best]:.2f}x in training, "
          f"{alone['batched'] / alone[best_alone]:.1f}x for the loader alone")


if __name__ == "__main__":
    main()
