"""The run report: calibration, corruptions, the literature table, the HTML page, compare,
and the page opened in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, make_fashion_mnist, make_imagefolder
from PIL import Image

from cifarlens.api import load_run
from cifarlens.cli import main
from cifarlens.data.base import Split
from cifarlens.report import pick_examples
from cifarlens.report.baselines import (
    BASELINES,
    DATASETS,
    baselines_for,
    format_baselines,
)
from cifarlens.calibration import (
    expected_calibration_error,
    reliability_bins,
    reliability_bins_from_confidence,
)
from cifarlens.report.compare import compare_runs, config_differences
from cifarlens.report.html import SECTIONS, esc
from cifarlens.report.robustness import (
    CORRUPTIONS,
    MIN_IMAGES,
    SUBSET_STEP,
    list_corruptions,
    plan_subset,
    robustness,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Flags that keep chromium from reaching the network or the user's profile
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--disable-extensions"]


# -- calibration ----------------------------------------------------------------------------

def test_ece_matches_a_hand_computed_example():
    probs = torch.tensor([
        [0.90, 0.05, 0.03, 0.02],  # conf 0.90, right   -> bin (0.8, 1.0]
        [0.85, 0.05, 0.05, 0.05],  # conf 0.85, wrong   -> bin (0.8, 1.0]
        [0.10, 0.70, 0.10, 0.10],  # conf 0.70, right   -> bin (0.6, 0.8]
        [0.30, 0.25, 0.25, 0.20],  # conf 0.30, wrong   -> bin (0.2, 0.4]
    ])
    labels = torch.tensor([0, 1, 1, 2])
    # bins of width 0.2: (0.8,1]: 2 images, acc 0.5, conf 0.875 -> 2/4 * 0.375 = 0.1875
    #                    (0.6,0.8]: acc 1, conf 0.7 -> 1/4 * 0.3 = 0.075; (0.2,0.4]: acc 0, conf 0.3 -> 0.075
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(0.3375)
    bins = reliability_bins(probs, labels, n_bins=5)
    assert bins.counts == [0, 1, 0, 1, 2]
    assert bins.accuracy[4] == pytest.approx(0.5) and bins.confidence[4] == pytest.approx(0.875)
    assert bins.max_gap == pytest.approx(0.375)


def test_ece_zero_when_confidence_equals_accuracy_and_bin_edges_are_right_closed():
    probs = torch.tensor([[0.75, 0.25]] * 4)
    assert expected_calibration_error(probs, torch.tensor([0, 0, 0, 1]), n_bins=10) == pytest.approx(0.0)
    # confidence exactly 0.8 belongs to (0.6, 0.8], not (0.8, 1.0]
    bins = reliability_bins(torch.tensor([[0.8, 0.2]], dtype=torch.float64), torch.tensor([0]), n_bins=5)
    assert bins.counts == [0, 0, 0, 1, 0]


def test_ece_agrees_with_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 10, generator=g), dim=1)
    labels = torch.randint(0, 10, (500,), generator=g)
    conf, pred = probs.max(1)
    expected = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            gap = (pred[inside] == labels[inside]).double().mean() - conf[inside].double().mean()
            expected += inside.sum().item() / 500 * abs(gap.item())
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-9)


# -- robustness tables (the corruptions themselves: tests/test_corruptions.py) ----------------

def gray_images(n=8, channels=3, size=32, seed=0):
    """Mid-grey images with a smooth pattern and a little texture: no clipping at 0 or 255."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    pattern = 30 * torch.sin(xx / 4.0) * torch.cos(yy / 5.0)  # (H, W)
    x = 128 + pattern + 8 * torch.randn(n, channels, size, size, generator=g)
    return x.round().clamp(0, 255).to(torch.uint8)


class ConstantRun:
    """Predicts class 0 for every image, counting the images it sees."""

    def __init__(self, num_classes=3):
        self.num_classes, self.seen = num_classes, 0
        self.classes = tuple(f"class{i}" for i in range(num_classes))

    def predict_proba(self, images):
        self.seen += len(images)
        out = torch.zeros(len(images), self.num_classes)
        out[:, 0] = 1
        return out


