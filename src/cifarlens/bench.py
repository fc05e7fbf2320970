"""``cifarlens bench``: N seeded trainings, reported as mean ± std.

For each seed, the run is trained exactly as ``cifarlens train`` does. After every
epoch, *outside* the timed training, the test accuracy is measured so that the time to
reach each target accuracy can be reported (airbench's protocol). This looks at the
test set every epoch, which is fine for a benchmark of a recipe and is never done by
``train``: inside the run, model selection uses only the validation split.

Timed: the training epochs (forward, backward, optimizer, batched augmentation and the
validation pass). Not timed: reading the dataset, the per-epoch test passes, writing
the report, and on a GPU or with ``train.compile`` the start-up: an untimed warm-up run first
pays for CUDA's lazy start, cuDNN's autotuning and compilation, so the timed runs find kernels
ready (airbench does the same); with progressive resizing the warm-up trains the whole schedule,
which visits every width.
"""

from __future__ import annotations

import json
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cifarlens.config import RunConfig
from cifarlens.data.pipeline import make_loader, prepare_data
from cifarlens.data.policies import check_settings, unused_policy_settings
from cifarlens.engine import Precision, device_description, evaluate, resolve_device
from cifarlens.io import write_output_text
from cifarlens.models.weights import input_info
from cifarlens.recipes import describe_choice, resolve_choices, resolve_train, unread_given


@dataclass
class SeedResult:
    seed: int
    test_acc: float  # at the end: the best-on-validation weights (the final ones without a validation split)
    train_seconds: float
    images_per_second: float
    time_to: dict[float, float | None]  # target accuracy -> seconds of training (None: not reached)
    epochs_to: dict[float, int | None]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_one(cfg: RunConfig, seed: int, targets: list[float], log=print) -> SeedResult:
    from cifarlens.api import train

    # resolved here too, so the per-epoch test passes use the recipe's TTA like the final evaluation
    cfg = replace(cfg, train=resolve_train(replace(cfg.train, seed=seed)))
    device = resolve_device(cfg.train.device)
    bundle = prepare_data(cfg.data, seed)
    # normalised as train() normalises this model (ImageNet statistics for pretrained backbones)
    test_loader = make_loader(bundle.test, input_info(cfg.model, bundle.info), 1000, device)
    tta = bool(cfg.train.tta) and bundle.info.hflip
    # the per-epoch passes run in the training's precision (bf16 autocast where it pays on the CPU:
    # ~2-3x faster than fp32 with 6-view TTA); the final accuracy is train()'s fp32 evaluation
    precision = Precision.for_device(device, cfg.train.amp, cfg.train.channels_last, cfg.train.cpu_amp)
    time_to: dict[float, float | None] = {t: None for t in targets}
    epochs_to: dict[float, int | None] = {t: None for t in targets}
    train_images = 0

    def on_epoch_end(state, model) -> None:
        nonlocal train_images
        seconds = state.seconds  # with a time budget, its timing steps included
        acc = evaluate(model, test_loader, precision, tta, cfg.train.tta_translate)["acc"]
        log(f"[bench seed {seed}] epoch {state.epoch}: test_acc {acc:.2%} after {seconds:.1f}s of training")
        for t in targets:
            if acc >= t and time_to[t] is None:
                time_to[t], epochs_to[t] = seconds, state.epoch
        train_images = sum(row["train_samples"] for row in state.history)  # a partial last epoch counts its part

    with tempfile.TemporaryDirectory() as tmp:
        # train's "run folder ..." and "results in ..." lines name it: said here that it goes
        log(f"[bench seed {seed}] training in a temporary run folder, {tmp}/run, deleted when the seed ends")
        result = train(cfg, f"{tmp}/run", on_epoch_end=on_epoch_end, bundle=bundle, report=False)
        history_seconds = result["train_seconds"]
    return SeedResult(seed, result["accuracy"], history_seconds, train_images / max(history_seconds, 1e-9),
                      time_to, epochs_to)


def mean_std(values: list[float]) -> str:
    """"90.15 ± 0.13": the mean and the sample standard deviation, to the same decimal place
    (about 4 significant digits of the mean: 427.3 ± 23.1, 1302 ± 1688)."""
    mean = statistics.mean(values)
    places = max(0, 4 - len(str(int(abs(mean)))))
    if len(values) == 1:  # one seed: its figure alone (13020 images/s, not 1.302e+04)
        return f"{mean:.{places}f}"
    return f"{mean:.{places}f} ± {statistics.stdev(values):.{places}f}"


