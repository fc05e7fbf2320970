"""Throughput of the batched data path against the per-image (torchvision + DataLoader) path,
for the same network and the same augmentation, on the device at hand.

    python benchmarks/data_path.py [--data-dir /usr/share/datasets/fashion-mnist] [--model fastnet_cpu] [--cpu-amp]

Prints training images per second (forward, backward and optimizer step included) for
the batched path and for the per-image path with 0 and 2 workers.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cifarlens.bench import device_description
from cifarlens.config import RunConfig, merge
from cifarlens.data.pipeline import make_loader, prepare_data
from cifarlens.engine import Precision, resolve_device
from cifarlens.models import create_model


def images_per_second(loader, model, precision, steps: int) -> float:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    model.train()
    seen, start = 0, None
    for i, (x, y) in enumerate(loader):
        if i == 3:  # warm-up: worker start-up, allocator, oneDNN kernels
            if precision.device.type == "cuda":
                torch.cuda.synchronize()
            start, seen = time.perf_counter(), 0
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
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--augment", default="standard")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cpu-amp", action="store_true", help="bf16 autocast on CPU (train.cpu_amp)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    cfg = merge(RunConfig(), {"data": {"dataset": args.dataset, "data_dir": args.data_dir, "download": False,
                                       "augment": args.augment}})
    bundle = prepare_data(cfg.data, 0)
    precision = Precision.for_device(device, amp=True, channels_last=True, cpu_amp=args.cpu_amp)
    print(f"device: {device_description(device)}; {args.dataset}, {args.model}, batch {args.batch_size}, "
          f"augment {args.augment}, autocast {precision.dtype or 'off'}, {args.steps} timed steps")
    variants = [("batched", {"loader": "batched"}), ("per-image, 0 workers", {"loader": "perimage", "workers": 0}),
                ("per-image, 2 workers", {"loader": "perimage", "workers": 2})]
    results = {}
    for name, data in variants:
        torch.manual_seed(0)
        model = create_model(args.model, bundle.info.num_classes, bundle.info.in_channels).to(device)
        if precision.channels_last:
            model = model.to(memory_format=torch.channels_last)
        loader = make_loader(bundle.train, bundle.info, args.batch_size, device,
                             train_cfg=merge(cfg, {"data": data}).data)
        results[name] = images_per_second(loader, model, precision, args.steps)
        print(f"{name:>22}: {results[name]:8.0f} images/s", flush=True)
    best_per_image = max(v for k, v in results.items() if k != "batched")
    print(f"batched / best per-image: {results['batched'] / best_per_image:.2f}x")


if __name__ == "__main__":
    main()
