"""What the report costs, part by part, for trained runs: the one written after training and the full one.

    python benchmarks/report_cost.py RUN_DIR [RUN_DIR ...] [--full]
    python benchmarks/report_cost.py --train --data-dir /tmp/cifar10-jpeg [--epochs 1] [--out /tmp/report-cost]

With run folders, each is loaded, its test data read (timed apart: ``train`` passes the data
it holds), and the report is built as ``train`` builds it (``budget_s = default_budget(training
time)``: 10 % of it, at least 60 s); with ``--full`` also as ``cifarlens report RUN`` does (no
budget). With ``--train``, it first trains one run of the default CPU model (fastnet_cpu) and
one of resnet20 on an image folder (``--data-dir``: train/<class>/*, test/<class>/*; e.g. a
JPEG copy of CIFAR-10), ``--epochs`` each, without their report. The page is rendered but
written to a temporary file, so the runs' own report.html stays as it was.

Prints the CPU, then per run: training time, budget, the seconds of each part and the total.
Wall times on a shared machine vary by 10-30 % run to run.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import torch

from cifarlens.api import load_run, train
from cifarlens.config import RunConfig, merge
from cifarlens.engine import device_description
from cifarlens.report import build_report_data, default_budget
from cifarlens.report.html import render_report

MODELS = ("fastnet_cpu", "resnet20")  # the default CPU model and a ResNet


def cpu_flags() -> str:
    try:
        flags = set(re.findall(r"\b(avx512_bf16|avx512f|avx2|amx_tile)\b", Path("/proc/cpuinfo").read_text()))
    except OSError:
        return "?"
    return ", ".join(sorted(flags)) or "none of avx2/avx512"


def train_runs(data_dir: str, epochs: int, out: Path) -> list[Path]:
    runs = []
    for model in MODELS:
        cfg = merge(RunConfig(), {"data": {"dataset": "imagefolder", "data_dir": data_dir},
                                  "model": {"name": model}, "train": {"epochs": epochs, "device": "cpu"}})
        run_dir = out / model
        print(f"training {model} for {epochs} epoch(s) into {run_dir} ...", flush=True)
        train(cfg, run_dir, force=True, report=False)
        runs.append(run_dir)
    return runs


def time_report(run_dir: Path, full: bool) -> None:
    run = load_run(run_dir, device="cpu")
    t0 = time.perf_counter()
    bundle = run.data()
    read = time.perf_counter() - t0
    train_s = run_meta_seconds(run_dir)
    print(f"\n{run_dir}: {run.config.model.name}, training {train_s:.1f} s, {len(bundle.test)} test images; "
          f"reading the data took {read:.1f} s (a standalone `cifarlens report` pays it, train does not)")
    modes = [("after train", default_budget(train_s))] + ([("full", None)] if full else [])
    for name, budget in modes:
        lines: list[str] = []
        t0 = time.perf_counter()
        data = build_report_data(run, bundle=bundle, budget_s=budget, log=lines.append)
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "report.html").write_text(render_report(data))
        total = time.perf_counter() - t0
        limit = f"budget {budget:.0f} s" if budget is not None else "no budget"
        print(f"  {name} ({limit}):")
        for part, seconds in data.timings.items():
            detail = next((line.split("(", 1)[1].rstrip(")") for line in lines
                           if line.startswith(f"report: {part}:") and "(" in line), "")
            print(f"    {part:<20} {seconds:7.1f} s  {detail}")
        print(f"    {'render page':<20} {total - (t1 - t0):7.1f} s")
        print(f"    {'total':<20} {total:7.1f} s", flush=True)


def run_meta_seconds(run_dir: Path) -> float:
    import json

    return float(json.loads((run_dir / "run.json").read_text()).get("train_seconds") or 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR")
    parser.add_argument("--train", action="store_true", help="train a fastnet_cpu and a resnet20 run first")
    parser.add_argument("--data-dir", help="image folder to train on (with --train)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "report-cost")
    parser.add_argument("--full", action="store_true", help="also time the full report (cifarlens report RUN)")
    args = parser.parse_args()
    if args.train and not args.data_dir:
        parser.error("--train needs --data-dir")
    if not args.train and not args.runs:
        parser.error("give run folders, or --train --data-dir DIR")
    print(f"CPU: {device_description(torch.device('cpu'))}; flags: {cpu_flags()}")
    runs = list(args.runs) + (train_runs(args.data_dir, args.epochs, args.out) if args.train else [])
    for run_dir in runs:
        time_report(run_dir, args.full)


if __name__ == "__main__":
    main()
