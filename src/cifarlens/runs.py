"""Run folders: what a training run writes, and how the other commands read it.

A run folder holds everything needed to repeat, evaluate and serve the run::

    config.yaml            resolved config (every hyperparameter, no recipe lookups left)
    run.json               dataset facts (classes, mean/std, image size), data source, model, status
    environment.json       versions, device, seed, git revision, command line
    history.csv            one row per epoch, written as training goes
    train.log              the log lines
    checkpoints/last.pt    full training state for --resume (torch.load weights_only=True)
    model.safetensors      best-on-validation weights (what evaluate/predict/serve load)
    metrics.json, predictions.csv, classification_report.txt, confusion_matrix.png, curves.png
    tensorboard/           TensorBoard events, with --logger tensorboard (see cifarlens.tracking)
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import functools
import json
import math
import os
from dataclasses import asdict, replace
from pathlib import Path

from cifarlens import folderlock, runfiles
from cifarlens.config import DataConfig, RunConfig, absolute_data_dir, from_dict, load_yaml, save_yaml, to_dict
from cifarlens.data.base import MAX_IMAGE_SIZE, DataSource, DatasetInfo
from cifarlens.errors import CifarlensError
from cifarlens.io import TEXT, atomic_write, atomic_write_json, atomic_write_text, stdout_to_devnull
from cifarlens.runfiles import (
    HISTORY_COLUMNS, OLDER_ROBUSTNESS, OTHER_DATA, RUN_DIRS, RUN_FILES, SPLIT_FILES, is_run_folder, split_suffix,
)


class RunDir:
    def __init__(self, path: str | Path):
        path = getattr(path, "path", path)  # a loaded run (cifarlens.load_run) or a RunDir: its folder
        if not isinstance(path, (str, os.PathLike)):  # None, a dict: a TypeError from deep inside
            raise CifarlensError(f"a run folder is a path (str or pathlib.Path) or a loaded run; got {type(path).__name__}")
        self.path = Path(path).expanduser()  # "~/runs/x" from Python (a shell expands it for the CLI): not a "~" folder

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def last_checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    @property
    def weights(self) -> Path:
        return self.path / "model.safetensors"

    def split_file(self, pattern: str, split: str) -> Path:
        return self.path / pattern.format(split_suffix(split))

    def other_data(self, split: str, fingerprints: dict[str, str]) -> Path:
        """Where results on other images than the run's own go (evaluate, robustness, explain):
        ``OTHER_DATA/<split>-<fingerprint>`` of those images (the training images' for "train"/"val")."""
        return self.path / OTHER_DATA / f"{split}-{fingerprints['test' if split == 'test' else 'train']}"

    def is_run(self) -> bool:
        return is_run_folder(self.path)

    # -- creating -------------------------------------------------------------------------
    def lock(self) -> None:
        """Claim the run folder for this process (:mod:`cifarlens.folderlock`, released when the
        process ends or :meth:`unlock` is called): a second ``train`` on the same folder, a
        ``--force``, a ``--resume``, an ``evaluate`` or a ``calibrate`` beside a running one is
        refused instead of mixing two runs' files (an evaluate of the weights before a resume's
        last epoch wrote its figures over the finished run's). Nothing is claimed where the
        folder does not exist yet."""
        if getattr(self, "_lock_key", None) is None and self.path.is_dir():
            self._lock_key = folderlock.claim(self.path)

    def unlock(self) -> None:
        key, self._lock_key = getattr(self, "_lock_key", None), None
        folderlock.release(key)

    def in_use(self) -> bool | None:
        """Whether another process holds the run folder (a training of it runs); None: unknown."""
        return folderlock.held_elsewhere(self.path)

    @contextlib.contextmanager
    def claimed(self):
        """:meth:`lock` for the length of a ``with`` block (evaluate, calibrate, report)."""
        self.lock()
        try:
            yield self
        finally:
            self.unlock()

    def refuse_own_file(self, path: Path, flag: str = "--out", default: str | None = None) -> None:
        """A one-line error when ``path`` is one of the files this run folder keeps (its config,
        run.json, weights, checkpoints, metrics, ...): an export, a table or a figure must not
        replace them. ``model.onnx`` and the ``export/`` folder are where exports go, and are
        allowed. ``default``: where the command writes without ``flag`` (ONNX's by default)."""
        rel = Path(os.path.relpath(Path(path).resolve(), self.path.resolve()))
        if rel.parts and rel.parts[0] == "..":
            return
        own = {*RUN_FILES, *(pattern.format(split_suffix(s)) for pattern in SPLIT_FILES for s in ("test", "val"))}
        if (len(rel.parts) == 1 and (rel.name in own - {"model.onnx", "model.uncalibrated.onnx"}
                                     or fnmatch.fnmatch(rel.name, OLDER_ROBUSTNESS))) or \
                (len(rel.parts) > 1 and rel.parts[0] in set(RUN_DIRS) - {"export"}):
            default = default or f"{self.path / 'model.onnx'}, or a file under {self.path / 'export'}"
            raise CifarlensError(f"{flag} {path} is one of the run's own files; choose another file (default: "
                                 f"{default})")

    def create(self, *, force: bool) -> None:
        """Make a fresh run folder; refuse to touch an existing one unless ``force``."""
        if self.check_new(force=force):
            self.lock()  # before anything is removed
            runfiles.remove_run_files(self.path)
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.lock()

    def check_new(self, *, force: bool) -> bool:
        """What :meth:`create` refuses, checked without touching anything (a run checks it before it
        reads its data, and again when it creates the folder); True: an old run ``--force`` replaces."""
        return runfiles.check_new(self.path, force=force)

    def discard(self) -> None:
        """Remove a run folder just made, before anything was trained into it (a logger that could
        not start): nothing is lost, and the same command can run again without --force. The folder
        itself goes only when nothing else is left in it."""
        runfiles.remove_run_files(self.path)
        self.unlock()
        with contextlib.suppress(OSError):
            self.path.rmdir()

    # -- reading --------------------------------------------------------------------------
    def require_run(self) -> None:
        if self.path.is_file():
            above = next((p for p in self.path.parents[:2] if RunDir(p).is_run()), None)  # RUN/x or RUN/checkpoints/x
            raise CifarlensError(f"{self.path} is a file; a run is the folder that holds config.yaml and run.json"
                                 + (f" ({above}?)" if above else ""))
        if not self.path.is_dir():
            raise CifarlensError(f"run folder {self.path} not found")
        if not self.is_run():
            raise CifarlensError(f"{self.path} is not a cifarlens run folder (no config.yaml / run.json)")

    def config(self) -> RunConfig:
        values = load_yaml(self.path / "config.yaml", "run config")
        if not values or not isinstance(values, dict) or not isinstance(values.get("model"), dict):
            raise CifarlensError(f"{self.path / 'config.yaml'} is empty or damaged (no model section); the run "
                                 "folder is damaged")
        return from_dict(self._fill_lost_keys(values))

    def lacks_settings(self) -> list[tuple[str, str]]:
        """(section, key) of each setting config.yaml does not hold (an older cifarlens's, or lost)."""
        values = load_yaml(self.path / "config.yaml", "run config")
        return _lost_keys(values) if isinstance(values, dict) else []

    def _fill_lost_keys(self, values: dict) -> dict:
        """Settings config.yaml lacks (cut short, or lines deleted) that the checkpoint's config has:
        the values the run trained with, and a warning (a lost ``train.tta`` turned TTA off and
        changed every figure). Keys neither has are an older cifarlens's: their defaults, silently."""
        lost = _lost_keys(values)
        if not lost or not self.last_checkpoint.is_file():
            return values
        from cifarlens.checkpoint import load_checkpoint

        import warnings

        try:
            saved = load_checkpoint(self.last_checkpoint).get("config") or {}
        except CifarlensError as err:  # the weights file may still serve: the defaults, said so
            warnings.warn(f"{self.path / 'config.yaml'} lacks {', '.join(f'{s}.{k}' for s, k in lost[:5])}"
                          f"{', ...' if len(lost) > 5 else ''}, and the checkpoint that would hold them cannot be "
                          f"read ({err}): their defaults are used; restore the file")
            return values
        found = [(s, k) for s, k in lost if k in (saved.get(s) or {})]
        for s, k in found:
            values[s] = {**(values.get(s) if isinstance(values.get(s), dict) else {}), k: saved[s][k]}
        if found:
            warnings.warn(f"{self.path / 'config.yaml'} lacks {', '.join(f'{s}.{k}' for s, k in found)} (damaged or "
                          "edited): using the values the run trained with, from checkpoints/last.pt; restore the file")
        return values

    def meta(self) -> dict:
        try:
            meta = json.loads((self.path / "run.json").read_text())
        except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CifarlensError(f"{self.path / 'run.json'} is unreadable ({err}); the run folder is damaged") from None
        if not isinstance(meta, dict):
            raise CifarlensError(f"{self.path / 'run.json'} holds a {type(meta).__name__}, not a JSON object; the run "
                                 "folder is damaged")
        return meta

    def info(self) -> DatasetInfo:
        values = self.meta().get("dataset")
        try:
            info = DatasetInfo(**{**values, "classes": tuple(values["classes"]), "mean": tuple(values["mean"]),
                                  "std": tuple(values["std"])})
        except (TypeError, KeyError) as err:
            raise CifarlensError(f"{self.path / 'run.json'} has no usable \"dataset\" record ({type(err).__name__}: "
                                 f"{err}); the run folder is damaged") from None
        problems = [f"{key} {list(stats)} is not {info.in_channels} number(s)" + " > 0" * (key == "std")
                    for key, stats in (("mean", info.mean), ("std", info.std))
                    if len(stats) != info.in_channels or not all(type(v) in (int, float) and math.isfinite(v)
                                                                  for v in stats)
                    or (key == "std" and not all(v > 0 for v in stats))]
        if type(info.image_size) is not int or not 1 <= info.image_size <= MAX_IMAGE_SIZE:
            problems.append(f"image_size {info.image_size!r} is not a width in pixels")
        twice = sorted({str(c) for c in info.classes if info.classes.count(c) > 1})
        if twice or not all(isinstance(c, str) and c for c in info.classes):  # a prediction would name two classes alike
            problems.append(f"its classes name {twice[0]!r} twice" if twice else "a class name is not a non-empty text")
        if problems:
            raise CifarlensError(f"{self.path / 'run.json'}'s \"dataset\" record is damaged ({'; '.join(problems)}); "
                                 "restore the file")
        return info

    def data_settings(self, data: DataConfig, data_dir: str | None = None) -> DataConfig:
        """The run's ``data`` settings to read its images again with (evaluate, calibrate, explain,
        --resume): from ``data_dir`` (made absolute) when given, and then never downloaded into (it
        says where the data is: a wrong folder is an error, not a download); a run trained on a copy
        never downloads the official files in its place, and a copy that is gone says where to point."""
        if data_dir is not None:
            data = replace(absolute_data_dir(data, data_dir), download=False)
            if not os.path.isdir(data.data_dir):
                raise CifarlensError(f"no folder {data.data_dir} (given as the data's folder, --data-dir)")
        copy = (self.meta().get("source") or {}).get("kind", "official files") != "official files"
        if copy:
            data = replace(data, download=False)
        if (copy or not data.download) and not os.path.isdir(data.data_dir):  # (official files may be downloaded again)
            raise CifarlensError(f"the data of {self.path} is not in {data.data_dir} any more (moved or "
                                 "deleted?); pass --data-dir where it is now")
        return data

    def data_label(self) -> str:
        """What the run trained on, as a report prints it: "CIFAR-10 (JPEG copy)", "CIFAR-10", ..."""
        meta = self.meta()
        return (meta.get("source") or {}).get("label") or self.info().display_name

    # -- writing --------------------------------------------------------------------------
    def write_config(self, cfg: RunConfig, notes: dict[str, str] | None = None) -> None:
        """config.yaml; ``notes`` ({"recipe": "fast_cpu (default for fastnet_cpu on a CPU)"}) become
        comments at its top, saying which values cifarlens chose and why."""
        save_yaml(cfg, self.path / "config.yaml", header="".join(f"# {k}: {v}\n" for k, v in (notes or {}).items()))

    def update_config(self, cfg: RunConfig) -> None:
        """Rewrite config.yaml with ``cfg``, keeping the notes at its top (see :meth:`write_config`)."""
        lines = (self.path / "config.yaml").read_text().splitlines(keepends=True)
        notes = "".join(line for line in lines[: next((i for i, l in enumerate(lines) if not l.startswith("#")), 0)])
        save_yaml(cfg, self.path / "config.yaml", header=notes)

    def unfinished_warning(self) -> str | None:
        """A line for commands that use a run's weights (predict, serve, evaluate, calibrate) when
        the run has not finished: its weights are the best so far, and what it lacks yet (a test
        evaluation, a temperature: either may have been made since by evaluate or calibrate);
        None otherwise."""
        meta = self.meta()
        status = meta.get("status", "finished")
        if status == "finished":
            return None
        what = {"running": "is still training (or was killed without a trace)", "interrupted": "was interrupted",
                "failed": "failed", "diverged": "diverged"}.get(status, f"has status {status!r}")
        done = meta.get("epochs_done")
        lacks = [what for what, there in (("a test evaluation", (self.path / "metrics.json").is_file()),
                                           ("a fitted temperature", bool(meta.get("calibration")))) if not there]
        if not self.weights.is_file() and not self.last_checkpoint.is_file():  # the command's own error follows
            return None
        return (f"{self.path} {what}" + (f" after {done} epoch(s)" if done is not None else "")
                + ": these are its weights so far" + (f", without {' or '.join(lacks)}" if lacks else ""))

    def check_in_place(self) -> None:
        """A one-line error when the run folder this process claimed (:meth:`lock`) was moved or
        deleted meanwhile: the run's next write would make a new folder at the old place and split
        the run in two (every write of a training goes through here: the log, run.json, history.csv)."""
        if folderlock.moved(getattr(self, "_lock_key", None)):
            raise CifarlensError(f"the run folder {self.path} was moved or deleted while the run trained; stopped, "
                                 "rather than start a second, partial run there (a moved folder holds the run up to "
                                 "its last checkpoint: --resume it where it is now)")

    def write_meta(self, **values) -> None:
        self.check_in_place()
        meta = self.meta() if (self.path / "run.json").is_file() else {}
        meta.update(values)
        atomic_write_json(self.path / "run.json", meta)

    def save_weights(self, state_dict: dict, metadata: dict) -> None:
        """model.safetensors (the weights evaluate, predict and serve load), from a training of it."""
        from cifarlens.checkpoint import save_weights

        self.check_in_place()
        save_weights(state_dict, self.weights, metadata)

    def write_history(self, history: list[dict]) -> None:
        self.check_in_place()
        def write(tmp: Path) -> None:
            with tmp.open("w", newline="", **TEXT) as f:
                writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(history)

        atomic_write(self.path / "history.csv", write)

    def log(self, line: str) -> None:
        try:
            print(line, flush=True)
        except BrokenPipeError:  # `cifarlens train ... | head`: the reader left; the run goes on, into train.log
            stdout_to_devnull()
        self.note(line)

    def note_stop(self, status: str, err: BaseException, epochs: int) -> None:
        """What stopped a run that did not finish, as train.log's last line (the command line
        prints the error itself)."""
        why = "Ctrl-C or SIGTERM" if isinstance(err, KeyboardInterrupt) else \
            str(err) if isinstance(err, CifarlensError) else f"{type(err).__name__}: {err}"
        self.note(f"{status} ({epochs} epoch(s) finished): {why}")

    def note(self, line: str) -> None:
        """``line`` in train.log only (what the command line shows otherwise, e.g. the error that
        stopped the run)."""
        self.check_in_place()
        with (self.path / "train.log").open("a", **TEXT) as f:
            f.write(line + "\n")


def _lost_keys(values: dict) -> list[tuple[str, str]]:
    template = to_dict(RunConfig())
    return [(s, k) for s, keys in template.items() if isinstance(keys, dict)
            for k in keys if k not in (values.get(s) if isinstance(values.get(s), dict) else {})]


def info_to_dict(info: DatasetInfo) -> dict:
    return asdict(info)


def source_to_dict(source: DataSource, info: DatasetInfo) -> dict:
    """run.json's ``source``: the data's origin, and the label a report prints for it."""
    return {**asdict(source), "label": source.label(info)}


def write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def refuse_runs_file(path: str | Path, flag: str, default: str | None = None, source: Path | None = None) -> None:
    """:meth:`RunDir.refuse_own_file` of any run folder that holds ``path`` (RUN/x,
    RUN/checkpoints/x, RUN/other-data/test-.../x): a table or an export written for one run must
    not replace another run's files either, exports in their default places included (only the
    ``source`` run's own, for an export of it, may be written again)."""
    for folder in Path(path).resolve().parents[:3]:
        if RunDir(folder).is_run():
            RunDir(folder).refuse_own_file(Path(path), flag, default)
            rel = Path(path).resolve().relative_to(folder)
            other = source is None or folder != Path(source).resolve()
            if other and (rel.parts[0] == "export" or rel.name in ("model.onnx", "model.uncalibrated.onnx")):
                raise CifarlensError(f"{flag} {path} is an export of the run {folder}; choose another file "
                                     f"(default: {default})")


def claims_run(func):
    """Run ``func(run_dir, ...)`` with the run folder claimed (:meth:`RunDir.lock`): it writes
    figures or the temperature from the weights it loads, which a training beside it would change."""
    @functools.wraps(func)
    def claiming(run_dir, *args, **kwargs):
        with RunDir(run_dir).claimed():
            return func(run_dir, *args, **kwargs)

    return claiming
