"""Experiment tracking (cifarlens.tracking) with the real TensorBoard and MLflow libraries:
tiny trainings on synthetic Fashion-MNIST, read back with TensorBoard's own event reader and
MLflow's client."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifarlens.api import train
from cifarlens.cli import main
from cifarlens.config import RunConfig, merge
from cifarlens.errors import CifarlensError
from cifarlens.tracking import EPOCH_METRICS, absolute_uri, list_trackers
from conftest import TINY, make_cifar10, make_fashion_mnist

pytest.importorskip("tensorboard", reason="the tracking extra: pip install 'cifarlens[tracking]'")
pytest.importorskip("mlflow", reason="the tracking extra: pip install 'cifarlens[tracking]'")

from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_fashion_mnist(tmp_path_factory.mktemp("fm") / "data", n_train=200, n_test=50).data_dir


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite MLflow store for the tests that name it (creating its tables takes seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        # MLflow keeps this store for the process, with its artifact root ./mlruns taken from the
        # working directory now: there, not in the directory pytest runs in
        patch.chdir(root)
        MlflowClient(uri).search_experiments()  # creates the tables
    return uri


def args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--no-download", "--out", str(out),
            *TINY, *extra]


def history(run: Path) -> list[dict]:
    return list(csv.DictReader((run / "history.csv").open()))


def scalars(run: Path) -> EventAccumulator:
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def mlflow_run(run: Path):
    """(client, MLflow run) of a run folder, through the store and id its run.json names."""
    tracking = json.loads((run / "run.json").read_text())["tracking"]
    client = MlflowClient(tracking["mlflow_tracking_uri"])
    return client, client.get_run(tracking["mlflow_run_id"])


def test_tensorboard_logs_each_epoch_the_test_metrics_and_the_config(data_dir, tmp_path):
    out = tmp_path / "run"
    assert main(args(data_dir, out, "--epochs", "2", "--logger", "tensorboard", "--no-report")) == 0
    events = scalars(out)
    rows = history(out)
    for key in EPOCH_METRICS:
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [1, 2], key
        assert [e.value for e in logged] == pytest.approx([float(r[key]) for r in rows], rel=1e-5), key
    accuracy = json.loads((out / "metrics.json").read_text())["accuracy"]
    assert [(e.step, e.value) for e in events.Scalars("test_accuracy")] == [(2, pytest.approx(accuracy))]
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| train.epochs | 2 |" in config and "| model.name | lensnet_light |" in config
    image = events.Images("confusion_matrix")[0]
    assert image.step == 2 and image.width > 100
    assert "tracking: TensorBoard events in" in (out / "train.log").read_text()


@pytest.mark.slow  # a CLI process, ~5 s; CI runs it with the slow set
def test_mlflow_default_store_in_the_working_directory(data_dir, tmp_path, monkeypatch):
    """No --tracking-uri: MLflow's own default where the command runs, as `mlflow ui` there expects."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(args(data_dir, Path("run"), "--epochs", "2", "--logger", "mlflow")) == 0
    out = tmp_path / "run"
    client, run = mlflow_run(out)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "cifarlens"
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(tmp_path)
    # the params: the resolved config, flat
    params = run.data.params
    assert params["train.epochs"] == "2" and params["data.dataset"] == "fashion-mnist"
    assert params["model.kwargs.widths"] == "[8, 16]" and params["train.recipe"] == "modern"
    assert params["track.loggers"] == "['mlflow']"
    # one value per epoch, at step = epoch, equal to history.csv
    rows = history(out)
    for key in EPOCH_METRICS:
        logged = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in logged] == [1, 2], key
        assert [m.value for m in logged] == pytest.approx([float(r[key]) for r in rows]), key
    metrics = json.loads((out / "metrics.json").read_text())
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])
    assert run.data.metrics["test_f1_macro"] == pytest.approx(metrics["f1_macro"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "report.html", "confusion_matrix.png", "config.yaml", "history.csv"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path)))
    assert json.loads(local.read_text()) == metrics


