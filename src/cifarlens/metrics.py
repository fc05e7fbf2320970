"""Classification metrics as pure functions of tensors.

The confusion matrix comes first; every other count-based metric is derived
from it, so accumulating over batches only means summing confusion matrices
(and, for the logit-based numbers, concatenating logits). Nothing here keeps
state, touches the filesystem or plots.

Zero-division convention (same as scikit-learn's ``zero_division=0``): a class
that is never predicted has precision 0, a class with no true samples has
recall 0, and F1 is 0 when precision + recall is 0. Macro averages run over
the classes present in the labels or the predictions (scikit-learn's default
``labels``): a class with neither has no precision or recall to average.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "confusion_matrix",
    "row_normalize",
    "classification_metrics",
    "topk_accuracy",
    "summarize",
    "most_confused_pairs",
    "classification_report_text",
]


def confusion_matrix(labels: Tensor, preds: Tensor, num_classes: int) -> Tensor:
    """(num_classes, num_classes) int64 counts; rows = true class, columns = predicted."""
    labels = labels.detach().reshape(-1).to("cpu", torch.int64)
    preds = preds.detach().reshape(-1).to("cpu", torch.int64)
    if labels.shape != preds.shape:
        raise ValueError(f"labels and preds differ in length: {labels.numel()} vs {preds.numel()}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for name, t in (("labels", labels), ("preds", preds)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got [{int(t.min())}, {int(t.max())}]")
    # Encode each (true, pred) pair as one index so a single bincount counts them all.
    flat = torch.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def row_normalize(cm: Tensor) -> Tensor:
    """Each row divided by its sum (float64); rows with zero support stay all 0."""
    cm = torch.as_tensor(cm).to("cpu", torch.float64)
    support = cm.sum(dim=1, keepdim=True)  # (C, 1)
    return torch.where(support > 0, cm / support.clamp_min(1), torch.zeros_like(cm))


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def classification_metrics(cm: Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class and macro/weighted precision/recall/F1 from a confusion matrix.

    Returns plain Python numbers and lists (JSON-serialisable).
    """
    cm = torch.as_tensor(cm).detach().to("cpu")
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {tuple(cm.shape)}")
    if len(class_names) != cm.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {cm.shape[0]}-class confusion matrix")
    c = cm.to(torch.float64)
    tp = c.diagonal()  # (C,)
    support = c.sum(dim=1)  # true count per class, (C,)
    predicted = c.sum(dim=0)  # predicted count per class, (C,)
    total = c.sum()

    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)

    def weighted(x: Tensor) -> float:
        return float((x * support).sum() / total) if total > 0 else 0.0

    per_class = [
        {
            "name": str(name),
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(cm[i].sum()),
        }
        for i, name in enumerate(class_names)
    ]
    # Macro averages run over the classes present, in the labels or the predictions, as
    # scikit-learn's do by default: a class with no images in the split and never predicted has
    # no precision or recall to average (counted as 0 it would pull the average down for nothing)
    present = (support > 0) | (predicted > 0)

    def macro(x: Tensor) -> float:
        return float(x[present].mean()) if present.any() else 0.0

    return {
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "precision_macro": macro(precision),
        "recall_macro": macro(recall),
        "f1_macro": macro(f1),
        "classes_absent": [str(name) for i, name in enumerate(class_names) if not present[i]],
        "precision_weighted": weighted(precision),
        "recall_weighted": weighted(recall),
        "f1_weighted": weighted(f1),
        "per_class": per_class,
        "confusion_matrix": cm.to(torch.int64).tolist(),
        "num_samples": int(cm.sum()),
    }


def topk_accuracy(logits_or_probs: Tensor, labels: Tensor, k: int) -> float:
    """Fraction of samples whose true label is among the k highest scores.

    ``logits_or_probs`` is (N, C); k larger than C counts every sample as a hit.
    """
    scores = logits_or_probs.detach().to("cpu", torch.float64)
    labels = labels.detach().reshape(-1).to("cpu", torch.int64)
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"expected scores (N, C) and labels (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if labels.numel() == 0:
        return 0.0
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (N, k)
    return float((top == labels[:, None]).any(dim=1).double().mean())


