"""Faithfulness of maps: do the highlighted pixels really matter to the model?

Deletion and insertion curves (Petsiuk et al. 2018, "RISE"), compared with random maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cifarlens.errors import CifarlensError
from cifarlens.explain.cam import Explanation
from cifarlens.explain.hooks import exclusive_eval
from cifarlens.models import unwrap_model

BASELINES = ("mean", "blur")


def faithfulness(
    model: nn.Module,
    images: Tensor,
    explanation: Explanation,
    *,
    steps: int = 10,
    baseline: str = "mean",
    random_repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Deletion and insertion AUC of ``explanation`` on ``images`` (the normalised batch it explains).

    Pixels are ranked by the map, most important first (ties in random order, seeded).
    *Deletion*: the top 0, 1/steps, ..., 100% of pixels are replaced by the baseline and the
    probability of each image's target class is tracked. *Insertion*: start from the baseline
    image and put the top pixels back. ``baseline="mean"`` fills with the dataset mean (0 after
    normalisation); ``"blur"`` with a strongly blurred copy of the image. An AUC is the area under
    a probability curve over the fraction of pixels, in [0, 1] (trapezoid rule), averaged over images.

    How to read it: a faithful map makes the probability fall fast when its pixels are deleted
    (**low deletion AUC**) and rise fast when they are inserted (**high insertion AUC**);
    ``score = insertion_auc - deletion_auc`` sums both up (higher is better). ``random`` holds the
    same numbers for random smooth maps at the CAM layer's resolution: a method tells you something
    only where it clearly beats random. Compare methods on the same model and images; the numbers
    are not comparable across models (they depend on how confident each model is). Empty maps
    (``explanation.empty``) rank pixels at random, so they score like the random baseline.

    Returns a JSON-ready dict: ``deletion_auc``, ``insertion_auc``, ``score``, the mean curves
    ``deletion_curve``/``insertion_curve`` at ``fractions``, ``random`` (the same for random maps),
    ``per_image`` AUCs, and ``method``, ``layer``, ``images``, ``steps``, ``baseline``, ``empty_maps``.
    """
    if baseline not in BASELINES:
        raise CifarlensError(f"unknown faithfulness baseline {baseline!r}; choose one of: {', '.join(BASELINES)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise CifarlensError(f"steps must be a positive integer, got {steps!r}")
    if images.ndim != 4 or images.shape[0] != len(explanation) or images.shape[-2:] != explanation.maps.shape[-2:]:
        raise CifarlensError(f"images {tuple(images.shape)} do not match the explanation's maps "
                             f"{tuple(explanation.maps.shape)}")
    model = unwrap_model(model)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = images.device
    generator = torch.Generator().manual_seed(seed)
    b, _, height, width = images.shape
    h, w = explanation.layer_size if min(explanation.layer_size) > 0 else (max(height // 8, 1), max(width // 8, 1))
    with exclusive_eval(model), torch.no_grad():
        x = images.detach().to(device).float()
        targets = explanation.targets.to(device)
        fill = torch.zeros_like(x) if baseline == "mean" else _blur(x)
        # the ends of both curves are the same two images for every map: compute them once
        p_image, p_fill = _target_prob(model, x, targets), _target_prob(model, fill, targets)

        def curves(maps: Tensor) -> tuple[Tensor, Tensor]:
            rank = _pixel_ranks(maps, generator).to(device)  # (B, H*W): 0 = most important
            deletion, insertion = [p_image], [p_fill]
            for k in range(1, steps):
                top = (rank < round(k * height * width / steps)).view(b, 1, height, width)
                deletion.append(_target_prob(model, torch.where(top, fill, x), targets))
                insertion.append(_target_prob(model, torch.where(top, x, fill), targets))
            deletion.append(p_fill)
            insertion.append(p_image)
            return torch.stack(deletion, 1).cpu(), torch.stack(insertion, 1).cpu()  # (B, steps + 1)

        deletion, insertion = curves(explanation.maps)
        random_del, random_ins = [], []
        for _ in range(random_repeats):
            # smooth random maps with the CAM's own resolution: a fair "no information" baseline
            coarse = torch.rand(b, 1, h, w, generator=generator)
            maps = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
            d, i = curves(maps)
            random_del.append(d)
            random_ins.append(i)

    def summary(d: Tensor, i: Tensor) -> dict:
        d_auc, i_auc = _auc(d), _auc(i)
        return {"deletion_auc": _mean(d_auc), "insertion_auc": _mean(i_auc), "score": _mean(i_auc - d_auc)}

    result = {
        "method": explanation.method,
        "layer": explanation.layer,
        "images": b,
        "steps": steps,
        "baseline": baseline,
        "empty_maps": int(explanation.empty.sum()),
        **summary(deletion, insertion),
        "fractions": [k / steps for k in range(steps + 1)],
        "deletion_curve": deletion.mean(0).tolist(),
        "insertion_curve": insertion.mean(0).tolist(),
        # None with random_repeats=0 (e.g. when the caller scores several methods on the same images)
        "random": summary(torch.stack(random_del).mean(0), torch.stack(random_ins).mean(0))
        if random_repeats > 0 else None,
        "per_image": {"deletion_auc": _auc(deletion).tolist(), "insertion_auc": _auc(insertion).tolist()},
    }
    return result


def _pixel_ranks(maps: Tensor, generator: torch.Generator) -> Tensor:
    """(B, H, W) maps -> (B, H*W) rank of each pixel, 0 for the highest value; ties in random order."""
    b = maps.shape[0]
    keys = maps.detach().float().cpu().flatten(1)  # (B, P)
    shuffle = torch.rand(keys.shape, generator=generator).argsort(dim=1)  # random order first ...
    order = shuffle.gather(1, keys.gather(1, shuffle).argsort(dim=1, descending=True, stable=True))  # ... then by value
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1]).expand(b, -1))
    return ranks


def _target_prob(model: nn.Module, x: Tensor, targets: Tensor) -> Tensor:
    return model(x).float().softmax(dim=1).gather(1, targets[:, None])[:, 0]  # (B,)


def _blur(x: Tensor) -> Tensor:
    from torchvision.transforms.functional import gaussian_blur

    h, w = x.shape[-2:]
    # a kernel about half the image wide: little more than the local colour survives
    size = [2 * (w // 4) + 1, 2 * (h // 4) + 1]
    return gaussian_blur(x, kernel_size=size, sigma=[max(w / 8, 0.5), max(h / 8, 0.5)])


def _auc(curves: Tensor) -> Tensor:
    """(B, steps + 1) equally spaced over [0, 1] -> (B,) trapezoid area."""
    steps = curves.shape[1] - 1
    return (curves[:, 1:] + curves[:, :-1]).sum(dim=1) / (2 * steps)


def _mean(values: Tensor) -> float:
    return float(values.mean())
