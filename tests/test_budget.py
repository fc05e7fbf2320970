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
    PARTS,
    PLAN_MARGIN,
    BudgetPlan,
    epoch_sides,
    estimate_seconds,
    first_sides,
    parse_duration,
    plan_budget,
    run_length,
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
                                           ("1.5h", 5400), ("1h30m", 5400), (" 90 s", 90), (".5m", 30),
                                           ("1h 2m 3s", 3723), ("2m30s", 150)])
def test_durations_read_as_a_user_writes_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5", "10 minutes", "5d", "m", "1.5.5", "1m1m", "1h30", "30s1m", "h"])
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
    assert stretch(he, 10.01).milestones == [5.005, 7.535]  # rounded as a re-plan's are (was 7.534999999999999)
    resolve_train(stretch(he, 91))


def test_a_run_can_be_stretched_to_part_of_an_epoch_more():
    cfg = recipe_cfg()  # 8 epochs, 4 of them ramping from 24 px
    longer = stretch(cfg, 4.5)  # five epochs, the fifth on half of its batches; the ramp keeps its half (2.25 -> 2)
    assert (longer.epochs, longer.last_epoch_fraction, longer.progressive_epochs) == (5, 0.5, 2)
    assert run_length(longer) == 4.5 and epoch_sides(longer, 32) == [24, 28, 32, 32, 32]
    assert stretch(longer, 9).epochs == 9 and stretch(longer, 9).last_epoch_fraction == 1.0
    assert stretch(longer, 9).progressive_epochs == 4  # scaled from the stretched run as from the recipe
    resolve_train(longer)


def test_the_estimate_adds_each_epochs_steps_at_its_width_and_its_validation_pass():
    cfg = stretch(recipe_cfg(), 4)  # widths 24, 28, 32, 32
    assert estimate_seconds(cfg, 32, 10, {24: 1.0, 28: 2.0, 32: 3.0}, 0.5) == 10 * (1 + 2 + 3 + 3) + 4 * 0.5
    partial = stretch(recipe_cfg(), 4.3)  # widths 24, 28, 32, 32, 32; the last epoch 3 of 10 steps
    assert estimate_seconds(partial, 32, 10, {24: 1.0, 28: 2.0, 32: 3.0}, 0.5) == 10 * (1 + 2 + 3 + 3) + 3 * 3 + 5 * 0.5


def test_the_first_epochs_are_estimated_at_their_own_step_while_the_whitening_bias_trains():
    """A whitening bias that stops after epoch 1 makes the later steps ~6 % cheaper (no gradient below the
    first convolution); timed as the first steps, the plan left 8 % of a 10-minute budget unused."""
    cfg = stretch(recipe_cfg(whiten_bias_epochs=1), 4)  # widths 24, 28, 32, 32
    later = {24: 1.0, 28: 2.0, 32: 3.0}
    assert estimate_seconds(cfg, 32, 10, later, 0.0, {24: 1.5}) == 10 * (1.5 + 2 + 3 + 3)
    assert estimate_seconds(replace(cfg, whiten_bias_epochs=0), 32, 10, later, 0.0, {24: 1.5}) == 10 * (1 + 2 + 3 + 3)
    assert first_sides(recipe_cfg(whiten_bias_epochs=1), 32) == [24]  # epoch 1 starts the ramp, however stretched
    assert first_sides(recipe_cfg(whiten_bias_epochs=3), 32) == [24, 28, 32]


