"""Several runs side by side: metrics, starting weights, compute budget and the config keys that differ.

Reads only what the runs wrote (config.yaml, run.json, environment.json, metrics.json,
predictions.csv); nothing is recomputed. ECE comes from metrics.json's ``calibration``, which
says whether the last evaluation used the run's temperature; runs written before that field
get it from predictions.csv, whose per-image top-1 confidence and correctness are all that ECE
needs (calibrated or not is then unknown).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from cifarlens.config import to_dict
from cifarlens.errors import CifarlensError
from cifarlens.models.weights import describe_init
from cifarlens.report.baselines import text_table
from cifarlens.calibration import reliability_bins_from_confidence
from cifarlens.report.markup import duration, flatten, flops_text, params_text
from cifarlens.runs import RunDir

__all__ = ["compare_runs", "config_differences", "run_summary"]

MISSING = "—"


def _json(path: Path, numbers: tuple[str, ...] = ()) -> dict:
    """A run's JSON object ({} when the file is absent), its ``numbers`` checked to be numbers."""
    try:
        values = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as err:  # not JSON, or not text
        raise CifarlensError(f"{path} is not valid JSON ({err}); the run folder is damaged") from None
    wrong = [key for key in numbers if key in values and not isinstance(values[key], (int, float))] \
        if isinstance(values, dict) else ["the whole file"]
    if wrong:
        raise CifarlensError(f"{path} is damaged ({', '.join(wrong)}: not a number); run `cifarlens evaluate "
                             f"{path.parent}` to write it again")
    return values


def ece_from_predictions(path: Path, n_bins: int = 15) -> float | None:
    """ECE from predictions.csv (label, prediction, confidence per image); None when absent."""
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"label", "prediction", "confidence"} <= set(rows[0]):
        return None
    try:
        conf = torch.tensor([float(r["confidence"]) for r in rows], dtype=torch.float64)
    except (TypeError, ValueError):  # a damaged file: no ECE rather than a traceback
        return None
    hit = torch.tensor([r["label"] == r["prediction"] for r in rows])
    return reliability_bins_from_confidence(conf, hit, n_bins).ece


def ece_of_run(metrics: dict, predictions: Path) -> tuple[float | None, str | None]:
    """(ECE of the last test evaluation, "cal." / "uncal." / None when unknown): from metrics.json's
    ``calibration`` (``evaluate --no-calibration`` writes raw probabilities), else predictions.csv."""
    cal = metrics.get("calibration")
    if isinstance(cal, dict) and isinstance(cal.get("ece"), (int, float)):
        return float(cal["ece"]), "cal." if cal.get("calibrated") else "uncal."
    if not metrics:  # predictions.csv without the metrics it was written with: not shown
        return None, None
    return ece_from_predictions(predictions), None


def _history_totals(history: Path, side: int | None = None) -> tuple[int | None, float | None, int | None, float | None]:
    """The images the epochs of history.csv trained on, their seconds, their number, and the images
    in full-size equivalents (each epoch's scaled by (width trained at / ``side``)^2: progressive
    resizing's small epochs cost less); None for a column it lacks (runs from before it) or a file
    that cannot be read."""
    try:
        with history.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None, None, None, None

    def total(key: str, kind):
        try:
            return sum(kind(row[key]) for row in rows) if rows and all(row.get(key) for row in rows) else None
        except (TypeError, ValueError):
            return None

    images, scaled = total("train_samples", int), None
    if images is not None and side and all(row.get("train_px") for row in rows):
        try:
            scaled = sum(int(row["train_samples"]) * (int(row["train_px"]) / side) ** 2 for row in rows)
        except (TypeError, ValueError):
            scaled = None
    return images, total("seconds", float), len(rows), scaled if scaled is not None else images


