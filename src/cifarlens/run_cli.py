"""``cifarlens evaluate``, ``calibrate`` and ``predict``: the commands that use a trained run."""

from __future__ import annotations

import json
import sys

from cifarlens.errors import CifarlensError
from cifarlens.io import check_output_file

PREDICT_BATCH = 64  # images per forward pass of predict


def add_calibration_flag(p) -> None:
    p.add_argument("--no-calibration", action="store_true",
                   help="raw softmax probabilities: ignore the run's fitted temperature")


def add_commands(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a run's best weights on the test (or val) split")
    p.add_argument("run_dir")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--data-dir", help="where the dataset is now (default: the run's own data_dir)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    add_calibration_flag(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("calibrate", help="fit a run's temperature on its validation split (train does it already)")
    p.add_argument("run_dir")
    p.add_argument("--data-dir", help="where the dataset is now (default: the run's own data_dir)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("predict", help="top-k classes of image files")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="+", help="image files, or folders of them (read in sorted order, any depth)")
    p.add_argument("--topk", type=int, help="classes shown per image (default 5, or all of fewer)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--csv", metavar="FILE", help="also write one row per image to FILE: image, label_1, prob_1, "
                   "..., label_K, prob_K, temperature (empty: uncalibrated), error (for a spreadsheet or pandas)")
    p.add_argument("--device", default="cpu", help="cpu (default: a few images need no GPU), auto, cuda or cuda:N")
    add_calibration_flag(p)
    p.set_defaults(func=cmd_predict)


def cmd_evaluate(args) -> int:
    from cifarlens.api import evaluate_run

    _warn_if_unfinished(args.run_dir, claims=True)
    result = evaluate_run(args.run_dir, split=args.split, data_dir=args.data_dir, device=args.device,
                          calibrated=not args.no_calibration, must_write=False)
    line = f"{args.split}: accuracy {result['accuracy']:.2%}  f1_macro {result['f1_macro']:.4f}"
    if "top5_accuracy" in result:
        line += f"  top5 {result['top5_accuracy']:.2%}"
    cal = result.get("calibration")
    if cal:
        line += (f"  ECE {cal['ece']:.2%} (temperature {cal['temperature']:.3f}; {cal['ece_uncalibrated']:.2%} without)"
                 if cal["calibrated"] else f"  ECE {cal['ece']:.2%} (uncalibrated)")
    if "not_written" in result:  # the figures are shown; the error says what was not saved
        print(line + f"  ({result['split_size']} images)")
        print(f"cifarlens: error: results not saved in {args.run_dir}: {result['not_written']}", file=sys.stderr)
        return 2
    if "written_to" in result:
        print(line + f"  ({result['split_size']} images; not the run's own {args.split} images: written to "
              f"{result['written_to']}, the run's own figures kept)")
    else:
        print(line + f"  ({result['split_size']} images; written to {args.run_dir})")
    return 0


def cmd_calibrate(args) -> int:
    from cifarlens.api import calibrate_run

    _warn_if_unfinished(args.run_dir, claims=True)
    fit = calibrate_run(args.run_dir, data_dir=args.data_dir, device=args.device, log=print, require_images=True)
    print(f"recorded in {args.run_dir}/run.json; evaluate, predict, serve and export use it "
          f"(re-evaluate the test split with: cifarlens evaluate {args.run_dir})")
    from pathlib import Path

    from cifarlens.onnxfile import ONNX_FILE, onnx_is_current

    if (Path(args.run_dir) / ONNX_FILE).is_file() and not onnx_is_current(args.run_dir, temperature=fit.temperature):
        print(f"note: {Path(args.run_dir) / ONNX_FILE} holds the temperature before (it is in its graph): "
              f"`cifarlens export {args.run_dir} --format onnx` writes it again (serve --backend onnx does it itself)")
    return 0


def calibration_words(info: dict) -> str:
    """"calibrated probabilities (temperature 1.234)" or "uncalibrated softmax probabilities"."""
    if info["calibrated"]:
        return f"calibrated probabilities (temperature scaling, T = {info['temperature']:.3f})"
    return "uncalibrated softmax probabilities"


def cmd_predict(args) -> int:
    from cifarlens.api import load_run
    from cifarlens.runs import RunDir, refuse_runs_file

    given, args.topk = args.topk is not None, 5 if args.topk is None else args.topk
    if args.topk < 1:
        raise CifarlensError(f"topk must be a whole number >= 1, got {args.topk}")
    RunDir(args.run_dir).require_run()  # first: `predict IMAGE RUN` (swapped) warned of the run's files as images
    paths = image_paths(args.images)
    csv_path = check_output_file(args.csv, "--csv", paths) if args.csv is not None else None
    if csv_path is not None:  # e.g. RUN/predictions.csv, a run's own evaluation: not replaced
        refuse_runs_file(csv_path, "--csv", default="no table, the predictions printed")
    run = load_run(args.run_dir, device=args.device, calibrated=not args.no_calibration)
    _warn_if_unfinished(run.path)
    if given and args.topk > len(run.info.classes):  # (the default 5 of a 3-class run: all 3, said by nothing)
        print(f"cifarlens: warning: --topk {args.topk} is more than the run's {len(run.info.classes)} classes: "
              "all of them are shown", file=sys.stderr)
    results, failed = [], 0
    for start in range(0, len(paths), PREDICT_BATCH):
        chunk = paths[start : start + PREDICT_BATCH]
        try:
            results += [(image, pred, None) for image, pred in zip(chunk, run.predict(chunk, topk=args.topk))]
            continue
        except CifarlensError:
            if len(paths) == 1:
                raise  # one image: its error is the answer
        for image in chunk:  # one of them is unreadable: each alone, so that it names itself and the rest go on
            try:
                results.append((image, run.predict([image], topk=args.topk)[0], None))
            except CifarlensError as err:
                failed += 1
                results.append((image, None, str(err)))
                print(f"cifarlens: error: {err}", file=sys.stderr)
    if csv_path:  # before printing: a reader that stops early (| head) ends the printing, not the file
        _write_csv(csv_path, results, run.calibration_info())
    if args.json:
        print(json.dumps([{"image": image, "error": error} if error else
                          {"image": image, **pred.as_dict(), **run.calibration_info()}
                          for image, pred, error in results], indent=2))
    else:
        print(f"({calibration_words(run.calibration_info())})")
        for image, pred, error in results:
            if error is None:
                print(image if str(image).isprintable() else repr(str(image)))  # a newline in a name: one line
                for label, prob in zip(pred.labels, pred.probs):
                    print(f"  {prob:7.2%}  {label}")
    if failed:
        print(f"cifarlens: {failed} of {len(paths)} images could not be read (named above)", file=sys.stderr)
        return 1
    return 0


def _warn_if_unfinished(run_dir, claims: bool = False) -> None:
    """The run's unfinished_warning on stderr; for a command that ``claims`` the folder (evaluate,
    calibrate), not while another process holds it: the claim's refusal is the answer then."""
    from cifarlens.runs import RunDir

    run = RunDir(run_dir)
    if run.is_run() and not (claims and run.in_use()):  # else the command's own error says what is wrong
        unfinished = run.unfinished_warning()
        if unfinished:
            print(f"cifarlens: warning: {unfinished}", file=sys.stderr)


def image_paths(items: list[str]) -> list[str]:
    """The files given, with each folder replaced by the image files under it (warnings on stderr)."""
    from cifarlens.images import expand_folders

    paths, warnings = expand_folders(items)
    for warning in warnings:
        print(f"cifarlens: warning: {warning}", file=sys.stderr)
    return paths


def _write_csv(path, results, calibration: dict) -> None:
    """One row per image, its classes in order of probability, then the run's temperature (empty:
    raw softmax probabilities); an image that could not be read has only its error."""
    import csv
    import io

    from cifarlens.io import write_output_text

    k = max((len(pred.labels) for _, pred, _ in results if pred is not None), default=0)
    temperature = f"{calibration['temperature']:.6g}" if calibration.get("calibrated") else ""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["image", *(f"{name}_{i}" for i in range(1, k + 1) for name in ("label", "prob")),
                     "temperature", "error"])
    for image, pred, error in results:
        cells = [] if pred is None else [c for label, p in zip(pred.labels, pred.probs) for c in (label, f"{p:.6f}")]
        writer.writerow([image, *cells, *[""] * (2 * k - len(cells)), temperature, error or ""])
    write_output_text(path, text.getvalue())