def test_a_plan_times_the_steps_with_and_without_the_whitening_bias_on_a_copy():
    from cifarlens.models import create_model

    model, loader = create_model("fastnet", 10, 3, widths=[4, 8, 8]), synthetic_loader()
    cfg = recipe_cfg(epochs=2, progressive_epochs=1, optimizer="sgd", whiten_bias_epochs=1)
    plan = plan_budget(model, loader, None, Precision(CPU), replace(cfg, time_budget=1e6))
    assert set(plan.first_step_s) == {24} and set(plan.step_s) == {24, 28, 32}
    assert plan.first_step_s[24] >= plan.step_s[24] and model.whiten.bias.requires_grad  # the run's model untouched
    assert "ms at 24 px (" in plan.describe() and "while the whitening bias trains)" in plan.describe()
    assert plan.as_dict()["first_epochs_step_ms"] == {"24": round(plan.first_step_s[24] * 1000, 1)}
    assert plan_budget(model, loader, None, Precision(CPU), replace(cfg, whiten_bias_epochs=0, time_budget=1e6)
                       ).first_step_s == {}


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
    budget = roomy.probe_s + estimate_seconds(stretch(cfg, 3.5), 32, len(loader), roomy.step_s, 0.0)
    plan = plan_budget(model, loader, None, Precision(CPU), replace(cfg, time_budget=budget))
    left = (budget - plan.probe_s) * (1 - PLAN_MARGIN)
    assert plan.estimate_s <= left
    length = run_length(plan.train)
    assert (length * PARTS) == pytest.approx(round(length * PARTS))  # whole epochs and twentieths of one
    if length < 8:  # twentieths of an epoch more would not fit
        more = stretch(replace(cfg, time_budget=budget), length + 1 / PARTS)
        assert estimate_seconds(more, 32, len(loader), plan.step_s, plan.eval_s) > left
    assert plan.describe().startswith(f"time budget {budget:g} s: {plan.train.epochs} epochs")
    assert (plan.as_dict()["epochs"], plan.as_dict()["last_epoch_fraction"]) == (plan.train.epochs,
                                                                                 plan.train.last_epoch_fraction)