def run_summary(run_dir: str | Path) -> dict:
    """The numbers ``compare`` shows for one run (None where the run has not written them)."""
    rd = RunDir(run_dir)
    rd.require_run()
    cfg = rd.config()
    meta, env = rd.meta(), _json(rd / "environment.json")
    metrics = _json(rd / "metrics.json", numbers=("accuracy", "f1_macro"))
    stale = bool(metrics) and _older_than_weights(rd, rd / "metrics.json")
    if stale:  # evaluated before the run trained on (--resume): about other weights
        metrics = {}
    model = meta.get("model") or {}
    train_size = (meta.get("split_sizes") or {}).get("train")
    epochs_done = meta.get("epochs_done")
    side = (meta.get("dataset") or {}).get("image_size")
    # a partial last epoch (time budgets) counts its batches, a pruned epoch its images
    images, seconds, logged, full_size = _history_totals(rd / "history.csv", side if isinstance(side, int) else None)
    status = meta.get("status")
    if status == "running":  # epochs_done is written when a run stops: so far, its history's
        epochs_done = logged
        if rd.in_use() is False:  # no process holds its lock: killed (SIGKILL, a power cut), resumable
            status = "killed?"
    if images is None and epochs_done is not None and train_size is not None:  # runs from before the column
        images = full_size = epochs_done * train_size
    return {
        "path": str(rd.path), "name": rd.path.name, "config": to_dict(cfg),
        "dataset": (meta.get("source") or {}).get("label") or cfg.data.dataset, "model": cfg.model.name, "recipe": cfg.train.recipe,
        "epochs_done": epochs_done, "epochs_planned": planned_epochs(cfg, meta),
        "stopped_early": bool(meta.get("stopped_early")),
        # a run that did not finish its epochs has no train_seconds: the epochs' own, so far
        "train_seconds": meta.get("train_seconds"), "seconds_so_far": seconds, "status": status,
        "device": env.get("device"), "device_name": env.get("device_name"),
        "accuracy": metrics.get("accuracy"), "f1_macro": metrics.get("f1_macro"), "metrics_stale": stale,
        **dict(zip(("ece", "ece_kind"), ece_of_run(metrics, rd / "predictions.csv"))),
        # runs written before cifarlens recorded "init" trained from scratch unless their config says otherwise
        "init": describe_init(meta.get("init") or _init_from_config(cfg)),
        "params": model.get("params"), "forward_flops": model.get("forward_flops"), "train_images": images,
        "train_images_full_size": full_size,
    }


def planned_epochs(cfg, meta: dict) -> int:
    """The epochs a run planned in the end: a time budget's last re-plan, else its plan (run.json),
    else config.yaml's (a time budget's recipe epochs there; runs before 2026-12 kept the plan in it)."""
    budget = meta.get("time_budget") or {}
    return (budget.get("replanned") or {}).get("epochs") or budget.get("epochs") or cfg.train.epochs


def _older_than_weights(rd: RunDir, path: Path) -> bool:
    """Whether ``path`` was written over a second before the weights it would describe (a second's
    slack: ``cp -r`` of a run gives its files the copy's times, in any order)."""
    from cifarlens.report.predictions import _weights_file, older_than

    weights = _weights_file(rd)
    return weights is not None and older_than(path, weights)


def _init_from_config(cfg) -> dict:
    if cfg.model.pretrained:
        return {"source": "imagenet", "weights": "?"}
    if cfg.model.weights:
        return {"source": "file", "file": cfg.model.weights}
    return {"source": "scratch"}


def training_flops(forward_flops: float | None, images: int | None) -> float | None:
    """Training compute estimate: forward + backward ~ 3 forward passes per training image."""
    if forward_flops is None or images is None:
        return None
    return 3.0 * forward_flops * images


def config_differences(configs: Sequence[dict]) -> list[tuple[str, list]]:
    """(dotted key, [value per run]) for every config key whose value is not the same in all runs."""
    flat = [flatten(c) for c in configs]
    keys = sorted(set().union(*flat))
    return [(k, [f.get(k, MISSING) for f in flat]) for k in keys if len({repr(f.get(k, MISSING)) for f in flat}) > 1]


