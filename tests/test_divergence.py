"""A run whose loss explodes stops with one line, is recorded as ``diverged``, and says so in its report."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cifarlens.api import load_run, train
from cifarlens.cli import main
from cifarlens.config import RunConfig, merge
from cifarlens.engine import TrainingExploded, exploded_loss_limit
from cifarlens.models import unwrap_model
from cifarlens.report import write_report
from conftest import TINY, make_cifar10


def test_a_huge_lr_stops_the_run_as_diverged_with_one_line(tmp_path, capsys):
    """Adam at lr 1e4 keeps the loss finite (~1e9), so only the explosion guard can stop it."""
    data = make_cifar10(tmp_path / "data", n_train_per_batch=20, n_test=20)
    run = tmp_path / "run"
    code = main(["train", "--dataset", "cifar10", "--data-dir", str(data.data_dir), "--no-download",
                 "--out", str(run), "--recipe", "reference", "--lr", "1e4", "--epochs", "3", *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    # checked every step on a CPU: stopped at step 2 (counted from 1), the first step after the first update
    assert "the training loss became " in err and " at step 2 of epoch 1/3, over the divergence limit 28.0" in err
    assert "--lr" in err
    assert json.loads((run / "run.json").read_text())["status"] == "diverged"
    assert "history.csv" not in [p.name for p in run.iterdir()]  # no epoch was completed


def test_the_report_of_a_diverged_run_shows_its_status(tmp_path):
    """A run that explodes in its second epoch keeps its first epoch's weights; its report says diverged."""
    data = make_cifar10(tmp_path / "data", n_train_per_batch=20, n_test=20)
    cfg = merge(RunConfig(), {
        "data": {"dataset": "cifar10", "data_dir": str(data.data_dir), "download": False},
        "model": {"name": "lensnet_light", "kwargs": {"widths": [4], "depths": [1]}},
        "train": {"recipe": "reference", "batch_size": 32, "epochs": 3},
    })

    def blow_up(state, model):  # after epoch 1, logits x 1e6: the weights an lr spike leaves behind
        with torch.no_grad():
            for p in unwrap_model(model).head_parameters():
                p.mul_(1e6)

    run = tmp_path / "run"
    with pytest.raises(TrainingExploded, match="at step 1 of epoch 2/3, over the divergence limit 28.0") as stopped:
        train(cfg, run, on_epoch_end=blow_up, report=False)
    loss = float(str(stopped.value).split("became ")[1].split(" ")[0])
    assert math.isfinite(loss) and loss > exploded_loss_limit(10)
    assert json.loads((run / "run.json").read_text())["status"] == "diverged"
    html = write_report(load_run(run), robustness=False, gradcam=False).read_text()  # epoch 1's model.safetensors
    assert "<td>status</td><td>diverged</td>" in html
