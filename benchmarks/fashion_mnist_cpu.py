"""Time-to-accuracy of the default model and recipe on Fashion-MNIST.

Trains with ``cifarlens.train`` exactly as the CLI does, and after every epoch
(outside the timed training) measures *test* accuracy to report when 90 / 92 / 93 %
were first reached. This is a benchmark of the recipe, so it looks at the test
set every epoch; model selection inside the run still uses only the validation split.

    python benchmarks/fashion_mnist_cpu.py --data-dir /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time

import torch

from cifarlens.api import train
from cifarlens.config import RunConfig, load_yaml, merge
from cifarlens.data.pipeline import make_loader, prepare_data
from cifarlens.engine import Precision, evaluate

MILESTONES = (0.90, 0.92, 0.93)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--config", help="YAML config (default: cifarlens defaults)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="SECTION.KEY=VALUE overrides")
    args = parser.parse_args(argv)

    from cifarlens.config import parse_assignment

    cfg = RunConfig()
    if args.config:
        cfg = merge(cfg, load_yaml(args.config))
    cfg = merge(cfg, {"data": {"dataset": "fashion-mnist", "data_dir": args.data_dir, "download": False},
                      "train": {"seed": args.seed, "device": "cpu"}})
    if args.epochs:
        cfg = merge(cfg, {"train": {"epochs": args.epochs}})
    for assignment in args.set:
        cfg = merge(cfg, parse_assignment(assignment))

    bundle = prepare_data(cfg.data, cfg.train.seed)
    test_loader = make_loader(bundle.test, bundle.info, 1000, torch.device("cpu"))
    reached: dict[float, tuple[int, float]] = {}
    timeline = []

    def on_epoch_end(state, model) -> None:
        train_seconds = sum(row["seconds"] for row in state.history)  # excludes this test pass
        acc = evaluate(model, test_loader, Precision(torch.device("cpu")))["acc"]
        timeline.append((state.epoch, train_seconds, acc))
        print(f"[bench] epoch {state.epoch}: test_acc {acc:.2%} after {train_seconds:.0f}s of training", flush=True)
        for m in MILESTONES:
            if acc >= m and m not in reached:
                reached[m] = (state.epoch, train_seconds)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = train(cfg, f"{tmp}/run", on_epoch_end=on_epoch_end)
        wall = time.perf_counter() - start

    print()
    print(f"device: {platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"model {cfg.model.name}, recipe {cfg.train.recipe}, seed {cfg.train.seed}, command: {' '.join(sys.argv)}")
    for m in MILESTONES:
        if m in reached:
            epoch, seconds = reached[m]
            print(f"time to {m:.0%} test accuracy: {seconds:.0f} s (epoch {epoch})")
        else:
            print(f"time to {m:.0%} test accuracy: not reached")
    print(f"final test accuracy (best-on-validation weights): {result['accuracy']:.2%}")
    print(f"total wall time incl. data loading and per-epoch test passes: {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