def test_robustness_table_on_a_capped_seeded_subset():
    labels = torch.arange(30) % 3
    split = Split(gray_images(30, channels=1, size=16), labels)
    run = ConstantRun()
    table = robustness(run, split, severities=(1, 2), max_images=12, seed=0)
    assert table.num_images == 12 and table.total_images == 30
    assert run.seen == 12 * (1 + len(list_corruptions()) * 2)
    assert {(r["corruption"], r["severity"]) for r in table.rows} == {(c, s) for c in CORRUPTIONS for s in (1, 2)}
    assert all(r["accuracy"] == table.clean_accuracy for r in table.rows)  # the model ignores the image
    # per class: always right on class 0, never on the others (the bias view of the report)
    assert table.classes == list(run.classes) and sum(table.class_counts) == 12
    assert all(r["per_class"] == [1.0, 0.0, 0.0] for r in table.rows) and table.clean_per_class == [1.0, 0.0, 0.0]
    assert table.class_accuracy("gaussian_noise") == [1.0, 0.0, 0.0]
    again = robustness(ConstantRun(), split, severities=(1, 2), max_images=12, seed=0)
    assert again.as_dict() == table.as_dict()
    with pytest.raises(ValueError):
        robustness(run, split, severities=(0,))


def test_robustness_takes_the_clean_row_from_earlier_predictions():
    labels = torch.arange(30) % 3
    split = Split(gray_images(30, channels=1, size=16), labels)
    run = ConstantRun()
    known = torch.zeros(30, dtype=torch.bool)
    known[:6] = True  # (the first 6 happen to be right, whatever the constant model says now)
    table = robustness(run, split, severities=(1,), max_images=None, clean_correct=known)
    assert run.seen == 30 * len(list_corruptions())  # no clean pass
    assert table.clean_accuracy == pytest.approx(6 / 30)
    with pytest.raises(ValueError):
        robustness(run, split, severities=(1,), clean_correct=known[:5])


class BrightnessRun:
    """Predicts one of 3 classes from the mean brightness of each image."""

    classes = ("dark", "mid", "bright")

    def predict_proba(self, images):
        level = (images.float().mean(dim=(1, 2, 3)) / 86).long().clamp(max=2)
        return torch.nn.functional.one_hot(level, 3).float()


def test_robustness_with_a_deadline_grows_the_subset_in_rounds():
    shift = torch.linspace(-100, 100, 350).round().int()[:, None, None, None]  # dark to bright
    images = (gray_images(350, channels=1, size=8).int() + shift).clamp(0, 255).to(torch.uint8)
    split = Split(images, torch.arange(350) % 3)
    steady = ["defocus_blur", "brightness", "contrast", "jpeg_compression"]  # not random: the images decide
    run = BrightnessRun()
    whole = robustness(run, split, (1, 3), corruptions=steady, max_images=None)
    late = robustness(run, split, (1, 3), corruptions=steady, max_images=None, deadline=time.perf_counter() + 1e6)
    assert late.num_images == whole.num_images == 350 and late.as_dict() == whole.as_dict()
    capped = robustness(run, split, (1, 3), corruptions=steady, max_images=250, deadline=time.perf_counter() + 1e6)
    assert capped.as_dict() == robustness(run, split, (1, 3), corruptions=steady, max_images=250).as_dict()
    # a deadline already past: the first round only, a random hundred (not the first images of the split)
    known = torch.arange(350) < SUBSET_STEP  # pretend only the first hundred were right
    first = robustness(run, split, (1, 3), corruptions=steady, clean_correct=known, deadline=time.perf_counter())
    assert first.num_images == SUBSET_STEP and first.total_images == 350
    order = torch.randperm(350, generator=torch.Generator().manual_seed(0))[:SUBSET_STEP]
    assert first.clean_accuracy == pytest.approx(float(known[order].float().mean())) and first.clean_accuracy < 0.6


def test_plan_subset_fits_the_budget_shrinking_the_grid_for_slow_models():
    n = 5  # corruptions: with 3 severities, 15 passes in the arithmetic below
    # 1 ms per image: 15 passes over 2000 images take 30 s
    assert plan_subset(60, 1e-3, 10_000, corruptions=n) == ((1, 3, 5), 2000)
    # 10 ms per image: 61 s hold 406 images, 15 passes each: 400 of them
    assert plan_subset(61, 1e-2, 10_000, corruptions=n) == ((1, 3, 5), 400)
    assert plan_subset(59, 1e-2, 10_000, corruptions=n) == ((1, 3, 5), 300)  # rounded down to a hundred
    # 30 ms per image: fewer than MIN_IMAGES at three severities, so severity 3 alone (5 passes)
    assert plan_subset(61, 3e-2, 10_000, corruptions=n) == ((3,), 400)
    assert MIN_IMAGES == 200 and plan_subset(29, 3e-2, 10_000, corruptions=n) is None  # nothing worth showing
    assert plan_subset(60, 1e-3, 50, corruptions=n) == ((1, 3, 5), 50)  # a small split: all of it
    assert plan_subset(61, 1e-3, 10_000, corruptions=n, max_images=None) == ((1, 3, 5), 4000)
    assert plan_subset(1500, 1.0, 10_000, corruptions=n, grids=((2,),)) == ((2,), 300)  # only the grid given