def test_a_plan_between_whole_epochs_trains_part_of_one_more_and_says_so():
    from cifarlens.budget import longest_fitting

    cfg = recipe_cfg(epochs=4, progressive_res=0, progressive_epochs=0, optimizer="sgd")

    def estimate(c):  # 10 s an epoch, a step of 0.5 s in 20-step epochs
        return estimate_seconds(c, 32, 20, {32: 0.5}, 0.0)

    assert run_length(longest_fitting(cfg, 37.6, estimate)) == 3.75
    assert run_length(longest_fitting(cfg, 30.0, estimate)) == 3  # exactly three
    assert longest_fitting(cfg, 9.9, estimate) is None  # not even one whole epoch
    assert run_length(longest_fitting(cfg, 1e9, estimate)) == 16  # at most 4x the recipe's
    plan = BudgetPlan(stretch(replace(cfg, time_budget=40.0), 3.75), probe_s=1.0, step_s={32: 0.5}, eval_s=0.0,
                      epoch_s=[10.0, 10.0, 10.0, 7.5])
    assert "time budget 40 s: 4 epochs, the last on 75% of its batches, estimated 38 s" in plan.describe()


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
    assert plan["epochs"] == meta["epochs_done"] == 8 and plan["progressive_epochs"] == 4
    # config.yaml: the settings as given, the budget beside the epochs it was fitted from (a run from it plans again)
    assert (saved["epochs"], saved["progressive_epochs"], saved["time_budget"]) == (2, 1, 1e5)
    assert "# epochs: 8 epochs, fitted from train.epochs 2 below (time budget 100000 s)" in \
        (budget_run / "config.yaml").read_text()
    assert meta["chosen"]["epochs"] == "time budget 100000 s" and set(plan["step_ms"]) == {"24", "28", "32"}
    log = (budget_run / "train.log").read_text()
    assert "time budget 100000 s: 8 epochs (4 of them growing from 24 px)" in log
    assert "time budget 100000 s: trained 8 epochs in" in log
    epochs_s = sum(float(row["seconds"]) for row in csv.DictReader((budget_run / "history.csv").open()))
    assert meta["train_seconds"] == pytest.approx(plan["timing_s"] + epochs_s, abs=0.01)  # the timing counts

    train(tiny_fastnet_cfg(data, epochs=8, progressive_epochs=4), plain_run, report=False)
    a, b = load_file(budget_run / "model.safetensors"), load_file(plain_run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the timing left no trace


def test_a_run_from_a_budget_runs_config_plans_afresh_and_a_resumed_one_goes_on_with_its_plan(tmp_path):
    data = make_cifar10(tmp_path / "data", n_train_per_batch=24, n_test=20).data_dir
    first = tmp_path / "first"
    train(tiny_fastnet_cfg(data, time_budget=1e5), first, report=False)  # 2 epochs stretched to 8 (MAX_STRETCH)
    # its config.yaml again: the same 2 epochs to fit, so the same 8 (the plan itself would have given 32)
    assert main(["train", "--config", str(first / "config.yaml"), "--out", str(tmp_path / "again"),
                 "--no-report"]) == 0
    again = json.loads((tmp_path / "again" / "run.json").read_text())
    assert again["time_budget"]["epochs"] == again["epochs_done"] == 8
    assert again["time_budget"]["progressive_epochs"] == 4

    def stop_after_three(state, model):
        if state.epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # interrupted mid-ramp: --resume goes on with the plan, not config.yaml's 2
        train(tiny_fastnet_cfg(data, time_budget=1e5), tmp_path / "cut", report=False, on_epoch_end=stop_after_three)
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-report"]) == 0
    rows = list(csv.DictReader((tmp_path / "cut" / "history.csv").open()))
    assert [row["epoch"] for row in rows] == [str(e) for e in range(1, 9)]
    assert "time budget 100000 s: trained 8 epochs in" in (tmp_path / "cut" / "train.log").read_text()
    a, b = load_file(first / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the ramp and schedule as uninterrupted


def four_epochs_plan(length: float = 4.0) -> BudgetPlan:
    """4 epochs of 20 s (200 steps of 0.1 s), the last cut to ``length - 3``, after 5 s of timing; 100 s."""
    cfg = replace(stretch(recipe_cfg(epochs=4, optimizer="sgd", progressive_res=0, progressive_epochs=0), length),
                  time_budget=100.0)
    return BudgetPlan(cfg, probe_s=5.0, step_s={32: 0.1}, eval_s=0.0, epoch_s=[20.0] * 3 + [20.0 * (length - 3)],
                      steps_per_epoch=200, full_side=32)


def test_a_plan_on_pace_stays_and_one_off_pace_is_recut_to_end_inside_the_budget():
    plan = four_epochs_plan()
    assert plan.replan(1, 5.0 + 20.0) == (None, [])  # on time: 85 s in all
    assert plan.replan(1, 5.0 + 22.0) == (None, [])  # 10 % slow: 93 s, still inside
    new, lines = plan.replan(2, 5.0 + 48.0)  # 20 % slow: 53 + 2 x 24 = 101 s at this pace
    # the twentieths of an epoch that fit in 95 % of the budget: 53 + 1.2 x 20 x (length - 2) <= 5 + 95 x 0.95
    assert run_length(new) == 3.75 and plan.now is new and len(lines) == 1
    assert lines[0] == ("time budget 100 s: epochs 1-2 took 1.20x the estimate; the run now ends after 4 epochs, the "
                        "last on 75% of its batches, at about 95 s (planned before: 4 epochs)")
    assert plan.replan(3, 5.0 + 72.0) == (None, [])  # still 20 % slow: 77 + 18 = 95 s, inside
    assert plan.replan(4, 5.0 + 100.0) == (None, [])  # nothing left to plan: the final line says how it went
    assert plan.estimate_s == 20.0 * 3 + 15.0
    assert plan.as_dict()["replanned"] == {"epochs": 4, "last_epoch_fraction": 0.75, "progressive_epochs": 0,
                                           "progressive_res": 0, "estimate_s": 75.0}
    # run.json keeps the plan's own estimate beside the plan's epochs (it held the re-plan's, 75 s, beside 4 epochs)
    assert plan.as_dict()["epochs"] == 4 and plan.as_dict()["estimate_s"] == 20.0 * 4


def test_a_faster_machine_gets_back_up_to_the_planned_epochs_whole():
    plan = four_epochs_plan(3.25)
    new, lines = plan.replan(1, 5.0 + 12.0)  # 0.6x the estimate: 17 + 0.6 x 45 = 44 s, far under
    assert run_length(new) == 4 and lines[0].endswith("after 4 epochs, at about 53 s (planned before: 4 epochs, the last on 25% of its batches)")


def test_a_faster_machine_gets_more_epochs_at_full_size_up_to_the_most_a_budget_gives():
    plan = replace(four_epochs_plan(3.25), most_epochs=8)
    new, lines = plan.replan(1, 5.0 + 12.0)  # 0.6x: 17 + 0.6 x 20 x (length - 1) <= 95.25
    assert run_length(new) == 7.5 and "the run now ends after 8 epochs, the last on 50% of its batches" in lines[0]
    new, lines = plan.replan(1, 5.0 + 1.0)  # 0.05x: at most 8 epochs
    assert run_length(new) == 8


def test_a_much_slower_machine_drops_whole_epochs_and_warns_once_when_even_that_overruns():
    plan = four_epochs_plan()
    new, lines = plan.replan(1, 5.0 + 40.0)  # twice as slow: 45 + 40 x (length - 1) <= 95.25
    assert run_length(new) == 2.25 and len(lines) == 1
    assert "the run now ends after 3 epochs, the last on 25% of its batches, at about 95 s (planned before: 4" in lines[0]
    plan = four_epochs_plan()
    new, lines = plan.replan(1, 5.0 + 100.0)  # 5x: even a twentieth of one more epoch ends at 110 s
    assert run_length(new) == 1.05 and len(lines) == 2
    assert lines[1] == ("warning: epoch 1 took 5.00x the estimate; at this pace training ends after about 110 s, "
                        "10% over the time budget of 100 s (the machine is slower than when its steps were timed; the "
                        "run is already as short as a re-plan makes it: a twentieth of one more epoch)")
    assert plan.replan(1, 5.0 + 101.0)[1] == []  # once


def test_a_recut_ramp_never_grows_and_never_shrinks_the_images_again():
    # the eighth session's seed 2: steps timed in a fast spell, the first epoch then ran 1.69x as long
    cfg = replace(stretch(recipe_cfg(), 6.45), time_budget=600.0)  # 7 epochs (24, 24, 28, 32, ...), the last 45 %
    step_s = {24: 0.269, 28: 0.417, 32: 0.556}
    plan = BudgetPlan(cfg, probe_s=8.5, step_s=step_s, eval_s=0.0,
                      epoch_s=estimate_seconds_each(cfg, step_s), steps_per_epoch=196, full_side=32)
    new, lines = plan.replan(1, 8.5 + 88.6)
    assert new.progressive_epochs <= cfg.progressive_epochs
    sides = epoch_sides(new, 32)
    assert sides[0] == 24 and sides == sorted(sides) and sides[-1] == 32
    assert 8.5 + 88.6 + 1.69 * sum(plan.epoch_s[1:]) <= 600 * 0.96
    assert run_length(new) < 4.5 and "planned before" in lines[0]


def test_a_ramp_cut_by_a_slow_spell_does_not_grow_back_in_a_fast_one():
    """The cap was the first plan's ramp: cut to fit a slow spell, then lengthened again when the
    machine sped up, a ramp put epochs at 28 px after one at 32 (found by driving replan with a
    first epoch 4x over its estimate, then 5x under)."""
    from cifarlens.budget import epoch_seconds

    cfg = replace(stretch(recipe_cfg(), 12.8), time_budget=150.0)
    step_s, steps = {24: 1.5, 28: 2.1, 32: 3.5}, 4
    plan = BudgetPlan(cfg, probe_s=40.0, step_s=step_s, eval_s=0.0, epoch_s=epoch_seconds(cfg, 32, steps, step_s, 0.0),
                      steps_per_epoch=steps, full_side=32, most_epochs=32)
    trained, seconds, ramps = [], 40.0, [cfg.progressive_epochs]
    while len(trained) < plan.now.epochs:
        epoch = len(trained)
        now = plan.now
        trained.append(epoch_sides(now, 32)[epoch])  # this epoch trains as the plan now says
        seconds += (4.0 if epoch == 0 else 0.2) * epoch_seconds(now, 32, steps, step_s, 0.0)[epoch]
        plan.replan(epoch + 1, seconds)
        ramps.append(plan.now.progressive_epochs)
    assert trained == sorted(trained), trained  # was [24, 32, 28, 28, 28, 28, 32, ...]
    assert ramps == sorted(ramps, reverse=True), ramps  # cut, and never lengthened again


def estimate_seconds_each(cfg, step_s):
    from cifarlens.budget import epoch_seconds

    return epoch_seconds(cfg, 32, 196, step_s, 0.0)


def test_a_run_that_falls_behind_its_budget_cuts_its_last_epoch_and_the_schedule_ends_with_it(tmp_path, monkeypatch):
    import cifarlens.api
    from cifarlens.checkpoint import load_checkpoint

    def slowed_down(*args, **kwargs):  # as if the machine got far slower after the timing
        plan = plan_budget(*args, **kwargs)
        plan.train = replace(plan.train, time_budget=0.1)
        return plan

    monkeypatch.setattr(cifarlens.api, "plan_budget", slowed_down)
    data = make_cifar10(tmp_path / "data", n_train_per_batch=24, n_test=20).data_dir  # 120 images: 3 whole batches
    cfg = tiny_fastnet_cfg(data, epochs=1, progressive_res=0, progressive_epochs=0, time_budget=1e5)
    train(cfg, tmp_path / "run", report=False)
    log = (tmp_path / "run" / "train.log").read_text()
    assert ("the run now ends after 2 epochs, the last on 5% of its batches" in log  # after epoch 1, of 4 planned
            and "(planned before: 4 epochs)" in log)
    assert log.count("warning: epoch 1 took") == 1 and "over the time budget of 0.1 s" in log
    assert "the run is already as short as a re-plan makes it" in log
    assert "time budget 0.1 s: trained 2 epochs, the last on 5% of its batches, in" in log
    rows = list(csv.DictReader((tmp_path / "run" / "history.csv").open()))
    assert [int(row["train_samples"]) for row in rows] == [96, 32]  # then one batch, the least there is
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")  # what --resume would go on from
    assert ckpt["state"]["replanned"] == {"epochs": 2, "last_epoch_fraction": 0.05, "progressive_epochs": 0,
                                          "progressive_res": 0}  # no milestones: none to move
    assert ckpt["scheduler"]["total_steps"] == 3 + 1 and ckpt["scheduler"]["retargeted"][0] == 3
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["time_budget"]["replanned"]["epochs"] == 2 and meta["epochs_done"] == 2

    def stop_after_one(state, model):
        if state.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the same run, interrupted after the re-plan and resumed
        train(cfg, tmp_path / "cut", report=False, on_epoch_end=stop_after_one)
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-report"]) == 0
    resumed = list(csv.DictReader((tmp_path / "cut" / "history.csv").open()))
    assert [row["train_samples"] for row in resumed] == [row["train_samples"] for row in rows]
    # the re-plan is in run.json and the closing line as uninterrupted (the resumed run had neither)
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["time_budget"]["replanned"]["epochs"] == 2
    # (its budget as config.yaml gives it: the 0.1 s above is this test's, set inside the plan)
    assert "time budget 100000 s: trained 2 epochs, the last on 5% of its batches, in" in \
        (tmp_path / "cut" / "train.log").read_text()
    a, b = load_file(tmp_path / "run" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the cut last epoch and its schedule, as uninterrupted


def test_a_replanned_multistep_run_records_where_its_lr_now_drops(tmp_path, monkeypatch):
    import cifarlens.api

    def slowed_down(*args, **kwargs):  # as in the test above: the re-plan after epoch 1 cuts the run
        plan = plan_budget(*args, **kwargs)
        plan.train = replace(plan.train, time_budget=0.1)
        return plan

    monkeypatch.setattr(cifarlens.api, "plan_budget", slowed_down)
    data = make_cifar10(tmp_path / "data", n_train_per_batch=48, n_test=20).data_dir  # 240 images: 8 steps an epoch
    cfg = tiny_fastnet_cfg(data, epochs=1, progressive_res=0, progressive_epochs=0, time_budget=1e5,
                           optimizer="sgd", schedule="multistep", milestones=[0.75], warmup_epochs=0)
    train(cfg, tmp_path / "run", report=False)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    replanned = meta["time_budget"]["replanned"]
    assert saved["epochs"] == 1 and saved["milestones"] == [0.75]  # as given
    assert meta["time_budget"]["epochs"] == 4 and meta["time_budget"]["milestones"] == [3.0]  # the plan: the drop at 3
    # cut to 2 epochs (7 steps each), the last on one step, after the first: the drop, 14 steps ahead of
    # the 7 taken, moves into the one step left (it was rounded onto the end, where it never came)
    assert replanned["epochs"] == 2 and replanned["milestones"] == [1.0]  # from step 7 of steps 0-7
    log = (tmp_path / "run" / "train.log").read_text()
    assert "the learning rate now drops after epochs 1" in log
    history = list(csv.DictReader((tmp_path / "run" / "history.csv").open()))
    assert float(history[-1]["lr"]) == pytest.approx(0.1 * float(history[0]["lr"]))  # it dropped: gamma 0.1


def test_budget_mistakes_are_refused_before_any_run_folder_exists(tmp_path, capsys):
    data = make_cifar10(tmp_path / "data", n_train_per_batch=24, n_test=20).data_dir
    base = ["train", "--dataset", "cifar10", "--data-dir", str(data), "--no-download", "--model", "fastnet_cpu",
            "--device", "cpu", "--batch-size", "32", "--no-report"]
    cases = [
        (["--time-budget", "10m", "--epochs", "3"], "--time-budget chooses the number of epochs: drop --epochs"),
        (["--time-budget", "soon"], "'soon' is not a duration"),
        (["--time-budget", "0"], "--time-budget must be longer than 0 seconds"),
        (["--time-budget", "0.01s"], "the time budget of 0.01 s is too short for one epoch here"),  # was "0 s"
        (["--time-budget", "1h", "--set", "train.compile=true"], "drop train.compile, or give --epochs instead"),
        (["--set", "train.time_budget=inf"], "train.time_budget must be a finite number of seconds >= 0"),  # ">= 0"
    ]
    for i, (flags, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        assert main([*base, "--out", str(out), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not out.exists()
    assert main(["train", "--resume", str(tmp_path / "run0"), "--time-budget", "1m"]) == 2
    assert "drop --time-budget" in capsys.readouterr().err


def test_a_run_with_a_partial_last_epoch_logs_it_and_counts_only_the_images_it_trained_on(tmp_path):
    from cifarlens.report.compare import run_summary

    data = make_cifar10(tmp_path / "data", n_train_per_batch=24, n_test=20).data_dir
    train(tiny_fastnet_cfg(data, epochs=2, progressive_epochs=1, batch_size=20, last_epoch_fraction=0.5),
          tmp_path / "run", report=False)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "recipe fast_cpu_10min, 2 epochs, the last on 50% of its batches" in log
    rows = list(csv.DictReader((tmp_path / "run" / "history.csv").open()))
    assert [int(row["train_samples"]) for row in rows] == [120, 60]  # 6 batches of 20, then 3
    assert run_summary(tmp_path / "run")["train_images"] == 180
