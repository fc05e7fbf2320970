"""Augmentation policies (Cutout, RandomErasing, AutoAugment, RandAugment, TrivialAugmentWide, MixUp,
CutMix), the soft-target loss they need, and the recipes named after the papers."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import make_cifar10, synthetic_images
from test_engine import HostReads

from cifarlens import engine
from cifarlens.cli import build_parser, main
from cifarlens.config_flags import config_from_args
from cifarlens.config import DataConfig, RunConfig, merge
from cifarlens.data.autoaugment import CIFAR10_POLICY, UNIFORM_OPS, AutoAugment, apply_ops, magnitude_space
from cifarlens.data.base import DatasetInfo, Split
from cifarlens.data.pipeline import make_loader, train_transform
from cifarlens.data.policies import POLICIES, MixCut, build_policies, check_policies, describe_augmentation
from cifarlens.engine import Precision
from cifarlens.errors import CifarlensError
from cifarlens.models import create_model
from cifarlens.recipes import resolve_train
from cifarlens.schedules import build_optimizer, build_scheduler, param_groups

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
INFO = DatasetInfo("cifar10", tuple("abcdefghij"), 3, 32, MEAN, STD)
CPU = torch.device("cpu")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cifar_batch(b: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, 32, 32) uint8 learnable images and their labels (B,)."""
    labels = np.arange(b) % 10
    images = synthetic_images(labels, 3, 32, 32, np.random.default_rng(seed))
    return torch.from_numpy(images), torch.from_numpy(labels)


def augment(policy: str, images: torch.Tensor, labels: torch.Tensor, seed: int = 0, level: str = "none", **options):
    """The training pipeline of ``level`` + ``policy``: (images, soft targets or None)."""
    cfg = DataConfig(augment=level, policies=[policy], **options)
    g = gen(seed)
    x = train_transform(INFO, cfg)(images, g)
    _, _, mixer = build_policies(cfg, INFO)
    return mixer(x, labels, g) if mixer is not None else (x, None)


