"""Running a study: :class:`Tuner` claims trials, trains each one and records it; :func:`run_tune`.

Each worker process runs :meth:`Tuner.work`: it claims a trial only while the study's
finished (complete + pruned) plus running trials are fewer than ``trials``, under the file
lock beside a local storage (:mod:`cifarlens.tune.study`), so several local workers finish
one study of exactly ``trials`` trials between them.

Every trial is the base config overlaid with the sampled values, trained by
:func:`cifarlens.api.train` into ``OUT/trials/NNNN`` with ``evaluate_test=False`` on data
whose test split is dropped. Its value is the validation accuracy of the kept (best
validation loss) epoch; each epoch's validation accuracy goes to the pruner. What a study
writes at the end comes from :mod:`cifarlens.tune.results`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Self

import numpy as np
import optuna
from optuna.trial import TrialState

from cifarlens.config import RunConfig, absolute_data_dir, dump_yaml, save_yaml, to_dict
from cifarlens.errors import CifarlensError
from cifarlens.io import atomic_write_json, atomic_write_text
from cifarlens.tune.results import (  # noqa: F401  (re-exported: they lived here)
    TRIAL_COLUMNS,
    best_trial,
    format_table,
    format_values,
    write_plots,
    write_trials_csv,
)
from cifarlens.tune.space import SearchSpace, default_space
from cifarlens.tune.study import (  # noqa: F401  (re-exported: they lived here)
    BASE_ATTR,
    MACHINE_KEYS,
    PRUNERS,
    SPACE_ATTR,
    FileLock,
    Storage,
    base_identity,
    default_study_name,
    make_pruner,
    mark_interrupted,
    open_storage,
    open_study,
    pin_budget,
    process_alive,
)

# Changing these needs the data read (and split) again; data.augment does not.
DATA_KEYS = ("data.dataset", "data.data_dir", "data.download", "data.image_size", "data.val_fraction", "train.seed")
MAX_FAILURES_IN_A_ROW = 3
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HOST = socket.gethostname()


class Tuner:
    """One worker of a study: ``open()``, then ``work()`` (trials until the study has ``trials``
    finished ones or ``timeout`` seconds passed), then ``finish()`` (tables, best config, plots)."""

    def __init__(self, base_cfg: RunConfig, out_dir: str | Path, *, trials: int, space: SearchSpace | None = None,
                 storage: str | None = None, study_name: str | None = None, timeout: float | None = None,
                 pruner: str = "median", pruner_startup: int = 3, min_epochs: int = 1,
                 sampler_seed: int | None = None, worker_index: int = 0, log: Callable[[str], None] | None = None):
        if trials < 1:
            raise CifarlensError(f"--trials must be >= 1, got {trials}")
        if timeout is not None and not timeout > 0:  # nan: never timed out
            raise CifarlensError(f"--timeout must be > 0 seconds, got {timeout}")
        if sampler_seed is not None and sampler_seed < 0:  # numpy's SeedSequence raised, once study.db was made
            raise CifarlensError(f"--sampler-seed must be >= 0, got {sampler_seed}")
        if pruner_startup < 0 or min_epochs < 1:
            raise CifarlensError("--pruner-startup must be >= 0 and --min-epochs >= 1")
        if pruner not in PRUNERS:
            raise CifarlensError(f"unknown pruner {pruner!r}; choose one of: {', '.join(PRUNERS)}")
        from cifarlens.device import resolve_device
        from cifarlens.recipes import RECIPES, resolve_choices

        # a model and recipe left unset are chosen once, for this machine, and fixed for every trial
        base_cfg, _ = resolve_choices(base_cfg, resolve_device(base_cfg.train.device).type)
        if base_cfg.train.time_budget:
            raise CifarlensError("tune compares trials after the same epochs, and a time budget would time and plan "
                                 "each trial on its own: drop --time-budget (train.time_budget) and set --epochs")
        if base_cfg.data.val_fraction == 0:
            raise CifarlensError("tuning scores trials on the validation split: set data.val_fraction > 0 (it is 0 "
                                 "here, from --set/--config" + (f" or recipe {base_cfg.train.recipe}" if
                                 RECIPES.get(base_cfg.train.recipe).get("data", {}).get("val_fraction") == 0 else "")
                                 + ")")
        self.base = pin_budget(base_cfg)
        self.out = Path(out_dir)
        self.trials, self.timeout = trials, timeout
        self.space = space if space is not None else default_space(self.base)
        self.storage_url = storage or f"sqlite:///{(self.out / 'study.db').absolute()}"
        self.storage_given = storage is not None
        self.study_name = study_name or default_study_name(self.base)
        self.pruner_name, self.pruner_startup, self.min_epochs = pruner, pruner_startup, min_epochs
        self.sampler_seed, self.worker_index = sampler_seed, worker_index
        self.log = log or (lambda line: print(line, flush=True))
        self.storage: Storage | None = None
        self.study: optuna.Study | None = None
        self._bundles: dict[tuple, Any] = {}
        self._failures_in_a_row, self._last_error = 0, ""
        self._interrupted: KeyboardInterrupt | None = None
        self._verbosity = optuna.logging.get_verbosity()  # restored after an interrupted trial

    # -- opening ---------------------------------------------------------------------------
    def open(self) -> Self:
        from cifarlens.data.policies import check_settings
        from cifarlens.engine import resolve_device
        from cifarlens.recipes import resolve_train

        from cifarlens import tracking

        resolve_train(self.base.train)  # a bad base config fails here, not in every trial
        check_settings(self.base.data)
        resolve_device(self.base.train.device)
        tracking.check_available(self.base.track.loggers, self.base.track)  # each trial failed on these in turn
        tracking.check_reachable(self.base.track.loggers, self.base.track.tracking_uri)
        self.space.check(self.base)
        self._check_out()
        data = self._bundle(self.base).fingerprints  # read before the study exists: a data error leaves none
        marker = self.out / "tune.json"
        if not self.storage_given and marker.is_file():  # a study kept elsewhere, its --storage left out now
            kept = json.loads(marker.read_text()).get("storage")
            if kept and not (kept.startswith("sqlite:///") and kept.endswith("/study.db")):  # (the default, moved or not)
                raise CifarlensError(f"{self.out} holds a study kept in storage {kept} (its tune.json): pass "
                                     f"--storage {kept} to continue it, or use another --out")
        created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)  # the default storage file lives in it
        try:  # a refused storage or study leaves no empty --out behind
            self.storage = open_storage(self.storage_url)
            self._claim_out_dir()
            self.study = open_study(self.storage, self.study_name, self.space, self.base, data)
            # again, now that the study's database exists: a tracking URI naming it failed every trial
            tracking.check_reachable(self.base.track.loggers, self.base.track.tracking_uri)
        except CifarlensError:
            if created and not any(self.out.iterdir()):
                self.out.rmdir()
            raise
        if not (self.out / "tune.json").is_file():  # once the study is accepted: a refused one left a marker that
            atomic_write_json(self.out / "tune.json", {"study": self.study_name,  # refused the corrected command
                                                       "storage": self.storage.display})
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
        epochs = self.base.train.epochs
        self.log(f"study {self.study_name} in {self.storage.display}: {self._progress(done)}{running}; each trial "
                 f"trains {epochs} epoch{'s' * (epochs != 1)} of {self.base.model.name} on {self.base.data.dataset}; "
                 f"sampling {', '.join(self.space.config_keys())}")
        return self

    def _check_out(self) -> None:
        """A folder of the study's own: not a file, not a run folder nor inside one (its trials/
        would be refused there one by one, and its --force would delete the study)."""
        from cifarlens.runs import RunDir

        if self.out.exists() and not self.out.is_dir():
            raise CifarlensError(f"--out {self.out} is a file; a study needs a folder")
        here = self.out.resolve()
        run = next((p for p in (here, *here.parents) if RunDir(p).is_run()), None)
        if run is not None:
            raise CifarlensError(f"--out {self.out} is {'the run folder' if run == here else 'inside the run folder'} "
                                 f"{run}; a study needs a folder of its own")

    def _claim_out_dir(self) -> None:
        """A folder holds one study: its tune.json names it (written once the study is opened)."""
        marker = self.out / "tune.json"
        if marker.is_file():
            owner = json.loads(marker.read_text()).get("study")
            if owner != self.study_name:
                raise CifarlensError(f"{self.out} holds study {owner}, not {self.study_name}; use another --out")

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
            if t.user_attrs.get("host") == HOST and isinstance(pid, int) and not process_alive(pid):
                with contextlib.suppress(ValueError, RuntimeError):  # another worker was faster
                    self.study.tell(t.number, state=TrialState.FAIL)
                    self.log(f"trial {t.number}: its worker (process {pid}) is gone; marked failed")
                    mark_interrupted(t.user_attrs.get("run_dir"))

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
                optuna.logging.set_verbosity(self._verbosity)
                raise self._interrupted
            if self._failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                raise CifarlensError(f"{MAX_FAILURES_IN_A_ROW} trials in a row failed; the last: {self._last_error}")
        counts = self._counts()
        self.log(f"study {self.study_name}: {self._progress(counts)}"
                 + (f", {counts['running']} still running in other workers" if counts["running"] else ""))
        return ran

    def _progress(self, counts: dict) -> str:
        """"3 of 5 trials finished"; a study past a smaller --trials: "5 trials finished (--trials 2 adds none)"."""
        if counts["finished"] > self.trials:
            return f"{counts['finished']} trials finished (--trials {self.trials} adds none)"
        return f"{counts['finished']} of {self.trials} trials finished"

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
        try:  # a sampled value may be refused, or name data that cannot be read (data.dataset: cifar10)
            cfg = self.space.apply(self.base, values)
            cfg = replace(cfg, train=resolve_train(cfg.train))
            bundle = self._bundle(cfg)
        except CifarlensError as err:
            return self._failed(trial, err)
        if cfg.data.augment is None:  # resolved, as train() would, so the stored config says what ran
            cfg = replace(cfg, data=replace(cfg.data, augment=bundle.info.augment))
        run_dir = self.out / "trials" / f"{trial.number:04d}"
        # best.yaml is trained from any folder: the data folder absolute, as train() records it
        cfg = replace(cfg, data=absolute_data_dir(cfg.data))
        trial.set_user_attr("run_dir", str(run_dir.absolute()))
        trial.set_user_attr("config", json.loads(json.dumps(to_dict(cfg))))
        self.log(f"trial {trial.number}: {format_values(values)} -> {run_dir}")
        seen: dict[str, Any] = {}

        def on_epoch_end(state, model) -> None:
            seen["state"] = state
            val_acc = state.history[-1]["val_acc"]
            trial.report(val_acc, state.epoch)
            if state.epoch < cfg.train.epochs and trial.should_prune():  # after the last epoch it saves nothing
                raise optuna.TrialPruned(f"val_acc {val_acc:.2%} after epoch {state.epoch} is below the "
                                         f"{self.pruner_name} pruner's bar")

        try:
            train(cfg, run_dir, evaluate_test=False, report=False, bundle=bundle, on_epoch_end=on_epoch_end)
        except optuna.TrialPruned as err:
            RunDir(run_dir).write_meta(status="pruned")  # train() wrote "interrupted"
            trial.set_user_attr("pruned_reason", str(err))  # trials.csv's note
            self._record(trial, seen.get("state"))
            self._failures_in_a_row = 0
            raise
        except TrainingDiverged as err:
            trial.set_user_attr("pruned_reason", str(err).split(";")[0])  # without train's hint (--force ...)
            self._record(trial, seen.get("state"))
            self._failures_in_a_row = 0
            raise optuna.TrialPruned(f"training diverged: {str(err).split(';')[0]}") from None
        except CifarlensError as err:
            return self._failed(trial, err)
        except KeyboardInterrupt as err:
            # a FAIL without Optuna's traceback; work() re-raises it (Ctrl-C, or SIGTERM's Terminated:
            # exit status 130 or 143) once the trial is recorded, and Optuna's warning for a NaN value ("The
            # value nan is not acceptable", which reads like a diverged loss) is silenced until then
            self._interrupted = err
            trial.set_user_attr("error", "interrupted")
            self.log(f"trial {trial.number} interrupted: recorded as failed; a continued study runs a new trial in its place")
            optuna.logging.set_verbosity(optuna.logging.ERROR)
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
        trial.set_user_attr("train_seconds", round(state.seconds, 3))

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
                              header + dump_yaml(best.user_attrs["config"], sort_keys=False))
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

