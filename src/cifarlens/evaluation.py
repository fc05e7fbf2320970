"""Calibrate and evaluate a finished run: its temperature on the validation split, and its
metrics, predictions and confusion matrix on a split (what ``cifarlens evaluate`` writes)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from cifarlens import metrics as M
from cifarlens.calibration import MAX_TEMPERATURE, MIN_TEMPERATURE, TemperatureFit, calibration_summary, fit_temperature
from cifarlens.config import RunConfig
from cifarlens.data.base import Split
from cifarlens.data.pipeline import DataBundle, make_loader
from cifarlens.engine import FitState, Precision, predict_logits
from cifarlens.errors import CifarlensError, user_os_error
from cifarlens.inference import load_run
from cifarlens.io import TEXT, atomic_write, atomic_write_json, atomic_write_text
from cifarlens.runs import SPLIT_FILES, RunDir, claims_run

# fewer validation images than this give an unreliable temperature (a warning says so)
FEW_CALIBRATION_IMAGES = 100

EVAL_BATCH_SIZE = 512


@claims_run
def calibrate_run(
    run_dir: str | Path,
    *,
    data_dir: str | None = None,
    device: str = "auto",
    bundle: DataBundle | None = None,
    log: Callable[[str], None] | None = None,
    require_images: bool = False,
) -> TemperatureFit | None:
    """Fit the run's temperature on its validation split (the best weights, with the run's TTA)
    and record it in run.json (``calibration``), where :func:`load_run` finds it. Returns the
    fit, or None when the run has no validation images (nothing is recorded then; an error with
    ``require_images``)."""
    run = RunDir(run_dir)
    loaded = load_run(run.path, device=device, calibrated=False)
    val: Split = loaded.split("val", data_dir, bundle)
    say = log or run.log
    if len(val) == 0 and require_images:
        raise CifarlensError(f"{run.path} has no validation images (data.val_fraction 0): no temperature can be "
                             "fitted; its probabilities stay the raw softmax")
    if len(val) == 0:
        say("calibration skipped: the run has no validation images to fit a temperature on")
        return None
    loader = make_loader(val, loaded.info, EVAL_BATCH_SIZE, loaded.device)
    logits, labels = predict_logits(loaded.model, loader, Precision(loaded.device), loaded.tta, loaded.tta_translate)
    fit = fit_temperature(logits, labels)
    run.write_meta(calibration={**fit.as_dict(), "fitted_on": "val"})
    say(f"calibration: temperature {fit.temperature:.3f} fitted on {fit.images} validation images "
        f"(NLL {fit.nll_before:.4f} -> {fit.nll_after:.4f}, ECE {fit.ece_before:.2%} -> {fit.ece_after:.2%})")
    doubts = [f"only {fit.images} validation images"] * (fit.images < FEW_CALIBRATION_IMAGES) + \
        [f"the temperature stopped at its limit {fit.temperature:g}"] * (fit.temperature in (MIN_TEMPERATURE,
                                                                                              MAX_TEMPERATURE))
    doubt = " and ".join(doubts)  # both: a tiny split often pins the temperature at its limit too
    if doubt:
        say(f"warning: calibration: {doubt}, an unreliable fit (evaluate, predict and serve --no-calibration give "
            "the raw probabilities; train --set train.calibrate=false skips the fit)")
    return fit


@claims_run
def evaluate_run(
    run_dir: str | Path,
    *,
    split: str = "test",
    data_dir: str | None = None,
    device: str = "auto",
    bundle: DataBundle | None = None,
    calibrated: bool = True,
    must_write: bool = True,
) -> dict:
    """Evaluate a run's best weights on ``split`` and write metrics, predictions and plots.

    With ``calibrated`` (default) and a fitted temperature, confidences, NLL and the predictions
    file use calibrated probabilities; ``calibration`` in the result gives ECE and NLL with and
    without it (accuracy is the same either way). Where the run folder cannot be written (read
    only, full disk), the error is raised, or with ``must_write=False`` the result says why in
    ``not_written``."""
    if split not in ("test", "val"):
        raise CifarlensError(f"--split must be test or val, got {split!r}")
    run = RunDir(run_dir)
    loaded = load_run(run.path, device=device, calibrated=calibrated)
    bundle = loaded.data(data_dir, bundle)  # read once: its fingerprint names other images' folder below
    data, own = loaded.checked_split(split, data_dir, bundle)
    if split == "val" and len(data) == 0:
        raise CifarlensError(f"{run.path} has no validation images (data.val_fraction 0); evaluate --split test")
    # Normalise with the run's own statistics (for imagefolder they came from its training data).
    loader = make_loader(data, loaded.info, EVAL_BATCH_SIZE, loaded.device)
    raw, labels = predict_logits(loaded.model, loader, Precision(loaded.device), loaded.tta, loaded.tta_translate)
    logits = loaded.scale(raw)
    result = M.summarize(logits, labels, loaded.info.classes) | {"split": split, "split_size": len(data)}
    if len(labels):
        result["calibration"] = calibration_summary(raw, labels, loaded.temperature)
    folder = None
    if not own:  # other test images (another test set of the same classes): its figures apart, the run's kept
        digest = bundle.fingerprints["test" if split == "test" else "train"]
        folder = run.other_data(split, bundle.fingerprints)
        result |= {"data_dir": str(Path(data_dir or loaded.config.data.data_dir).resolve()), "fingerprint": digest}
        result["written_to"] = str(folder)
    try:
        write_evaluation(run, split, result, logits, labels, loaded.info.classes, raw, folder=folder, files=data.files)
    except OSError as err:  # a read-only run folder, a full disk: the figures are still worth showing
        text = user_os_error(err)
        if must_write or text is None:
            raise
        result["not_written"] = text
    return result


def write_evaluation(run: RunDir, split: str, result: dict, logits: Tensor, labels: Tensor,
                     classes: Sequence[str], raw_logits: Tensor | None = None, folder: Path | None = None,
                     files: Sequence[str] | None = None) -> None:
    """metrics, predictions (with ``raw_logits``, also the top-1 confidence before calibration;
    with ``files``, each image's file), a text report and the confusion matrix of one split: in
    the run folder, or in ``folder`` (made)."""
    from cifarlens.plots import plot_confusion_matrix

    if folder is None:
        metrics_file, predictions_file, report_file, cm_file = (run.split_file(p, split) for p in SPLIT_FILES)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        metrics_file, predictions_file, report_file, cm_file = (folder / p.format("") for p in SPLIT_FILES)
    atomic_write_json(metrics_file, result)
    probs = logits.softmax(dim=1)
    confidence, prediction = probs.max(dim=1)
    raw = (raw_logits if raw_logits is not None else logits).softmax(dim=1).gather(1, prediction[:, None])[:, 0]

    def write_predictions(tmp: Path) -> None:
        with tmp.open("w", newline="", **TEXT) as f:
            writer = csv.writer(f)
            named = files is not None and len(files) == len(labels)  # the folder datasets: which file it was
            writer.writerow(["index", *["file"] * named, "label", "prediction", "confidence", "confidence_uncalibrated"])
            for i, (y, p, c, r) in enumerate(zip(labels.tolist(), prediction.tolist(), confidence.tolist(), raw.tolist())):
                writer.writerow([i, *([files[i]] if named else []), classes[y], classes[p], f"{c:.6f}", f"{r:.6f}"])

    atomic_write(predictions_file, write_predictions)
    atomic_write_text(report_file, M.classification_report_text(result))
    cm = torch.tensor(result["confusion_matrix"])
    plot_confusion_matrix(cm, classes, cm_file, title=f"{run.path.name}: {split} ({len(labels)} images)")


def finish_training(run: RunDir, cfg: RunConfig, state: FitState, device: torch.device, bundle: DataBundle, tracker, *,
                    evaluate_test: bool, has_val: bool, report: Callable[[], None] | None = None) -> dict:
    """After the last epoch: curves, the temperature, the test evaluation and ``report()`` (the
    caller's: the report sits above this layer)."""
    from cifarlens.plots import plot_training_curves

    plot_training_curves(state.history, run / "curves.png")
    train_seconds = state.seconds
    if not evaluate_test:
        tracker.finish(run, None, train_seconds, state.epoch)
        return {}
    if cfg.train.calibrate:
        calibrate_run(run.path, device=str(device), bundle=bundle, log=run.log)
    result = evaluate_run(run.path, split="test", device=str(device), bundle=bundle)
    run.write_meta(status="finished")  # evaluated: the report below shows it so
    if report is not None:
        report()
    tracker.finish(run, result, train_seconds, state.epoch)
    kept = f"best epoch {state.best_epoch}, val_loss {state.best_val_loss:.4f}" if has_val else "final weights"
    run.log(f"test accuracy {result['accuracy']:.2%} ({kept}); results in {run.path}")
    return result
