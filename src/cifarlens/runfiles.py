"""What a run folder holds, and what a new run may replace there.

The names of the files and folders a training run writes (:mod:`cifarlens.runs` describes each),
the checks made before a run folder is created (another program's folder, a run inside a run, a
run that ``--resume`` could continue) and the removal ``--force`` does: exactly these files,
never anything else in the folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from cifarlens import folderlock
from cifarlens.data.fingerprint import SIGNATURES_FILE
from cifarlens.errors import CifarlensError
from cifarlens.io import is_temporary

# Files a run writes; --force removes exactly these (never anything else in the folder).
RUN_FILES = (
    "config.yaml", "run.json", "environment.json", "history.csv", "train.log", "model.safetensors",
    "curves.png", "report.html", "model.onnx", "model.uncalibrated.onnx", SIGNATURES_FILE, "robustness.json",
    "robustness.previous.json",
)
OLDER_ROBUSTNESS = "robustness.previous.*.json"  # earlier robustness results kept (cifar_c.write_result)
# evaluate's results on other images than the run's own (another test set): OTHER_DATA/test-<fingerprint>/
OTHER_DATA = "other-data"
RUN_DIRS = ("checkpoints", "explain", "export", "tensorboard", OTHER_DATA)  # folders a run writes; --force removes them
SPLIT_FILES = ("metrics{}.json", "predictions{}.csv", "classification_report{}.txt", "confusion_matrix{}.png")
HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "train_samples",
                   "train_px")


def split_suffix(split: str) -> str:
    return "" if split == "test" else f"_{split}"


def is_run_folder(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "run.json").is_file()


def check_new(path: Path, *, force: bool) -> bool:
    """Whether ``path`` may become a new run's folder, checked without touching anything (a run checks
    it before it reads its data, and again when it creates the folder): a one-line error for a file,
    a dangling link, a folder inside another run, another program's folder, or an existing run without
    ``force``. True: an old run that ``--force`` replaces (:func:`remove_run_files`)."""
    if path.exists() and not path.is_dir():
        raise CifarlensError(f"--out {path} is a file, not a folder; choose another --out")
    if path.is_symlink() and not path.exists():  # mkdir said "File exists"
        raise CifarlensError(f"--out {path} is a link to {os.readlink(path)}, which does not exist; "
                             "make that folder or choose another --out")
    above = next((p for p in path.resolve().parents if is_run_folder(p)), None)
    if above is not None:  # that run's --force would delete it with its own files
        raise CifarlensError(f"--out {path} is inside the run folder {above}; choose another --out")
    if not path.is_dir() or all(_leftover(p) for p in path.iterdir()):
        return False
    if folderlock.held_elsewhere(path):  # another train is making its run there (no run.json yet), or training
        raise CifarlensError(f"run folder {path} is in use by another cifarlens process (a training of it is "
                             "starting or running); choose another --out, or wait for it to end")
    meta = _cifarlens_meta(path) if is_run_folder(path) else None
    if meta is None:  # --force would delete another program's files
        raise CifarlensError(f"--out {path} is a non-empty folder that is not a cifarlens run"
                             + (" (its run.json is not one cifarlens writes)" if is_run_folder(path) else "")
                             + "; choose another --out")
    if not force:
        finished = meta.get("status") == "finished"
        # --resume refuses finished runs, and runs stopped before their first checkpoint
        resumable = not finished and (path / "checkpoints" / "last.pt").is_file()
        raise CifarlensError(
            f"run folder {path} already exists" + (" (a finished run)" if finished else "")
            + ("" if finished or resumable else " (stopped before its first checkpoint)")
            + "; " + ("use --resume to continue it, " if resumable else "")
            + "--force to overwrite it, or another --out"
        )
    return True


def _cifarlens_meta(path: Path) -> dict | None:
    """run.json when it is a cifarlens run's (a JSON object with its status or dataset), not just a
    file of that name: another program's folder with a config.yaml and a run.json was taken for a
    run, and ``--force`` deleted its checkpoints/ and tensorboard/. (A run of an older version may
    lack one of the two keys.)"""
    try:
        meta = json.loads((path / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and ("status" in meta or isinstance(meta.get("dataset"), dict)) else None


def _leftover(path: Path) -> bool:
    """What a start that failed (a full disk) or a killed write leaves: an empty checkpoints/, a
    hidden temporary file. Neither makes a folder another program's."""
    if path.name == "checkpoints" and path.is_dir():
        return not any(path.iterdir())
    return is_temporary(path.name) and path.is_file()


def remove_run_files(path: Path) -> None:
    """Remove what a run wrote into ``path`` (what ``--force`` replaces), and nothing else."""
    # config.yaml and run.json last: a removal that fails half-way leaves a run folder, which
    # the next --force may remove, not a folder refused as another program's
    last = ("config.yaml", "run.json")
    for name in RUN_FILES:
        if name not in last:
            (path / name).unlink(missing_ok=True)
    for older in path.glob(OLDER_ROBUSTNESS):  # robustness.previous.2.json, ...
        older.unlink(missing_ok=True)
    for split in ("test", "val"):
        for pattern in SPLIT_FILES:
            (path / pattern.format(split_suffix(split))).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(path / name, ignore_errors=True)
    remove_temporaries(path)
    for name in last:
        (path / name).unlink(missing_ok=True)


def remove_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files of writes killed half-way (io.atomic_write's, only) from the run
    folder ``path`` and its checkpoints/; the ones removed."""
    found = [tmp for folder in (path, path / "checkpoints") for tmp in folder.glob(".*.tmp")
             if is_temporary(tmp.name) and tmp.is_file()]
    for tmp in found:
        tmp.unlink(missing_ok=True)
    return found