def summarize(logits: Tensor, labels: Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """The full metrics dict for one evaluation: counts-based metrics of the argmax
    prediction, plus ``top5_accuracy`` (only when there are more than 5 classes),
    ``mean_confidence`` (mean max softmax probability) and ``nll`` (mean cross-entropy).

    ``logits`` is (N, C) on any device; everything is computed on the CPU in float64.
    """
    logits = logits.detach().to("cpu", torch.float64)
    labels = labels.detach().reshape(-1).to("cpu", torch.int64)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    num_classes = logits.shape[1]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for logits with {num_classes} classes")

    cm = confusion_matrix(labels, logits.argmax(dim=1), num_classes)
    out = classification_metrics(cm, class_names)
    if num_classes > 5:
        out["top5_accuracy"] = topk_accuracy(logits, labels, 5)
    if labels.numel():
        out["mean_confidence"] = float(logits.softmax(dim=1).amax(dim=1).mean())
        out["nll"] = float(F.cross_entropy(logits, labels))
    else:
        out["mean_confidence"] = 0.0
        out["nll"] = 0.0
    return out


def most_confused_pairs(cm: Tensor, class_names: Sequence[str], k: int = 10) -> list[tuple[str, str, int]]:
    """The k largest off-diagonal cells as (true_name, pred_name, count), largest first.

    Zero cells are left out; ties keep row-major order.
    """
    cm = torch.as_tensor(cm).detach().to("cpu", torch.int64)
    n = cm.shape[0]
    if len(class_names) != n:
        raise ValueError(f"{len(class_names)} class names for a {n}-class confusion matrix")
    off = cm.clone()
    off.fill_diagonal_(0)
    flat = off.reshape(-1)
    counts, order = torch.sort(flat, descending=True, stable=True)
    pairs = []
    for count, idx in zip(counts.tolist(), order.tolist()):
        if count <= 0 or len(pairs) >= k:
            break
        pairs.append((str(class_names[idx // n]), str(class_names[idx % n]), int(count)))
    return pairs


def _clip_name(name: str, width: int) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def classification_report_text(metrics: dict[str, Any], digits: int = 4, max_name_width: int = 30) -> str:
    """A fixed-width table like scikit-learn's ``classification_report``.

    ``metrics`` is the dict from :func:`classification_metrics` or :func:`summarize`.
    Class names longer than ``max_name_width`` are shortened with an ellipsis.
    """
    footers = ("accuracy", "macro avg", "weighted avg")
    names = [_clip_name(row["name"], max_name_width) for row in metrics["per_class"]]
    name_w = max([len(s) for s in names] + [len(s) for s in footers])
    num_w = max(len("precision"), digits + 2)
    sup_w = max(len("support"), len(str(metrics["num_samples"])))

    def num(x: float) -> str:
        return f"{x:>{num_w}.{digits}f}"

    def line(name: str, p: str, r: str, f: str, s: str) -> str:
        return f"{name:>{name_w}}  {p:>{num_w}}  {r:>{num_w}}  {f:>{num_w}}  {s:>{sup_w}}".rstrip()

    blank = ""
    n = str(metrics["num_samples"])
    rows = [line(blank, "precision", "recall", "f1-score", "support"), ""]
    for name, row in zip(names, metrics["per_class"]):
        rows.append(line(name, num(row["precision"]), num(row["recall"]), num(row["f1"]), str(row["support"])))
    rows.append("")
    rows.append(line("accuracy", blank, blank, num(metrics["accuracy"]), n))
    for label, key in (("macro avg", "macro"), ("weighted avg", "weighted")):
        rows.append(
            line(
                label,
                num(metrics[f"precision_{key}"]),
                num(metrics[f"recall_{key}"]),
                num(metrics[f"f1_{key}"]),
                n,
            )
        )
    absent = metrics.get("classes_absent") or []
    if absent:
        shown = ", ".join(absent[:10]) + (f", ... ({len(absent)} classes)" if len(absent) > 10 else "")
        rows.append("")
        rows.append(f"macro avg over the classes present; no images of, nor predictions for: {shown}")
    return "\n".join(rows) + "\n"