# -- literature table -------------------------------------------------------------------------

def test_every_baseline_is_cited_and_accuracy_is_100_minus_error():
    assert {b.dataset for b in BASELINES} == set(DATASETS)
    for b in BASELINES:
        c = b.citation
        assert c.authors and 2016 <= c.year <= 2017 and c.title and c.venue and c.arxiv and b.table.startswith("Table")
        assert b.accuracy + b.error == pytest.approx(100.0)
        assert (b.error if b.metric == "error" else b.accuracy) == b.published
        assert 0 < b.published < 100
    he = {b.model: b.error for b in baselines_for("cifar10") if b.citation.title.startswith("Deep Residual")}
    assert he["ResNet-20"] == 8.75 and he["ResNet-110"] == 6.43  # He et al. 2016, Table 6


@pytest.mark.parametrize("row", [b for b in BASELINES if b.cifarlens_model], ids=lambda b: f"{b.dataset}-{b.model}")
def test_baselines_mapped_to_a_cifarlens_model_have_its_parameter_count(row):
    from cifarlens.models import create_model

    with torch.device("meta"):  # counts parameters without allocating 36M of them
        model = create_model(row.cifarlens_model, num_classes=100 if row.dataset == "cifar100" else 10)
    published = float(row.params.rstrip("M")) * 1e6
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(published, rel=0.02)


def test_baselines_command_prints_the_table_with_citations(capsys):
    assert main(["baselines", "--dataset", "cifar10"]) == 0
    out = capsys.readouterr().out
    assert "ResNet-110" in out and "93.57" in out and "6.43" in out
    assert "Deep Residual Learning for Image Recognition" in out and "arXiv:1512.03385" in out
    assert "Fashion-MNIST" not in out
    text = format_baselines()
    assert all(ds in text for ds in DATASETS) and "SVC" in text and "89.70" in text


# -- small pieces -------------------------------------------------------------------------------

def test_pick_examples_covers_classes_before_repeating():
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = torch.tensor([0, 0, 1, 1, 2])
    assert pick_examples(torch.ones(5, dtype=torch.bool), conf, labels, 4) == [0, 2, 4, 1]
    assert pick_examples(torch.tensor([False, True, False, False, False]), conf, labels, 4) == [1]


def test_config_differences_lists_only_keys_that_differ():
    a = {"train": {"lr": 0.1, "seed": 0}, "model": {"kwargs": {"widths": [8]}}}
    b = {"train": {"lr": 0.05, "seed": 0}, "model": {"kwargs": {"widths": [16]}}}
    assert config_differences([a, b]) == [("model.kwargs", ['{"widths": [8]}', '{"widths": [16]}']),
                                          ("train.lr", [0.1, 0.05])]


# -- end to end -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reported_run(tmp_path_factory):
    """A tiny Fashion-MNIST-layout run, trained and reported through the CLI."""
    root = tmp_path_factory.mktemp("report")
    data = make_fashion_mnist(root / "data", n_train=200, n_test=50)
    out = root / "run"
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "2",
                 "--out", str(out), *TINY]) == 0
    shutil.copy(out / "report.html", root / "train_report.html")  # train's own, before the full report
    assert main(["report", str(out), "--device", "cpu"]) == 0
    return out


def section(page: str, sid: str) -> str:
    match = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.DOTALL)
    assert match, sid
    return match.group(1)


def test_report_is_self_contained_and_has_every_section(reported_run):
    page = (reported_run / "report.html").read_text()
    for sid, title in SECTIONS:
        assert f"<h2>{esc(title)}</h2>" in section(page, sid)
    # No asset from outside the page: every src is an embedded PNG, every href an in-page anchor
    srcs = re.findall(r'\ssrc="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert all(h.startswith("#") for h in re.findall(r'\shref="([^"]*)"', page))
    assert not re.search(r"https?://", page) and "<script" not in page and "<link" not in page
    for s in srcs:  # each embedded image is a valid PNG
        with Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))) as im:
            im.verify()
    # Numbers the page must carry
    metrics = section(page, "metrics")
    assert "accuracy" in metrics and "expected calibration error" in metrics
    calibration = section(page, "calibration")  # the run fitted a temperature after training
    temperature = json.loads((reported_run / "run.json").read_text())["calibration"]["temperature"]
    assert f"T = {temperature:.3f}" in calibration and "after temperature scaling" in calibration
    assert calibration.count("data:image/png;base64,") == 2  # reliability diagrams before and after
    assert "Compute budget" in section(page, "config") and "2 done of 2 planned" in page
    literature = section(page, "literature")
    assert 'class="ours"' in literature and "SVC (C=10, kernel=rbf)" in literature and "Table 3" in literature
    assert "arXiv:1708.07747" in literature
    robust = section(page, "robustness")
    assert "gaussian noise" in robust and "jpeg" in robust and "severity 5" in robust
    gradcam = section(page, "gradcam")
    try:
        import cifarlens.explain  # noqa: F401
        from cifarlens.explain import explain_run  # noqa: F401
    except ImportError:
        assert "not available" in gradcam
    else:
        assert gradcam.count('<figure class="tile">') >= 2 and "Correct predictions" in gradcam