def test_resume_continues_the_same_mlflow_run_and_tensorboard_steps(data_dir, store, tmp_path, monkeypatch):
    # set from the config (a relative store path, resolved where the run started), 3 epochs, stopped after 1
    first, other = tmp_path / "first", tmp_path / "other"
    first.mkdir(), other.mkdir()
    monkeypatch.chdir(first)
    relative = "sqlite:///" + os.path.relpath(store.removeprefix("sqlite:///"), first)
    cfg = merge(RunConfig(), {
        "data": {"dataset": "fashion-mnist", "data_dir": str(data_dir), "download": False},
        "model": {"name": "lensnet_light", "kwargs": {"widths": [8, 16], "depths": [1, 1]}},
        "train": {"batch_size": 32, "epochs": 3},
        "track": {"loggers": "tensorboard, mlflow", "tracking_uri": relative, "experiment": "resumed"},
    })

    def stop_after_one(state, model):
        if state.epoch == 1:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, on_epoch_end=stop_after_one, report=False)
    client, run = mlflow_run(out)
    assert run.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1]
    # a run killed after logging epoch 2 but before its checkpoint had written this; epoch 2 is
    # trained again on resume, and TensorBoard must show the new value only
    with SummaryWriter(str(out / "tensorboard")) as writer:
        writer.add_scalar("val_loss", 123.0, 2)

    monkeypatch.chdir(other)  # resumed from elsewhere: run.json holds the store's absolute URI
    assert main(["train", "--resume", str(out), "--no-report"]) == 0
    client, resumed = mlflow_run(out)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    runs = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    assert [r.info.run_id for r in runs] == [run.info.run_id]  # no second run
    rows = history(out)
    for key in ("val_loss", "train_acc", "lr"):
        logged = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in logged] == [1, 2, 3], key
        assert [m.value for m in logged] == pytest.approx([float(r[key]) for r in rows]), key
    assert resumed.data.params["train.epochs"] == "3"

    events = scalars(out)  # the event files of the three writers, read as one
    assert len(list((out / "tensorboard").iterdir())) == 3
    assert [(e.step, pytest.approx(e.value, rel=1e-5)) for e in events.Scalars("val_loss")] == \
        [(i + 1, float(r["val_loss"])) for i, r in enumerate(rows)]
    assert [e.step for e in events.Scalars("test_accuracy")] == [3]


def test_a_resume_whose_mlflow_store_is_gone_leaves_the_run_and_the_path_as_they_were(data_dir, tmp_path, capsys):
    """It made an empty mlflow.db where the store had been and marked the run failed."""
    db = tmp_path / "mlflow.db"
    cfg = merge(RunConfig(), {
        "data": {"dataset": "fashion-mnist", "data_dir": str(data_dir), "download": False},
        "model": {"name": "lensnet_light", "kwargs": {"widths": [8, 16], "depths": [1, 1]}},
        "train": {"batch_size": 32, "epochs": 2},
        "track": {"loggers": ["mlflow"], "tracking_uri": f"sqlite:///{db}"},
    })

    def stop(state, model):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, on_epoch_end=stop, report=False)
    db.rename(tmp_path / "moved.db")
    assert main(["train", "--resume", str(out)]) == 2
    assert "is gone; put it back to resume" in capsys.readouterr().err
    assert not db.exists() and json.loads((out / "run.json").read_text())["status"] == "interrupted"
    (tmp_path / "moved.db").rename(db)
    assert main(["train", "--resume", str(out), "--no-report"]) == 0


def test_a_stop_between_the_checkpoint_and_the_logging_leaves_no_gap_or_duplicate(data_dir, store, tmp_path,
                                                                                  monkeypatch):
    """Epochs were logged before their checkpoint: a kill in between made --resume train and log the
    epoch again, twice at one step in MLflow."""
    from cifarlens.tracking import Trackers

    cfg = merge(RunConfig(), {
        "data": {"dataset": "fashion-mnist", "data_dir": str(data_dir), "download": False},
        "model": {"name": "lensnet_light", "kwargs": {"widths": [8, 16], "depths": [1, 1]}},
        "train": {"batch_size": 32, "epochs": 3},
        "track": {"loggers": "tensorboard, mlflow", "tracking_uri": store, "experiment": "gap"},
    })
    log_epoch = Trackers.log_epoch

    def stopped_at_two(self, row):  # the process ends after checkpoint 2, before epoch 2 is logged
        if row["epoch"] == 2:
            raise KeyboardInterrupt
        log_epoch(self, row)

    out = tmp_path / "run"
    monkeypatch.setattr(Trackers, "log_epoch", stopped_at_two)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, report=False)
    monkeypatch.setattr(Trackers, "log_epoch", log_epoch)
    assert json.loads((out / "run.json").read_text())["epochs_done"] == 2
    assert main(["train", "--resume", str(out), "--no-report"]) == 0
    rows = history(out)
    client, run = mlflow_run(out)
    logged = client.get_metric_history(run.info.run_id, "val_loss")
    assert [(m.step, pytest.approx(m.value)) for m in logged] == [(i + 1, float(r["val_loss"])) for i, r in enumerate(rows)]
    events = scalars(out)
    assert [(e.step, pytest.approx(e.value, rel=1e-5)) for e in events.Scalars("val_loss")] == \
        [(i + 1, float(r["val_loss"])) for i, r in enumerate(rows)]


