"""``cifarlens report``, ``cifarlens robustness``, ``cifarlens baselines`` and ``cifarlens compare``."""

from __future__ import annotations

import math


def cmd_report(args) -> int:
    from cifarlens.api import load_run
    from cifarlens.errors import CifarlensError
    from cifarlens.report import write_report
    from cifarlens.runs import RunDir

    if args.budget is not None and not 0 < args.budget < math.inf:  # nan and inf too
        raise CifarlensError(f"--budget must be a number of seconds > 0, got {args.budget:g}")
    if args.robustness_images is not None and args.robustness_images < 0:
        raise CifarlensError(f"--robustness-images must be >= 0 (0: every test image), got {args.robustness_images}")
    with RunDir(args.run_dir).claimed():  # no training beside it changes the weights it describes
        path = write_report(load_run(args.run_dir, device=args.device), data_dir=args.data_dir,
                            robustness=not args.no_robustness, gradcam=not args.no_gradcam,
                            max_robustness_images=args.robustness_images, budget_s=args.budget,
                            log=lambda line: print(line, flush=True))
    print(f"report written to {path}")
    return 0


def cmd_robustness(args) -> int:
    from cifarlens.api import load_run
    from cifarlens.errors import CifarlensError
    from cifarlens.report import cifar_c
    from cifarlens.runs import RunDir

    severities = _int_list(args.severities, "--severities")
    if any(not 1 <= s <= cifar_c.MAX_SEVERITY for s in severities):
        raise CifarlensError(f"--severities must lie in 1..{cifar_c.MAX_SEVERITY}, got {args.severities}")
    if args.images is not None and args.images < 1:
        raise CifarlensError(f"--images must be >= 1, got {args.images}")
    names = None
    if args.corruptions is not None:
        names = list(dict.fromkeys(n.strip() for n in args.corruptions.split(",") if n.strip()))
        if not names:
            raise CifarlensError(f"--corruptions expects comma-separated names (all of them without the flag); "
                                 f"got {args.corruptions!r}")
    unknown = [n for n in names or [] if n not in cifar_c.list_corruptions()]
    if unknown:
        from cifarlens.registry import unknown_name

        raise CifarlensError(unknown_name("corruption", unknown[0], cifar_c.list_corruptions()))
    reference = cifar_c.load_reference(args.reference) if args.reference else None  # before the long part
    with RunDir(args.run_dir).claimed():  # its robustness.json describes the weights it loads
        run = load_run(args.run_dir, device=args.device)
        bundle = run.data(args.data_dir)
        test, own = run.checked_split("test", args.data_dir, bundle)
        data = cifar_c.test_data(run.info.classes, bundle.fingerprints["test"])
        if args.reference:
            cifar_c.check_reference_data(args.reference, data)
        # other test images than the run's: their result apart, as evaluate keeps its figures (the report reads
        # RUN/robustness.json as the run's own)
        folder = run.path if own else RunDir(run.path).other_data("test", bundle.fingerprints)
        common = dict(severities=severities, corruptions=names, max_images=args.images, seed=args.seed)
        if args.corruptions_dir:  # files the model cannot take: an error now
            source, cdir = cifar_c.official_files(run, args.corruptions_dir)
            available = cdir.per_severity
        else:
            source, available = cifar_c.GENERATED, len(test)
        if reference is not None:  # the same protocol, or the long part would be thrown away
            cifar_c.check_reference(reference, source=source, num_images=min(args.images or available, available),
                                    severities=severities, seed=args.seed, corruptions=names)
        if args.corruptions_dir:
            print(f"reading the CIFAR-C files in {args.corruptions_dir}", flush=True)
            table = cifar_c.evaluate_files(run, args.corruptions_dir, clean_split=test,
                                           log=lambda line: print(line, flush=True), **common)
        else:
            n = min(args.images or len(test), len(test))
            grid = cifar_c.grid_text(len(names or cifar_c.list_corruptions()), len(severities))
            print(f"generating {grid} of {n:,} test images (seed {args.seed})", flush=True)
            table = cifar_c.evaluate_generated(run, test, **common)
        errors = cifar_c.corruption_errors(table, reference) if reference else None
        print(cifar_c.format_result(table, errors), end="")
        path = cifar_c.write_result(folder, table, errors, args.reference, data, log=print)
        print(f"written to {path}")
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    from cifarlens.errors import CifarlensError

    try:
        values = list(dict.fromkeys(int(v) for v in text.split(",") if v.strip()))  # in order, each once
    except ValueError:
        values = []
    if not values:
        raise CifarlensError(f"{flag} expects comma-separated integers, e.g. 1,3,5; got {text!r}")
    return values


