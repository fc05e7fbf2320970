"""Time budgets (train.time_budget, --time-budget): steps are timed, then the recipe's schedule is
fitted to the epochs that fit; the run itself is the same as one given those epochs."""

import csv
import json
from dataclasses import replace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cifarlens.api import train
from cifarlens.budget import (
    BudgetPlan,
    epoch_sides,
    estimate_seconds,
    parse_duration,
    plan_budget,
    smaller_costs_no_more,
    stretch,
)
from cifarlens.cli import main
from cifarlens.config import RunConfig, merge
from cifarlens.data.base import Split
from cifarlens.data.loader import TensorLoader
from cifarlens.engine import Precision
from cifarlens.errors import CifarlensError
from cifarlens.recipes import resolve_train
from conftest import make_cifar10

CPU = torch.device("cpu")


@pytest.mark.parametrize("text, seconds", [("600", 600), ("600s", 600), ("10m", 600), ("10min", 600),
                                           ("1.5h", 5400), ("1h30m", 5400), (" 90 s", 90), (".5m", 30)])
def test_durations_read_as_a_user_writes_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5", "10 minutes", "5d", "m"])
def test_a_duration_that_is_not_one_is_refused_with_the_forms_that_work(text):
    with pytest.raises(CifarlensError, match="not a duration.*10m"):
        parse_duration(text)


def recipe_cfg(recipe: str = "fast_cpu_10min", **train):
    return resolve_train(merge(RunConfig(), {"train": {"recipe": recipe, **train}}).train)


def test_stretching_keeps_the_ramps_share_of_the_run_and_scales_milestones():
    cfg = recipe_cfg()  # 8 epochs, 4 of them ramping from 24 px
    assert epoch_sides(cfg, 32) == [24, 24, 28, 28, 32, 32, 32, 32]
    assert epoch_sides(stretch(cfg, 16), 32) == [24] * 4 + [28] * 4 + [32] * 8
    half = stretch(cfg, 4)
    assert (half.epochs, half.progressive_epochs, half.progressive_res) == (4, 2, 24)
    assert epoch_sides(half, 32) == [24, 28, 32, 32]
    one = stretch(cfg, 1)  # a ramp of half an epoch rounds to none: the one epoch trains at full size
    assert (one.progressive_epochs, one.progressive_res) == (0, 0) and epoch_sides(one, 32) == [32]
    resolve_train(one)  # still a valid config
    he = recipe_cfg("he2016")
    assert stretch(he, 91).milestones == [45.5, 68.5]  # 91 and 137 of 182 epochs
    resolve_train(stretch(he, 91))


def test_the_estimate_adds_each_epochs_steps_at_its_width_and_its_validation_pass():
    cfg = stretch(recipe_cfg(), 4)  # widths 24, 28, 32, 32
    assert estimate_seconds(cfg, 32, 10, {24: 1.0, 28: 2.0, 32: 3.0}, 0.5) == 10 * (1 + 2 + 3 + 3) + 4 * 0.5


def test_a_smaller_width_is_never_estimated_dearer_than_a_larger_one():
    assert smaller_costs_no_more({24: 0.7, 28: 1.2, 32: 1.0}) == {24: 0.7, 28: 1.0, 32: 1.0}
    assert smaller_costs_no_more({24: 1.5, 28: 1.2, 32: 1.0}) == {24: 1.0, 28: 1.0, 32: 1.0}
    assert smaller_costs_no_more({24: 0.5, 32: 1.0}) == {24: 0.5, 32: 1.0}


def synthetic_loader(n: int = 64, batch_size: int = 16) -> TensorLoader:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    return TensorLoader(Split(images, torch.arange(n) % 10), batch_size, lambda x, g: x.float() / 255, device=CPU,
                        shuffle=True)


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 10))


