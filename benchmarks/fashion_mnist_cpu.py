"""Time-to-accuracy of the default model and recipe on Fashion-MNIST, on the CPU.

A thin wrapper over ``cifarlens bench`` (see cifarlens/bench.py for what is timed):

    python benchmarks/fashion_mnist_cpu.py [--seeds 1] [extra cifarlens bench flags]

is the same as

    cifarlens bench --dataset fashion-mnist --data-dir /usr/share/datasets/fashion-mnist \
        --no-download --device cpu --targets 0.90,0.92,0.93 --seeds 1
"""

import sys

from cifarlens.cli import main

DEFAULTS = ["--dataset", "fashion-mnist", "--data-dir", "/usr/share/datasets/fashion-mnist", "--no-download",
            "--device", "cpu", "--targets", "0.90,0.92,0.93", "--seeds", "1"]

if __name__ == "__main__":
    sys.exit(main(["bench", *DEFAULTS, *sys.argv[1:]]))
