"""Leaving some easy images out of the middle epochs (train.prune_easy, cifarlens.data.pruning)."""

import pytest
import torch
from torch import nn

from cifarlens.config import RunConfig, merge
from cifarlens.data.base import Split
from cifarlens.data.loader import TensorLoader
from cifarlens.data.pruning import EasyPruning
from cifarlens.engine import FitState, Precision, fit
from cifarlens.epochs import epoch_steps, pruned_epoch
from cifarlens.errors import CifarlensError
from cifarlens.recipes import resolve_train
from cifarlens.schedules import build_optimizer, build_scheduler, epochs_before, param_groups, schedule_steps

CPU = torch.device("cpu")


def train_cfg(**train):
    return resolve_train(merge(RunConfig(), {"train": {"recipe": "fast_cpu", **train}}).train)


def loader(n: int = 64, batch_size: int = 8) -> TensorLoader:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=gen)
    return TensorLoader(Split(images, torch.arange(n) % 10), batch_size, lambda x, g: x.float() / 255,
                        device=CPU, shuffle=True)


def test_a_pruned_epoch_puts_the_kept_images_first_and_weighs_up_the_kept_easy_ones():
    data = loader()
    data.pruning = pruning = EasyPruning(64, 0.5, CPU)
    pruning.scores.copy_(torch.arange(64.0).flip(0))  # image 63 is the easiest, image 0 the hardest
    pruning.active = True
    batches = []
    for _ in data:
        batches.append(pruning.batch.clone())
    kept = torch.cat(batches)
    assert len(batches) == 6 and len(set(kept.tolist())) == 48  # 6 whole batches of the images kept
    left_out = set(range(64)) - set(kept.tolist())
    assert len(left_out) == 16 and left_out < set(range(32, 64))  # 16 = half of the easier half, all from it
    assert set(range(32)) <= set(kept.tolist())  # the harder half always trains
    weights = pruning.weights
    assert torch.equal(weights[:32], torch.ones(32))  # hard images: weight 1
    assert torch.equal(weights[32:], torch.full((32,), 2.0))  # easy ones kept: 32 / 16 = 2 (unbiased sum)

    pruning.active = False  # an epoch that is not pruned: the loader's own order, weights 1
    plain = loader()
    expected = torch.cat([labels for _, labels in plain])
    assert torch.equal(torch.cat([labels for _, labels in data]), expected)
    assert torch.equal(pruning.weights, torch.ones(64))


def test_the_first_and_last_epochs_see_every_image_and_the_schedule_counts_the_pruned_ones():
    cfg = train_cfg(epochs=5, prune_easy=0.5)
    assert [pruned_epoch(cfg, e) for e in range(5)] == [False, True, True, True, False]
    assert [epoch_steps(cfg, e, 100) for e in range(5)] == [100, 75, 75, 75, 100]
    assert [epoch_steps(cfg, e, 3) for e in range(5)] == [3, 2, 2, 2, 3]  # rounded down: whole batches of kept images
    assert schedule_steps(cfg, 100) == 425
    off = train_cfg(epochs=5)
    assert off.prune_easy == 0.0 and schedule_steps(off, 100) == 500


def test_multistep_milestones_and_the_warm_up_fall_where_their_epochs_begin():
    """Milestones in epochs were turned into steps as if every epoch were whole: with pruned epochs
    he2016's drop at epoch 91 of 182 came in epoch 122, the one at 137 never."""
    cfg = train_cfg(epochs=4, prune_easy=0.5, schedule="multistep", milestones=[2, 3.5], warmup_epochs=1.5)
    scheduler = build_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), cfg, 100)
    assert scheduler.milestones == (175, 300)  # 100 + 75; 100 + 75 + 75 + half of the last epoch's 100
    assert scheduler.warmup_steps == 138  # 100 + half of 75, rounded to even
    assert [epochs_before(cfg, step, 100) for step in (0, 100, 175, 250, 300)] == [0, 1, 2, 3, 3.5]
    plain = train_cfg(epochs=4, schedule="multistep", milestones=[2, 3.5])
    assert build_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), plain, 100).milestones == (200, 350)


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def test_fit_leaves_out_the_easiest_seen_images_in_the_middle_epochs_only():
    torch.manual_seed(0)
    cfg = train_cfg(epochs=3, prune_easy=0.5, batch_size=8, ema_decay=0.0)
    data = loader()
    data.pruning = pruning = EasyPruning(64, 0.5, CPU)
    model = Recorder()
    optimizer = build_optimizer(param_groups(model, cfg), cfg)
    scores_after = []
    state = fit(model, data, None, optimizer, build_scheduler(optimizer, cfg, len(data)), Precision(CPU), cfg,
                FitState(), on_improvement=lambda s: None,
                on_epoch_end=lambda s: scores_after.append(pruning.scores.clone()), log=lambda line: None)
    assert [row["train_samples"] for row in state.history] == [64, 48, 64]  # 6 of 8 batches in epoch 2
    assert (scores_after[0] > 0).all()  # every image's loss recorded in the first epoch
    changed = scores_after[1] != scores_after[0]
    assert int(changed.sum()) == 48  # the second epoch re-scored the images it trained on
    easy_half = scores_after[0].argsort()[:32]
    assert changed[scores_after[0].argsort()[32:]].all()  # the harder half all trained
    assert int((~changed[easy_half]).sum()) == 16  # and half the easier half was left out


def test_a_training_split_smaller_than_a_batch_leaves_its_images_out_too():
    """One batch an epoch: the pruned epoch trained every image, the easy ones weighted up (biased)."""
    data = loader(n=15, batch_size=256)
    data.pruning = pruning = EasyPruning(15, 0.5, CPU)
    pruning.scores.copy_(torch.arange(15.0))
    pruning.active = True
    batches = [labels for _, labels in data]
    assert len(batches) == 1 and len(batches[0]) == 12  # 3 of the 7 easier images left out
    assert int((pruning.batch_weights() > 1).sum()) == 4  # the 4 easy ones kept, weighted 7 / 4


def test_pruning_unread_with_two_epochs_or_the_per_image_loader_refused(tmp_path, capsys):
    from cifarlens.cli import main
    from conftest import make_imagefolder

    data = make_imagefolder(tmp_path / "data", classes=("a", "b"), n_per_class=12, n_test_per_class=2, junk=False)
    common = ["train", "--dataset", "imagefolder", "--data-dir", str(data.data_dir), "--model", "lensnet_light",
              "--set", "model.kwargs={widths: [4, 8], depths: [1, 1]}", "--batch-size", "8", "--no-report",
              "--set", "train.prune_easy=0.5"]
    assert main([*common, "--epochs", "2", "--out", str(tmp_path / "two")]) == 0
    assert "train.prune_easy=0.5 is not used (2 epoch(s): the first and the last see every image)" in \
        capsys.readouterr().out
    assert main([*common, "--epochs", "3", "--set", "data.loader=perimage", "--out", str(tmp_path / "per")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("train.prune_easy needs the batched loader (data.loader=batched)") and len(err.splitlines()) == 1
    assert not (tmp_path / "per").exists()
    # and the per-image loader trains to its checkpoint without it (the checkpoint read the loader's pruning)
    assert main([*common[:-2], "--epochs", "1", "--set", "data.loader=perimage", "--out", str(tmp_path / "p1")]) == 0
    assert (tmp_path / "p1" / "checkpoints" / "last.pt").is_file()


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_a_share_outside_0_to_1_is_refused(value):
    with pytest.raises(CifarlensError, match="train.prune_easy must be in"):
        train_cfg(prune_easy=value)
