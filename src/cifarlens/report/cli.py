"""``cifarlens report``, ``cifarlens baselines`` and ``cifarlens compare``."""

from __future__ import annotations


def cmd_report(args) -> int:
    from cifarlens.report import write_report

    path = write_report(args.run_dir, data_dir=args.data_dir, device=args.device,
                        robustness=not args.no_robustness, gradcam=not args.no_gradcam)
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
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("baselines", help="published test accuracies (with citations) for the built-in datasets")
    p.add_argument("--dataset", choices=list(DATASETS), help="only this dataset (default: all)")
    p.set_defaults(func=cmd_baselines)

    p = sub.add_parser("compare", help="several runs side by side: metrics, budget, config differences")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.set_defaults(func=cmd_compare)
