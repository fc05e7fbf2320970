"""The per-run report: one self-contained ``report.html`` in the run folder.

``write_report(run)`` takes a loaded run (:func:`cifarlens.api.load_run`; the report sits below
the API and never loads one itself) and assembles: config and environment, training curves,
test metrics, the per-class table, the confusion matrix and the most-confused pairs,
calibration (ECE and a reliability diagram), a Grad-CAM gallery of correct and mistaken
predictions, accuracy under common corruptions, and the published results table
(:mod:`cifarlens.report.baselines`) with this run placed in it.

Cost. The test-split numbers come from the run's own evaluation (metrics.json,
predictions.csv) when it describes these weights and images, else from one pass over the
test split (:mod:`cifarlens.report.predictions`). The gallery explains ``gallery_size`` x 2
images (one forward and backward). Robustness dominates: one pass over its subset per
corruption and severity (15 by default). Without a budget (``cifarlens report RUN``) the
subset is ``max_robustness_images`` (2000); with ``budget_s`` (what ``train`` does: 10 % of
the training time, at least a minute, :func:`default_budget`) the model's measured speed picks
the grid (all severities, severity 3 alone, or none) and the subset grows in rounds of 100
images until what is left of the budget is spent
(:func:`cifarlens.report.robustness.robustness_within`). Each part logs a line with its time.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from cifarlens.errors import CifarlensError

__all__ = ["REPORT_FILE", "build_report_data", "default_budget", "pick_examples", "write_report"]

REPORT_FILE = "report.html"
# The report written after training costs at most about this fraction of the training time,
# or MIN_BUDGET_S seconds, whichever is larger.
BUDGET_FRACTION, MIN_BUDGET_S = 0.1, 60.0
RESERVE_S = 3.0  # kept back from robustness for its plot and the page


def default_budget(train_seconds: float | None) -> float:
    """Seconds the report after a training of ``train_seconds`` may take (see BUDGET_FRACTION)."""
    return max(MIN_BUDGET_S, BUDGET_FRACTION * (train_seconds or 0.0))


class _Clock:
    """Times the parts of a report and logs one line per part as it finishes."""

    def __init__(self, log: Callable[[str], None] | None):
        self.log = log or (lambda line: None)
        self.start = time.perf_counter()
        self.times: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @contextmanager
    def part(self, name: str) -> Iterator[list[str]]:
        """Time the block; what it appends to the yielded list is logged beside the time."""
        notes: list[str] = []
        t0 = time.perf_counter()
        yield notes
        self.times[name] = time.perf_counter() - t0
        self.log(f"report: {name}: {self.times[name]:.1f} s" + (f" ({'; '.join(notes)})" if notes else ""))


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


def _gallery(run, test, preds, k: int):
    """(Gallery | None, note) for ``preds`` (a TestPredictions of ``test``). Degrades to a note
    when cifarlens.explain is not installed."""
    from cifarlens.report.figures import image_png, side_by_side, to_rgb
    from cifarlens.report.html import Gallery, GalleryItem

    try:
        from cifarlens.explain import explain_run, overlay
    except ImportError as err:
        if err.name != "cifarlens.explain":  # a dependency of explain is missing: a real error
            raise
        return None, (f"Grad-CAM is not available in this installation ({err}), so no gallery was drawn.")
    confidence, labels, correct = preds.confidence, preds.labels, preds.correct
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
            kept = json.loads(saved.read_text())
        except (ValueError, OSError):
            kept = None  # a damaged metrics.json: draw the matrix afresh
        if isinstance(kept, dict) and kept.get("confusion_matrix") == metrics["confusion_matrix"]:
            return png.read_bytes()
    return file_png(plot_confusion_matrix, cm, classes, title=f"{rd.path.name}: test ({int(cm.sum())} images)")


def _epochs_done(rd, meta: dict) -> int | None:
    """run.json's count, else (a run killed before it could write one) the epochs in history.csv."""
    from cifarlens.report.figures import read_history

    if meta.get("epochs_done") is not None:
        return meta["epochs_done"]
    return len(read_history(rd / "history.csv")) or None


