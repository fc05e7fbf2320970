"""Seeded, stratified train/validation split."""

from __future__ import annotations

import torch
from torch import Tensor

from cifarlens.errors import CifarlensError


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Return (train_index, val_index): ``fraction`` of every class goes to validation.

    Every class with at least two samples keeps at least one in each part, so the
    validation set covers all classes. The same labels and seed always give the same split.
    ``fraction`` 0: no validation split (every index trains, ``val_index`` is empty).
    """
    if not 0.0 <= fraction < 1.0:
        raise CifarlensError(f"val_fraction must be in [0, 1) (0 = no validation split), got {fraction}")
    if fraction == 0.0:
        return torch.arange(len(labels)), torch.zeros(0, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = int(round(fraction * len(members)))
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    train_index, _ = torch.sort(torch.cat(train_parts))
    val_index, _ = torch.sort(torch.cat(val_parts))
    return train_index, val_index
