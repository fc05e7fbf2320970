"""The classic per-image data path: torchvision transforms in DataLoader workers.

Kept for comparison with the batched path (``data.loader: batched``, the default) and
for users who need arbitrary per-image torchvision transforms. Same augmentation
levels, same interface as :class:`cifarlens.data.loader.TensorLoader`.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from cifarlens.data.augment import AUGMENT_LEVELS
from cifarlens.data.base import DatasetInfo, Split
from cifarlens.data.loader import epoch_seed


def per_image_transform(info: DatasetInfo, level: str, padding: int, jitter: float = 0.2) -> v2.Compose:
    steps = AUGMENT_LEVELS[level]
    ops = []
    if steps["crop"]:
        ops.append(v2.RandomCrop(info.image_size, padding=padding))
    if steps["flip"] and info.hflip:
        ops.append(v2.RandomHorizontalFlip())
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if steps["jitter"]:
        saturation = jitter if info.in_channels == 3 else 0
        ops.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=saturation))
    ops.append(v2.Normalize(info.mean, info.std))
    return v2.Compose(ops)


class _Images(Dataset):
    def __init__(self, split: Split, transform):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.transform(self.split.images[i]), self.split.labels[i]  # (C, H, W) float, ()


class PerImageLoader:
    """A shuffled, augmenting ``DataLoader`` over a Split; batches are moved to ``device``."""

    def __init__(self, split: Split, info: DatasetInfo, batch_size: int, level: str, padding: int, *,
                 device: torch.device, seed: int = 0, num_workers: int = 2, rank: int = 0, world_size: int = 1):
        self.device, self.seed, self.epoch = device, seed, 0
        self.num_workers, self.batch_size = num_workers, batch_size
        self.rank, self.global_batch = rank, batch_size * world_size
        self.dataset = _Images(split, per_image_transform(info, level, padding))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        # the last partial batch is dropped, as the batched path drops it: when there is a full one
        # (a split smaller than one batch trains on it whole, rather than for no step at all)
        n = len(self.dataset)
        return n // self.global_batch if n >= self.global_batch else int(n > 0)

    def __iter__(self):
        # This rank's slice of each global batch of a shared permutation, as TensorLoader does.
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.dataset), generator=generator)
        start = self.rank * self.batch_size
        batches = [order[i * self.global_batch + start : i * self.global_batch + start + self.batch_size].tolist()
                   for i in range(len(self))]
        generator.manual_seed(epoch_seed(self.seed, self.epoch, stream=2) + self.rank)  # worker seeds
        loader = DataLoader(self.dataset, batch_sampler=batches, generator=generator,
                            num_workers=self.num_workers, persistent_workers=False,
                            pin_memory=self.device.type == "cuda")
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
