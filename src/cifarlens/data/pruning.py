"""Skipping some of the easiest training images in the middle epochs (``train.prune_easy``).

After InfoBatch (Qin et al. 2024, "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic
Data Pruning", ICLR, arXiv:2303.04947): each image's score is its training loss when it was last
seen; in a pruned epoch a random ``fraction`` of the lower-scoring half of the images is left out,
and the losses of the rest of that half are weighted up by ``half / kept`` so that the epoch's
expected gradient stays what the whole half would give. InfoBatch prunes among the images below
the *mean* score; the lower *half* (the median) is used here so that every pruned epoch has the
same, known number of batches, which the learning-rate schedule and a time budget plan ahead
(:func:`cifarlens.epochs.epoch_steps`). The first epoch (no scores yet) and the last one (as
InfoBatch's annealing trains on everything at the end) see every image.

The loader (:class:`cifarlens.data.loader.TensorLoader`) puts the kept images first in its
permutation and the training loop stops after the pruned epoch's batches; the loop records each
batch's per-image losses (:meth:`EasyPruning.record`). Scores live on the training device: no
host reads in a step.
"""

from __future__ import annotations

import torch
from torch import Tensor


# each process of a data-parallel run would score only its own share of the images
ONE_PROCESS = ("train.prune_easy works in one process only for now: train without --nproc, or with "
               "--set train.prune_easy=0")


class EasyPruning:
    """Per-image scores and loss weights for ``n`` training images (see the module docstring)."""

    def __init__(self, n: int, fraction: float, device: torch.device):
        if not 0 <= fraction < 1:
            raise ValueError(f"the pruned fraction must be in [0, 1), got {fraction}")
        self.fraction = fraction
        self.scores = torch.zeros(n, device=device)  # the last training loss of each image
        self.weights = torch.ones(n, device=device)  # each image's loss weight in the current epoch
        self.active = False  # whether the current epoch is pruned (set by the training loop)
        self.batch: Tensor | None = None  # the indices of the batch being trained (set by the loader)

    def order(self, order: Tensor, generator: torch.Generator) -> Tensor:
        """``order`` (a permutation of the images) with the kept images first, in their order,
        and the left-out ones after them; sets the loss weights of the kept easy images."""
        self.weights.fill_(1.0)
        if not self.active:
            return order
        n = len(self.scores)
        easy = self.scores.argsort()[: n // 2]
        drop = int(self.fraction * len(easy))
        if drop == 0:
            return order
        left_out = easy[torch.randperm(len(easy), device=easy.device, generator=generator)[:drop]]
        self.weights[easy] = len(easy) / (len(easy) - drop)
        keep = torch.ones(n, dtype=torch.bool, device=order.device)
        keep[left_out] = False
        kept = keep[order]
        return torch.cat([order[kept], order[~kept]])

    def batch_weights(self) -> Tensor:
        return self.weights[self.batch]

    def record(self, losses: Tensor) -> None:
        """The per-image training losses of the current batch become those images' scores."""
        self.scores[self.batch] = losses.detach().float()

    def state_dict(self) -> dict:
        return {"scores": self.scores.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.scores.copy_(state["scores"])
