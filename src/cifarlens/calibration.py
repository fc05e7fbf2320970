"""Calibration: expected calibration error, reliability-diagram bins and temperature scaling,
as pure functions.

A classifier is calibrated when, among the images it labels with confidence ~p, a
fraction ~p is right. Following Guo et al. 2017 ("On Calibration of Modern Neural
Networks", ICML), the confidence of a prediction is its top softmax probability; the
interval [0, 1] is cut into ``n_bins`` equal-width bins (lo, hi] (the first bin also
takes confidence 0), and

    ECE = sum over bins b of  |b| / N * |accuracy(b) - mean confidence(b)|

Empty bins contribute nothing. Everything here is computed on the CPU in float64.

Temperature scaling (Guo et al. 2017, section 4.2) divides every logit by one scalar T > 0
fitted to minimise the negative log-likelihood on held-out data (cifarlens: the validation
split, after training). T > 1 softens an overconfident model, T < 1 sharpens an underconfident
one; dividing by a positive scalar never changes the argmax, so accuracy is untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ReliabilityBins", "TemperatureFit", "calibration_summary", "expected_calibration_error", "fit_temperature", "nll",
           "reliability_bins", "reliability_bins_from_confidence"]

# T is searched in log space within these bounds: beyond them the fit is saying that the logits
# carry no information (T -> inf) or that the model is never wrong on this data (T -> 0)
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin counts, accuracy and mean confidence (plain lists, JSON-serialisable).

    ``accuracy`` and ``confidence`` are 0.0 for empty bins; look at ``counts``.
    """

    edges: list[float]  # n_bins + 1 values, 0 .. 1
    counts: list[int]
    accuracy: list[float]
    confidence: list[float]

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def ece(self) -> float:
        n = self.num_samples
        if n == 0:
            return 0.0
        return sum(c / n * abs(a - p) for c, a, p in zip(self.counts, self.accuracy, self.confidence))

    @property
    def max_gap(self) -> float:
        """Maximum calibration error: the largest |accuracy - confidence| over non-empty bins."""
        gaps = [abs(a - p) for c, a, p in zip(self.counts, self.accuracy, self.confidence) if c > 0]
        return max(gaps, default=0.0)


def reliability_bins_from_confidence(confidence: Tensor, correct: Tensor, n_bins: int = 15) -> ReliabilityBins:
    """Bins from per-sample top-1 confidence (N,) in [0, 1] and correctness (N,) bool/0-1."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = torch.as_tensor(confidence).detach().to("cpu", torch.float64).reshape(-1)
    hit = torch.as_tensor(correct).detach().to("cpu", torch.float64).reshape(-1)
    if conf.shape != hit.shape:
        raise ValueError(f"confidence and correct differ in length: {conf.numel()} vs {hit.numel()}")
    if conf.numel() and (float(conf.min()) < 0.0 or float(conf.max()) > 1.0 + 1e-6):
        raise ValueError("confidences must lie in [0, 1]")
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    # Bin b holds (edges[b], edges[b+1]]: the number of inner edges strictly below conf.
    index = torch.searchsorted(edges[1:-1].contiguous(), conf.contiguous())  # (N,) in 0..n_bins-1
    counts = torch.bincount(index, minlength=n_bins).to(torch.float64)  # (n_bins,)
    sum_conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, conf)
    sum_hit = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, hit)
    safe = counts.clamp_min(1)
    return ReliabilityBins(
        edges=edges.tolist(),
        counts=[int(c) for c in counts.tolist()],
        accuracy=(sum_hit / safe).tolist(),
        confidence=(sum_conf / safe).tolist(),
    )


def reliability_bins(probs: Tensor, labels: Tensor, n_bins: int = 15) -> ReliabilityBins:
    """Bins from class probabilities (N, K) (softmax outputs) and true labels (N,)."""
    probs = torch.as_tensor(probs).detach().to("cpu", torch.float64)
    labels = torch.as_tensor(labels).detach().to("cpu", torch.int64).reshape(-1)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"expected probs (N, K) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}")
    confidence, prediction = probs.max(dim=1)  # (N,), (N,)
    return reliability_bins_from_confidence(confidence, prediction == labels, n_bins)


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """ECE of top-1 predictions over ``n_bins`` equal-width confidence bins (0 = perfectly calibrated)."""
    return reliability_bins(probs, labels, n_bins).ece


def _as_float64(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    logits = torch.as_tensor(logits).detach().to("cpu", torch.float64)
    labels = torch.as_tensor(labels).detach().to("cpu", torch.int64).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits (N, K) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return logits, labels


def nll(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` (N,) under softmax(``logits`` (N, K) / T)."""
    logits, labels = _as_float64(logits, labels)
    if len(labels) == 0:
        return float("nan")
    return float(torch.nn.functional.cross_entropy(logits / temperature, labels))


@dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature and what it did to the data it was fitted on (JSON-serialisable via vars)."""

    temperature: float
    images: int
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float

    def as_dict(self) -> dict:
        return dict(vars(self))


def fit_temperature(logits: Tensor, labels: Tensor, *, max_iter: int = 100) -> TemperatureFit:
    """The T > 0 that minimises the NLL of softmax(``logits`` / T) on ``labels``.

    The NLL is convex in 1/T, so the minimum is unique; it is found by L-BFGS (strong-Wolfe line
    search) on log T, in float64 on the CPU, starting from T = 1, and clamped to
    [MIN_TEMPERATURE, MAX_TEMPERATURE]. Takes well under a second for 10,000 x 100 logits.
    """
    logits, labels = _as_float64(logits, labels)
    if len(labels) == 0:
        raise ValueError("cannot fit a temperature on zero images")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        t = 1.0  # e.g. NaN logits: leave the model as it was
    t = min(max(t, MIN_TEMPERATURE), MAX_TEMPERATURE)
    probs_before, probs_after = logits.softmax(dim=1), (logits / t).softmax(dim=1)
    return TemperatureFit(
        temperature=t, images=len(labels),
        nll_before=nll(logits, labels), nll_after=nll(logits, labels, t),
        ece_before=expected_calibration_error(probs_before, labels),
        ece_after=expected_calibration_error(probs_after, labels),
    )


def calibration_summary(raw_logits: Tensor, labels: Tensor, temperature: float | None) -> dict:
    """ECE and NLL of ``raw_logits`` (N, K) divided by ``temperature`` (None: as they are), and of the
    raw logits: what ``evaluate`` and the report record as ``calibration``."""
    scaled = raw_logits if temperature is None else raw_logits / temperature
    return {"calibrated": temperature is not None, "temperature": temperature,
            "ece": expected_calibration_error(scaled.softmax(dim=1), labels), "nll": nll(scaled, labels),
            "ece_uncalibrated": expected_calibration_error(raw_logits.softmax(dim=1), labels),
            "nll_uncalibrated": nll(raw_logits, labels)}
