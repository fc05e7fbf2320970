"""Time-to-accuracy on real CIFAR-10 (the JPEG copy in ../shared/data), on the CPU.

A thin wrapper over ``cifarlens bench`` (see cifarlens/bench.py for what is timed: the
training epochs with their validation pass, not data loading nor the per-epoch test passes
that time the targets):

    python benchmarks/cifar10_cpu.py [--seeds 1] [extra cifarlens bench flags, e.g. --model resnet20]

is the same as

    cifarlens bench --dataset cifar10 --data-dir /tmp/cifar10-jpeg --no-download --device cpu \
        --targets 0.80,0.85,0.88,0.90 --seeds 1

after extracting ``../shared/data/cifar10-jpeg.tar.gz`` into /tmp/cifar10-jpeg when that folder
is missing (``CIFAR10_COPY=DIR`` reads another copy, e.g. your own PNG folders). The copy went
through JPEG at quality 75: quote its figures as "CIFAR-10 (JPEG copy)", never as CIFAR-10.
"""

import os
import sys
import tarfile
from pathlib import Path

from cifarlens.cli import main

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def cifar10_copy(folder: Path = Path("/tmp/cifar10-jpeg")) -> Path:
    """The extracted copy, extracting ../shared/data/cifar10-jpeg.tar.gz on first use."""
    if not (folder / "test").is_dir():
        if not ARCHIVE.is_file():
            sys.exit(f"no CIFAR-10 copy in {folder} and no {ARCHIVE} to extract it from; set CIFAR10_COPY=DIR")
        folder.mkdir(parents=True, exist_ok=True)
        print(f"extracting {ARCHIVE} into {folder}", flush=True)
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(folder, filter="data")
    return folder


if __name__ == "__main__":
    data = Path(os.environ["CIFAR10_COPY"]) if "CIFAR10_COPY" in os.environ else cifar10_copy()
    defaults = ["--dataset", "cifar10", "--data-dir", str(data), "--no-download", "--device", "cpu",
                "--targets", "0.80,0.85,0.88,0.90", "--seeds", "1"]
    sys.exit(main(["bench", *defaults, *sys.argv[1:]]))
