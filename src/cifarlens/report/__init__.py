"""The per-run report: one self-contained ``report.html`` in the run folder.

``write_report(run_dir)`` reloads the run's best weights, recomputes the test-split
predictions with the run's own normalisation, and assembles: config and environment,
training curves, test metrics, the per-class table, the confusion matrix and the
most-confused pairs, calibration (ECE and a reliability diagram), a Grad-CAM gallery of
correct and mistaken predictions, accuracy under common corruptions, and the published
results table (:mod:`cifarlens.report.baselines`) with this run placed in it.

Cost on top of one test-set pass: robustness runs 1 + 5 corruptions x 3 severities
passes over at most ``max_robustness_images`` (2000) seeded test images; the gallery
explains ``gallery_size`` x 2 images. On a tiny synthetic run it takes a few seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from cifarlens.errors import CifarlensError

__all__ = ["REPORT_FILE", "build_report_data", "pick_examples", "write_report"]

REPORT_FILE = "report.html"
EVAL_BATCH_SIZE = 512


def pick_examples(candidates: Tensor, confidence: Tensor, labels: Tensor, k: int) -> list[int]:
    """Up to ``k`` indices among ``candidates`` (bool mask (N,)), most confident first, covering as
    many different true classes as possible before repeating one."""
    idx = torch.nonzero(candidates, as_tuple=False).reshape(-1)
    order = idx[torch.argsort(confidence[idx], descending=True, stable=True)].tolist()
    first, rest, seen = [], [], set()
    for i in order:
        (rest if int(labels[i]) in seen else first).append(i)
        seen.add(int(labels[i]))
    return (first + rest)[:k]


def _gallery(run, test, probs: Tensor, labels: Tensor, k: int):
    """(Gallery | None, note). Degrades to a note when cifarlens.explain is not installed."""
    from cifarlens.report.figures import image_png, side_by_side, to_rgb
    from cifarlens.report.html import Gallery, GalleryItem

    try:
        from cifarlens.explain import explain_run, overlay
    except ImportError as err:
        if err.name != "cifarlens.explain":  # a dependency of explain is missing: a real error
            raise
        return None, (f"Grad-CAM is not available in this installation ({err}), so no gallery was drawn.")
    confidence, prediction = probs.max(dim=1)
    correct = prediction == labels
    groups = {"correct": pick_examples(correct, confidence, labels, k),
              "mistakes": pick_examples(~correct, confidence, labels, k)}
    chosen = groups["correct"] + groups["mistakes"]
    if not chosen:
        return Gallery(), ""
    images = test.images[chosen]  # (B, C, H, W) uint8
    try:
        expl = explain_run(run, images, method="gradcam")
    except CifarlensError as err:  # e.g. a model without a layer to explain: say so in the report
        return None, f"Grad-CAM could not be computed for this run: {err}"
    items = []
    classes = run.classes
    for j, i in enumerate(chosen):
        raw = to_rgb(images[j].cpu().numpy())  # (H, W, 3)
        empty = bool(expl.empty[j])
        shown = raw if empty else side_by_side([raw, overlay(images[j].cpu(), expl.maps[j].cpu())])
        pred = int(expl.predictions[j])
        items.append(GalleryItem(png=image_png(shown), true=classes[int(labels[i])], predicted=classes[pred],
                                 prob=float(expl.probs[j, pred]), empty=empty))
    n = len(groups["correct"])
    return Gallery(correct=items[:n], mistakes=items[n:], method="Grad-CAM"), ""


def _confusion_png(rd, metrics: dict, cm: Tensor, classes: Sequence[str]) -> bytes:
    """The run's own confusion_matrix.png when it shows these very counts, else a fresh one."""
    from cifarlens.plots import plot_confusion_matrix
    from cifarlens.report.figures import file_png

    saved, png = rd / "metrics.json", rd / "confusion_matrix.png"
    if saved.is_file() and png.is_file():
        try:
            if json.loads(saved.read_text()).get("confusion_matrix") == metrics["confusion_matrix"]:
                return png.read_bytes()
        except json.JSONDecodeError:
            pass  # a damaged metrics.json: draw the matrix afresh
    return file_png(plot_confusion_matrix, cm, classes, title=f"{rd.path.name}: test ({int(cm.sum())} images)")


def _curves_png(rd, meta: dict) -> bytes | None:
    """The run's curves.png once training finished (it is drawn then), else drawn from history.csv."""
    from cifarlens.plots import plot_training_curves
    from cifarlens.report.figures import file_png, read_history

    if meta.get("status") == "finished" and (rd / "curves.png").is_file():
        return (rd / "curves.png").read_bytes()
    history = read_history(rd / "history.csv")
    return file_png(plot_training_curves, history) if history else None