def test_report_options_skip_parts_but_keep_their_headings(reported_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(reported_run, copy)
    assert main(["report", str(copy), "--device", "cpu", "--no-robustness", "--no-gradcam"]) == 0
    page = (copy / "report.html").read_text()
    assert "Skipped (--no-robustness)." in section(page, "robustness")
    assert "Skipped (--no-gradcam)." in section(page, "gradcam")


def test_a_run_killed_without_a_trace_shows_the_epochs_of_its_history(reported_run, tmp_path):
    """SIGKILL leaves run.json at "running" with no epochs_done; history.csv still has the epochs."""
    copy = tmp_path / "killed"
    shutil.copytree(reported_run, copy)
    meta = json.loads((copy / "run.json").read_text())
    meta.pop("epochs_done")
    meta["status"] = "running"
    (copy / "run.json").write_text(json.dumps(meta))
    assert main(["report", str(copy), "--device", "cpu", "--no-robustness", "--no-gradcam"]) == 0
    assert "2 done of 2 planned" in (copy / "report.html").read_text()


def test_compare_tells_a_killed_run_from_a_running_one(reported_run, tmp_path, capsys):
    """A SIGKILLed run showed as '—/2 running' for ever; no process holds its folder's lock."""
    import fcntl
    import os

    copy = tmp_path / "killed"
    shutil.copytree(reported_run, copy)
    meta = json.loads((copy / "run.json").read_text())
    meta.pop("epochs_done")
    (copy / "run.json").write_text(json.dumps({**meta, "status": "running"}))
    capsys.readouterr()
    assert main(["compare", str(copy)]) == 0
    assert "2/2 killed?" in capsys.readouterr().out
    fd = os.open(copy, os.O_RDONLY)  # as a training holds it (another open file: another holder)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert main(["compare", str(copy)]) == 0
        row = capsys.readouterr().out
        assert "2/2 running" in row and "killed?" not in row
    finally:
        os.close(fd)


def test_gallery_shows_no_evidence_for_empty_maps_and_degrades_without_explain(reported_run, monkeypatch):
    from types import SimpleNamespace

    from cifarlens.report import build_report_data
    from cifarlens.report.html import render_report

    explain = pytest.importorskip("cifarlens.explain")
    if not hasattr(explain, "explain_run"):
        pytest.skip("cifarlens.explain has no explain_run yet")

    def all_empty(run, images, method="gradcam", target=None):
        b, _, h, w = images.shape
        probs = torch.full((b, len(run.classes)), 1.0 / len(run.classes))
        return SimpleNamespace(maps=torch.zeros(b, h, w), empty=torch.ones(b, dtype=torch.bool),
                               predictions=torch.zeros(b, dtype=torch.int64), targets=torch.zeros(b, dtype=torch.int64),
                               probs=probs)

    monkeypatch.setattr(explain, "explain_run", all_empty)
    run = load_run(reported_run)
    data = build_report_data(run, robustness=False, gallery_size=2)
    tiles = data.gallery.correct + data.gallery.mistakes
    assert tiles and all(t.empty for t in tiles)
    gradcam = section(render_report(data), "gradcam")
    assert gradcam.count("no evidence") == len(tiles)

    monkeypatch.setitem(sys.modules, "cifarlens.explain", None)  # as if it were not installed
    data = build_report_data(run, robustness=False)
    assert data.gallery is None and "not available" in section(render_report(data), "gradcam")


def test_the_calibration_section_gives_advice_that_works(reported_run):
    """A run without a validation split was told to `cifarlens calibrate` it, which then refused."""
    from dataclasses import replace

    from cifarlens.report import build_report_data
    from cifarlens.report.html import render_report

    data = build_report_data(load_run(reported_run, calibrated=False), robustness=False, gradcam=False)
    assert data.temperature is None and data.calibration_before is None
    assert f"fit one with cifarlens calibrate {reported_run}" in section(render_report(data), "calibration")
    no_val = replace(data, meta={**data.meta, "split_sizes": {**data.meta["split_sizes"], "val": 0}})
    shown = section(render_report(no_val), "calibration")
    assert "the run has no validation split to fit one on" in shown and "cifarlens calibrate" not in shown


def test_report_of_a_missing_run_is_a_clean_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--budget", "0"], ["--budget", "inf"], ["--budget", "nan"],
                                   ["--robustness-images", "-1"]])
