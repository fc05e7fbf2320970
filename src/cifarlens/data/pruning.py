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

The loader (:class:`cifarlens.data.loader.TensorLoader`) leaves them out of its permutation and
the training loop stops after the pruned epoch's batches (whole ones: only kept images); it records each
batch's per-image losses (:meth:`EasyPruning.record`). Scores live on the training device: no
host reads in a step. Under data-parallel training every process records the losses of the whole
global batch (one all-gather of a batch's losses per step), so all hold the same scores and
leave out the same images.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cifarlens.distributed import gather_slices


class EasyPruning:
    """Per-image scores and loss weights for ``n`` training images (see the module docstring)."""

    def __init__(self, n: int, fraction: float, device: torch.device):
        if not 0 <= fraction < 1:
            raise ValueError(f"the pruned fraction must be in [0, 1), got {fraction}")
        self.fraction = fraction
        self.scores = torch.zeros(n, device=device)  # the last training loss of each image
        self.weights = torch.ones(n, device=device)  # each image's loss weight in the current epoch
        self.active = False  # whether the current epoch is pruned (set by the training loop)
        # set by the loader: the indices of this process's batch being trained, and of the global
        # batch it is a slice of with the slices' sizes (data-parallel training; None for one process)
        self.batch: Tensor | None = None
        self.global_batch: tuple[Tensor, list[int]] | None = None

    def order(self, order: Tensor, generator: torch.Generator) -> Tensor:
        """``order`` (a permutation of the images) without the images left out, in their order;
        sets the loss weights of the kept easy images."""
        self.weights.fill_(1.0)
        if not self.active:
            return order
        n = len(self.scores)
        easy = self.scores.argsort(stable=True)[: n // 2]  # stable: every process picks the same half
        drop = int(self.fraction * len(easy))
        if drop == 0:
            return order
        left_out = easy[torch.randperm(len(easy), device=easy.device, generator=generator)[:drop]]
        self.weights[easy] = len(easy) / (len(easy) - drop)
        keep = torch.ones(n, dtype=torch.bool, device=order.device)
        keep[left_out] = False
        return order[keep[order]]

    def batch_weights(self) -> Tensor:
        return self.weights[self.batch]

    def record(self, losses: Tensor) -> None:
        """The per-image training losses of the current batch become those images' scores (of the
        whole global batch, every process's, under data-parallel training)."""
        losses = losses.detach().float()
        if self.global_batch is None:
            self.scores[self.batch] = losses
        else:
            index, sizes = self.global_batch
            self.scores[index] = gather_slices(losses, sizes)

    def state_dict(self) -> dict:
        return {"scores": self.scores.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.scores.copy_(state["scores"])