def _curves_png(rd, meta: dict) -> bytes | None:
    """The run's curves.png once training finished (it is drawn then), else drawn from history.csv."""
    from cifarlens.plots import plot_training_curves
    from cifarlens.report.figures import file_png, read_history

    if meta.get("status") == "finished" and (rd / "curves.png").is_file():
        return (rd / "curves.png").read_bytes()
    history = read_history(rd / "history.csv")
    return file_png(plot_training_curves, history) if history else None


def _saved_robustness(run):
    """(table, note, corruption errors or None) from ``cifarlens robustness`` (RUN/robustness.json)
    when it is about the current weights, else None: the full protocol, or the official files,
    instead of a budgeted subset; the errors when it was measured against a --reference."""
    from cifarlens.report.cifar_c import RESULT_FILE, load_reference
    from cifarlens.report.predictions import _weights_file, older_than
    from cifarlens.runs import RunDir

    path, weights = run.path / RESULT_FILE, _weights_file(RunDir(run.path))
    if weights is None or not path.is_file() or older_than(path, weights):
        return None
    try:
        table = load_reference(path)
    except Exception:  # damaged or from another version: measure again
        return None
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
    note = f"From cifarlens robustness ({path.name}, {when}), not recomputed for this report."
    errors = None
    try:  # with --reference it measured the corruption errors too: the table's CE columns
        saved = json.loads(path.read_text())
        errors, reference = saved.get("corruption_errors") or {}, saved.get("reference")
        def share(x) -> float:  # JSON has null where the reference's error gave nothing to divide by
            return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan

        if math.isfinite(share(errors.get("mce"))):
            relative = share(errors.get("relative_mce"))
            note += (f" Against the reference {reference}: mCE {errors['mce']:.1%}, relative mCE "
                     f"{f'{relative:.1%}' if math.isfinite(relative) else 'n/a'} over "
                     f"{len(errors.get('corruptions') or [])} corruption(s) "
                     "(100 % = as robust as the reference; lower is better; CE per corruption in the table).")
        errors = {name: (share(e.get("ce")), share(e.get("relative_ce"))) for name, e in errors["per_corruption"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        errors = None
    return table, note, errors or None


def _robustness(run, test, preds, clock: _Clock, *, budget_s: float | None, max_images: int | None,
                severities: Sequence[int] | None, notes: list[str]):
    """(RobustnessTable | None, note for the page, corruption errors or None): ``cifarlens
    robustness``'s saved result when it is about these weights, else measured for the report."""
    if len(test) == 0:
        return None, "The test split is empty.", None
    # a subset or severities asked for are measured, not replaced by a saved result of other ones
    saved = _saved_robustness(run) if max_images is None and severities is None else None
    if saved is not None:
        notes.append("read from robustness.json")
        return saved
    return (*_measured_robustness(run, test, preds, clock, budget_s=budget_s, max_images=max_images,
                                  severities=severities, notes=notes), None)


def _measured_robustness(run, test, preds, clock: _Clock, *, budget_s: float | None, max_images: int | None,
                         severities: Sequence[int] | None, notes: list[str]):
    """(RobustnessTable | None, note). With ``budget_s``, what the report has left of it goes to
    :func:`cifarlens.report.robustness.robustness_within`: the full grid, severity 3 alone for slow
    models, or nothing, on a subset grown until the time is spent."""
    from cifarlens.report.cifar_c import grid_text
    from cifarlens.report.robustness import BUDGET_GRIDS, DEFAULT_MAX_IMAGES, DEFAULT_SEVERITIES
    from cifarlens.report.robustness import robustness as robustness_table
    from cifarlens.report.robustness import robustness_within

    max_images = DEFAULT_MAX_IMAGES if max_images is None else (max_images or None)  # 0: every image
    grid = tuple(severities or DEFAULT_SEVERITIES)
    if budget_s is None:
        table = robustness_table(run, test, grid, max_images=max_images, clean_correct=preds.correct)
        note = ""
    else:
        left = budget_s - clock.elapsed() - RESERVE_S
        table, per_image = robustness_within(run, test, max(left, 0.0), grids=(grid,) if severities else BUDGET_GRIDS,
                                             max_images=max_images, clean_correct=preds.correct)
        if table is None:
            speed = f"{1000 * per_image:.1f} ms per image"
            notes.append(f"skipped: it does not fit in the {budget_s:.0f} s budget at {speed}")
            return None, (f"Skipped: it does not fit in this report's time budget ({budget_s:.0f} s) at {speed}. "
                          f"The full report: cifarlens report {run.path}")
        full = min(len(test), DEFAULT_MAX_IMAGES)
        asked = min(len(test), max_images or len(test))  # what --robustness-images left, before the budget
        note = ""
        if table.num_images < asked or tuple(table.severities) != grid:
            note = (f"Sized to this report's time budget ({budget_s:.0f} s). The full grid on {full:,} images: "
                    f"cifarlens report {run.path}")
    notes.append(f"{grid_text(len(table.corruptions()), len(table.severities))} on "
                 f"{table.num_images} of {table.total_images} images")
    return table, note


def _loaded(run):
    if isinstance(run, (str, Path)):  # the signature before the report stopped loading runs itself
        raise TypeError(f"the report takes a loaded run: pass cifarlens.api.load_run({str(run)!r}), not a path")
    return run


def _check_options(max_images, severities, gallery_size, budget_s) -> None:
    """write_report's numbers, one CifarlensError each (a bare ValueError or TypeError came from deep
    inside, and negative ones were taken)."""
    from cifarlens.report.cifar_c import MAX_SEVERITY

    ok_severities = severities is None or (isinstance(severities, (list, tuple)) and severities and all(
        isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_SEVERITY for s in severities))
    for ok, what in ((max_images is None or (isinstance(max_images, int) and max_images >= 0),
                      f"max_robustness_images must be an integer >= 0 (0: every test image), got {max_images!r}"),
                     (ok_severities, f"severities must be a list of integers in 1..{MAX_SEVERITY}, got {severities!r}"),
                     (isinstance(gallery_size, int) and gallery_size >= 0,
                      f"gallery_size must be an integer >= 0, got {gallery_size!r}"),
                     (budget_s is None or (isinstance(budget_s, (int, float)) and budget_s > 0),
                      f"budget_s must be a number of seconds > 0 (None: no budget), got {budget_s!r}")):
        if not ok:
            raise CifarlensError(what)


def build_report_data(
    run,
    *,
    data_dir: str | None = None,
    robustness: bool = True,
    gradcam: bool = True,
    bundle=None,
    max_robustness_images: int | None = None,
    severities: Sequence[int] | None = None,
    gallery_size: int = 8,
    budget_s: float | None = None,
    log: Callable[[str], None] | None = None,
):
    """Everything the page shows, computed; see :func:`write_report`."""
    _check_options(max_robustness_images, severities, gallery_size, budget_s)
    from cifarlens import metrics as M
    from cifarlens.config import to_dict
    from cifarlens.report import figures as F
    from cifarlens.calibration import reliability_bins_from_confidence
    from cifarlens.report.compare import planned_epochs
    from cifarlens.report.html import Budget, ReportData
    from cifarlens.report.predictions import compute_predictions, saved_predictions
    from cifarlens.runs import RunDir

    clock = _Clock(log)
    run = _loaded(run)
    rd = RunDir(run.path)
    rd.require_run()
    saved_cfg = rd.config()
    with clock.part("test data") as notes:
        notes.append("already in memory" if bundle is not None else "read from disk")
        test, own = run.checked_split("test", data_dir, bundle)
        if not own:  # a page about other images would mix them with the run's own figures, under its name
            raise CifarlensError(f"the test images in {data_dir or saved_cfg.data.data_dir} are not {rd.path}'s own (see "
                                 f"the warning): a report is about the run on its own test images; `cifarlens evaluate "
                                 f"{rd.path} --data-dir DIR` evaluates other images, apart from its own figures")
    with clock.part("test predictions") as notes:
        preds = saved_predictions(rd, test.labels, run.classes, run.temperature)
        if preds is None:
            preds = compute_predictions(run, test)
            notes.append(f"{len(test)} images predicted")
        else:
            notes.append("read from metrics.json and predictions.csv")
    classes = run.classes
    with clock.part("metrics and figures"):
        metrics = preds.metrics
        bins = reliability_bins_from_confidence(preds.confidence, preds.correct)
        before = (reliability_bins_from_confidence(preds.confidence_uncalibrated, preds.correct)
                  if run.calibrated and preds.confidence_uncalibrated is not None else None)
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
            budget=Budget(epochs_done=_epochs_done(rd, meta), epochs_planned=planned_epochs(saved_cfg, meta),
                          train_seconds=meta.get("train_seconds"), device=str(environment.get("device", "?")),
                          device_name=str(environment.get("device_name") or ""), status=str(meta.get("status", "")),
                          best_epoch=meta.get("best_epoch")),
            metrics=metrics,
            metrics_source=preds.source,
            calibration=bins,
            reliability_png=F.reliability_diagram(bins, "after temperature scaling" if before else ""),
            calibration_before=before,
            reliability_before_png=F.reliability_diagram(before, "before temperature scaling") if before else None,
            temperature=run.temperature,
            confusion_png=_confusion_png(rd, metrics, cm, classes),
            confused_pairs=M.most_confused_pairs(cm, classes, k=10),
            curves_png=_curves_png(rd, meta),
        )
    if gradcam:
        with clock.part("Grad-CAM gallery") as notes:
            data.gallery, data.gallery_note = _gallery(run, test, preds, gallery_size)
            notes.append(f"{gallery_size} correct + {gallery_size} mistakes at most")
    else:
        data.gallery_note = "Skipped (--no-gradcam)."
    if robustness:
        with clock.part("robustness") as notes:
            table, data.robustness_note, data.robustness_errors = _robustness(
                run, test, preds, clock, budget_s=budget_s, notes=notes, max_images=max_robustness_images,
                severities=severities)
            if table is not None:
                data.robustness, data.robustness_png = table, F.robustness_plot(table)
                data.robustness_classes_png = F.robustness_class_heatmap(table)
    else:
        data.robustness_note = "Skipped (--no-robustness)."
    data.timings = dict(clock.times)
    return data


def write_report(
    run,
    *,
    data_dir: str | None = None,
    robustness: bool = True,
    gradcam: bool = True,
    bundle=None,
    max_robustness_images: int | None = None,
    severities: Sequence[int] | None = None,
    gallery_size: int = 8,
    budget_s: float | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write ``report.html`` (self-contained) into the folder of ``run`` and return its path.

    ``run`` is a loaded run (:func:`cifarlens.api.load_run`). ``bundle`` (a
    :class:`cifarlens.data.pipeline.DataBundle`) skips re-reading the dataset when the caller
    has it (``train`` does). ``max_robustness_images`` caps the robustness subset (default
    2000, 0 for all); ``severities`` defaults to (1, 3, 5) of 1..5. ``budget_s``: keep the
    report within about that many seconds by shrinking the robustness subset (None: no limit).
    ``log`` receives a line per part with its time.
    """
    from cifarlens.io import atomic_write_text
    from cifarlens.report.html import render_report

    start = time.perf_counter()
    run = _loaded(run)
    data = build_report_data(run, data_dir=data_dir, robustness=robustness, gradcam=gradcam, bundle=bundle,
                             max_robustness_images=max_robustness_images, severities=severities,
                             gallery_size=gallery_size, budget_s=budget_s, log=log)
    path = Path(run.path) / REPORT_FILE
    atomic_write_text(path, render_report(data))
    if log is not None:
        limit = f" (budget {budget_s:.0f} s)" if budget_s is not None else ""
        log(f"report: written to {path} in {time.perf_counter() - start:.1f} s{limit}")
    return path
