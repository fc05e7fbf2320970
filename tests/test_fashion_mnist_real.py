"""Real learning on real data: a subset of the official Fashion-MNIST files (Debian's
dataset-fashion-mnist). Slow; run with ``pytest -m slow``."""

import json
from pathlib import Path

import pytest

from cifarlens.cli import main
from cifarlens.data.fashion_mnist import read_idx
from conftest import write_idx

REAL = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fashion_subset(tmp_path_factory):
    if not (REAL / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("fm-real")
    for kind, n in (("train", 6000), ("t10k", 2000)):
        images = read_idx(REAL / f"{kind}-images-idx3-ubyte.gz", 0x803)
        labels = read_idx(REAL / f"{kind}-labels-idx1-ubyte.gz", 0x801)
        write_idx(root / f"{kind}-images-idx3-ubyte", images[:n], gz=True)
        write_idx(root / f"{kind}-labels-idx1-ubyte", labels[:n], gz=True)
    return root


def test_default_model_and_recipe_learn_fashion_mnist(fashion_subset, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(fashion_subset), "--batch-size", "128",
                 "--epochs", "3", "--out", str(out), "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split_size"] == 2000
    assert metrics["accuracy"] > 0.75  # chance is 0.10
    assert min(c["recall"] for c in metrics["per_class"] if c["name"] == "Trouser") > 0.8