def build_report_data(
    run_dir: str | Path,
    *,
    data_dir: str | None = None,
    device: str = "cpu",
    robustness: bool = True,
    gradcam: bool = True,
    bundle=None,
    max_robustness_images: int | None = None,
    severities: Sequence[int] | None = None,
    gallery_size: int = 8,
):
    """Everything the page shows, computed; see :func:`write_report`."""
    from cifarlens import metrics as M
    from cifarlens.api import load_run
    from cifarlens.config import to_dict
    from cifarlens.data.pipeline import make_loader
    from cifarlens.engine import Precision, predict_logits
    from cifarlens.report import figures as F
    from cifarlens.report.calibration import reliability_bins
    from cifarlens.report.html import Budget, ReportData
    from cifarlens.report.robustness import DEFAULT_MAX_IMAGES, DEFAULT_SEVERITIES
    from cifarlens.report.robustness import robustness as robustness_table
    from cifarlens.runs import RunDir

    rd = RunDir(run_dir)
    rd.require_run()
    saved_cfg = rd.config()
    run = load_run(rd.path, device=device)
    bundle = run.data(data_dir, bundle)
    test = bundle.test
    classes = run.classes
    # Normalise with the run's own statistics (for imagefolder they came from its training data).
    loader = make_loader(test, run.info, EVAL_BATCH_SIZE, run.device)
    logits, labels = predict_logits(run.model, loader, Precision(run.device), run.tta)
    metrics = M.summarize(logits, labels, classes)
    probs = logits.softmax(dim=1)  # (N, K)
    bins = reliability_bins(probs, labels)
    cm = torch.tensor(metrics["confusion_matrix"])

    meta = rd.meta()
    env_path = rd / "environment.json"
    environment = json.loads(env_path.read_text()) if env_path.is_file() else {}
    data = ReportData(
        run_name=rd.path.name,
        run_path=str(rd.path),
        generated=time.strftime("%Y-%m-%d %H:%M:%S %z"),
        dataset=saved_cfg.data.dataset,
        model=saved_cfg.model.name,
        params=(meta.get("model") or {}).get("params"),
        config=to_dict(saved_cfg),  # as the run saved it, not with the --data-dir override
        environment=environment,
        meta=meta,
        budget=Budget(epochs_done=meta.get("epochs_done"), epochs_planned=saved_cfg.train.epochs,
                      train_seconds=meta.get("train_seconds"), device=str(environment.get("device", "?")),
                      device_name=str(environment.get("device_name") or ""), status=str(meta.get("status", "")),
                      best_epoch=meta.get("best_epoch")),
        metrics=metrics,
        calibration=bins,
        reliability_png=F.reliability_diagram(bins),
        confusion_png=_confusion_png(rd, metrics, cm, classes),
        confused_pairs=M.most_confused_pairs(cm, classes, k=10),
        curves_png=_curves_png(rd, meta),
    )
    if gradcam:
        data.gallery, data.gallery_note = _gallery(run, test, probs, labels, gallery_size)
    else:
        data.gallery_note = "Skipped (--no-gradcam)."
    if robustness:
        table = robustness_table(run, test, severities or DEFAULT_SEVERITIES,
                                 max_images=max_robustness_images or DEFAULT_MAX_IMAGES)
        data.robustness, data.robustness_png = table, F.robustness_plot(table)
    else:
        data.robustness_note = "Skipped (--no-robustness)."
    return data


def write_report(
    run_dir: str | Path,
    *,
    data_dir: str | None = None,
    device: str = "cpu",
    robustness: bool = True,
    gradcam: bool = True,
    bundle=None,
    max_robustness_images: int | None = None,
    severities: Sequence[int] | None = None,
    gallery_size: int = 8,
) -> Path:
    """Write ``RUN_DIR/report.html`` (self-contained) and return its path.

    ``bundle`` (a :class:`cifarlens.data.pipeline.DataBundle`) skips re-reading the dataset
    when the caller has it (``train`` does). ``max_robustness_images`` caps the robustness
    subset (default 2000); ``severities`` defaults to (1, 3, 5) of 1..5.
    """
    from cifarlens.io import atomic_write_text
    from cifarlens.report.html import render_report

    data = build_report_data(run_dir, data_dir=data_dir, device=device, robustness=robustness, gradcam=gradcam,
                             bundle=bundle, max_robustness_images=max_robustness_images, severities=severities,
                             gallery_size=gallery_size)
    path = Path(run_dir) / REPORT_FILE
    atomic_write_text(path, render_report(data))
    return path
