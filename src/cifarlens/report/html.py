"""The self-contained HTML page: one file, PNGs embedded as data: URIs, inline CSS, no JavaScript.

Everything that comes from a run (config values, class names, file paths, notes) goes
through :func:`esc` (``html.escape`` with quotes), so a class folder called
``<script>`` shows as text. No ``src`` or ``href`` points outside the page, so it opens
offline in any browser and can be mailed as one attachment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cifarlens.data.policies import describe_augmentation
from cifarlens.images import LOSSY_EXTENSIONS, format_names
from cifarlens.models.weights import describe_init
from cifarlens.report.baselines import DATASETS, RECIPE_SOURCES, Baseline, baselines_for, citations
from cifarlens.report.markup import duration, esc, flatten, flops_text, img, note, params_text, pct, table
from cifarlens.calibration import ReliabilityBins
from cifarlens.report.robustness import RobustnessTable

__all__ = ["SECTIONS", "Budget", "Gallery", "GalleryItem", "ReportData", "esc", "render_report"]

# (anchor id, heading): every report has all of them, in this order; a part that was
# skipped or is unavailable keeps its heading and says why.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("config", "Configuration and environment"),
    ("curves", "Training curves"),
    ("metrics", "Test metrics"),
    ("per-class", "Per-class precision, recall and F1"),
    ("confusion", "Confusion matrix and most-confused pairs"),
    ("calibration", "Calibration"),
    ("gradcam", "Grad-CAM gallery"),
    ("robustness", "Robustness to common corruptions"),
    ("literature", "Published results and this run"),
)


@dataclass
class Budget:
    """What the run cost: from run.json, config.yaml and environment.json."""

    epochs_done: int | None
    epochs_planned: int | None
    train_seconds: float | None
    device: str
    device_name: str
    status: str = ""
    best_epoch: int | None = None


@dataclass
class GalleryItem:
    png: bytes  # image and Grad-CAM overlay side by side (or the image alone when ``empty``)
    true: str
    predicted: str
    prob: float
    empty: bool  # all-zero map: no evidence for the class, nothing to overlay


@dataclass
class Gallery:
    correct: list[GalleryItem] = field(default_factory=list)
    mistakes: list[GalleryItem] = field(default_factory=list)
    method: str = "gradcam"


@dataclass
class ReportData:
    run_name: str
    run_path: str
    generated: str
    dataset: str  # registry name (cifar10, fashion-mnist, imagefolder, ...)
    model: str
    params: int | None
    config: dict
    environment: dict
    meta: dict
    budget: Budget
    metrics: dict  # cifarlens.metrics.summarize() of the test split
    calibration: ReliabilityBins  # of the probabilities the run gives (calibrated when it has a temperature)
    reliability_png: bytes
    confusion_png: bytes
    confused_pairs: list[tuple[str, str, int]]
    curves_png: bytes | None = None
    gallery: Gallery | None = None
    gallery_note: str = ""
    robustness: RobustnessTable | None = None
    robustness_png: bytes | None = None
    robustness_note: str = ""  # why it is missing, or how its subset was chosen
    robustness_classes_png: bytes | None = None  # classes x corruptions heatmap
    robustness_errors: dict | None = None  # corruption -> (CE, relative CE) against robustness --reference
    metrics_source: str = "computed in this report from the run's best weights"
    timings: dict[str, float] = field(default_factory=dict)  # seconds per part of the report
    calibration_before: ReliabilityBins | None = None  # before temperature scaling (calibrated runs)
    reliability_before_png: bytes | None = None
    temperature: float | None = None

    @property
    def dataset_label(self) -> str:
        """"CIFAR-10 (JPEG copy)" for a copy, the registry name for runs from before run.json said."""
        return (self.meta.get("source") or {}).get("label") or self.dataset


def _flops(meta: dict) -> str:
    flops = (meta.get("model") or {}).get("forward_flops")
    image = (meta.get("dataset") or {}).get("image_size")
    return "—" if flops is None else f"{flops_text(flops)} per {image}x{image} image"


def _source_note(meta: dict) -> str:
    source = meta.get("source") or {}
    return f" — read from {source['path']}" if source.get("path") else ""


# -- sections --------------------------------------------------------------------------------

def _config(d: ReportData) -> str:
    b = d.budget
    budget = table(None, [
        ["dataset", d.dataset_label + _source_note(d.meta)],
        ["model", f"{d.model} ({d.params:,} parameters)" if d.params else d.model],
        ["initial weights", describe_init(d.meta.get("init"))],
        ["forward pass", _flops(d.meta)],
        ["status", b.status or "—"],
        ["epochs", f"{b.epochs_done if b.epochs_done is not None else '—'} done of "
                   f"{b.epochs_planned if b.epochs_planned is not None else '—'} planned"
                   + (f" (best epoch {b.best_epoch})" if b.best_epoch else "")],
        ["training wall time", duration(b.train_seconds)],
        ["device", f"{b.device} ({b.device_name})" if b.device_name else b.device],
    ], css="kv")
    config = table(["key", "value"], sorted(flatten(d.config).items()), css="kv")
    env = {k: (" ".join(map(str, v)) if k == "command" and isinstance(v, list) else v)
           for k, v in d.environment.items()}
    environment = table(["key", "value"], sorted(flatten(env).items()), css="kv")
    return (f"<h3>Compute budget</h3>{budget}"
            f'<div class="cols"><div><h3>Resolved config (config.yaml)</h3>{config}</div>'
            f"<div><h3>Environment (environment.json)</h3>{environment}</div></div>")


def _curves(d: ReportData) -> str:
    if d.curves_png is None:
        return note("history.csv is missing or empty: no training curves to show.")
    return img(d.curves_png, "loss, accuracy and learning rate per epoch", "wide")


def _metrics(d: ReportData) -> str:
    m = d.metrics
    rows = [["accuracy", pct(m["accuracy"])]]
    if "top5_accuracy" in m:
        rows.append(["top-5 accuracy", pct(m["top5_accuracy"])])
    rows += [
        ["precision (macro / weighted)", f"{m['precision_macro']:.4f} / {m['precision_weighted']:.4f}"],
        ["recall (macro / weighted)", f"{m['recall_macro']:.4f} / {m['recall_weighted']:.4f}"],
        ["F1 (macro / weighted)", f"{m['f1_macro']:.4f} / {m['f1_weighted']:.4f}"],
        ["negative log-likelihood", f"{m['nll']:.4f}"],
        ["mean confidence", pct(m["mean_confidence"])],
        ["expected calibration error (15 bins)", pct(d.calibration.ece)],
        ["test images", f"{m['num_samples']:,}"],
    ]
    return (table(["metric", "value"], rows, numeric=(1,), css="kv")
            + note(f"The run's best weights (model.safetensors) on the test split, with the run's own "
                   f"normalisation; {d.metrics_source}."))


def _per_class(d: ReportData) -> str:
    rows = [[r["name"], f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", r["support"]]
            for r in d.metrics["per_class"]]
    return table(["class", "precision", "recall", "F1", "support"], rows, numeric=(1, 2, 3, 4))


def _confusion(d: ReportData) -> str:
    pairs = (table(["true class", "predicted as", "images"], [list(p) for p in d.confused_pairs], numeric=(2,))
             if d.confused_pairs else note("No mistakes on the test split: there are no confused pairs."))
    return (img(d.confusion_png, "confusion matrix, counts and row-normalised", "wide")
            + f"<h3>Most-confused pairs</h3>{pairs}")


def _calibration(d: ReportData) -> str:
    c = d.calibration
    rows = [[f"{lo:.3f}–{hi:.3f}", n, pct(a) if n else "—", pct(p) if n else "—"]
            for lo, hi, n, a, p in zip(c.edges[:-1], c.edges[1:], c.counts, c.accuracy, c.confidence) if n]
    intro = (f"<p>Expected calibration error <b>{pct(c.ece)}</b>, maximum calibration error {pct(c.max_gap)} "
             f"over {len(c.counts)} equal-width confidence bins ({c.num_samples:,} test images). Confidence is the "
             "top softmax probability; a calibrated model is right on a fraction p of the images it gives "
             "confidence p.</p>")
    bins_table = table(["confidence bin", "images", "accuracy", "mean confidence"], rows, numeric=(1, 2, 3))
    if d.calibration_before is None:
        no_val = not (d.meta.get("split_sizes") or {}).get("val", 1)  # data.val_fraction 0: nothing to fit it on
        fit = ("the run has no validation split to fit one on" if no_val else
               f"fit one with cifarlens calibrate {d.run_path}")
        how = (note(f"The run has no fitted temperature: these are its raw softmax probabilities ({fit}).")
               if d.temperature is None else "")
        return (intro + how + f'<div class="cols"><div>{img(d.reliability_png, "reliability diagram")}</div>'
                f"<div>{bins_table}</div></div>")
    b, cal = d.calibration_before, d.metrics.get("calibration") or {}
    nll_row = (["negative log-likelihood", f"{cal['nll_uncalibrated']:.4f}", f"{cal['nll']:.4f}"]
               if "nll" in cal else None)
    summary = table(["test split", "before", "after temperature scaling"],
                    [["expected calibration error", pct(b.ece), pct(c.ece)],
                     ["maximum calibration error", pct(b.max_gap), pct(c.max_gap)]] + ([nll_row] if nll_row else []),
                    numeric=(1, 2))
    return (intro + f"<p>Probabilities are calibrated by temperature scaling (Guo et al. 2017): logits divided "
            f"by <b>T = {d.temperature:.3f}</b>, fitted on the validation split after training "
            f"({'T &gt; 1 softens an overconfident model' if d.temperature > 1 else 'T &lt; 1 sharpens an underconfident model'}"
            "; the top-1 prediction and the accuracy do not change).</p>" + summary
            + f'<div class="cols"><div>{img(d.reliability_before_png, "reliability diagram before")}</div>'
            f'<div>{img(d.reliability_png, "reliability diagram after")}</div></div>'
            + f"<h3>Bins after temperature scaling</h3>{bins_table}")


def _tiles(items: list[GalleryItem]) -> str:
    tiles = []
    for it in items:
        evidence = ' <span class="warn">no evidence (all-zero map)</span>' if it.empty else ""
        alt = f"true {it.true}, predicted {it.predicted}"
        tiles.append(f'<figure class="tile">{img(it.png, alt)}<figcaption>true <b>{esc(it.true)}</b><br>'
                     f"predicted <b>{esc(it.predicted)}</b> ({pct(it.prob, 1)}){evidence}</figcaption></figure>")
    return f'<div class="gallery">{"".join(tiles)}</div>'


def _gradcam(d: ReportData) -> str:
    parts = [note(d.gallery_note)] if d.gallery_note else []
    g = d.gallery
    if g is not None:
        parts.append(f"<p>Each tile: the test image, then the {esc(g.method)} map of the predicted class over "
                     "it (red = more evidence). Each row shows the most confident predictions of as many "
                     "different true classes as it can (one per class, the most confident first, then the rest "
                     "by confidence): correct ones, then mistakes.</p>")
        parts.append("<h3>Correct predictions</h3>" + (_tiles(g.correct) if g.correct else note("none")))
        parts.append("<h3>Mistakes</h3>" + (_tiles(g.mistakes) if g.mistakes else note("No mistakes to show.")))
    return "".join(parts)


def _parameters(rows: list[dict]) -> str:
    """"noise std: 0.04, 0.06, ..." for one-number corruptions; the unit alone for the others."""
    values = [r["parameter"] for r in rows]
    if all(isinstance(v, (int, float)) for v in values):
        return f"{rows[0]['unit']}: " + ", ".join(f"{v:g}" for v in values)
    return str(rows[0]["unit"])


def _robustness(d: ReportData) -> str:
    t = d.robustness
    if t is None:
        return note(d.robustness_note or "Robustness was not computed.")
    errors = d.robustness_errors or {}
    header = (["corruption", "parameter"] + [f"severity {s}" for s in t.severities] + ["mean"]
              + ["CE", "relative CE"] * bool(errors))
    rows = []
    for name in t.corruptions():
        own = [r for r in t.rows if r["corruption"] == name]
        ce = [pct(x, 1) if math.isfinite(x) else "n/a" for x in errors.get(name, (math.nan, math.nan))] if errors else []
        rows.append([name.replace("_", " "), _parameters(own)] + [pct(r["accuracy"]) for r in own]
                    + [pct(t.mean_accuracy(name))] + ce)
    subset = (f"a seeded random subset of {t.num_images:,} of the {t.total_images:,} test images"
              if t.num_images < t.total_images else f"all {t.num_images:,} test images")
    official = t.source.startswith("official")
    how = (f"Images from the {esc(t.source)}." if official else
           f"{'The ' + str(len(t.corruptions())) + ' corruptions' if len(t.corruptions()) > 1 else 'One corruption'} "
           "of the CIFAR-10-C protocol (Hendrycks &amp; Dietterich 2019) at its "
           f"CIFAR severities, generated on the fly (seed {t.seed}) by cifarlens.corruptions; a few approximate the "
           "paper's generator (see docs/explain-and-report.md), so compare with published CIFAR-10-C numbers with "
           f"care. <code>cifarlens robustness {esc(d.run_path)}</code> runs all 5 severities on every test image, "
           "or reads the official CIFAR-10-C files (--corruptions-dir), and gives the mCE against a reference run.")
    left_out = "".join(note(f"{name.replace('_', ' ')} left out: {why}.") for name, why in t.unavailable.items())
    per_class = ""
    if d.robustness_classes_png:
        per_class = ("<h3>Per-class accuracy under each corruption</h3>"
                     + note("Mean over the severities above; the clean column first. A class that breaks first "
                            "shows as a dark row"
                            + ("; a class without images in this subset is left blank." if 0 in t.class_counts else ".")
                            ) + img(d.robustness_classes_png, "per-class accuracy heatmap", "wide"))
    return (f"<p>Accuracy on {subset}: clean <b>{pct(t.clean_accuracy)}</b>, mean over all corruptions and "
            f"severities <b>{pct(t.mean_accuracy())}</b>. {how}</p>"
            + (note(d.robustness_note) if d.robustness_note else "") + left_out
            + (img(d.robustness_png, "accuracy against corruption severity") if d.robustness_png else "")
            + table(header, rows, numeric=tuple(range(2, len(header)))) + per_class)


LOSSY_FORMATS = format_names(LOSSY_EXTENSIONS)  # ("AVIF", "JPEG", "WEBP")


def _literature(d: ReportData) -> str:
    b = d.budget
    run_acc = d.metrics["accuracy"] * 100
    budget = (f"{b.epochs_done if b.epochs_done is not None else '—'} epoch{'' if b.epochs_done == 1 else 's'}, "
              f"{duration(b.train_seconds)}, "
              f"{b.device}" + (f" ({b.device_name})" if b.device_name else ""))
    recipe = d.config.get("train", {}).get("recipe") or "?"
    augmentation = describe_augmentation(d.config.get("data", {}))
    intro = (f"<p>This run: <b>{run_acc:.2f}%</b> test accuracy on {esc(d.dataset_label)} "
             f"({d.metrics['num_samples']:,} test images), {esc(d.model)}, recipe {esc(recipe)}, "
             f"augmentation {esc(augmentation)}, trained for {esc(budget)}.</p>")
    if d.dataset not in DATASETS:  # (an image folder: no published rows, so no official data to differ from)
        return intro + note(f"No published results are recorded for dataset {d.dataset!r}; "
                            f"cifarlens keeps them for {', '.join(DATASETS)} (see `cifarlens baselines`).")
    source = d.meta.get("source") or {}
    if source.get("lossy"):
        formats = [f for f in source.get("formats") or [] if f in LOSSY_FORMATS] or ["JPEG"]
        intro += note(f"This run's images went through lossy compression ({', '.join(formats)}), so they are not the "
                      "official files the published rows used: expect its accuracy to differ somewhat from the "
                      "same training on the official data.")
    data_warnings = [str(w) for w in source.get("warnings") or []]
    if data_warnings:  # e.g. a subset under the official names: not the split the published rows used
        intro += note("What was read is not the official data as published: " + "; ".join(data_warnings))
    rows: list[Baseline | None] = list(baselines_for(d.dataset))
    position = sum(1 for r in rows if r is not None and r.accuracy > run_acc)
    rows.insert(position, None)  # None stands for this run
    refs = citations(r for r in rows if r is not None)
    cells, classes = [], []
    for r in rows:
        if r is None:
            cells.append([f"this run: {d.model}", params_text(d.params), f"{run_acc:.2f}", f"{100 - run_acc:.2f}",
                          "measured here", f"{augmentation}; recipe {recipe}", budget,
                          f"{d.metrics['num_samples']:,} test images", "—"])
            classes.append("ours")
        else:
            cells.append([r.model, r.params or "—", f"{r.accuracy:.2f}", f"{r.error:.2f}",
                          f"{r.metric} {r.published:g}%", r.augmentation, "not reported in the table",
                          "; ".join(filter(None, [r.note, "same architecture as this run"
                                                  if r.cifarlens_model == d.model else "",
                                                  "same recipe as this run"
                                                  if RECIPE_SOURCES.get(recipe) == r.citation else ""])),
                          f"[{refs.index(r.citation) + 1}] {r.table}"])
            classes.append("")
    refs_html = "".join(f"<li>{esc(c.full())}</li>" for c in refs)
    return (intro
            + note("Literature figures are copied as published (full training runs on the full dataset) and were "
                   "not re-run by cifarlens; the row marked 'this run' is the only number measured here. "
                   "Where a paper printed the error, accuracy is 100 minus it, and the other way round.")
            + table(["model", "params", "test accuracy %", "test error %", "as published", "augmentation",
                     "compute budget", "note", "source"], cells, numeric=(1, 2, 3), row_class=classes)
            + f"<ol class=\"refs\">{refs_html}</ol>")


_RENDER = {
    "config": _config, "curves": _curves, "metrics": _metrics, "per-class": _per_class, "confusion": _confusion,
    "calibration": _calibration, "gradcam": _gradcam, "robustness": _robustness, "literature": _literature,
}

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#fff}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;color:#c9d1e0}main{padding:8px 28px 40px;max-width:1300px}
nav ol{columns:3;margin:12px 0;padding-left:20px}
section{border-top:1px solid #dde2ea;margin-top:22px}h2{font-size:19px;margin:16px 0 8px}
h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}th,td{padding:3px 9px;border-bottom:1px solid #e6e9ef;
text-align:left;vertical-align:top}th{background:#f3f5f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.kv td:first-child{color:#4a5568;white-space:nowrap}tr.ours td{background:#fff4d6;font-weight:600}
img{max-width:100%;height:auto}img.wide{width:100%}.cols{display:flex;flex-wrap:wrap;gap:28px}.cols>div{flex:1 1 420px}
.gallery{display:flex;flex-wrap:wrap;gap:12px}.tile{margin:0;width:236px}.tile img{image-rendering:pixelated;
border:1px solid #dde2ea}figcaption{font-size:12px;word-break:break-word}.warn{color:#b7791f;font-weight:600}
.note{color:#4a5568;font-style:italic}ol.refs{font-size:13px}
"""


def render_report(d: ReportData) -> str:
    """The whole page as one string."""
    toc = "".join(f'<li><a href="#{sid}">{esc(title)}</a></li>' for sid, title in SECTIONS)
    sections = "".join(f'<section id="{sid}"><h2>{esc(title)}</h2>{_RENDER[sid](d)}</section>'
                       for sid, title in SECTIONS)
    acc = pct(d.metrics["accuracy"])
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>cifarlens report: {esc(d.run_name)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>cifarlens report: {esc(d.run_name)}</h1>"
        f"<p>{esc(d.model)} on {esc(d.dataset_label)} · test accuracy {acc} · run folder {esc(d.run_path)} · "
        f"generated {esc(d.generated)}</p></header>"
        f"<main><nav><ol>{toc}</ol></nav>{sections}</main></body></html>\n"
    )
