"""``cifarlens explain``: class activation maps for image files or images drawn from a split."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cifarlens.errors import CifarlensError

BATCH = 64  # images per explain() call: bounds memory on big models
GALLERY_MAX = 64  # overlays in gallery.png; per-image PNGs are written for all
# what explain writes (or removes) in its folder besides the panels and their maps
SUMMARIES = ("gallery.png", "class_average.png", "explanations.csv", "faithfulness.json")


def add_commands(sub) -> None:
    from cifarlens.explain.cam import list_methods

    p = sub.add_parser(
        "explain", help="class activation maps (Grad-CAM and others) for image files or a split",
        description="Explain a run's predictions with class activation maps. Give image files, or a split "
                    "selection: --mistakes N, --per-class N or --indices I,J,... (on --split, default test).",
    )
    p.add_argument("run_dir")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files, or folders of them, to explain")
    p.add_argument("--split", choices=["test", "val"], help="split to draw images from (default test)")
    p.add_argument("--mistakes", type=int, metavar="N", help="the N most confident mistakes on the split")
    p.add_argument("--per-class", type=int, metavar="N", help="the first N images of each class")
    p.add_argument("--indices", metavar="I,J,...", help="these positions in the split, e.g. 1,5,9")
    p.add_argument("--method", default="gradcam", help=f"one of: {', '.join(list_methods())} (default gradcam)")
    p.add_argument("--target", metavar="CLASS", help="explain this class (name or index) instead of the prediction")
    p.add_argument("--layer", help="target layer, a dotted module name (default: the model's cam_layer)")
    p.add_argument("--save-maps", action="store_true", help="also write maps/NAME.npy (float32 in [0, 1], at the model's input size, e.g. 32x32, not the image file's)")
    p.add_argument("--faithfulness", action="store_true",
                   help="score every method by deletion/insertion AUC against random maps (faithfulness.json)")
    p.add_argument("--out", help="output folder (default RUN_DIR/explain/METHOD)")
    p.add_argument("--data-dir", help="where the dataset is now (default: the run's own data_dir)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or cuda:N")
    p.set_defaults(func=cmd_explain)


@dataclass
class Selection:
    images: Tensor  # (N, C, H, W) uint8
    labels: Tensor | None  # (N,) int64, None for image files
    names: list[str]  # file stems for the outputs
    what: str  # for messages, e.g. "5 most confident mistakes on test"
    sources: list[str] | None = None  # where each image came from: its file, or "test #12" (explanations.csv)
    unreadable: int = 0  # image files left out, each named on stderr
    other_data: Path | None = None  # where results on a split of other images than the run's go (--data-dir)


def cmd_explain(args) -> int:
    from cifarlens.api import load_run
    from cifarlens.runs import RunDir
    from cifarlens.explain.cam import METHODS, default_layer, get_layer, resolve_class

    selectors = [f for f in ("mistakes", "per_class", "indices") if getattr(args, f) is not None]
    if args.images and (selectors or args.split):
        raise CifarlensError("give image files or a split selection (--split/--mistakes/--per-class/--indices), "
                             "not both")
    if not args.images and not selectors:
        raise CifarlensError("nothing to explain: give image files, or --mistakes N, --per-class N "
                             "or --indices I,J,...")
    if len(selectors) > 1:
        raise CifarlensError(f"choose one of --mistakes, --per-class, --indices (got {len(selectors)})")
    for flag in ("mistakes", "per_class"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CifarlensError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    spec = METHODS.get(args.method)  # fail on a bad name before loading anything
    if args.target is not None and not spec.class_specific:
        print(f"cifarlens: warning: {args.method} gives the same map for every class; --target changes only "
              "the captions", file=sys.stderr)

    if args.layer is not None and not args.layer.strip():
        raise CifarlensError("--layer needs a layer name (leave it out for the model's default layer)")
    run = load_run(args.run_dir, device=args.device)
    target = resolve_class(args.target, run.classes)
    layer = args.layer or default_layer(run.model)
    get_layer(run.model, layer)
    selection = _files(run, args.images) if args.images else _from_split(run, args)
    if len(selection.images) == 0:
        print(f"nothing to explain: {selection.what}")
        return 0
    # other images than the run's: apart, as evaluate keeps their figures (a panel test_00181.png replaced the run's own)
    base = selection.other_data or run.path
    out = Path(args.out) if args.out else base / "explain" / args.method
    if out.exists() and not out.is_dir():
        raise CifarlensError(f"--out {out} is a file; explain writes a folder of figures")
    for folder in (out.resolve(), *out.resolve().parents[:3]):  # an image named curves.jpg would replace curves.png
        if RunDir(folder).is_run() and out.resolve().relative_to(folder).parts[:1] != ("explain",):
            raise CifarlensError(f"--out {out} is {'the run folder ' if folder == out.resolve() else 'in the run '}"
                                 f"{folder}; explain writes a folder of figures of its own (default: "
                                 f"{run.path / 'explain' / args.method}, or any folder outside a run)")

    _refuse_replacing(out, selection)
    explanation = _explain_all(run, selection.images, args.method, target, layer)
    written = write_explanations(out, run.classes, selection, explanation, save_maps=args.save_maps)
    if args.faithfulness:
        written.append(_write_faithfulness(out, run, selection, target, layer, explanation))
    else:  # an earlier selection's scores stayed beside this one's panels, as if about them
        (out / "faithfulness.json").unlink(missing_ok=True)
    h, w = explanation.layer_size
    print(f"{args.method} at layer {explanation.layer} ({h}x{w} maps) for {selection.what}; "
          f"{int(explanation.empty.sum())} empty; written to {out}:")
    for line in written:
        print(f"  {line}")
    if selection.unreadable:
        print(f"cifarlens: {selection.unreadable} of {selection.unreadable + len(selection.images)} images could "
              "not be read (named above)", file=sys.stderr)
        return 1
    return 0


def _explain_all(run, images: Tensor, method: str, target, layer: str, *, warn: bool = True):
    """explain_run in batches; a coarse-layer warning becomes one line on stderr (if ``warn``)."""
    from cifarlens.explain.cam import CoarseMapWarning, Explanation, explain_run

    parts = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CoarseMapWarning)
        for start in range(0, len(images), BATCH):
            chunk = images[start : start + BATCH]
            t = target[start : start + BATCH] if isinstance(target, list) else target
            parts.append(explain_run(run, chunk, method=method, target=t, layer=layer))
    coarse = [str(w.message) for w in caught if issubclass(w.category, CoarseMapWarning)]
    for message in dict.fromkeys(coarse) if warn else ():
        print(f"cifarlens: warning: {message}", file=sys.stderr)
    for w in caught:
        if not issubclass(w.category, CoarseMapWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return Explanation.cat(parts)


def _files(run, items: list[str]) -> Selection:
    from cifarlens.images import expand_folders, load_image

    paths, notes = expand_folders(items)  # a folder: the images under it, as predict reads it
    for note in notes:
        print(f"cifarlens: warning: {note}", file=sys.stderr)
    loaded, readable = [], []
    for p in paths:  # an unreadable file is named and left out, as predict does; one file alone: its error
        try:
            loaded.append(load_image(p, run.info.in_channels, run.info.image_size))
            readable.append(p)
        except CifarlensError as err:
            if len(paths) == 1:
                raise
            print(f"cifarlens: error: {err}", file=sys.stderr)
    if paths and not loaded:
        raise CifarlensError(f"none of the {len(paths)} image files could be read (named above)")
    unreadable, paths = len(paths) - len(readable), readable
    images = torch.stack(loaded) if loaded else torch.empty(0, run.info.in_channels, 1, 1, dtype=torch.uint8)
    names, seen = [], {"gallery", "class_average"}  # the summary figures' names: a panel never overwrites them
    for p in paths:
        # a file name's control characters (a newline) would split the listing's lines
        stem = "".join(c if c.isprintable() else "_" for c in Path(p).stem) or "image"
        name, k = stem, 2
        while name in seen:  # two files with one name in different folders, or a summary's name
            name, k = f"{stem}-{k}", k + 1
        seen.add(name)
        names.append(name)
    return Selection(images, None, names, f"{len(paths)} image file(s)", [str(p) for p in paths], unreadable)


def _from_split(run, args) -> Selection:
    from cifarlens.runs import RunDir

    split = args.split or "test"
    bundle = run.data(args.data_dir)
    data, own = run.checked_split(split, args.data_dir, bundle)
    other = None if own else RunDir(run.path).other_data(split, bundle.fingerprints)
    if len(data) == 0:
        raise CifarlensError(f"{run.path} has no {split} images" + (
            " (data.val_fraction 0); explain --split test" if split == "val" else ""))
    if args.indices is not None:
        index = _parse_indices(args.indices, len(data))
        what = f"{len(index)} image(s) of {split}"
    elif args.per_class is not None:
        index = torch.cat([(data.labels == k).nonzero()[: args.per_class, 0] for k in range(len(run.classes))])
        what = f"up to {args.per_class} image(s) per class of {split}"
    else:
        index = _confident_mistakes(run, data, args.mistakes)
        what = f"the {len(index)} most confident mistake(s) on {split}"
    index = index.long().tolist()
    sources = [f"{split} #{i}" + (f" ({data.files[i]})" if data.files else "") for i in index]
    return Selection(data.images[index], data.labels[index], [f"{split}_{i:05d}" for i in index], what, sources,
                     other_data=other)


def _parse_indices(text: str, size: int) -> Tensor:
    try:
        values = list(dict.fromkeys(int(v) for v in text.replace(" ", "").split(",") if v))  # in order, each once
    except ValueError:
        raise CifarlensError(f"--indices takes comma-separated integers, e.g. 1,5,9; got {text!r}") from None
    bad = [v for v in values if not 0 <= v < size]
    if not values or bad:
        raise CifarlensError(f"--indices must lie in 0..{size - 1} for this split; got {bad or text!r}")
    return torch.tensor(values)


def _confident_mistakes(run, data, n: int) -> Tensor:
    from cifarlens.api import EVAL_BATCH_SIZE
    from cifarlens.data.pipeline import make_loader
    from cifarlens.engine import Precision, predict_logits

    loader = make_loader(data, run.info, EVAL_BATCH_SIZE, run.device)
    # with the run's TTA and temperature: the mistakes evaluate counted, at the confidence predict gives
    logits, labels = predict_logits(run.model, loader, Precision(run.device), run.tta, run.tta_translate)
    confidence, prediction = run.scale(logits).softmax(dim=1).max(dim=1)
    wrong = (prediction != labels).nonzero()[:, 0]
    return wrong[confidence[wrong].argsort(descending=True, stable=True)][:n]


def write_explanations(out: Path, classes, selection: Selection, explanation, *, save_maps: bool) -> list[str]:
    """Per-image panels, gallery.png, class_average.png (for labelled images) and maps/*.npy."""
    import numpy as np

    from cifarlens.explain.figures import (
        caption,
        class_average_maps,
        plot_class_averages,
        plot_explanation,
        plot_gallery,
    )
    from cifarlens.io import atomic_write

    ex = explanation
    labels = selection.labels
    _remove_earlier_panels(out, {f"{name}.png" for name in selection.names})
    # the list before the panels: an explain stopped half-way (Ctrl-C) leaves no panel the list does not
    # name, so the next explain into ``out`` removes them all (some it names may not be written yet)
    rows = [[f"{name}.png", (selection.sources or selection.names)[i], "" if labels is None else classes[int(labels[i])],
             classes[int(ex.predictions[i])], f"{float(ex.confidence[i]):.6f}", classes[int(ex.targets[i])],
             int(bool(ex.empty[i]))] for i, name in enumerate(selection.names)]
    atomic_write(out / "explanations.csv", lambda tmp: _write_rows(tmp, rows))
    captions = []
    for i, name in enumerate(selection.names):
        true = None if labels is None else int(labels[i])
        text = caption(classes, pred=int(ex.predictions[i]), confidence=float(ex.confidence[i]),
                       target=int(ex.targets[i]), true=true)
        captions.append(text.replace("  ", "\n"))
        plot_explanation(selection.images[i], ex.maps[i], out / f"{name}.png", title=text, empty=bool(ex.empty[i]))
    written = [f"{len(selection.names)} per-image PNGs ({selection.names[0]}.png, ...)"]
    n = min(len(selection.names), GALLERY_MAX)
    plot_gallery(selection.images[:n], ex.maps[:n], captions[:n], out / "gallery.png", empty=ex.empty[:n],
                 title=f"{ex.method} at {ex.layer}: {selection.what}" + (f" (first {n})" if n < len(captions) else ""))
    written.append("gallery.png")
    if labels is not None:
        averages, counts = class_average_maps(ex.maps, ex.targets, len(classes), ex.empty)
        plot_class_averages(averages, counts, classes, out / "class_average.png",
                            title=f"average {ex.method} map per explained class ({selection.what})")
        written.append("class_average.png")
    else:  # image files have no labels: an earlier selection's averages stayed beside this one's gallery
        (out / "class_average.png").unlink(missing_ok=True)
    written.append("explanations.csv (each panel: its image's source, label, prediction, the class explained)")
    if save_maps:
        for i, name in enumerate(selection.names):
            cam = ex.maps[i].numpy().astype(np.float32)  # (H, W) at input resolution, in [0, 1]
            atomic_write(out / "maps" / f"{name}.npy", lambda tmp, cam=cam: _save_npy(tmp, cam))
        written.append(f"maps/*.npy ({len(selection.names)} float32 arrays of {tuple(ex.maps.shape[1:])})")
    else:  # an earlier --save-maps's map under a panel's name is another image's (or class's) map now
        for name in selection.names:
            (out / "maps" / f"{name}.npy").unlink(missing_ok=True)
    return written


def _listed_panels(out: Path) -> list[str] | None:
    """The panels an earlier explain into ``out`` listed in its explanations.csv (plain ``.png`` names
    in ``out`` itself, as explain writes them); None where there is no such list."""
    import csv

    try:
        with (out / "explanations.csv").open(newline="", encoding="utf-8") as f:
            panels = [row["panel"] for row in csv.DictReader(f)]
    except (OSError, ValueError, KeyError, TypeError, csv.Error):  # none, or not ours
        return None
    return [p for p in panels if isinstance(p, str) and p.endswith(".png") and Path(p).name == p
            and not p.startswith(".")]


def _refuse_replacing(out: Path, selection: Selection) -> None:
    """A one-line error, before any work, when explain would replace or remove a file in ``out`` that no
    earlier explain there wrote: the user's own dog.png (or the very image explained, its panel's
    namesake), a gallery.png of theirs. An earlier explain's files (listed in its explanations.csv,
    and the summaries beside it) are replaced as ever."""
    if not out.is_dir():
        return
    listed = _listed_panels(out)
    ours = set() if listed is None else {*listed, *(f"maps/{p[:-4]}.npy" for p in listed), *SUMMARIES}
    planned = [*(f"{n}.png" for n in selection.names), *(f"maps/{n}.npy" for n in selection.names), *SUMMARIES]
    inputs = {Path(p).resolve() for p in selection.sources or [] if Path(p).exists()}
    for name in planned:
        path = out / name
        if path.resolve() in inputs:
            raise CifarlensError(f"--out {out}: explain would write {name} over {path}, one of the images it "
                                 "explains; choose another --out")
        if (path.exists() or path.is_symlink()) and name not in ours:
            raise CifarlensError(f"--out {out} holds {name}, which explain would replace and no earlier explain there "
                                 "wrote; choose a new or empty folder for --out")


def _remove_earlier_panels(out: Path, keep: set[str]) -> None:
    """Remove the per-image panels (and their maps) that an earlier explain into ``out`` listed in its
    explanations.csv and this one does not write again: they piled up beside the new ones."""
    for panel in set(_listed_panels(out) or []) - keep:
        for path in (out / panel, out / "maps" / f"{panel[:-4]}.npy"):
            path.unlink(missing_ok=True)


def _write_rows(path: Path, rows: list[list]) -> None:
    import csv

    from cifarlens.io import TEXT

    with path.open("w", newline="", **TEXT) as f:
        writer = csv.writer(f)
        writer.writerow(["panel", "source", "label", "prediction", "confidence", "explained", "empty_map"])
        writer.writerows(rows)


def _save_npy(path: Path, array) -> None:
    import numpy as np

    with path.open("wb") as f:  # a file object: np.save would append ".npy" to the temp name
        np.save(f, array)


def _write_faithfulness(out: Path, run, selection: Selection, target, layer: str, chosen) -> str:
    """Deletion/insertion AUC of every registered method on the same images; table on stdout."""
    from cifarlens.explain.cam import list_methods
    from cifarlens.explain.faithfulness import faithfulness
    from cifarlens.io import atomic_write_json

    x = run.preprocess(selection.images)
    results, random = {}, None
    for method in list_methods():
        if method == chosen.method:
            ex = chosen
        else:  # the coarse-layer warning was printed for the chosen method already
            ex = _explain_all(run, selection.images, method, target, layer, warn=False)
        # same images, layer resolution and seed for every method: one random baseline serves all
        result = faithfulness(run.model, x, ex, random_repeats=3 if random is None else 0)
        random = random or result["random"]
        results[method] = {k: v for k, v in result.items() if k not in ("per_image", "random")}
    classes = run.classes
    target_names = (None if target is None else classes[target] if isinstance(target, int)
                    else [classes[int(t)] for t in target])
    report = {"images": len(x), "layer": chosen.layer, "target": target_names or "predicted class",
              "baseline": "mean", "steps": results[chosen.method]["steps"],
              "how_to_read": "deletion_auc: lower is better; insertion_auc: higher is better; score = insertion - "
                             "deletion, higher is better; compare with 'random' (random smooth maps)",
              "methods": results, "random": random}
    atomic_write_json(out / "faithfulness.json", report)
    print(f"faithfulness on {len(x)} image(s) (deletion lower = better, insertion higher = better):")
    print(f"  {'method':<20} {'deletion':>9} {'insertion':>9} {'score':>7}")
    rows = sorted(results.items(), key=lambda kv: -kv[1]["score"]) + [("(random maps)", random)]
    for name, r in rows:
        print(f"  {name:<20} {r['deletion_auc']:9.3f} {r['insertion_auc']:9.3f} {r['score']:7.3f}")
    return "faithfulness.json"