def cmd_baselines(args) -> int:
    from cifarlens.report.baselines import format_baselines

    print(format_baselines(args.dataset), end="")
    return 0


def cmd_compare(args) -> int:
    from cifarlens.report.compare import compare_runs

    print(compare_runs(args.run_dirs), end="")
    return 0


def add_commands(sub) -> None:
    from cifarlens.config_flags import braced, one_of
    from cifarlens.report.baselines import DATASETS

    p = sub.add_parser("report", help="write a self-contained report.html into a run folder",
                       description="Write RUN_DIR/report.html (from the run's saved test predictions when they are up to date, "
                                   "else predicted again): config, "
                                   "curves, metrics, calibration, Grad-CAM gallery, robustness and the "
                                   "published results table.")
    p.add_argument("run_dir")
    p.add_argument("--data-dir", help="where the dataset is now (default: the run's own data_dir)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--no-robustness", action="store_true", help="skip accuracy under corruptions")
    p.add_argument("--no-gradcam", action="store_true", help="skip the Grad-CAM gallery")
    p.add_argument("--robustness-images", type=int, metavar="N",
                   help="robustness on a seeded subset of at most N test images (default 2000; 0: all)")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="keep the report within about SECONDS by shrinking the robustness subset, as the "
                        "report written after training does (default: no limit, the full report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("robustness", help="accuracy under the 15 CIFAR-10-C corruptions x 5 severities, and mCE",
                       description="The CIFAR-10-C protocol (Hendrycks & Dietterich 2019) on a run's test split: "
                                   "corruptions generated here (seeded), or the official .npy files of CIFAR-10-C / "
                                   "CIFAR-100-C with --corruptions-dir. Prints accuracy per corruption and severity, "
                                   "the mean corruption accuracy and, with --reference, the mCE and relative mCE; "
                                   "writes RUN_DIR/robustness.json (per-class accuracies included).")
    p.add_argument("run_dir")
    p.add_argument("--corruptions-dir", metavar="DIR",
                   help="the official files (labels.npy and <corruption>.npy, 5 x 10,000 images each)")
    p.add_argument("--reference", metavar="RUN_DIR|FILE",
                   help="a run evaluated the same way before (its robustness.json): adds CE, mCE and relative mCE")
    p.add_argument("--images", type=int, metavar="N", help="a seeded subset of N test images (default: all)")
    p.add_argument("--severities", default="1,2,3,4,5", help="comma-separated, 1..5 (default all five)")
    p.add_argument("--corruptions", metavar="NAMES", help="comma-separated subset of the 15 (default all)")
    p.add_argument("--seed", type=int, default=0, help="noise and subset seed (default 0)")
    p.add_argument("--data-dir", help="where the run's dataset is now (default: the run's own data_dir)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_robustness)

    p = sub.add_parser("baselines", help="published test accuracies (with citations) for the built-in datasets")
    p.add_argument("--dataset", type=one_of("dataset", list(DATASETS)), metavar=braced(list(DATASETS)),
                   help="only this dataset (default: all)")
    p.set_defaults(func=cmd_baselines)

    p = sub.add_parser("compare", help="several runs side by side: metrics, budget, config differences")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.set_defaults(func=cmd_compare)