@pytest.mark.parametrize("logger", list_trackers())
def test_a_missing_library_is_one_line_before_any_run_folder(data_dir, tmp_path, monkeypatch, capsys, logger):
    monkeypatch.setitem(sys.modules, logger, None)  # `import tensorboard` / `import mlflow` fails as if not installed
    out = tmp_path / "run"
    assert main(args(data_dir, out, "--epochs", "1", "--logger", logger)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cifarlens: error: --logger {logger} needs the {logger} package, which is not installed: "
                   "pip install 'cifarlens[tracking]'"]
    assert not out.exists()


def test_unknown_loggers_and_wrong_types_are_clear_errors(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(data_dir, out, "--epochs", "1", "--logger", "tensorboard,wandb")) == 2
    assert capsys.readouterr().err.strip() == \
        "cifarlens: error: unknown logger 'wandb'; choose one of: " + ", ".join(list_trackers())
    assert not out.exists()
    assert main(args(data_dir, out, "--epochs", "1", "--logger", ",")) == 2  # it logged nothing, silently
    assert "--logger names no logger; give " in capsys.readouterr().err and not out.exists()
    with pytest.raises(CifarlensError, match="track.loggers"):
        merge(RunConfig(), {"track": {"loggers": 3}})
    with pytest.raises(CifarlensError, match="track.wandb"):
        merge(RunConfig(), {"track": {"wandb": True}})
    assert merge(RunConfig(), {"track": {"loggers": ["mlflow"]}}).track.loggers == ["mlflow"]
    # --resume keeps the run's own loggers: adding one there is refused like any other config flag
    assert main(["train", "--resume", str(out), "--logger", "mlflow"]) == 2
    assert "drop --logger" in capsys.readouterr().err


def test_an_unusable_mlflow_store_is_one_line_and_leaves_no_run_folder(data_dir, tmp_path, capsys):
    """The new run folder goes (nothing was trained into it), so the same command runs again without
    --force; it was left behind, marked failed."""
    out = tmp_path / "run"
    bad = tmp_path / "not-a-database.db"
    bad.write_text("this is not SQLite")
    for _ in range(2):
        assert main(args(data_dir, out, "--epochs", "1", "--logger", "mlflow", "--tracking-uri", f"sqlite:///{bad}")) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == (f"cifarlens: error: --tracking-uri sqlite:///{bad}: {bad} is not an SQLite database (file is not "
                       "a database); choose another file")  # before MLflow opens it
        assert not out.exists() and bad.read_text() == "this is not SQLite"
    assert main(args(data_dir, out, "--epochs", "1", "--logger", "mlflow", "--tracking-uri", "bogus://x")) == 2
    assert "MLflow at bogus://x: unknown store type 'bogus'; use http(s)://" in capsys.readouterr().err  # was "'bogus'"
    assert not out.exists()
    missing = tmp_path / "no" / "such" / "mlflow.db"  # MLflow made these folders, silently
    assert main(args(data_dir, out, "--epochs", "1", "--logger", "mlflow", "--tracking-uri", f"sqlite:///{missing}")) == 2
    assert f"the folder {missing.parent} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "no").exists() and not out.exists()


