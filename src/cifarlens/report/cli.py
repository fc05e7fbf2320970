"""``cifarlens report``, ``cifarlens baselines`` and ``cifarlens compare``."""

from __future__ import annotations


def cmd_report(args) -> int:
    from cifarlens.api import load_run
    from cifarlens.errors import CifarlensError
    from cifarlens.report import write_report

    if args.budget is not None and args.budget <= 0:
        raise CifarlensError(f"--budget must be a number of seconds > 0, got {args.budget:g}")
    if args.robustness_images is not None and args.robustness_images < 0:
        raise CifarlensError(f"--robustness-images must be >= 0 (0: every test image), got {args.robustness_images}")
    path = write_report(load_run(args.run_dir, device=args.device), data_dir=args.data_dir,
                        robustness=not args.no_robustness, gradcam=not args.no_gradcam,
                        max_robustness_images=args.robustness_images, budget_s=args.budget,
                        log=lambda line: print(line, flush=True))
    print(f"report written to {path}")
    return 0


def cmd_baselines(args) -> int:
    from cifarlens.report.baselines import format_baselines

    print(format_baselines(args.dataset), end="")
    return 0


def cmd_compare(args) -> int:
    from cifarlens.report.compare import compare_runs

    print(compare_runs(args.run_dirs), end="")
    return 0


def add_commands(sub) -> None:
    from cifarlens.report.baselines import DATASETS

    p = sub.add_parser("report", help="write a self-contained report.html into a run folder",
                       description="Recompute the test predictions of a run and write RUN_DIR/report.html: config, "
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

    p = sub.add_parser("baselines", help="published test accuracies (with citations) for the built-in datasets")
    p.add_argument("--dataset", choices=list(DATASETS), help="only this dataset (default: all)")
    p.set_defaults(func=cmd_baselines)

    p = sub.add_parser("compare", help="several runs side by side: metrics, budget, config differences")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.set_defaults(func=cmd_compare)
