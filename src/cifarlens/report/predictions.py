"""The test-split predictions a report is built on: the run's own evaluation when it is current,
else recomputed.

Training ends with an evaluation of the best weights on the test split that writes
``metrics.json`` (everything :func:`cifarlens.metrics.summarize` gives) and ``predictions.csv``
(label, prediction and top-1 confidence per image, in split order). Those two files hold all
the report needs from the test split: metrics, the confusion matrix, calibration (ECE needs
only confidence and correctness), and which images the gallery shows. Reading them saves a
full pass over the test split (with flip TTA two passes), the largest cost of the report
after robustness. They are used only when they describe these very weights and images.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["TestPredictions", "compute_predictions", "saved_predictions"]

EVAL_BATCH_SIZE = 512


@dataclass
class TestPredictions:
    """Per-image outcome on the test split, in split order, and the metrics derived from it."""

    labels: Tensor  # (N,) int64
    prediction: Tensor  # (N,) int64
    confidence: Tensor  # (N,) float64, top-1 softmax probability (calibrated when the run is)
    metrics: dict  # cifarlens.metrics.summarize() of the split (+ "calibration", see evaluate_run)
    source: str  # where the numbers come from, for the page
    confidence_uncalibrated: Tensor | None = None  # (N,) the same before temperature scaling

    @property
    def correct(self) -> Tensor:
        return self.prediction == self.labels


MTIME_SLACK_NS = 1_000_000_000  # cp -r gives a copy's files the copy's times, in any order, within a second


def older_than(path: Path, weights: Path) -> bool:
    """Whether ``path`` was written before ``weights`` (so describes other weights), by more than a
    second: the report, compare and the robustness result all judge it so (the report judged it to the
    nanosecond, and recomputed a copied run's results for minutes)."""
    return path.stat().st_mtime_ns < weights.stat().st_mtime_ns - MTIME_SLACK_NS


def _weights_file(rd) -> Path | None:
    """The file load_run reads the weights from (model.safetensors, else checkpoints/last.pt)."""
    for path in (rd.weights, rd.last_checkpoint):
        if path.is_file():
            return path
    return None


def saved_predictions(rd, labels: Tensor, classes, run_temperature: float | None = None) -> TestPredictions | None:
    """The run's evaluation from ``metrics.json`` and ``predictions.csv``, or None unless both
    are there, newer than the weights, about exactly these test ``labels`` (N,) in this order, and
    made with the temperature the loaded run uses now (``run_temperature``, None: uncalibrated)."""
    metrics_file, predictions_file = rd / "metrics.json", rd / "predictions.csv"
    weights = _weights_file(rd)
    if weights is None or not metrics_file.is_file() or not predictions_file.is_file():
        return None
    # written after the weights they evaluate: an older file describes other weights (e.g. before a resume)
    if older_than(metrics_file, weights) or older_than(predictions_file, weights):
        return None
    try:
        metrics = json.loads(metrics_file.read_text())
        with predictions_file.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        index = {name: i for i, name in enumerate(classes)}
        true = torch.tensor([index[r["label"]] for r in rows], dtype=torch.int64)
        pred = torch.tensor([index[r["prediction"]] for r in rows], dtype=torch.int64)
        conf = torch.tensor([float(r["confidence"]) for r in rows], dtype=torch.float64)
        raw = (torch.tensor([float(r["confidence_uncalibrated"]) for r in rows], dtype=torch.float64)
               if rows and "confidence_uncalibrated" in rows[0] else None)
    except (OSError, ValueError, KeyError, TypeError):  # damaged or foreign files: recompute
        return None
    if not isinstance(metrics, dict):  # valid JSON, but not the metrics this run wrote
        return None
    if metrics.get("split", "test") != "test" or true.shape != labels.shape or not torch.equal(true, labels.cpu()):
        return None
    # the metrics were computed from these very predictions (not, e.g., from another data folder)
    k = len(classes)
    cm = torch.bincount(true * k + pred, minlength=k * k).reshape(k, k)
    if metrics.get("confusion_matrix") != cm.tolist():
        return None
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(metrics_file.stat().st_mtime))
    # evaluated with the temperature this run has now (or without one, when it has none)
    if (metrics.get("calibration") or {}).get("temperature") != run_temperature:
        return None
    return TestPredictions(true, pred, conf, metrics,
                           f"the run's own evaluation of these weights (metrics.json and predictions.csv, {when})", raw)


def compute_predictions(run, split) -> TestPredictions:
    """Predict ``split`` (uint8 images and labels) with ``run``'s best weights, as ``evaluate`` does:
    the run's own normalisation and, where it trained with it, its TTA (flip, and translations)."""
    from cifarlens import metrics as M
    from cifarlens.data.pipeline import make_loader
    from cifarlens.engine import Precision, predict_logits

    # Normalise with the run's own statistics (for imagefolder they came from its training data).
    from cifarlens.calibration import calibration_summary

    loader = make_loader(split, run.info, EVAL_BATCH_SIZE, run.device)
    raw, labels = predict_logits(run.model, loader, Precision(run.device), run.tta, run.tta_translate)
    logits = run.scale(raw)  # divided by the run's temperature when it is calibrated
    confidence, prediction = logits.softmax(dim=1).max(dim=1)  # (N,), (N,)
    raw_confidence = raw.softmax(dim=1).gather(1, prediction[:, None])[:, 0]
    metrics = M.summarize(logits, labels, run.classes)
    if len(labels):
        metrics["calibration"] = calibration_summary(raw, labels, run.temperature)
    return TestPredictions(labels, prediction, confidence.double(), metrics,
                           "computed in this report from the run's best weights", raw_confidence.double())
