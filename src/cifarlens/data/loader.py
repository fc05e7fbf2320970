"""Iterate over a :class:`Split` held on the training device, in batches."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

from cifarlens.data.augment import alternating_flips
from cifarlens.data.base import Split


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, epoch, stream), so resumed runs match."""
    return (seed * 1_000_003 + epoch * 7919 + stream * 104_729) % (2**63)


class TensorLoader:
    """Batches of ``(transform(images), labels)`` from uint8 tensors already on ``device``;
    with a ``mix`` (MixUp/CutMix, :class:`cifarlens.data.policies.MixCut`), batches of
    ``(mixed images, labels, targets)``: labels (B,) as drawn, targets (B, K) their soft mix.

    Shuffling and augmentation use a generator re-seeded by :meth:`set_epoch`, so
    epoch ``e`` of a run sees the same batches whether or not the run was resumed.

    Under data-parallel training (``world_size`` > 1) every rank draws the same permutation
    and takes its ``batch_size`` slice of each global batch of ``batch_size * world_size``
    images, so the ranks together see each training image once per epoch, in the same
    global batches as one process with the global batch size would.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        transform: Callable[[Tensor, torch.Generator], Tensor],
        *,
        device: torch.device,
        mix: Callable[[Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor]] | None = None,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.images = split.images.to(device)  # (N, C, H, W) uint8
        self.labels = split.labels.to(device)  # (N,)
        self.batch_size = batch_size
        self.transform = transform
        self.mix = mix
        self.device = device
        self.shuffle = shuffle
        self.global_batch = batch_size * world_size
        self.drop_last = drop_last and len(self.labels) > self.global_batch
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.pruning = None  # an EasyPruning (train.prune_easy): a pruned epoch's permutation lacks some images
        self.flip_base = None  # (N,) bool: each image's epoch-0 flip, when the transform alternates flips
        if getattr(transform, "alternating_flip", False):
            coin = torch.Generator(device=device).manual_seed(epoch_seed(seed, 0, stream=3))
            self.flip_base = torch.rand(len(self.labels), device=device, generator=coin) < 0.5

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        generator = torch.Generator(device=self.device).manual_seed(epoch_seed(self.seed, self.epoch))
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, device=self.device, generator=generator)
        else:
            order = torch.arange(n, device=self.device)
        if self.pruning is not None:
            order = self.pruning.order(order, generator)
        if self.world_size > 1:  # same permutation on every rank, its own augmentation draws
            generator = torch.Generator(device=self.device).manual_seed(
                epoch_seed(self.seed, self.epoch, stream=2) + self.rank)
        batches = len(self)
        if len(order) < n:  # a pruned epoch: the batches its images fill (whole ones, as drop_last asks)
            batches = min(batches, len(order) // self.global_batch if self.drop_last else -(-len(order) // self.global_batch))
        for i in range(batches):
            whole = order[i * self.global_batch : (i + 1) * self.global_batch]
            index = whole[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            if self.flip_base is None:
                images = self.transform(self.images[index], generator)
            else:
                flip = alternating_flips(self.flip_base[index], self.epoch)
                images = self.transform(self.images[index], generator, flip)
            labels = self.labels[index]
            if self.pruning is not None:
                self.pruning.batch = index
                if self.world_size > 1:  # every rank's slice size, for the losses' all-gather
                    sizes = [len(whole[r * self.batch_size : (r + 1) * self.batch_size]) for r in range(self.world_size)]
                    self.pruning.global_batch = (whole, sizes)
            if self.mix is None:
                yield images, labels
            else:
                mixed, targets = self.mix(images, labels, generator)
                yield mixed, labels, targets
