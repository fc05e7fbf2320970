"""From a :class:`DataConfig` to train/val/test loaders on the training device."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from cifarlens.config import DataConfig, with_data_defaults
from cifarlens.data import load_dataset
from cifarlens.data.augment import BatchAugment, normalize
from cifarlens.data.base import DataSource, DatasetInfo, Split
from cifarlens.data.fingerprint import fingerprints, image_signatures
from cifarlens.data.loader import TensorLoader
from cifarlens.data.policies import build_policies, check_settings
from cifarlens.data.split import stratified_split
from cifarlens.distributed import SINGLE, World, check_batch_size, on_rank0
from cifarlens.errors import CifarlensError



@dataclass
class DataBundle:
    info: DatasetInfo
    train: Split
    val: Split
    test: Split
    source: DataSource = DataSource()  # official files or a copy; recorded in run.json
    # {"train": ..., "test": ...}: fingerprint() of the training images (the validation split's too,
    # which is carved from them) and of the test images; recorded in run.json
    fingerprints: dict[str, str] = field(default_factory=dict)
    # where the training and validation images were in the training images as read (the order
    # of the fingerprint and of signatures("train"))
    train_positions: np.ndarray | None = None
    val_positions: np.ndarray | None = None
    shipped_val: bool = False  # the validation split is the data's own val/ (data.val_fraction unused)
    _signatures: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def val_digest(self) -> str:
        """Which of the training images the validation split holds, as a short digest: recorded in
        run.json, so a command on the run notices a split carved otherwise (its config.yaml's
        train.seed or data.val_fraction edited since)."""
        import hashlib

        return hashlib.sha256(np.asarray(self.val_positions, dtype=np.int64).tobytes()).hexdigest()[:16]

    def signatures(self, key: str) -> np.ndarray:
        """data.fingerprint.image_signatures of the training images (train and val, in the order
        read) or of the test images (``key`` "test"). Computed on first use (about 1 s for CIFAR-10's
        60,000 on a 2-core CPU), which is when a run is written or a fingerprint differs."""
        if key not in self._signatures:
            if key == "test":
                self._signatures[key] = image_signatures(self.test)
            else:
                found = image_signatures(self.train, self.val)
                self._signatures[key] = found[np.argsort(np.concatenate([self.train_positions, self.val_positions]),
                                                         kind="stable")]
        return self._signatures[key]


def prepare_data(cfg: DataConfig, seed: int, world: World = SINGLE) -> DataBundle:
    """Read the dataset and carve the seeded, stratified validation split from train.

    The test split is returned untouched; only final evaluation may look at it. Under data-parallel
    training every rank reads it, rank 0 first: it alone downloads or extracts what is missing (all
    at once, the ranks raced for the same files), then the others read its files.
    """
    if world.distributed:  # the others wait in on_rank0 for rank 0
        bundle = on_rank0(world, lambda: prepare_data(cfg, seed), "read the data")
        return bundle if bundle is not None else prepare_data(cfg, seed)
    ds = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, image_size=cfg.image_size)
    if len(ds.test) == 0:
        raise CifarlensError(f"the test split of {cfg.data_dir} has no images: a run could not be evaluated")
    present = torch.unique(torch.cat([ds.train.labels, *([ds.val.labels] if ds.val is not None else [])]))
    if len(present) < 2:  # the official files' labels can say anything (image folders refuse this as they are read)
        only = f"one class only ({ds.info.classes[int(present[0])]})" if len(present) else "no images"
        raise CifarlensError(f"the training split of {cfg.data_dir} has {only}; a classifier needs at least 2 classes")
    prints = fingerprints(ds.train, ds.val, ds.test)
    if ds.val is not None:  # the source ships its own validation split (imagefolder val/)
        n, m = len(ds.train), len(ds.val)
        return DataBundle(ds.info, ds.train, ds.val, ds.test, ds.source, prints, np.arange(n), np.arange(n, n + m),
                          shipped_val=True)
    train_index, val_index = stratified_split(ds.train.labels, with_data_defaults(cfg).val_fraction, seed)
    return DataBundle(ds.info, ds.train.subset(train_index), ds.train.subset(val_index), ds.test, ds.source, prints,
                      train_index.numpy(), val_index.numpy())


def eval_transform(info: DatasetInfo):
    return partial(_normalize_only, mean=info.mean, std=info.std)


def _normalize_only(images, generator, *, mean, std):
    return normalize(images, mean, std)


def train_transform(info: DatasetInfo, cfg: DataConfig) -> BatchAugment:
    """The level and the image/tensor policies of ``cfg`` (MixUp/CutMix need the labels: see
    :func:`make_loader`)."""
    cfg = with_data_defaults(cfg)
    check_settings(cfg)
    image_policies, tensor_policies, _ = build_policies(cfg, info)
    return BatchAugment(cfg.augment or info.augment, info.mean, info.std, hflip=info.hflip, padding=cfg.crop_padding,
                        alternating_flip=cfg.flip == "alternating", image_policies=image_policies,
                        tensor_policies=tensor_policies)


def make_loader(split: Split, info: DatasetInfo, batch_size: int, device: torch.device, *, seed: int = 0,
                train_cfg: DataConfig | None = None, world: World = SINGLE) -> TensorLoader:
    """A training loader (shuffled, augmented) when ``train_cfg`` is given, else an evaluation loader.

    Under data-parallel training ``batch_size`` is the global batch: each of the ``world``'s
    ranks gets ``batch_size / world_size`` of every batch (training) or a contiguous
    ``1 / world_size`` of the split (evaluation, whose sums are then all-reduced).
    """
    if train_cfg is None:
        return TensorLoader(shard(split, world), batch_size, eval_transform(info), device=device)
    train_cfg = with_data_defaults(train_cfg)
    per_rank = check_batch_size(batch_size, world)
    if world.distributed and len(split) < batch_size:
        raise CifarlensError(f"the training split has {len(split)} images, fewer than one global batch "
                             f"of {batch_size}; lower train.batch_size")
    if train_cfg.loader == "perimage":
        if train_cfg.flip != "random":
            raise CifarlensError("data.flip=alternating needs the batched loader (data.loader=batched)")
        if train_cfg.policies:
            raise CifarlensError(f"data.policies ({', '.join(train_cfg.policies)}) need the batched loader "
                                 "(data.loader=batched)")
        from cifarlens.data.perimage import PerImageLoader

        return PerImageLoader(split, info, per_rank, train_cfg.augment or info.augment, train_cfg.crop_padding,
                              device=device, seed=seed, num_workers=train_cfg.workers,
                              rank=world.rank, world_size=world.world_size)
    if train_cfg.loader != "batched":
        raise CifarlensError(f"data.loader must be batched or perimage, got {train_cfg.loader!r}")
    _, _, mixer = build_policies(train_cfg, info)  # MixUp/CutMix: the loader then yields soft targets too
    return TensorLoader(split, per_rank, train_transform(info, train_cfg), device=device, mix=mixer,
                        shuffle=True, drop_last=True, seed=seed, rank=world.rank, world_size=world.world_size)


def shard(split: Split, world: World) -> Split:
    """This rank's contiguous part of ``split`` (all of it for one process)."""
    if not world.distributed:
        return split
    bounds = [len(split) * r // world.world_size for r in range(world.world_size + 1)]
    return split.subset(torch.arange(bounds[world.rank], bounds[world.rank + 1]))
