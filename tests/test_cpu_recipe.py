"""The CPU recipe for real CIFAR-10 (issue 16) and the Muon options it uses: the filters' own
momentum and airbench94_muon's weight renormalisation."""

import pytest
import torch

from cifarlens.config import RunConfig, merge
from cifarlens.errors import CifarlensError
from cifarlens.models import create_model
from cifarlens.optim import MuonSGD, muon_groups
from cifarlens.recipes import resolve_train
from cifarlens.schedules import build_optimizer, param_groups


def train_cfg(**train):
    return resolve_train(merge(RunConfig(), {"train": {"recipe": "fast_cpu", **train}}).train)


def tiny_fastnet(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("fastnet", 10, 3, widths=[4, 8, 8])


def test_the_filters_get_their_own_momentum_and_renorm_flag():
    model = tiny_fastnet()
    cfg = train_cfg(optimizer="muon", momentum=0.85, muon_momentum=0.6, muon_renorm=True)
    groups = {g["name"]: g for g in build_optimizer(param_groups(model, cfg), cfg).param_groups}
    assert [(g["momentum"], g["renorm"]) for g in groups.values()] == [(0.85, False), (0.85, False), (0.6, True)]
    plain_cfg = train_cfg(optimizer="muon", momentum=0.85)
    plain = build_optimizer(param_groups(model, plain_cfg), plain_cfg)
    assert {(g["momentum"], g["renorm"]) for g in plain.param_groups} == {(0.85, False)}  # 0 / off: as before


def test_muon_ns_steps_reaches_every_filter_group_and_is_checked():
    model = tiny_fastnet()
    cfg = train_cfg(optimizer="muon", muon_ns_steps=3)
    optimizer = build_optimizer(param_groups(model, cfg), cfg)
    assert {g["ns_steps"] for g in optimizer.param_groups if g["muon"]} == {3}
    default = train_cfg(optimizer="muon")
    assert {g["ns_steps"] for g in build_optimizer(param_groups(model, default), default).param_groups} == {5}
    with pytest.raises(CifarlensError, match="muon_ns_steps"):
        train_cfg(optimizer="muon", muon_ns_steps=0)


def one_step(weight: torch.Tensor, grad: torch.Tensor, renorm: bool, lr: float = 0.1) -> torch.Tensor:
    p = torch.nn.Parameter(weight.clone())
    p.grad = grad.clone()
    MuonSGD(muon_groups([p], lr, lr, renorm=renorm), lr=lr, momentum=0.6, weight_decay=5e-4).step()
    return p.detach()


def test_renorm_fixes_the_filters_norm_so_the_step_no_longer_depends_on_their_scale():
    gen = torch.Generator().manual_seed(0)
    weight, grad = torch.randn(8, 4, 3, 3, generator=gen), torch.randn(8, 4, 3, 3, generator=gen)
    assert one_step(weight, grad, True, lr=1e-12).norm() == pytest.approx(8**0.5, rel=1e-5)  # sqrt(out channels)
    # a filter bank 10x larger (which BatchNorm after it cannot tell apart) takes the same step ...
    assert torch.allclose(one_step(10 * weight, grad, True), one_step(weight, grad, True), atol=1e-6)
    # ... while without renorm the same update turns the larger weights ten times less
    small, large = one_step(weight, grad, False), one_step(10 * weight, grad, False)
    turn = [torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) for a, b in
            ((small, weight), (large, 10 * weight))]
    assert 1 - turn[0] > 20 * (1 - turn[1])


def test_an_old_optimizer_state_without_renorm_loads_and_steps():
    model = tiny_fastnet()
    cfg = train_cfg(optimizer="muon")
    optimizer = build_optimizer(param_groups(model, cfg), cfg)
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        group.pop("renorm")  # as saved before the option existed
    optimizer.load_state_dict(state)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()


def test_a_bad_muon_momentum_is_refused():
    with pytest.raises(CifarlensError, match="muon_momentum must be in"):
        train_cfg(optimizer="muon", muon_momentum=1.0)


# -- the recipe: its data settings, resolved where the user left them unset -------------------------