def test_report_rejects_bad_budget_flags_in_one_line(reported_run, flags, capsys):
    assert main(["report", str(reported_run), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cifarlens: error:") and flags[0] in err and len(err.strip().splitlines()) == 1


def test_training_writes_a_budgeted_report_logging_each_part(reported_run):
    log = (reported_run / "train.log").read_text()
    for part in ("test data", "test predictions", "metrics and figures", "Grad-CAM gallery", "robustness"):
        assert re.search(rf"^report: {part}: \d+\.\d s", log, re.MULTILINE), part
    # train's evaluation is reused, not repeated; the budget is the 60 s floor for a run this short
    assert "read from metrics.json and predictions.csv" in log
    assert re.search(r"^report: written to .*report\.html in \d+\.\d s \(budget 60 s\)$", log, re.MULTILINE)


def test_the_report_train_writes_shows_the_run_finished(reported_run):
    """It showed "status running": the report was written before run.json said finished."""
    page = (reported_run.parent / "train_report.html").read_text()
    assert re.search(r"<td>status</td><td>finished</td>", page), re.findall(r"<td>status</td><td>[^<]*</td>", page)


def test_damaged_metrics_or_predictions_are_recomputed_or_left_out(reported_run, tmp_path, capsys):
    from cifarlens.api import load_run
    from cifarlens.report import build_report_data

    run_dir = tmp_path / "damaged"
    shutil.copytree(reported_run, run_dir)
    (run_dir / "metrics.json").write_text("[1, 2]")  # valid JSON, not a run's metrics: recomputed
    data = build_report_data(load_run(run_dir), gradcam=False, robustness=False)
    assert sum(map(sum, data.metrics["confusion_matrix"])) == 50 and data.metrics_source.startswith("computed in this report")
    rows = (reported_run / "predictions.csv").read_text().splitlines()
    (run_dir / "predictions.csv").write_text("\n".join([rows[0], "0,a,b,high,0.5"] + rows[2:]) + "\n")
    shutil.copy(reported_run / "metrics.json", run_dir / "metrics.json")
    json_metrics = json.loads((run_dir / "metrics.json").read_text())
    json_metrics.pop("calibration", None)  # ECE from predictions.csv, which is damaged: left out
    (run_dir / "metrics.json").write_text(json.dumps(json_metrics))
    capsys.readouterr()
    assert main(["compare", str(run_dir)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("damaged"))
    assert not row.rstrip().endswith("%")  # no ECE, no traceback


def test_report_reuses_the_runs_evaluation_only_while_it_is_current(reported_run, tmp_path):
    from cifarlens.report import build_report_data
    from cifarlens.report.predictions import compute_predictions

    copy = tmp_path / "copy"
    shutil.copytree(reported_run, copy)  # (keeps the files' times)
    run = load_run(copy)
    data = build_report_data(run, robustness=False, gradcam=False)
    assert "the run's own evaluation" in data.metrics_source
    fresh = compute_predictions(run, run.data().test)
    assert data.metrics["confusion_matrix"] == fresh.metrics["confusion_matrix"]
    assert data.metrics["accuracy"] == fresh.metrics["accuracy"]
    assert data.calibration.ece == pytest.approx(  # (predictions.csv keeps 6 decimals of confidence)
        reliability_bins_from_confidence(fresh.confidence, fresh.correct).ece, abs=1e-5)
    rows = (copy / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + len(fresh.labels)

    # cp -r wrote the weights a few milliseconds after the evaluation: still the run's own (it was recomputed)
    soon = (copy / "metrics.json").stat().st_mtime + 0.05
    os.utime(copy / "model.safetensors", (soon, soon))
    assert "the run's own evaluation" in build_report_data(run, robustness=False, gradcam=False).metrics_source
    # weights newer than the evaluation (e.g. a resumed run): recomputed
    later = (copy / "metrics.json").stat().st_mtime + 10
    os.utime(copy / "model.safetensors", (later, later))
    data = build_report_data(run, robustness=False, gradcam=False)
    assert data.metrics_source.startswith("computed in this report")
    assert data.metrics["confusion_matrix"] == fresh.metrics["confusion_matrix"]

    # predictions of other images (one label changed): recomputed
    shutil.copytree(reported_run, tmp_path / "other")
    path = tmp_path / "other" / "predictions.csv"
    lines = path.read_text().splitlines()
    index, label, prediction, *confidences = lines[1].split(",")
    other = next(c for c in load_run(reported_run).classes if c != label)
    lines[1] = ",".join([index, other, prediction, *confidences])
    stat = path.stat()
    path.write_text("\n".join(lines) + "\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    data = build_report_data(load_run(tmp_path / "other"), robustness=False, gradcam=False)
    assert data.metrics_source.startswith("computed in this report")


class FakeClock:
    """Stands in for the ``time`` module of cifarlens.report.robustness: the runs below advance it."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def slowed(run, clock: FakeClock, seconds_per_image: float):
    """``run`` whose predictions cost ``seconds_per_image`` each on ``clock``."""
    predict = run.predict_proba

    def predict_proba(images):
        clock.now += seconds_per_image * len(images)
        return predict(images)

    run.predict_proba = predict_proba
    return run


# five corruptions: with severities 1, 3 and 5, 15 passes in the arithmetic of the budget tests
FIVE = ["gaussian_noise", "defocus_blur", "brightness", "contrast", "jpeg_compression"]


@pytest.mark.parametrize("per_image, seconds, severities, images", [
    (0.01, 60, [1, 3, 5], 350),  # 15 s a round of 100: every image
    (0.01, 35, [1, 3, 5], 200),  # after 2 rounds (30 s) a third would end at 45 s
    (0.03, 35, [3], 200),  # 45 s a full round: severity 3 alone, 15 s a round
    (0.10, 35, None, 0),  # 50 s a round even of severity 3 alone: nothing worth starting
])
def test_robustness_within_a_budget_chooses_the_grid_and_stops_in_time(monkeypatch, per_image, seconds,
                                                                       severities, images):
    import cifarlens.report.robustness as R

    clock = FakeClock()
    monkeypatch.setattr(R, "time", clock)
    shift = torch.linspace(-100, 100, 350).round().int()[:, None, None, None]
    split = Split((gray_images(350, channels=1, size=8).int() + shift).clamp(0, 255).to(torch.uint8),
                  torch.arange(350) % 3)
    table, measured = R.robustness_within(slowed(BrightnessRun(), clock, per_image), split, seconds, corruptions=FIVE,
                                          clean_correct=torch.ones(350, dtype=torch.bool))
    assert measured == pytest.approx(per_image)
    if severities is None:
        assert table is None and clock.now == pytest.approx(100 * per_image)  # the one measured cell
        return
    assert table.severities == severities and table.num_images == images
    assert clock.now <= seconds and len(table.rows) == len(FIVE) * len(severities)
    # the cells are those robustness() gives on the same images
    steady = robustness(BrightnessRun(), split, severities, corruptions=FIVE, max_images=images,
                        clean_correct=torch.ones(350) > 0)
    noisy = [r for r in table.rows if r["corruption"] == "gaussian_noise"]
    assert [r for r in table.rows if r not in noisy] == [r for r in steady.rows if r["corruption"] != "gaussian_noise"]


def test_robustness_within_a_budget_stops_sooner_when_the_machine_gets_busier(monkeypatch):
    """Rounds of 15 s, then (from 30 s on) 30 s: the mean round (20 s after three) would start a
    fourth at 60 s that ends at 90 s, past the 80 s budget; the last round's time says stop."""
    import cifarlens.report.robustness as R

    clock = FakeClock()
    monkeypatch.setattr(R, "time", clock)
    run = BrightnessRun()
    predict = run.predict_proba

    def busier(images):
        clock.now += (0.01 if clock.now < 30 - 1e-9 else 0.02) * len(images)
        return predict(images)

    run.predict_proba = busier
    split = Split(gray_images(450, channels=1, size=8), torch.arange(450) % 3)
    table, _ = R.robustness_within(run, split, 80, corruptions=FIVE, clean_correct=torch.ones(450, dtype=torch.bool))
    assert table.severities == [1, 3, 5] and table.num_images == 300 and clock.now == pytest.approx(60)


def test_a_budget_sizes_or_skips_robustness_in_the_report(reported_run, monkeypatch):
    """At a (pretended) 0.1 s per image, the 50 test images need 225 s for the full grid (15
    corruptions x 3 severities) and 75 s for severity 3 alone."""
    import cifarlens.report.robustness as R
    from cifarlens.report import RESERVE_S, build_report_data

    def report(budget):
        clock = FakeClock()
        monkeypatch.setattr(R, "time", clock)
        return build_report_data(slowed(load_run(reported_run), clock, 0.1), gradcam=False, budget_s=budget)

    small = report(RESERVE_S + 100)  # 75 s <= what is left < 225 s
    assert small.robustness.severities == [3] and small.robustness.num_images == 50
    assert "time budget" in small.robustness_note and f"cifarlens report {reported_run}" in small.robustness_note
    assert small.robustness_note in html.unescape(section(render(small), "robustness"))
    skipped = report(RESERVE_S + 10)
    assert skipped.robustness is None and "does not fit" in skipped.robustness_note and "100.0 ms" in skipped.robustness_note
    assert "does not fit" in html.unescape(section(render(skipped), "robustness"))
    ample = report(RESERVE_S + 300)
    assert ample.robustness.severities == [1, 3, 5] and ample.robustness_note == ""


def render(data) -> str:
    from cifarlens.report.html import render_report

    return render_report(data)


def test_the_report_takes_a_loaded_run_and_never_imports_the_api():
    """Layers import downward: the report (below the API) gets a loaded run from its caller."""
    import ast

    from cifarlens.report import write_report

    package = Path(__file__).resolve().parents[1] / "src" / "cifarlens" / "report"
    for module in package.glob("*.py"):
        if module.name == "cli.py":  # the command line sits above the API
            continue
        for node in ast.walk(ast.parse(module.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "cifarlens.api" or n.startswith(("cifarlens.api.", "cifarlens.cli")) for n in names), \
                f"{module.name} imports {names}"
    with pytest.raises(TypeError, match="load_run"):
        write_report("runs/some-run")


@pytest.mark.parametrize("option, value, words", [
    ("severities", [0], "severities must be a list of integers in 1..5"), ("severities", 3, "got 3"),
    ("max_robustness_images", -1, "max_robustness_images must be an integer >= 0"),
    ("gallery_size", -3, "gallery_size must be an integer >= 0"), ("budget_s", -5, "budget_s must be a number"),
])
def test_write_report_options_outside_their_range_are_one_error(reported_run, option, value, words):
    """A bare ValueError or TypeError from deep inside, or taken (a negative subset, gallery or budget)."""
    from cifarlens.errors import CifarlensError
    from cifarlens.report import write_report

    with pytest.raises(CifarlensError, match=re.escape(words)):
        write_report(load_run(reported_run), **{option: value})


def test_compare_shows_budget_metrics_and_config_differences(reported_run, tmp_path, capsys):
    other = tmp_path / "run-lr"
    shutil.copytree(reported_run, other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["train"]["lr"] = 0.05
    (other / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (other / "metrics.json").unlink()  # a run without test metrics shows dashes
    capsys.readouterr()
    assert main(["compare", str(reported_run), str(other)]) == 0
    out = capsys.readouterr().out
    assert "run-lr" in out and "Fashion-MNIST" in out and "lensnet_light" in out and "2/2" in out
    row = next(line for line in out.splitlines() if line.startswith("run ") and "Fashion-MNIST" in line)
    assert re.search(r"\d+\.\d\d%", row)  # test accuracy and ECE
    assert re.search(r"train\.lr\s+0\.1\s+0\.05", out)  # lensnet_light's default recipe (modern) has lr 0.1
    assert "identical" not in out
    assert "config: identical in all runs" in compare_runs([reported_run, reported_run])
    assert "stale" not in out
    # what a run planned in the end: a time budget's re-plan (config.yaml keeps the first plan); early stops said
    meta = json.loads((other / "run.json").read_text())
    meta["time_budget"] = {"seconds": 60, "epochs": 11, "replanned": {"epochs": 2, "last_epoch_fraction": 0.85}}
    meta["stopped_early"] = True
    (other / "run.json").write_text(json.dumps(meta))
    cfg["train"]["epochs"] = 11  # the first plan's, as config.yaml keeps it
    (other / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    row = next(line for line in compare_runs([reported_run, other]).splitlines() if line.startswith("run-lr "))
    assert "2/2 stopped early" in row, row


def test_compare_counts_epochs_trained_on_smaller_images_at_their_cost(reported_run, tmp_path):
    """Progressive resizing's epochs at 24 of 32 px cost (24/32)^2 of a full one; compare counted them whole."""
    from cifarlens.report.compare import run_summary

    rows = list(csv.DictReader((reported_run / "history.csv").open()))
    assert [int(row["train_px"]) for row in rows] == [28, 28]  # what training writes: Fashion-MNIST's width
    other = tmp_path / "run-small"
    shutil.copytree(reported_run, other)
    for row, px in zip(rows, (14, 28)):
        row["train_px"] = px
    with (other / "history.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    samples = [int(row["train_samples"]) for row in rows]
    summary = run_summary(other)
    assert summary["train_images"] == sum(samples)
    assert summary["train_images_full_size"] == pytest.approx(samples[0] / 4 + samples[1])
    for row in rows:  # a run from before the column: every image at full size
        del row["train_px"]
    with (other / "history.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert run_summary(other)["train_images_full_size"] == sum(samples)


def test_compare_marks_test_metrics_older_than_the_weights_stale(reported_run, tmp_path, capsys):
    """An evaluation before a --resume that trained on showed as the run's test accuracy."""
    import os

    resumed = tmp_path / "resumed"
    shutil.copytree(reported_run, resumed)  # (the copy's files get times in any order: within a second)
    capsys.readouterr()
    assert main(["compare", str(resumed)]) == 0
    assert "stale" not in capsys.readouterr().out
    later = (resumed / "metrics.json").stat().st_mtime + 60  # the weights written a minute after the evaluation
    os.utime(resumed / "model.safetensors", (later, later))
    assert main(["compare", str(resumed)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("resumed "))
    assert re.search(r"\bstale\s+—\s+—\s*$", row) and "%" not in row, row
    assert "stale: its metrics.json is older than its weights" in out


def test_compare_says_whether_the_ece_is_calibrated(reported_run, tmp_path, capsys):
    """ECE follows the last test evaluation: calibrated by default, raw after evaluate --no-calibration."""
    raw = tmp_path / "run-raw"
    shutil.copytree(reported_run, raw)
    assert main(["evaluate", str(raw), "--device", "cpu", "--no-calibration"]) == 0
    capsys.readouterr()
    assert main(["compare", str(reported_run), str(raw)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("run") and "Fashion-MNIST" in line}
    for run, kind in ((reported_run, "cal."), (raw, "uncal.")):
        cal = json.loads((run / "metrics.json").read_text())["calibration"]
        assert cal["calibrated"] is (kind == "cal.")
        assert rows[run.name].rstrip().endswith(f"{100 * cal['ece']:.2f}% {kind}"), rows[run.name]


def test_hostile_class_names_are_escaped(tmp_path):
    hostile = '<script>alert("x")<'
    data = make_imagefolder(tmp_path / "images", classes=(hostile, "cat & dog", "plain"), n_per_class=8,
                            n_test_per_class=3, formats=("png", "jpeg"), sizes=((32, 32),), junk=False)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(data.data_dir), "--epochs", "1",
                 "--out", str(out), *TINY]) == 0
    assert main(["report", str(out), "--device", "cpu", "--no-robustness"]) == 0
    page = (out / "report.html").read_text()
    assert "<script" not in page and hostile not in page
    assert esc(hostile) in section(page, "per-class") and "cat &amp; dog" in page
    assert "No published results are recorded for dataset" in section(page, "literature")
    assert "official" not in section(page, "literature")  # an image folder has no official data to differ from


# -- a real browser ------------------------------------------------------------------------------

def chromium_or_skip() -> Path:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (/usr/bin/chromium)")
    return CHROMIUM


def test_report_renders_in_headless_chromium(reported_run, tmp_path):
    """--dump-dom shows every section as parsed by the browser; a screenshot shows drawn content."""
    browser = chromium_or_skip()
    url = (reported_run / "report.html").resolve().as_uri()
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([str(browser), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120,
                         check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for sid, title in SECTIONS:
        assert re.search(rf'<section id="{sid}"><h2>{re.escape(esc(title))}</h2>', dom.stdout), sid
    assert dom.stdout.count("data:image/png;base64,") >= 4
    shot = tmp_path / "shot.png"
    run = subprocess.run([str(browser), *flags, "--hide-scrollbars", "--window-size=1200,3000",
                          f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (3000, 1200) and pixels.std() > 20  # text, tables and figures, not a blank page


def test_report_images_decode_in_chromium_without_errors(reported_run, tmp_path):
    """Through chromedriver: every <img> decoded (naturalWidth > 0), every section visible, no console errors."""
    browser = chromium_or_skip()
    if not CHROMEDRIVER.exists():
        pytest.skip("chromium-driver is not installed (/usr/bin/chromedriver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(browser)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,3000"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get((reported_run / "report.html").resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt])")
        assert len(images) >= 4
        assert all(done and w > 0 and h > 0 for done, w, h, _ in images), images
        headings = driver.execute_script(
            "return Array.from(document.querySelectorAll('section > h2'))"
            ".map(h => [h.parentElement.id, h.textContent, h.getBoundingClientRect().height])")
        assert [(sid, title) for sid, title, _ in headings] == list(SECTIONS)
        assert all(height > 0 for _, _, height in headings)
        assert driver.execute_script("return document.scripts.length") == 0
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
