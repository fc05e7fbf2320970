"""``cifarlens tune``: hyperparameter search (see cifarlens.tune)."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from cifarlens.errors import CifarlensError, Terminated


def add_commands(sub) -> None:
    from cifarlens.config_flags import add_config_flags

    p = sub.add_parser(
        "tune", help="hyperparameter search with Optuna (TPE sampler, pruning on validation accuracy)",
        description="Search hyperparameters on the validation split (the test split is never used). The base "
                    "config comes from --config and the flags, as for train; every trial overlays it with values "
                    "sampled from the search space. Re-running the same command continues the study.")
    add_config_flags(p)
    p.add_argument("--trials", type=int, default=20,
                   help="finished (complete + pruned) trials the study should have, over all workers (default 20)")
    p.add_argument("--timeout", type=float, metavar="S", help="start no new trial after S seconds")
    p.add_argument("--storage", metavar="URL",
                   help="sqlite:///FILE.db (default OUT/study.db), journal:FILE, or a database URL such as "
                        "postgresql://USER:PASS@HOST/DB that workers on several machines share")
    p.add_argument("--study", help="study name (default DATASET-MODEL)")
    p.add_argument("--space", metavar="FILE.yaml", help="search space (default: see --print-space)")
    p.add_argument("--print-space", action="store_true", help="print the default search space for the model and exit")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median")
    p.add_argument("--pruner-startup", type=int, default=3, metavar="N",
                   help="completed trials before the median pruner judges others (default 3)")
    p.add_argument("--min-epochs", type=int, default=1, metavar="E",
                   help="no trial is pruned before it has trained E epochs (default 1)")
    p.add_argument("--sampler-seed", type=int, metavar="S",
                   help="seed of the TPE sampler (default: random); --seed is the training seed")
    p.add_argument("--workers", type=int, default=1, metavar="K",
                   help="run K worker processes on this machine (K-1 extra), all on the same storage")
    p.add_argument("--out", help="study folder: trials, study.db, best.yaml, trials.csv, plots "
                                 "(default runs/tune-STUDY)")
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--no-summary", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    from cifarlens.config_flags import config_from_args
    from cifarlens.tune.space import default_space, load_space

    cfg = config_from_args(args)
    space = load_space(args.space) if args.space else None
    if args.print_space:
        from cifarlens.tune.search import pin_budget

        space = space or default_space(pin_budget(cfg))
        print(space.to_yaml(f"cifarlens tune search space ({space.source}); edit and pass with --space FILE"), end="")
        return 0
    if args.workers < 1:
        raise CifarlensError(f"--workers must be >= 1, got {args.workers}")
    from cifarlens.tune.search import Tuner, default_study_name, pin_budget

    study = args.study or default_study_name(pin_budget(cfg))
    out = Path(args.out or f"runs/tune-{study}")
    tuner = Tuner(cfg, out, trials=args.trials, space=space, storage=args.storage, study_name=study,
                  timeout=args.timeout, pruner=args.pruner, pruner_startup=args.pruner_startup,
                  min_epochs=args.min_epochs, sampler_seed=args.sampler_seed, worker_index=args.worker_index)
    start = time.monotonic()
    try:
        tuner.open()
        with _share_cpu_threads(args.workers) as threads:
            workers = [_start_worker(tuner, k, threads) for k in range(1, args.workers)]
            try:
                tuner.work()
                failed = _wait(workers, stop=False)
            except BaseException:  # SIGTERM while waiting for them too: the workers end with this one
                _wait(workers, stop=True)
                raise
        if not args.no_summary:
            tuner.finish()
    except KeyboardInterrupt as err:
        what = "terminated" if isinstance(err, Terminated) else "interrupted"
        print(f"cifarlens: {what}; run the same command again to continue study {study} "
              f"({time.monotonic() - start:.0f} s)", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except CifarlensError:
        raise
    except Exception as err:
        lost = _storage_failure(err) if tuner.study is not None else None  # opened, then lost
        if lost is None:
            raise
        where = tuner.storage.display
        raise CifarlensError(f"lost the study's storage {where} ({lost}); run the same command again once it is "
                             f"back to continue study {study}") from None
    if failed:
        raise CifarlensError("; ".join(failed))
    return 0


def _storage_failure(err: BaseException) -> str | None:
    """The first line of the database error behind ``err`` (Optuna wraps it, and may raise another
    error while handling it), or None when no storage error is in its chain."""
    import optuna
    import sqlalchemy

    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    database = [e for e in chain if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))]
    if database:  # the driver's own words
        lines = str(database[0].orig).strip().splitlines()
        return lines[0][:200] if lines else type(database[0].orig).__name__
    storage = [e for e in chain if isinstance(e, optuna.exceptions.StorageInternalError)]
    return (str(storage[0]).strip().splitlines() or ["storage error"])[0][:200] if storage else None


@contextlib.contextmanager
def _share_cpu_threads(workers: int):
    """K workers on one machine split its CPU threads (unless OMP_NUM_THREADS says otherwise):
    K processes of all-cores thread pools on the same cores mostly wait for each other."""
    import torch

    if workers == 1 or "OMP_NUM_THREADS" in os.environ:
        yield None
        return
    threads, before = max(1, (os.cpu_count() or 1) // workers), torch.get_num_threads()
    print(f"{workers} workers with {threads} CPU thread(s) each", flush=True)
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def _start_worker(tuner, index: int, threads: int | None) -> tuple[subprocess.Popen, Path]:
    """Another worker process on the same storage, with the base config and space this one saved."""
    out = tuner.out
    cmd = [sys.executable, "-m", "cifarlens.cli", "tune", "--config", str(out / "base.yaml"),
           "--space", str(out / "space.yaml"), "--storage", tuner.storage.url, "--study", tuner.study_name,
           "--trials", str(tuner.trials), "--out", str(out), "--pruner", tuner.pruner_name,
           "--pruner-startup", str(tuner.pruner_startup), "--min-epochs", str(tuner.min_epochs),
           "--worker-index", str(index), "--no-summary"]
    if tuner.timeout is not None:
        cmd += ["--timeout", str(tuner.timeout)]
    if tuner.sampler_seed is not None:
        cmd += ["--sampler-seed", str(tuner.sampler_seed)]
    log = out / f"worker-{index}.log"
    with log.open("w") as f:
        env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    print(f"worker {index}: process {proc.pid}, output in {log}", flush=True)
    return proc, log


def _wait(workers: list[tuple[subprocess.Popen, Path]], *, stop: bool) -> list[str]:
    """Wait for the extra workers (ending them first when this one stops on an error); their failures."""
    failed = []
    for proc, log in workers:
        if stop:
            proc.terminate()
        if proc.wait() != 0 and not stop:
            failed.append(f"worker process {proc.pid} exited with code {proc.returncode}; see {log}")
    return failed
