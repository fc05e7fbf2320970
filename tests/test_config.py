import pytest

from cifarlens.config import RunConfig, from_dict, load_yaml, merge, parse_assignment, save_yaml, to_dict
from cifarlens.errors import CifarlensError
from cifarlens.recipes import RECIPES, resolve_train
from cifarlens.schedules import lr_factor


def test_yaml_overlay_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  dataset: fashion-mnist\n  data_dir: '1e3'\ntrain:\n  lr: 1e-3\n  epochs: 3\n"
                    "model:\n  kwargs: {widths: [8, 16], whiten_eps: 5e-4}\n")
    cfg = merge(RunConfig(), load_yaml(path))
    assert cfg.data.dataset == "fashion-mnist"
    assert cfg.train.lr == 0.001  # YAML 1.1 reads 1e-3 as a string; we read it as a float
    assert cfg.model.kwargs == {"widths": [8, 16], "whiten_eps": 0.0005}  # untyped: it stayed a string
    assert cfg.data.data_dir == "1e3"  # a folder so named stays a string when written and read back
    save_yaml(cfg, tmp_path / "out.yaml")
    assert from_dict(load_yaml(tmp_path / "out.yaml")) == cfg


@pytest.mark.parametrize("values, match", [
    ({"train": {"lrr": 1}}, "unknown config key 'train.lrr'"),
    ({"trian": {}}, "unknown config section"),
    ({"train": {"epochs": "ten"}}, "train.epochs' must be int"),
    ({"train": {"amp": "yes"}}, "must be bool"),
    ({"data": {"val_fraction": "half"}}, "must be float"),
    ({"train": {"time_budget": "10m"}}, r"must be float, got '10m' \(in seconds, e.g. 600; the --time-budget flag"),
])
def test_bad_values_are_rejected(values, match):
    with pytest.raises(CifarlensError, match=match):
        merge(RunConfig(), values)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(CifarlensError, match="not found"):
        load_yaml(tmp_path / "nope.yaml")
    with pytest.raises(CifarlensError, match="is a folder; give a YAML file"):  # it said "not found"
        load_yaml(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(CifarlensError, match="not valid YAML"):
        load_yaml(bad)


def test_set_assignments():
    cfg = merge(RunConfig(), parse_assignment("train.weight_decay=5e-4"))
    assert cfg.train.weight_decay == 5e-4
    assert parse_assignment('model.kwargs={"whiten_eps": 5e-4}') == {"model": {"kwargs": {"whiten_eps": 0.0005}}}
    with pytest.raises(CifarlensError, match="SECTION.KEY=VALUE"):
        parse_assignment("weight_decay")


def test_one_model_option_can_be_set_keeping_the_others(tmp_path):
    from cifarlens.cli import build_parser
    from cifarlens.config_flags import config_from_args

    config = tmp_path / "mine.yaml"
    config.write_text("model:\n  name: fastnet\n  kwargs: {widths: [64, 256, 256], whiten_eps: 0.01}\n")

    def cfg(*sets):
        args = build_parser().parse_args(["train", "--config", str(config), *[a for s in sets for a in ("--set", s)]])
        return config_from_args(args, resolve=False)

    assert cfg("model.kwargs.widths=[64,192,192]").model.kwargs == {"widths": [64, 192, 192], "whiten_eps": 0.01}
    assert cfg("model.kwargs.widths=[32,64,128]", "model.kwargs.bn_momentum=0.5").model.kwargs == {
        "widths": [32, 64, 128], "whiten_eps": 0.01, "bn_momentum": 0.5}
    assert cfg("model.kwargs={widths: [32, 64, 128]}").model.kwargs == {"widths": [32, 64, 128]}  # the whole mapping
    for wrong in ("train.epochs.x=1", "model.kwargs.a.b=1", "model.kwargs.=1"):
        with pytest.raises(CifarlensError, match=r"only a mapping setting takes a key after its name"):
            cfg(wrong)
    with pytest.raises(CifarlensError, match=r"unknown config section|unknown config key|trian"):
        cfg("trian.epochs.x=1")


def test_recipes_fill_only_what_is_unset():
    cfg = resolve_train(merge(RunConfig(), {"train": {"recipe": "reference", "lr": 0.01}}).train)
    ref = RECIPES.get("reference")
    assert cfg.lr == 0.01 and cfg.optimizer == "adam" and cfg.schedule == "plateau"
    assert cfg.epochs == ref["epochs"]
    assert None not in to_dict(RunConfig(train=cfg))["train"].values()


def test_recipe_values_are_checked():
    with pytest.raises(CifarlensError, match="train.lr must be > 0"):
        resolve_train(merge(RunConfig(), {"train": {"recipe": "modern", "lr": -1.0}}).train)
    with pytest.raises(CifarlensError, match="unknown recipe"):
        resolve_train(merge(RunConfig(), {"train": {"recipe": "magic"}}).train)
    with pytest.raises(CifarlensError, match="train.recipe is unset: resolve the run config with"):
        resolve_train(RunConfig().train)  # the model decides it: resolve_choices first


def test_lr_schedules():
    # warm-up: linear up to the peak over 10 steps, then decay to 0 at the last step
    assert lr_factor(0, 100, 10, "onecycle") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "onecycle") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "onecycle") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "onecycle") == pytest.approx(0.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(50, 100, 0, "constant") == 1.0


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_a_retargeted_schedule_goes_on_without_a_jump_to_its_new_end_and_resumes_so(schedule):
    import torch

    from cifarlens.schedules import StepSchedule

    def scheduler():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, StepSchedule(opt, 100, 10, schedule)

    opt, sched = scheduler()
    for _ in range(50):
        opt.step()
        sched.step()
    before = opt.param_groups[0]["lr"]  # what step 50 uses: halfway down a 90-step decay (cosine: 0.5 too)
    sched.retarget(70)  # the run ends 30 steps sooner: the rest of the decay in 20 steps
    assert sched._factor(50) == pytest.approx(before)  # the new mapping starts where the old one was
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(before) and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # at the new end, step 70
    if schedule == "onecycle":  # linear: what was left, in 20 equal steps
        assert lrs[1] == pytest.approx(before * 19 / 20) and lrs[10] == pytest.approx(before / 2)
    # a resumed run's schedule (state_dict, as the checkpoint saves it) carries the retarget
    opt2, resumed = scheduler()
    resumed.load_state_dict(sched.state_dict())
    assert resumed.total_steps == 70 and resumed.retargeted == sched.retargeted
    assert [resumed._factor(s) for s in range(45, 75)] == [sched._factor(s) for s in range(45, 75)]
    opt3, later = scheduler()  # retargeted twice (at steps 0 and 60): the second goes on from the first
    later.retarget(80)
    for _ in range(60):
        opt3.step()
        later.step()
    lr60 = opt3.param_groups[0]["lr"]
    later.retarget(120)
    assert later._factor(60) == pytest.approx(lr60) and later._factor(120) == pytest.approx(0.0, abs=1e-12)
    assert later._factor(90) == pytest.approx(lr60 / 2) if schedule == "onecycle" else later._factor(90) < lr60
    with pytest.raises(ValueError, match="60 steps are taken"):
        later.retarget(60)


def test_a_retargeted_multistep_schedule_moves_the_milestones_ahead_in_proportion():
    """A time budget's re-plan from 376 to 156 epochs dropped the lr at one of wrn2016's three milestones."""
    import torch

    from cifarlens.schedules import StepSchedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = StepSchedule(opt, 100, 0, "multistep", (10, 50, 75), 0.1)
    for _ in range(20):
        opt.step()
        sched.step()
    sched.retarget(60)  # 80 steps left become 40: a milestone passed stays, those ahead halve their distance
    assert sched.milestones == (10, 35, 48)
    assert sched._factor(34) == pytest.approx(0.1) and sched._factor(35) == pytest.approx(0.01)
    assert sched._factor(59) == pytest.approx(0.001)
    resumed = StepSchedule(opt, 100, 0, "multistep", (10, 50, 75), 0.1)
    resumed.load_state_dict(sched.state_dict())  # the checkpoint keeps them
    assert resumed.milestones == (10, 35, 48)


def test_multistep_factor_drops_by_gamma_from_each_milestone_step():
    assert lr_factor(9, 100, 0, "multistep", (10, 20), 0.1) == 1.0
    assert lr_factor(10, 100, 0, "multistep", (10, 20), 0.1) == pytest.approx(0.1)
    assert lr_factor(19, 100, 0, "multistep", (10, 20), 0.1) == pytest.approx(0.1)
    assert lr_factor(20, 100, 0, "multistep", (10, 20), 0.1) == pytest.approx(0.01)
    assert lr_factor(0, 100, 5, "multistep", (10, 20), 0.1) == pytest.approx(0.2)  # linear warm-up first


def step_lrs(train: dict, steps_per_epoch: int) -> list[float]:
    """The lr each optimizer step of the run ``train`` describes uses."""
    import torch

    from cifarlens.schedules import build_optimizer, build_scheduler

    cfg = resolve_train(merge(RunConfig(), {"train": train}).train)
    optimizer = build_optimizer(torch.nn.Linear(2, 2).parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_multistep_lr_at_its_milestone_epochs():
    """wrn2016's schedule shape in 10 epochs of 4 steps, after one epoch of warm-up: the lr an
    epoch's first step uses drops by gamma exactly at the milestone epochs."""
    lrs = step_lrs({"recipe": "wrn2016", "epochs": 10, "milestones": [3, 6, 8], "warmup_epochs": 1}, 4)
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])  # warm-up
    assert lrs[::4] == pytest.approx([0.025, 0.1, 0.1, 0.02, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008])


