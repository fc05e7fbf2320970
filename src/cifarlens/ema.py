"""Weight averaging: an exponential moving average of a model's weights, updated every
training step, validated and saved in place of the model when ``train.ema_decay`` > 0."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


class WeightEMA(AveragedModel):
    """An exponential moving average of a model's weights and buffers, updated every step.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so that short runs on
    small datasets are not left averaging their random initialisation. Unlike
    ``AveragedModel.update_parameters`` (torch 2.14), the update never reads ``n_averaged`` back
    to the host (it does twice per call there: two GPU pipeline stalls per training step), nor
    copies it to the GPU (``AveragedModel`` keeps it on the CPU, and a blocking copy from there
    waits for the GPU too): the count is kept on the host (``updates``), ``n_averaged`` follows it
    for checkpoints and refreshes it when one is loaded.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__(model, use_buffers=True)
        self.decay = decay
        self.updates = 0  # the first update copies the weights

    @property
    def started(self) -> bool:
        return self.updates > 0

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict, assign)
        self.updates = int(self.n_averaged)  # one host read, at load time (a CPU tensor)
        return result

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}  # (device, dtype) -> (averages, current)
        pairs = zip(itertools.chain(self.module.parameters(), self.module.buffers()),
                    itertools.chain(model.parameters(), model.buffers()), strict=True)
        for averaged, current in pairs:
            averages, currents = groups.setdefault((averaged.device, averaged.dtype), ([], []))
            averages.append(averaged.detach())
            currents.append(current.detach().to(averaged.device))
        for (device, dtype), (averages, currents) in groups.items():
            if not self.started or not dtype.is_floating_point:  # integer buffers (BatchNorm's counter) are copied
                torch._foreach_copy_(averages, currents)
                continue
            n = self.updates
            d = min((1 + n) / (10 + n), self.decay)  # a host float: nothing read back or copied over
            torch._foreach_mul_(averages, d)
            torch._foreach_add_(averages, torch._foreach_mul(currents, 1 - d))
        self.updates += 1
        self.n_averaged += 1  # a CPU tensor (AveragedModel's), for checkpoints


def make_ema(model: nn.Module, decay: float) -> WeightEMA | None:
    """A :class:`WeightEMA` of ``model``, or None when ``decay`` is 0."""
    return WeightEMA(model, decay) if decay > 0 else None
