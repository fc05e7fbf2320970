"""``cifarlens`` command line: parses flags and calls the library (cifarlens.api)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import warnings
from pathlib import Path

from cifarlens.config_flags import (
    FLAG_KEYS,
    add_config_flags,
    augment_levels,
    config_from_args,
    loggers,
    policy_names,
    resolve_choices_for,
)
from cifarlens.errors import CifarlensError, Terminated, format_warning, user_os_error
from cifarlens.io import stdout_to_devnull
from cifarlens.launcher import LAUNCHED, die_with_launcher, launch_torchrun, leave_error, resume_hint

def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model into a run folder",
                       description="Train a model. Precedence: recipe defaults < --config FILE < flags < --set.")
    add_config_flags(p)
    p.add_argument("--out", help="run folder (default runs/DATASET-MODEL-TIME)")
    p.add_argument("--resume", nargs="?", const=True, metavar="RUN_DIR",
                   help="continue a stopped run from its last checkpoint (RUN_DIR or --out)")
    p.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    p.add_argument("--no-report", action="store_true", help="skip report.html at the end (saves a little time; a resumed run remembers it)")
    p.add_argument("--logger", action="append", metavar="NAME",
                   help="log params, epochs, test metrics and files to: " + " or ".join(loggers())
                        + " (repeatable or comma-separated; needs pip install 'cifarlens[tracking]')")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow server or store (default: $MLFLOW_TRACKING_URI, "
                   "else MLflow's default: ./mlflow.db and ./mlruns/ in the working directory)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="data-parallel training on N processes of this machine (GPUs, or CPU with gloo) via "
                        "torchrun; for several machines call torchrun yourself (see docs/distributed.md)")

    p = sub.add_parser("bench", help="N seeded trainings: mean ± std accuracy, time to target, throughput",
                       description="Benchmark a dataset/model/recipe over several seeds (see cifarlens.bench).")
    add_config_flags(p)
    p.add_argument("--seeds", type=int, default=3,
                   help="number of seeded runs (default 3): seeds S..S+N-1, S = --seed (default 0)")
    p.add_argument("--targets", default="0.90,0.92,0.93",
                   help="test accuracies to time, comma-separated (default 0.90,0.92,0.93)")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    p.set_defaults(func=cmd_bench)


def cmd_train(args) -> int:
    from cifarlens.api import train

    if args.resume:
        out = args.out if args.resume is True else args.resume
        if out is None:
            raise CifarlensError("--resume needs the run folder: --resume RUN_DIR (or --out RUN_DIR)")
        if args.resume is not True and args.out is not None and Path(args.out) != Path(args.resume):
            raise CifarlensError(f"--resume {args.resume} continues that run folder; drop --out {args.out}")
        given = [f"--{f.replace('_', '-')}" for f in [*FLAG_KEYS, "time_budget"]
                 if f not in ("device", "data_dir") and getattr(args, f) is not None]
        if given or args.config or args.set or args.force:
            raise CifarlensError(
                f"--resume continues a run with its own config; drop {' '.join(given + (['--config'] if args.config else []) + (['--set'] if args.set else []) + (['--force'] if args.force else []))}"
            )
        from cifarlens.config import RunConfig, merge

        if args.nproc is not None:
            return launch_torchrun(args)
        cfg = merge(RunConfig(), {"train": {"device": args.device or "auto"}})
        train(cfg, out, resume=True, report=False if args.no_report else None,  # None: as the run started
              data_dir=args.data_dir)
        return 0
    cfg, why = resolve_choices_for(config_from_args(args, resolve=False))
    args.out = args.out or f"runs/{cfg.data.dataset}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.nproc is not None:
        return launch_torchrun(args)
    train(cfg, args.out, force=args.force, report=not args.no_report, choices=why)
    return 0


def cmd_bench(args) -> int:
    from cifarlens.bench import run_bench
    from cifarlens.io import check_output_file

    try:
        targets = [float(t) for t in args.targets.split(",") if t.strip()]
    except ValueError:
        raise CifarlensError(f"--targets must be comma-separated accuracies like 0.90,0.93, got {args.targets!r}") from None
    if args.seeds < 1 or not targets or not all(0 < t <= 1 for t in targets):
        raise CifarlensError("--seeds must be >= 1 and --targets fractions in (0, 1]")
    out = check_output_file(args.json, "--json") if args.json is not None else None  # before the trainings
    if out is not None:
        from cifarlens.runs import refuse_runs_file

        refuse_runs_file(out, "--json", default="no file, the summary printed")
    cfg = config_from_args(args, resolve=False)
    first = cfg.train.seed  # --seed, --set train.seed or --config's; e.g. --seed 1 --seeds 2: seeds 1 and 2
    run_bench(cfg, list(range(first, first + args.seeds)), targets, json_out=out)
    return 0


def cmd_list(args) -> int:
    from cifarlens.data import list_datasets
    from cifarlens.models import default_model, default_recipe, list_models
    from cifarlens.models.pretrained import list_pretrained
    from cifarlens.recipes import describe_recipe, list_recipes

    print("datasets:", ", ".join(list_datasets()))
    print(f"models (default: {default_model('cpu')} on a CPU, {default_model('cuda')} on a GPU), "
          "each with the recipe it gets without --recipe (CPU / GPU; finetune for a pretrained or --weights start):")
    for name in list_models():
        cpu, gpu = default_recipe(name, "cpu"), default_recipe(name, "cuda")
        print(f"  {name}: {cpu}" + (f" / {gpu}" if gpu != cpu else ""))
    print("pretrained (ImageNet weights with --pretrained):", ", ".join(list_pretrained()))
    print("augmentation levels (--augment):", ", ".join(augment_levels()),
          "| policies (--augment LEVEL+POLICY+..., or data.policies):", ", ".join(policy_names()))
    print("recipes (--recipe NAME; each fills the train.* settings not given, --set train.KEY=VALUE changes one; "
          "the settings a recipe leaves off are not shown):")
    for name in list_recipes():
        print(f"  {name}: {describe_recipe(name)}")
    return 0


# Other subcommands live beside the feature they expose; each module has
# ``add_commands(sub)`` that adds its parsers with ``set_defaults(func=...)``.
COMMAND_MODULES: tuple[str, ...] = ("cifarlens.serve.cli", "cifarlens.report.cli", "cifarlens.explain.cli",
                                    "cifarlens.tune.cli", "cifarlens.run_cli")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="cifarlens", description="Train, evaluate, explain and serve image "
                                     "classifiers on CIFAR-10/100, Fashion-MNIST and image folders.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)

    p = sub.add_parser("list", help="registered datasets, models and recipes")
    p.set_defaults(func=cmd_list)
    sub.choices["train"].set_defaults(func=cmd_train)
    return parser


# the flags, of any command, that name a file or folder (an empty one is refused)
PATH_FLAGS = ("resume", "out", "data_dir", "config", "weights", "csv", "json", "reference", "corruptions_dir",
              "space", "storage", "tracking_uri")


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports torch and the registries: about a second, before anything is done
        args = parser.parse_args(argv)
    except KeyboardInterrupt:  # Ctrl-C right after the command: it printed a traceback
        print("cifarlens: interrupted", file=sys.stderr)
        return 130
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 (held as surrogates) printed under a
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):  # UTF-8 locale: escaped,
            stream.reconfigure(errors="backslashreplace")  # not a UnicodeEncodeError (C locales pass its bytes on)
    previous = signal.signal(signal.SIGTERM, Terminated.raise_it)  # main() runs in the main thread, as the CLI does
    # a closed terminal (SIGHUP) stops a training as kill does, its run marked interrupted; not under
    # nohup, which ignores SIGHUP for the process it starts
    hangup = getattr(signal, "SIGHUP", None)
    hung_up = signal.signal(hangup, Terminated.raise_it) if hangup and signal.getsignal(hangup) is signal.SIG_DFL \
        else None
    die_with_launcher()  # a rank of `train --nproc N`: stopped if its launcher dies
    python_format, warnings.formatwarning = warnings.formatwarning, format_warning
    try:
        for name in PATH_FLAGS:  # e.g. --resume "$RUN" with RUN unset: not the current folder, nor "none given"
            if getattr(args, name, None) == "":
                raise CifarlensError(f"--{name.replace('_', '-')} is empty; give a path")
        return args.func(args)
    except CifarlensError as err:
        if not leave_error(str(err)):  # a rank of `train --nproc N` leaves it to the launcher, which prints it once
            print(f"cifarlens: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `cifarlens list | head`: the reader left; say nothing more
        stdout_to_devnull()
        return 141  # 128 + SIGPIPE, as a shell command ends
    except OSError as err:  # a read-only folder, a full disk: the machine's, not a bug
        text = user_os_error(err)
        if text is None:
            raise
        if not leave_error(text):
            print(f"cifarlens: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        code = 128 + err.signum if isinstance(err, Terminated) else 130  # 143 for SIGTERM, 129 for SIGHUP
        if os.environ.get("RANK", "0") != "0" or os.environ.get(LAUNCHED):
            return code  # one line for the run: rank 0's, or the --nproc launcher's (with --nproc)
        # what the run folder holds says what a stopped train can do; another command's --out is no run
        # folder ("nothing was written" after explain had written 6 files)
        hint = resume_hint(getattr(args, "out", None) or getattr(args, "resume", None)) \
            if getattr(args, "func", None) is cmd_train else ""
        print(f"cifarlens: {'terminated' if isinstance(err, Terminated) else 'interrupted'}{hint}", file=sys.stderr)
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)
        if hung_up is not None:
            signal.signal(hangup, hung_up)
        warnings.formatwarning = python_format


if __name__ == "__main__":
    code = main()
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        # a torchrun worker (``--nproc``), done with the process group and its files: leave before the
        # interpreter's finalization, where gloo's worker threads can abort the process (SIGABRT,
        # "terminate called without an active exception"; pytorch/pytorch#179291): 2 of 13 finished
        # two-process CPU runs here ended as "a training process failed" before this
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