def test_a_warm_up_takes_at_most_half_of_the_run():
    """modern --epochs 1 (1 epoch of warm-up) rose to its peak lr on the last step and never decayed."""
    lrs = step_lrs({"recipe": "modern", "epochs": 1}, 10)
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])  # up over 5 of the 10 steps
    assert lrs[4:] == sorted(lrs[4:], reverse=True) and lrs[-1] < 0.03  # then down


@pytest.mark.parametrize("train, message", [
    ({"milestones": [137, 91]}, r"train.milestones \[137.0, 91.0\] must be increasing epochs between 0 and"),
    ({"epochs": 100, "milestones": [91, 137]},
     r"must be increasing epochs between 0 and train.epochs \(100\).*milestones=\[50,75\]"),
    ({"milestones": []}, "train.schedule multistep needs train.milestones"),
    ({"gamma": 0.0}, "train.gamma must be > 0"),
])
def test_multistep_settings_are_checked(train, message):
    with pytest.raises(CifarlensError, match=message):
        resolve_train(merge(RunConfig(), {"train": {"recipe": "he2016", **train}}).train)


def test_a_key_given_twice_in_a_config_file_is_an_error_and_merge_keys_still_work(tmp_path):
    """PyYAML keeps the last of two equal keys silently: a second lr further down won unseen."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n")
    with pytest.raises(CifarlensError, match=r"'lr' is given twice \(line 4\)"):
        load_yaml(twice)
    anchors = tmp_path / "anchors.yaml"
    anchors.write_text("base: &b {lr: 0.1, epochs: 3}\ntrain: {<<: *b, lr: 0.2}\n")
    assert load_yaml(anchors)["train"] == {"lr": 0.2, "epochs": 3}  # a merged key may be overridden


def test_a_yaml_alias_bomb_is_refused_before_it_is_expanded(tmp_path):
    """550 bytes of nested aliases gave an error message of 358 MB (13 s, 1.6 GB); one more level, 10x."""
    levels = ["&a0 [1,1,1,1,1,1,1,1,1,1]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("model:\n  kwargs:\n    widths: [" + ", ".join(levels) + "]\n")
    assert bomb.stat().st_size < 1000
    with pytest.raises(CifarlensError, match=r"more than 100,000 values once its aliases \(\*name\) are expanded"):
        load_yaml(bomb)
    with pytest.raises(CifarlensError, match=r"--set model.kwargs holds more than 100,000 values"):
        parse_assignment("model.kwargs={w: [" + ", ".join(levels) + "]}")


@pytest.mark.parametrize("epochs, milestones", [(2, r"\[1,1\.5\]"), (1, r"\[0\.5,0\.75\]")])
def test_the_milestones_suggested_for_few_epochs_are_themselves_accepted(epochs, milestones):
    """For --epochs 2 the hint said milestones=[1,1], which the same check refused."""
    with pytest.raises(CifarlensError, match=f"milestones={milestones}") as err:
        resolve_train(merge(RunConfig(), {"train": {"recipe": "he2016", "epochs": epochs, "milestones": [91, 137]}}).train)
    suggested = [float(m) for m in str(err.value).rsplit("=", 1)[1].strip("[]").split(",")]
    resolve_train(merge(RunConfig(), {"train": {"recipe": "he2016", "epochs": epochs, "milestones": suggested}}).train)


def test_epochs_of_a_multistep_recipe_keep_its_drops_at_the_same_shares_of_the_run():
    """he2016 --epochs 20 was refused (its drops at epochs 91 and 137 lay beyond the run)."""
    he = resolve_train(merge(RunConfig(), {"train": {"recipe": "he2016", "epochs": 20}}).train)
    assert he.milestones == [10.0, 15.055]  # 91 and 137 of 182 epochs
    wrn = resolve_train(merge(RunConfig(), {"train": {"recipe": "wrn2016", "epochs": 10}}).train)
    assert wrn.milestones == [3.0, 6.0, 8.0]  # 60, 120 and 160 of 200
    own = resolve_train(merge(RunConfig(), {"train": {"recipe": "he2016", "epochs": 20, "milestones": [5, 9]}}).train)
    assert own.milestones == [5.0, 9.0]  # the user's own are kept
    assert resolve_train(merge(RunConfig(), {"train": {"recipe": "he2016"}}).train).milestones == [91.0, 137.0]


@pytest.mark.parametrize("key, value", [("grad_clip", -1.0), ("grad_clip", float("nan")),
                                        ("warmup_epochs", float("inf")), ("backbone_lr_scale", float("inf")),
                                        ("weight_decay", float("nan"))])
def test_values_that_would_silently_misbehave_are_refused(key, value):
    with pytest.raises(CifarlensError, match=f"train.{key} must be"):
        resolve_train(merge(RunConfig(), {"train": {"recipe": "modern", key: value}}).train)


def test_model_options_of_the_wrong_kind_are_one_line_errors():
    from cifarlens.models import create_model

    with pytest.raises(CifarlensError, match="FastNet widths must be a list of positive integers"):
        create_model("fastnet", 10, widths=32)
    with pytest.raises(CifarlensError, match="FastNet whiten_eps must be a finite number > 0"):
        create_model("fastnet", 10, whiten_eps=-1)
    with pytest.raises(CifarlensError, match="FastNet logit_scale must be a finite number > 0"):
        create_model("fastnet", 10, logit_scale=float("nan"))
    with pytest.raises(CifarlensError, match="model 'lensnet' cannot be built with the options"):
        create_model("lensnet", 10, widths=32)


def test_epochs_beside_a_time_budget_from_a_config_file_is_refused(tmp_path, capsys):
    from cifarlens.cli import main

    config = tmp_path / "budget.yaml"
    config.write_text("train:\n  time_budget: 30\n")
    assert main(["train", "--config", str(config), "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    assert "--epochs 1 and train.time_budget 30 s (from --config or --set) both set" in capsys.readouterr().err
    assert main(["train", "--set", "train.time_budget=30", "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()
