"""The search: storages, studies, the per-trial objective and what a study writes.

A study lives in an Optuna storage: a SQLite file (the default, ``OUT/study.db``), an
Optuna journal file (``journal:PATH``) or a PostgreSQL/MySQL URL that workers on many
machines share. Each worker process runs :meth:`Tuner.work`: it claims a trial only while
the study's finished (complete + pruned) plus running trials are fewer than ``trials``,
under a file lock beside a local storage, so several local workers finish one study of
exactly ``trials`` trials between them. The search space and the base config are saved in
the study when it is created; a worker with a different one is refused.

Every trial is the base config overlaid with the sampled values, trained by
:func:`cifarlens.api.train` into ``OUT/trials/NNNN`` with ``evaluate_test=False`` on data
whose test split is dropped. Its value is the validation accuracy of the kept (best
validation loss) epoch; each epoch's validation accuracy goes to the pruner.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import functools
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Self

import numpy as np
import optuna
import yaml
from optuna.trial import TrialState

from cifarlens.config import RunConfig, save_yaml, to_dict
from cifarlens.errors import CifarlensError
from cifarlens.io import atomic_write, atomic_write_json, atomic_write_text
from cifarlens.plots import DPI  # (imported before pyplot: it selects Agg)
from cifarlens.tune.space import SearchSpace, default_space

PRUNERS = ("median", "hyperband", "none")
SPACE_ATTR, BASE_ATTR = "cifarlens.space", "cifarlens.base_config"
# Config keys that may differ between workers of one study: where the data sits on each
# machine, which device and how many loader workers it uses, and whether its CPU trains in bf16;
# and where it logs (tracking records the trials, never changes them).
MACHINE_KEYS = ("data.data_dir", "data.download", "data.workers", "train.device", "train.cpu_amp",
                "track.loggers", "track.tracking_uri", "track.experiment")
# Changing these needs the data read (and split) again; data.augment does not.
DATA_KEYS = ("data.dataset", "data.data_dir", "data.download", "data.image_size", "data.val_fraction", "train.seed")
SQLITE_TIMEOUT_S = 60  # how long a writer waits for another process's SQLite lock
CONNECT_TIMEOUT_S = 10  # database servers: fail quickly when unreachable
HEARTBEAT_S, GRACE_S = 30, 120  # a RUNNING trial without a heartbeat for GRACE_S is failed
MAX_FAILURES_IN_A_ROW = 3
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HOST = socket.gethostname()


# ---------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------


@dataclass
class Storage:
    url: str  # as given to --storage (workers are started with it)
    display: str  # for messages: the URL with any password hidden
    optuna: Any  # an optuna.storages.BaseStorage
    lock_path: Path | None  # a local file lock for claiming trials; None for database servers

    def lock(self) -> FileLock:
        return FileLock(self.lock_path)


class FileLock:
    """An exclusive ``fcntl`` lock on a file, released explicitly or on exit (no-op without a path)."""

    def __init__(self, path: Path | None):
        self._file = None
        if path is not None:
            self._file = open(path, "a")  # noqa: SIM115  (held until release())
            fcntl.flock(self._file, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# driver module -> the pip package that provides it
DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "pymysql": "PyMySQL",
                   "MySQLdb": "mysqlclient", "pg8000": "pg8000"}


def open_storage(url: str) -> Storage:
    """Open (creating if needed) the storage at ``url``: ``sqlite:///FILE``, ``journal:FILE`` or
    a SQLAlchemy database URL (``postgresql://USER:PASS@HOST/DB``, ``mysql+pymysql://...``).
    Any failure is one :class:`CifarlensError` line, within about ``CONNECT_TIMEOUT_S``."""
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        _require_folder(path, url)
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        try:
            storage = JournalStorage(JournalFileBackend(str(path)))
        except (OSError, ValueError) as err:
            raise CifarlensError(f"cannot open storage {url}: {err}") from None
        return Storage(url, url, storage, _lock_path(path))
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise CifarlensError(f"storage {url!r} is not a URL; use sqlite:///FILE.db, journal:FILE, "
                             "or postgresql://USER:PASS@HOST/DB for workers on several machines") from None
    display = parsed.render_as_string(hide_password=True)
    engine_kwargs: dict[str, Any] = {}
    lock_path = None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise CifarlensError(f"storage {display} is an in-memory SQLite database, which other processes "
                                 "cannot share and which is lost at exit; give a file: sqlite:///FILE.db")
        path = Path(parsed.database)
        _require_folder(path, display)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
        lock_path = _lock_path(path)
    else:
        try:
            driver = parsed.get_driver_name()  # loads SQLAlchemy's dialect for the URL
        except sqlalchemy.exc.NoSuchModuleError:
            raise CifarlensError(f"storage {display}: unknown database type {parsed.drivername!r}; use "
                                 "sqlite:///FILE.db, journal:FILE, postgresql://... or mysql+pymysql://...") from None
        engine_kwargs["connect_args"] = _connect_timeout(driver)
    try:
        storage = _rdb_storage(url, engine_kwargs, lock_path)
    except ImportError as err:
        module = getattr(err.__cause__, "name", None) or str(err)
        package = DRIVER_PACKAGES.get(module, module)
        raise CifarlensError(f"storage {display} needs the database driver {module!r}, which is not installed "
                             f"(pip install {package})") from None
    except sqlalchemy.exc.SQLAlchemyError as err:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        raise CifarlensError(f"cannot open storage {display}: {reason}") from None
    except RuntimeError as err:  # e.g. a table schema from another Optuna version
        raise CifarlensError(f"cannot use storage {display}: {str(err).splitlines()[0]}") from None
    return Storage(url, display, storage, lock_path)


def _rdb_storage(url: str, engine_kwargs: dict, lock_path: Path | None):
    from optuna.storages import RDBStorage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
        # Creating the tables is not safe against a second process doing the same: local
        # workers take the file lock; on a database server, one retry covers the race.
        for attempt in range(2):
            try:
                with FileLock(lock_path):
                    return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                      grace_period=GRACE_S)
            except Exception as err:
                if attempt or lock_path is not None or "already exists" not in str(err):
                    raise
                time.sleep(1.0)


def _require_folder(path: Path, url: str) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CifarlensError(f"storage {url}: folder {folder} does not exist; create it or choose another path")
    if path.is_dir():
        raise CifarlensError(f"storage {url}: {path} is a folder, not a file")


def _lock_path(path: Path) -> Path:
    # not PATH.lock: Optuna's journal storage uses that name for its own lock
    return path.with_name(path.name + ".tune-lock")


def _connect_timeout(driver: str) -> dict:
    if driver in ("psycopg2", "psycopg", "pymysql", "mysqldb"):
        return {"connect_timeout": CONNECT_TIMEOUT_S}
    if driver == "pg8000":
        return {"timeout": CONNECT_TIMEOUT_S}
    return {}


# ---------------------------------------------------------------------------
# Study
# ---------------------------------------------------------------------------


def base_identity(cfg: RunConfig) -> dict:
    """The base config as flat {dotted key: value}, without the keys that may differ per machine."""
    flat = {f"{section}.{key}": value for section, values in to_dict(cfg).items() for key, value in values.items()}
    return json.loads(json.dumps({k: v for k, v in flat.items() if k not in MACHINE_KEYS}))


def open_study(storage: Storage, name: str, space: SearchSpace, base_cfg: RunConfig) -> optuna.Study:
    """Create study ``name`` (maximising validation accuracy) or load it; a study created with
    another search space or base config is refused."""
    space_dict = json.loads(json.dumps(space.to_dict()))
    base = base_identity(base_cfg)
    with storage.lock():
        try:
            study = optuna.create_study(study_name=name, storage=storage.optuna, direction="maximize",
                                        load_if_exists=True)
        except Exception as err:  # SQLAlchemy/driver errors surface here for servers that went away
            import sqlalchemy.exc

            if not isinstance(err, sqlalchemy.exc.SQLAlchemyError):
                raise
            raise CifarlensError(f"cannot use storage {storage.display}: {str(err).splitlines()[0]}") from None
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise CifarlensError(f"study {name} in {storage.display} minimises; cifarlens studies maximise "
                                 "validation accuracy; use another --study name")
        attrs = study.user_attrs
        if SPACE_ATTR not in attrs:
            if study.trials:
                raise CifarlensError(f"study {name} in {storage.display} was not created by cifarlens tune; "
                                     "use another --study name")
            study.set_user_attr(SPACE_ATTR, space_dict)
            study.set_user_attr(BASE_ATTR, base)
            return study
    if attrs[SPACE_ATTR] != space_dict:
        old, new = attrs[SPACE_ATTR], space_dict
        differs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise CifarlensError(f"study {name} in {storage.display} was created with a different search space "
                             f"(differs in: {', '.join(differs)}); use another --study name or the same --space")
    # (a study stored by an older cifarlens may hold machine keys that it did not yet ignore)
    old = {k: v for k, v in (attrs.get(BASE_ATTR) or {}).items() if k not in MACHINE_KEYS}
    if old != base:
        differs = sorted(k for k in set(old) | set(base) if old.get(k) != base.get(k))
        raise CifarlensError(f"study {name} in {storage.display} was created with a different base config "
                             f"(differs in: {', '.join(differs)}); use another --study name or the same "
                             "--config and flags")
    return study


def make_pruner(name: str, *, startup: int, min_epochs: int, epochs: int | None):
    """``median``: prune a trial whose best validation accuracy so far is below the median of the
    completed trials at the same epoch, once ``startup`` trials completed and from epoch
    ``min_epochs`` on; ``hyperband``: successive halving brackets between ``min_epochs`` and
    ``epochs``; ``none``: every trial runs to the end."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=min_epochs)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_epochs, max_resource=epochs or "auto")
    if name == "none":
        return optuna.pruners.NopPruner()
    raise CifarlensError(f"unknown pruner {name!r}; choose one of: {', '.join(PRUNERS)}")


def pin_budget(cfg: RunConfig) -> RunConfig:
    """Fix ``train.epochs`` from the base recipe, so a sampled recipe cannot change the budget."""
    from cifarlens.recipes import RECIPES

    if cfg.train.epochs is not None:
        return cfg
    return replace(cfg, train=replace(cfg.train, epochs=RECIPES.get(cfg.train.recipe)["epochs"]))


# ---------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------


class Tuner:
    """One worker of a study: ``open()``, then ``work()`` (trials until the study has ``trials``
    finished ones or ``timeout`` seconds passed), then ``finish()`` (tables, best config, plots)."""

    def __init__(self, base_cfg: RunConfig, out_dir: str | Path, *, trials: int, space: SearchSpace | None = None,
                 storage: str | None = None, study_name: str | None = None, timeout: float | None = None,
                 pruner: str = "median", pruner_startup: int = 3, min_epochs: int = 1,
                 sampler_seed: int | None = None, worker_index: int = 0, log: Callable[[str], None] | None = None):
        if trials < 1:
            raise CifarlensError(f"--trials must be >= 1, got {trials}")
        if timeout is not None and timeout <= 0:
            raise CifarlensError(f"--timeout must be > 0 seconds, got {timeout}")
        if pruner_startup < 0 or min_epochs < 1:
            raise CifarlensError("--pruner-startup must be >= 0 and --min-epochs >= 1")
        if pruner not in PRUNERS:
            raise CifarlensError(f"unknown pruner {pruner!r}; choose one of: {', '.join(PRUNERS)}")
        from cifarlens.device import resolve_device
        from cifarlens.recipes import resolve_choices

        # a model and recipe left unset are chosen once, for this machine, and fixed for every trial
        base_cfg, _ = resolve_choices(base_cfg, resolve_device(base_cfg.train.device).type)
        self.base = pin_budget(base_cfg)
        self.out = Path(out_dir)
        self.trials, self.timeout = trials, timeout
        self.space = space if space is not None else default_space(self.base)
        self.storage_url = storage or f"sqlite:///{(self.out / 'study.db').absolute()}"
        self.study_name = study_name or default_study_name(self.base)
        self.pruner_name, self.pruner_startup, self.min_epochs = pruner, pruner_startup, min_epochs
        self.sampler_seed, self.worker_index = sampler_seed, worker_index
        self.log = log or (lambda line: print(line, flush=True))
        self.storage: Storage | None = None
        self.study: optuna.Study | None = None
        self._bundles: dict[tuple, Any] = {}
        self._failures_in_a_row, self._last_error = 0, ""
        self._interrupted = False

    # -- opening ---------------------------------------------------------------------------
    def open(self) -> Self:
        from cifarlens.engine import resolve_device
        from cifarlens.recipes import resolve_train

        resolve_train(self.base.train)  # a bad base config fails here, not in every trial
        resolve_device(self.base.train.device)
        self.space.check(self.base)
        created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)  # the default storage file lives in it
        try:
            self.storage = open_storage(self.storage_url)
        except CifarlensError:
            if created and not any(self.out.iterdir()):
                self.out.rmdir()
            raise
        self._claim_out_dir()
        self.study = open_study(self.storage, self.study_name, self.space, self.base)
        n_before = len(self.study.trials)
        if n_before == 0 and any((self.out / "trials").glob("[0-9]*")):
            raise CifarlensError(f"{self.out / 'trials'} holds trials of an earlier study {self.study_name}, "
                                 "which is no longer in the storage; use another --out or remove that folder")
        seed = None
        if self.sampler_seed is not None:  # distinct per worker and per continuation, reproducible
            seed = int(np.random.SeedSequence([self.sampler_seed, self.worker_index, n_before]).generate_state(1)[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate/group
            # multivariate + group: TPE models parameters jointly within each conditional branch
            self.study.sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                                            constant_liar=True)
        self.study.pruner = make_pruner(self.pruner_name, startup=self.pruner_startup, min_epochs=self.min_epochs,
                                        epochs=None if "train.epochs" in self.space.config_keys() else self.base.train.epochs)
        save_yaml(self.base, self.out / "base.yaml")
        atomic_write_text(self.out / "space.yaml", self.space.to_yaml(
            f"search space of study {self.study_name} ({self.space.source})"))
        done = self._counts()
        running = f", {done['running']} running" if done["running"] else ""
        self.log(f"study {self.study_name} in {self.storage.display}: {done['finished']} of {self.trials} trials "
                 f"finished{running}; each trial trains "
                 f"{self.base.train.epochs} epochs of {self.base.model.name} on {self.base.data.dataset}; "
                 f"sampling {', '.join(self.space.config_keys())}")
        return self

    def _claim_out_dir(self) -> None:
        marker = self.out / "tune.json"
        if marker.is_file():
            owner = json.loads(marker.read_text()).get("study")
            if owner != self.study_name:
                raise CifarlensError(f"{self.out} holds study {owner}, not {self.study_name}; use another --out")
        else:
            atomic_write_json(marker, {"study": self.study_name, "storage": self.storage.display})

    # -- claiming trials -------------------------------------------------------------------
    def _counts(self) -> dict:
        trials = self.study.get_trials(deepcopy=False)
        return {"finished": sum(t.state in FINISHED for t in trials),
                "running": sum(t.state == TrialState.RUNNING for t in trials)}

    def _fail_dead_trials(self) -> None:
        """Mark FAIL the RUNNING trials whose worker is gone: on this machine, by its process id;
        elsewhere, by Optuna's heartbeat (database storages)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = t.user_attrs.get("pid")
            if t.user_attrs.get("host") == HOST and isinstance(pid, int) and not _alive(pid):
                with contextlib.suppress(ValueError, RuntimeError):  # another worker was faster
                    self.study.tell(t.number, state=TrialState.FAIL)
                    self.log(f"trial {t.number}: its worker (process {pid}) is gone; marked failed")

    def _wants_more(self) -> bool:
        self._fail_dead_trials()
        counts = self._counts()
        return counts["finished"] + counts["running"] < self.trials

    def work(self) -> int:
        """Run trials until the study has enough; returns how many this worker ran."""
        assert self.study is not None, "call open() first"
        start, ran = time.monotonic(), 0
        with self.storage.lock():
            more = self._wants_more()
        if more:
            self._bundle(self.base)  # read the data once, before the first trial
        while more:
            if self.timeout is not None and time.monotonic() - start >= self.timeout:
                self.log(f"--timeout {self.timeout:g} s reached; this worker starts no more trials")
                break
            claim = self.storage.lock()
            try:
                more = self._wants_more()
                if more:
                    # the objective releases the claim once study.ask() has made its RUNNING trial
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        self.study.optimize(functools.partial(self._objective, claim=claim), n_trials=1)
                    ran += 1
            finally:
                claim.release()
            if self._interrupted:
                raise KeyboardInterrupt
            if self._failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                raise CifarlensError(f"{MAX_FAILURES_IN_A_ROW} trials in a row failed; the last: {self._last_error}")
        counts = self._counts()
        self.log(f"study {self.study_name}: {counts['finished']} of {self.trials} trials finished"
                 + (f", {counts['running']} still running in other workers" if counts["running"] else ""))
        return ran

    # -- one trial -------------------------------------------------------------------------
    def _objective(self, trial: optuna.Trial, claim: FileLock) -> float:
        from cifarlens.api import train
        from cifarlens.engine import TrainingDiverged
        from cifarlens.recipes import resolve_train
        from cifarlens.runs import RunDir

        claim.release()
        trial.set_user_attr("host", HOST)
        trial.set_user_attr("pid", os.getpid())
        values = self.space.sample(trial)
        try:
            cfg = self.space.apply(self.base, values)
            cfg = replace(cfg, train=resolve_train(cfg.train))
        except CifarlensError as err:
            return self._failed(trial, err)
        bundle = self._bundle(cfg)
        if cfg.data.augment is None:  # resolved, as train() would, so the stored config says what ran
            cfg = replace(cfg, data=replace(cfg.data, augment=bundle.info.augment))
        run_dir = self.out / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir.absolute()))
        trial.set_user_attr("config", json.loads(json.dumps(to_dict(cfg))))
        self.log(f"trial {trial.number}: {_format_values(values)} -> {run_dir}")
        seen: dict[str, Any] = {}

        def on_epoch_end(state, model) -> None:
            seen["state"] = state
            val_acc = state.history[-1]["val_acc"]
            trial.report(val_acc, state.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val_acc {val_acc:.2%} after epoch {state.epoch} is below the "
                                         f"{self.pruner_name} pruner's bar")

        try:
            train(cfg, run_dir, evaluate_test=False, report=False, bundle=bundle, on_epoch_end=on_epoch_end)
        except optuna.TrialPruned:
            RunDir(run_dir).write_meta(status="pruned")  # train() wrote "interrupted"
            self._record(trial, seen.get("state"))
            self._failures_in_a_row = 0
            raise
        except TrainingDiverged as err:
            trial.set_user_attr("pruned_reason", str(err))
            self._record(trial, seen.get("state"))
            self._failures_in_a_row = 0
            raise optuna.TrialPruned(f"training diverged: {str(err).split(';')[0]}") from None
        except CifarlensError as err:
            return self._failed(trial, err)
        except KeyboardInterrupt:
            # a FAIL without Optuna's traceback; work() re-raises once the trial is recorded
            self._interrupted = True
            trial.set_user_attr("error", "interrupted")
            return float("nan")
        state = seen["state"]
        self._record(trial, state)
        self._failures_in_a_row = 0
        if state.best_epoch == 0:  # validation loss never finite
            trial.set_user_attr("pruned_reason", "validation loss was never finite")
            raise optuna.TrialPruned("validation loss was never finite")
        return state.history[state.best_epoch - 1]["val_acc"]

    def _record(self, trial: optuna.Trial, state) -> None:
        if state is None:
            return
        trial.set_user_attr("epochs", state.epoch)
        trial.set_user_attr("best_epoch", state.best_epoch)
        trial.set_user_attr("val_loss", state.best_val_loss if math.isfinite(state.best_val_loss) else None)
        trial.set_user_attr("train_seconds", round(sum(row["seconds"] for row in state.history), 3))

    def _failed(self, trial: optuna.Trial, err: Exception) -> float:
        # NaN makes Optuna record the trial as FAIL, with a one-line warning and no traceback
        self._failures_in_a_row += 1
        self._last_error = f"trial {trial.number}: {err}"
        trial.set_user_attr("error", str(err))
        self.log(f"trial {trial.number} failed: {err}")
        return float("nan")

    def _bundle(self, cfg: RunConfig):
        """The data for ``cfg``, read once per distinct data config; without its test split."""
        from cifarlens.data.base import Split
        from cifarlens.data.pipeline import prepare_data

        flat = base_identity(cfg) | {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in DATA_KEYS}
        key = tuple(json.dumps(flat[k]) for k in DATA_KEYS)
        if key not in self._bundles:
            self._bundles.clear()  # keep one dataset in memory
            bundle = prepare_data(cfg.data, cfg.train.seed)
            empty = Split(bundle.test.images[:0], bundle.test.labels[:0])
            self._bundles[key] = replace(bundle, test=empty)  # the search never sees test images
        return self._bundles[key]

    # -- results ---------------------------------------------------------------------------
    def finish(self) -> dict:
        """Write trials.csv, best.yaml, history.png, importances.png and summary.json; log the table."""
        trials = self.study.get_trials(deepcopy=False)
        write_trials_csv(trials, self.space, self.out / "trials.csv")
        best = best_trial(trials)
        files = {"trials": str(self.out / "trials.csv")}
        if best is not None and "config" in best.user_attrs:
            header = (f"# best trial {best.number} of study {self.study_name}: val_acc {best.value:.4f} "
                      f"(epoch {best.user_attrs.get('best_epoch')}); reproduce with:\n"
                      f"#   cifarlens train --config {self.out / 'best.yaml'}\n")
            atomic_write_text(self.out / "best.yaml",
                              header + yaml.safe_dump(best.user_attrs["config"], sort_keys=False))
            files["best_config"] = str(self.out / "best.yaml")
        files |= write_plots(self.study, self.out, self.log)
        counts = {state.name: sum(t.state == state for t in trials) for state in TrialState}
        summary = {
            "study": self.study_name, "storage": self.storage.display, "out": str(self.out), "target": self.trials,
            "trials": {k: v for k, v in counts.items() if v},
            "best": None if best is None else {
                "number": best.number, "value": best.value, "params": self.space.values_of(best.params),
                "run_dir": best.user_attrs.get("run_dir"), "best_epoch": best.user_attrs.get("best_epoch")},
            "files": files,
        }
        atomic_write_json(self.out / "summary.json", summary)
        self.log(format_table(trials, self.space))
        if best is None:
            self.log("no trial completed yet: no best.yaml")
        else:
            self.log(f"best: trial {best.number}, val_acc {best.value:.2%} -> {self.out / 'best.yaml'}; "
                     f"train it with: cifarlens train --config {self.out / 'best.yaml'}")
        return summary


def run_tune(base_cfg: RunConfig, out_dir: str | Path, *, trials: int, **options) -> dict:
    """Open (or continue) a study, run trials in this process until it has ``trials`` finished
    ones, write the results into ``out_dir``; returns the summary (see :meth:`Tuner.finish`).
    ``options`` are :class:`Tuner`'s: space, storage, study_name, timeout, pruner, pruner_startup,
    min_epochs, sampler_seed."""
    tuner = Tuner(base_cfg, out_dir, trials=trials, **options).open()
    tuner.work()
    return tuner.finish()


def default_study_name(cfg: RunConfig) -> str:
    return f"{cfg.data.dataset}-{cfg.model.name}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this worker runs one trial at a time, and is between trials here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def best_trial(trials) -> optuna.trial.FrozenTrial | None:
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def _format_values(values: dict[str, Any]) -> str:
    return " ".join(f"{key.split('.')[-1]}={_format_value(v)}" for key, v in values.items())


TRIAL_COLUMNS = ("number", "state", "value", "val_loss", "best_epoch", "epochs", "train_seconds", "duration_s",
                 "datetime_start", "run_dir", "note")


def write_trials_csv(trials, space: SearchSpace, path: Path) -> None:
    names = [p.name for p in space.params]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*TRIAL_COLUMNS, *names])
            for t in trials:
                a = t.user_attrs
                duration = t.duration.total_seconds() if t.duration is not None else None
                note = a.get("error") or a.get("pruned_reason") or ""
                writer.writerow([t.number, t.state.name, t.value, a.get("val_loss"), a.get("best_epoch"),
                                 a.get("epochs"), a.get("train_seconds"),
                                 None if duration is None else round(duration, 3),
                                 t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
                                 a.get("run_dir"), note, *[t.params.get(n) for n in names]])

    atomic_write(path, write)


def format_table(trials, space: SearchSpace) -> str:
    lines = [f"{'trial':>5}  {'state':<8}  {'val_acc':>7}  {'epochs':>6}  {'seconds':>7}  params"]
    for t in trials:
        value = f"{t.value:.2%}" if t.value is not None and t.state == TrialState.COMPLETE else "-"
        epochs = t.user_attrs.get("epochs", "-")
        seconds = t.user_attrs.get("train_seconds")
        lines.append(f"{t.number:>5}  {t.state.name:<8}  {value:>7}  {epochs!s:>6}  "
                     f"{'-' if seconds is None else f'{seconds:.1f}':>7}  "
                     f"{_format_values(space.values_of(t.params))}")
    return "\n".join(lines)


def write_plots(study: optuna.Study, out: Path, log: Callable[[str], None]) -> dict:
    """history.png and importances.png with Optuna's matplotlib visualisation; a plot that the
    trials cannot support yet is skipped with a note."""
    import matplotlib
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import (
        plot_optimization_history,
        plot_param_importances,
    )

    files = {}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = [p for p in {k for t in complete for k in t.params}
              if len({json.dumps(t.params.get(p)) for t in complete}) > 1]
    plots = [("history", plot_optimization_history, len(complete) >= 1, "no completed trial yet"),
             ("importances", plot_param_importances, len(complete) >= 2 and bool(varied),
              "needs at least 2 completed trials whose parameters differ")]
    for name, plot, possible, why in plots:
        path = out / f"{name}.png"
        if not possible:
            log(f"note: {path.name} skipped: {why}")
            continue
        # Optuna's plots switch pyplot's style: keep that change inside this block
        with matplotlib.rc_context(), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)  # "few trials in some regimes": a small study
            try:
                ax = plot(study, target_name="val_acc")
            except (ValueError, RuntimeError) as err:
                log(f"note: {path.name} skipped: {err}")
                continue
            fig = ax.figure
            atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))
            plt.close(fig)
        files[name] = str(path)
    return files