def run_bench(cfg: RunConfig, seeds: list[int], targets: list[float], log=print, json_out: Path | None = None
              ) -> dict:
    """Train ``cfg`` once per seed and summarise (see :func:`summarize`); the summary also goes to
    ``json_out``, that of the finished seeds when Ctrl-C stops it."""
    device = resolve_device(cfg.train.device)
    cfg, why = resolve_choices(cfg, device.type)
    chosen = {"model": cfg.model.name, "recipe": cfg.train.recipe}
    for key, reason in why.items():
        log(f"[bench] {key}: {describe_choice(chosen[key], why, key) if key in chosen else reason}")
    start = time.perf_counter()
    resolved = resolve_train(cfg.train)
    resolve_train(replace(cfg.train, seed=max(seeds)))  # the last seed in range too, before the first one trains
    for warning in [*unread_given(cfg.train, resolved), *unused_policy_settings(cfg.data)]:
        log(f"[bench] warning: {warning}")
    check_settings(cfg.data)  # before the data is read
    if cfg.track.loggers:  # its runs live in temporary folders, deleted after each seed
        log(f"[bench] warning: track.loggers ({', '.join(cfg.track.loggers)}) are not used: bench prints and "
            "--json writes its figures; train logs a run")
        cfg = replace(cfg, track=replace(cfg.track, loggers=[]))
    if resolved.compile or device.type == "cuda":
        # The first run of a process pays for what later runs find ready: CUDA's lazy start and
        # cuDNN's autotuning of each input shape (3.5 s of the first 10-s run on an H200) and
        # torch.compile's compilation. An untimed warm-up run pays it, as airbench's does: one epoch,
        # or with progressive resizing the recipe's whole schedule, which trains at every width.
        ramp = bool(resolved.progressive_res)
        warm = replace(cfg.train, time_budget=0.0, epochs=cfg.train.epochs if ramp else 1)
        n = resolved.epochs
        what = f"of {n} epoch{'s' * (n != 1)} (every training width)" if ramp else "of one epoch"
        paid = [name for name, on in [("CUDA's start and cuDNN's autotuning", device.type == "cuda"),
                                      ("compilation", resolved.compile)] if on]
        log(f"[bench] warm-up run {what}, for {' and '.join(paid)} (not counted)")
        bench_one(replace(cfg, train=warm), seeds[0], [], log)
    results: list[SeedResult] = []
    try:
        for seed in seeds:
            results.append(bench_one(cfg, seed, targets, log))
    except KeyboardInterrupt:  # what the finished seeds measured is not lost with the one running
        if results:
            log(f"\n[bench] interrupted during seed {seeds[len(results)]}; the {len(results)} finished seed(s):")
            summary = summarize(results, cfg, device, targets, start, log) | {"interrupted_during_seed": seeds[len(results)]}
            if json_out is not None:
                write_output_text(json_out, json.dumps(summary, indent=2) + "\n")
        raise
    summary = summarize(results, cfg, device, targets, start, log)
    if json_out is not None:
        write_output_text(json_out, json.dumps(summary, indent=2) + "\n")
    return summary


def summarize(results: list[SeedResult], cfg: RunConfig, device: torch.device, targets: list[float], start: float,
              log=print) -> dict:
    """The summary of the seeds' results, printed and returned (what ``--json`` writes)."""
    seeds = [r.seed for r in results]
    summary = {
        "device": device_description(device),
        "torch": torch.__version__,
        "dataset": cfg.data.dataset,
        "model": cfg.model.name,
        "recipe": cfg.train.recipe,
        "seeds": seeds,
        "test_acc": [r.test_acc for r in results],
        "train_seconds": [r.train_seconds for r in results],
        "images_per_second": [r.images_per_second for r in results],
        "time_to": {str(t): [r.time_to[t] for r in results] for t in targets},
        "epochs_to": {str(t): [r.epochs_to[t] for r in results] for t in targets},
        "peak_memory_mb": peak_memory_mb(device),
        "wall_seconds": time.perf_counter() - start,
    }
    log("")
    log(f"device: {summary['device']}, torch {torch.__version__}")
    log(f"{cfg.data.dataset} / {cfg.model.name} / recipe {cfg.train.recipe}, {len(seeds)} seed(s): {seeds}"
        + ("; mean ± sample standard deviation over them" if len(seeds) > 1 else ""))
    kept = "final weights: no validation split" if cfg.data.val_fraction == 0 else "best-on-validation weights"
    log(f"test accuracy ({kept}): {mean_std([100 * a for a in summary['test_acc']])} %")
    log(f"training time: {mean_std(summary['train_seconds'])} s; throughput {mean_std(summary['images_per_second'])} "
        "images/s (training epochs incl. validation)")
    for t in targets:
        times = [x for x in summary["time_to"][str(t)] if x is not None]
        reached = f"{len(times)}/{len(seeds)} runs"
        log(f"time to {t:.2%} test accuracy: {mean_std(times) + ' s' if times else 'not reached'} ({reached})")
    log(f"peak memory: {summary['peak_memory_mb']:.0f} MiB ({'CUDA allocated' if device.type == 'cuda' else 'process RSS'})")
    return summary