def test_the_plan_takes_the_most_epochs_whose_estimate_fits_and_leaves_the_model_alone():
    model, loader = small_model(), synthetic_loader()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = recipe_cfg(epochs=2, progressive_epochs=1, optimizer="sgd")
    roomy = plan_budget(model, loader, None, Precision(CPU), replace(cfg, time_budget=1e6))
    assert roomy.train.epochs == 8  # at most 4x the recipe's epochs
    assert set(roomy.step_s) == {24, 28, 32} and all(t > 0 for t in roomy.step_s.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # timed on a copy
    # a budget for about three epochs: whatever the timing says, the choice is the largest that fits
    budget = roomy.probe_s + estimate_seconds(stretch(cfg, 3), 32, len(loader), roomy.step_s, 0.0)
    plan = plan_budget(model, loader, None, Precision(CPU), replace(cfg, time_budget=budget))
    left = budget - plan.probe_s
    assert plan.estimate_s <= left
    if plan.train.epochs < 8:
        more = stretch(replace(cfg, time_budget=budget), plan.train.epochs + 1)
        assert estimate_seconds(more, 32, len(loader), plan.step_s, plan.eval_s) > left
    assert f"{plan.train.epochs} epochs" in plan.describe() and plan.as_dict()["epochs"] == plan.train.epochs


def test_a_budget_shorter_than_one_epoch_is_refused_with_the_time_an_epoch_needs():
    cfg = replace(recipe_cfg(epochs=2, optimizer="sgd"), time_budget=0.001)
    with pytest.raises(CifarlensError, match=r"too short for one epoch here.*give at least \d+ s"):
        plan_budget(small_model(), synthetic_loader(), synthetic_loader(), Precision(CPU), cfg)


def tiny_fastnet_cfg(data_dir, **train) -> RunConfig:
    return merge(RunConfig(), {
        "data": {"dataset": "cifar10", "data_dir": str(data_dir), "download": False},
        "model": {"name": "fastnet_cpu"},
        "train": {"recipe": "fast_cpu_10min", "epochs": 2, "progressive_epochs": 1, "batch_size": 32,
                  "device": "cpu", **train},
    })


def test_a_budget_run_records_its_plan_and_trains_exactly_as_a_run_given_those_epochs(tmp_path):
    data = make_cifar10(tmp_path / "data", n_train_per_batch=24, n_test=20).data_dir
    budget_run, plain_run = tmp_path / "budget", tmp_path / "plain"
    train(tiny_fastnet_cfg(data, time_budget=1e5), budget_run, report=False)
    meta = json.loads((budget_run / "run.json").read_text())
    saved = yaml.safe_load((budget_run / "config.yaml").read_text())["train"]
    plan = meta["time_budget"]
    assert plan["epochs"] == saved["epochs"] == meta["epochs_done"] == 8 and saved["progressive_epochs"] == 4
    assert meta["chosen"]["epochs"] == "time budget 100000 s" and set(plan["step_ms"]) == {"24", "28", "32"}
    log = (budget_run / "train.log").read_text()
    assert "time budget 100000 s: 8 epochs (4 of them growing from 24 px)" in log
    assert "time budget 100000 s: trained 8 epochs in" in log
    epochs_s = sum(float(row["seconds"]) for row in csv.DictReader((budget_run / "history.csv").open()))
    assert meta["train_seconds"] == pytest.approx(plan["timing_s"] + epochs_s, abs=0.01)  # the timing counts

    train(tiny_fastnet_cfg(data, epochs=8, progressive_epochs=4), plain_run, report=False)
    a, b = load_file(budget_run / "model.safetensors"), load_file(plain_run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the timing left no trace


def test_epochs_running_slower_than_timed_are_warned_of_once_when_they_would_overrun_the_budget():
    cfg = replace(recipe_cfg(epochs=4, optimizer="sgd"), time_budget=100.0)
    plan = BudgetPlan(cfg, probe_s=5.0, step_s={32: 0.1}, eval_s=0.0, epoch_s=[20.0] * 4)
    assert plan.estimate_s == 80.0
    assert plan.pace(1, 5.0 + 20.0) is None  # on time: 85 s in all
    assert plan.pace(1, 5.0 + 22.0) is None  # 10 % slow: 93 s, still inside
    warning = plan.pace(2, 5.0 + 60.0)  # 50 % slow: 65 s + 1.5 x 40 s = 125 s
    assert warning is not None and "epochs 1-2 took 1.50x the estimate" in warning
    assert "ends after about 125 s, 25% over the time budget of 100 s" in warning
    assert plan.pace(3, 5.0 + 90.0) is None  # once
    late = BudgetPlan(cfg, probe_s=5.0, step_s={32: 0.1}, eval_s=0.0, epoch_s=[20.0] * 4)
    assert late.pace(4, 500.0) is None  # nothing left to warn of: the final line says how it went


def test_a_run_that_falls_behind_its_budget_says_so_after_the_epoch_and_trains_as_planned(tmp_path, monkeypatch):
    import cifarlens.api

    def slowed_down(*args, **kwargs):  # as if the machine got far slower after the timing
        plan = plan_budget(*args, **kwargs)
        plan.train = replace(plan.train, time_budget=0.1)
        return plan

    monkeypatch.setattr(cifarlens.api, "plan_budget", slowed_down)
    data = make_cifar10(tmp_path / "data", n_train_per_batch=24, n_test=20).data_dir
    cfg = tiny_fastnet_cfg(data, epochs=1, progressive_res=0, progressive_epochs=0, time_budget=1e5)
    train(cfg, tmp_path / "run", report=False)
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("warning: epoch 1 took") == 1 and "over the time budget of 0.1 s" in log
    assert "the 4 planned epochs go on" in log and "time budget 0.1 s: trained 4 epochs in" in log


def test_budget_mistakes_are_refused_before_any_run_folder_exists(tmp_path, capsys):
    data = make_cifar10(tmp_path / "data", n_train_per_batch=24, n_test=20).data_dir
    base = ["train", "--dataset", "cifar10", "--data-dir", str(data), "--no-download", "--model", "fastnet_cpu",
            "--device", "cpu", "--batch-size", "32", "--no-report"]
    cases = [
        (["--time-budget", "10m", "--epochs", "3"], "--time-budget chooses the number of epochs: drop --epochs"),
        (["--time-budget", "soon"], "'soon' is not a duration"),
        (["--time-budget", "0"], "--time-budget must be longer than 0 seconds"),
        (["--time-budget", "0.01s"], "too short for one epoch here"),
        (["--time-budget", "1h", "--set", "train.compile=true"], "drop train.compile, or give --epochs instead"),
    ]
    for i, (flags, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        assert main([*base, "--out", str(out), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not out.exists()
    assert main(["train", "--resume", str(tmp_path / "run0"), "--time-budget", "1m"]) == 2
    assert "drop --time-budget" in capsys.readouterr().err