def normalised_range() -> tuple[torch.Tensor, torch.Tensor]:
    """(1, C, 1, 1) lowest and highest value a [0, 1] pixel takes after normalisation."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


@pytest.mark.parametrize("policy", POLICIES.names())
def test_every_policy_keeps_shape_dtype_and_range(policy):
    images, labels = cifar_batch()
    x, targets = augment(policy, images, labels, level="standard")
    low, high = normalised_range()
    assert x.shape == images.shape and x.dtype == torch.float32
    assert bool(((x >= low - 1e-5) & (x <= high + 1e-5)).all()), f"{policy} left the range of real pixels"
    assert not torch.equal(x, augment(policy, images, labels, level="standard", seed=1)[0])
    if POLICIES.get(policy).stage == "mix":
        assert targets.shape == (32, 10) and targets.dtype == torch.float32
        assert bool((targets >= 0).all()) and torch.allclose(targets.sum(1), torch.ones(32))
    else:
        assert targets is None


@pytest.mark.parametrize("policy", ["autoaugment", "randaugment", "trivialaugment"])
def test_auto_policies_take_and_give_uint8_images(policy):
    images, labels = cifar_batch()
    (op,), _, _ = build_policies(DataConfig(policies=[policy]), INFO)
    out = op(images, gen())
    assert out.dtype == torch.uint8 and out.shape == images.shape
    with pytest.raises(CifarlensError, match="uint8"):
        op(images.float(), gen())


@pytest.mark.parametrize("policy", POLICIES.names())
def test_each_image_draws_its_own_parameters(policy):
    """A batch of one image repeated 64 times: a parameter drawn once per batch (as torchvision's
    AutoAugment/RandAugment/TrivialAugmentWide and kornia's auto policies draw their operation)
    would give a handful of distinct results; one per image gives many."""
    image, _ = cifar_batch(1)
    images, labels = image.repeat(64, 1, 1, 1), torch.arange(64) % 10
    if POLICIES.get(policy).stage == "mix":  # partners must differ to be seen: lambda is the parameter
        images, labels = cifar_batch(64)
        _, targets = augment(policy, images, labels)
        own = targets.gather(1, labels.view(-1, 1)).squeeze(1)  # lambda of each image (its own label's share)
        mixed = own < 1 - 1e-6
        assert int(mixed.sum()) >= 10
        assert len(set(own[mixed].mul(1e4).round().tolist())) >= 10
        return
    x, _ = augment(policy, images, labels)
    distinct = len({tuple(v.mul(1e3).round().int().flatten().tolist()) for v in x})
    assert distinct >= 20, f"{policy}: only {distinct} distinct results in a batch of 64 copies of one image"


@pytest.mark.parametrize("policy", POLICIES.names())
def test_the_same_seed_gives_the_same_batches(policy):
    split = Split(*cifar_batch(64))
    cfg = DataConfig(augment="standard", policies=[policy])

    def batches(seed: int) -> list[torch.Tensor]:
        loader = make_loader(split, INFO, 16, CPU, seed=seed, train_cfg=cfg)
        loader.set_epoch(1)
        return [t for batch in loader for t in batch]

    first, again, other = batches(3), batches(3), batches(4)
    assert len(first) == len(other)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("policy", ["mixup", "cutmix"])
def test_mixed_targets_match_the_mixed_images(policy):
    """Each image is a constant equal to its label, so a mixed image's mean is the mix of the two
    labels; the targets must give the same mix (sum_k k t_k), and sum to 1."""
    labels = torch.arange(64) % 10
    x = labels.float().view(-1, 1, 1, 1).expand(64, 3, 8, 8).contiguous()
    mixer = MixCut(10, mixup_prob=1.0 if policy == "mixup" else 0.0, cutmix_prob=1.0 if policy == "cutmix" else 0.0)
    mixed, targets = mixer(x, labels, gen())
    assert torch.allclose(targets.sum(1), torch.ones(64))
    expected = (targets * torch.arange(10.0)).sum(1)
    assert torch.allclose(mixed.mean(dim=(1, 2, 3)), expected, atol=1e-5)
    assert int((targets.max(1).values < 1).sum()) > 32  # most images were mixed with another class


def test_cutmix_and_mixup_together_share_the_images_by_their_probabilities():
    labels = torch.arange(4000) % 10
    x = torch.rand(4000, 1, 8, 8, generator=gen(2))
    mixed, targets = MixCut(10, mixup_prob=0.5, cutmix_prob=0.4)(x, labels, gen())
    changed = (mixed != x).flatten(1)
    cut = changed.any(1) & ~changed.all(1)  # a box: some pixels replaced, others kept
    blended = changed.all(1)
    assert abs(cut.float().mean().item() - 0.4) < 0.05  # cut-mixed with probability 0.4 ...
    assert abs(blended.float().mean().item() - 0.6 * 0.5) < 0.05  # ... else mixed up with probability 0.5


def test_cutout_zeroes_one_square_per_image():
    x = torch.ones(200, 3, 32, 32)
    out = POLICIES.get("cutout").build(DataConfig(cutout_size=16), INFO)(x, gen())
    zeroed = (out[:, 0] == 0)  # (B, H, W)
    rows, cols = zeroed.any(2).sum(1), zeroed.any(1).sum(1)
    assert bool((zeroed.sum((1, 2)) == rows * cols).all())  # a rectangle
    assert int(rows.max()) == 16 and int(cols.max()) == 16 and int(rows.min()) >= 8  # clipped at the border
    assert bool((out[:, 1:] == out[:, :1]).all())  # every channel alike


def test_soft_targets_give_the_soft_cross_entropy_and_accuracy_counts_the_labels():
    """One MixUp+CutMix batch through train_one_epoch (lr 0): its loss is the hand-computed soft
    cross-entropy with label smoothing, and accuracy is counted against the labels drawn."""
    split = Split(*cifar_batch(32))
    cfg = DataConfig(augment="standard", policies=["mixup", "cutmix"])
    loader = make_loader(split, INFO, 32, CPU, seed=5, train_cfg=cfg)
    (images, labels, targets), = list(loader)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    with torch.no_grad():
        logits = model(images)
    smoothed = 0.9 * targets + 0.1 / 10
    expected = -(smoothed * logits.log_softmax(1)).sum(1).mean()
    assert not torch.allclose(expected, F.cross_entropy(logits, labels, label_smoothing=0.1))  # not the hard loss
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    result = engine.train_one_epoch(model, loader, optimizer, None, Precision(CPU), label_smoothing=0.1)
    assert float(result["train_loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(result["train_acc"]) == pytest.approx((logits.argmax(1) == labels).float().mean().item())


def test_policies_add_no_host_read_per_step():
    """Every policy on: the host reads of an epoch do not grow with its number of batches."""
    cfg = DataConfig(augment="strong", policies=POLICIES.names())
    model = create_model("lensnet_light", 10, 3, widths=[4], depths=[1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def reads(batches: int) -> int:
        split = Split(torch.randint(0, 256, (8 * batches, 3, 32, 32), dtype=torch.uint8), torch.arange(8 * batches) % 10)
        loader = make_loader(split, INFO, 8, CPU, train_cfg=cfg)
        with HostReads() as counted:
            engine.train_one_epoch(model, loader, optimizer, None, Precision(CPU), label_smoothing=0.1,
                                   check_every=1000)
        return counted.count

    reads(1)  # tables and constants are made once per device
    assert reads(2) == reads(5)


@pytest.mark.parametrize("name", UNIFORM_OPS + ("Invert",))
def test_each_operation_matches_torchvision_on_uint8_images(name):
    """Our batched operations give torchvision's results within 2 levels: torchvision truncates its grey
    image and its blends to uint8, ours stay float and round once."""
    from torchvision.transforms import v2

    images, _ = cifar_batch(4)
    space = magnitude_space("standard", 10, 32, 32)
    table = space.get(name, (None, False))[0]
    magnitude = table[7] if table else 0.0
    reference = v2.RandAugment()
    for m in {magnitude, -magnitude if space.get(name, (None, False))[1] else magnitude}:
        want = torch.stack([reference._apply_image_or_video_transform(img, name, m, interpolation=v2.InterpolationMode.NEAREST,
                                                                      fill=reference._fill) for img in images])
        ops = UNIFORM_OPS + ("Invert",)
        got = apply_ops(images.float(), torch.full((4,), ops.index(name)), torch.full((4,), m), ops)
        assert int((got.round().clamp(0, 255) - want.float()).abs().max()) <= 2, f"{name} at {m}"


def test_policy_tables_are_torchvision_s():
    from torchvision.transforms import v2

    assert list(CIFAR10_POLICY) == v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)._policies
    for ours, theirs, bins in [("standard", v2.AutoAugment, 10), ("standard", v2.RandAugment, 31),
                               ("wide", v2.TrivialAugmentWide, 31)]:
        space = magnitude_space(ours, bins, 32, 32)
        for op, (magnitudes, signed) in theirs._AUGMENTATION_SPACE.items():
            if op == "Identity":
                continue
            values = magnitudes(bins, 32, 32)
            assert space[op][1] == signed, op
            if values is None:
                assert space[op][0] is None, op
            else:
                assert space[op][0] == pytest.approx(values.float().tolist(), rel=1e-6), (ours, op)  # float32 there


def test_autoaugment_applies_each_operation_with_its_probability():
    """The share of images left untouched is the policy's: the mean over its 25 sub-policies of the
    chance that neither operation runs (Color at magnitude bin 0 is a factor of 1, no change).
    Random images, so every other operation changes some pixel."""
    images = torch.randint(30, 220, (4000, 3, 32, 32), dtype=torch.uint8, generator=gen(1))
    out = AutoAugment()(images, gen())
    untouched = (out == images).flatten(1).all(1).float().mean().item()
    skipped = [[1.0 if (op, level) == ("Color", 0) else 1 - p for op, p, level in sub] for sub in CIFAR10_POLICY]
    expected = float(np.mean([a * b for a, b in skipped]))  # 0.21
    assert abs(untouched - expected) < 0.03, (untouched, expected)


@pytest.mark.parametrize("bad, message", [
    ({"policies": ["cutout", "magic"]}, "unknown augmentation policy 'magic'"),
    ({"policies": ["cutout", "cutout"]}, "lists cutout more than once"),
    ({"policies": ["mixup"], "mixup_alpha": 0.0}, "data.mixup_alpha must be > 0"),
    ({"policies": ["cutmix"], "cutmix_prob": 1.5}, "data.cutmix_prob must be in"),
    ({"policies": ["randaugment"], "randaugment_m": 31}, "data.randaugment_m must be a magnitude bin"),
    ({"policies": ["cutout"], "cutout_size": 0}, "data.cutout_size must be >= 1"),
])
def test_bad_policy_settings_are_one_line_errors(bad, message):
    with pytest.raises(CifarlensError, match=message):
        check_policies(DataConfig(**bad))


@pytest.mark.parametrize("bad, message", [
    ({"crop_padding": -3}, "data.crop_padding must be a whole number of pixels >= 0, got -3"),
    ({"crop_padding": 32}, "data.crop_padding 32 is not smaller than the 32-pixel images"),
    ({"policies": ["cutout"], "cutout_size": 32}, "data.cutout_size 32 is not smaller than the 32-pixel images"),
])
def test_a_crop_or_cutout_that_could_leave_no_image_is_refused(bad, message):
    """A negative padding crashed the per-image loader mid-run and did nothing on the batched one;
    padding or Cutout as large as the image trained on black images."""
    with pytest.raises(CifarlensError, match=message):
        check_policies(DataConfig(**bad), image_size=32)
    check_policies(DataConfig(crop_padding=31, policies=["cutout"], cutout_size=31), image_size=32)
    check_policies(DataConfig(cutout_size=64), image_size=32)  # no Cutout asked for: its size is not used


def test_the_per_image_loader_refuses_policies():
    split = Split(*cifar_batch(16))
    with pytest.raises(CifarlensError, match="need the batched loader"):
        make_loader(split, INFO, 8, CPU, train_cfg=DataConfig(loader="perimage", policies=["cutout"]))


def parse(*argv: str) -> RunConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]), resolve=False)


def test_the_augment_flag_takes_a_level_and_policies():
    cfg = parse("--augment", "standard+cutout+autoaugment")
    assert (cfg.data.augment, cfg.data.policies) == ("standard", ["cutout", "autoaugment"])
    cfg = parse("--augment", "strong")
    assert (cfg.data.augment, cfg.data.policies) == ("strong", [])
    cfg = parse("--augment", "mixup+cutmix")  # no level: the dataset's own
    assert (cfg.data.augment, cfg.data.policies) == (None, ["mixup", "cutmix"])
    cfg = parse("--set", "data.policies=[cutout, erasing]")
    assert cfg.data.policies == ["cutout", "erasing"]
    assert describe_augmentation(replace(cfg.data, augment="standard")) == \
        "standard crop+flip + Cutout 16x16 + RandomErasing p=0.5"


def test_the_augment_flag_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        parse("--augment", "standard+magic")
    assert "'magic' is not an augmentation level" in capsys.readouterr().err
    for spec, message in (("flip+strong", "two levels, 'flip' and 'strong'"), ("cutout+cutout", "'cutout' is named twice"),
                          ("", "no level or policy named in ''"), (" + ", "no level or policy named")):  # "" was taken
        with pytest.raises(SystemExit):
            parse("--augment", spec)
        assert message in capsys.readouterr().err


def resolved(recipe: str):
    return resolve_train(merge(RunConfig(), {"train": {"recipe": recipe}}).train)


def test_the_paper_recipes_resolve_to_the_papers_settings():
    he = resolved("he2016")
    assert (he.optimizer, he.lr, he.momentum, he.nesterov, he.weight_decay, he.batch_size) == \
        ("sgd", 0.1, 0.9, False, 1e-4, 128)
    assert (he.schedule, he.milestones, he.gamma, he.label_smoothing) == ("multistep", [91.0, 137.0], 0.1, 0.0)
    steps = 45_000 // 128  # the default 45k/5k split
    assert [round(m * steps, -3) for m in he.milestones + [he.epochs]] == [32_000, 48_000, 64_000]
    wrn = resolved("wrn2016")
    assert (wrn.optimizer, wrn.lr, wrn.momentum, wrn.nesterov, wrn.weight_decay, wrn.batch_size, wrn.epochs) == \
        ("sgd", 0.1, 0.9, True, 5e-4, 128, 200)
    assert (wrn.schedule, wrn.milestones, wrn.gamma, wrn.label_smoothing) == ("multistep", [60.0, 120.0, 160.0], 0.2, 0.0)


@pytest.mark.parametrize("recipe", ["he2016", "wrn2016"])
def test_the_paper_recipes_train(recipe):
    """12 steps of the recipe, its milestones compressed into them, with Cutout and MixUp, on one
    batch of learnable images (resnet20: the small network of both papers' family)."""
    torch.manual_seed(0)
    tc = resolved(recipe)
    tc = replace(tc, milestones=[m / tc.epochs for m in tc.milestones], epochs=1)  # drops at steps 6-10 of 12
    model = create_model("resnet20", num_classes=10)
    images, labels = cifar_batch(16)
    data = DataConfig(augment="standard", policies=["cutout", "mixup"])
    optimizer = build_optimizer(param_groups(model, tc), tc)
    scheduler = build_scheduler(optimizer, tc, steps_per_epoch=12)
    transform, (_, _, mixer) = train_transform(INFO, data), build_policies(data, INFO)
    g = gen()
    model.train()
    losses, lrs = [], []
    for _ in range(12):
        x, targets = mixer(transform(images, g), labels, g)
        loss = F.cross_entropy(model(x), targets, label_smoothing=tc.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and max(losses) < 3 * np.log(10), losses
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.1 * tc.gamma ** len(tc.milestones))


def test_a_run_records_its_recipe_policies_and_schedule_and_reports_them(tmp_path):
    data = make_cifar10(tmp_path / "data", n_train_per_batch=16, n_test=20).data_dir
    out = tmp_path / "run"
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(data), "--device", "cpu", "--recipe", "he2016",
                 "--epochs", "2", "--set", "train.milestones=[1]", "--batch-size", "16",
                 "--augment", "standard+cutout+randaugment+cutmix", "--model", "resnet20",
                 "--out", str(out), "--no-report"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["policies"] == ["cutout", "randaugment", "cutmix"]
    assert (saved["train"]["schedule"], saved["train"]["milestones"]) == ("multistep", [1.0])
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    with open(out / "history.csv") as f:
        lrs = [float(row["lr"]) for row in csv.DictReader(f)]
    assert lrs == pytest.approx([0.1, 0.01])  # he2016's lr divided by 10 at the milestone, epoch 1
    assert main(["report", str(out), "--device", "cpu", "--no-robustness"]) == 0
    page = (out / "report.html").read_text()
    literature = re.search(r'<section id="literature">(.*?)</section>', page, re.DOTALL).group(1)
    ours = re.search(r'<tr class="ours">(.*?)</tr>', literature, re.DOTALL).group(1)
    augmentation = "standard crop+flip + Cutout 16x16 + RandAugment N=2 M=9 + CutMix alpha=1 p=0.5"
    assert f"{augmentation}; recipe he2016" in ours  # beside the published rows' "standard crop+flip"
    assert f"recipe he2016, augmentation {augmentation}" in literature
    resnet20 = re.search(r"<tr[^>]*><td>ResNet-20</td>(.*?)</tr>", literature, re.DOTALL).group(1)
    assert "standard crop+flip" in resnet20 and "same architecture as this run; same recipe as this run" in resnet20
    resnet32 = re.search(r"<tr[^>]*><td>ResNet-32</td>(.*?)</tr>", literature, re.DOTALL).group(1)
    assert "same recipe as this run" in resnet32 and "same architecture" not in resnet32


def test_a_bad_policy_in_a_config_file_stops_before_the_run_folder(tmp_path, capsys):
    data = make_cifar10(tmp_path / "data", n_train_per_batch=8, n_test=10).data_dir
    out = tmp_path / "run"
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(data), "--device", "cpu",
                 "--set", "data.policies=[cutout,magic]", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "cifarlens: error: unknown augmentation policy 'magic'; choose one of: " + ", ".join(POLICIES.names())]
    assert not out.exists()


def test_noise_adds_gaussian_noise_of_at_most_its_std_to_a_share_of_the_images():
    images = torch.full((400, 3, 8, 8), 128, dtype=torch.uint8)  # mid-grey: no clipping at 0.1 std
    x, _ = augment("noise", images, torch.zeros(400, dtype=torch.int64), noise_std=0.1, noise_prob=0.5)
    clean = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    std = ((x - clean) * torch.tensor(STD).view(1, 3, 1, 1)).flatten(1).std(dim=1)  # (B,) in [0, 1] pixel units
    noisy = std > 1e-6
    assert 0.4 < noisy.float().mean() < 0.6  # noise_prob
    assert float(std.max()) < 0.1 * 1.2 and float(std[noisy].mean()) == pytest.approx(0.05, abs=0.01)  # U(0, 0.1)
    with pytest.raises(CifarlensError, match="noise_prob"):
        check_policies(DataConfig(policies=["noise"], noise_prob=2.0))
