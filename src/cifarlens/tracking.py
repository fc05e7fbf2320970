"""Experiment tracking: optional loggers (TensorBoard, MLflow) behind one small interface.

A training run (rank 0 only) logs through a :class:`Tracker`: the resolved config as flat
params once, one row of metrics per epoch at step = epoch, and at the end the test metrics
and the run's final files. Each backend is one registered class; the libraries are extras
(``pip install 'cifarlens[tracking]'``), imported only when a run asks for them, and a
missing one is an error before any run folder is created (:func:`check_available`).

``--resume`` continues where the run stopped: TensorBoard appends to the same RUN/tensorboard/
(events from epochs after the checkpoint are purged), and MLflow reopens the run whose id
run.json keeps under ``tracking``.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Callable, Iterable

from cifarlens.config import RunConfig, TrackConfig, to_dict
from cifarlens.errors import CifarlensError
from cifarlens.io import MLFLOW_TABLES, OPTUNA_TABLES, check_sqlite_store
from cifarlens.registry import Registry
from cifarlens.runs import RunDir

INSTALL = "pip install 'cifarlens[tracking]'"
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")  # history.csv's names
# what a finished run hands to the loggers that keep files (those that exist: report.html is optional)
FINAL_FILES = ("config.yaml", "history.csv", "metrics.json", "confusion_matrix.png", "curves.png", "report.html")
TENSORBOARD_DIR = "tensorboard"


class Tracker:
    """The interface every logger implements; this base logs nothing."""

    package = ""  # the module a backend needs (import name, the same as its pip name here)

    def log_params(self, params: dict[str, str]) -> None:
        """The resolved config as flat ``{"train.lr": "0.001", ...}``; once, when a run starts."""

    def log_epoch(self, row: dict) -> None:
        """One history row (``epoch``, ``train_loss``, ..., ``seconds``), logged at step ``row["epoch"]``."""

    def log_resumed(self, rows: list[dict]) -> None:
        """A resumed run's history up to its checkpoint: the rows of it this logger lacks are logged
        (a run logs an epoch after its checkpoint, so a stop in between left the last one out)."""

    def log_final(self, metrics: dict[str, float], files: list[Path], step: int) -> None:
        """Test metrics (``test_accuracy``, ...) at the last epoch's step, and the run's final files."""

    def close(self, status: str = "finished") -> None:
        """End the run: "finished", or api's "interrupted" / "failed" / "diverged"."""


TRACKERS: Registry[type[Tracker]] = Registry("logger")


def list_trackers() -> list[str]:
    return TRACKERS.names()


def check_available(names: Iterable[str], track: TrackConfig | None = None) -> None:
    """Refuse unknown logger names, loggers whose library is not installed, and (with ``track``)
    an empty tracking URI or experiment name (one line each)."""
    if track is not None and "mlflow" in names:
        if track.tracking_uri is not None and not str(track.tracking_uri).strip():
            raise CifarlensError("--tracking-uri is empty: give a store (e.g. sqlite:///mlflow.db or "
                                 "http://HOST:5000), or leave the flag out for MLflow's default")
        if not isinstance(track.experiment, str) or not track.experiment.strip():
            raise CifarlensError(f"track.experiment must name an MLflow experiment, got {track.experiment!r}")
    for name in names:
        package = TRACKERS.get(name).package
        try:
            importlib.import_module(package)
        except ImportError:
            raise CifarlensError(f"--logger {name} needs the {package} package, which is not installed: "
                                 f"{INSTALL}") from None


def unused_settings(track: TrackConfig) -> list[str]:
    """Warnings for MLflow's settings given without ``mlflow`` among the loggers (ignored, silently)."""
    if "mlflow" in track.loggers or track.tracking_uri is None:
        return []
    return [f"track.tracking_uri {track.tracking_uri} is not used: it is MLflow's, and --logger mlflow is not "
            "given (nothing is logged there)"]


def check_reachable(names: Iterable[str], tracking_uri: str | None, timeout: float = 5.0) -> None:
    """An MLflow server (http/https URI) that does not answer is one error, before any run folder
    exists; MLflow itself retries a refused connection for minutes before it gives up."""
    import os
    import urllib.error
    import urllib.request

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    given = f"--tracking-uri {uri}" if tracking_uri else f"$MLFLOW_TRACKING_URI {uri}"  # where the user set it
    folder = Path(absolute_uri(uri).removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else None
    if "mlflow" in names and folder is not None and not folder.is_dir():  # MLflow would make the folders
        raise CifarlensError(f"{given}: the folder {folder} does not exist; make it, or fix the path")
    if "mlflow" in names and folder is not None:  # a folder, a read-only place: MLflow retried for two minutes
        check_sqlite_store(Path(absolute_uri(uri).removeprefix("sqlite:///")), given,
                           needs=MLFLOW_TABLES, kind="MLflow", other={"an Optuna study's": OPTUNA_TABLES})
    if "mlflow" in names and uri.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "mysql"):
        _check_database(uri, timeout)
    if "mlflow" not in names or not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()  # noqa: S310 (http(s) only)
    except urllib.error.HTTPError:
        return  # it answered (an older server without /health, or one behind a login)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise CifarlensError(f"the MLflow server {uri} does not answer ({reason}); start it, fix --tracking-uri, "
                             "or drop --logger mlflow") from None