def _labels(summaries: list[dict]) -> list[str]:
    names = [s["name"] for s in summaries]
    return names if len(set(names)) == len(names) else [s["path"] for s in summaries]


def compare_runs(run_dirs: Sequence[str | Path]) -> str:
    """A plain-text comparison of ``run_dirs``: one row per run, then the differing config keys."""
    if not run_dirs:
        raise CifarlensError("compare needs at least one run folder")
    summaries = [run_summary(d) for d in run_dirs]
    labels = _labels(summaries)

    def num(x, fmt: str) -> str:
        return MISSING if x is None else format(x, fmt)

    def train_time(s: dict) -> str:
        if s["train_seconds"] is not None:
            return duration(s["train_seconds"])
        return MISSING if s["seconds_so_far"] is None else f"{duration(s['seconds_so_far'])} so far"

    def epochs(s: dict) -> str:
        done = f"{num(s['epochs_done'], 'd')}/{num(s['epochs_planned'], 'd')}"
        done += " stopped early" if s.get("stopped_early") else ""
        return done if s["status"] in (None, "finished") else f"{done} {s['status']}"

    rows = []
    for label, s in zip(labels, summaries):
        device = s["device"] or MISSING
        if s["device_name"]:
            device += f" ({s['device_name']})"
        rows.append([
            label, s["dataset"], s["model"], s["recipe"],
            epochs(s), train_time(s), device,
            "stale" if s["metrics_stale"] else MISSING if s["accuracy"] is None else f"{100 * s['accuracy']:.2f}%",
            num(s["f1_macro"], ".4f"),
            MISSING if s["ece"] is None else f"{100 * s['ece']:.2f}%" + (f" {s['ece_kind']}" if s["ece_kind"] else ""),
        ])
    out = [text_table(["run", "dataset", "model", "recipe", "epochs", "train time", "device", "test acc",
                       "f1_macro", "ECE"], rows, right=(7, 8, 9))]
    out.append("")
    out.append("starting weights and compute:")
    compute = [[label, s["init"], params_text(s["params"]), flops_text(s["forward_flops"]),
                MISSING if s["train_images"] is None else f"{s['train_images']:,}",
                flops_text(training_flops(s["forward_flops"], s["train_images_full_size"])), train_time(s)]
               for label, s in zip(labels, summaries)]
    out.append(text_table(["run", "initial weights", "params", "forward / image", "training images",
                           "training compute (3x fwd)", "train time"], compute, right=(2, 3, 4, 5)))
    diffs = config_differences([s["config"] for s in summaries])
    out.append("")
    if len(summaries) == 1:
        out.append("(one run: nothing to compare the config with)")
    elif not diffs:
        out.append("config: identical in all runs")
    else:
        out.append("config keys that differ:")
        out.append(text_table(["key", *labels], [[k, *map(str, v)] for k, v in diffs]))
    out.append("")
    out.append("test acc, f1_macro and ECE (15 bins) from the last test evaluation (metrics.json); ECE cal. = "
               "with the run's fitted temperature, uncal. = raw softmax (no temperature, or `evaluate "
               f"--no-calibration`); {MISSING} where a run has not written them (run `cifarlens evaluate RUN_DIR`)"
               + ("; stale: its metrics.json is older than its weights, which trained on after that evaluation "
                  "(evaluate it again)." if any(s["metrics_stale"] for s in summaries) else "."))
    out.append("forward / image: FLOPs of one forward pass at the run's input (a multiply-add counts 2, counted "
               "by torch's FlopCounterMode); training compute ~ 3 x that x training images (backward ~ 2 forwards), "
               "an epoch trained on images scaled down (progressive resizing) counted at (its width / full)^2.")
    return "\n".join(out) + "\n"
