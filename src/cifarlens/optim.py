"""Muon on the convolution filters and Nesterov SGD on everything else, as one optimizer.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks",
https://kellerjordan.github.io/posts/muon/; used for the filters of airbench94_muon) takes
SGD's Nesterov momentum and replaces each filter's update by its nearest semi-orthogonal
matrix, found by a few Newton-Schulz iterations: every direction of the update moves the
weights by about the same amount, however unevenly the gradient spreads over them.

``torch.optim.Muon`` (torch 2.14) takes 2-D parameters only, and its Newton-Schulz function
is private (``torch.optim._muon``) and bf16-only, slow on CPUs without native bf16; hence
the ~15 lines of :func:`orthogonalize`, written from the post's description, in bf16 where the
device computes it faster and fp32 elsewhere. (On the 2-core AVX512-BF16 CPU, the Muon step of
the full-width fastnet took 137 ms in fp32 and 57 ms in bf16, beside ~600 ms of forward and
backward at batch 256: docs/benchmarks.md, *Toward 90 %*.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from cifarlens.device import cpu_bf16_pays, gpu_has_native_bf16

# The quintic iteration's coefficients (a, b, c) and step count from the Muon post: they push
# every singular value of the normalised matrix towards 1 fast, ending in roughly [0.7, 1.2].
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(g: Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> Tensor:
    """An approximation of ``U V^T`` for the 2-D ``g = U S V^T``, of ``g``'s shape and dtype.

    Runs in bf16 on GPUs with native bf16 (as the post does) and on CPUs where bf16 is faster
    (:func:`cifarlens.device.cpu_bf16_pays`), in fp32 elsewhere. Never reads a value back to
    the host.
    """
    a, b, c = NS_COEFFICIENTS
    bf16 = gpu_has_native_bf16(g.device) if g.is_cuda else cpu_bf16_pays()
    x = g.to(torch.bfloat16 if bf16 else torch.float32)
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the wide orientation: its Gram matrix x @ x.T is the smaller one
        x = x.T
    x = x / (x.norm() + eps)  # spectral norm <= Frobenius norm <= 1: inside the iteration's range
    rows, cols = x.shape
    if not bf16 and 2 * cols > 3 * rows:
        x = _gram_iteration(x, steps)
    else:
        for _ in range(steps):
            gram = x @ x.T  # (rows, rows)
            x = a * x + (b * gram + c * (gram @ gram)) @ x  # p(x) = a x + b x x^T x + c (x x^T)^2 x
    return (x.T if tall else x).to(g.dtype)


def _gram_iteration(x: Tensor, steps: int) -> Tensor:
    """The same iteration as :func:`orthogonalize`, for a wide fp32 ``x`` (rows, cols), carried
    out on its (rows, rows) Gram matrix: every iterate is ``Q x`` with ``Q`` a polynomial in
    ``G = x x^T``, so the products with the long side are the first ``x x^T`` and the last
    ``Q x`` only. Each step costs 4 rows^3 multiply-adds instead of 2 rows^2 cols + rows^3:
    fewer once cols > 1.5 rows (2.2x fewer for fastnet's 256 x 2304 filters; the Muon step of
    the full-width fastnet went from 49-52 to 22 ms on a 2-core Intel CPU, docs/benchmarks.md).
    In exact arithmetic the result is the same; in fp32 it agreed to ~1e-6 (relative) in our
    tests. Used in fp32 only: products of polynomials of G lose accuracy in bf16."""
    a, b, c = NS_COEFFICIENTS
    gram = x @ x.T
    q = None
    for _ in range(steps):
        p = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        p.diagonal().add_(a)  # + a I
        q = p if q is None else p @ q
        gram = p @ gram @ p  # the Gram matrix of the next iterate p x (p and G commute)
    return q @ x


def muon_groups(params: Iterable, lr: float, muon_lr: float, momentum: float | None = None,
                renorm: bool = False) -> list[dict]:
    """Split parameters (or parameter groups, e.g. :func:`cifarlens.schedules.param_groups`) into
    ``muon: False`` groups (everything but convolution filters) and, after each, a ``muon: True``
    group of its 4-D filters (``NAME.muon``), whose lr is the group's lr times ``muon_lr / lr``,
    with its own ``momentum`` when given and ``renorm`` (see :class:`MuonSGD`).
    The group order depends on the model only, so checkpoints load into a rebuilt optimizer."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    out = []
    for group in groups:
        members, group_lr = list(group["params"]), group.get("lr", lr)
        out.append({**group, "params": [p for p in members if p.ndim != 4], "muon": False})
        filters = [p for p in members if p.ndim == 4]
        if filters:
            name = f"{group.get('name', 'params')}.muon"
            own = {"momentum": momentum} if momentum is not None else {}
            out.append({**group, "name": name, "params": filters, "lr": group_lr * muon_lr / lr, "muon": True,
                        "renorm": renorm, **own})
    return out


class MuonSGD(torch.optim.Optimizer):
    """Muon on the groups flagged ``muon: True``, Nesterov (or plain) momentum SGD on the others.

    SGD groups step exactly as ``torch.optim.SGD`` (dampening 0, weight decay added to the
    gradient). Muon groups keep the same momentum buffer, orthogonalise the (Nesterov) update of
    each filter reshaped to (out, in * k * k), scale it by ``max(1, out / (in * k * k)) ** 0.5``
    (the post's shape factor) and apply weight decay decoupled (``p *= 1 - lr * weight_decay``,
    as the post and ``torch.optim.Muon`` do: coupled decay would vanish in the orthogonalisation).
    With ``renorm``, each filter tensor is first rescaled to the Frobenius norm ``sqrt(out)``
    (airbench94_muon): the weights' scale, which BatchNorm makes irrelevant to the function, stays
    fixed, so the lr alone sets how far a step turns them (weight decay then does nothing).
    Every group's ``lr`` is what schedulers scale, as with any optimizer.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 0.0,
                 ns_steps: int = NS_STEPS):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or ns_steps < 1:
            raise ValueError(f"bad MuonSGD settings: lr {lr}, momentum {momentum}, weight_decay {weight_decay}, "
                             f"ns_steps {ns_steps}")
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
                    "muon": False, "renorm": False, "ns_steps": ns_steps}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:  # frozen (backbone, whitening bias) or unused
                    continue
                g = p.grad
                if wd and not group["muon"]:
                    g = g.add(p, alpha=wd)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:  # the first step: the buffer is the gradient, as in torch.optim.SGD
                    buf = state["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(m).add_(g)
                update = g.add(buf, alpha=m) if group["nesterov"] else buf
                if not group["muon"]:
                    p.add_(update, alpha=-lr)
                    continue
                matrix = orthogonalize(update.reshape(len(update), -1), group["ns_steps"])  # (out, in * k * k)
                rows, cols = matrix.shape
                if group.get("renorm"):  # .get: optimizer states saved before renorm existed
                    p.mul_(rows**0.5 / p.norm())
                elif wd:
                    p.mul_(1 - lr * wd)
                p.add_(matrix.reshape(p.shape), alpha=-lr * max(1.0, rows / cols) ** 0.5)
        return loss