def test_the_recipe_sets_its_data_settings_where_the_user_left_them_unset():
    from cifarlens.recipes import resolve_choices

    cfg, why = resolve_choices(merge(RunConfig(), {"train": {"recipe": "fast_cpu_10min"}}), "cpu")
    assert (cfg.data.val_fraction, cfg.data.crop_padding, cfg.data.flip) == (0.0, 2, "alternating")
    assert why["data"] == "val_fraction=0.0, crop_padding=2, flip=alternating (recipe fast_cpu_10min)"
    mine = merge(RunConfig(), {"data": {"val_fraction": 0.2, "flip": "random"}, "train": {"recipe": "fast_cpu_10min"}})
    cfg, why = resolve_choices(mine, "cpu")
    assert (cfg.data.val_fraction, cfg.data.crop_padding, cfg.data.flip) == (0.2, 2, "random")  # explicit values win
    assert why["data"] == "crop_padding=2 (recipe fast_cpu_10min)"
    cfg, why = resolve_choices(RunConfig(), "cpu")  # other recipes: the long-standing defaults, nothing to say
    assert (cfg.data.val_fraction, cfg.data.crop_padding, cfg.data.flip) == (0.1, 4, "random") and "data" not in why


def test_fastnet_on_a_cpu_gets_the_recipe_and_on_a_gpu_the_speed_record_one():
    from cifarlens.recipes import resolve_choices

    cfg, why = resolve_choices(merge(RunConfig(), {"model": {"name": "fastnet"}}), "cpu")
    assert cfg.train.recipe == "fast_cpu_10min" and why["recipe"] == "default for fastnet on a CPU"
    cfg, _ = resolve_choices(merge(RunConfig(), {"model": {"name": "fastnet"}}), "cuda")
    assert cfg.train.recipe == "fast" and cfg.data.val_fraction == 0.1


def test_tuning_refuses_a_recipe_without_validation_split(tmp_path):
    pytest.importorskip("optuna")
    from cifarlens.tune.search import Tuner

    cfg = merge(RunConfig(), {"train": {"recipe": "fast_cpu_10min", "device": "cpu"}})
    with pytest.raises(CifarlensError, match="from --set/--config or recipe fast_cpu_10min"):
        Tuner(cfg, tmp_path / "study", trials=1)
    # a recipe that sets no val_fraction is not blamed for a 0 from --set
    cfg = merge(RunConfig(), {"train": {"recipe": "fast_cpu", "device": "cpu"}, "data": {"val_fraction": 0.0}})
    with pytest.raises(CifarlensError, match=r"it is 0 here, from --set/--config\)"):
        Tuner(cfg, tmp_path / "study2", trials=1)


def test_a_run_of_the_recipe_trains_small_then_full_size_on_every_image(tmp_path):
    import json

    import yaml
    from conftest import train_tiny_cifar10

    out, _ = train_tiny_cifar10(tmp_path, "--recipe", "fast_cpu_10min", "--set", "model.kwargs={widths: [8, 16, 16]}",
                                "--set", "train.progressive_epochs=1", epochs=2)
    log = (out / "train.log").read_text()
    assert "data settings of the recipe: val_fraction=0.0, crop_padding=2, flip=alternating" in log
    epochs = [line for line in log.splitlines() if line.startswith("epoch ") and "train_loss" in line]
    assert "trained at 24 px wide" in epochs[0] and "trained at" not in epochs[1]
    text = (out / "config.yaml").read_text()
    assert text.startswith("# data: val_fraction=0.0, crop_padding=2, flip=alternating (recipe fast_cpu_10min)")
    cfg = yaml.safe_load(text)
    assert (cfg["data"]["val_fraction"], cfg["data"]["crop_padding"], cfg["data"]["flip"]) == (0.0, 2, "alternating")
    assert (cfg["train"]["optimizer"], cfg["train"]["progressive_res"], cfg["train"]["tta_translate"]) == ("muon", 24, 1)
    assert json.loads((out / "run.json").read_text())["split_sizes"] == {"train": 200, "val": 0, "test": 50}


def test_the_recipes_step_never_waits_for_the_device():
    """Progressive resizing and Muon (with the renormalisation too) read nothing back per step,
    so the GPU path keeps its queue full: an epoch's host reads do not grow with its steps."""
    from dataclasses import replace

    from conftest import fast_epoch_parts
    from test_engine import HostReads

    from cifarlens.engine import Precision, train_one_epoch
    from cifarlens.schedules import build_scheduler

    cpu = torch.device("cpu")

    def reads(batches: int) -> int:
        model, loader, _, _, ema, cfg = fast_epoch_parts(cpu, batches, 4, widths=[4, 8], recipe="fast_cpu_10min")
        cfg = replace(cfg, muon_renorm=True)
        optimizer = build_optimizer(param_groups(model, cfg), cfg)
        with HostReads() as training:
            train_one_epoch(model, loader, optimizer, build_scheduler(optimizer, cfg, len(loader)), Precision(cpu),
                            label_smoothing=cfg.label_smoothing, ema=ema, check_every=1000, train_side=lambda full: 24)
        return training.count

    reads(1)  # constants made once per device are made here
    assert reads(2) == reads(6)