def test_an_mlflow_server_that_does_not_answer_is_one_line_before_any_run_folder(data_dir, tmp_path, capsys):
    """A real closed port on localhost: MLflow would retry for minutes, then fail in a run folder."""
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "run"
    start = time.monotonic()
    assert main(args(data_dir, out, "--epochs", "1", "--logger", "mlflow", "--tracking-uri",
                      f"http://127.0.0.1:{port}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"cifarlens: error: the MLflow server http://127.0.0.1:{port} does not answer (")
    assert not out.exists() and time.monotonic() - start < 60
    # a PostgreSQL store on that port: one line, the password hidden (MLflow retried for about 2 minutes)
    start = time.monotonic()
    assert main(args(data_dir, out, "--epochs", "1", "--logger", "mlflow", "--tracking-uri",
                      f"postgresql+psycopg://me:secret@127.0.0.1:{port}/mlflow")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"cifarlens: error: the MLflow database postgresql+psycopg://me:***@127.0.0.1:{port}/mlflow "
                              "does not answer (") and "secret" not in err[-1]
    assert not out.exists() and time.monotonic() - start < 60


def test_a_logger_failing_during_training_is_reported_and_training_goes_on(data_dir, store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow puts a new experiment's artifacts in ./mlruns
    db = tmp_path / "mlflow.db"
    shutil.copy(store.removeprefix("sqlite:///"), db)  # a store of our own, its tables already made
    cfg = merge(RunConfig(), {
        "data": {"dataset": "fashion-mnist", "data_dir": str(data_dir), "download": False},
        "model": {"name": "lensnet_light", "kwargs": {"widths": [8, 16], "depths": [1, 1]}},
        "train": {"batch_size": 32, "epochs": 2},
        "track": {"loggers": ["mlflow", "tensorboard"], "tracking_uri": f"sqlite:///{db}"},
    })

    def break_the_store(state, model):  # the store goes away after epoch 1, as a server might
        if state.epoch == 1:
            db.rename(tmp_path / "moved.db")

    out = tmp_path / "run"
    result = train(cfg, out, on_epoch_end=break_the_store, report=False)
    assert result["accuracy"] >= 0  # finished, with test metrics
    warnings = [line for line in (out / "train.log").read_text().splitlines()
                if line.startswith("warning:") and "calibration:" not in line  # (a tiny validation split)
                and "Fashion-MNIST files in" not in line]  # (a subset under the official names)
    assert len(warnings) == 1 and warnings[0].startswith("warning: MlflowTracker failed (")
    assert warnings[0].endswith("training goes on without it")
    assert "(attempt to write a readonly database)" in warnings[0]  # SQLite's words, not "(raised as a result of..."
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert [e.step for e in scalars(out).Scalars("test_accuracy")] == [2]  # the other logger went on


def test_local_store_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert absolute_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert absolute_uri("mlruns") == (tmp_path / "mlruns").as_uri()
    assert absolute_uri("file:mlruns") == (tmp_path / "mlruns").as_uri()
    assert absolute_uri("http://mlflow.example:5000") == "http://mlflow.example:5000"
    assert absolute_uri("databricks") == "databricks"


@pytest.mark.slow  # a two-process torchrun, ~9 s: with the slow set, which CI runs too
def test_data_parallel_runs_log_once_from_rank_zero(store, tmp_path):
    data = make_cifar10(tmp_path / "data", n_train_per_batch=40, n_test=50)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "cifarlens.cli", "train", "--dataset", "cifar10", "--data-dir", str(data.data_dir),
         "--no-download", "--out", str(out), *TINY, "--epochs", "2", "--no-report", "--nproc", "2",
         "--logger", "tensorboard", "--logger", "mlflow", "--tracking-uri", store, "--set", "track.experiment=ddp"],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path)  # (a hang guard; MLflow artifacts in ./mlruns)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_acc")] == [1, 2]
    assert len(list((out / "tensorboard").iterdir())) == 1  # one writer
    assert [e.step for e in scalars(out).Scalars("train_loss")] == [1, 2]


def test_an_empty_tracking_uri_or_experiment_is_one_line_before_any_run_folder(data_dir, tmp_path, capsys):
    """--tracking-uri "" fell back to the default store unseen; an empty experiment crashed in MLflow."""
    out = tmp_path / "run"
    for flags, message in ((["--tracking-uri", ""], "--tracking-uri is empty"),
                           (["--set", "track.experiment=''"], "track.experiment must name an MLflow experiment")):
        assert main(args(data_dir, out, "--epochs", "1", "--logger", "mlflow", *flags)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("cifarlens: error: ") and message in err[-1]
        assert not out.exists()


def test_a_tracking_uri_from_the_environment_is_named_as_such(tmp_path, monkeypatch):
    """A store in a missing folder set by $MLFLOW_TRACKING_URI was blamed on --tracking-uri, not given."""
    from cifarlens.errors import CifarlensError
    from cifarlens.tracking import check_reachable

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'nope' / 'x.db'}")
    with pytest.raises(CifarlensError, match=r"^\$MLFLOW_TRACKING_URI sqlite:///.*: the folder .*nope does not exist"):
        check_reachable(["mlflow"], None)
    with pytest.raises(CifarlensError, match=r"^--tracking-uri sqlite:///"):
        check_reachable(["mlflow"], f"sqlite:///{tmp_path / 'gone' / 'y.db'}")