def _check_database(uri: str, timeout: float) -> None:
    """One connection to an MLflow database store, given ``timeout`` seconds: MLflow retries a
    database that does not answer for about two minutes."""
    import sqlalchemy

    try:
        url = sqlalchemy.engine.make_url(uri)
        shown = url.render_as_string(hide_password=True)
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": max(1, int(timeout))})
    except Exception as err:  # a malformed URL, a driver that is not installed
        raise CifarlensError(f"MLflow store {uri.split('@')[-1]}: {type(err).__name__}: "
                             f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}") from None
    try:
        engine.connect().close()
    except Exception as err:  # sqlalchemy.exc.OperationalError and the driver's own
        first = str(getattr(err, "orig", err)).strip().splitlines()
        raise CifarlensError(f"the MLflow database {shown} does not answer ({first[0][:200] if first else err}); start "
                             "it, fix --tracking-uri, or drop --logger mlflow") from None
    finally:
        engine.dispose()


def flatten(values: dict, prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.1}, "model": {"kwargs": {"widths": [8]}}}``
    -> ``{"train.lr": "0.1", "model.kwargs.widths": "[8]"}`` (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def create_trackers(names: Iterable[str], run: RunDir, track: TrackConfig, *, first_epoch: int = 1,
                    log: Callable[[str], None] = print) -> list[Tracker]:
    """One started tracker per name; ``first_epoch`` > 1 continues a resumed run."""
    started: list[Tracker] = []
    try:
        for name in dict.fromkeys(names):
            started.append(TRACKERS.get(name)(run, track, first_epoch=first_epoch, log=log))
    except BaseException:
        for tracker in started:
            tracker.close("failed")
        raise
    return started


class Trackers(Tracker):
    """Several trackers as one. A logger that fails during training is reported and dropped:
    a tracking server's outage does not cost the training run."""

    def __init__(self, trackers: list[Tracker] | None = None, log: Callable[[str], None] = print):
        self.trackers, self.log = list(trackers or []), log

    def _each(self, method: str, *args) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # noqa: BLE001 - reported here, and the logger is not used again
                first = _first_words(err)[:300]
                self.log(f"warning: {type(tracker).__name__} failed ({first}); training goes on without it")
                self.trackers.remove(tracker)

    def log_params(self, params):
        self._each("log_params", params)

    def log_epoch(self, row):
        self._each("log_epoch", row)

    def log_resumed(self, rows):
        self._each("log_resumed", rows)

    def log_final(self, metrics, files, step):
        self._each("log_final", metrics, files, step)

    def close(self, status="finished"):
        self._each("close", status)

    def finish(self, run: RunDir, result: dict | None, train_seconds: float, step: int) -> None:
        """Log the test metrics (``result`` of evaluate_run, None when the test set was not used),
        the final files, and close."""
        metrics = {f"test_{k}": v for k, v in (result or {}).items() if isinstance(v, float)}
        files = [run / name for name in FINAL_FILES if (run / name).is_file()]
        self.log_final(metrics | {"train_seconds": float(train_seconds)}, files, step)
        self.close("finished")


def _first_words(err: BaseException) -> str:
    """The first line of the innermost error behind ``err``: a database driver's own words ("attempt
    to write a readonly database"), not MLflow's or SQLAlchemy's wrapper ("(raised as a result of
    Query-invoked autoflush; ...)")."""
    chain, seen = [err], {id(err)}
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and id(nxt) not in seen:
        chain.append(nxt)
        seen.add(id(nxt))
    for cause in reversed(chain):
        lines = str(cause).strip().splitlines()
        if lines:
            return lines[0]
    return type(err).__name__


def start(cfg: RunConfig, run: RunDir, *, resume: bool, history: list[dict] = (),
          log: Callable[[str], None] = print) -> Trackers:
    """The loggers ``cfg.track`` asks for, started for ``run``; a new run logs its params (a
    resumed one did, and MLflow refuses to change them), a resumed one the ``history`` up to its
    checkpoint that a logger lacks. A logger that cannot start (e.g. an unreachable server)
    raises; the caller decides what becomes of the run folder."""
    first_epoch = history[-1]["epoch"] + 1 if history else 1
    trackers = Trackers(create_trackers(cfg.track.loggers, run, cfg.track, first_epoch=first_epoch, log=log), log)
    if resume:
        trackers.log_resumed(list(history))
    else:
        trackers.log_params(flatten(to_dict(cfg)))
    return trackers


# ---------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------


@TRACKERS.register("tensorboard")
class TensorBoardTracker(Tracker):
    """Event files in RUN/tensorboard/ (``tensorboard --logdir runs/`` shows every run)."""

    package = "tensorboard"

    def __init__(self, run: RunDir, track: TrackConfig, *, first_epoch: int = 1, log=print):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides older events from this step on. A resumed run re-logs its last
        # checkpointed epoch (a stop may have come before it was logged: log_resumed), and a run of an
        # older cifarlens may have logged epochs after its checkpoint, which are trained again now
        self.writer = SummaryWriter(str(run / TENSORBOARD_DIR), purge_step=first_epoch - 1 if first_epoch > 1 else None)
        self.first_epoch = first_epoch
        log(f"tracking: TensorBoard events in {run / TENSORBOARD_DIR} (view: tensorboard --logdir {run.path})")

    def log_params(self, params):
        table = "| key | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in params.items())
        self.writer.add_text("config", table, 0)

    def log_epoch(self, row):
        for key in EPOCH_METRICS:
            if key in row:
                self.writer.add_scalar(key, row[key], row["epoch"])
        self.writer.flush()  # on disk every epoch: a killed run keeps what it logged

    def log_resumed(self, rows):
        for row in rows:
            if row["epoch"] >= self.first_epoch - 1:  # the last checkpointed epoch, purged above
                self.log_epoch(row)

    def log_final(self, metrics, files, step):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        for path in files:  # the confusion matrix as an image; TensorBoard keeps no other files
            if path.suffix == ".png" and path.name.startswith("confusion_matrix"):
                import numpy as np
                from PIL import Image

                self.writer.add_image(path.stem, np.asarray(Image.open(path).convert("RGB")), step,
                                      dataformats="HWC")  # (H, W, 3) uint8

    def close(self, status="finished"):
        self.writer.close()


# MLflow run states for api's run statuses
MLFLOW_STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED", "diverged": "FAILED"}


def absolute_uri(uri: str) -> str:
    """A local store named relative to the working directory, made absolute, so that
    ``--resume`` from another directory finds it (``./mlruns``, ``file:mlruns``, ``sqlite:///x.db``)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return Path(uri.removeprefix("file:")).resolve().as_uri()
    if "://" not in uri and ":" not in uri.split("/")[0] and uri != "databricks":  # a plain path
        return Path(uri).resolve().as_uri()
    return uri


@TRACKERS.register("mlflow")
class MlflowTracker(Tracker):
    """A run in an MLflow tracking server or local store; its id is kept in run.json for --resume."""

    package = "mlflow"

    def __init__(self, run: RunDir, track: TrackConfig, *, first_epoch: int = 1, log=print):
        import logging

        import mlflow
        from mlflow.tracking import MlflowClient

        # its database layer logs every SQLAlchemy error with a traceback, also those cifarlens turns into
        # one line (a read-only store): the error itself still reaches this class
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

        saved = run.meta().get("tracking") or {}
        self.uri = saved.get("mlflow_tracking_uri") or absolute_uri(track.tracking_uri or mlflow.get_tracking_uri())
        store = Path(self.uri.removeprefix("sqlite:///")) if self.uri.startswith("sqlite:///") else None
        if saved.get("mlflow_run_id") and store is not None and not store.is_file():  # MLflow would make an empty one
            raise CifarlensError(f"MLflow at {self.uri}: the store that holds this run's MLflow run "
                                 f"{saved['mlflow_run_id']} is gone; put it back to resume")
        try:
            self.client = MlflowClient(self.uri)
            self.run_id = saved.get("mlflow_run_id")
            if self.run_id:  # a resumed run: the same MLflow run, running again
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                self.run_id = self.client.create_run(
                    self._experiment_id(track.experiment), run_name=run.path.name,
                    tags={"cifarlens.run_dir": str(run.path.resolve())}).info.run_id
                run.write_meta(tracking=saved | {"mlflow_tracking_uri": self.uri, "mlflow_run_id": self.run_id})
        except Exception as err:  # noqa: BLE001 - unreachable server, unreadable store, unknown run id, ...
            if "unsupported URI" in str(err):  # no such scheme in MLflow's registry: the innermost error said "'bogus'"
                raise CifarlensError(f"MLflow at {self.uri}: unknown store type {self.uri.split(':', 1)[0]!r}; use "
                                     "http(s)://HOST:PORT, sqlite:///FILE.db, postgresql://... or mysql://...") from None
            raise CifarlensError(f"MLflow at {self.uri}: {_first_words(err)}") from None
        log(f"tracking: MLflow run {self.run_id} (experiment {track.experiment!r}) at {self.uri}")

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another run created it in the meantime
            return self.client.get_experiment_by_name(name).experiment_id

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def log_params(self, params):
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])

    def log_epoch(self, row):
        self._metrics({k: row[k] for k in EPOCH_METRICS if k in row}, row["epoch"])

    def log_resumed(self, rows):
        logged = max((m.step for m in self.client.get_metric_history(self.run_id, "train_loss")), default=0)
        for row in rows:
            if row["epoch"] > logged:
                self.log_epoch(row)

    def log_final(self, metrics, files, step):
        self._metrics(metrics, step)
        for path in files:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status="finished"):
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))
